"""The event bus (fan-out, repeats, a slow subscriber dropped, close) and the Prometheus
text writer. The daemon-level counterparts are test_events_runc.py and test_metrics_runc.py."""

from __future__ import annotations

import asyncio

import pytest

from crivm.errors import ResourceExhausted
from crivm.proto import api_pb2
from crivm.runtime.events import EventBus
from crivm.runtime.metrics.prometheus import Counter, Gauge, Histogram, format_value, render


def event(container_id: str) -> api_pb2.ContainerEventResponse:
    return api_pb2.ContainerEventResponse(container_id=container_id)


async def test_every_subscriber_gets_every_event() -> None:
    bus = EventBus()
    first, second = bus.subscribe(), bus.subscribe()
    bus.publish(event("a"))
    bus.publish(event("b"))
    for subscription in (first, second):
        got = [await asyncio.wait_for(subscription.__anext__(), 1) for _ in range(2)]
        assert [e.container_id for e in got] == ["a", "b"]
    first.close()
    assert bus.has_subscribers
    second.close()
    assert not bus.has_subscribers


async def test_slow_subscriber_is_dropped_not_blocking() -> None:
    bus = EventBus(queue_size=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    for i in range(3):
        bus.publish(event(str(i)))
        assert (await asyncio.wait_for(fast.__anext__(), 1)).container_id == str(i)
    bus.publish(event("overflow"))  # slow's queue is full
    assert slow.dropped
    with pytest.raises(ResourceExhausted):
        await asyncio.wait_for(slow.__anext__(), 1)
    assert (await asyncio.wait_for(fast.__anext__(), 1)).container_id == "overflow"
    bus.publish(event("after"))
    assert (await asyncio.wait_for(fast.__anext__(), 1)).container_id == "after"


async def test_close_ends_streams() -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    bus.publish(event("pending"))
    await bus.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(subscription.__anext__(), 1)


def test_repeats_are_recognised() -> None:
    bus = EventBus()
    stopped = api_pb2.CONTAINER_STOPPED_EVENT
    assert not bus.is_repeat("c", stopped)
    assert bus.is_repeat("c", stopped)
    assert not bus.is_repeat("c", api_pb2.CONTAINER_DELETED_EVENT)
    assert not bus.is_repeat("c", stopped)  # a deleted subject's history is forgotten


def test_prometheus_text_format() -> None:
    calls = Counter("calls_total", "Calls by method.", ("method", "code"))
    calls.inc("Version", "OK")
    calls.inc("Version", "OK")
    calls.inc("Stop\"x\\y\nz", "NOT_FOUND")
    pods = Gauge("pods", "Pods.", ("state",))
    pods.replace([(("ready",), 2.0)])
    latency = Histogram("latency_seconds", "Latency.", ("method",), buckets=(0.1, 1.0))
    latency.observe(0.05, "Version")
    latency.observe(0.5, "Version")
    latency.observe(5.0, "Version")
    text = render([calls, pods, latency])
    assert text == (
        "# HELP calls_total Calls by method.\n"
        "# TYPE calls_total counter\n"
        'calls_total{method="Stop\\"x\\\\y\\nz",code="NOT_FOUND"} 1\n'
        'calls_total{method="Version",code="OK"} 2\n'
        "# HELP pods Pods.\n"
        "# TYPE pods gauge\n"
        'pods{state="ready"} 2\n'
        "# HELP latency_seconds Latency.\n"
        "# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{method="Version",le="0.1"} 1\n'
        'latency_seconds_bucket{method="Version",le="1"} 2\n'
        'latency_seconds_bucket{method="Version",le="+Inf"} 3\n'
        'latency_seconds_sum{method="Version"} 5.55\n'
        'latency_seconds_count{method="Version"} 3\n'
    )
    with pytest.raises(ValueError):
        calls.inc("only-one-label")
    with pytest.raises(ValueError):
        calls.inc("a", "b", amount=-1)
    assert format_value(float("inf")) == "+Inf"
    assert format_value(0.25) == "0.25"

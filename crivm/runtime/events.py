"""The daemon's "events" component: container and sandbox lifecycle events for
GetContainerEvents (kubelet's evented PLEG).

The CRI call modules publish with one line (``emit_container``/``emit_sandbox``) after the
store row reflects the change, so each event carries the statuses as they are now. Every
subscriber has a bounded queue; one that falls behind is dropped (its stream ends with
RESOURCE_EXHAUSTED) rather than slowing the calls that publish or growing without bound.
kubelet answers a broken stream by relisting, so nothing is lost for it.

Sandboxes are reported like containerd does: ``container_id`` is the sandbox id, and the
sandbox gets a created and a started event when it runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from crivm.errors import ResourceExhausted
from crivm.proto import api_pb2
from crivm.runtime.backend import POD_READY
from crivm.runtime.cri_messages import container_status, pod_sandbox_status
from crivm.runtime.store import now_ns

if TYPE_CHECKING:
    from crivm.runtime.daemon import Daemon
    from crivm.runtime.store import PodRecord

log = logging.getLogger(__name__)

QUEUE_SIZE = 1024
# Remember the last event of this many subjects, to drop repeats (two calls noticing the
# same exit).
_LAST_EVENTS_KEPT = 4096

Event = api_pb2.ContainerEventResponse


class Subscription:
    """One GetContainerEvents stream: iterate it; it ends when the bus closes."""

    def __init__(self, bus: EventBus, queue_size: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(queue_size)
        self.dropped = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is not None:
            return event
        if self.dropped:
            raise ResourceExhausted(
                f"the event stream fell more than {self._queue.maxsize} events behind and was "
                "dropped; subscribe again"
            )
        raise StopAsyncIteration

    def offer(self, event: Event) -> bool:
        """Queue ``event``; False (and the stream is ended) when the queue is full."""
        try:
            self._queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.dropped = True
            self.end()
            return False

    def end(self) -> None:
        # Make room for the end marker: whatever is queued is moot once the stream ends.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self._queue_size = queue_size
        self._subscriptions: list[Subscription] = []
        self._last: dict[str, int] = {}

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscriptions)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._queue_size)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def is_repeat(self, subject_id: str, event_type: int) -> bool:
        """Whether ``subject_id``'s last event had this type already; records it if not."""
        if self._last.get(subject_id) == event_type:
            return True
        if event_type == api_pb2.CONTAINER_DELETED_EVENT:
            self._last.pop(subject_id, None)
        else:
            if len(self._last) >= _LAST_EVENTS_KEPT:
                self._last.pop(next(iter(self._last)))
            self._last[subject_id] = event_type
        return False

    def publish(self, event: Event) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.offer(event):
                self.unsubscribe(subscription)
                log.warning("dropped a GetContainerEvents subscriber that fell %d events behind",
                            self._queue_size)

    async def close(self) -> None:
        for subscription in self._subscriptions:
            subscription.end()
        self._subscriptions.clear()


def _bus(daemon: Daemon) -> EventBus | None:
    bus = daemon.components.get("events")
    return bus if isinstance(bus, EventBus) else None


def _event(daemon: Daemon, pod: PodRecord, subject_id: str, event_type: int) -> Event:
    state = api_pb2.SANDBOX_READY if pod.state == POD_READY else api_pb2.SANDBOX_NOTREADY
    return Event(
        container_id=subject_id,
        container_event_type=event_type,  # type: ignore[arg-type]
        created_at=now_ns(),
        pod_sandbox_status=pod_sandbox_status(pod, state),
        containers_statuses=[container_status(c) for c in daemon.store.list_containers(pod.id)],
    )


def emit_container(daemon: Daemon, pod_id: str, container_id: str, event_type: int) -> None:
    """Publish a lifecycle event of ``container_id``; a no-op without subscribers."""
    bus = _bus(daemon)
    if bus is None or bus.is_repeat(container_id, event_type) or not bus.has_subscribers:
        return
    pod = daemon.store.get_pod(pod_id)
    if pod is not None:
        bus.publish(_event(daemon, pod, container_id, event_type))


def emit_sandbox(daemon: Daemon, pod_id: str, event_type: int) -> None:
    """Publish a lifecycle event of the sandbox itself (``container_id`` is the pod id)."""
    emit_container(daemon, pod_id, pod_id, event_type)


async def open_component(daemon: Daemon) -> EventBus:
    """The daemon's opener for the "events" component (see crivm.runtime.daemon)."""
    return EventBus()

"""GetContainerEvents: a stream of container and sandbox lifecycle events, from now on."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.events import EventBus


async def handle(
    daemon: Daemon, request: api_pb2.GetEventsRequest
) -> AsyncIterator[api_pb2.ContainerEventResponse]:
    bus: EventBus = daemon.component("events")
    subscription = bus.subscribe()
    try:
        async for event in subscription:
            yield event
    finally:
        subscription.close()

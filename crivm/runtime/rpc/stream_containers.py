"""StreamContainers: ListContainers in batches, for nodes with very many containers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime import wire
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc import list_containers

BATCH = 100


async def handle(
    daemon: Daemon, request: api_pb2.StreamContainersRequest
) -> AsyncIterator[wire.Encoded]:
    # Both responses carry the containers in field 1, so ListContainers' items fit as they are.
    items = await list_containers.encoded_items(daemon, request.filter)
    for start in range(0, len(items), BATCH):
        yield wire.Encoded(b"".join(items[start : start + BATCH]))

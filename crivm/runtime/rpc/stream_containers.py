"""StreamContainers: ListContainers in batches, for nodes with very many containers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc import list_containers

BATCH = 100


async def handle(
    daemon: Daemon, request: api_pb2.StreamContainersRequest
) -> AsyncIterator[api_pb2.StreamContainersResponse]:
    listed = await list_containers.handle(
        daemon, api_pb2.ListContainersRequest(filter=request.filter)
    )
    items = list(listed.containers)
    for start in range(0, len(items), BATCH):
        yield api_pb2.StreamContainersResponse(containers=items[start : start + BATCH])

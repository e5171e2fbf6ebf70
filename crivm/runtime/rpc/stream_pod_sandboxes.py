"""StreamPodSandboxes: ListPodSandbox in batches, for nodes with very many pods."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc import list_pod_sandbox

BATCH = 100


async def handle(
    daemon: Daemon, request: api_pb2.StreamPodSandboxesRequest
) -> AsyncIterator[api_pb2.StreamPodSandboxesResponse]:
    listed = await list_pod_sandbox.handle(
        daemon, api_pb2.ListPodSandboxRequest(filter=request.filter)
    )
    items = list(listed.items)
    for start in range(0, len(items), BATCH):
        yield api_pb2.StreamPodSandboxesResponse(pod_sandboxes=items[start : start + BATCH])

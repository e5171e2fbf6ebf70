"""StreamPodSandboxMetrics: ListPodSandboxMetrics in chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.list_pod_sandbox_metrics import all_pod_metrics

CHUNK = 50


async def handle(
    daemon: Daemon, request: api_pb2.StreamPodSandboxMetricsRequest
) -> AsyncIterator[api_pb2.StreamPodSandboxMetricsResponse]:
    metrics = await all_pod_metrics(daemon)
    for start in range(0, len(metrics), CHUNK):
        yield api_pb2.StreamPodSandboxMetricsResponse(
            pod_sandbox_metrics=metrics[start:start + CHUNK]
        )

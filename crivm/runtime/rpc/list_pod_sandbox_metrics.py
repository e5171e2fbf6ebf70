"""ListPodSandboxMetrics: every pod's and container's metrics, from the same figures as
ListPodSandboxStats."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.list_pod_sandbox_stats import list_stats
from crivm.runtime.stats.cri_metrics import pod_metrics


async def handle(
    daemon: Daemon, request: api_pb2.ListPodSandboxMetricsRequest
) -> api_pb2.ListPodSandboxMetricsResponse:
    return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=await all_pod_metrics(daemon))


async def all_pod_metrics(daemon: Daemon) -> list[api_pb2.PodSandboxMetrics]:
    """Shared with StreamPodSandboxMetrics."""
    images = {ctr.id: ctr.image_ref for ctr in daemon.store.list_containers()}
    stats = await list_stats(daemon, api_pb2.PodSandboxStatsFilter())
    return [pod_metrics(pod, images) for pod in stats]

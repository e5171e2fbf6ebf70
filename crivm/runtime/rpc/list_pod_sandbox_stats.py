"""ListPodSandboxStats, filtered by id prefix and labels."""

from __future__ import annotations

import asyncio

from crivm.proto import api_pb2
from crivm.runtime.cri_messages import labels_match, pod_config
from crivm.runtime.daemon import Daemon
from crivm.runtime.stats.collector import collector_of


async def handle(
    daemon: Daemon, request: api_pb2.ListPodSandboxStatsRequest
) -> api_pb2.ListPodSandboxStatsResponse:
    return api_pb2.ListPodSandboxStatsResponse(stats=await list_stats(daemon, request.filter))


async def list_stats(
    daemon: Daemon, wanted: api_pb2.PodSandboxStatsFilter
) -> list[api_pb2.PodSandboxStats]:
    """Shared with StreamPodSandboxStats and ListPodSandboxMetrics."""
    collector = collector_of(daemon)
    collector.prune(daemon)
    chosen = [
        pod for pod in daemon.store.list_pods()
        if pod.id.startswith(wanted.id)
        and labels_match(pod_config(pod).labels, wanted.label_selector)
    ]
    return list(await asyncio.gather(*(collector.pod_stats(daemon, pod) for pod in chosen)))

"""ListContainerStats, filtered by id prefix, pod id prefix and labels."""

from __future__ import annotations

import asyncio

from crivm.proto import api_pb2
from crivm.runtime.cri_messages import container_config, labels_match
from crivm.runtime.daemon import Daemon
from crivm.runtime.stats.collector import collector_of


async def handle(
    daemon: Daemon, request: api_pb2.ListContainerStatsRequest
) -> api_pb2.ListContainerStatsResponse:
    return api_pb2.ListContainerStatsResponse(stats=await list_stats(daemon, request.filter))


async def list_stats(
    daemon: Daemon, wanted: api_pb2.ContainerStatsFilter
) -> list[api_pb2.ContainerStats]:
    """Shared with StreamContainerStats."""
    collector = collector_of(daemon)
    collector.prune(daemon)
    pods = {pod.id: pod for pod in daemon.store.list_pods()}
    chosen = [
        ctr for ctr in daemon.store.list_containers()
        if ctr.id.startswith(wanted.id)
        and ctr.pod_id.startswith(wanted.pod_sandbox_id)
        and labels_match(container_config(ctr).labels, wanted.label_selector)
    ]
    return list(await asyncio.gather(
        *(collector.container_stats(daemon, pods[ctr.pod_id], ctr) for ctr in chosen)
    ))

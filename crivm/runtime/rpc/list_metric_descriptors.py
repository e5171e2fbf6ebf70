"""ListMetricDescriptors: the cAdvisor-style metrics ListPodSandboxMetrics reports."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.stats.cri_metrics import DESCRIPTORS


async def handle(
    daemon: Daemon, request: api_pb2.ListMetricDescriptorsRequest
) -> api_pb2.ListMetricDescriptorsResponse:
    return api_pb2.ListMetricDescriptorsResponse(descriptors=[d.message() for d in DESCRIPTORS])

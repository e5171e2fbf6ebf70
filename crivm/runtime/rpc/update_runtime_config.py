"""UpdateRuntimeConfig: kubelet pushes the node's pod CIDR."""

from __future__ import annotations

import ipaddress
import logging

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.UpdateRuntimeConfigRequest
) -> api_pb2.UpdateRuntimeConfigResponse:
    cidr = request.runtime_config.network_config.pod_cidr
    if cidr:
        # kubelet may send a dual-stack pair separated by a comma.
        for part in cidr.split(","):
            try:
                ipaddress.ip_network(part.strip(), strict=False)
            except ValueError as exc:
                raise InvalidArgument(f"pod_cidr {part.strip()!r} is not a CIDR: {exc}") from exc
        if cidr != daemon.store.get_setting("pod_cidr"):
            log.info("pod CIDR set to %s", cidr)
            daemon.store.set_setting("pod_cidr", cidr)
            network = daemon.components.get("network")
            if network is not None and hasattr(network, "set_pod_cidr"):
                await network.set_pod_cidr(cidr)
    return api_pb2.UpdateRuntimeConfigResponse()

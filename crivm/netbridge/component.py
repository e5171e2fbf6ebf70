"""The daemon's "network" component: a pod's network namespace and its CNI attachment.

Both backends use it the same way: RunPodSandbox calls ``create_namespace`` and then ``add``
(CNI ADD) while the backend starts the pod in that namespace, and Stop/RemovePodSandbox (or
RunPodSandbox's undo) call ``detach``, which works even when the pod's infrastructure already
died or ADD never finished. Host-network pods get neither a netns nor a CNI attachment.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from crivm.netbridge import netns
from crivm.netbridge.cni import CniNetwork, PodNetwork, dns_from_cri, port_mappings_from_cri
from crivm.runtime.backend import Readiness

if TYPE_CHECKING:
    from crivm.proto import api_pb2
    from crivm.runtime.config import Config
    from crivm.runtime.daemon import Daemon

log = logging.getLogger(__name__)

# How many recently detached pods to remember; a pod is forgotten when it attaches again.
DETACHED_MEMORY = 4096


class PodNetworkService:
    def __init__(self, config: Config) -> None:
        self.netns_dir = os.path.join(config.runroot, "netns")
        self.cni = CniNetwork.from_config(config)
        # Pods whose CNI DEL succeeded and whose netns is unpinned, in this daemon's lifetime.
        # StopPodSandbox repeats (RemovePodSandbox stops again, the kubelet retries), and a
        # second DEL runs the whole plugin chain and its iptables calls for nothing: about
        # 25 ms per pod here. After a restart the set is empty, so DEL still runs once then.
        self._detached: dict[str, None] = {}

    def readiness(self) -> Readiness:
        ok, reason, message = self.cni.network_ready()
        return Readiness(ok, reason, message)

    def _netns_path(self, pod_id: str) -> str:
        return os.path.join(self.netns_dir, pod_id)

    def _pod_network(
        self, pod_id: str, config: api_pb2.PodSandboxConfig, netns_path: str
    ) -> PodNetwork:
        return PodNetwork(
            pod_id=pod_id,
            netns=netns_path,
            pod_name=config.metadata.name,
            pod_namespace=config.metadata.namespace,
            pod_uid=config.metadata.uid,
            port_mappings=port_mappings_from_cri(config.port_mappings),
            dns=dns_from_cri(config.dns_config) if config.HasField("dns_config") else None,
        )

    async def create_namespace(self, pod_id: str) -> str:
        """Create and pin the pod's netns (empty: loopback only) and return its path; undone,
        with whatever ``add`` made, by ``detach``."""
        self._detached.pop(pod_id, None)
        ns = await netns.create_netns(pod_id, self.netns_dir)
        return ns.path

    async def add(
        self, pod_id: str, config: api_pb2.PodSandboxConfig, netns_path: str
    ) -> tuple[str, ...]:
        """CNI ADD into the pod's netns (on failure the plugins' DEL has run); the pod's
        addresses, IPv4 first."""
        result = await self.cni.add(self._pod_network(pod_id, config, netns_path))
        return tuple(str(ip.ip) for ip in result.pod_ips())

    async def check(self, pod_id: str, config: api_pb2.PodSandboxConfig) -> None:
        await self.cni.check(self._pod_network(pod_id, config, self._netns_path(pod_id)))

    async def detach(self, pod_id: str, config: api_pb2.PodSandboxConfig) -> None:
        """CNI DEL, then unpin the netns; safe to repeat, and cheap when repeated."""
        if pod_id in self._detached:
            return
        path = self._netns_path(pod_id)
        await self.cni.delete(self._pod_network(pod_id, config, path))
        await netns.remove_netns(path)
        self._detached[pod_id] = None
        if len(self._detached) > DETACHED_MEMORY:
            del self._detached[next(iter(self._detached))]


async def open_component(daemon: Daemon) -> PodNetworkService:
    """The daemon's opener for the "network" component (see crivm.runtime.daemon)."""
    return PodNetworkService(daemon.config)

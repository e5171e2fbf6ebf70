"""The guest's network: the pod's interfaces, routes, static ARP entries and DNS.

The host tells the agent what CNI gave the pod; the agent finds each device by its MAC (virtio
devices get kernel names in probe order, the MAC is what the host controls) and configures it
over rtnetlink (crivm.agent.netlink).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

from crivm.agent.errors import GuestError, InvalidArgument, NotFound
from crivm.agent.netlink import Link, Netlink, NetlinkError, mac_bytes
from crivm.proto import agent_pb2

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"

P = ParamSpec("P")
T = TypeVar("T")


class GuestNetwork:
    def __init__(self, resolv_conf: str = RESOLV_CONF) -> None:
        self.resolv_conf = resolv_conf

    async def update_interfaces(
        self, interfaces: Iterable[agent_pb2.Interface]
    ) -> list[agent_pb2.Interface]:
        return await asyncio.to_thread(_guarded, _update_interfaces, list(interfaces))

    async def update_routes(self, routes: Iterable[agent_pb2.Route]) -> None:
        await asyncio.to_thread(_guarded, _update_routes, list(routes))

    async def add_arp_neighbors(self, neighbors: Iterable[agent_pb2.ARPNeighbor]) -> None:
        await asyncio.to_thread(_guarded, _add_neighbors, list(neighbors))

    async def set_dns(self, request: agent_pb2.SetDNSRequest) -> None:
        await asyncio.to_thread(self._write_resolv_conf, request)

    def _write_resolv_conf(self, request: agent_pb2.SetDNSRequest) -> None:
        lines = [f"nameserver {ns}" for ns in request.nameservers]
        if request.searches:
            lines.append("search " + " ".join(request.searches))
        if request.options:
            lines.append("options " + " ".join(request.options))
        directory = os.path.dirname(self.resolv_conf) or "."
        try:
            # Write and rename, so a reader never sees half a file. Not tempfile: importing it
            # (random, shutil, ...) cost every guest's agent start for this one file.
            tmp = os.path.join(directory, f".resolv.conf.{os.urandom(6).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.resolv_conf)
        except OSError as exc:
            raise GuestError(f"writing {self.resolv_conf}: {exc}") from exc


def _guarded(work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a netlink job, translating its errors once."""
    try:
        return work(*args, **kwargs)
    except NetlinkError as exc:
        raise GuestError(f"netlink: {exc.strerror} (errno {exc.errno})") from exc
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    except OSError as exc:
        raise GuestError(f"netlink socket: {exc}") from exc


def _link_by_mac(links: list[Link], mac: str) -> Link:
    wanted = mac.lower()
    for link in links:
        if link.mac == wanted:
            return link
    raise NotFound(f"no network device with MAC {mac}")


def _link_by_name(links: list[Link], name: str) -> Link:
    for link in links:
        if link.name == name:
            return link
    raise NotFound(f"no network device named {name!r}")


def _update_interfaces(interfaces: list[agent_pb2.Interface]) -> list[agent_pb2.Interface]:
    configured = []
    for wanted in interfaces:
        if wanted.set_mac:
            mac_bytes(wanted.set_mac)  # a bad one fails before any device changes
    with Netlink() as nl:
        links = nl.links()
        # Containers expect a working localhost; a bare guest kernel leaves lo down.
        nl.set_link(_link_by_name(links, "lo").index, up=True)
        for wanted in interfaces:
            link = _link_by_mac(links, wanted.mac)
            name = wanted.name or link.name
            mac = wanted.set_mac.lower()
            if name != link.name or (mac and mac != link.mac):
                # The kernel renames only links that are down; a new MAC goes in the same step.
                nl.set_link(link.index, up=False)
                nl.set_link(link.index, name=name if name != link.name else "",
                            mac=mac if mac != link.mac else "")
            if wanted.mtu:
                nl.set_link(link.index, mtu=wanted.mtu)
            for address in wanted.addresses:
                nl.add_address(link.index, address.address, address.prefix_len)
            nl.set_link(link.index, up=True)
            log.info("configured %s (%s) as %s (%s)", link.name, link.mac, name, mac or link.mac)
            result = agent_pb2.Interface()
            result.CopyFrom(wanted)
            result.name = name
            if mac:
                result.mac, result.set_mac = mac, ""
            result.mtu = wanted.mtu or link.mtu
            configured.append(result)
    return configured


def _update_routes(routes: list[agent_pb2.Route]) -> None:
    with Netlink() as nl:
        links = nl.links()
        for route in routes:
            index = _link_by_name(links, route.device).index if route.device else 0
            destination = "" if route.destination in ("", "default") else route.destination
            nl.add_route(destination, route.gateway, index, route.source)


def _add_neighbors(neighbors: list[agent_pb2.ARPNeighbor]) -> None:
    with Netlink() as nl:
        links = nl.links()
        for neighbor in neighbors:
            index = _link_by_name(links, neighbor.device).index
            nl.add_neighbor(index, neighbor.ip_address, neighbor.mac)

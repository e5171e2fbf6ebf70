"""Joining a VM's tap device to the pod's CNI veth inside the pod netns (Kata's tcfilter model).

CNI leaves ``eth0`` (a veth) in the pod netns. We add a tap device beside it and two tc ingress
redirects: every frame arriving on eth0 leaves through the tap (into QEMU), and every frame
QEMU writes to the tap leaves through eth0. The netns's own IP stack never sees pod traffic.

The guest interface takes eth0's MAC, addresses and routes, so the rest of the network sees
exactly what CNI set up. eth0 keeps its addresses too: CNI CHECK verifies them, and since
ingress redirects run before IP, the netns never answers for the pod.

QEMU must open the tap inside the netns. We support passing an fd: :func:`open_tap_fd` opens
it on a thread inside the netns, and QEMU gets ``-netdev tap,fd=N`` with N in ``pass_fds``.
Alternatively run QEMU under :func:`crivm.netbridge.netns.netns_argv_prefix` with
``-netdev tap,ifname=<tap>,script=no,downscript=no``.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from crivm.errors import CrivmError, NotFound
from crivm.netbridge.cni_result import IPInterface
from crivm.netbridge.netns import call_in_netns, is_netns

log = logging.getLogger(__name__)

TAP_NAME = "tap0_crivm"
VETH_NAME = "eth0"

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_ETH_P_ALL = 0x0003
_INGRESS_PARENT = 0xFFFF0000
_RT_TABLE_MAIN = 254
_RTPROT_KERNEL = 2


@dataclass(frozen=True)
class GuestRoute:
    dst: str  # CIDR; "0.0.0.0/0" for the default route
    gateway: str = ""


@dataclass(frozen=True)
class GuestNetwork:
    """What the agent must configure on the guest's interface, and the tap that backs it."""

    tap_name: str
    mac: str
    mtu: int
    addresses: tuple[IPInterface, ...]
    routes: tuple[GuestRoute, ...]


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _redirect(ipr: Any, from_index: int, to_index: int) -> None:
    ipr.tc("add", "ingress", from_index)
    ipr.tc(
        "add-filter", "u32", from_index,
        parent=_INGRESS_PARENT, prio=1, protocol=_ETH_P_ALL,
        keys=["0x0/0x0+0"],  # match every frame
        target=0x10001,  # pyroute2 wants a classid; the redirect steals the frame before it matters
        action={"kind": "mirred", "direction": "egress", "action": "redirect",
                "ifindex": to_index},
    )


def _guest_addresses(ipr: Any, index: int) -> tuple[IPInterface, ...]:
    out = []
    for msg in ipr.get_addr(index=index):
        addr = ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        if addr.ip.is_link_local:  # fe80::/64 is per link; the guest makes its own
            continue
        out.append(addr)
    return tuple(sorted(out, key=lambda a: a.version))


def _guest_routes(ipr: Any, index: int) -> tuple[GuestRoute, ...]:
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=_RT_TABLE_MAIN):
            if msg.get_attr("RTA_OIF") != index or msg["proto"] == _RTPROT_KERNEL:
                continue  # kernel routes follow from the addresses
            dst = msg.get_attr("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if family == socket.AF_INET else "::"
            routes.append(GuestRoute(f"{dst}/{msg['dst_len']}", msg.get_attr("RTA_GATEWAY") or ""))
    return tuple(routes)


def _remove(ipr: Any, veth: str, tap: str) -> None:
    veth_index = _index(ipr, veth)
    if veth_index is not None:
        _remove_ingress(ipr, veth_index)
    tap_index = _index(ipr, tap)
    if tap_index is not None:
        ipr.link("del", index=tap_index)  # takes its own qdisc and filter with it


def _create(ipr: Any, tap: str) -> int:
    ipr.link(
        "add", ifname=tap, kind="tuntap", mode="tap", uid=0, gid=0,
        ifr={"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": False},
    )
    index = _index(ipr, tap)
    if index is None:
        raise NotFound(f"tap {tap} vanished as it was made")
    return index


def _remove_ingress(ipr: Any, index: int) -> None:
    try:
        ipr.tc("del", "ingress", index)
    except NetlinkError as exc:
        if exc.code not in (errno.EINVAL, errno.ENOENT):  # no ingress qdisc: done already
            raise


def _join(ipr: Any, veth: str, tap: str, create: bool) -> GuestNetwork:
    """Redirect ``tap`` (made here when ``create``) and ``veth`` to each other, both ways."""
    veth_index = _index(ipr, veth)
    if veth_index is None:
        raise NotFound(f"no interface {veth} in the pod netns to join the tap to")
    # A retried attach starts clean: a new tap replaces an old one; a moved-in one stays.
    if create:
        _remove(ipr, veth, tap)
    else:
        _remove_ingress(ipr, veth_index)
    (link,) = ipr.get_links(veth_index)
    mac = link.get_attr("IFLA_ADDRESS")
    mtu = int(link.get_attr("IFLA_MTU"))
    try:
        tap_index = _create(ipr, tap) if create else _index(ipr, tap)
        if tap_index is None:
            raise NotFound(f"no tap {tap} in the pod netns to join to {veth}")
        ipr.link("set", index=tap_index, mtu=mtu, state="up")
        _redirect(ipr, veth_index, tap_index)
        _redirect(ipr, tap_index, veth_index)
        return GuestNetwork(
            tap_name=tap, mac=mac, mtu=mtu,
            addresses=_guest_addresses(ipr, veth_index),
            routes=_guest_routes(ipr, veth_index),
        )
    except BaseException:
        _remove(ipr, veth, tap)
        raise


def _attach(veth: str, tap: str, create: bool) -> GuestNetwork:
    with IPRoute() as ipr:
        return _join(ipr, veth, tap, create)


async def attach_tap(
    netns_path: str, veth: str = VETH_NAME, tap: str = TAP_NAME
) -> GuestNetwork:
    """Create ``tap`` in the pod netns and redirect it to and from ``veth`` both ways.

    Returns the MAC, MTU, addresses and routes the guest interface must get.
    """
    try:
        net = await call_in_netns(netns_path, _attach, veth, tap, True)
    except (NetlinkError, OSError) as exc:
        raise CrivmError(f"joining tap {tap} to {veth} in {netns_path}: {exc}") from exc
    log.debug("tap %s joined to %s in %s (mac %s)", tap, veth, netns_path, net.mac)
    return net


def _make_spare(tap: str) -> None:
    with IPRoute() as ipr:
        _create(ipr, tap)


async def make_spare_tap(netns_path: str, tap: str = TAP_NAME) -> None:
    """A tap alone in a netns of its own, for a VM booted before its pod exists; see
    :func:`adopt_tap`. It goes with that netns (or with its VM, once adopted)."""
    try:
        await call_in_netns(netns_path, _make_spare, tap)
    except (NetlinkError, OSError) as exc:
        raise CrivmError(f"creating tap {tap} in {netns_path}: {exc}") from exc


def _send(tap: str, target_netns: str) -> None:
    target = os.open(target_netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            index = _index(ipr, tap)
            if index is None:
                raise NotFound(f"no tap {tap} to move")
            ipr.link("set", index=index, net_ns_fd=target)
    finally:
        os.close(target)


async def adopt_tap(spare_netns: str, netns_path: str, veth: str = VETH_NAME,
                    tap: str = TAP_NAME) -> GuestNetwork:
    """Move the spare ``tap`` (its VM keeps it open: a tap's queues survive the move) from
    ``spare_netns`` into the pod netns, and redirect it to and from ``veth`` there, as
    :func:`attach_tap` does with a new one. Undone by :func:`detach_tap`."""
    try:
        await call_in_netns(spare_netns, _send, tap, netns_path)
        net = await call_in_netns(netns_path, _attach, veth, tap, False)
    except (NetlinkError, OSError) as exc:
        raise CrivmError(f"moving tap {tap} from {spare_netns} to {veth} in {netns_path}: "
                         f"{exc}") from exc
    log.debug("tap %s moved into %s and joined to %s (mac %s)", tap, netns_path, veth, net.mac)
    return net


def _detach(veth: str, tap: str) -> None:
    with IPRoute() as ipr:
        _remove(ipr, veth, tap)


async def detach_tap(netns_path: str, veth: str = VETH_NAME, tap: str = TAP_NAME) -> None:
    """Remove the tap and the redirects; fine to repeat, and a vanished netns is fine."""
    if not is_netns(netns_path):
        return
    try:
        await call_in_netns(netns_path, _detach, veth, tap)
    except (NetlinkError, OSError) as exc:
        raise CrivmError(f"removing tap {tap} in {netns_path}: {exc}") from exc


def _open_tap(tap: str, vnet_hdr: bool) -> int:
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        # TUNSETIFF on an existing persistent tap attaches to it (the name is looked up in the
        # netns the fd was opened in, which is why this runs inside the pod netns).
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", tap.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_tap_fd(netns_path: str, tap: str = TAP_NAME, *, vnet_hdr: bool = False) -> int:
    """Open a queue of the pod's tap; the caller owns the fd (close-on-exec, so use pass_fds)."""
    try:
        return await call_in_netns(netns_path, _open_tap, tap, vnet_hdr)
    except OSError as exc:
        raise CrivmError(f"opening tap {tap} in {netns_path}: {exc}") from exc

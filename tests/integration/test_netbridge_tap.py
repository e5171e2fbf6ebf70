"""The VM tap joined to the pod veth by tc redirects: frames cross both ways (root)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import select
import socket
import struct
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from crivm.errors import CrivmError
from crivm.netbridge import netns, tap
from crivm.netbridge.cni import PodNetwork
from tests.fixtures.netns import TEST_GATEWAY, NetnsFactory, TrackingCniNetwork

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(90),
]

POD_IP, PEER_IP = "10.123.0.2", "10.123.0.1"
ETH_P_ARP, ETH_P_IP = 0x0806, 0x0800


def make_pod_side(peer_ns: str) -> None:
    """Inside the pod netns: eth0 <-> peer0 (moved to the peer netns), like CNI would."""
    with IPRoute() as ipr:
        ipr.link("add", ifname="eth0", kind="veth",
                 peer={"ifname": "peer0", "net_ns_fd": peer_ns})
        (index,) = ipr.link_lookup(ifname="eth0")
        ipr.addr("add", index=index, address=POD_IP, prefixlen=24)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=PEER_IP)


def make_peer_side() -> str:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="peer0")
        ipr.addr("add", index=index, address=PEER_IP, prefixlen=24)
        ipr.link("set", index=index, state="up")
        (link,) = ipr.get_links(index)
        return str(link.get_attr("IFLA_ADDRESS"))


def send_udp(payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, (POD_IP, 9999))


def peer_neighbour_mac() -> str | None:
    with IPRoute() as ipr:
        for entry in ipr.get_neighbours(family=socket.AF_INET):
            if entry.get_attr("NDA_DST") == POD_IP:
                return str(entry.get_attr("NDA_LLADDR"))
    return None


def link_names() -> list[str]:
    with IPRoute() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def ingress_qdiscs(ifname: str) -> int:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        return sum(1 for q in ipr.get_qdiscs(index) if q.get_attr("TCA_KIND") == "ingress")


def read_frame(fd: int, ethertype: int, deadline_s: float = 5.0) -> bytes:
    """The next frame of ``ethertype`` the tap delivers (IPv6 chatter is skipped)."""
    end = time.monotonic() + deadline_s
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            frame = os.read(fd, 65536)
            if struct.unpack("!H", frame[12:14])[0] == ethertype:
                return frame
    raise TimeoutError(f"no frame of type {ethertype:#06x} on the tap")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_reply(own_mac: str, to_mac: bytes) -> bytes:
    own = mac_bytes(own_mac)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, own,
                      socket.inet_aton(POD_IP), to_mac, socket.inet_aton(PEER_IP))
    return to_mac + own + struct.pack("!H", ETH_P_ARP) + arp


async def exchange_frames(fd: int, guest: tap.GuestNetwork, peer: str, peer_mac: str) -> None:
    """Through the tap's fd, as QEMU would: ARP and a datagram, both ways."""
    # peer -> pod: the ARP request for the pod IP arrives on eth0 and leaves on the tap.
    await netns.call_in_netns(peer, send_udp, b"hello-tap")
    request = await asyncio.to_thread(read_frame, fd, ETH_P_ARP)
    assert request[0:6] == b"\xff" * 6 and request[6:12] == mac_bytes(peer_mac)
    assert request[38:42] == socket.inet_aton(POD_IP)  # ARP target protocol address

    # pod -> peer: a reply written to the tap leaves through eth0, with eth0's MAC, and
    # the peer, now knowing the pod, delivers the queued datagram back through the tap.
    os.write(fd, arp_reply(guest.mac, mac_bytes(peer_mac)))
    datagram = await asyncio.to_thread(read_frame, fd, ETH_P_IP)
    assert datagram.endswith(b"hello-tap")
    assert datagram[0:6] == mac_bytes(guest.mac)
    assert await netns.call_in_netns(peer, peer_neighbour_mac) == guest.mac


async def test_frames_cross_between_tap_and_veth(netns_factory: NetnsFactory) -> None:
    pod, peer = await netns_factory.create("pod"), await netns_factory.create("peer")
    await netns.call_in_netns(pod.path, make_pod_side, peer.path)
    peer_mac = await netns.call_in_netns(peer.path, make_peer_side)

    guest = await tap.attach_tap(pod.path)
    assert guest.tap_name == tap.TAP_NAME
    assert guest.addresses == (ipaddress.ip_interface(f"{POD_IP}/24"),)
    assert guest.routes == (tap.GuestRoute("0.0.0.0/0", PEER_IP),)
    assert guest.mtu == 1500
    fd = await tap.open_tap_fd(pod.path)
    try:
        await exchange_frames(fd, guest, peer.path, peer_mac)
    finally:
        os.close(fd)

    await tap.detach_tap(pod.path)
    assert tap.TAP_NAME not in await netns.call_in_netns(pod.path, link_names)
    assert await netns.call_in_netns(pod.path, ingress_qdiscs, "eth0") == 0
    await tap.detach_tap(pod.path)  # idempotent
    await netns.remove_netns(pod.path)
    await tap.detach_tap(pod.path)  # and fine once the netns is gone


async def test_spare_tap_moves_into_the_pod_with_its_queue_open(
    netns_factory: NetnsFactory
) -> None:
    """A warm VM's tap: made in a netns of its own and opened there (by QEMU), then moved
    into the pod netns and joined to eth0; the fd opened before the move carries the frames."""
    spare = await netns_factory.create("spare")
    pod, peer = await netns_factory.create("pod"), await netns_factory.create("peer")
    await netns.call_in_netns(pod.path, make_pod_side, peer.path)
    peer_mac = await netns.call_in_netns(peer.path, make_peer_side)
    await tap.make_spare_tap(spare.path)
    fd = await tap.open_tap_fd(spare.path)
    try:
        guest = await tap.adopt_tap(spare.path, pod.path)
        assert guest.tap_name == tap.TAP_NAME
        assert guest.addresses == (ipaddress.ip_interface(f"{POD_IP}/24"),)
        assert tap.TAP_NAME not in await netns.call_in_netns(spare.path, link_names)
        await exchange_frames(fd, guest, peer.path, peer_mac)
        with pytest.raises(CrivmError, match="no tap"):
            await tap.adopt_tap(spare.path, pod.path)  # moved already
    finally:
        os.close(fd)
    await tap.detach_tap(pod.path)
    assert tap.TAP_NAME not in await netns.call_in_netns(pod.path, link_names)


async def test_attach_twice_rebuilds_cleanly(netns_factory: NetnsFactory) -> None:
    pod, peer = await netns_factory.create("pod"), await netns_factory.create("peer")
    await netns.call_in_netns(pod.path, make_pod_side, peer.path)
    first = await tap.attach_tap(pod.path)
    second = await tap.attach_tap(pod.path)
    assert first == second
    assert await netns.call_in_netns(pod.path, ingress_qdiscs, "eth0") == 1
    assert await netns.call_in_netns(pod.path, ingress_qdiscs, tap.TAP_NAME) == 1


async def test_tap_on_a_real_cni_pod_keeps_check_passing(
    netns_factory: NetnsFactory, cni_test_network: TrackingCniNetwork, tmp_path: Path
) -> None:
    ns = await netns_factory.create("vmpod")
    pod = PodNetwork(pod_id="vmpod01", netns=ns.path, pod_name="vm", pod_namespace="default")
    result = await cni_test_network.add(pod)
    guest = await tap.attach_tap(ns.path)
    eth0 = result.sandbox_interface("eth0")
    assert eth0 is not None and guest.mac == eth0.mac
    assert guest.addresses == result.pod_ips()
    assert tap.GuestRoute("0.0.0.0/0", TEST_GATEWAY) in guest.routes
    await cni_test_network.check(pod)
    await tap.detach_tap(ns.path)
    await cni_test_network.delete(pod)
    assert await netns.call_in_netns(ns.path, link_names) == ["lo"]

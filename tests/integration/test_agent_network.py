"""Guest network configuration by the real agent, run inside a network namespace of the test's."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from crivm import errors
from crivm.netbridge.netns import call_in_netns
from crivm.proto import agent_pb2 as pb
from crivm.runtime.vm_backend.agent_client import AgentClient
from tests.fixtures.agent import start_agent, stop_agent
from tests.fixtures.netns import NetnsFactory

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

MAC = "02:42:ac:11:00:07"
GATEWAY_MAC = "02:42:ac:11:00:01"


def make_device() -> None:
    """A veth pair standing in for the VM's virtio-net device (veth, unlike dummy, does ARP)."""
    with IPRoute() as ipr:
        ipr.link("add", ifname="enp0s3", kind="veth", peer="peer0", address=MAC)


def observe() -> dict[str, Any]:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="eth0")
        link = ipr.get_links(index)[0]
        addresses = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        routes = {
            (r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
            for r in ipr.get_routes(family=socket.AF_INET, table=254)
        }
        neighbors = {
            (n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
            for n in ipr.get_neighbours(ifindex=index, family=socket.AF_INET)
        }
        (lo,) = ipr.link_lookup(ifname="lo")
        return {
            "mtu": link.get_attr("IFLA_MTU"),
            "up": bool(link["flags"] & 1),
            "lo_up": bool(ipr.get_links(lo)[0]["flags"] & 1),
            "addresses": addresses,
            "routes": routes,
            "neighbors": neighbors,
        }


async def test_interfaces_routes_and_neighbors(
    netns_factory: NetnsFactory, short_tmp: Path
) -> None:
    ns = await netns_factory.create("agentnet")
    await call_in_netns(ns.path, make_device)
    agent = await start_agent(short_tmp / "state", str(short_tmp / "a.sock"), netns=ns.path)
    try:
        async with AgentClient(agent.socket_path) as client:
            await client.wait_ready(15)
            wanted = pb.Interface(
                mac=MAC.upper(),
                name="eth0",
                mtu=1400,
                addresses=[
                    pb.IPAddress(address="10.89.3.7", prefix_len=24),
                    pb.IPAddress(address="fd00::7", prefix_len=64),
                ],
            )
            (configured,) = await client.update_interfaces([wanted])
            assert configured.name == "eth0"
            assert configured.mtu == 1400
            await client.update_routes(
                [
                    pb.Route(destination="default", gateway="10.89.3.1", device="eth0"),
                    pb.Route(destination="10.200.0.0/16", device="eth0", source="10.89.3.7"),
                ]
            )
            await client.add_arp_neighbors(
                [pb.ARPNeighbor(ip_address="10.89.3.1", mac=GATEWAY_MAC, device="eth0")]
            )
            with pytest.raises(errors.NotFound):
                await client.update_interfaces([pb.Interface(mac="02:00:00:00:00:99")])
            with pytest.raises(errors.InvalidArgument):
                await client.update_routes([pb.Route(destination="10.1.0.0/16", gateway="x")])
    finally:
        await stop_agent(agent)
    seen = await call_in_netns(ns.path, observe)
    assert seen["up"] and seen["lo_up"]
    assert seen["mtu"] == 1400
    assert {("10.89.3.7", 24), ("fd00::7", 64)} <= seen["addresses"]
    assert (None, 0, "10.89.3.1") in seen["routes"]
    assert ("10.200.0.0", 16, None) in seen["routes"]
    assert ("10.89.3.1", GATEWAY_MAC) in seen["neighbors"]


def link_mac(name: str) -> str:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))


async def test_interface_takes_a_new_mac(netns_factory: NetnsFactory, short_tmp: Path) -> None:
    """A warm VM's NIC was booted with a MAC of its own; the pod's veth MAC replaces it."""
    ns = await netns_factory.create("agentmac")
    await call_in_netns(ns.path, make_device)
    agent = await start_agent(short_tmp / "state", str(short_tmp / "a.sock"), netns=ns.path)
    pod_mac = "0a:58:0a:59:03:07"
    try:
        async with AgentClient(agent.socket_path) as client:
            await client.wait_ready(15)
            with pytest.raises(errors.InvalidArgument, match="not a MAC address"):
                await client.update_interfaces([pb.Interface(mac=MAC, set_mac="0a:58:zz")])
            wanted = pb.Interface(mac=MAC, set_mac=pod_mac.upper(), name="eth0",
                                  addresses=[pb.IPAddress(address="10.89.3.7", prefix_len=24)])
            (configured,) = await client.update_interfaces([wanted])
            assert (configured.mac, configured.set_mac, configured.name) == (pod_mac, "", "eth0")
            # Repeating it finds the device by its new MAC and changes nothing.
            await client.update_interfaces([pb.Interface(mac=pod_mac, set_mac=pod_mac)])
    finally:
        await stop_agent(agent)
    assert await call_in_netns(ns.path, link_mac, "eth0") == pod_mac
    assert (await call_in_netns(ns.path, observe))["up"]

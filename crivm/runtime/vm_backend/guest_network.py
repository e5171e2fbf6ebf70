"""The guest's network, configured through the agent from what CNI left in the pod netns.

The tap's redirects make the guest NIC stand in for the CNI veth, so the guest takes the veth's
MAC, addresses and routes (read back from the netns by ``crivm.netbridge.tap``) and the pod's
DNS settings. The guest names its NIC ``eth0``, like the veth it replaces.
"""

from __future__ import annotations

from crivm.errors import Unavailable
from crivm.netbridge.tap import GuestNetwork
from crivm.proto import agent_pb2, api_pb2
from crivm.runtime.vm_backend.agent_client import AgentClient

GUEST_NIC = "eth0"


def interface(net: GuestNetwork, booted_mac: str = "") -> agent_pb2.Interface:
    return agent_pb2.Interface(
        mac=booted_mac or net.mac,
        set_mac=net.mac if booted_mac else "",
        name=GUEST_NIC,
        mtu=net.mtu,
        addresses=[
            agent_pb2.IPAddress(address=str(addr.ip), prefix_len=addr.network.prefixlen)
            for addr in net.addresses
        ],
    )


def routes(net: GuestNetwork) -> list[agent_pb2.Route]:
    out = []
    for route in net.routes:
        default = route.dst in ("0.0.0.0/0", "::/0")
        out.append(agent_pb2.Route(destination="default" if default else route.dst,
                                   gateway=route.gateway, device=GUEST_NIC))
    return out


async def configure(agent: AgentClient, net: GuestNetwork | None,
                    dns: api_pb2.DNSConfig | None, booted_mac: str = "") -> None:
    """Give the guest its NIC, routes and resolver; ``net`` None means no NIC (host network).
    A VM booted before its pod (a warm one) has a NIC with a MAC of its own, ``booted_mac``:
    the agent finds the NIC by it and gives it the veth's."""
    if net is not None:
        configured = await agent.update_interfaces([interface(net, booted_mac)])
        if booted_mac and [i.mac.lower() for i in configured] != [net.mac.lower()]:
            # An agent older than set_mac ignores it and answers OK with the old MAC.
            raise Unavailable(f"the guest NIC kept MAC {booted_mac} instead of the pod's "
                              f"{net.mac}; rebuild the guest image (crivm guest-image build)")
        wanted = routes(net)
        # Default routes need their gateway reachable first: link routes before the rest.
        wanted.sort(key=lambda route: bool(route.gateway))
        if wanted:
            await agent.update_routes(wanted)
    if dns is not None and dns.servers:
        await agent.set_dns(dns.servers, dns.searches, dns.options)

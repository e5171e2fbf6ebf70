"""The real CNI chain from /usr/lib/cni (bridge + host-local + portmap + firewall + tuning).

Uses bridge crivmtest0 on 10.89.0.0/16 with host-local state in the tmp dir, so it cannot
collide with a running daemon's crivm0 network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from crivm.netbridge import netns
from crivm.netbridge.cni import PodNetwork, PortMapping
from tests.fixtures.netns import (
    CNI_PLUGIN_DIRS,
    TEST_BRIDGE,
    TEST_GATEWAY,
    TEST_SUBNET,
    NetnsFactory,
    TrackingCniNetwork,
    delete_test_bridge,
    make_test_conflist,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists("/usr/lib/cni/bridge"), reason="no CNI plugins"),
    pytest.mark.timeout(120),
]


def pod_for(ns: netns.NetNamespace, pod_id: str, *ports: PortMapping) -> PodNetwork:
    return PodNetwork(pod_id=pod_id, netns=ns.path, pod_name="web", pod_namespace="default",
                      pod_uid="uid-" + pod_id, port_mappings=ports)


def eth0_view() -> tuple[list[str], list[tuple[str, str]]]:
    """eth0's addresses and the routes through it, as seen inside the netns."""
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="eth0")
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                 for a in ipr.get_addr(index=index, family=socket.AF_INET)]
        routes = [(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}",
                   r.get_attr("RTA_GATEWAY") or "")
                  for r in ipr.get_routes(family=socket.AF_INET, table=254)
                  if r.get_attr("RTA_OIF") == index]
        return addrs, routes


def _host_veths_on_test_bridge() -> list[str]:
    with IPRoute() as ipr:
        bridges = ipr.link_lookup(ifname=TEST_BRIDGE)
        if not bridges:
            return []
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                if link.get_attr("IFLA_MASTER") == bridges[0]]


async def host_veths_on_test_bridge() -> list[str]:
    # pyroute2's sync API runs its own event loop, so it is called off the test's loop.
    return await asyncio.to_thread(_host_veths_on_test_bridge)


def ipam_reserved(tmp_path: Path) -> list[str]:
    state = tmp_path / "ipam" / "crivmtest"
    if not state.is_dir():
        return []
    return sorted(p.name for p in state.iterdir() if p.name[0].isdigit())


async def iptables_nat_rules() -> str:
    proc = await asyncio.create_subprocess_exec(
        "iptables", "-w", "-t", "nat", "-S", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode()


async def http_get(host: str, port: int, deadline_s: float = 5.0) -> str:
    async with asyncio.timeout(deadline_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET /marker.txt HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            return (await reader.read()).decode(errors="replace")
        finally:
            writer.close()


def free_host_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def http_server_in(ns_path: str, root: Path) -> AsyncIterator[None]:
    proc = await asyncio.create_subprocess_exec(
        *netns.netns_argv_prefix(ns_path), sys.executable, "-m", "http.server", "80",
        "--bind", "0.0.0.0", "--directory", str(root),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.kill()
        await proc.wait()


async def wait_for_http(host: str, port: int, deadline_s: float = 20.0) -> str:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await http_get(host, port)
        except OSError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def test_add_check_del_round_trip(
    netns_factory: NetnsFactory, cni_test_network: TrackingCniNetwork, tmp_path: Path
) -> None:
    ns = await netns_factory.create("rt")
    pod = pod_for(ns, "roundtrip01")
    result = await cni_test_network.add(pod)

    (pod_ip,) = result.pod_ips()
    assert pod_ip.network == ipaddress.ip_network(TEST_SUBNET)
    eth0 = result.sandbox_interface("eth0")
    assert eth0 is not None and eth0.sandbox == ns.path and eth0.mac
    addrs, routes = await netns.call_in_netns(ns.path, eth0_view)
    assert addrs == [str(pod_ip)]
    assert ("0.0.0.0/0", TEST_GATEWAY) in routes
    veths = await host_veths_on_test_bridge()
    assert len(veths) == 1
    assert ipam_reserved(tmp_path) == [str(pod_ip.ip)]
    assert cni_test_network.cached_result("roundtrip01") == result

    await cni_test_network.check(pod)

    await cni_test_network.delete(pod)
    assert await host_veths_on_test_bridge() == []
    assert ipam_reserved(tmp_path) == []
    assert "roundtrip01" not in await iptables_nat_rules()
    assert cni_test_network.cached_result("roundtrip01") is None
    await cni_test_network.delete(pod)  # idempotent

    await netns.remove_netns(ns.path)
    assert not os.path.exists(ns.path) and not netns.is_netns(ns.path)


async def test_del_after_the_netns_is_gone_releases_the_ip(
    netns_factory: NetnsFactory, tmp_path: Path
) -> None:
    # bridge's ipMasq teardown reads the pod IP from inside the netns, so with the netns gone
    # its masquerade rules would stay; callers DEL before removing the netns. This covers the
    # crash path, where only what lives outside the netns can be released.
    conf_dir = tmp_path / "conf-nomasq"
    conf_dir.mkdir()
    (conf_dir / "10.conflist").write_text(json.dumps(make_test_conflist(tmp_path, ip_masq=False)))
    network = TrackingCniNetwork(str(conf_dir), CNI_PLUGIN_DIRS, str(tmp_path / "cache"))
    ns = await netns_factory.create("gone")
    pod = pod_for(ns, "gone01", PortMapping(free_host_port(), 80))
    try:
        await network.add(pod)
        assert ipam_reserved(tmp_path)
        await netns.remove_netns(ns.path)  # the veth dies with the last reference to the netns
        await network.delete(pod)
        assert ipam_reserved(tmp_path) == []
        assert "gone01" not in await iptables_nat_rules()
        assert await host_veths_on_test_bridge() == []
    finally:
        for leftover in list(network.attached.values()):
            await network.delete(leftover)
        await asyncio.to_thread(delete_test_bridge)


async def test_pod_ip_and_host_port_reach_a_server_in_the_netns(
    netns_factory: NetnsFactory, cni_test_network: TrackingCniNetwork, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "marker.txt").write_text("served-from-the-pod\n")
    host_port = free_host_port()
    ns = await netns_factory.create("web")
    pod = pod_for(ns, "web01", PortMapping(host_port, 80))
    result = await cni_test_network.add(pod)
    pod_ip = str(result.pod_ips()[0].ip)
    try:
        async with http_server_in(ns.path, www):
            by_pod_ip = await wait_for_http(pod_ip, 80)
            assert "200" in by_pod_ip.splitlines()[0]
            assert "served-from-the-pod" in by_pod_ip
            by_host_port = await http_get("127.0.0.1", host_port)
            assert "served-from-the-pod" in by_host_port
            # portmap (snat) lets 127.0.0.1 be routed to the bridge; without it DNAT'd
            # loopback traffic is dropped as martian.
            localnet = Path(f"/proc/sys/net/ipv4/conf/{TEST_BRIDGE}/route_localnet")
            assert localnet.read_text().strip() == "1"
    finally:
        await cni_test_network.delete(pod)
    with pytest.raises(OSError):
        await http_get("127.0.0.1", host_port, deadline_s=2.0)


async def test_two_pods_get_distinct_ips(
    netns_factory: NetnsFactory, cni_test_network: TrackingCniNetwork, tmp_path: Path
) -> None:
    first, second = await netns_factory.create("p1"), await netns_factory.create("p2")
    a = await cni_test_network.add(pod_for(first, "pod01"))
    b = await cni_test_network.add(pod_for(second, "pod02"))
    assert a.pod_ips()[0] != b.pod_ips()[0]
    assert len(await host_veths_on_test_bridge()) == 2
    # Left attached on purpose: the fixture's teardown must DEL them.
    assert set(cni_test_network.attached) == {"pod01", "pod02"}


async def test_timing_netns_create_add_del(
    netns_factory: NetnsFactory, cni_test_network: TrackingCniNetwork,
    record_property: Callable[[str, object], None],
) -> None:
    # Warm up once: the first ADD also creates the bridge and the shared iptables chains.
    warm = await netns_factory.create("warm")
    await cni_test_network.add(pod_for(warm, "warm01"))
    ns_path = str(netns_factory.directory / "timed")
    started = time.monotonic()
    ns = await netns.create_netns("timed", str(netns_factory.directory))
    created = time.monotonic()
    pod = pod_for(ns, "timed01", PortMapping(free_host_port(), 80))
    await cni_test_network.add(pod)
    added = time.monotonic()
    await cni_test_network.delete(pod)
    deleted = time.monotonic()
    await netns.remove_netns(ns_path)
    removed = time.monotonic()
    timings = {
        "netns_create_ms": (created - started) * 1000,
        "cni_add_ms": (added - created) * 1000,
        "cni_del_ms": (deleted - added) * 1000,
        "netns_remove_ms": (removed - deleted) * 1000,
    }
    for key, value in timings.items():
        record_property(key, round(value, 1))
    print("netbridge timings:", {k: round(v, 1) for k, v in timings.items()})
    assert timings["cni_add_ms"] < 10_000

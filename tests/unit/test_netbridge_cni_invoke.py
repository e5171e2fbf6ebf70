"""Building CNI_ARGS, the plugin env and stdin; chain order, prevResult, cache and errors.

The chain tests run fake plugins (small Python scripts that log what they were given); the
integration tests in tests/integration/test_netbridge_cni.py run the real plugins.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from crivm.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from crivm.netbridge.cni import (
    Bandwidth,
    CniNetwork,
    DnsConfig,
    PodNetwork,
    PortMapping,
    capability_args,
    cni_args,
    dns_from_cri,
    plugin_env,
    plugin_stdin,
    port_mappings_from_cri,
)
from crivm.netbridge.cni_config import parse_conflist
from crivm.netbridge.cni_result import CniPluginError
from crivm.proto import api_pb2

POD = PodNetwork(
    pod_id="0123abcd", netns="/run/crivm/netns/p1", pod_name="web", pod_namespace="default",
    pod_uid="u-1", port_mappings=(PortMapping(8080, 80), PortMapping(5353, 53, "udp", "127.0.0.1")),
    dns=DnsConfig(("10.96.0.10",), ("default.svc",), ("ndots:5",)),
)


def test_cni_args_carry_the_pod_identity() -> None:
    assert cni_args(POD) == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=u-1"
    )


def test_cni_args_reject_separators() -> None:
    with pytest.raises(InvalidArgument):
        cni_args(PodNetwork(pod_id="x", netns="", pod_name="a;b"))


def test_plugin_env_sets_every_cni_variable_and_keeps_path() -> None:
    base = {"PATH": "/usr/sbin:/usr/bin", "HOME": "/root", "CNI_IFNAME": "stale"}
    env = plugin_env("ADD", POD, POD.netns, ["/usr/lib/cni", "/opt/cni/bin"], base, "A=1")
    assert env == {
        "PATH": "/usr/sbin:/usr/bin", "HOME": "/root",
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "0123abcd", "CNI_NETNS": "/run/crivm/netns/p1",
        "CNI_IFNAME": "eth0", "CNI_ARGS": "A=1", "CNI_PATH": "/usr/lib/cni:/opt/cni/bin",
    }
    assert plugin_env("DEL", POD, "", ["/x"], {}, "")["PATH"]  # a default PATH for iptables


def test_capability_args_translate_cri_shapes() -> None:
    args = capability_args(POD)
    assert args["portMappings"] == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
    ]
    assert args["dns"] == {"servers": ["10.96.0.10"], "searches": ["default.svc"],
                           "options": ["ndots:5"]}
    assert "bandwidth" not in args
    shaped = PodNetwork(pod_id="x", netns="", bandwidth=Bandwidth(ingress_rate=1_000_000,
                                                                   ingress_burst=8000))
    assert capability_args(shaped)["bandwidth"]["ingressRate"] == 1_000_000
    assert "bandwidth" not in capability_args(PodNetwork("x", "", bandwidth=Bandwidth()))


def test_stdin_gets_name_version_prev_result_and_only_declared_capabilities() -> None:
    net = parse_conflist({"cniVersion": "1.0.0", "name": "n", "plugins": [
        {"type": "bridge", "bridge": "b0"},
        {"type": "portmap", "capabilities": {"portMappings": True, "dns": False}},
    ]})
    prev = {"cniVersion": "1.0.0", "ips": []}
    bridge = json.loads(plugin_stdin(net, net.plugins[0], capability_args(POD), None))
    assert bridge == {"type": "bridge", "bridge": "b0", "name": "n", "cniVersion": "1.0.0"}
    portmap = json.loads(plugin_stdin(net, net.plugins[1], capability_args(POD), prev))
    assert portmap["prevResult"] == prev
    assert list(portmap["runtimeConfig"]) == ["portMappings"]
    assert len(portmap["runtimeConfig"]["portMappings"]) == 2


def test_cri_conversions() -> None:
    mappings = [
        api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=80, host_port=8080),
        api_pb2.PortMapping(protocol=api_pb2.SCTP, container_port=9, host_port=9,
                            host_ip="10.0.0.1"),
        api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=53),  # no host port: skipped
    ]
    assert port_mappings_from_cri(mappings) == (
        PortMapping(8080, 80, "tcp", ""), PortMapping(9, 9, "sctp", "10.0.0.1"))
    dns = dns_from_cri(api_pb2.DNSConfig(servers=["1.1.1.1"], options=["ndots:2"]))
    assert dns == DnsConfig(("1.1.1.1",), (), ("ndots:2",))
    assert dns_from_cri(None) is None


# --- the chain, with fake plugins ---------------------------------------------------------

FAKE_PLUGIN = """\
import json, os, sys, time
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"type": conf["type"], "cmd": cmd, "conf": conf,
                          "env": {k: v for k, v in os.environ.items() if k.startswith("CNI_")}})
              + "\\n")
if conf.get("sleep_on") == cmd:
    time.sleep(30)
if conf.get("fail_on") == cmd:
    print(json.dumps({"cniVersion": conf["cniVersion"], "code": 11, "msg": "try later",
                      "details": conf["type"]}))
    sys.exit(1)
if cmd == "ADD":
    result = conf.get("prevResult") or {
        "cniVersion": conf["cniVersion"],
        "interfaces": [{"name": os.environ["CNI_IFNAME"], "mac": "02:00:00:00:00:01",
                        "sandbox": os.environ["CNI_NETNS"]}],
        "ips": [{"address": "10.9.0.2/24", "gateway": "10.9.0.1", "interface": 0}],
    }
    result.setdefault("dns", {}).setdefault("search", []).append(conf["type"])
    print(json.dumps(result))
"""


def make_chain(tmp_path: Path, plugins: list[dict[str, Any]], version: str = "1.0.0"
               ) -> tuple[CniNetwork, Path]:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "conf"
    bin_dir.mkdir(exist_ok=True)
    conf_dir.mkdir(exist_ok=True)
    for plugin in plugins:
        script = bin_dir / plugin["type"]
        script.write_text(f"#!{sys.executable}\n{FAKE_PLUGIN}")
        script.chmod(0o755)
    (conf_dir / "10-fake.conflist").write_text(
        json.dumps({"cniVersion": version, "name": "fake", "plugins": plugins}))
    log = tmp_path / "calls.jsonl"
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "FAKE_LOG": str(log)}
    network = CniNetwork(str(conf_dir), [str(bin_dir)], str(tmp_path / "cache"),
                         timeout_s=5.0, base_env=env, check_skip=frozenset())
    return network, log


def calls(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def fake_pod(pod_id: str = "pod1") -> PodNetwork:
    # Any nsfs file is a netns as far as the checks go; the fakes never enter it.
    return PodNetwork(pod_id=pod_id, netns="/proc/self/ns/net", pod_name="p", pod_namespace="d",
                      port_mappings=(PortMapping(8080, 80),))


async def test_add_chains_prev_result_and_caches_it(tmp_path: Path) -> None:
    with_caps = {"type": "second", "capabilities": {"portMappings": True}}
    network, log = make_chain(tmp_path, [{"type": "first"}, with_caps])
    result = await network.add(fake_pod())
    assert [str(ip) for ip in result.pod_ips()] == ["10.9.0.2/24"]
    assert result.dns.search == ("first", "second")
    first, second = calls(log)
    assert "prevResult" not in first["conf"] and "runtimeConfig" not in first["conf"]
    assert second["conf"]["prevResult"]["dns"]["search"] == ["first"]
    assert second["conf"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 8080
    assert second["env"]["CNI_NETNS"] == "/proc/self/ns/net"
    cached = network.cached_result("pod1")
    assert cached is not None and cached.dns.search == ("first", "second")


async def test_check_and_del_use_the_cached_result_and_config(tmp_path: Path) -> None:
    network, log = make_chain(tmp_path, [{"type": "first"}, {"type": "second"}])
    await network.add(fake_pod())
    # A later config change must not change which chain the pod is torn down with.
    (tmp_path / "conf" / "10-fake.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "first"}]}))
    log.unlink()
    await network.check(fake_pod())
    await network.delete(fake_pod())
    seen = [(c["type"], c["cmd"]) for c in calls(log)]
    assert seen == [("first", "CHECK"), ("second", "CHECK"), ("second", "DEL"), ("first", "DEL")]
    assert all(c["conf"]["prevResult"]["dns"]["search"] == ["first", "second"]
               for c in calls(log))
    assert network.cached_result("pod1") is None


async def test_del_is_idempotent_and_tolerates_a_missing_netns(tmp_path: Path) -> None:
    network, log = make_chain(tmp_path, [{"type": "first"}])
    await network.add(fake_pod())
    gone = PodNetwork(pod_id="pod1", netns=str(tmp_path / "no-such-netns"))
    await network.delete(gone)
    await network.delete(gone)
    dels = [c for c in calls(log) if c["cmd"] == "DEL"]
    assert len(dels) == 2
    assert all(c["env"]["CNI_NETNS"] == "" for c in dels)
    assert "prevResult" in dels[0]["conf"] and "prevResult" not in dels[1]["conf"]


async def test_failed_add_raises_the_plugin_error_and_undoes_the_chain(tmp_path: Path) -> None:
    network, log = make_chain(tmp_path, [{"type": "first"}, {"type": "second", "fail_on": "ADD"}])
    with pytest.raises(CniPluginError) as info:
        await network.add(fake_pod())
    assert (info.value.plugin, info.value.cni_code, info.value.details) == ("second", 11, "second")
    assert "second ADD failed (code 11): try later" in str(info.value)
    seen = [(c["type"], c["cmd"]) for c in calls(log)]
    assert seen == [("first", "ADD"), ("second", "ADD"), ("second", "DEL"), ("first", "DEL")]
    assert network.cached_result("pod1") is None


async def test_hung_plugin_times_out(tmp_path: Path) -> None:
    network, _ = make_chain(tmp_path, [{"type": "slow", "sleep_on": "CHECK"}])
    network.timeout_s = 0.5
    await network.add(fake_pod())
    with pytest.raises(DeadlineExceeded, match="slow CHECK"):
        await network.check(fake_pod())


async def test_check_needs_a_cached_add(tmp_path: Path) -> None:
    network, _ = make_chain(tmp_path, [{"type": "first"}])
    with pytest.raises(NotFound):
        await network.check(fake_pod())


async def test_check_is_skipped_before_spec_0_4_0_and_when_disabled(tmp_path: Path) -> None:
    network, log = make_chain(tmp_path, [{"type": "first"}], version="0.3.1")
    await network.add(fake_pod())
    await network.check(fake_pod())
    assert [c["cmd"] for c in calls(log)] == ["ADD"]
    conf = tmp_path / "conf" / "10-fake.conflist"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "cniVersion": "1.0.0",
                                "disableCheck": True}))
    await network.add(fake_pod("pod2"))
    await network.check(fake_pod("pod2"))
    assert [c["cmd"] for c in calls(log)] == ["ADD", "ADD"]


async def test_add_on_a_path_that_is_not_a_netns(tmp_path: Path) -> None:
    network, _ = make_chain(tmp_path, [{"type": "first"}])
    with pytest.raises(NotFound):
        await network.add(PodNetwork(pod_id="x", netns=str(tmp_path)))


def test_network_ready_reports_missing_config_and_plugins(tmp_path: Path) -> None:
    empty = CniNetwork(str(tmp_path / "none"), [str(tmp_path)], str(tmp_path / "c"))
    ok, reason, message = empty.network_ready()
    assert (ok, reason) == (False, "NetworkPluginNotReady")
    assert str(tmp_path / "none") in message
    with pytest.raises(FailedPrecondition):
        empty.load()
    network, _ = make_chain(tmp_path, [{"type": "first"}])
    assert network.network_ready() == (True, "", "")
    (tmp_path / "bin" / "first").unlink()
    ok, reason, message = network.network_ready()
    assert not ok and "'first'" in message

"""CNI result and error-object parsing."""

from __future__ import annotations

import ipaddress
import json

import pytest

from crivm.netbridge.cni_result import (
    CniPluginError,
    CniResultError,
    parse_result,
    plugin_error,
)

# What the bridge plugin (v1.1.1) prints for a pod, trimmed to one address.
BRIDGE_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "crivm0", "mac": "8e:1c:ba:5e:9b:b4"},
        {"name": "veth1", "mac": "a6:1b:2e:0a:05:17"},
        {"name": "eth0", "mac": "86:ff:2e:6d:bd:ae", "sandbox": "/run/crivm/netns/p"},
    ],
    "ips": [
        {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"},
        {"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "10.88.0.254"}],
    "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
            "search": ["default.svc"], "options": ["ndots:5"]},
}


def test_parse_bridge_result() -> None:
    result = parse_result(BRIDGE_RESULT)
    assert result.cni_version == "1.0.0"
    eth0 = result.sandbox_interface("eth0")
    assert eth0 is not None and eth0.mac == "86:ff:2e:6d:bd:ae"
    assert eth0.sandbox == "/run/crivm/netns/p"
    assert result.sandbox_interface("crivm0") is None  # host side
    assert result.ips[1].gateway == ipaddress.ip_address("10.88.0.1")
    assert result.routes[0].dst == ipaddress.ip_network("0.0.0.0/0")
    assert result.routes[0].gw is None
    assert str(result.routes[1].gw) == "10.88.0.254"
    assert result.dns.nameservers == ("10.96.0.10",)
    assert result.dns.options == ("ndots:5",)
    assert result.raw is BRIDGE_RESULT


def test_pod_ips_put_ipv4_first() -> None:
    ips = parse_result(BRIDGE_RESULT).pod_ips("eth0")
    assert [str(ip) for ip in ips] == ["10.88.0.5/16", "fd00::5/64"]
    assert parse_result(BRIDGE_RESULT).pod_ips("eth1") == ()


def test_ips_without_interface_index_count_as_the_pods() -> None:
    result = parse_result({"cniVersion": "0.3.1", "ips": [{"version": "4",
                                                          "address": "10.1.2.3/24"}]})
    assert [str(ip) for ip in result.pod_ips()] == ["10.1.2.3/24"]


def test_empty_result_is_valid() -> None:
    result = parse_result({"cniVersion": "1.0.0"})
    assert result.ips == () and result.interfaces == () and result.dns.nameservers == ()


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"ips": []},
        {"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}},
        {"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]},
        {"cniVersion": "1.0.0", "ips": "10.0.0.1"},
        {"cniVersion": "1.0.0", "interfaces": [{"mac": "aa"}]},
        {"cniVersion": "1.0.0", "routes": [{"dst": "10.0.0.0/8", "gw": 5}]},
        {"cniVersion": "1.0.0", "dns": {"nameservers": "8.8.8.8"}},
    ],
)
def test_malformed_results_raise(raw: object) -> None:
    with pytest.raises(CniResultError):
        parse_result(raw)


def test_plugin_error_object_becomes_exception() -> None:
    out = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "invalid network config",
                      "details": "bridge name too long"}).encode()
    err = plugin_error("bridge", "ADD", out, b"", 1)
    assert isinstance(err, CniPluginError)
    assert (err.plugin, err.command, err.cni_code) == ("bridge", "ADD", 7)
    assert err.msg == "invalid network config"
    assert err.details == "bridge name too long"
    assert "bridge ADD failed (code 7): invalid network config; bridge name too long" in str(err)


def test_plugin_without_error_object_reports_stderr_and_status() -> None:
    err = plugin_error("foo", "DEL", b"", b"panic: boom\n", 2)
    assert err.cni_code == 999
    assert "exited with status 2" in str(err) and "panic: boom" in str(err)

"""Conflist loading and validation, and the shipped default conflist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crivm.errors import ConfigError
from crivm.netbridge import cni_config
from crivm.netbridge.cni_config import find_network, find_plugin, parse_conflist

GOOD = {
    "cniVersion": "1.0.0",
    "name": "net1",
    "plugins": [{"type": "bridge", "bridge": "b0"}, {"type": "portmap",
                                                     "capabilities": {"portMappings": True}}],
}


def write(directory: Path, name: str, doc: object) -> Path:
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_parse_conflist_reads_name_version_and_plugins() -> None:
    net = parse_conflist(GOOD, "x.conflist")
    assert net.name == "net1"
    assert net.cni_version == "1.0.0"
    assert net.plugin_types == ("bridge", "portmap")
    assert net.disable_check is False


def test_single_plugin_conf_becomes_one_plugin_list() -> None:
    net = parse_conflist({"cniVersion": "0.4.0", "name": "n", "type": "bridge"}, "x.conf")
    assert net.plugin_types == ("bridge",)
    assert net.cni_version == "0.4.0"


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({**GOOD, "name": ""}, "name"),
        ({k: v for k, v in GOOD.items() if k != "name"}, "name"),
        ({**GOOD, "cniVersion": "9.9.9"}, "cniVersion"),
        ({**GOOD, "cniVersion": 1}, "cniVersion"),
        ({**GOOD, "cniVersion": "0.2.0"}, "cniVersion"),
        ({**GOOD, "plugins": []}, "plugins"),
        ({**GOOD, "plugins": "bridge"}, "plugins"),
        ({**GOOD, "plugins": [{"bridge": "b0"}]}, "plugins[0].type"),
        ({**GOOD, "plugins": [{"type": "../../bin/sh"}]}, "plugins[0].type"),
        ({**GOOD, "plugins": [{"type": "portmap", "capabilities": {"portMappings": "yes"}}]},
         "plugins[0].capabilities"),
        ({**GOOD, "disableCheck": "true"}, "disableCheck"),
        ([1, 2], "(document)"),
    ],
)
def test_invalid_conflists_name_the_bad_key(doc: object, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_conflist(doc, "bad.conflist")
    assert info.value.key == key
    assert info.value.path == "bad.conflist"


def test_first_valid_file_in_lexical_order_wins(tmp_path: Path) -> None:
    write(tmp_path, "05-broken.conflist", "{not json")
    write(tmp_path, "10-first.conf", {"cniVersion": "1.0.0", "name": "first", "type": "bridge"})
    write(tmp_path, "20-second.conflist", {**GOOD, "name": "second"})
    write(tmp_path, "00-ignored.txt", GOOD)
    net, problems = find_network(str(tmp_path))
    assert net is not None and net.name == "first"
    assert net.source == str(tmp_path / "10-first.conf")
    assert len(problems) == 1 and "05-broken.conflist" in problems[0]


def test_no_usable_file_reports_every_problem(tmp_path: Path) -> None:
    write(tmp_path, "a.conflist", {**GOOD, "plugins": []})
    write(tmp_path, "b.json", "[]")
    net, problems = find_network(str(tmp_path))
    assert net is None
    assert len(problems) == 2


def test_missing_config_dir_is_no_network(tmp_path: Path) -> None:
    assert find_network(str(tmp_path / "nope")) == (None, [])


def test_find_plugin_takes_the_first_executable(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "bridge").write_text("not executable")
    (second / "bridge").write_text("#!/bin/sh\n")
    (second / "bridge").chmod(0o755)
    assert find_plugin("bridge", [str(first), str(second)]) == str(second / "bridge")
    assert find_plugin("portmap", [str(first), str(second)]) is None


def test_to_dict_round_trips() -> None:
    net = parse_conflist(GOOD, "x")
    assert parse_conflist(net.to_dict(), "x") == net


def test_default_conflist_is_valid_and_as_specified() -> None:
    data = cni_config.default_conflist()
    net = parse_conflist(data, "default")
    assert (net.name, net.cni_version) == ("crivm", "1.0.0")
    assert net.plugin_types[:2] == ("bridge", "portmap")
    bridge = net.plugins[0]
    assert bridge["bridge"] == "crivm0"
    assert bridge["isGateway"] and bridge["ipMasq"] and bridge["hairpinMode"]
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"][0][0]["subnet"] == "10.88.0.0/16"
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]
    portmap = net.plugins[1]
    assert portmap["capabilities"] == {"portMappings": True}
    assert portmap["snat"] is True
    assert json.loads(cni_config.default_conflist_text()) == data


def test_default_conflist_plugins_exist_on_this_host() -> None:
    if not Path("/usr/lib/cni").is_dir():
        pytest.skip("containernetworking-plugins not installed")
    for ptype in parse_conflist(cni_config.default_conflist()).plugin_types:
        assert find_plugin(ptype, ["/usr/lib/cni"]), ptype


def test_install_default_conflist_only_when_no_network_exists(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    written = cni_config.install_default_conflist(str(conf_dir))
    assert written == conf_dir / "10-crivm.conflist"
    net, _ = find_network(str(conf_dir))
    assert net is not None and net.name == "crivm"
    assert cni_config.install_default_conflist(str(conf_dir)) is None  # kept, not rewritten

    admin_dir = tmp_path / "admin"
    admin_dir.mkdir()
    write(admin_dir, "05-admin.conflist", GOOD)
    assert cni_config.install_default_conflist(str(admin_dir)) is None
    assert sorted(p.name for p in admin_dir.iterdir()) == ["05-admin.conflist"]

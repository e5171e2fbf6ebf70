"""Loading the CNI network configuration: the first valid file in the config dir wins.

Like CRI-O and containerd, files ending in ``.conflist``, ``.conf`` or ``.json`` are read in
lexical order; a single-plugin ``.conf`` becomes a one-plugin list. Invalid files are skipped
with a warning, so a broken ``99-*.conf`` next to a good ``10-*.conflist`` does not take the
node's network down.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from crivm.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
# Results below 0.3.0 have another shape (ip4/ip6); no plugin shipped today needs them.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_CONFLIST_NAME = "10-crivm.conflist"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True)
class NetworkConfigList:
    """One CNI network: a named chain of plugin configs sharing a cniVersion."""

    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]
    disable_check: bool = False
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(str(p["type"]) for p in self.plugins)

    def to_dict(self) -> dict[str, Any]:
        """The conflist as JSON data; cached with an ADD so DEL uses the same chain."""
        return {
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": [copy.deepcopy(dict(p)) for p in self.plugins],
        }


def parse_conflist(raw: Any, source: str = "(inline)") -> NetworkConfigList:
    """Validate a decoded ``.conflist`` (or single-plugin ``.conf``) document."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "(document)", "must be a JSON object")
    if "plugins" not in raw and "type" in raw:
        return _from_single_conf(raw, source)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "name", "must be a non-empty string")
    version = raw.get("cniVersion")
    _check_version(version, source, "cniVersion")
    assert isinstance(version, str)
    plugins = raw.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ConfigError(source, "plugins", "must be a non-empty list of plugin configs")
    checked = tuple(_check_plugin(p, i, source) for i, p in enumerate(plugins))
    disable_check = raw.get("disableCheck", False)
    if not isinstance(disable_check, bool):
        raise ConfigError(source, "disableCheck", "must be true or false")
    return NetworkConfigList(
        name=name, cni_version=version, plugins=checked,
        disable_check=disable_check, source=source, raw=raw,
    )


def _from_single_conf(raw: dict[str, Any], source: str) -> NetworkConfigList:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "name", "must be a non-empty string")
    version = raw.get("cniVersion")
    _check_version(version, source, "cniVersion")
    assert isinstance(version, str)
    plugin = _check_plugin(raw, 0, source)
    return NetworkConfigList(
        name=name, cni_version=version, plugins=(plugin,), source=source, raw=raw,
    )


def _check_version(version: Any, source: str, key: str) -> None:
    if not isinstance(version, str):
        raise ConfigError(source, key, "must be a version string such as \"1.0.0\"")
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            source, key, f"{version!r} is not supported; use one of {', '.join(SUPPORTED_VERSIONS)}"
        )


def _check_plugin(plugin: Any, index: int, source: str) -> Mapping[str, Any]:
    key = f"plugins[{index}]"
    if not isinstance(plugin, dict):
        raise ConfigError(source, key, "must be a JSON object")
    ptype = plugin.get("type")
    if not isinstance(ptype, str) or not ptype or "/" in ptype or ptype.startswith("."):
        raise ConfigError(source, f"{key}.type", "must name a plugin binary (no path)")
    caps = plugin.get("capabilities", {})
    if not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values()):
        raise ConfigError(source, f"{key}.capabilities", "must map capability names to booleans")
    return plugin


def config_files(config_dir: str) -> list[Path]:
    """The candidate config files in ``config_dir``, in the order they are tried."""
    try:
        names = sorted(os.listdir(config_dir))
    except FileNotFoundError:
        return []
    return [Path(config_dir) / n for n in names if n.endswith(CONFIG_SUFFIXES)]


def load_file(path: Path) -> NetworkConfigList:
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", str(exc)) from exc
    return parse_conflist(raw, str(path))


def find_network(config_dir: str) -> tuple[NetworkConfigList | None, list[str]]:
    """The first valid network in ``config_dir``, and the problems of the files skipped on the way.

    Returns ``(None, problems)`` when no file is usable.
    """
    problems: list[str] = []
    for path in config_files(config_dir):
        if not path.is_file():
            continue
        try:
            return load_file(path), problems
        except ConfigError as exc:
            log.warning("skipping CNI config: %s", exc)
            problems.append(str(exc))
    return None, problems


def find_plugin(plugin_type: str, plugin_dirs: Sequence[str]) -> str | None:
    """The path of the executable plugin ``plugin_type`` in the first dir that has it."""
    for directory in plugin_dirs:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def default_conflist() -> dict[str, Any]:
    """The default network, written by the installer to ``<cni_config_dir>/10-crivm.conflist``.
    """
    text = resources.files("crivm.netbridge").joinpath("default_conflist.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def conflist_on(bridge: str, subnet: str, gateway: str, ipam_dir: str,
                name: str = "") -> dict[str, Any]:
    """The default network moved onto a bridge, subnet and host-local state dir of its own,
    so tests, benchmarks and critest runs never share addresses with a live daemon."""
    conf = default_conflist()
    conf["name"] = name or bridge
    plugin = conf["plugins"][0]
    plugin["bridge"] = bridge
    plugin["ipam"]["dataDir"] = ipam_dir
    plugin["ipam"]["ranges"] = [[{"subnet": subnet, "gateway": gateway}]]
    return conf


def default_conflist_text() -> str:
    """The default conflist file content, pretty-printed with a trailing newline."""
    return json.dumps(default_conflist(), indent=2) + "\n"


def install_default_conflist(config_dir: str) -> Path | None:
    """Write the default conflist into ``config_dir`` unless a usable network is already there.

    Returns the path written, or None when an existing config was kept (an admin's own
    network always wins over ours).
    """
    existing, _ = find_network(config_dir)
    if existing is not None:
        return None
    path = Path(config_dir) / DEFAULT_CONFLIST_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(default_conflist_text())
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot be written: {exc.strerror}") from exc
    log.info("wrote the default CNI network to %s", path)
    return path

"""CNI results and errors as typed data (spec versions 0.3.0 to 1.0.0, which share one shape)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crivm.errors import CrivmError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CniResultError(CrivmError):
    """A plugin printed something that is not a valid CNI result."""


class CniPluginError(CrivmError):
    """A CNI plugin failed; carries the spec's error object (code, msg, details)."""

    def __init__(
        self, plugin: str, command: str, cni_code: int, msg: str, details: str = ""
    ) -> None:
        text = f"CNI plugin {plugin} {command} failed (code {cni_code}): {msg}"
        if details:
            text += f"; {details}"
        super().__init__(text)
        self.plugin = plugin
        self.command = command
        self.cni_code = cni_code
        self.msg = msg
        self.details = details


@dataclass(frozen=True)
class CniInterface:
    name: str
    mac: str = ""
    # The netns path for interfaces inside the pod; empty for host-side ones (the bridge, veth).
    sandbox: str = ""
    mtu: int = 0


@dataclass(frozen=True)
class CniIP:
    address: IPInterface
    gateway: IPAddress | None = None
    # Index into CniResult.interfaces, when the plugin said which interface holds it.
    interface: int | None = None


@dataclass(frozen=True)
class CniRoute:
    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class CniDns:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class CniResult:
    cni_version: str
    interfaces: tuple[CniInterface, ...] = ()
    ips: tuple[CniIP, ...] = ()
    routes: tuple[CniRoute, ...] = ()
    dns: CniDns = CniDns()
    # The JSON as the plugin printed it: passed on as prevResult and cached.
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def sandbox_interface(self, ifname: str) -> CniInterface | None:
        for iface in self.interfaces:
            if iface.name == ifname and iface.sandbox:
                return iface
        return None

    def pod_ips(self, ifname: str = "eth0") -> tuple[IPInterface, ...]:
        """The pod's addresses, IPv4 first (the CRI reports the first as the pod IP)."""
        wanted = [
            ip.address for ip in self.ips
            if ip.interface is None
            or (0 <= ip.interface < len(self.interfaces)
                and self.interfaces[ip.interface].name == ifname
                and self.interfaces[ip.interface].sandbox)
        ]
        return tuple(sorted(wanted, key=lambda a: a.version))


def _field(raw: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw.get(key)
    if value is not None and not isinstance(value, kind):
        raise CniResultError(f"CNI result: {where}.{key} must be a {kind.__name__}")
    return value


def _parse_interface(raw: Any, where: str) -> CniInterface:
    if not isinstance(raw, dict):
        raise CniResultError(f"CNI result: {where} must be an object")
    name = _field(raw, "name", str, where)
    if not name:
        raise CniResultError(f"CNI result: {where}.name is missing")
    return CniInterface(
        name=name,
        mac=_field(raw, "mac", str, where) or "",
        sandbox=_field(raw, "sandbox", str, where) or "",
        mtu=_field(raw, "mtu", int, where) or 0,
    )


def _parse_ip(raw: Any, where: str) -> CniIP:
    if not isinstance(raw, dict):
        raise CniResultError(f"CNI result: {where} must be an object")
    try:
        address = ipaddress.ip_interface(_field(raw, "address", str, where) or "")
        gw_text = _field(raw, "gateway", str, where)
        gateway = ipaddress.ip_address(gw_text) if gw_text else None
    except ValueError as exc:
        raise CniResultError(f"CNI result: {where}: {exc}") from exc
    return CniIP(address=address, gateway=gateway, interface=_field(raw, "interface", int, where))


def _parse_route(raw: Any, where: str) -> CniRoute:
    if not isinstance(raw, dict):
        raise CniResultError(f"CNI result: {where} must be an object")
    try:
        dst = ipaddress.ip_network(_field(raw, "dst", str, where) or "", strict=False)
        gw_text = _field(raw, "gw", str, where)
        gw = ipaddress.ip_address(gw_text) if gw_text else None
    except ValueError as exc:
        raise CniResultError(f"CNI result: {where}: {exc}") from exc
    return CniRoute(dst=dst, gw=gw)


def _strings(raw: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CniResultError(f"CNI result: {where}.{key} must be a list of strings")
    return tuple(value)


def parse_result(raw: Any) -> CniResult:
    """Turn a plugin's stdout JSON (already decoded) into a :class:`CniResult`."""
    if not isinstance(raw, dict):
        raise CniResultError("CNI result must be a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str):
        raise CniResultError("CNI result has no cniVersion")
    if "ip4" in raw or "ip6" in raw:
        raise CniResultError(f"CNI result version {version} (ip4/ip6 shape) is not supported")
    interfaces = _field(raw, "interfaces", list, "result") or []
    ips = _field(raw, "ips", list, "result") or []
    routes = _field(raw, "routes", list, "result") or []
    dns_raw = _field(raw, "dns", dict, "result") or {}
    dns = CniDns(
        nameservers=_strings(dns_raw, "nameservers", "dns"),
        domain=_field(dns_raw, "domain", str, "dns") or "",
        search=_strings(dns_raw, "search", "dns"),
        options=_strings(dns_raw, "options", "dns"),
    )
    return CniResult(
        cni_version=version,
        interfaces=tuple(_parse_interface(x, f"interfaces[{i}]") for i, x in enumerate(interfaces)),
        ips=tuple(_parse_ip(x, f"ips[{i}]") for i, x in enumerate(ips)),
        routes=tuple(_parse_route(x, f"routes[{i}]") for i, x in enumerate(routes)),
        dns=dns,
        raw=raw,
    )


def plugin_error(
    plugin: str, command: str, stdout: bytes, stderr: bytes, rc: int
) -> CniPluginError:
    """The error a failed plugin reported: its JSON error object, else its stderr and exit code."""
    try:
        obj = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
        code = obj.get("code")
        details = obj.get("details")
        return CniPluginError(
            plugin, command,
            code if isinstance(code, int) else 999,
            obj["msg"],
            details if isinstance(details, str) else "",
        )
    text = (stderr or stdout).decode(errors="replace").strip()[-2000:]
    return CniPluginError(plugin, command, 999, f"exited with status {rc}", text)

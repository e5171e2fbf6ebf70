"""Running a CNI plugin chain (ADD, CHECK, DEL) for a pod, per the CNI spec.

Each ADD result is cached under the runroot (like libcni's ``/var/lib/cni/results``) together
with the conflist and arguments that made it, so DEL and CHECK get the same chain and their
``prevResult`` after a daemon restart or a config change.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crivm.errors import CrivmError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from crivm.netbridge import cni_config
from crivm.netbridge.cni_config import NetworkConfigList, find_network, find_plugin
from crivm.netbridge.cni_result import CniResult, parse_result, plugin_error
from crivm.netbridge.netns import is_netns

if TYPE_CHECKING:
    from crivm.proto import api_pb2
    from crivm.runtime.config import Config

log = logging.getLogger(__name__)

DEFAULT_IFNAME = "eth0"
DEFAULT_TIMEOUT_S = 60.0
NOT_READY_REASON = "NetworkPluginNotReady"
_CACHE_KIND = "crivmCniCacheV1"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CRI_PROTOCOLS = {0: "tcp", 1: "udp", 2: "sctp"}
# Plugins whose CHECK is broken in v1.1.1 (Debian 12's); their ADD and DEL are fine.
# portmap fails on IPv4-only pods with host ports, looking for ip6tables rules it never made
# (containernetworking/plugins#819); bandwidth panics when the pod has no bandwidth limits.
DEFAULT_CHECK_SKIP = frozenset({"portmap", "bandwidth"})


@dataclass(frozen=True)
class PortMapping:
    """A host port forwarded to the pod (the portmap plugin's portMappings entry)."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry


@dataclass(frozen=True)
class DnsConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bandwidth:
    """Traffic shaping for the bandwidth plugin: rates in bit/s, bursts in bits; 0 = unset."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0


@dataclass(frozen=True)
class PodNetwork:
    """Everything the plugins are told about one pod's attachment."""

    pod_id: str
    netns: str
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    ifname: str = DEFAULT_IFNAME
    port_mappings: tuple[PortMapping, ...] = ()
    dns: DnsConfig | None = None
    bandwidth: Bandwidth | None = None


def port_mappings_from_cri(mappings: Iterable[api_pb2.PortMapping]) -> tuple[PortMapping, ...]:
    """CRI PortMappings as portmap entries; ones without a host port are not forwarded."""
    out = []
    for pm in mappings:
        if pm.host_port <= 0:
            continue
        protocol = _CRI_PROTOCOLS.get(int(pm.protocol))
        if protocol is None:
            raise InvalidArgument(f"port mapping {pm.host_port}: unknown protocol {pm.protocol}")
        out.append(PortMapping(pm.host_port, pm.container_port, protocol, pm.host_ip))
    return tuple(out)


def dns_from_cri(dns: api_pb2.DNSConfig | None) -> DnsConfig | None:
    if dns is None:
        return None
    return DnsConfig(tuple(dns.servers), tuple(dns.searches), tuple(dns.options))


def cni_args(pod: PodNetwork) -> str:
    """CNI_ARGS as CRI-O and containerd send it; IgnoreUnknown keeps strict plugins happy."""
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod.pod_namespace),
        ("K8S_POD_NAME", pod.pod_name),
        ("K8S_POD_INFRA_CONTAINER_ID", pod.pod_id),
        ("K8S_POD_UID", pod.pod_uid),
    ]
    for key, value in pairs:
        if ";" in value or "=" in value:
            raise InvalidArgument(f"CNI_ARGS {key}={value!r} may not contain ';' or '='")
    return ";".join(f"{k}={v}" for k, v in pairs)


def capability_args(pod: PodNetwork) -> dict[str, Any]:
    """Every runtimeConfig value this pod has; each plugin gets the ones it declares."""
    args: dict[str, Any] = {}
    if pod.port_mappings:
        args["portMappings"] = [pm.to_cni() for pm in pod.port_mappings]
    if pod.dns is not None:
        args["dns"] = {
            "servers": list(pod.dns.servers),
            "searches": list(pod.dns.searches),
            "options": list(pod.dns.options),
        }
    if pod.bandwidth is not None:
        bw = pod.bandwidth
        shaped = {
            "ingressRate": bw.ingress_rate, "ingressBurst": bw.ingress_burst,
            "egressRate": bw.egress_rate, "egressBurst": bw.egress_burst,
        }
        if any(shaped.values()):
            args["bandwidth"] = shaped
    return args


def plugin_env(
    command: str,
    pod: PodNetwork,
    netns: str,
    plugin_dirs: Sequence[str],
    base_env: Mapping[str, str],
    args: str,
) -> dict[str, str]:
    """The environment of one plugin run: the daemon's own (plugins need PATH) plus CNI_*."""
    env = {k: v for k, v in base_env.items() if not k.startswith("CNI_")}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=pod.pod_id,
        CNI_NETNS=netns,
        CNI_IFNAME=pod.ifname,
        CNI_ARGS=args,
        CNI_PATH=os.pathsep.join(plugin_dirs),
    )
    return env


def plugin_stdin(
    net: NetworkConfigList,
    plugin: Mapping[str, Any],
    cap_args: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
) -> bytes:
    """The network config one plugin reads on stdin."""
    conf = copy.deepcopy(dict(plugin))
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    if prev_result is not None:
        conf["prevResult"] = copy.deepcopy(dict(prev_result))
    runtime_config = {
        cap: cap_args[cap]
        for cap, enabled in plugin.get("capabilities", {}).items()
        if enabled and cap in cap_args
    }
    if runtime_config:
        conf["runtimeConfig"] = runtime_config
    return json.dumps(conf).encode()


def _supports_check(version: str) -> bool:
    return cni_config.version_tuple(version) >= (0, 4, 0)


class CniNetwork:
    """The node's CNI network: the first valid config in ``config_dir``.

    Plugins come from ``plugin_dirs``; ADD results are cached under ``cache_dir``.
    """

    def __init__(
        self,
        config_dir: str,
        plugin_dirs: Sequence[str],
        cache_dir: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        base_env: Mapping[str, str] | None = None,
        check_skip: frozenset[str] = DEFAULT_CHECK_SKIP,
    ) -> None:
        self.config_dir = config_dir
        self.plugin_dirs = tuple(plugin_dirs)
        self.cache_dir = Path(cache_dir)
        self.timeout_s = timeout_s
        self._base_env = base_env
        self.check_skip = check_skip

    @classmethod
    def from_config(cls, cfg: Config) -> CniNetwork:
        return cls(cfg.cni_config_dir, cfg.cni_plugin_dirs, str(Path(cfg.runroot) / "cni"))

    # --- configuration ---------------------------------------------------------------------

    def load(self) -> NetworkConfigList:
        """FailedPrecondition when none is usable or a plugin is missing."""
        ok, _reason, message = self._readiness()
        if not ok:
            raise FailedPrecondition(message)
        net, _ = find_network(self.config_dir)
        assert net is not None
        return net

    def network_ready(self) -> tuple[bool, str, str]:
        """(ok, reason, message) for the CRI Status NetworkReady condition."""
        return self._readiness()

    def _readiness(self) -> tuple[bool, str, str]:
        net, problems = find_network(self.config_dir)
        if net is None:
            detail = f" ({'; '.join(problems)})" if problems else ""
            return (False, NOT_READY_REASON,
                    f"Network plugin returns error: no valid CNI network config in "
                    f"{self.config_dir}{detail}")
        for ptype in net.plugin_types:
            if find_plugin(ptype, self.plugin_dirs) is None:
                return (False, NOT_READY_REASON,
                        f"Network plugin returns error: CNI plugin {ptype!r} of network "
                        f"{net.name!r} ({net.source}) not found in {', '.join(self.plugin_dirs)}")
        return True, "", ""

    # --- ADD / CHECK / DEL -------------------------------------------------------------------

    async def add(self, pod: PodNetwork) -> CniResult:
        """Attach the pod to the network. On failure the chain is DELeted before raising."""
        net = self.load()
        if not is_netns(pod.netns):
            raise NotFound(f"CNI ADD for {pod.pod_id}: {pod.netns} is not a network namespace")
        cap_args = capability_args(pod)
        args = cni_args(pod)
        prev: Mapping[str, Any] | None = None
        started = time.monotonic()
        try:
            for plugin in net.plugins:
                out = await self._exec(net, plugin, "ADD", pod, pod.netns, args, cap_args, prev)
                if out is None:
                    raise CrivmError(f"CNI plugin {plugin['type']} ADD printed no result")
                prev = out
            assert prev is not None
            result = parse_result(prev)
        except BaseException:
            await self._undo_add(net, pod, args, cap_args, prev)
            raise
        self._write_cache(net, pod, args, cap_args, result)
        log.info("CNI ADD %s network %s: %s in %.0f ms", pod.pod_id, net.name,
                 ", ".join(str(ip) for ip in result.pod_ips(pod.ifname)) or "no IP",
                 (time.monotonic() - started) * 1000, extra={"pod_id": pod.pod_id})
        return result

    async def _undo_add(
        self, net: NetworkConfigList, pod: PodNetwork, args: str,
        cap_args: Mapping[str, Any], prev: Mapping[str, Any] | None,
    ) -> None:
        try:
            await self._del_chain(net, pod, pod.netns, args, cap_args, prev)
        except CrivmError as exc:
            log.warning("CNI DEL after a failed ADD of %s also failed: %s", pod.pod_id, exc,
                        extra={"pod_id": pod.pod_id})

    async def check(self, pod: PodNetwork) -> None:
        """Ask every plugin whether the pod's attachment is still as ADD left it."""
        cached = self._read_cache(pod)
        if cached is None:
            raise NotFound(f"CNI CHECK for {pod.pod_id}: no cached ADD result")
        net, args, cap_args, prev = cached
        if net.disable_check or not _supports_check(net.cni_version):
            return
        if not is_netns(pod.netns):
            raise NotFound(f"CNI CHECK for {pod.pod_id}: {pod.netns} is not a network namespace")
        for plugin in net.plugins:
            if plugin["type"] in self.check_skip:
                continue
            await self._exec(net, plugin, "CHECK", pod, pod.netns, args, cap_args, prev)

    async def delete(self, pod: PodNetwork) -> None:
        """Detach the pod; safe to repeat, and works when the netns is already gone."""
        cached = self._read_cache(pod)
        if cached is not None:
            net, args, cap_args, prev = cached
        else:
            found, _ = find_network(self.config_dir)
            if found is None:
                log.warning("CNI DEL %s: no cached result and no network config; nothing to do",
                            pod.pod_id, extra={"pod_id": pod.pod_id})
                return
            net, args, cap_args, prev = found, cni_args(pod), capability_args(pod), None
        # The spec lets DEL run without a netns; plugins then release what lives outside it.
        netns = pod.netns if is_netns(pod.netns) else ""
        await self._del_chain(net, pod, netns, args, cap_args, prev)
        self._cache_path(pod).unlink(missing_ok=True)
        log.info("CNI DEL %s network %s", pod.pod_id, net.name, extra={"pod_id": pod.pod_id})

    async def _del_chain(
        self, net: NetworkConfigList, pod: PodNetwork, netns: str, args: str,
        cap_args: Mapping[str, Any], prev: Mapping[str, Any] | None,
    ) -> None:
        if not _supports_check(net.cni_version):
            prev = None  # prevResult on DEL arrived with spec 0.4.0
        for plugin in reversed(net.plugins):
            await self._exec(net, plugin, "DEL", pod, netns, args, cap_args, prev)

    def cached_result(self, pod_id: str, ifname: str = DEFAULT_IFNAME) -> CniResult | None:
        """The result of the pod's last successful ADD, if it is still attached."""
        cached = self._read_cache(PodNetwork(pod_id=pod_id, netns="", ifname=ifname))
        if cached is None or cached[3] is None:
            return None
        return parse_result(cached[3])

    # --- plugin execution --------------------------------------------------------------------

    async def _exec(
        self, net: NetworkConfigList, plugin: Mapping[str, Any], command: str, pod: PodNetwork,
        netns: str, args: str, cap_args: Mapping[str, Any], prev: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        ptype = str(plugin["type"])
        binary = find_plugin(ptype, self.plugin_dirs)
        if binary is None:
            raise FailedPrecondition(
                f"CNI plugin {ptype!r} not found in {', '.join(self.plugin_dirs)}")
        env = plugin_env(command, pod, netns, self.plugin_dirs,
                         os.environ if self._base_env is None else self._base_env, args)
        stdin = plugin_stdin(net, plugin, cap_args, prev)
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                binary, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env,
            )
        except OSError as exc:
            raise CrivmError(f"CNI plugin {binary} cannot be run: {exc.strerror}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), self.timeout_s)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise DeadlineExceeded(
                f"CNI plugin {ptype} {command} for {pod.pod_id} ran past {self.timeout_s:g} s"
            ) from exc
        finally:
            if proc.returncode is None:  # cancelled: don't leave a half-done plugin behind
                proc.kill()
                await proc.wait()
        log.debug("CNI %s %s for %s: rc=%s in %.0f ms", ptype, command, pod.pod_id,
                  proc.returncode, (time.monotonic() - started) * 1000,
                  extra={"pod_id": pod.pod_id})
        if proc.returncode != 0:
            raise plugin_error(ptype, command, stdout, stderr, proc.returncode or 0)
        if not stdout.strip():
            return None
        try:
            out = json.loads(stdout)
        except ValueError as exc:
            raise CrivmError(f"CNI plugin {ptype} {command} printed invalid JSON: {exc}") from exc
        if not isinstance(out, dict):
            raise CrivmError(f"CNI plugin {ptype} {command} printed a non-object result")
        return out

    # --- result cache --------------------------------------------------------------------------

    def _cache_path(self, pod: PodNetwork) -> Path:
        if not _SAFE_ID.match(pod.pod_id) or not _SAFE_ID.match(pod.ifname):
            raise InvalidArgument(f"pod id {pod.pod_id!r} / ifname {pod.ifname!r} not file-safe")
        return self.cache_dir / "results" / f"{pod.pod_id}-{pod.ifname}.json"

    def _write_cache(
        self, net: NetworkConfigList, pod: PodNetwork, args: str,
        cap_args: Mapping[str, Any], result: CniResult,
    ) -> None:
        path = self._cache_path(pod)
        entry = {
            "kind": _CACHE_KIND,
            "containerId": pod.pod_id,
            "ifName": pod.ifname,
            "netns": pod.netns,
            "cniArgs": args,
            "capabilityArgs": dict(cap_args),
            "config": net.to_dict(),
            "result": dict(result.raw),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, path)
        except OSError as exc:
            raise CrivmError(f"cannot write CNI cache {path}: {exc.strerror}") from exc

    def _read_cache(
        self, pod: PodNetwork,
    ) -> tuple[NetworkConfigList, str, dict[str, Any], dict[str, Any] | None] | None:
        path = self._cache_path(pod)
        try:
            entry = json.loads(path.read_text())
            if entry.get("kind") != _CACHE_KIND:
                raise ValueError(f"unknown kind {entry.get('kind')!r}")
            net = cni_config.parse_conflist(entry["config"], str(path))
            return net, str(entry["cniArgs"]), dict(entry["capabilityArgs"]), entry.get("result")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, CrivmError) as exc:
            # A corrupt entry must not block teardown; fall back to the live config.
            log.warning("ignoring unreadable CNI cache %s: %s", path, exc)
            return None

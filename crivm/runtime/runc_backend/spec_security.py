"""The security parts of an OCI spec: capabilities, seccomp, masked and read-only paths.

Pure functions; host facts (the capability bounding set, whether AppArmor exists) come in as
arguments so every branch can be tested without the host.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2

# What a container gets when the pod asks for nothing: containerd's and docker's set.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

# Linux capability numbers, for reading /proc/self/status's CapBnd mask.
CAPABILITY_NUMBERS: dict[str, int] = {
    name: number for number, name in enumerate((
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
        "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
        "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
        "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
        "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
    ))
}

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)

SECCOMP_PROFILE_RESOURCE = "seccomp_default.json"


def capabilities_from_mask(mask: int) -> frozenset[str]:
    return frozenset(name for name, number in CAPABILITY_NUMBERS.items() if mask >> number & 1)


def _normalize(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") or upper == "ALL" else "CAP_" + upper


def capability_set(
    requested: api_pb2.Capability, privileged: bool, bounding: frozenset[str]
) -> dict[str, list[str]]:
    """The OCI ``process.capabilities`` object. Only capabilities the daemon itself holds in
    its bounding set can be granted: asking runc for more fails the whole container."""
    if privileged:
        caps = set(bounding)
    else:
        add = {_normalize(c) for c in requested.add_capabilities}
        drop = {_normalize(c) for c in requested.drop_capabilities}
        for name in add | drop:
            if name != "ALL" and name not in CAPABILITY_NUMBERS:
                raise InvalidArgument(f"unknown capability {name!r}")
        caps = set() if "ALL" in drop else set(DEFAULT_CAPABILITIES)
        caps |= set(CAPABILITY_NUMBERS) if "ALL" in add else add - {"ALL"}
        if "ALL" not in drop:
            caps -= drop
        # An explicit add wins over drop ALL (kubelet's drop: [ALL], add: [NET_BIND_SERVICE]).
        caps &= set(bounding)
    ordered = sorted(caps, key=lambda c: CAPABILITY_NUMBERS[c])
    ambient = sorted(
        ({_normalize(c) for c in requested.add_ambient_capabilities} & set(ordered)),
        key=lambda c: CAPABILITY_NUMBERS[c],
    )
    return {
        "bounding": ordered,
        "effective": ordered,
        "permitted": ordered,
        "inheritable": ambient,
        "ambient": ambient,
    }


def default_seccomp_profile(capabilities: frozenset[str]) -> dict[str, Any]:
    """crivm's RuntimeDefault profile, shipped in this package, for a process holding
    ``capabilities``.

    The shipped file is an allow list whose rules may carry ``includes``/``excludes`` on
    capabilities (a rule for mount(2) only applies with CAP_SYS_ADMIN). The OCI spec has no
    such keys, so they are resolved here, against the container's own capability set."""
    text = resources.files(__package__).joinpath(SECCOMP_PROFILE_RESOURCE).read_text()
    profile: dict[str, Any] = json.loads(text)
    rules = []
    for rule in profile["syscalls"]:
        includes = set(rule.pop("includes", {}).get("caps", ()))
        excludes = set(rule.pop("excludes", {}).get("caps", ()))
        if includes - capabilities or excludes & capabilities:
            continue
        rules.append(rule)
    profile["syscalls"] = rules
    return profile


def seccomp_section(
    security: api_pb2.LinuxContainerSecurityContext | api_pb2.LinuxSandboxSecurityContext,
    capabilities: frozenset[str],
) -> dict[str, Any] | None:
    """The OCI ``linux.seccomp`` object, or None for unconfined.

    The typed ``seccomp`` field wins when it is set (its zero value is RuntimeDefault, so
    "set" is HasField). Otherwise the legacy ``seccomp_profile_path`` (``runtime/default``,
    ``unconfined``, ``localhost/<path>``) decides, and nothing at all means unconfined, which
    is what kubelet expects when a pod names no profile."""
    if security.privileged:
        return None
    if security.HasField("seccomp"):
        kind = security.seccomp.profile_type
        ref = security.seccomp.localhost_ref
    else:
        legacy = security.seccomp_profile_path
        if legacy in ("", "unconfined"):
            return None
        if legacy in ("runtime/default", "docker/default"):
            kind, ref = api_pb2.SecurityProfile.RuntimeDefault, ""
        elif legacy.startswith("localhost/"):
            kind, ref = api_pb2.SecurityProfile.Localhost, legacy.removeprefix("localhost/")
        else:
            raise InvalidArgument(f"unknown seccomp profile {legacy!r}")
    if kind == api_pb2.SecurityProfile.Unconfined:
        return None
    if kind == api_pb2.SecurityProfile.RuntimeDefault:
        return default_seccomp_profile(capabilities)
    return _localhost_profile(ref)


def _localhost_profile(ref: str) -> dict[str, Any]:
    path = Path(ref)
    if not path.is_absolute():
        raise InvalidArgument(f"localhost seccomp profile {ref!r} must be an absolute path")
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read seccomp profile {ref}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"seccomp profile {ref} is not JSON: {exc}") from exc
    return loaded


def masked_and_readonly_paths(
    security: api_pb2.LinuxContainerSecurityContext,
) -> tuple[list[str], list[str]]:
    """Privileged containers see everything; otherwise kubelet's lists (which it sends as an
    empty list for the "Unmasked" proc mount) or crivm's defaults."""
    if security.privileged:
        return [], []
    masked = list(security.masked_paths) if security.masked_paths else list(DEFAULT_MASKED_PATHS)
    readonly = (
        list(security.readonly_paths) if security.readonly_paths else list(DEFAULT_READONLY_PATHS)
    )
    return masked, readonly


def apparmor_profile(
    security: api_pb2.LinuxContainerSecurityContext, host_has_apparmor: bool
) -> str:
    """The profile name for ``process.apparmorProfile``, or "" to leave it unset.

    A Localhost profile is passed to the runtime by name (it must be loaded on the host); on a
    host without AppArmor asking for one is an error. crivm ships no AppArmor profile of its
    own, so RuntimeDefault and Unconfined both leave the field unset."""
    if security.privileged:
        return ""
    if security.HasField("apparmor"):
        kind = security.apparmor.profile_type
        name = security.apparmor.localhost_ref
    elif security.apparmor_profile.startswith("localhost/"):
        kind = api_pb2.SecurityProfile.Localhost
        name = security.apparmor_profile.removeprefix("localhost/")
    else:
        return ""
    if kind != api_pb2.SecurityProfile.Localhost:
        return ""
    if not host_has_apparmor:
        raise InvalidArgument(f"AppArmor profile {name!r} requested, but the host has no AppArmor")
    return name

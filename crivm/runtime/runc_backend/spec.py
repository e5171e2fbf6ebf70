"""OCI runtime specs (config.json) for a pod's infra container and for its containers.

Pure functions from the CRI configs, the image's settings and a few host facts to the JSON
object runc reads. Everything that touches the host (stat'ing devices, reading the image's
passwd, probing cgroups) happens in the callers and arrives here as plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.backend import ImageSettings
from crivm.runtime.runc_backend import spec_security
from crivm.runtime.runc_backend.passwd import ProcessUser
from crivm.runtime.runc_backend.spec_resources import (
    ResourceHost,
    clamp_oom_score_adj,
    resources_section,
)

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The infra container should be the last thing the OOM killer picks (kubelet uses -998 too).
INFRA_OOM_SCORE_ADJ = -998
ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"

_PROPAGATION = {
    api_pb2.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared",
}


@dataclass(frozen=True)
class HostFacts:
    capability_bounding: frozenset[str]
    resources: ResourceHost = field(default_factory=ResourceHost)
    apparmor: bool = False


@dataclass(frozen=True)
class DeviceNode:
    """A host device as stat() saw it."""

    path: str  # in the container
    kind: str  # "c" or "b"
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int
    permissions: str  # cgroup access: any of "rwm"


@dataclass(frozen=True)
class PodFiles:
    """Files the pod shares with each of its containers (bind-mounted in)."""

    resolv_conf: str = ""
    hostname: str = ""
    hosts: str = ""
    shm: str = ""  # a tmpfs made for the pod, or "" to use the host's /dev/shm


@dataclass(frozen=True)
class PodNamespaces:
    """Where a container finds the pod's namespaces; "" means the host's."""

    network: str = ""
    ipc: str = ""
    uts: str = ""
    pid: str = ""


def _base_mounts(host_network: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    if host_network:
        # A fresh sysfs shows the mount's own net namespace; with the host's network the
        # host's /sys is what the container should see.
        mounts[4] = {"destination": "/sys", "type": "bind", "source": "/sys",
                     "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    return mounts


def _pod_file_mounts(files: PodFiles, skip: set[str]) -> list[dict[str, Any]]:
    mounts = []
    for destination, source in (
        ("/etc/resolv.conf", files.resolv_conf),
        ("/etc/hostname", files.hostname),
        ("/etc/hosts", files.hosts),
    ):
        if source and destination not in skip:
            mounts.append({"destination": destination, "type": "bind", "source": source,
                           "options": ["rbind", "rprivate", "rw"]})
    if "/dev/shm" not in skip:
        mounts.append({"destination": "/dev/shm", "type": "bind",
                       "source": files.shm or "/dev/shm",
                       "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev"]})
    return mounts


def _namespaces(ns: PodNamespaces, own: Sequence[str]) -> list[dict[str, Any]]:
    """``own`` names namespaces the container gets fresh; the others join ``ns`` paths, or
    are left out (the host's) when the path is empty."""
    entries: list[dict[str, Any]] = [{"type": "mount"}]
    for kind in ("network", "ipc", "uts", "pid"):
        if kind in own:
            entries.append({"type": kind})
        elif getattr(ns, kind):
            entries.append({"type": kind, "path": getattr(ns, kind)})
    return entries


def _base_spec(rootfs: str, readonly_rootfs: bool, cgroups_path: str) -> dict[str, Any]:
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": rootfs, "readonly": readonly_rootfs},
        "hostname": "",
        "mounts": [],
        "annotations": {},
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": list(spec_security.DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(spec_security.DEFAULT_READONLY_PATHS),
        },
    }


def sandbox_spec(
    *,
    pod_id: str,
    config: api_pb2.PodSandboxConfig,
    image: ImageSettings,
    rootfs: str,
    cgroups_path: str,
    netns_path: str,
    files: PodFiles,
    host: HostFacts,
) -> dict[str, Any]:
    """The infra (pause) container: it holds the pod's namespaces and does nothing else."""
    security = config.linux.security_context
    ns_options = security.namespace_options
    host_network = ns_options.network == api_pb2.NODE
    own = ["ipc"] if ns_options.ipc != api_pb2.NODE else []
    if not host_network:
        own.append("uts")
    if ns_options.pid != api_pb2.NODE:
        own.append("pid")
    spec = _base_spec(rootfs, True, cgroups_path)
    spec["linux"]["namespaces"] = _namespaces(PodNamespaces(network=netns_path), own)
    if not host_network:
        spec["hostname"] = config.hostname
    args = list(image.entrypoint + image.cmd) or ["/pause"]
    spec["process"] = {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": [f"PATH={DEFAULT_PATH}"],
        "cwd": "/",
        "capabilities": {k: [] for k in
                         ("bounding", "effective", "permitted", "inheritable", "ambient")},
        "noNewPrivileges": True,
        "oomScoreAdj": clamp_oom_score_adj(INFRA_OOM_SCORE_ADJ, host.resources),
    }
    spec["mounts"] = _base_mounts(host_network) + _pod_file_mounts(
        PodFiles(shm=files.shm), skip={"/etc/resolv.conf", "/etc/hostname", "/etc/hosts"}
    )
    if config.linux.sysctls:
        spec["linux"]["sysctl"] = dict(config.linux.sysctls)
    seccomp = spec_security.seccomp_section(security, frozenset())
    if seccomp is not None:
        spec["linux"]["seccomp"] = seccomp
    spec["annotations"] = {
        **dict(config.annotations),
        ANNOTATION_CONTAINER_TYPE: "sandbox",
        ANNOTATION_SANDBOX_ID: pod_id,
    }
    return spec


def process_args(config: api_pb2.ContainerConfig, image: ImageSettings) -> list[str]:
    """Kubernetes' rule: ``command`` replaces the entrypoint and drops the image's Cmd;
    ``args`` replaces Cmd."""
    if config.command:
        args = list(config.command) + list(config.args)
    else:
        args = list(image.entrypoint) + (list(config.args) or list(image.cmd))
    if not args:
        raise InvalidArgument("no command: neither the container config nor the image has one")
    return args


def process_env(
    config: api_pb2.ContainerConfig, image: ImageSettings, hostname: str, home: str
) -> list[str]:
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    for entry in image.env:
        key, _, value = entry.partition("=")
        env[key] = value
    env["HOSTNAME"] = hostname
    for kv in config.envs:
        # CRI carries env values as bytes; the OCI spec is JSON, so they must be text.
        env[kv.key] = kv.value.decode("utf-8", "replace")
    env.setdefault("HOME", home or "/")
    return [f"{k}={v}" for k, v in env.items()]


def user_request(
    config: api_pb2.ContainerConfig, image: ImageSettings
) -> tuple[str, int | None, tuple[int, ...]]:
    """(user spec to look up, run_as_group override, supplemental groups) per CRI rules:
    run_as_user, then run_as_username, then the image's User."""
    security = config.linux.security_context
    if security.HasField("run_as_user"):
        user = str(security.run_as_user.value)
    elif security.run_as_username:
        user = security.run_as_username
    else:
        user = image.user
    group = security.run_as_group.value if security.HasField("run_as_group") else None
    if group is not None and not (
        security.HasField("run_as_user") or security.run_as_username
    ):
        # The CRI says so: a group alone would silently run as the image's user.
        raise InvalidArgument("run_as_group needs run_as_user or run_as_username")
    if group is not None and ":" in user:
        user = user.partition(":")[0]
    return user, group, tuple(security.supplemental_groups)


def _cri_mounts(mounts: Sequence[api_pb2.Mount]) -> tuple[list[dict[str, Any]], str]:
    """Bind mounts from the CRI config, and the rootfs propagation they need."""
    result = []
    rootfs_propagation = ""
    for mount in mounts:
        if not mount.container_path.startswith("/"):
            raise InvalidArgument(f"mount path {mount.container_path!r} must be absolute")
        if mount.image.image:
            raise InvalidArgument("image volume mounts are not supported by crivm")
        propagation = _PROPAGATION.get(mount.propagation)
        if propagation is None:
            raise InvalidArgument(f"unknown mount propagation {mount.propagation}")
        if propagation == "rshared":
            rootfs_propagation = "rshared"
        elif propagation == "rslave" and not rootfs_propagation:
            rootfs_propagation = "rslave"
        # selinux_relabel asks for a relabel; with no SELinux on the host there is nothing to
        # do, and the mount itself is unchanged.
        options = ["rbind", propagation, "ro" if mount.readonly else "rw"]
        result.append({"destination": mount.container_path, "type": "bind",
                       "source": mount.host_path, "options": options})
    return result, rootfs_propagation


def _device_entries(devices: Sequence[DeviceNode]) -> tuple[list[dict[str, Any]], list[Any]]:
    nodes = []
    rules = []
    for dev in devices:
        nodes.append({"path": dev.path, "type": dev.kind, "major": dev.major,
                      "minor": dev.minor, "fileMode": dev.file_mode, "uid": dev.uid,
                      "gid": dev.gid})
        rules.append({"allow": True, "type": dev.kind, "major": dev.major,
                      "minor": dev.minor, "access": dev.permissions or "rwm"})
    return nodes, rules


def container_spec(
    *,
    pod_id: str,
    config: api_pb2.ContainerConfig,
    pod_config: api_pb2.PodSandboxConfig,
    image: ImageSettings,
    user: ProcessUser,
    rootfs: str,
    cgroups_path: str,
    namespaces: PodNamespaces,
    files: PodFiles,
    devices: Sequence[DeviceNode],
    host: HostFacts,
) -> dict[str, Any]:
    security = config.linux.security_context
    privileged = security.privileged
    if privileged and not pod_config.linux.security_context.privileged:
        raise InvalidArgument("a privileged container needs a privileged pod")
    pid_mode = security.namespace_options.pid
    own = ["pid"] if pid_mode == api_pb2.CONTAINER else []
    spec = _base_spec(rootfs, security.readonly_rootfs, cgroups_path)
    spec["linux"]["namespaces"] = _namespaces(namespaces, own)
    host_network = not namespaces.network

    cri_mounts, rootfs_propagation = _cri_mounts(config.mounts)
    taken = {m["destination"] for m in cri_mounts}
    base = [m for m in _base_mounts(host_network) if m["destination"] not in taken]
    spec["mounts"] = base + _pod_file_mounts(files, taken) + cri_mounts
    if rootfs_propagation:
        spec["linux"]["rootfsPropagation"] = rootfs_propagation

    hostname = pod_config.hostname
    capabilities = spec_security.capability_set(
        security.capabilities, privileged, host.capability_bounding
    )
    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": {"uid": user.uid, "gid": user.gid,
                 "additionalGids": list(user.additional_gids)},
        "args": process_args(config, image),
        "env": process_env(config, image, hostname, user.home),
        "cwd": config.working_dir or image.working_dir or "/",
        "capabilities": capabilities,
        "noNewPrivileges": security.no_new_privs,
    }
    resources = config.linux.resources
    if resources.oom_score_adj:
        process["oomScoreAdj"] = clamp_oom_score_adj(resources.oom_score_adj, host.resources)
    apparmor = spec_security.apparmor_profile(security, host.apparmor)
    if apparmor:
        process["apparmorProfile"] = apparmor
    spec["process"] = process

    linux = spec["linux"]
    linux["resources"].update(resources_section(resources, host.resources))
    nodes, rules = _device_entries(devices)
    if privileged:
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    else:
        linux["resources"]["devices"].extend(rules)
    if nodes:
        linux["devices"] = nodes
    linux["maskedPaths"], linux["readonlyPaths"] = spec_security.masked_and_readonly_paths(
        security
    )
    seccomp = spec_security.seccomp_section(security, frozenset(capabilities["bounding"]))
    if seccomp is not None:
        linux["seccomp"] = seccomp
    spec["annotations"] = _annotations(config.annotations, pod_id)
    return spec


def _annotations(annotations: Mapping[str, str], pod_id: str) -> dict[str, str]:
    return {
        **dict(annotations),
        ANNOTATION_CONTAINER_TYPE: "container",
        ANNOTATION_SANDBOX_ID: pod_id,
    }


def cgroup_parent(pod_config: api_pb2.PodSandboxConfig, pod_id: str) -> str:
    """kubelet's cgroup_parent when it gives one (cgroupfs paths), else crivm's own."""
    parent = pod_config.linux.cgroup_parent
    if parent:
        if not parent.startswith("/") or parent.endswith(".slice"):
            raise InvalidArgument(
                f"cgroup parent {parent!r} is not a cgroupfs path; crivm uses the cgroupfs "
                "driver"
            )
        return parent.rstrip("/")
    return f"/crivm/pod-{pod_id}"


def cgroups_path(parent: str, container_id: str) -> str:
    return f"{parent}/crivm-{container_id}"

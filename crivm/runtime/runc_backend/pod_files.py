"""The files a pod's containers share: resolv.conf, hostname, hosts, and the /dev/shm tmpfs."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import socket
from pathlib import Path

from crivm.errors import CrivmError, InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.runc_backend.spec import PodFiles

log = logging.getLogger(__name__)

DEFAULT_SHM_SIZE = 64 * 1024 * 1024
# CRI-O's annotation for the pod's /dev/shm size (bytes, or with a k/m/g suffix).
SHM_SIZE_ANNOTATION = "io.kubernetes.cri-o.ShmSize"
_MNT_DETACH = 2
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8


def resolv_conf(dns: api_pb2.DNSConfig) -> str:
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def hosts_file(hostname: str, ips: tuple[str, ...]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{hostname}" for ip in ips if hostname]
    return "\n".join(lines) + "\n"


def shm_size(annotations: dict[str, str]) -> int:
    raw = annotations.get(SHM_SIZE_ANNOTATION, "").strip().lower()
    if not raw:
        return DEFAULT_SHM_SIZE
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    multiplier = units.get(raw[-1], 1)
    digits = raw[:-1] if raw[-1] in units else raw
    if not digits.isdigit() or int(digits) == 0:
        raise InvalidArgument(f"{SHM_SIZE_ANNOTATION}={raw!r} is not a size")
    return int(digits) * multiplier


@functools.cache
def _libc() -> ctypes.CDLL:
    # Once per process: find_library spawns `ldconfig -p` (3-10 ms) on every call.
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount_tmpfs(target: str, size: int) -> None:
    data = f"mode=1777,size={size}".encode()
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc().mount(b"shm", target.encode(), b"tmpfs", flags, data) != 0:
        err = ctypes.get_errno()
        raise CrivmError(f"mounting the pod's /dev/shm at {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    """Detach ``target``; not mounted or missing is fine."""
    if _libc().umount2(target.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise CrivmError(f"unmounting {target}: {os.strerror(err)}")


def write_pod_files(
    pod_dir: str, config: api_pb2.PodSandboxConfig, ips: tuple[str, ...]
) -> PodFiles:
    """Create the pod's shared files under ``pod_dir``; the caller removes the dir on undo."""
    os.makedirs(pod_dir, mode=0o755, exist_ok=True)
    host_network = config.linux.security_context.namespace_options.network == api_pb2.NODE
    host_ipc = config.linux.security_context.namespace_options.ipc == api_pb2.NODE
    hostname = config.hostname or (socket.gethostname() if host_network else "")
    paths = PodFiles(
        resolv_conf=os.path.join(pod_dir, "resolv.conf"),
        hostname=os.path.join(pod_dir, "hostname"),
        hosts=os.path.join(pod_dir, "hosts"),
        shm="" if host_ipc else os.path.join(pod_dir, "shm"),
    )
    if config.HasField("dns_config") and config.dns_config.servers:
        Path(paths.resolv_conf).write_text(resolv_conf(config.dns_config))
    else:
        shutil.copyfile("/etc/resolv.conf", paths.resolv_conf)
    Path(paths.hostname).write_text(hostname + "\n")
    if host_network:
        shutil.copyfile("/etc/hosts", paths.hosts)
    else:
        write_hosts(paths.hosts, hostname, ips)
    if paths.shm:
        os.makedirs(paths.shm, mode=0o1777, exist_ok=True)
        _mount_tmpfs(paths.shm, shm_size(dict(config.annotations)))
    return paths


def write_hosts(path: str, hostname: str, ips: tuple[str, ...]) -> None:
    """(Re)write a pod's hosts file in place: containers bind-mount this inode."""
    Path(path).write_text(hosts_file(hostname, ips))


def remove_pod_files(pod_dir: str) -> None:
    unmount(os.path.join(pod_dir, "shm"))
    shutil.rmtree(pod_dir, ignore_errors=True)

"""Whether a container's command exists in its image, checked at CreateContainer.

runc finds a missing executable only when it creates the container, which crivm does in
StartContainer (as containerd does). kubelet reports a CreateContainer failure as
CreateContainerError with the message, and a command that is not there is worth that rather
than a container that fails to start; so the command is looked up here the way runc will
look it up: a path with a slash as it is (relative to the working dir), a bare name along
the process's PATH, symlinks resolved inside the rootfs. Anything under a mount (a volume,
/proc, /dev) cannot be judged from the image and is left to runc.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Any

from crivm.errors import InvalidArgument

# What runc's exec lookup falls back to when the process has no PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SYMLINKS = 40


class _Unknown(Exception):
    """The path leads under a mount: the image cannot say."""


def check_command(rootfs: str, container_spec: dict[str, Any]) -> None:
    process = container_spec.get("process", {})
    args = process.get("args") or []
    if not args:
        raise InvalidArgument("the container has no command: none given and none in the image")
    name = str(args[0])
    mounts = [str(m.get("destination", "")) for m in container_spec.get("mounts", [])]
    where = ""
    if "/" in name:
        candidates = [posixpath.join(str(process.get("cwd") or "/"), name)]
    else:
        path = next((entry[5:] for entry in process.get("env", []) if entry.startswith("PATH=")),
                    DEFAULT_PATH)
        candidates = [posixpath.join(directory or ".", name) for directory in path.split(":")]
        where = f" (looked along PATH={path})"
    for candidate in candidates:
        try:
            if _is_executable(rootfs, candidate, mounts):
                return
        except _Unknown:
            return
    raise InvalidArgument(f"executable {name!r} is not in the image{where}")


def _is_executable(rootfs: str, path: str, mounts: list[str]) -> bool:
    resolved = _resolve(rootfs, path, mounts)
    if resolved is None:
        return False
    try:
        info = os.stat(resolved)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def _resolve(rootfs: str, path: str, mounts: list[str]) -> str | None:
    """``path`` as the container will see it, as a host path under ``rootfs``: symlinks
    followed with ``rootfs`` as their root. None when a component does not exist."""
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        inside = "/" + "/".join([*resolved, part])
        if _under_mount(inside, mounts):
            raise _Unknown(inside)
        host = os.path.join(rootfs, *resolved, part)
        try:
            info = os.lstat(host)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
            continue
        resolved.append(part)
    return os.path.join(rootfs, *resolved)


def _under_mount(path: str, mounts: list[str]) -> bool:
    return any(
        path == mount or path.startswith(mount.rstrip("/") + "/") for mount in mounts if mount
    )

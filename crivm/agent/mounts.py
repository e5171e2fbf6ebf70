"""Mounting what the host shares (virtio-fs tags) with mount(2), through ctypes.

The guest has no mount helper to rely on for virtiofs, and the syscall needs none.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from crivm.agent.errors import AlreadyExists, GuestError, InvalidArgument
from crivm.proto import agent_pb2

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
_libc = ctypes.CDLL(None, use_errno=True)


def mount(request: agent_pb2.MountRequest) -> None:
    if not request.source or not os.path.isabs(request.target):
        raise InvalidArgument("a mount needs a source and an absolute target")
    fstype = request.fstype or "virtiofs"
    current = _mounted_at(request.target)
    if current is not None:
        if current == (request.source, fstype):
            return  # already done: a host that retries after a lost reply must not fail
        raise AlreadyExists(f"{request.target} already has {current[1]} {current[0]} mounted")
    os.makedirs(request.target, exist_ok=True)
    flags = MS_RDONLY if request.read_only else 0
    data = ",".join(request.options).encode() or None
    if _libc.mount(request.source.encode(), request.target.encode(), fstype.encode(), flags, data):
        err = ctypes.get_errno()
        raise GuestError(f"mount -t {fstype} {request.source} {request.target}: {os.strerror(err)}")
    log.info("mounted %s %s on %s", fstype, request.source, request.target)


def unmount(target: str) -> None:
    if _mounted_at(target) is None:
        return
    if _libc.umount2(target.encode(), 0):
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise GuestError(f"umount {target}: {os.strerror(err)}")
    log.info("unmounted %s", target)


def _mounted_at(target: str) -> tuple[str, str] | None:
    """(source, fstype) of the topmost mount on `target`, if any."""
    path = os.path.realpath(target)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == path:
                found = (_unescape(fields[0]), fields[2])
    return found


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field

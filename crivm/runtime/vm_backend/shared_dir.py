"""The pod's shared directory: what virtiofsd serves to the guest.

virtiofsd pivots into the directory inside a mount namespace of its own, copied when it
started, and makes that copy a slave of ours. So the directory is made a shared mount point
first (a bind mount onto itself, then MS_SHARED): every container rootfs or volume bound below
it later propagates into virtiofsd's copy, and so into the guest, and an unmount propagates
the same way.

Layout below the shared dir::

    pod/{hostname,hosts,resolv.conf}     the pod's files, bound into every container
    <container id>/rootfs                bind of the container's overlay rootfs
    <container id>/volumes/<n>           bind of the container's n-th CRI mount
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil

from crivm.errors import CrivmError

log = logging.getLogger(__name__)

_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_SHARED = 0x100000
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class SharedDirError(CrivmError):
    """A mount in a VM pod's shared directory failed."""


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        code = ctypes.get_errno()
        raise SharedDirError(f"mount {source} on {target} (flags {flags:#x}) failed: "
                             f"{os.strerror(code)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return  # not a mount point (any more)
    if code == errno.EBUSY and _libc.umount2(target.encode(), _MNT_DETACH) == 0:
        # Usual for a rootfs: virtiofsd still holds inodes of it until the guest forgets them.
        log.info("%s was busy; detached it lazily", target)
        return
    raise SharedDirError(f"umount {target} failed: {os.strerror(ctypes.get_errno() or code)}")


def make_shared_dir(path: str) -> None:
    """Create ``path`` as a shared mount point of its own."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    if not os.path.ismount(path):
        _mount(path, path, _MS_BIND)
    _mount("none", path, _MS_SHARED)


def remove_shared_dir(path: str) -> None:
    """Unmount everything below ``path``, then ``path`` itself, and delete it. Repeatable."""
    if not os.path.exists(path):
        return
    for mount_point in sorted(mounts_below(path), key=len, reverse=True):
        _umount(mount_point)
    _umount(path)
    shutil.rmtree(path, ignore_errors=True)


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path``, from /proc/self/mountinfo."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(point)
    return found


def bind(source: str, target: str, *, readonly: bool = False, directory: bool = True) -> None:
    """Bind ``source`` (recursively) onto ``target``, creating the mount point."""
    if directory:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if not os.path.exists(target):
            with open(target, "a", encoding="utf-8"):
                pass
    _mount(source, target, _MS_BIND | _MS_REC)
    # The bind inherits the shared propagation of the shared dir, which is what carries it
    # into virtiofsd; a volume must not send mounts made inside it back the other way.
    if readonly:
        _mount("none", target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)


async def bind_async(source: str, target: str, *, readonly: bool = False,
                     directory: bool = True) -> None:
    await asyncio.to_thread(bind, source, target, readonly=readonly, directory=directory)


async def unbind_tree(path: str) -> None:
    """Unmount every mount at or below ``path`` (deepest first) and delete ``path``."""
    def work() -> None:
        points = mounts_below(path)
        if os.path.ismount(path):
            points.append(path)
        for point in sorted(set(points), key=len, reverse=True):
            _umount(point)
        shutil.rmtree(path, ignore_errors=True)

    await asyncio.to_thread(work)

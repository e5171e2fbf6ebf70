"""Container root filesystems: an overlay of the image's layers with a per-container upper.

``<root>/storage/containers/<id>/{upper,work,merged}``; ``merged`` is the mounted rootfs. The
lower directories are named by their short links under ``<root>/storage/l/`` so that mount
options stay under the kernel's one-page limit for images with many layers; when even that is
too long, ``mount(8)`` runs with ``l/`` as its working directory and relative names.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from crivm.errors import CrivmError, InvalidArgument

log = logging.getLogger(__name__)

_CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The kernel copies at most one page of mount data.
_MAX_MOUNT_DATA = 4095
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class MountError(CrivmError):
    """mount(2) or umount(2) failed for a container rootfs."""


@dataclass(frozen=True)
class Rootfs:
    """A mounted container rootfs. ``path`` is what the OCI spec's root.path should name."""

    container_id: str
    image_id: str
    path: Path  # the merged overlay mount point
    upper: Path
    work: Path
    lowerdirs: tuple[Path, ...]  # top layer first, as overlayfs lists them


def check_container_id(container_id: str) -> str:
    if not _CONTAINER_ID_RE.fullmatch(container_id) or container_id in (".", ".."):
        raise InvalidArgument(f"container id {container_id!r} is not a safe directory name")
    return container_id


def container_dir(containers_dir: Path, container_id: str) -> Path:
    return containers_dir / check_container_id(container_id)


def layout(containers_dir: Path, container_id: str, image_id: str,
           lowerdirs: tuple[Path, ...]) -> Rootfs:
    base = container_dir(containers_dir, container_id)
    return Rootfs(container_id, image_id, base / "merged", base / "upper", base / "work",
                  lowerdirs)


async def mount_overlay(rootfs: Rootfs, links_dir: Path) -> None:
    for directory in (rootfs.upper, rootfs.work, rootfs.path):
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    if os.path.ismount(rootfs.path):
        return  # still mounted from before a daemon restart
    tail = f",upperdir={rootfs.upper},workdir={rootfs.work}"
    data = "lowerdir=" + ":".join(str(p) for p in rootfs.lowerdirs) + tail
    if len(data) <= _MAX_MOUNT_DATA:
        await asyncio.to_thread(_mount, str(rootfs.path), data)
        return
    relative = "lowerdir=" + ":".join(p.name for p in rootfs.lowerdirs) + tail
    if len(relative) > _MAX_MOUNT_DATA:
        raise MountError(
            f"container {rootfs.container_id}: image has too many layers "
            f"({len(rootfs.lowerdirs)}) for one overlay mount"
        )
    await _mount_relative(rootfs, relative, links_dir)


async def unmount(path: Path) -> None:
    # Most calls find nothing mounted (StopContainer unmounted it already): an lstat pair
    # here instead of a trip through the thread pool, which only a real umount needs (it
    # may wait for the overlay's dirty data).
    if not os.path.ismount(path):
        return
    await asyncio.to_thread(_umount, str(path))


def move_container_dir_aside(containers_dir: Path, container_id: str,
                             trash_dir: Path) -> Path | None:
    """Rename the container's dir into ``trash_dir`` (same filesystem) and return its new
    path, or None if there was none. One rename instead of deleting every file of the
    writable layer while the caller waits; the caller deletes the returned dir later."""
    base = container_dir(containers_dir, container_id)
    if os.path.ismount(base / "merged"):
        raise MountError(f"container {container_id}: rootfs is still mounted; not deleting")
    aside = trash_dir / f"removed-{container_id}-{os.urandom(4).hex()}"
    try:
        os.rename(base, aside)
    except FileNotFoundError:
        return None
    return aside


def _mount(target: str, data: str) -> None:
    result = _libc.mount(b"overlay", target.encode(), b"overlay", 0, data.encode())
    if result != 0:
        code = ctypes.get_errno()
        raise MountError(f"mount overlay on {target} failed: {os.strerror(code)} ({data})")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return  # not mounted (any more)
    if code == errno.EBUSY:
        log.warning("rootfs %s is busy; detaching it lazily", target)
        if _libc.umount2(target.encode(), _MNT_DETACH) == 0:
            return
        code = ctypes.get_errno()
    raise MountError(f"umount {target} failed: {os.strerror(code)}")


async def _mount_relative(rootfs: Rootfs, data: str, links_dir: Path) -> None:
    # mount(8) resolves the relative lowerdir names against its own working directory.
    process = await asyncio.create_subprocess_exec(
        "mount", "-t", "overlay", "overlay", "-o", data, str(rootfs.path),
        cwd=str(links_dir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise MountError(
            f"mount overlay on {rootfs.path} failed: {stderr.decode(errors='replace').strip()}"
        )

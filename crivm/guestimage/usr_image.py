"""The guest's /usr as a read-only ext4 image for virtio-pmem, and the boot initramfs beside it.

A pod VM booted from the whole initramfs copies every byte of it into guest RAM twice (the
archive, then the unpacked tree) and keeps the tree there for its life: about 25 MiB of host
memory per pod, for files that are the same in every pod. With ``/usr`` on a virtio-pmem device
instead, the guest mounts the image with DAX and reads it in place: its pages are the host's
page cache of this one file, shared by every pod, and never copied into guest RAM.

The boot initramfs then holds only what init needs before ``/usr`` is mounted: the busybox
binary and its applet links, the kernel modules, ``/etc`` and ``/init``. The image holds the
whole ``/usr`` (busybox and the modules again, so nothing vanishes under the mount).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from crivm.guestimage import cpio, debian
from crivm.guestimage.errors import GuestImageError

# The guest maps the device in 2 MiB sections (memory hotplug's granularity), so the image is
# sized in whole sections; ext4 with DAX needs its block size to be the page size.
ALIGN_BYTES = 2 << 20
BLOCK_SIZE = 4096
# Fixed so that equal trees give equal images (mke2fs would pick random ones).
FS_UUID = "7c1b4c5e-2f0e-4d53-9a39-6b0b8f7f2a10"
HASH_SEED = "2d3e1f61-0c55-4b1e-8f6a-3f1a9d0e5c42"
LABEL = "crivm-usr"
_TIMES = ("atime", "mtime", "ctime")

_BOOT_USR_FILES = ("usr/bin/busybox",)
_BOOT_USR_DIRS = ("usr/lib/modules/",)


def boot_entries(entries: list[cpio.Entry]) -> list[cpio.Entry]:
    """The part of the full initramfs that init needs before it mounts ``/usr``.

    Directories and symlinks stay (the applet links point at busybox; the mount point must
    exist), as does everything outside ``/usr``; inside it only busybox and the modules.
    """
    kept = []
    for entry in entries:
        kind = stat.S_IFMT(entry.mode)
        if (not entry.path.startswith("usr/") or kind != stat.S_IFREG
                or entry.path in _BOOT_USR_FILES or entry.path.startswith(_BOOT_USR_DIRS)):
            kept.append(entry)
    return kept


def image_bytes(blocks: int, inodes: int) -> int:
    """Room for ``blocks`` 4 KiB blocks of file data, ``inodes`` inodes and ext4's own
    metadata, rounded up to whole 2 MiB sections."""
    # Directories take a block each (counted with the inodes); inode tables 256 bytes per inode
    # with headroom; 10% more for block bitmaps, group descriptors and extent trees.
    data = (blocks + inodes // 4 + 64) * BLOCK_SIZE
    total = int(data * 1.1) + 2 * inodes * 256 + (1 << 20)
    return -(-total // ALIGN_BYTES) * ALIGN_BYTES


def _prepare(tree: Path, tmp: Path, script: Path) -> tuple[int, int]:
    """Count ``tree``'s inodes and data blocks, create the image file at its size, and write
    ``script``: the debugfs commands that date every inode to the epoch once mkfs has copied
    the tree. mkfs -d takes each inode's times from the tree, where reading a directory moves
    its atime and the kernel sets every ctime to now, so only the image itself can be dated.
    Returns (size, inodes for mkfs)."""
    blocks = inodes = 0
    paths = ["/"]
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            inodes += 1
            paths.append("/" + os.path.relpath(path, tree))
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                blocks += -(-st.st_size // BLOCK_SIZE)
    script.write_text("".join(f'set_inode_field "{path}" {field} 0\n'
                              for path in paths for field in _TIMES))
    size = image_bytes(blocks, inodes)
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as out:
        out.truncate(size)
    # mkfs's inode count: the entries, the root, and room for ext4's reserved inodes.
    return size, inodes + 1 + 64


async def write_image(tree: Path, dest: Path) -> int:
    """Write ``tree`` (the guest's ``/usr``) as an ext4 image at ``dest``; returns its size."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    script = dest.with_name(f".{dest.name}.debugfs")
    size, inodes = await asyncio.to_thread(_prepare, tree, tmp, script)
    try:
        await debian.run_tool(
            "mkfs.ext4", "-q", "-F", "-b", str(BLOCK_SIZE), "-N", str(inodes),
            "-m", "0", "-L", LABEL, "-U", FS_UUID,
            # No journal (it is never written), no room to grow, no lazy init left for later.
            "-O", "^has_journal,^resize_inode",
            "-E", f"root_owner=0:0,hash_seed={HASH_SEED},lazy_itable_init=0,nodiscard",
            "-d", str(tree), str(tmp),
            # The superblock's times and each inode's creation time.
            env={"E2FSPROGS_FAKE_TIME": "1", "SOURCE_DATE_EPOCH": "1"},
        )
        await debian.run_tool("debugfs", "-w", "-f", str(script), str(tmp),
                              env={"E2FSPROGS_FAKE_TIME": "1"})
    except GuestImageError:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        script.unlink(missing_ok=True)
    written = tmp.stat().st_size
    if written != size:
        tmp.unlink(missing_ok=True)
        raise GuestImageError(f"mkfs.ext4 left {tmp} at {written} bytes, not {size}")
    os.replace(tmp, dest)
    return size

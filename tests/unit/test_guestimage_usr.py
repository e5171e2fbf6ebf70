"""The guest's /usr image (mkfs.ext4, run for real) and the boot initramfs beside it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from crivm.guestimage import cpio, usr_image
from crivm.guestimage.errors import GuestImageError


def _tree(root: Path) -> Path:
    usr = root / "usr"
    (usr / "bin").mkdir(parents=True)
    (usr / "bin/busybox").write_bytes(b"\x7fELF busybox")
    os.chmod(usr / "bin/busybox", 0o755)
    (usr / "bin/sh").symlink_to("busybox")
    (usr / "bin/python3").symlink_to("python3.11")
    (usr / "bin/python3.11").write_bytes(os.urandom(300_000))
    (usr / "lib/modules/6.1/kernel").mkdir(parents=True)
    (usr / "lib/modules/6.1/kernel/virtio_pmem.ko").write_bytes(b"module")
    (usr / "lib/python3.11/asyncio").mkdir(parents=True)
    (usr / "lib/python3.11/asyncio/__init__.pyc").write_bytes(b"pyc" * 1000)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("crivm\n")
    (root / "init").write_text("#!/bin/sh\n")
    return usr


def test_boot_initramfs_keeps_what_init_needs_before_usr(tmp_path: Path) -> None:
    _tree(tmp_path)
    kept = {e.path: e for e in usr_image.boot_entries(cpio.entries_from_tree(tmp_path))}
    assert {"init", "etc/hostname", "usr/bin/busybox", "usr/bin/sh",
            "usr/lib/modules/6.1/kernel/virtio_pmem.ko"} <= set(kept)
    # Directories stay as mount points; a symlink into the image is harmless before the mount.
    assert stat.S_ISDIR(kept["usr/lib/python3.11"].mode)
    assert "usr/bin/python3" in kept
    assert "usr/bin/python3.11" not in kept
    assert "usr/lib/python3.11/asyncio/__init__.pyc" not in kept


def _debugfs(image: Path, request: str) -> bytes:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          check=True, timeout=30).stdout


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_usr_image_is_a_reproducible_ext4_of_the_tree(tmp_path: Path) -> None:
    usr = _tree(tmp_path / "a")
    first, second = tmp_path / "one.img", tmp_path / "two.img"
    size = asyncio.run(usr_image.write_image(usr, first))
    assert size == first.stat().st_size
    assert size % usr_image.ALIGN_BYTES == 0
    assert size >= 300_000 + 2**20
    assert not list(tmp_path.glob(".*.tmp"))
    # The same tree (copied, so with other times and inode numbers) gives the same bytes, also
    # a second later: mkfs -d copies each file's ctime, which no one can set back.
    other = tmp_path / "b"
    shutil.copytree(tmp_path / "a", other, symlinks=True)
    time.sleep(1.1)
    asyncio.run(usr_image.write_image(other / "usr", second))
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]

    subprocess.run(["e2fsck", "-fn", str(first)], capture_output=True, check=True, timeout=30)
    python = _debugfs(first, "cat /bin/python3.11")
    assert python == (usr / "bin/python3.11").read_bytes()
    assert b"python3.11" in _debugfs(first, "stat /bin/python3")
    header = subprocess.run(["dumpe2fs", "-h", str(first)], capture_output=True, text=True,
                            check=True, timeout=30).stdout
    assert "Block size:               4096" in header  # DAX needs page-sized blocks
    assert "has_journal" not in header


def test_usr_image_of_a_tree_too_big_for_its_estimate_fails_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs e2fsprogs")
    usr = _tree(tmp_path)
    monkeypatch.setattr(usr_image, "image_bytes",
                        lambda blocks, inodes: usr_image.ALIGN_BYTES // 8)
    dest = tmp_path / "usr.img"
    with pytest.raises(GuestImageError, match="^mkfs.ext4 .* failed"):
        asyncio.run(usr_image.write_image(usr, dest))
    assert not dest.exists()
    assert not list(tmp_path.glob(".*.tmp"))

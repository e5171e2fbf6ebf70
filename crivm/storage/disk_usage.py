"""Bytes and inodes used under some directories, for ImageFsInfo.

Counts like du(1): allocated blocks, each inode once however many hard links it has, never
crossing into another filesystem (a container's merged overlay is a mount below its dir).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FsUsage:
    mountpoint: str  # the directory the numbers describe (CRI FilesystemIdentifier)
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


def measure(label: Path, roots: Iterable[Path]) -> FsUsage:
    seen: set[tuple[int, int]] = set()
    used = 0
    for root in roots:
        try:
            device = os.lstat(root).st_dev
        except FileNotFoundError:
            continue
        stack = [str(root)]
        while stack:
            path = stack.pop()
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue  # removed while we walked
            if info.st_dev != device or (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            used += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                try:
                    with os.scandir(path) as entries:
                        stack.extend(entry.path for entry in entries)
                except (FileNotFoundError, NotADirectoryError):
                    continue
    return FsUsage(str(label), used, len(seen), time.time_ns())

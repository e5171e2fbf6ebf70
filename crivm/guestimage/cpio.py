"""A reproducible newc ("070701") cpio writer for initramfs images.

Entries are written in sorted path order with fixed inode numbers, owner root and one mtime, so
the same tree always gives the same bytes. Directories come before their contents because the
kernel unpacker creates each entry in order.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_TRAILER = "TRAILER!!!"


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class Entry:
    """One archive member: ``data`` for regular files, ``target`` for symlinks, neither for dirs
    and device nodes."""

    path: str  # relative, no leading slash
    mode: int  # includes the file-type bits
    data: bytes = b""
    target: str = ""
    rdev_major: int = 0
    rdev_minor: int = 0


def entries_from_tree(root: Path) -> list[Entry]:
    """Every file, directory and symlink under ``root``, with permissions kept and owner dropped."""
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            full = base / name
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, stat.S_IFLNK | 0o777, target=os.readlink(full)))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                entries.append(Entry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode),
                                     data=full.read_bytes()))
            # sockets and fifos never belong in an image; skip them silently
    return entries


def write_archive(out: Writer, entries: Iterable[Entry], mtime: int = 0) -> None:
    """Write ``entries`` (sorted here) followed by the trailer."""
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        body = entry.target.encode() if stat.S_ISLNK(entry.mode) else entry.data
        _write_member(out, entry.path, ino, entry.mode, body, mtime,
                      entry.rdev_major, entry.rdev_minor)
    _write_member(out, _TRAILER, 0, 0, b"", 0, 0, 0)


def _write_member(out: Writer, name: str, ino: int, mode: int, body: bytes, mtime: int,
                  rdev_major: int, rdev_minor: int) -> None:
    name_bytes = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, mtime, len(body), 0, 0, rdev_major, rdev_minor,
              len(name_bytes), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header)
    out.write(name_bytes)
    out.write(b"\0" * _pad4(len(header) + len(name_bytes)))
    out.write(body)
    out.write(b"\0" * _pad4(len(body)))


def _pad4(length: int) -> int:
    return (4 - length % 4) % 4

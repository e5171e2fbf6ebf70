"""Memory of a daemon and of its per-container helpers (containerd shims, conmon), from /proc.

RSS counts every resident page a process maps, shared ones in full; PSS splits shared pages
between the processes that map them, so summing PSS over many helpers is not inflated by
the pages they share.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    name: str
    rss_kib: int
    pss_kib: int


@dataclass(frozen=True)
class GroupMemory:
    """A set of processes, e.g. all conmons of one daemon."""

    count: int
    rss_kib: int
    pss_kib: int

    @staticmethod
    def of(members: Iterable[ProcessMemory]) -> GroupMemory:
        listed = list(members)
        return GroupMemory(len(listed), sum(m.rss_kib for m in listed),
                           sum(m.pss_kib for m in listed))


def _field_kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def process_memory(pid: int) -> ProcessMemory | None:
    """RSS and PSS of one process, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    name = _field_kib_name(status)
    return ProcessMemory(pid, name, _field_kib(status, "VmRSS:"), _field_kib(rollup, "Pss:"))


def _field_kib_name(status: str) -> str:
    for line in status.splitlines():
        if line.startswith("Name:"):
            return line.split(maxsplit=1)[1].strip()
    return "?"


def processes_mentioning(marker: str, exe_name: str | None = None) -> list[int]:
    """Pids whose command line contains ``marker`` (and whose comm is ``exe_name``)."""
    needle = marker.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            comm = Path(entry.path, "comm").read_text().strip() if exe_name else ""
        except OSError:
            continue
        if needle in cmdline and (exe_name is None or comm == exe_name[:15]):
            found.append(int(entry.name))
    return found


def group_memory(pids: Iterable[int]) -> GroupMemory:
    return GroupMemory.of(m for m in (process_memory(pid) for pid in pids) if m is not None)

"""page_out on a real process that maps a real file, as QEMU maps a guest's initramfs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crivm.hypervisor.qemu import page_out

MAPS = """\
55d0c0a00000-55d0c0b00000 r--p 00000000 fd:01 1234   /usr/bin/qemu-system-x86_64
7f0000000000-7f0000b80000 r--p 00000000 fd:01 99     /var/lib/crivm/guest/initrd.img
7f0000c00000-7f0000c01000 rw-p 00000000 00:00 0
7f0001000000-7f0001001000 r--p 00000000 fd:01 98     /var/lib/crivm/guest/initrd.img.old
7f0002000000-7f0002002000 r--p 00b80000 fd:01 99     /var/lib/crivm/guest/initrd.img
"""


def test_file_ranges_match_the_exact_path() -> None:
    assert page_out.file_ranges(MAPS, "/var/lib/crivm/guest/initrd.img") == [
        (0x7F0000000000, 0xB80000), (0x7F0002000000, 0x2000)]
    assert page_out.file_ranges(MAPS, "/nothing") == []


def resident_kib(pid: int, path: str) -> int:
    total, current = 0, ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                current = line.split()[-1]
            elif line.startswith("Rss:") and current == path:
                total += int(line.split()[1])
    return total


@pytest.fixture
def mapper(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A process that maps an 8 MiB file and reads every page, then waits."""
    blob = tmp_path / "initrd.img"
    blob.write_bytes(os.urandom(8 << 20))
    script = (
        "import mmap, sys\n"
        f"f = open({str(blob)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "sum(m[i] for i in range(0, len(m), 4096))\n"
        "print('mapped', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "mapped"
        yield child.pid, str(blob)
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="process_madvise on another process needs root")
def test_page_out_reclaims_the_mapped_file(mapper: tuple[int, str]) -> None:
    pid, path = mapper
    assert resident_kib(pid, path) >= 8 * 1024 - 64
    assert page_out.page_out_file(pid, path) == 8 << 20
    # Pages some other process maps too would stay; nothing else maps this file.
    assert resident_kib(pid, path) < 1024


def test_page_out_of_an_unmapped_file_or_a_gone_process_is_zero(
        mapper: tuple[int, str], tmp_path: Path) -> None:
    pid, _ = mapper
    assert page_out.page_out_file(pid, str(tmp_path / "other")) == 0
    assert page_out.page_out_file(2**22 + 12345, "/anything") == 0

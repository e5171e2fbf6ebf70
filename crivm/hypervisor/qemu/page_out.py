"""Give back the host pages of a file that a running QEMU maps but no longer reads.

QEMU maps the ``-initrd`` file for the VM's whole life (it copies it into guest RAM again only if
the guest resets), so after boot every byte of the initramfs sits in each pod's QEMU as
resident, file-backed memory: 11.5 MiB per pod with the lz4 guest image, all of it counted in
the pod's PSS when it is the only VM on that image. ``process_madvise(MADV_PAGEOUT)`` on those
ranges makes the kernel reclaim the clean pages from the QEMU process; a guest reset simply
faults them in again from the file. Pages that another process maps too are left alone by the
kernel, so pods on the same image keep sharing what they share.

Linux 5.10 or later; the caller needs the right to ptrace QEMU (root does).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable

from crivm.errors import CrivmError

log = logging.getLogger(__name__)

_SYS_PROCESS_MADVISE = 440  # x86_64
_MADV_PAGEOUT = 21
# The kernel takes at most UIO_MAXIOV ranges per call.
_MAX_RANGES = 1024


class PageOutError(CrivmError):
    """The kernel refused to page out a process's mapping (old kernel, no permission)."""


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def file_ranges(maps_text: str, path: str) -> list[tuple[int, int]]:
    """(start, length) of every mapping of ``path`` in the text of a /proc/<pid>/maps."""
    ranges = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == path:
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16) - int(start, 16)))
    return ranges


def _process_madvise(pidfd: int, ranges: Iterable[tuple[int, int]], advice: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    done = 0
    batch = list(ranges)
    for first in range(0, len(batch), _MAX_RANGES):
        chunk = batch[first:first + _MAX_RANGES]
        vec = (_IoVec * len(chunk))(*(_IoVec(start, length) for start, length in chunk))
        result = libc.syscall(ctypes.c_long(_SYS_PROCESS_MADVISE), ctypes.c_int(pidfd), vec,
                              ctypes.c_size_t(len(chunk)), ctypes.c_int(advice),
                              ctypes.c_uint(0))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        done += result
    return done


def page_out_file(pid: int, path: str) -> int:
    """Ask the kernel to reclaim process ``pid``'s pages of ``path``; returns the bytes advised.

    0 when the process does not map the file (or is gone).
    """
    real = os.path.realpath(path)
    try:
        with open(f"/proc/{pid}/maps") as maps:
            ranges = file_ranges(maps.read(), real)
    except (FileNotFoundError, ProcessLookupError):
        return 0
    if not ranges:
        return 0
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    except OSError as exc:
        raise PageOutError(f"cannot open process {pid}: {exc.strerror}") from exc
    try:
        advised = _process_madvise(pidfd, ranges, _MADV_PAGEOUT)
    except OSError as exc:
        raise PageOutError(f"process_madvise(MADV_PAGEOUT) on {real} in process {pid}: "
                           f"{exc.strerror}") from exc
    finally:
        os.close(pidfd)
    log.debug("paged out %d KiB of %s from process %d", advised // 1024, real, pid)
    return advised

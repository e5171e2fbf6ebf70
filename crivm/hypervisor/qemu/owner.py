"""Tie a child process's life to its owner's: the argv prefix that sets PR_SET_PDEATHSIG.

``setpriv --pdeathsig KILL`` (util-linux) sets the signal and execs the real program, so QEMU or
virtiofsd gets SIGKILL when the process that started it dies. This avoids ``preexec_fn``, which
is unsafe in a process that has threads (grpc's), and needs no helper of our own.

Two limits, both on purpose:
- The kernel sends the signal when the *thread* that forked the child exits. crivm forks from
  the event-loop thread, which lives as long as the process.
- The owner is whoever calls ``launch``. VM pods must outlive a daemon restart, so the vm backend
  should launch each VM from a per-pod owner process (a small supervisor, like conmon for a
  container) rather than from the daemon. Then a daemon restart leaves the VM running, while a
  dead supervisor still leaves no orphaned qemu behind.
"""

from __future__ import annotations

import contextlib
import os

# A path as the caller has it; these modules stay free of pathlib, which costs each pod's
# supervisor ~0.6 MiB PSS (with urllib.parse, ipaddress and fnmatch that it imports).
StrPath = str | os.PathLike[str]

SETPRIV = "/usr/bin/setpriv"


def die_with_owner(argv: list[str], setpriv: str = SETPRIV) -> list[str]:
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


def remove_socket(path: StrPath) -> None:
    """Remove a child's unix socket (a stale one before the start, or after the stop); a path
    already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def open_log(path: StrPath) -> int:
    """An append-only fd for a child's stdout/stderr; the caller closes it after the spawn."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


def set_priority(pid: int, nice: int, group_nice: int | None = None) -> None:
    """Every thread of ``pid`` at ``nice``, and its session's autogroup at ``group_nice``
    (default: ``nice``).

    QEMU and virtiofsd start sessions of their own, and with autogroup on (the default on
    Debian) the scheduler weighs sessions against each other by their autogroup's nice, not
    their threads': a thread's nice only ranks it within its session. A process or thread
    that is gone meanwhile is fine, and so is a kernel without autogroup.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as autogroup:
        autogroup.write(str(nice if group_nice is None else group_nice))

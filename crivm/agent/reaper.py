"""Exit statuses of the container processes that the agent adopts as a child subreaper.

runc runs detached: `runc create` and `runc exec --detach` exit as soon as the process runs, and
the kernel hands the orphan to the nearest subreaper, the agent. Only the agent can then collect
its exit status. The reaper waits for the pids it is told about, and only those: asyncio
collects the runc invocations themselves, and a wait on any pid would steal their statuses.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36

# Exit code reported when a status is lost (the pid was not ours and is gone).
UNKNOWN_EXIT = 255

# A safety net next to SIGCHLD: signals coalesce, and a pid can become our child after its
# SIGCHLD was delivered to its first parent.
_POLL_INTERVAL = 1.0


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_code_of(wait_status: int) -> tuple[int, int]:
    """(exit code, signal) in shell convention: a signal death is 128 + signal."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, sig
    return os.waitstatus_to_exitcode(wait_status), 0


class Reaper:
    def __init__(self) -> None:
        self._watched: dict[int, asyncio.Future[int]] = {}
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.collect)
        self._poller = asyncio.create_task(self._poll(), name="reaper-poll")

    async def stop(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for the wait status of `pid`, which is or will become the agent's child."""
        future = self._watched.get(pid)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._watched[pid] = future
            self._try_reap(pid)
        return future

    def collect(self) -> None:
        for pid in list(self._watched):
            self._try_reap(pid)

    def _try_reap(self, pid: int) -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child: still the child of a runc that has not exited yet, or gone
            # without us ever becoming its parent.
            if not os.path.exists(f"/proc/{pid}"):
                log.warning("pid %d exited without being reaped here; status unknown", pid)
                self._resolve(pid, UNKNOWN_EXIT << 8)
            return
        if reaped == pid:
            self._resolve(pid, status)

    def _resolve(self, pid: int, status: int) -> None:
        future = self._watched.pop(pid)
        if not future.done():
            future.set_result(status)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            self.collect()

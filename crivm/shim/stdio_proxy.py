"""The shim: the host process that stands in for one process in the guest.

conmon watches this process as if it were the container: it reads our stdout and stderr (or
our terminal), writes our stdin, and records our exit code. So the shim copies the guest
process's output from the agent to its own fds, its own stdin to the agent, forwards the
signals it gets, and exits with the guest process's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from crivm.errors import CrivmError
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim.console import window_size

log = logging.getLogger(__name__)

# Exit code when the VM went away under the process: like a SIGKILL.
LOST_EXIT_CODE = 137
# After the process exits, how long its remaining output may take to arrive.
DRAIN_TIMEOUT_S = 10.0
READ_CHUNK = 32 * 1024
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)


@dataclass(frozen=True)
class ShimTarget:
    agent_socket: str
    container_id: str
    exec_id: str  # "" for the container's init process
    terminal: bool
    stdin: bool
    # Where to mark an OOM kill in the guest for the daemon, as conmon would; "" for none.
    oom_file: str = ""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            # The reader is behind; a short blocking wait is fine for a process of our own.
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


async def _pump_out(chunks: AsyncIterator[bytes], fd: int) -> None:
    try:
        async for chunk in chunks:
            try:
                _write_all(fd, chunk)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EIO):
                    return  # conmon closed our output; keep draining nothing
                raise
    except CrivmError as exc:
        log.warning("output stream ended: %s", exc)


async def _pump_in(agent: AgentClient, target: ShimTarget, fd: int) -> None:
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    os.set_blocking(fd, False)
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: the terminal's other side hung up
                    raise
                data = b""
            if not data:
                if not target.terminal:
                    await agent.close_stdin(target.container_id, target.exec_id)
                return
            await agent.write_stdin(target.container_id, target.exec_id, data)
    finally:
        loop.remove_reader(fd)


class Shim:
    def __init__(self, target: ShimTarget, stdin_fd: int = 0, stdout_fd: int = 1,
                 stderr_fd: int = 2) -> None:
        self.target = target
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.agent = AgentClient(target.agent_socket)

    async def _forward(self, signum: int) -> None:
        t = self.target
        with contextlib.suppress(CrivmError):
            if signum == signal.SIGWINCH:
                rows, columns = window_size(self.stdout_fd)
                if rows and columns:
                    await self.agent.resize_tty(t.container_id, t.exec_id, rows, columns)
                return
            await self.agent.signal_process(t.container_id, t.exec_id, signum)

    async def run(self) -> int:
        t = self.target
        loop = asyncio.get_running_loop()
        background: set[asyncio.Task[None]] = set()

        def on_signal(signum: int) -> None:
            task = asyncio.create_task(self._forward(signum))
            background.add(task)
            task.add_done_callback(background.discard)

        signals = (*FORWARDED_SIGNALS, signal.SIGWINCH) if t.terminal else FORWARDED_SIGNALS
        for signum in signals:
            loop.add_signal_handler(signum, on_signal, signum)
        pumps = [asyncio.create_task(_pump_out(
            self.agent.read_stdout(t.container_id, t.exec_id), self.stdout_fd))]
        if not t.terminal:
            pumps.append(asyncio.create_task(_pump_out(
                self.agent.read_stderr(t.container_id, t.exec_id), self.stderr_fd)))
        stdin_task = None
        if t.stdin or t.terminal:
            stdin_task = asyncio.create_task(_pump_in(self.agent, t, self.stdin_fd))
        if t.terminal:
            on_signal(signal.SIGWINCH)
        try:
            reply = await self.agent.wait_process_reply(t.container_id, t.exec_id)
            code = reply.exit_code
            if reply.oom_killed and t.oom_file:
                _mark_oom(t.oom_file)
        except CrivmError as exc:
            print(f"crivm-shim: lost the process in the VM: {exc}", file=sys.stderr)
            code = LOST_EXIT_CODE
        done, pending = await asyncio.wait(pumps, timeout=DRAIN_TIMEOUT_S)
        for task in [*pending, *([stdin_task] if stdin_task else [])]:
            task.cancel()
        await asyncio.gather(*pumps, *([stdin_task] if stdin_task else []),
                             return_exceptions=True)
        with contextlib.suppress(CrivmError):
            await self.agent.close()
        return code


def _mark_oom(path: str) -> None:
    """Create the empty marker conmon creates; it must exist before we exit, since conmon
    writes the exit file as soon as we do and status reads both together."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as exc:
        print(f"crivm-shim: cannot mark the OOM kill in {path}: {exc.strerror}", file=sys.stderr)


def run_shim(target: ShimTarget) -> int:
    """Run the shim to the end; returns the exit code to exit with."""
    return asyncio.run(Shim(target).run())

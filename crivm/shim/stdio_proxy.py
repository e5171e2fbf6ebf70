"""Relays one guest process's stdio between host fds and the agent, and reports its exit.

The fds are the ones conmon (or the daemon, for an exec) gave the process's stand-in on the
host (``crivm.shim.standin``), handed to the pod's supervisor: the relay copies the guest
process's output from the agent to them, their input to the agent, forwards the signals the
stand-in got, and returns the exit code the stand-in must exit with. Many relays share one
event loop and one agent connection in the supervisor, so nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from crivm.errors import CrivmError
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim.console import window_size
from crivm.shim.standin import LOST_EXIT_CODE

log = logging.getLogger(__name__)

# After the process exits, how long its remaining output may take to arrive.
DRAIN_TIMEOUT_S = 10.0
READ_CHUNK = 32 * 1024


@dataclass(frozen=True)
class RelayTarget:
    container_id: str
    exec_id: str  # "" for the container's init process
    terminal: bool
    stdin: bool
    # Where to mark an OOM kill in the guest for the daemon, as conmon would; "" for none.
    oom_file: str = ""


@dataclass(frozen=True)
class HostStdio:
    """The stand-in's stdio; with a terminal all three are the host pty's slave."""

    stdin: int
    stdout: int
    stderr: int


async def _ready(fd: int, writing: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = (loop.add_writer, loop.remove_writer) if writing else (
        loop.add_reader, loop.remove_reader)
    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            await _ready(fd, writing=True)  # the reader is behind: wait for it, not the loop
            continue
        view = view[written:]


async def _pump_out(chunks: AsyncIterator[bytes], fd: int) -> None:
    try:
        async for chunk in chunks:
            try:
                await _write_all(fd, chunk)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EIO):
                    return  # conmon closed our output; keep draining nothing
                raise
    except CrivmError as exc:
        log.warning("output stream ended: %s", exc)


async def _pump_in(agent: AgentClient, target: RelayTarget, fd: int) -> None:
    while True:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            await _ready(fd, writing=False)
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


class StdioRelay:
    """One guest process's stdio and exit, for as long as it runs."""

    def __init__(self, agent: AgentClient, target: RelayTarget, stdio: HostStdio) -> None:
        self.agent = agent
        self.target = target
        self.stdio = stdio
        self._forwarding: set[asyncio.Task[None]] = set()

    def fds_in_use(self) -> set[int]:
        """The host fds this relay reads or writes; the others it never touches."""
        if self.target.terminal:
            return {self.stdio.stdin, self.stdio.stdout}
        used = {self.stdio.stdout, self.stdio.stderr}
        if self.target.stdin:
            used.add(self.stdio.stdin)
        return used

    def forward(self, signum: int) -> None:
        """Pass a signal the stand-in got to the guest process (SIGWINCH: the new size)."""
        task = asyncio.create_task(self._forward(signum))
        self._forwarding.add(task)
        task.add_done_callback(self._forwarding.discard)

    async def _forward(self, signum: int) -> None:
        t = self.target
        with contextlib.suppress(CrivmError):
            if signum == signal.SIGWINCH:
                if not t.terminal:
                    return
                rows, columns = window_size(self.stdio.stdout)
                if rows and columns:
                    await self.agent.resize_tty(t.container_id, t.exec_id, rows, columns)
                return
            await self.agent.signal_process(t.container_id, t.exec_id, signum)

    async def run(self) -> int:
        """Relay until the process exits and its output is drained; returns its exit code."""
        t, agent = self.target, self.agent
        for fd in self.fds_in_use():
            os.set_blocking(fd, False)
        pumps = [asyncio.create_task(_pump_out(
            agent.read_stdout(t.container_id, t.exec_id), self.stdio.stdout))]
        if not t.terminal:
            pumps.append(asyncio.create_task(_pump_out(
                agent.read_stderr(t.container_id, t.exec_id), self.stdio.stderr)))
        stdin_task = None
        if t.stdin or t.terminal:
            stdin_task = asyncio.create_task(_pump_in(agent, t, self.stdio.stdin))
        if t.terminal:
            self.forward(signal.SIGWINCH)
        tasks = [*pumps, *([stdin_task] if stdin_task else [])]
        try:
            reply = await agent.wait_process_reply(t.container_id, t.exec_id)
        except CrivmError as exc:
            self._say(f"lost the process in the VM: {exc}")
            await self._finish(pumps, tasks, DRAIN_TIMEOUT_S)
            return LOST_EXIT_CODE
        except asyncio.CancelledError:
            # The stand-in went away: nobody reads the rest of the output.
            await self._finish(pumps, tasks, 0)
            raise
        if reply.oom_killed and t.oom_file:
            self._mark_oom(t.oom_file)
        await self._finish(pumps, tasks, DRAIN_TIMEOUT_S)
        return reply.exit_code

    async def _finish(self, pumps: list[asyncio.Task[None]], tasks: list[asyncio.Task[None]],
                      drain_s: float) -> None:
        """Give the output pumps ``drain_s`` to copy what is left, then stop every task."""
        if drain_s > 0:
            await asyncio.wait(pumps, timeout=drain_s)
        left = [*tasks, *self._forwarding]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    def _say(self, text: str) -> None:
        """A word from the shim on the process's stderr, as the old in-process shim printed."""
        with contextlib.suppress(OSError):
            os.write(self.stdio.stderr, f"crivm-shim: {text}\n".encode())

    def _mark_oom(self, path: str) -> None:
        """Create the empty marker conmon creates; it must exist before the stand-in exits,
        since conmon writes the exit file as soon as it does and status reads both together."""
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError as exc:
            self._say(f"cannot mark the OOM kill in {path}: {exc.strerror}")

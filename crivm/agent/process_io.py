"""Wiring a new process's stdio: pipes, or a pty whose master runc hands over a console socket."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass

from crivm.agent.errors import FailedPrecondition, GuestError
from crivm.agent.runc import Stdio
from crivm.agent.stdio import InputPipe, OutputBuffer

_CONSOLE_TIMEOUT = 5.0


@dataclass
class ProcessIO:
    """The agent's ends of a process's stdio."""

    stdin: InputPipe | None
    stdout: OutputBuffer
    stderr: OutputBuffer
    tty_master: int | None = None

    def resize(self, rows: int, columns: int) -> None:
        if self.tty_master is None or self.stdout.at_eof:
            raise FailedPrecondition("the process has no terminal")
        size = struct.pack("HHHH", rows, columns, 0, 0)
        try:
            fcntl.ioctl(self.tty_master, termios.TIOCSWINSZ, size)
        except OSError as exc:
            raise GuestError(f"resizing the terminal: {exc}") from exc

    async def close_stdin(self) -> None:
        if self.stdin is None or self.stdin.closed:
            return
        if self.tty_master is not None:
            # A pty has no half-close; end-of-file is the terminal's EOF character (^D).
            with contextlib.suppress(OSError):
                await self.stdin.write(b"\x04")
        self.stdin.close()

    def close(self) -> None:
        if self.stdin is not None:
            self.stdin.close()
        self.stdout.close()
        self.stderr.close()
        self.tty_master = None


@contextlib.asynccontextmanager
async def pipes(name: str, with_stdin: bool) -> AsyncIterator[tuple[Stdio, ProcessIO]]:
    """Pipes for runc to pass through to the process. The runc ends close when the block ends.

    If the block raises, the agent's ends close too.
    """
    runc_ends: list[int] = []
    agent_ends: list[int] = []
    try:
        if with_stdin:
            stdin_r, stdin_w = os.pipe()
            runc_ends.append(stdin_r)
            agent_ends.append(stdin_w)
        else:
            stdin_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            runc_ends.append(stdin_r)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        runc_ends += [out_w, err_w]
        agent_ends += [out_r, err_r]
        io = ProcessIO(
            stdin=InputPipe(stdin_w, f"{name} stdin") if with_stdin else None,
            stdout=OutputBuffer(out_r, f"{name} stdout"),
            stderr=OutputBuffer(err_r, f"{name} stderr"),
        )
    except BaseException:
        for fd in runc_ends + agent_ends:
            os.close(fd)
        raise
    try:
        yield Stdio(stdin_r, out_w, err_w), io
    except BaseException:
        io.close()
        raise
    finally:
        for fd in runc_ends:
            os.close(fd)


@contextlib.asynccontextmanager
async def console(
    name: str, socket_path: str
) -> AsyncIterator[tuple[Stdio, str, asyncio.Future[ProcessIO]]]:
    """A console socket for runc --console-socket, and the ProcessIO built from the pty master.

    runc connects and sends the master fd before `runc create`/`runc exec` returns, so the
    future is ready once runc has succeeded.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    loop = asyncio.get_running_loop()
    received: asyncio.Future[ProcessIO] = loop.create_future()
    try:
        listener.bind(socket_path)
        listener.listen(1)
        listener.setblocking(False)
        receiving = asyncio.create_task(_receive_master(loop, listener, name, received))
        try:
            yield Stdio(devnull, devnull, devnull), socket_path, received
            await asyncio.wait_for(asyncio.shield(receiving), _CONSOLE_TIMEOUT)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
    except TimeoutError as exc:
        raise GuestError(f"{name}: runc sent no terminal in {_CONSOLE_TIMEOUT:.0f} s") from exc
    except BaseException:
        if received.done() and not received.cancelled() and received.exception() is None:
            received.result().close()
        raise
    finally:
        os.close(devnull)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


async def _receive_master(
    loop: asyncio.AbstractEventLoop,
    listener: socket.socket,
    name: str,
    received: asyncio.Future[ProcessIO],
) -> None:
    conn, _ = await loop.sock_accept(listener)
    with conn:
        conn.setblocking(True)
        conn.settimeout(_CONSOLE_TIMEOUT)
        # runc sends the fd right after connecting, so this blocks only briefly.
        _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
    if not fds:
        raise GuestError(f"{name}: runc connected to the console socket but sent no fd")
    master = fds[0]
    os.set_inheritable(master, False)
    received.set_result(
        ProcessIO(
            stdin=InputPipe(os.dup(master), f"{name} tty in"),
            stdout=OutputBuffer(master, f"{name} tty"),
            stderr=OutputBuffer(None, f"{name} stderr (tty)"),
            tty_master=master,
        )
    )

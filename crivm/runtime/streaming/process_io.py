"""Copying a session's streams to and from a child process: over pipes, or over a terminal.

Both the runc exec path and hosts of tests use these. A process is always killed and reaped
when the session is cancelled (the client hung up), so no process or fd outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import termios
from collections.abc import Awaitable, Callable

from crivm.runtime.streaming.backend import ByteSink, ByteSource, ResizeQueue, StreamClosed

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
# Output still arriving after the process exited comes from children that inherited its
# stdout; wait this long for it, then stop rather than hold the session open forever.
_DRAIN_AFTER_EXIT_S = 2.0
# With a tty, give the client this long to send the first terminal size before starting,
# so `stty size` in the command already sees it.
_FIRST_RESIZE_WAIT_S = 0.2
_EOT = b"\x04"


def exit_status(returncode: int) -> int:
    """A shell-style exit code: a process killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


async def copy_to_sink(reader: asyncio.StreamReader, sink: ByteSink | None) -> None:
    """Copy until EOF. A client that went away stops the copying but not the reading, so the
    process never blocks on a full pipe."""
    while chunk := await reader.read(READ_SIZE):
        if sink is None:
            continue
        try:
            await sink.write(chunk)
        except StreamClosed:
            sink = None


async def copy_from_source(source: ByteSource, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read():
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        writer.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the process closed its stdin; what the client still sends has nowhere to go


async def kill_and_reap(proc: asyncio.subprocess.Process, process_group: bool) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            if process_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        await proc.wait()


async def _finish(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_piped(
    proc_start: Awaitable[asyncio.subprocess.Process],
    stdin: ByteSource | None,
    stdout: ByteSink | None,
    stderr: ByteSink | None,
    process_group: bool = True,
) -> int:
    """Pump a process started with stdin/stdout/stderr pipes (or DEVNULL) until it exits."""
    proc = await proc_start
    outputs: list[asyncio.Task[None]] = []
    feeder: asyncio.Task[None] | None = None
    try:
        if proc.stdout is not None:
            outputs.append(asyncio.create_task(copy_to_sink(proc.stdout, stdout)))
        if proc.stderr is not None:
            outputs.append(asyncio.create_task(copy_to_sink(proc.stderr, stderr)))
        if proc.stdin is not None and stdin is not None:
            feeder = asyncio.create_task(copy_from_source(stdin, proc.stdin))
        returncode = await proc.wait()
        await _finish(outputs, _DRAIN_AFTER_EXIT_S)
        return exit_status(returncode)
    finally:
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        for task in outputs:
            task.cancel()
        await asyncio.gather(*outputs, return_exceptions=True)
        await kill_and_reap(proc, process_group)


def set_terminal_size(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def read_fd(fd: int) -> bytes:
    """One read from a non-blocking fd; ``b""`` at EOF, including a pty whose slave closed."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def write_fd(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
            view = view[written:]
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


async def _terminal_output(master: int, sink: ByteSink | None) -> None:
    while chunk := await read_fd(master):
        if sink is None:
            continue
        try:
            await sink.write(chunk)
        except StreamClosed:
            sink = None


async def _terminal_input(master: int, source: ByteSource) -> None:
    while chunk := await source.read():
        await write_fd(master, chunk)
    # The client closed stdin: a terminal has no half-close, so send end-of-transmission
    # as a keyboard would.
    await write_fd(master, _EOT)


async def _terminal_resizes(
    master: int, resize: ResizeQueue, on_resize: Callable[[], None] | None
) -> None:
    while (size := await resize.get()) is not None:
        with contextlib.suppress(OSError):
            set_terminal_size(master, size.width, size.height)
            if on_resize is not None:
                on_resize()


async def first_terminal_size(master: int, resize: ResizeQueue | None) -> None:
    """Apply the client's first terminal size if it arrives promptly."""
    if resize is None:
        return
    with contextlib.suppress(TimeoutError):
        size = await asyncio.wait_for(resize.get(), _FIRST_RESIZE_WAIT_S)
        if size is None:
            resize.put_nowait(None)
        else:
            set_terminal_size(master, size.width, size.height)


async def run_on_terminal(
    proc_start: Awaitable[asyncio.subprocess.Process],
    master: int,
    stdin: ByteSource | None,
    stdout: ByteSink | None,
    resize: ResizeQueue | None,
    process_group: bool = True,
    on_resize: Callable[[], None] | None = None,
) -> int:
    """Pump a process whose terminal's master side is ``master`` (owned and closed here).
    ``on_resize`` runs after each resize, for a process that must be told about it."""
    os.set_blocking(master, False)
    tasks: list[asyncio.Task[None]] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await proc_start
        output = asyncio.create_task(_terminal_output(master, stdout))
        tasks.append(output)
        if stdin is not None:
            tasks.append(asyncio.create_task(_terminal_input(master, stdin)))
        if resize is not None:
            tasks.append(asyncio.create_task(_terminal_resizes(master, resize, on_resize)))
        returncode = await proc.wait()
        await _finish([output], _DRAIN_AFTER_EXIT_S)
        return exit_status(returncode)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if proc is not None:
            await kill_and_reap(proc, process_group)
        os.close(master)

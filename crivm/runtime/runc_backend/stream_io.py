"""Streaming exec and attach for runc containers (behind kubectl exec / attach).

Exec runs ``runc exec`` in the foreground, so its exit status is the process's. Without a tty
the process gets our pipes. With a tty, runc makes the terminal inside the container; how its
other end reaches us depends on the runtime:

- runc refuses ``--console-socket`` unless it detaches, and a detached exec's exit code is
  lost. So runc gets a pty of ours as its stdio: it copies between that and the container's
  terminal, sizes the container's terminal from ours at start, and again on SIGWINCH.
- crivm-shim (``OciRuntime.console_socket_in_foreground``) sends a terminal master over
  ``--console-socket`` (SCM_RIGHTS) in the foreground too; we pump and resize that.

runc cannot forward SIGKILL to the exec'd process, so a session that ends early kills it by the
pid runc wrote.

Attach talks to conmon's attach socket (SOCK_SEQPACKET): each message from conmon starts with
one byte naming the stream (2 stdout, 3 stderr); what we send is the container's stdin, and
shutting down our write side closes it. Terminal resizes go to conmon's ``ctl`` fifo as
``1 <height> <width>``.

Unix socket paths must fit in ``sun_path`` (108 bytes), and a bundle under a deep runroot with
a 64-character container id does not leave room. conmon binds the attach socket through
``/proc/self/fd/<dir fd>/attach``; we connect the same way. The console socket lives in a
short private temp dir, as runc and the shim connect to it by the path we give them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
from pathlib import Path

from crivm.errors import CrivmError, FailedPrecondition, Unavailable
from crivm.runtime.runc_backend import conmon
from crivm.runtime.runc_backend.environment import RuncEnvironment
from crivm.runtime.runc_backend.exec_sync import exec_process
from crivm.runtime.streaming import process_io
from crivm.runtime.streaming.backend import ResizeQueue, Stdio, StreamClosed, TerminalSize

log = logging.getLogger(__name__)

_CONSOLE_TIMEOUT_S = 30.0
# conmon's STDIO_BUF_SIZE plus its stream-type byte.
_ATTACH_MESSAGE = 8192 + 1
_ATTACH_STDOUT, _ATTACH_STDERR = 2, 3
_CTL_RESIZE = 1


async def _first_size(resize: ResizeQueue | None) -> TerminalSize | None:
    if resize is None:
        return None
    with contextlib.suppress(TimeoutError):
        size = await asyncio.wait_for(resize.get(), 0.2)
        if size is None:
            resize.put_nowait(None)
        return size
    return None


def _kill_exec(pidfile: str) -> None:
    pid = conmon.read_pid(pidfile)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def exec_stream(
    env: RuncEnvironment,
    layout: conmon.ContainerLayout,
    cmd: list[str],
    stdio: Stdio,
    known_running: bool = False,
) -> int:
    # ``known_running``: the caller's exit watch says so; saves a `runc state` (8-10 ms),
    # and the runtime refuses to exec in a stopped container either way.
    if not known_running:
        state = await env.runtime.state(layout.container_id)
        if state is None or state.status != "running":
            raise FailedPrecondition(f"container {layout.container_id} is not running")
    spec = json.loads(Path(layout.bundle, "config.json").read_text())
    process = exec_process(spec["process"], cmd)
    first_size = None
    if stdio.tty:
        process["terminal"] = True
        first_size = await _first_size(stdio.resize)
        if first_size is not None:
            process["consoleSize"] = {"height": first_size.height, "width": first_size.width}
    token = secrets.token_hex(8)
    process_path = os.path.join(layout.bundle, f"exec-{token}.json")
    pidfile = os.path.join(layout.bundle, f"exec-{token}.pid")
    Path(process_path).write_text(json.dumps(process))
    argv = env.runtime.exec_argv(layout.container_id, process_path, pidfile)
    finished = False
    try:
        if not stdio.tty:
            code = await _exec_piped(argv, stdio)
        elif env.runtime.console_socket_in_foreground:
            code = await _exec_on_console_socket(argv, stdio, first_size)
        else:
            code = await _exec_on_our_terminal(argv, stdio, first_size)
        finished = True
        return code
    finally:
        if not finished:
            _kill_exec(pidfile)
        for path in (process_path, pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def _exec_piped(argv: list[str], stdio: Stdio) -> int:
    pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    start = asyncio.create_subprocess_exec(
        *argv,
        stdin=pipe if stdio.stdin else null,
        stdout=pipe if stdio.stdout else null,
        stderr=pipe if stdio.stderr else null,
        start_new_session=True,
    )
    return await process_io.run_piped(start, stdio.stdin, stdio.stdout, stdio.stderr)


async def _exec_on_our_terminal(
    argv: list[str], stdio: Stdio, first_size: TerminalSize | None
) -> int:
    """runc exec with a pty of ours as its stdin, stdout and stderr (runc's own errors show
    on the terminal, as in an interactive ``runc exec -t``)."""
    master, slave = os.openpty()
    try:
        if first_size is not None:
            process_io.set_terminal_size(master, first_size.width, first_size.height)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        )
    except OSError as exc:
        os.close(master)
        raise CrivmError(f"cannot run {argv[0]} exec: {exc.strerror}") from exc
    finally:
        # runc holds the slave now; the master reads EOF (EIO) once runc exits.
        os.close(slave)

    async def started() -> asyncio.subprocess.Process:
        return proc

    # The slave is not runc's controlling terminal, so the kernel does not tell runc about
    # a new size; runc resizes the container's terminal from ours on SIGWINCH.
    def resized() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGWINCH)

    return await process_io.run_on_terminal(
        started(), master, stdio.stdin, stdio.stdout, stdio.resize, on_resize=resized
    )


async def _exec_on_console_socket(
    argv: list[str], stdio: Stdio, first_size: TerminalSize | None
) -> int:
    with tempfile.TemporaryDirectory(prefix="crivm-console-") as short_dir:
        console_path = os.path.join(short_dir, "console.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(console_path)
            except OSError as exc:
                raise CrivmError(f"cannot make a console socket: {exc}") from exc
            listener.listen(1)
            listener.setblocking(False)
            proc = await asyncio.create_subprocess_exec(
                *argv[:-1], "--console-socket", console_path, argv[-1],
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )
            try:
                master = await _receive_console(listener, proc)
            except BaseException:
                await process_io.kill_and_reap(proc, process_group=True)
                raise
        finally:
            listener.close()
    if first_size is not None:
        with contextlib.suppress(OSError):
            process_io.set_terminal_size(master, first_size.width, first_size.height)

    async def started() -> asyncio.subprocess.Process:
        return proc

    return await process_io.run_on_terminal(
        started(), master, stdio.stdin, stdio.stdout, stdio.resize
    )


async def _receive_console(listener: socket.socket, proc: asyncio.subprocess.Process) -> int:
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    exited = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait(
            [accept, exited], timeout=_CONSOLE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if accept not in done:
            stderr = b""
            if proc.stderr is not None and exited in done:
                stderr = await proc.stderr.read()
            raise CrivmError(
                "the runtime's exec did not hand over a terminal: "
                + (stderr.decode(errors="replace").strip() or "timed out")
            )
        conn, _ = accept.result()
    finally:
        for task in (accept, exited):
            task.cancel()
    with conn:
        conn.settimeout(_CONSOLE_TIMEOUT_S)
        _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
    if not fds:
        raise CrivmError("the runtime's exec sent no terminal over the console socket")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


# -- attach ----------------------------------------------------------------------------------

async def attach_stream(layout: conmon.ContainerLayout, stdio: Stdio, has_tty: bool,
                        has_stdin: bool) -> None:
    # The container's own terminal setting decides how its output arrives, whatever the
    # client asked for (as in CRI-O).
    stdio.tty = has_tty
    sock = await _connect_attach_socket(layout)
    tasks: list[asyncio.Task[None]] = []
    try:
        if stdio.stdin is not None and has_stdin:
            tasks.append(asyncio.create_task(_attach_input(sock, stdio)))
        if stdio.resize is not None:
            tasks.append(asyncio.create_task(_attach_resizes(layout.ctl_fifo, stdio.resize)))
        await _attach_output(sock, stdio)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close()


async def _connect_attach_socket(layout: conmon.ContainerLayout) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    bundle_fd = -1
    try:
        # The full path can be longer than sun_path; the bundle's fd path is always short.
        bundle_fd = os.open(layout.bundle, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        short_path = f"/proc/self/fd/{bundle_fd}/{os.path.basename(layout.attach_socket)}"
        await loop.sock_connect(sock, short_path)
    except OSError as exc:
        sock.close()
        raise Unavailable(
            f"cannot attach to container {layout.container_id}: "
            f"{exc.strerror or exc} ({layout.attach_socket})"
        ) from exc
    finally:
        if bundle_fd >= 0:
            os.close(bundle_fd)
    return sock


async def _attach_output(sock: socket.socket, stdio: Stdio) -> None:
    loop = asyncio.get_running_loop()
    sinks = {_ATTACH_STDOUT: stdio.stdout, _ATTACH_STDERR: stdio.stderr}
    if stdio.tty:
        sinks[_ATTACH_STDERR] = stdio.stdout
    while True:
        try:
            message = await loop.sock_recv(sock, _ATTACH_MESSAGE)
        except ConnectionError:
            return
        if not message:
            return  # conmon closed the socket: the container exited
        sink = sinks.get(message[0])
        if sink is None or len(message) == 1:
            continue
        try:
            await sink.write(message[1:])
        except StreamClosed:
            sinks[message[0]] = None


async def _attach_input(sock: socket.socket, stdio: Stdio) -> None:
    assert stdio.stdin is not None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError):
        while chunk := await stdio.stdin.read():
            for start in range(0, len(chunk), _ATTACH_MESSAGE - 1):
                await loop.sock_sendall(sock, chunk[start:start + _ATTACH_MESSAGE - 1])
        # The client closed stdin; conmon closes the container's stdin unless told to keep it.
        sock.shutdown(socket.SHUT_WR)


async def _attach_resizes(ctl_fifo: str, resize: ResizeQueue) -> None:
    while (size := await resize.get()) is not None:
        line = f"{_CTL_RESIZE} {size.height} {size.width}\n".encode()
        try:
            await asyncio.to_thread(_write_ctl, ctl_fifo, line)
        except OSError as exc:
            log.debug("resize of %s failed: %s", ctl_fifo, exc)


def _write_ctl(ctl_fifo: str, line: bytes) -> None:
    # O_NONBLOCK: if conmon is gone there is no reader and open fails instead of hanging.
    fd = os.open(ctl_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)

"""Streaming exec and attach against runc containers, end to end: the CRI Exec/Attach URL, the
tests' own SPDY client, runc and conmon; and ``crictl exec -it`` on a real terminal.

The daemon's root and runroot are deep (``crivm_daemon_deep``), so a container's bundle path
plus a socket name does not fit in sun_path, as under hack/critest's tmp dir. critest's
"runtime should support attach" and "exec with tty=true and stdin=true" failed there.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.spdy_client import ClientStream, SpdyClient

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry, pytest.mark.timeout(180)]

BUSYBOX = "docker.io/library/busybox:latest"
PROTOCOL = "v4.channel.k8s.io"
RPC_TIMEOUT_S = 60


def start_container(daemon: CrivmDaemon, name: str, command: list[str],
                    **config: object) -> tuple[str, str]:
    cri = daemon.cri
    cri.pull(BUSYBOX)
    pod_config = daemon.pod_config(name)
    pod_id = cri.run_pod(pod_config)
    ctr_config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=BUSYBOX),
        command=command, log_path=f"{name}.log", **config,  # type: ignore[arg-type]
    )
    ctr_id = cri.create(pod_id, ctr_config, pod_config)
    cri.start(ctr_id)
    return pod_id, ctr_id


@dataclass
class Session:
    """One remote command session as kubectl opens it: error first, then the stdio streams."""

    client: SpdyClient
    error: ClientStream
    stdout: ClientStream
    stdin: ClientStream | None = None
    stderr: ClientStream | None = None
    resize: ClientStream | None = None
    seen: dict[int, bytearray] = field(default_factory=dict)

    @classmethod
    async def open(cls, url: str, stdin: bool, tty: bool) -> Session:
        client = await SpdyClient.connect(url, [PROTOCOL])
        assert client.protocol == PROTOCOL
        session = cls(client, await client.open_stream({"streamtype": "error"}),
                      await client.open_stream({"streamtype": "stdout"}))
        if stdin:
            session.stdin = await client.open_stream({"streamtype": "stdin"})
        if tty:
            session.resize = await client.open_stream({"streamtype": "resize"})
        else:
            session.stderr = await client.open_stream({"streamtype": "stderr"})
        return session

    async def type(self, data: bytes) -> None:
        assert self.stdin is not None
        await self.client.send(self.stdin, data)

    async def set_size(self, width: int, height: int) -> None:
        assert self.resize is not None
        size = json.dumps({"Width": width, "Height": height}).encode()
        await self.client.send(self.resize, size)

    async def read_until(self, stream: ClientStream, needle: bytes,
                         timeout_s: float = 30) -> bytes:
        """Everything the stream sent so far, once it contains ``needle``."""
        seen = self.seen.setdefault(stream.stream_id, bytearray())
        try:
            async with asyncio.timeout(timeout_s):
                while needle not in seen:
                    chunk = await stream.data.get()
                    if not chunk:
                        raise AssertionError(f"stream ended before {needle!r}: {bytes(seen)!r}")
                    seen += chunk
        except TimeoutError:
            raise AssertionError(f"no {needle!r} within {timeout_s}s: {bytes(seen)!r}") from None
        return bytes(seen)

    async def retype_until(self, typed: bytes, needle: bytes, timeout_s: float = 30) -> None:
        """Type ``typed`` until ``needle`` shows up in what it prints. A resize travels apart
        from stdin, so the command may run before the new size has arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.seen.setdefault(self.stdout.stream_id, bytearray())
            mark = len(seen)
            await self.type(typed)
            try:
                await self.read_until(self.stdout, needle, timeout_s=2)
                if needle in seen[mark:]:
                    return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    async def rest(self, stream: ClientStream) -> bytes:
        seen = self.seen.setdefault(stream.stream_id, bytearray())
        return bytes(seen) + await stream.read_all()


def exec_url(daemon: CrivmDaemon, ctr_id: str, cmd: list[str], tty: bool, stdin: bool) -> str:
    return str(daemon.cri.runtime.Exec(api_pb2.ExecRequest(
        container_id=ctr_id, cmd=cmd, tty=tty, stdin=stdin, stdout=True, stderr=not tty,
    ), timeout=RPC_TIMEOUT_S).url)


def attach_url(daemon: CrivmDaemon, ctr_id: str, tty: bool) -> str:
    # As kubelet asks for `kubectl attach -i [-t]`: no separate stderr with a terminal.
    return str(daemon.cri.runtime.Attach(api_pb2.AttachRequest(
        container_id=ctr_id, stdin=True, stdout=True, stderr=not tty, tty=tty,
    ), timeout=RPC_TIMEOUT_S).url)


async def test_attach_without_tty(crivm_daemon_deep: CrivmDaemon) -> None:
    # critest's attach spec: a shell with stdin_once, fed commands over the attach session.
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "attach-pipe", ["/bin/sh"], stdin=True, stdin_once=True)
    session = await Session.open(attach_url(daemon, ctr, tty=False), stdin=True, tty=False)
    try:
        await session.type(b"echo -n hello; echo oops >&2\n")
        assert await session.read_until(session.stdout, b"hello") == b"hello"
        assert session.stderr is not None
        assert await session.read_until(session.stderr, b"oops\n") == b"oops\n"
        await session.type(b"echo again; exit 0\n")
        # The shell exits, conmon closes the attach socket: the session ends cleanly.
        assert await session.rest(session.stdout) == b"helloagain\n"
        assert json.loads(await session.error.read_all()) == {
            "metadata": {}, "status": "Success"}
    finally:
        await session.client.close()
    status = daemon.cri.wait_exited(ctr)
    assert status.exit_code == 0


async def test_attach_stdin_close_ends_stdin_once_container(
    crivm_daemon_deep: CrivmDaemon,
) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "attach-eof", ["/bin/sh", "-c", "cat; echo done:$?"],
                             stdin=True, stdin_once=True)
    session = await Session.open(attach_url(daemon, ctr, tty=False), stdin=True, tty=False)
    try:
        await session.type(b"line\n")
        await session.read_until(session.stdout, b"line\n")
        assert session.stdin is not None
        await session.client.send(session.stdin, b"", fin=True)
        assert await session.rest(session.stdout) == b"line\ndone:0\n"
    finally:
        await session.client.close()
    assert daemon.cri.wait_exited(ctr).exit_code == 0


async def test_attach_with_tty_and_resize(crivm_daemon_deep: CrivmDaemon) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "attach-tty", ["/bin/sh"], stdin=True, tty=True)
    session = await Session.open(attach_url(daemon, ctr, tty=True), stdin=True, tty=True)
    try:
        await session.set_size(97, 31)
        await session.retype_until(b"stty size\n", b"31 97")
        await session.set_size(120, 40)
        await session.retype_until(b"stty size\n", b"40 120")
        # The container's terminal echoes what we type, and runs it.
        await session.type(b"echo typed-$((6*7))\n")
        await session.read_until(session.stdout, b"typed-42")
        assert b"echo typed-$((6*7))" in session.seen[session.stdout.stream_id]
        await session.type(b"exit 3\n")
        await session.rest(session.stdout)
        assert json.loads(await session.error.read_all())["status"] == "Success"
    finally:
        await session.client.close()
    assert daemon.cri.wait_exited(ctr).exit_code == 3


async def test_exec_with_tty_and_stdin_returns_output(crivm_daemon_deep: CrivmDaemon) -> None:
    # critest's "exec with tty=true and stdin=true": stdin open but unused.
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "exec-tty", ["sleep", "600"])
    url = exec_url(daemon, ctr, ["echo", "-n", "hello"], tty=True, stdin=True)
    session = await Session.open(url, stdin=True, tty=True)
    try:
        assert await session.stdout.read_all() == b"hello"
        assert json.loads(await session.error.read_all()) == {
            "metadata": {}, "status": "Success"}
    finally:
        await session.client.close()


async def test_exec_tty_shell_resize_and_exit_code(crivm_daemon_deep: CrivmDaemon) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "exec-shell", ["sleep", "600"])
    session = await Session.open(exec_url(daemon, ctr, ["sh"], tty=True, stdin=True),
                                 stdin=True, tty=True)
    try:
        await session.set_size(97, 31)
        await session.retype_until(b"stty size\n", b"31 97")
        await session.set_size(120, 40)
        await session.retype_until(b"stty size\n", b"40 120")
        await session.type(b"echo typed-$((6*7)); tty\n")
        out = await session.read_until(session.stdout, b"typed-42")
        await session.read_until(session.stdout, b"/dev/pts/")
        assert b"echo typed-$((6*7))" in out  # the terminal echoed our typing
        await session.type(b"exit 4\n")
        await session.rest(session.stdout)
        status = json.loads(await session.error.read_all())
    finally:
        await session.client.close()
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "4"}]
    # The session's runc exec and shell are gone; only the container's own process is left.
    left = daemon.cri.exec_sync(ctr, ["ps", "-o", "args"]).stdout.decode()
    assert "sh" not in left.replace("ps -o args", "").split(), left


async def test_exec_tty_unknown_command_reports_failure(crivm_daemon_deep: CrivmDaemon) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "exec-missing", ["sleep", "600"])
    session = await Session.open(exec_url(daemon, ctr, ["no-such-command"], tty=True,
                                          stdin=False), stdin=False, tty=True)
    try:
        out = await session.stdout.read_all()
        status = json.loads(await session.error.read_all())
    finally:
        await session.client.close()
    # runc reports its failure on the terminal and exits non-zero.
    assert b"no-such-command" in out
    assert status["status"] == "Failure"


def runc_execs_of(ctr_id: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"exec" in args and ctr_id.encode() in args:
            found.append(b" ".join(args).decode(errors="replace"))
    return found


async def test_hung_up_tty_exec_leaves_no_process(crivm_daemon_deep: CrivmDaemon) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "exec-hangup", ["sleep", "600"])
    session = await Session.open(
        exec_url(daemon, ctr, ["sh", "-c", "echo started; exec sleep 321"], tty=True,
                 stdin=True), stdin=True, tty=True)
    try:
        await session.read_until(session.stdout, b"started")
        assert runc_execs_of(ctr)
    finally:
        await session.client.close()
    deadline = time.monotonic() + 15
    while True:
        inside = daemon.cri.exec_sync(ctr, ["ps", "-o", "args"]).stdout.decode()
        outside = runc_execs_of(ctr)
        if "sleep 321" not in inside and not outside:
            break
        assert time.monotonic() < deadline, (inside, outside)
        await asyncio.sleep(0.3)


# -- crictl exec -it on a terminal ----------------------------------------------------------

def _take_controlling_terminal() -> None:
    # Runs in the child after setsid(): stdin (the pty slave) becomes its controlling
    # terminal, so resizing the pty sends it SIGWINCH, as a terminal emulator's resize does.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A process on a pty of its own, driven like a user at a terminal."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        self.master, slave = pty.openpty()
        self.resize(rows, cols)
        self.proc = subprocess.Popen(  # noqa: S603
            argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_take_controlling_terminal,  # noqa: PLW1509
        )
        os.close(slave)
        self.output = bytearray()

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read(self, timeout_s: float) -> bool:
        """Read what is there within ``timeout_s``; False at EOF."""
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:
            return False  # EIO: the process closed the terminal
        self.output += chunk
        return bool(chunk)

    def expect(self, needle: bytes, since: int = 0, timeout_s: float = 30) -> bool:
        deadline = time.monotonic() + timeout_s
        while needle not in self.output[since:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.5)):
                return needle in self.output[since:]
        return True

    def retype_until(self, typed: bytes, needle: bytes, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            mark = len(self.output)
            self.type(typed)
            if self.expect(needle, since=mark, timeout_s=2):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} after typing {typed!r}: {self.text}")

    def wait(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0):  # whatever is left after it exited
            pass
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


@pytest.mark.skipif(shutil.which("crictl") is None, reason="crictl is not installed")
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec_it_on_a_terminal(crivm_daemon_deep: CrivmDaemon, transport: str) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, f"crictl-it-{transport}", ["sleep", "600"])
    crictl = shutil.which("crictl")
    assert crictl is not None
    endpoint = f"unix://{daemon.socket}"
    term = Terminal([crictl, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
                     "exec", "-it", "-r", transport, ctr, "sh"], rows=31, cols=97)
    try:
        # crictl sends the terminal's size when it starts, and again on SIGWINCH.
        term.retype_until(b"stty size\n", b"31 97")
        term.type(b"echo typed-$((6*7))\n")
        assert term.expect(b"typed-42"), term.text
        assert b"echo typed-$((6*7))" in term.output  # echoed by the container's terminal
        term.resize(40, 120)
        term.retype_until(b"stty size\n", b"40 120")
        term.type(b"exit 5\n")
        code = term.wait()
    finally:
        term.close()
    assert code != 0, term.text
    assert "exit code 5" in term.text


@pytest.mark.skipif(shutil.which("crictl") is None, reason="crictl is not installed")
def test_crictl_attach_it_on_a_terminal(crivm_daemon_deep: CrivmDaemon) -> None:
    daemon = crivm_daemon_deep
    _, ctr = start_container(daemon, "crictl-attach-it", ["/bin/sh"], stdin=True, tty=True)
    crictl = shutil.which("crictl")
    assert crictl is not None
    endpoint = f"unix://{daemon.socket}"
    term = Terminal([crictl, "--runtime-endpoint", endpoint, "attach", "-it", ctr],
                    rows=31, cols=97)
    try:
        term.retype_until(b"stty size\n", b"31 97")
        term.resize(40, 120)
        term.retype_until(b"stty size\n", b"40 120")
        term.type(b"exit 3\n")
        code = term.wait()
    finally:
        term.close()
    assert code == 0, term.text  # attach reports no exit code; the container's status does
    assert daemon.cri.wait_exited(ctr).exit_code == 3

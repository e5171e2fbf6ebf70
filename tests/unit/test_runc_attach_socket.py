"""Attach's side of conmon's attach socket, against a stand-in conmon that speaks its framing
(one stream-type byte, then data; our messages are the container's stdin). The bundle path is
longer than sun_path, as under hack/critest; tests/integration/test_streaming_runc.py runs the
same against real conmon."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from crivm.errors import Unavailable
from crivm.runtime.runc_backend import stream_io
from crivm.runtime.runc_backend.conmon import ContainerLayout
from crivm.runtime.streaming.backend import Stdio

pytestmark = pytest.mark.timeout(30)

CONTAINER_ID = "c" * 64


class Collected:
    """A ByteSink that keeps what it was sent."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    async def write(self, data: bytes) -> None:
        self.data += data

    async def close(self) -> None:
        self.closed = True


class Typed:
    """A ByteSource that yields its chunks, then EOF."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def deep_layout(tmp_path: Path) -> ContainerLayout:
    runroot = tmp_path / ("r" * 60)
    layout = ContainerLayout.under(str(runroot), str(tmp_path / "root"), CONTAINER_ID, "x.log")
    os.makedirs(layout.bundle)
    assert len(layout.attach_socket) > 108  # what a plain connect() cannot reach
    return layout


def bind_long(path: str) -> socket.socket:
    """Bind as conmon does: through the parent directory's /proc/self/fd entry."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dir_fd = os.open(os.path.dirname(path), os.O_PATH)
    try:
        listener.bind(f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}")
    finally:
        os.close(dir_fd)
    listener.listen(1)
    listener.setblocking(False)
    return listener


async def fake_conmon(listener: socket.socket) -> bytes:
    """Send stdout and stderr, then collect stdin until the client shuts its side."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    with conn:
        await loop.sock_sendall(conn, b"\x02hello")
        await loop.sock_sendall(conn, b"\x03oops")
        stdin = b""
        while message := await loop.sock_recv(conn, 8193):
            stdin += message
        await loop.sock_sendall(conn, b"\x02bye")
    return stdin


async def test_attach_reaches_a_socket_path_longer_than_sun_path(tmp_path: Path) -> None:
    layout = deep_layout(tmp_path)
    with bind_long(layout.attach_socket) as listener:
        conmon = asyncio.create_task(fake_conmon(listener))
        stdout, stderr = Collected(), Collected()
        stdio = Stdio(stdin=Typed(b"echo hi\n"), stdout=stdout, stderr=stderr, tty=False)
        await stream_io.attach_stream(layout, stdio, has_tty=False, has_stdin=True)
        assert await conmon == b"echo hi\n"
    assert (stdout.data, stderr.data) == (b"hellobye", b"oops")


async def test_attach_with_tty_merges_stderr_into_stdout(tmp_path: Path) -> None:
    layout = deep_layout(tmp_path)
    with bind_long(layout.attach_socket) as listener:
        conmon = asyncio.create_task(fake_conmon(listener))
        stdout = Collected()
        stdio = Stdio(stdin=Typed(), stdout=stdout, stderr=None, tty=False)
        await stream_io.attach_stream(layout, stdio, has_tty=True, has_stdin=True)
        assert await conmon == b""
    assert stdout.data == b"hellooopsbye"


async def test_missing_attach_socket_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    layout = deep_layout(tmp_path)
    stdio = Stdio(stdin=None, stdout=Collected(), stderr=None, tty=False)
    with pytest.raises(Unavailable, match="No such file or directory"):
        await stream_io.attach_stream(layout, stdio, has_tty=False, has_stdin=False)

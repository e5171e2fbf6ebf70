"""Where the agent listens: a virtio-serial port, a vsock port, or a unix socket for tests.

A virtio-serial port is a character device that never "accepts": the guest opens it once, and
the host side connects to and disconnects from QEMU's chardev socket behind it. While no host is
connected, a read returns end of file at once. So the agent serves one session per open, and
reopens the port after each end of file to wait for the next host connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tty
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

DEFAULT_SERIAL_PORT = "/dev/virtio-ports/agent.0"
DEFAULT_VSOCK_PORT = 1024

# How often to look for a host on a port that has none: each try is one open and one read.
_RECONNECT_INTERVAL = 0.2


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str  # "serial", "vsock" or "unix"
    address: str


def parse_endpoint(text: str) -> Endpoint:
    """serial[:PATH], vsock[:PORT] or unix:PATH."""
    kind, _, address = text.partition(":")
    if kind == "serial":
        return Endpoint(kind, address or DEFAULT_SERIAL_PORT)
    if kind == "vsock":
        if address and not address.isdigit():
            raise ValueError(f"vsock port {address!r} is not a number")
        return Endpoint(kind, address or str(DEFAULT_VSOCK_PORT))
    if kind == "unix" and address:
        return Endpoint(kind, address)
    raise ValueError(f"transport {text!r} is not serial[:PATH], vsock[:PORT] or unix:PATH")


async def serve_forever(endpoint: Endpoint, serve: Serve) -> None:
    if endpoint.kind == "serial":
        await _serve_serial(endpoint.address, serve)
    elif endpoint.kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, int(endpoint.address)))
        await _serve_listener(await asyncio.start_server(serve, sock=sock))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.address)
        await _serve_listener(await asyncio.start_unix_server(serve, endpoint.address))


async def _serve_listener(server: asyncio.Server) -> None:
    async with server:
        log.info("agent listening on %s", [s.getsockname() for s in server.sockets])
        await server.serve_forever()


async def _serve_serial(path: str, serve: Serve) -> None:
    loop = asyncio.get_running_loop()
    waiting_logged = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            if not waiting_logged:
                log.warning("cannot open %s yet (%s); retrying", path, exc)
                waiting_logged = True
            await asyncio.sleep(1.0)
            continue
        if os.isatty(fd):
            # A pty stands in for the port in tests; the line discipline must not touch bytes.
            tty.setraw(fd)
        started = loop.time()
        reader, writer, read_transport = await char_device_streams(fd)
        try:
            await serve(reader, writer)
        finally:
            read_transport.close()
        if loop.time() - started < _RECONNECT_INTERVAL:
            await asyncio.sleep(_RECONNECT_INTERVAL)
        elif not waiting_logged:
            log.info("host left %s; waiting for it to reconnect", path)


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    """Flow control for a write pipe transport, plus the close waiter StreamWriter needs.

    asyncio's FlowControlMixin lacks the waiter, so StreamWriter.wait_closed() would raise.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


async def char_device_streams(
    fd: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.BaseTransport]:
    """Stream reader and writer over one character device, through two pipe transports.

    Takes ownership of `fd`. Closing the writer and the returned read transport releases it.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    read_file = os.fdopen(fd, "rb", buffering=0)
    try:
        write_file = os.fdopen(os.dup(fd), "wb", buffering=0)
    except BaseException:
        read_file.close()
        raise
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), read_file
    )
    write_transport, write_protocol = await loop.connect_write_pipe(
        lambda: _WriteProtocol(loop), write_file
    )
    writer = asyncio.StreamWriter(write_transport, write_protocol, reader, loop)
    return reader, writer, read_transport

"""crivm's gRPC server: the CRI calls over HTTP/2 on the daemon's unix socket.

Why not grpcio's ``grpc.aio`` server: every call through it crossed from the C core's poller
thread into the event loop and back, and built its call objects in Python on the way, about
0.4 ms per call on this project's test host, twice what containerd spends answering the same
client. ContainerStatus, ImageStatus, ListImages and ListContainers are little more than that
floor. Here a call is parsed and answered on the event loop itself, in the callbacks of the
connection's protocol object, and its handler runs in a task of its own as before.

What a gRPC server owes its clients (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md):
- requests are POSTs whose content-type starts with ``application/grpc``; anything else gets
  an HTTP error status, an unknown method UNIMPLEMENTED;
- a message is a compressed-flag byte, a 4-byte length and the bytes; compressed requests are
  refused (UNIMPLEMENTED), since crivm advertises no encodings;
- ``grpc-timeout`` is a deadline: the handler is cancelled and the answer is
  DEADLINE_EXCEEDED; a client that resets the stream or goes away cancels its handler too;
- the status travels in trailers (``grpc-status``, percent-encoded ``grpc-message``), or in a
  trailers-only response when the call fails before it answered anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from crivm.errors import InvalidArgument, ResourceExhausted, Unimplemented
from crivm.runtime import wire
from crivm.runtime.call_scope import CallScope
from crivm.runtime.http2 import Http2Connection, Stream

log = logging.getLogger(__name__)

STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}

# Status messages are for people; a runtime error's output can be long.
MAX_STATUS_MESSAGE = 4096

TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _hpack_integer(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: bytes) -> bytes:
    """A header that does not enter the peer's table: 'literal without indexing, new name'."""
    raw_name = name.encode("ascii")
    return (b"\x00" + _hpack_integer(len(raw_name), 7) + raw_name
            + _hpack_integer(len(value), 7) + value)


# ":status: 200" is static entry 8; content-type (static name 31) as a literal value.
STATUS_200 = b"\x88"
CONTENT_TYPE = _hpack_integer(31, 4) + _hpack_integer(16, 7) + b"application/grpc"
RESPONSE_HEADERS = STATUS_200 + CONTENT_TYPE
TRAILERS_OK = _literal("grpc-status", b"0")


def _status_block(code: str, message: str) -> bytes:
    block = _literal("grpc-status", str(STATUS_CODES[code]).encode("ascii"))
    if message:
        block += _literal("grpc-message", percent_encode(message[:MAX_STATUS_MESSAGE]))
    return block


def percent_encode(message: str) -> bytes:
    """grpc-message: UTF-8, with '%' and every octet outside printable ASCII as %XX."""
    out = bytearray()
    for octet in message.encode("utf-8", "replace"):
        if 0x20 <= octet <= 0x7E and octet != 0x25:
            out.append(octet)
        else:
            out += b"%%%02X" % octet
    return bytes(out)


def _http_error(status: int) -> bytes:
    # ":status" is static name 8; the value as a literal.
    value = str(status).encode("ascii")
    return _hpack_integer(8, 4) + _hpack_integer(len(value), 7) + value


def parse_timeout(value: str) -> float | None:
    """Seconds in a ``grpc-timeout`` value (up to 8 digits and a unit), or None if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in TIMEOUT_UNITS:
        return None
    return int(digits) * TIMEOUT_UNITS[unit]


def _message(data: bytes) -> tuple[bytes, bytes]:
    """A gRPC message: uncompressed, its length, the bytes (kept apart: no copy)."""
    return b"\x00" + len(data).to_bytes(4, "big"), data


@dataclass(frozen=True)
class Method:
    """One RPC: its name for logs, how its request decodes, and its handler, which is
    ``async def (request) -> response`` or, for a server-streaming call, an async
    generator of responses."""

    name: str
    decode: Callable[[bytes], Any]
    handle: Callable[[Any], Awaitable[Any]] | Callable[[Any], AsyncIterator[Any]]
    server_streaming: bool = False


class _Call:
    __slots__ = ("task", "timer", "expired")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False


class GrpcServer:
    """Serves ``methods`` (keyed by path, "/runtime.v1.RuntimeService/Version") on a unix
    socket. Implements ``crivm.runtime.http2.StreamListener``."""

    def __init__(self, methods: dict[str, Method], scope: CallScope, max_message: int) -> None:
        self.methods = methods
        self.scope = scope
        self.max_message = max_message
        self._connections: set[Http2Connection] = set()
        self._calls: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, path: os.PathLike[str] | str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, str(path))

    def _connect(self) -> Http2Connection:
        # The body may carry the 5-byte message prefix beyond the message itself.
        connection = Http2Connection(self, self.max_message + 5, self._connections.discard)
        self._connections.add(connection)
        return connection

    async def stop(self, grace: float) -> None:
        """Stop accepting; let running calls finish for ``grace`` seconds, then cancel them."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.go_away()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=grace)
        for task in list(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=grace)
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- StreamListener ----------------------------------------------------------------

    def request_received(self, connection: Http2Connection, stream: Stream) -> None:
        headers = dict(stream.headers)
        if headers.get(":method") != "POST":
            connection.send_headers(stream, _http_error(405), end_stream=True)
            return
        if not headers.get("content-type", "").startswith("application/grpc"):
            connection.send_headers(stream, _http_error(415), end_stream=True)
            return
        path = headers.get(":path", "")
        method = self.methods.get(path)
        if method is None:
            self._refuse(connection, stream, Unimplemented(f"unknown method {path}"))
            return
        body = stream.body
        stream.body = bytearray()
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._refuse(connection, stream, InvalidArgument(
                f"{method.name}: the request is not one length-prefixed message"))
            return
        if body[0]:
            encoding = headers.get("grpc-encoding", "none")
            self._refuse(connection, stream, Unimplemented(
                f"compressed requests are not supported (grpc-encoding {encoding})"))
            return
        call = _Call()
        stream.call = call
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._serve(connection, stream, method, bytes(body[5:]), call))
        call.task = task
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        timeout = headers.get("grpc-timeout")
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                call.timer = loop.call_later(seconds, _expire, call)

    def request_too_large(self, connection: Http2Connection, stream: Stream) -> None:
        self._refuse(connection, stream, ResourceExhausted(
            f"request larger than the limit of {self.max_message} bytes"))

    def stream_reset(self, connection: Http2Connection, stream: Stream) -> None:
        call = stream.call
        if isinstance(call, _Call) and call.task is not None:
            call.task.cancel()

    # -- calls -------------------------------------------------------------------------

    def _refuse(self, connection: Http2Connection, stream: Stream, error: Exception) -> None:
        """Answer a call that never reached its handler."""
        code, message = self.scope.failure(stream.header(":path") or "request", error)
        connection.send_headers(stream, RESPONSE_HEADERS + _status_block(code, message),
                                end_stream=True)

    def _decode(self, method: Method, payload: bytes) -> Any:
        try:
            return method.decode(payload)
        except DecodeError as exc:
            raise InvalidArgument(f"malformed {method.name} request: {exc}") from exc

    async def _serve(self, connection: Http2Connection, stream: Stream, method: Method,
                     payload: bytes, call: _Call) -> None:
        """One call, unary or server-streaming: the handler in the call scope, its status in
        the trailers (or a trailers-only answer when nothing went out before it)."""
        started = self.scope.begin()
        code, message = "OK", ""
        data = b""
        answered = False
        try:
            request = self._decode(method, payload)
            if method.server_streaming:
                async for response in method.handle(request):  # type: ignore[union-attr]
                    if not answered:
                        connection.send_headers(stream, RESPONSE_HEADERS)
                        answered = True
                    connection.send_data(stream, _message(wire.serialize(response)))
                    await connection.drain(stream)
            else:
                data = wire.serialize(await method.handle(request))  # type: ignore[misc]
        except asyncio.CancelledError:
            if not call.expired:
                self.scope.finish(method.name, started, "CANCELLED")
                raise
            code, message = "DEADLINE_EXCEEDED", "deadline exceeded"
        except Exception as exc:
            code, message = self.scope.failure(method.name, exc)
        finally:
            if call.timer is not None:
                call.timer.cancel()
        self.scope.finish(method.name, started, code)
        trailers = TRAILERS_OK if code == "OK" else _status_block(code, message)
        if code == "OK" and not method.server_streaming:
            # Headers, message and trailers in one write.
            connection.send_response(stream, RESPONSE_HEADERS, _message(data), trailers)
        elif answered:
            connection.send_trailers(stream, trailers)
        else:
            connection.send_headers(stream, RESPONSE_HEADERS + trailers, end_stream=True)


def _expire(call: _Call) -> None:
    call.expired = True
    if call.task is not None:
        call.task.cancel()


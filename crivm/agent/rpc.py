"""Remote calls over crivm.agent.framing: one server, one client, many calls per connection.

A call owns one stream id, chosen by the client (odd numbers, like ttrpc)::

    client                                  server
    REQUEST  [u16 name len][name][request]  ->
                                            <- RESPONSE [u32 code][u32 msg len][msg][reply]
    or, for a streamed reply:
                                            <- DATA     [message]        (zero or more)
    WINDOW   [u32 credit]                   ->                           (as DATA is consumed)
                                            <- CLOSE    [u32 code][u32 msg len][msg]
    CANCEL                                  ->                           (client gives up)

Codes use the google.rpc.Code numbering. A streamed reply may have INITIAL_WINDOW DATA frames
outstanding; the client returns credit with WINDOW frames as its consumer takes messages, so a
slow reader holds the agent back instead of filling the host's memory.

Like framing, this module is imported by both sides and depends only on the stdlib, protobuf
and the framing module.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from crivm.agent.framing import (
    DEFAULT_MAX_PAYLOAD,
    MAX_STREAM_ID,
    Frame,
    FrameTooLarge,
    FrameType,
    FramingError,
    discard_payload,
    encode_frame,
    random_first_stream_id,
    read_frame,
    write_frame,
)

log = logging.getLogger(__name__)

INITIAL_WINDOW = 16

_METHOD_LEN = struct.Struct(">H")
_STATUS = struct.Struct(">II")
_CREDIT = struct.Struct(">I")

M = TypeVar("M", bound=Message)

UnaryHandler = Callable[[Any], Awaitable[Message]]
StreamHandler = Callable[[Any], AsyncGenerator[Message, None]]


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class RpcError(Exception):
    """A call failed with a status code. The agent raises these; the client receives them."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection ended while a call was in flight, or before it could start."""


class _TransportGone(Exception):
    """Writing to the peer failed; the session's read loop will end the connection."""


def encode_request(method: str, body: bytes) -> bytes:
    name = method.encode()
    return _METHOD_LEN.pack(len(name)) + name + body


def decode_request(payload: bytes) -> tuple[str, bytes]:
    if len(payload) < _METHOD_LEN.size:
        raise RpcError(Code.INVALID_ARGUMENT, "request frame too short for a method name")
    (name_len,) = _METHOD_LEN.unpack_from(payload)
    end = _METHOD_LEN.size + name_len
    if len(payload) < end:
        raise RpcError(Code.INVALID_ARGUMENT, "request frame shorter than its method name")
    try:
        method = payload[_METHOD_LEN.size : end].decode()
    except UnicodeDecodeError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, "method name is not UTF-8") from exc
    return method, payload[end:]


def encode_status(code: Code, message: str = "", body: bytes = b"") -> bytes:
    text = message.encode()
    return _STATUS.pack(code, len(text)) + text + body


def decode_status(payload: bytes) -> tuple[Code, str, bytes]:
    if len(payload) < _STATUS.size:
        raise RpcError(Code.INTERNAL, "status frame too short")
    code_value, text_len = _STATUS.unpack_from(payload)
    end = _STATUS.size + text_len
    if len(payload) < end:
        raise RpcError(Code.INTERNAL, "status frame shorter than its message")
    try:
        code = Code(code_value)
    except ValueError:
        code = Code.UNKNOWN
    return code, payload[_STATUS.size : end].decode(errors="replace"), payload[end:]


@dataclass(frozen=True, slots=True)
class _Method:
    request_type: type[Message]
    unary: UnaryHandler | None = None
    stream: StreamHandler | None = None


class _Window:
    """Credit for DATA frames on one streamed reply."""

    def __init__(self, credit: int) -> None:
        self._credit = credit
        self._changed = asyncio.Event()

    async def take(self) -> None:
        while self._credit <= 0:
            self._changed.clear()
            await self._changed.wait()
        self._credit -= 1

    def grant(self, credit: int) -> None:
        self._credit += credit
        self._changed.set()


class RpcServer:
    """Dispatches calls to registered handlers. One instance serves any number of connections."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._methods: dict[str, _Method] = {}
        self.max_payload = max_payload

    def add_unary(self, name: str, request_type: type[Message], handler: UnaryHandler) -> None:
        self._methods[name] = _Method(request_type, unary=handler)

    def add_stream(self, name: str, request_type: type[Message], handler: StreamHandler) -> None:
        self._methods[name] = _Method(request_type, stream=handler)

    def method(self, name: str) -> _Method:
        try:
            return self._methods[name]
        except KeyError:
            raise RpcError(Code.UNIMPLEMENTED, f"no method {name!r}") from None

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve calls until the peer hangs up. Calls still running are cancelled then."""
        await _ServerSession(self, reader, writer).run()


class _ServerSession:
    def __init__(
        self, server: RpcServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, _Window] = {}

    async def run(self) -> None:
        try:
            await self._read_loop()
        except (FramingError, OSError) as exc:
            log.warning("agent connection dropped: %s", exc)
        finally:
            calls = list(self._calls.values())
            for task in calls:
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        while True:
            try:
                frame = await read_frame(self._reader, self._server.max_payload)
            except FrameTooLarge as exc:
                log.warning("rejecting %s", exc)
                await discard_payload(self._reader, exc.length)
                if exc.frame_type == FrameType.REQUEST:
                    self._start(exc.stream_id, self._reject(exc.stream_id, exc))
                continue
            if frame is None:
                return
            if frame.type == FrameType.REQUEST:
                if frame.stream_id in self._calls:
                    log.warning("ignoring a second request on busy stream %d", frame.stream_id)
                    continue
                self._start(frame.stream_id, self._handle(frame.stream_id, frame.payload))
            elif frame.type == FrameType.CANCEL:
                task = self._calls.get(frame.stream_id)
                if task is not None:
                    task.cancel()
            elif frame.type == FrameType.WINDOW:
                window = self._windows.get(frame.stream_id)
                if window is not None and len(frame.payload) == _CREDIT.size:
                    window.grant(_CREDIT.unpack(frame.payload)[0])
            else:
                log.warning("ignoring a %s frame sent to the server", frame.type.name)

    def _start(self, stream_id: int, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            finally:
                self._calls.pop(stream_id, None)
                self._windows.pop(stream_id, None)

        self._calls[stream_id] = asyncio.create_task(run(), name=f"rpc-stream-{stream_id}")

    async def _reject(self, stream_id: int, exc: FrameTooLarge) -> None:
        await self._send_status(stream_id, FrameType.RESPONSE, Code.RESOURCE_EXHAUSTED, str(exc))

    async def _handle(self, stream_id: int, payload: bytes) -> None:
        end = FrameType.RESPONSE
        try:
            name, body = decode_request(payload)
            method = self._server.method(name)
            try:
                request = method.request_type.FromString(body)
            except DecodeError as exc:
                raise RpcError(Code.INVALID_ARGUMENT, f"{name}: bad request: {exc}") from exc
            if method.stream is not None:
                end = FrameType.CLOSE
                await self._stream_reply(stream_id, method.stream(request))
                reply = b""
            else:
                assert method.unary is not None
                reply = (await method.unary(request)).SerializeToString()
        except RpcError as exc:
            await self._send_status(stream_id, end, exc.code, exc.message)
        except _TransportGone:
            pass
        except Exception as exc:
            log.exception("agent call on stream %d failed", stream_id)
            await self._send_status(stream_id, end, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            await self._send_status(stream_id, end, Code.OK, "", reply)

    async def _stream_reply(self, stream_id: int, messages: AsyncGenerator[Message, None]) -> None:
        window = self._windows[stream_id] = _Window(INITIAL_WINDOW)
        async with contextlib.aclosing(messages):
            async for message in messages:
                await window.take()
                await self._write(Frame(stream_id, FrameType.DATA, message.SerializeToString()))

    async def _send_status(
        self, stream_id: int, end: FrameType, code: Code, message: str, body: bytes = b""
    ) -> None:
        frame = Frame(stream_id, end, encode_status(code, message, body))
        try:
            await self._write(frame)
        except FrameTooLarge as exc:
            await self._send_status(stream_id, end, Code.RESOURCE_EXHAUSTED, f"reply: {exc}")
        except _TransportGone:
            pass

    async def _write(self, frame: Frame) -> None:
        try:
            await write_frame(self._writer, frame, self._server.max_payload)
        except OSError as exc:
            raise _TransportGone(str(exc)) from exc


Incoming = Frame | Exception


class RpcClient:
    """The calls of one connection. Give it a connected reader and writer; it runs a read loop.

    Stream ids start at a random odd number: on virtio-serial, replies from a previous host
    connection may still sit in the port, and they must not match this connection's calls.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_payload = max_payload
        self._calls: dict[int, asyncio.Queue[Incoming]] = {}
        self._next_stream_id = random_first_stream_id()
        self._lost: ConnectionLost | None = None
        self._read_task = asyncio.create_task(self._read_loop(), name="rpc-client-read")

    @property
    def closed(self) -> bool:
        return self._lost is not None

    async def close(self) -> None:
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def call(self, method: str, request: Message, reply_type: type[M]) -> M:
        stream_id, incoming = self._open()
        try:
            await self._send(Frame(stream_id, FrameType.REQUEST, self._request(method, request)))
            frame = await self._receive(incoming)
            if frame.type not in (FrameType.RESPONSE, FrameType.CLOSE):
                raise RpcError(Code.INTERNAL, f"{method}: got {frame.type.name} for a unary call")
            code, message, body = decode_status(frame.payload)
            if code != Code.OK:
                raise RpcError(code, message)
            return _parse(reply_type, body, method)
        except asyncio.CancelledError:
            self._control(Frame(stream_id, FrameType.CANCEL))
            raise
        finally:
            self._calls.pop(stream_id, None)

    async def stream(
        self, method: str, request: Message, reply_type: type[M]
    ) -> AsyncGenerator[M, None]:
        """The messages of a streamed reply. Leaving the loop early cancels the call."""
        stream_id, incoming = self._open()
        finished = False
        try:
            await self._send(Frame(stream_id, FrameType.REQUEST, self._request(method, request)))
            consumed = 0
            while True:
                frame = await self._receive(incoming)
                if frame.type == FrameType.DATA:
                    yield _parse(reply_type, frame.payload, method)
                    consumed += 1
                    if consumed >= INITIAL_WINDOW // 2:
                        self._control(Frame(stream_id, FrameType.WINDOW, _CREDIT.pack(consumed)))
                        consumed = 0
                    continue
                finished = True
                code, message, _ = decode_status(frame.payload)
                if code != Code.OK:
                    raise RpcError(code, message)
                return
        finally:
            self._calls.pop(stream_id, None)
            if not finished:
                self._control(Frame(stream_id, FrameType.CANCEL))

    def _request(self, method: str, request: Message) -> bytes:
        return encode_request(method, request.SerializeToString())

    def _open(self) -> tuple[int, asyncio.Queue[Incoming]]:
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))
        stream_id = self._next_stream_id
        while stream_id in self._calls:
            stream_id = (stream_id + 2) % MAX_STREAM_ID | 1
        self._next_stream_id = (stream_id + 2) % MAX_STREAM_ID | 1
        incoming: asyncio.Queue[Incoming] = asyncio.Queue()
        self._calls[stream_id] = incoming
        return stream_id, incoming

    async def _send(self, frame: Frame) -> None:
        try:
            await write_frame(self._writer, frame, self._max_payload)
        except FrameTooLarge as exc:
            raise RpcError(Code.RESOURCE_EXHAUSTED, f"request: {exc}") from exc
        except OSError as exc:
            raise ConnectionLost(f"sending to the agent failed: {exc}") from exc

    def _control(self, frame: Frame) -> None:
        """Send a small frame without waiting: it may run from a cancelled call's cleanup."""
        if self._lost is None and not self._writer.is_closing():
            self._writer.write(encode_frame(frame, self._max_payload))

    async def _receive(self, incoming: asyncio.Queue[Incoming]) -> Frame:
        item = await incoming.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def _read_loop(self) -> None:
        lost = ConnectionLost("the agent closed the connection")
        try:
            while True:
                try:
                    frame = await read_frame(self._reader, self._max_payload)
                except FrameTooLarge as exc:
                    await discard_payload(self._reader, exc.length)
                    incoming = self._calls.get(exc.stream_id)
                    if incoming is not None:
                        incoming.put_nowait(RpcError(Code.RESOURCE_EXHAUSTED, f"reply: {exc}"))
                    continue
                if frame is None:
                    return
                incoming = self._calls.get(frame.stream_id)
                if incoming is None:
                    log.debug(
                        "dropping a %s frame for unknown stream %d",
                        frame.type.name,
                        frame.stream_id,
                    )
                    continue
                incoming.put_nowait(frame)
        except asyncio.CancelledError:
            lost = ConnectionLost("the connection was closed by this side")
            raise
        except (FramingError, OSError) as exc:
            lost = ConnectionLost(f"agent connection broke: {exc}")
        finally:
            self._lost = lost
            for incoming in self._calls.values():
                incoming.put_nowait(lost)
            self._writer.close()


def _parse(reply_type: type[M], body: bytes, method: str) -> M:
    try:
        return reply_type.FromString(body)
    except DecodeError as exc:
        raise RpcError(Code.INTERNAL, f"{method}: undecodable reply: {exc}") from exc

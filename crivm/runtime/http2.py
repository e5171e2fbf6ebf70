"""The server side of an HTTP/2 connection (RFC 9113), as the CRI front end needs it.

Only what a gRPC server speaks is here: a plaintext connection that starts with the client
preface (unix socket, no TLS, no HTTP/1.1 upgrade), requests on client-opened streams, responses
of headers, data and trailers, no server push. Flow control is kept in both directions: what the
peer may send is bounded by the windows this side advertises and replenishes as it consumes,
and response data waits in its stream until the peer's windows have room.

The protocol object runs on the event loop and never blocks: a frame is handled when it
arrives, and everything the frames of one read produce (acks, window updates) goes out in one
write. What a stream means is left to the ``StreamListener`` (``crivm.runtime.grpc_server``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

from crivm.runtime.hpack_decoder import DEFAULT_TABLE_SIZE, HeaderDecoder, HpackError

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

# What this side advertises. A CRI request is small (CreateContainer's config is a few KiB),
# so one window of a MiB per stream covers nearly every call without a window update; the
# connection's window is larger so that many concurrent calls do not wait on each other.
MAX_CONCURRENT_STREAMS = 1024
STREAM_RECEIVE_WINDOW = 1 << 20
CONNECTION_RECEIVE_WINDOW = 16 << 20
# A request's header block (with its continuations) above this ends the connection.
MAX_HEADER_BLOCK = 64 << 10
# A streaming response waits once this much of it is queued behind the peer's window.
STREAM_HIGH_WATER = 1 << 20

# Frames to go out in one write; response data as views of the caller's bytes.
Frames = list[bytes | memoryview]

_FRAME_HEADER = struct.Struct(">BHBBI")  # length is 24 bits: one byte, then two
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


class ProtocolViolation(Exception):
    """A protocol error that ends the connection with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """One request/response exchange. ``body`` is the request's DATA so far."""

    __slots__ = (
        "id", "headers", "body", "ended_remote", "closed", "send_window", "receive_window",
        "pending", "pending_size", "trailers", "drained", "call",
    )

    def __init__(self, stream_id: int, headers: list[tuple[str, str]], send_window: int) -> None:
        self.id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.ended_remote = False
        self.closed = False  # the response has ended (or the stream was reset)
        self.send_window = send_window
        self.receive_window = STREAM_RECEIVE_WINDOW
        # Response DATA waiting for window, as views of the bytes handed in: a large
        # response is copied once, into the write that sends it.
        self.pending: deque[memoryview] = deque()
        self.pending_size = 0
        self.trailers: bytes | None = None  # to go out once ``pending`` has
        self.drained: asyncio.Event | None = None
        self.call: object = None  # the listener's state for this stream

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class StreamListener(Protocol):
    def request_received(self, connection: Http2Connection, stream: Stream) -> None:
        """The request's headers and body are complete (the peer ended its side)."""

    def request_too_large(self, connection: Http2Connection, stream: Stream) -> None:
        """The body outgrew ``max_body``; the listener answers, the rest is discarded."""

    def stream_reset(self, connection: Http2Connection, stream: Stream) -> None:
        """The peer reset the stream or the connection is gone: stop working on it."""


class Http2Connection(asyncio.Protocol):
    def __init__(self, listener: StreamListener, max_body: int,
                 on_close: Callable[[Http2Connection], None] | None = None) -> None:
        self.listener = listener
        self.max_body = max_body
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._buffer = b""
        self._preface_seen = False
        self._decoder = HeaderDecoder(DEFAULT_TABLE_SIZE)
        self._last_stream_id = 0
        self._continuing: tuple[int, int, bytearray] | None = None  # stream id, flags, block
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_FRAME_SIZE
        self._send_window = DEFAULT_WINDOW  # the peer's connection window for our DATA
        self._receive_window = CONNECTION_RECEIVE_WINDOW
        self._going_away = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
                (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_RECEIVE_WINDOW),
            )
        )
        grow = _U32.pack(CONNECTION_RECEIVE_WINDOW - DEFAULT_WINDOW)
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self._preface_seen:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    self._abort("not an HTTP/2 client")
                self._buffer = buffer
                return
            if not buffer.startswith(PREFACE):
                self._abort("not an HTTP/2 client")
                return
            buffer = buffer[len(PREFACE):]
            self._preface_seen = True
        out: Frames = []
        pos = 0
        size = len(buffer)
        try:
            while size - pos >= 9:
                high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(buffer, pos)
                length = high << 16 | low
                if length > DEFAULT_FRAME_SIZE:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if size - pos < 9 + length:
                    break
                payload = buffer[pos + 9:pos + 9 + length]
                pos += 9 + length
                self._frame(kind, flags, stream_id & MAX_WINDOW, payload, out)
        except ProtocolViolation as exc:
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
            self._fail(exc.code, str(exc))
            return
        self._buffer = buffer[pos:]
        self._write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            self._close_stream(stream)
            self.listener.stream_reset(self, stream)
        self.transport = None
        if self._on_close is not None:
            self._on_close(self)

    # -- frames in ---------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes,
               out: Frames) -> None:
        if self._continuing is not None and kind != CONTINUATION:
            raise ProtocolViolation(PROTOCOL_ERROR, "header block interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload, out)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload, out)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, out)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise ProtocolViolation(PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if not stream_id or len(payload) != 4:
                raise ProtocolViolation(PROTOCOL_ERROR, "bad RST_STREAM")
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._close_stream(stream)
                self.listener.stream_reset(self, stream)
        elif kind == GOAWAY:
            # The client opens nothing new; what it started still gets its answers (the
            # connection closes after the last, in ``_write``).
            self._going_away = True
        elif kind == PUSH_PROMISE:
            raise ProtocolViolation(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown frame types are ignored, as the RFC asks.

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = _unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self._continuing = (stream_id, flags, bytearray(payload))

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is None or self._continuing[0] != stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        block = self._continuing[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            first_flags = self._continuing[1]
            self._continuing = None
            self._header_block(stream_id, first_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        # Decode before any check: the decoder's table must see every block in order.
        try:
            headers = self._decoder.decode(block)
        except HpackError as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, str(exc)) from exc
        stream = self.streams.get(stream_id)
        if stream is not None:
            # Trailers from the client: only an end of its side is meaningful.
            if not flags & END_STREAM or stream.ended_remote:
                raise ProtocolViolation(PROTOCOL_ERROR, "HEADERS in the middle of a request")
            self._end_remote(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        self._last_stream_id = stream_id
        if self._going_away or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._write(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        stream = Stream(stream_id, headers, self._peer_initial_window)
        self.streams[stream_id] = stream
        if flags & END_STREAM:
            self._end_remote(stream)

    def _data(self, flags: int, stream_id: int, payload: bytes, out: Frames) -> None:
        if not stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "DATA on stream 0")
        # Flow control counts the whole payload, padding included.
        self._receive_window -= len(payload)
        if self._receive_window < 0:
            raise ProtocolViolation(FLOW_CONTROL_ERROR, "peer overran the connection window")
        if self._receive_window < CONNECTION_RECEIVE_WINDOW // 2:
            out.append(frame(WINDOW_UPDATE, 0, 0,
                             _U32.pack(CONNECTION_RECEIVE_WINDOW - self._receive_window)))
            self._receive_window = CONNECTION_RECEIVE_WINDOW
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise ProtocolViolation(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream this side closed or refused; its data is dropped
        if stream.ended_remote:
            raise ProtocolViolation(STREAM_CLOSED, f"DATA after the end of stream {stream_id}")
        stream.receive_window -= len(payload)
        if stream.receive_window < 0:
            raise ProtocolViolation(FLOW_CONTROL_ERROR, f"peer overran stream {stream_id}")
        if not stream.closed:
            stream.body += _unpad(flags, payload)
            if len(stream.body) > self.max_body:
                stream.body = bytearray()
                self.listener.request_too_large(self, stream)
        if flags & END_STREAM:
            self._end_remote(stream)
        elif stream.closed:
            return  # answered already; the peer was told to stop, nothing more to take in
        elif stream.receive_window < STREAM_RECEIVE_WINDOW // 2:
            out.append(frame(WINDOW_UPDATE, 0, stream_id,
                             _U32.pack(STREAM_RECEIVE_WINDOW - stream.receive_window)))
            stream.receive_window = STREAM_RECEIVE_WINDOW

    def _end_remote(self, stream: Stream) -> None:
        stream.ended_remote = True
        if stream.closed:
            self._forget(stream)
        else:
            self.listener.request_received(self, stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes, out: Frames) -> None:
        if stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise ProtocolViolation(PROTOCOL_ERROR, f"max frame size {value}")
                self._peer_max_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolViolation(PROTOCOL_ERROR, "ENABLE_PUSH above 1")
            # The peer's header table size bounds an encoder table this side never uses.
        out.append(frame(SETTINGS, ACK, 0))
        self._flush_all(out)

    def _window_update(self, stream_id: int, payload: bytes, out: Frames) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if not stream_id:
            if not increment:
                raise ProtocolViolation(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolViolation(FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_all(out)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not increment or stream.send_window + increment > MAX_WINDOW:
            self._reset(stream, PROTOCOL_ERROR if not increment else FLOW_CONTROL_ERROR, out)
            return
        stream.send_window += increment
        self._flush(stream, out)

    # -- frames out --------------------------------------------------------------------

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool = False) -> None:
        """A header block, now: headers are not flow controlled. With ``end_stream`` this is
        a trailers-only response and the stream is done."""
        if stream.closed or self.transport is None:
            return
        out: Frames = [self._header_frames(stream.id, block, end_stream)]
        if end_stream:
            self._finished(stream, out)
        self._write(b"".join(out))

    def send_response(self, stream: Stream, headers: bytes, data: tuple[bytes, ...],
                      trailers: bytes) -> None:
        """A whole response, in one write when the peer's windows take the data."""
        if stream.closed or self.transport is None:
            return
        out: Frames = [self._header_frames(stream.id, headers, False)]
        _queue(stream, data)
        stream.trailers = trailers
        self._flush(stream, out)
        self._write(b"".join(out))

    def send_data(self, stream: Stream, data: tuple[bytes, ...]) -> None:
        if stream.closed or self.transport is None:
            return
        _queue(stream, data)
        out: Frames = []
        self._flush(stream, out)
        if out:
            self._write(b"".join(out))

    def send_trailers(self, stream: Stream, block: bytes) -> None:
        if stream.closed or self.transport is None:
            return
        stream.trailers = block
        out: Frames = []
        self._flush(stream, out)
        if out:
            self._write(b"".join(out))

    async def drain(self, stream: Stream) -> None:
        """Wait while much of this stream's output is queued behind the peer's window."""
        while stream.pending_size > STREAM_HIGH_WATER and not stream.closed:
            stream.drained = asyncio.Event()
            await stream.drained.wait()

    def reset(self, stream: Stream, code: int) -> None:
        out: Frames = []
        self._reset(stream, code, out)
        self._write(b"".join(out))

    def go_away(self) -> None:
        """Graceful shutdown: no new streams; the connection closes when the last ends."""
        if self._going_away or self.transport is None:
            return
        self._going_away = True
        self._write(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream_id) + _U32.pack(NO_ERROR)))
        self._close_if_idle()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _header_frames(self, stream_id: int, block: bytes, end_stream: bool) -> bytes:
        flags = END_STREAM if end_stream else 0
        limit = self._peer_max_frame
        if len(block) <= limit:
            return frame(HEADERS, flags | END_HEADERS, stream_id, block)
        pieces = [block[i:i + limit] for i in range(0, len(block), limit)]
        frames = [frame(HEADERS, flags, stream_id, pieces[0])]
        frames += [frame(CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1]]
        frames.append(frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))
        return b"".join(frames)

    def _flush(self, stream: Stream, out: Frames) -> None:
        """Move as much of ``stream``'s pending data into ``out`` as the windows allow,
        then its trailers once nothing is pending."""
        pending = stream.pending
        while pending:
            size = min(stream.pending_size, self._send_window, stream.send_window,
                       self._peer_max_frame)
            if size <= 0:
                break
            out.append(_FRAME_HEADER.pack(size >> 16, size & 0xFFFF, DATA, 0, stream.id))
            left = size
            while left:
                chunk = pending[0]
                if len(chunk) <= left:
                    out.append(chunk)
                    pending.popleft()
                    left -= len(chunk)
                else:
                    out.append(chunk[:left])
                    pending[0] = chunk[left:]
                    left = 0
            stream.pending_size -= size
            self._send_window -= size
            stream.send_window -= size
        if stream.drained is not None and stream.pending_size <= STREAM_HIGH_WATER:
            stream.drained.set()
            stream.drained = None
        if not pending and stream.trailers is not None:
            out.append(self._header_frames(stream.id, stream.trailers, True))
            stream.trailers = None
            self._finished(stream, out)

    def _flush_all(self, out: Frames) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.trailers is not None:
                self._flush(stream, out)

    def _finished(self, stream: Stream, out: Frames) -> None:
        """This side ended the stream (its last frame is in ``out``). A peer still sending
        is told to stop (RFC 9113 section 8.1: RST_STREAM with NO_ERROR after a complete
        response)."""
        self._close_stream(stream)
        if not stream.ended_remote:
            out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        self._forget(stream)

    def _reset(self, stream: Stream, code: int, out: Frames) -> None:
        if stream.closed:
            return
        out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self._close_stream(stream)
        self._forget(stream)
        self.listener.stream_reset(self, stream)

    def _close_stream(self, stream: Stream) -> None:
        stream.closed = True
        stream.pending.clear()
        stream.pending_size = 0
        stream.trailers = None
        if stream.drained is not None:
            stream.drained.set()
            stream.drained = None

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)

    def _close_if_idle(self) -> None:
        if self._going_away and not self.streams and self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        """Write, then close if a going-away connection has no stream left (after the
        write, so that the last stream's final frames go out first)."""
        if self.transport is not None and data:
            self.transport.write(data)
        self._close_if_idle()

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing an HTTP/2 connection: %s", message)
        debug = message.encode("utf-8", "replace")[:256]
        self._write(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream_id) + _U32.pack(code) + debug))
        self.close()

    def _abort(self, message: str) -> None:
        log.warning("closing a connection: %s", message)
        self.close()


def _queue(stream: Stream, data: tuple[bytes, ...]) -> None:
    for part in data:
        if part:
            stream.pending.append(memoryview(part))
            stream.pending_size += len(part)


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ProtocolViolation(PROTOCOL_ERROR, "bad padding")
    return payload[1:len(payload) - payload[0]]

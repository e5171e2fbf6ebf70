"""A SPDY/3.1 server session over any byte transport: streams the client opens, replies, data.

The session is transport-agnostic: it is fed received bytes and hands bytes to an async
``send``. That lets the same code run on an upgraded HTTP/1.1 connection and inside WebSocket
binary messages (kubectl's tunnelled port-forward).

One writer task sends every outgoing frame in order, because header compression is a single
zlib stream whose blocks must reach the wire in the order they were compressed.

Flow control: kubectl, crictl and critest use moby/spdystream, which never sends WINDOW_UPDATE
and ignores ours. Honouring the peer's 64 KiB window would stall every large output, so sends
are limited by TCP backpressure only. Received data is bounded instead by pausing the
transport when too much is buffered, and WINDOW_UPDATEs are still sent so a strict SPDY/3.1
client keeps sending.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from crivm.runtime.streaming import spdy
from crivm.runtime.streaming.backend import StreamClosed

log = logging.getLogger(__name__)

# Outgoing DATA frames are cut to this size so streams interleave fairly.
MAX_DATA_CHUNK = 32 * 1024
_PAUSE_ABOVE = 1024 * 1024
_RESUME_BELOW = 256 * 1024
_WINDOW_UPDATE_EVERY = 32 * 1024

Send = Callable[[bytes], Awaitable[None]]


class SpdyStream:
    """One client-opened stream: read what the client sends, write back, half-close, reset."""

    def __init__(self, session: SpdySession, stream_id: int, headers: dict[str, list[str]]):
        self.session = session
        self.stream_id = stream_id
        self.headers = headers
        self._inbox: collections.deque[bytes] = collections.deque()
        self._arrived = asyncio.Event()
        self.remote_closed = False
        self.local_closed = False
        self.reset_received = False
        self._unacked = 0

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    async def read(self) -> bytes:
        while not self._inbox:
            if self.remote_closed or self.reset_received:
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        chunk = self._inbox.popleft()
        self.session._consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_DATA_CHUNK):
            self._check_writable()
            chunk = bytes(view[start:start + MAX_DATA_CHUNK])
            await self.session._send_and_wait(spdy.DataFrame(self.stream_id, chunk))

    async def close(self) -> None:
        if self.local_closed or self.reset_received or self.session.is_closed:
            self.local_closed = True
            return
        self.local_closed = True
        await self.session._send_and_wait(spdy.DataFrame(self.stream_id, b"", spdy.FLAG_FIN))
        self.session._forget_if_done(self)

    async def reset(self, status: int = spdy.CANCEL) -> None:
        if self.reset_received or self.session.is_closed:
            return
        self.local_closed = self.remote_closed = True
        self._deliver_eof()
        await self.session._send_and_wait(spdy.RstStream(self.stream_id, status))
        self.session._forget(self)

    def _check_writable(self) -> None:
        if self.reset_received or self.session.is_closed:
            raise StreamClosed(f"SPDY stream {self.stream_id} was reset or its connection closed")
        if self.local_closed:
            raise StreamClosed(f"SPDY stream {self.stream_id} is already closed for writing")

    def _deliver(self, data: bytes) -> None:
        self._inbox.append(data)
        self._arrived.set()

    def _deliver_eof(self) -> None:
        self._arrived.set()


class SpdySession:
    """The server end of one SPDY connection.

    ``on_stream`` is called for each SYN_STREAM; returning False refuses the stream. Accepted
    streams get their SYN_REPLY before any data the handler writes.
    """

    def __init__(
        self,
        send: Send,
        on_stream: Callable[[SpdyStream], bool],
        pause_reading: Callable[[], None] | None = None,
        resume_reading: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        self._on_stream = on_stream
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._codec = spdy.HeaderCodec()
        self._parser = spdy.FrameParser(self._codec)
        self._streams: dict[int, SpdyStream] = {}
        self._last_client_stream = 0
        self._buffered = 0
        self._reading_paused = False
        self._outgoing: asyncio.Queue[tuple[spdy.Frame, asyncio.Future[None] | None]] = (
            asyncio.Queue()
        )
        self.closed = asyncio.Event()
        # Set when the transport reports the peer gone (EOF or reset), not by our close().
        self.peer_gone = asyncio.Event()
        self.is_closed = False
        self._writer = asyncio.get_running_loop().create_task(self._write_frames())

    # -- receiving ------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.is_closed:
            return
        try:
            for frame in self._parser.feed(data):
                self._handle(frame)
        except spdy.SpdyProtocolError as exc:
            log.warning("closing SPDY connection: %s", exc)
            self._queue(spdy.GoAway(self._last_client_stream, spdy.GOAWAY_PROTOCOL_ERROR))
            self._terminate()

    def connection_lost(self) -> None:
        self.peer_gone.set()
        self._terminate()

    def _handle(self, frame: spdy.Frame) -> None:
        match frame:
            case spdy.DataFrame(stream_id, data, flags):
                stream = self._streams.get(stream_id)
                if stream is None or stream.remote_closed:
                    if stream_id > self._last_client_stream:
                        self._queue(spdy.RstStream(stream_id, spdy.INVALID_STREAM))
                    return
                if data:
                    stream._deliver(data)
                    self._buffered += len(data)
                    if self._buffered > _PAUSE_ABOVE and not self._reading_paused:
                        self._reading_paused = True
                        if self._pause_reading is not None:
                            self._pause_reading()
                if flags & spdy.FLAG_FIN:
                    self._remote_fin(stream)
            case spdy.SynStream():
                self._open_stream(frame)
            case spdy.RstStream(stream_id):
                stream = self._streams.pop(stream_id, None)
                if stream is not None:
                    stream.reset_received = stream.remote_closed = True
                    stream._deliver_eof()
            case spdy.HeadersFrame(stream_id, _, flags):
                stream = self._streams.get(stream_id)
                if stream is not None and flags & spdy.FLAG_FIN:
                    self._remote_fin(stream)
            case spdy.Ping(ping_id):
                # Client pings are odd; ours would be even and we send none.
                if ping_id % 2 == 1:
                    self._queue(frame)
            case spdy.GoAway():
                # The client opens no more streams; running ones finish normally.
                pass
            case spdy.SynReply() | spdy.Settings() | spdy.WindowUpdate() | spdy.UnknownControl():
                pass

    def _open_stream(self, frame: spdy.SynStream) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == 0 or stream_id <= self._last_client_stream:
            self._queue(spdy.RstStream(stream_id, spdy.PROTOCOL_ERROR))
            return
        self._last_client_stream = stream_id
        stream = SpdyStream(self, stream_id, dict(frame.headers))
        if not self._on_stream(stream):
            self._queue(spdy.RstStream(stream_id, spdy.REFUSED_STREAM))
            return
        self._streams[stream_id] = stream
        self._queue(spdy.SynReply(stream_id, {}))
        if frame.flags & spdy.FLAG_FIN:
            self._remote_fin(stream)

    def _remote_fin(self, stream: SpdyStream) -> None:
        stream.remote_closed = True
        stream._deliver_eof()
        self._forget_if_done(stream)

    def _consumed(self, stream: SpdyStream, size: int) -> None:
        self._buffered -= size
        if self._reading_paused and self._buffered < _RESUME_BELOW:
            self._reading_paused = False
            if self._resume_reading is not None:
                self._resume_reading()
        stream._unacked += size
        if stream._unacked >= _WINDOW_UPDATE_EVERY and not stream.remote_closed:
            self._queue(spdy.WindowUpdate(stream.stream_id, stream._unacked))
            stream._unacked = 0

    def _forget_if_done(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed and not stream._inbox:
            self._forget(stream)

    def _forget(self, stream: SpdyStream) -> None:
        self._streams.pop(stream.stream_id, None)

    # -- sending --------------------------------------------------------------------------

    def _queue(self, frame: spdy.Frame) -> None:
        if not self.is_closed:
            self._outgoing.put_nowait((frame, None))

    async def _send_and_wait(self, frame: spdy.Frame) -> None:
        if self.is_closed:
            raise StreamClosed("the SPDY connection is closed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outgoing.put_nowait((frame, done))
        await done

    async def _write_frames(self) -> None:
        waiting: list[asyncio.Future[None]] = []
        try:
            while True:
                frame, done = await self._outgoing.get()
                batch = [spdy.encode_frame(frame, self._codec)]
                waiting = [done] if done is not None else []
                while not self._outgoing.empty() and len(batch) < 64:
                    frame, done = self._outgoing.get_nowait()
                    batch.append(spdy.encode_frame(frame, self._codec))
                    if done is not None:
                        waiting.append(done)
                await self._send(b"".join(batch))
                for future in waiting:
                    if not future.done():
                        future.set_result(None)
                waiting = []
        except (OSError, ConnectionError, StreamClosed) as exc:
            log.debug("SPDY connection lost while sending: %s", exc)
            self._terminate()
        finally:
            self._fail_waiters(waiting)

    def _fail_waiters(self, waiting: list[asyncio.Future[None]]) -> None:
        for future in waiting:
            if not future.done():
                future.set_exception(StreamClosed("the SPDY connection closed"))

    def _terminate(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for stream in list(self._streams.values()):
            stream.reset_received = stream.remote_closed = True
            stream._deliver_eof()
        self._streams.clear()
        pending: list[asyncio.Future[None]] = []
        while not self._outgoing.empty():
            _, done = self._outgoing.get_nowait()
            if done is not None:
                pending.append(done)
        self._fail_waiters(pending)
        if self._reading_paused and self._resume_reading is not None:
            self._resume_reading()
        self.closed.set()

    async def close(self, linger_s: float = 5.0) -> None:
        """Send GOAWAY after everything queued, give the client ``linger_s`` to read it all and
        hang up (closing first could reset the connection under unread data), then stop.
        The caller closes the transport."""
        if not self.is_closed:
            with contextlib.suppress(StreamClosed, TimeoutError):
                async with asyncio.timeout(linger_s):
                    await self._send_and_wait(spdy.GoAway(self._last_client_stream))
                    await self.peer_gone.wait()
        self._terminate()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

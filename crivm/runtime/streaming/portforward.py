"""Port forwarding (``portforward.k8s.io``) over SPDY and over WebSocket channels.

SPDY: for every forwarded connection the client opens two streams, ``streamtype: error`` and
``streamtype: data``, both carrying ``port`` and the same ``requestid``. Bytes on the data
stream go to the port; a failure is written as text on the error stream.

WebSocket: the ports are fixed by the request. Port i uses channel 2i for data and 2i+1 for
errors, and the server first sends the port, 2 bytes little-endian, on both channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct

from crivm.errors import CrivmError, NotFound, Unavailable
from crivm.netbridge.netns import call_in_netns
from crivm.runtime.streaming.backend import ByteSink, ByteSource, StreamBackend, StreamClosed
from crivm.runtime.streaming.process_io import READ_SIZE
from crivm.runtime.streaming.spdy_session import SpdyStream
from crivm.runtime.streaming.tokens import PortForwardSpec
from crivm.runtime.streaming.websocket import ChannelMux

log = logging.getLogger(__name__)

PROTOCOL = "portforward.k8s.io"
STREAM_PAIR_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 10.0


# -- the far end: a TCP connection inside the pod's network namespace ----------------------

def _connect_blocking(port: int) -> socket.socket:
    # Runs on a thread inside the netns: the socket belongs to that namespace for life.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(_CONNECT_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_in_netns(netns_path: str, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` in the network namespace pinned at the path
    (the host's own when the path is empty)."""
    try:
        if not netns_path:
            return await asyncio.to_thread(_connect_blocking, port)
        return await call_in_netns(netns_path, _connect_blocking, port)
    except (TimeoutError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
            raise NotFound(f"network namespace {netns_path} is gone") from exc
        raise Unavailable(f"cannot connect to port {port} in the pod: {exc}") from exc


async def forward_socket(sock: socket.socket, source: ByteSource, sink: ByteSink) -> None:
    """Copy between the client and ``sock`` until both directions ended; closes ``sock``."""
    reader, writer = await asyncio.open_connection(sock=sock)

    async def upstream() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await source.read():
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    async def downstream() -> None:
        try:
            while chunk := await reader.read(READ_SIZE):
                await sink.write(chunk)
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(StreamClosed):
                await sink.close()

    up = asyncio.create_task(upstream())
    down = asyncio.create_task(downstream())
    try:
        await down
        # The port closed its side; whatever the client still sends has nowhere to go.
        await asyncio.wait_for(up, 1.0)
    except TimeoutError:
        pass
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- SPDY -------------------------------------------------------------------------------------

class _Pair:
    def __init__(self) -> None:
        self.data: SpdyStream | None = None
        self.error: SpdyStream | None = None


def valid_stream(stream: SpdyStream) -> bool:
    """Whether a new stream may be accepted (the check kubelet makes before replying)."""
    try:
        port = int(stream.header("port"))
    except ValueError:
        return False
    return 0 < port <= 0xFFFF and stream.header("streamtype") in ("data", "error")


async def serve_spdy(
    backend: StreamBackend, spec: PortForwardSpec, incoming: asyncio.Queue[SpdyStream]
) -> None:
    """Pair streams by request id and forward each complete pair, until the connection ends
    (the caller cancels this when it does)."""
    pairs: dict[str, _Pair] = {}
    running: set[asyncio.Task[None]] = set()
    try:
        while True:
            stream = await incoming.get()
            request_id = stream.header("requestid") or _legacy_request_id(stream)
            created = request_id not in pairs
            pair = pairs.setdefault(request_id, _Pair())
            if stream.header("streamtype") == "data":
                pair.data = stream
            else:
                pair.error = stream
            if created:
                _expire_later(pairs, request_id, running)
            if pair.data is not None and pair.error is not None:
                del pairs[request_id]
                task = asyncio.create_task(_forward_pair(backend, spec, pair.data, pair.error))
                running.add(task)
                task.add_done_callback(running.discard)
    finally:
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _legacy_request_id(stream: SpdyStream) -> str:
    # Clients older than the requestID header open error, then data, with consecutive ids.
    offset = 2 if stream.header("streamtype") == "data" else 0
    return str(stream.stream_id - offset)


def _expire_later(pairs: dict[str, _Pair], request_id: str, running: set[asyncio.Task[None]]
                  ) -> None:
    async def expire() -> None:
        await asyncio.sleep(STREAM_PAIR_TIMEOUT_S)
        pair = pairs.pop(request_id, None)
        if pair is None:
            return
        for stream in (pair.error, pair.data):
            if stream is not None:
                with contextlib.suppress(StreamClosed):
                    if stream is pair.error:
                        await stream.write(b"timed out waiting for the other stream")
                    await stream.close()

    task = asyncio.create_task(expire())
    running.add(task)
    task.add_done_callback(running.discard)


async def _forward_pair(
    backend: StreamBackend, spec: PortForwardSpec, data: SpdyStream, error: SpdyStream
) -> None:
    port = int(data.header("port"))
    try:
        await backend.port_forward(spec.pod_id, port, data, data)
    except CrivmError as exc:
        message = f"error forwarding port {port} to pod {spec.pod_id}: {exc}"
        log.info("%s", message, extra={"pod_id": spec.pod_id})
        with contextlib.suppress(StreamClosed):
            await error.write(message.encode())
    finally:
        for stream in (data, error):
            with contextlib.suppress(StreamClosed):
                await stream.close()


# -- WebSocket channels ----------------------------------------------------------------------

async def serve_websocket(
    backend: StreamBackend, spec: PortForwardSpec, mux: ChannelMux
) -> None:
    sources = [mux.source(2 * index) for index in range(len(spec.ports))]
    receiver = asyncio.create_task(mux.receive())
    try:
        forwards = []
        for index, port in enumerate(spec.ports):
            data, error = mux.sink(2 * index), mux.sink(2 * index + 1)
            prefix = struct.pack("<H", port)
            await data.write(prefix)
            await error.write(prefix)
            forwards.append(_forward_channel(backend, spec, port, sources[index], data, error))
        await asyncio.gather(*forwards)
    except StreamClosed:
        pass
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)


async def _forward_channel(
    backend: StreamBackend, spec: PortForwardSpec, port: int,
    source: ByteSource, data: ByteSink, error: ByteSink,
) -> None:
    try:
        await backend.port_forward(spec.pod_id, port, source, data)
    except CrivmError as exc:
        with contextlib.suppress(StreamClosed):
            await error.write(f"error forwarding port {port} to pod {spec.pod_id}: {exc}".encode())

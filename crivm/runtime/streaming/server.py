"""The streaming HTTP server: ``/exec/<token>``, ``/attach/<token>``, ``/portforward/<token>``.

The CRI calls park a validated request in the token cache and return the URL; a client
(kubelet, crictl, critest) then connects here and upgrades the connection to SPDY/3.1 or to
a WebSocket. A token works once; a reused, expired or unknown one is answered 404.

aiohttp serves HTTP and WebSockets. For SPDY the upgraded connection is taken over the way
aiohttp's own WebSocket support does it: after the 101 response the protocol hands every
received byte to a payload parser we install, and we write to its transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from crivm.errors import CrivmError, Unavailable
from crivm.runtime.streaming import portforward, remotecommand
from crivm.runtime.streaming.backend import ResizeQueue, Stdio, StreamBackend, StreamClosed
from crivm.runtime.streaming.remotecommand import V4, V5, Channels, RemoteSpec
from crivm.runtime.streaming.spdy_session import SpdySession, SpdyStream
from crivm.runtime.streaming.tokens import KIND_OF, PortForwardSpec, StreamSpec, TokenCache
from crivm.runtime.streaming.websocket import ChannelMux

log = logging.getLogger(__name__)

PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_HEADER = "X-Accepted-Stream-Protocol-Versions"
# kubectl port-forward over WebSocket tunnels the SPDY session through binary messages.
TUNNELED_PORTFORWARD = "SPDY/3.1+" + portforward.PROTOCOL
WS_REMOTECOMMAND = (V5, V4, "v4.base64.channel.k8s.io", "channel.k8s.io",
                    "base64.channel.k8s.io")
WS_PORTFORWARD = (TUNNELED_PORTFORWARD, "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                  "channel.k8s.io", "base64.channel.k8s.io")


class StreamingServer:
    def __init__(self, backend: StreamBackend, address: str, port: int, token_ttl_s: float):
        self.backend = backend
        self.address = address
        self.requested_port = port
        self.tokens = TokenCache(token_ttl_s)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._sessions: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        app = web.Application()
        for kind in ("exec", "attach", "portforward"):
            app.router.add_route("*", f"/{kind}/{{token}}", self._handler(kind))
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, self.requested_port))
        except OSError as exc:
            sock.close()
            raise Unavailable(
                f"streaming server cannot listen on {self.address}:{self.requested_port}: "
                f"{exc.strerror}"
            ) from exc
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("streaming server listening on %s", self.base_url)

    async def close(self) -> None:
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def url_for(self, spec: StreamSpec) -> str:
        """Park ``spec`` and return the single-use URL a client connects to."""
        return f"{self.base_url}/{KIND_OF[type(spec)]}/{self.tokens.issue(spec)}"

    def _handler(self, kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            spec = self.tokens.redeem(kind, request.match_info["token"])
            if spec is None:
                raise web.HTTPNotFound(text="unknown, used or expired streaming token\n")
            # Track the session so close() can end it; cancelling it kills its processes.
            task = asyncio.current_task()
            assert task is not None
            self._sessions.add(task)
            try:
                return await self._serve(request, spec)
            finally:
                self._sessions.discard(task)

        return handle

    async def _serve(self, request: web.Request, spec: StreamSpec) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower()
        if upgrade == "websocket":
            return await self._serve_websocket(request, spec)
        if upgrade.startswith("spdy/3"):
            return await self._serve_spdy(request, spec)
        raise web.HTTPBadRequest(text="this endpoint needs an Upgrade to SPDY/3.1 or websocket\n")

    # -- SPDY -------------------------------------------------------------------------------

    async def _serve_spdy(self, request: web.Request, spec: StreamSpec) -> web.StreamResponse:
        supported = (
            (portforward.PROTOCOL,) if isinstance(spec, PortForwardSpec)
            else remotecommand.SPDY_PROTOCOLS
        )
        offered = [
            p.strip() for value in request.headers.getall(PROTOCOL_HEADER, [])
            for p in value.split(",") if p.strip()
        ]
        if not offered:
            raise web.HTTPBadRequest(
                text=f"unable to upgrade: header {PROTOCOL_HEADER} is missing\n"
            )
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            raise web.HTTPForbidden(
                text=f"unable to upgrade: client offers {offered}, "
                f"server accepts {list(supported)}\n",
                headers={ACCEPTED_HEADER: ", ".join(supported)},
            )
        response = web.StreamResponse(
            status=101,
            headers={"Connection": "Upgrade", "Upgrade": "SPDY/3.1", PROTOCOL_HEADER: chosen},
        )
        response.force_close()
        await response.prepare(request)
        transport = request.transport
        protocol = request.protocol
        if transport is None or transport.is_closing():
            return response

        async def send(data: bytes) -> None:
            if transport.is_closing():
                raise ConnectionResetError("the streaming connection is closed")
            transport.write(data)
            if protocol.writing_paused:
                await protocol._drain_helper()

        incoming: asyncio.Queue[SpdyStream] = asyncio.Queue()
        accept: Callable[[SpdyStream], bool] = _accept_any
        if isinstance(spec, PortForwardSpec):
            accept = portforward.valid_stream

        def on_stream(stream: SpdyStream) -> bool:
            if not accept(stream):
                return False
            incoming.put_nowait(stream)
            return True

        session = SpdySession(send, on_stream, transport.pause_reading, transport.resume_reading)
        # aiohttp feeds the bytes after an accepted upgrade to this parser (as for WebSockets).
        protocol.set_parser(_SessionFeeder(session))  # type: ignore[arg-type]
        try:
            if isinstance(spec, PortForwardSpec):
                work = portforward.serve_spdy(self.backend, spec, incoming)
            else:
                work = self._remote_command_spdy(spec, chosen, incoming)
            await _until_peer_gone(work, session.peer_gone)
        finally:
            await session.close()
            transport.close()
        return response

    async def _remote_command_spdy(
        self, spec: RemoteSpec, protocol: str, incoming: asyncio.Queue[SpdyStream]
    ) -> None:
        try:
            channels, _ = await remotecommand.collect_spdy_streams(incoming, spec, protocol)
        except CrivmError as exc:
            log.warning("streaming session abandoned: %s", exc)
            return
        await remotecommand.serve(self.backend, spec, channels)

    # -- WebSocket --------------------------------------------------------------------------

    async def _serve_websocket(self, request: web.Request, spec: StreamSpec) -> web.StreamResponse:
        supported = WS_PORTFORWARD if isinstance(spec, PortForwardSpec) else WS_REMOTECOMMAND
        offered = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        if offered and not any(p in supported for p in offered):
            raise web.HTTPBadRequest(
                text=f"requested protocols {offered} are not supported: {list(supported)}\n"
            )
        # Our order of preference wins, as in kubelet; aiohttp picks the first of ours offered.
        ws = web.WebSocketResponse(protocols=supported, max_msg_size=0, autoping=True)
        await ws.prepare(request)
        chosen = ws.ws_protocol or ""
        try:
            if isinstance(spec, PortForwardSpec):
                await self._portforward_websocket(ws, spec, chosen, request)
            else:
                await self._remote_command_websocket(ws, spec, chosen)
        finally:
            await ws.close()
        return ws

    async def _remote_command_websocket(
        self, ws: web.WebSocketResponse, spec: RemoteSpec, protocol: str
    ) -> None:
        mux = ChannelMux(ws, protocol, close_signals=protocol == V5)
        resize: ResizeQueue | None = asyncio.Queue() if spec.tty else None
        stdio = Stdio(
            stdin=mux.source(remotecommand.STDIN) if spec.stdin else None,
            stdout=mux.sink(remotecommand.STDOUT) if spec.stdout else None,
            stderr=mux.sink(remotecommand.STDERR) if spec.stderr else None,
            tty=spec.tty, resize=resize,
        )
        structured = protocol.startswith(("v4.", "v5."))
        channels = Channels(stdio, mux.sink(remotecommand.ERROR), structured)
        helpers: list[asyncio.Task[None]] = []
        if resize is not None:
            helpers.append(asyncio.create_task(
                remotecommand.read_resize_events(mux.source(remotecommand.RESIZE), resize)
            ))
        receiver = asyncio.create_task(mux.receive())
        helpers.append(receiver)
        try:
            # An empty message on the first writable channel tells the client we are ready.
            first = (remotecommand.STDOUT if spec.stdout else
                     remotecommand.STDERR if spec.stderr else remotecommand.ERROR)
            with contextlib.suppress(StreamClosed):
                await mux.send(first, b"")
            work = asyncio.create_task(remotecommand.serve(self.backend, spec, channels))
            await asyncio.wait([work, receiver], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                # The client closed the socket before the command ended: stop the command.
                work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _portforward_websocket(
        self, ws: web.WebSocketResponse, spec: PortForwardSpec, protocol: str,
        request: web.Request,
    ) -> None:
        if protocol == TUNNELED_PORTFORWARD:
            await self._tunneled_spdy(ws, spec)
            return
        if not spec.ports:
            ports = _query_ports(request)
            if not ports:
                return
            spec = PortForwardSpec(spec.pod_id, ports)
        mux = ChannelMux(ws, protocol, close_signals=False)
        await portforward.serve_websocket(self.backend, spec, mux)

    async def _tunneled_spdy(self, ws: web.WebSocketResponse, spec: PortForwardSpec) -> None:
        async def send(data: bytes) -> None:
            if ws.closed:
                raise ConnectionResetError("the WebSocket is closed")
            await ws.send_bytes(data)

        incoming: asyncio.Queue[SpdyStream] = asyncio.Queue()

        def on_stream(stream: SpdyStream) -> bool:
            if not portforward.valid_stream(stream):
                return False
            incoming.put_nowait(stream)
            return True

        session = SpdySession(send, on_stream)

        async def receive() -> None:
            try:
                async for message in ws:
                    if isinstance(message.data, bytes):
                        session.feed(message.data)
            finally:
                session.connection_lost()

        receiver = asyncio.create_task(receive())
        try:
            await _until_peer_gone(
                portforward.serve_spdy(self.backend, spec, incoming), session.peer_gone
            )
        finally:
            await session.close(linger_s=0)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)


def _accept_any(stream: SpdyStream) -> bool:
    return True


def _query_ports(request: web.Request) -> tuple[int, ...]:
    ports: list[int] = []
    for value in request.query.getall("port", []):
        for item in value.split(","):
            with contextlib.suppress(ValueError):
                port = int(item)
                if 0 < port <= 0xFFFF:
                    ports.append(port)
    return tuple(ports)


async def _until_peer_gone(work: Awaitable[None], peer_gone: asyncio.Event) -> None:
    """Run ``work`` until it ends or the client hangs up; a hang-up cancels it."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(peer_gone.wait())
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            pending.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


class _SessionFeeder:
    """The payload parser aiohttp feeds an upgraded connection's bytes to."""

    def __init__(self, session: SpdySession) -> None:
        self._session = session

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._session.feed(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        self._session.connection_lost()


async def open_component(daemon: Any) -> StreamingServer:
    """The daemon's ``streaming`` component, serving containers of the daemon's backends."""
    from crivm.runtime.streaming.runtime_streams import RuntimeStreams

    config = daemon.config
    server = StreamingServer(
        RuntimeStreams(daemon), config.stream_address, config.stream_port,
        config.stream_token_ttl_s,
    )
    await server.start()
    return server

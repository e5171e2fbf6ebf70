"""Channels over one WebSocket: the ``channel.k8s.io`` family of subprotocols.

Each binary message starts with one byte naming its channel. The ``base64.`` variants send
text messages instead: the channel as an ASCII digit, then the data base64-encoded. From
``v5.channel.k8s.io`` on, the two-byte message ``[255, channel]`` closes one channel (stdin
close reaches the process without closing the whole socket).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging

from aiohttp import WSMsgType, web

from crivm.runtime.streaming.backend import StreamClosed

log = logging.getLogger(__name__)

CLOSE_CHANNEL = 255
# Messages queued per channel before the reader stops taking more off the socket.
_INBOX_MESSAGES = 64


def is_base64(protocol: str) -> bool:
    return "base64." in protocol


class ChannelSource:
    def __init__(self) -> None:
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(_INBOX_MESSAGES)
        self._ended = False

    async def read(self) -> bytes:
        if self._ended:
            return b""
        chunk = await self._inbox.get()
        if not chunk:
            self._ended = True
        return chunk

    async def _put(self, data: bytes) -> None:
        if data:
            await self._inbox.put(data)

    def _end(self) -> None:
        # Never blocks: a full inbox only delays the end marker behind the data.
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(b"")
            return
        asyncio.get_running_loop().create_task(self._inbox.put(b""))


class ChannelSink:
    def __init__(self, mux: ChannelMux, channel: int) -> None:
        self._mux = mux
        self.channel = channel
        self.closed = False

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise StreamClosed(f"WebSocket channel {self.channel} is closed")
        await self._mux.send(self.channel, data)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._mux.close_signals and not self._mux.ws.closed:
            with contextlib.suppress(StreamClosed):
                await self._mux.send_raw(bytes([CLOSE_CHANNEL, self.channel]))


class ChannelMux:
    """Demultiplexes a WebSocket into per-channel sources and sinks."""

    def __init__(self, ws: web.WebSocketResponse, protocol: str, close_signals: bool) -> None:
        self.ws = ws
        self.base64 = is_base64(protocol)
        self.close_signals = close_signals
        self._sources: dict[int, ChannelSource] = {}
        self._send_lock = asyncio.Lock()

    def source(self, channel: int) -> ChannelSource:
        return self._sources.setdefault(channel, ChannelSource())

    def sink(self, channel: int) -> ChannelSink:
        return ChannelSink(self, channel)

    async def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            text = chr(ord("0") + channel) + base64.b64encode(data).decode()
            await self._send(text)
        else:
            await self.send_raw(bytes([channel]) + data)

    async def send_raw(self, message: bytes) -> None:
        await self._send(message)

    async def _send(self, message: bytes | str) -> None:
        if self.ws.closed:
            raise StreamClosed("the WebSocket is closed")
        try:
            async with self._send_lock:
                if isinstance(message, str):
                    await self.ws.send_str(message)
                else:
                    await self.ws.send_bytes(message)
        except (ConnectionError, RuntimeError) as exc:
            raise StreamClosed(f"the WebSocket is closed: {exc}") from exc

    async def receive(self) -> None:
        """Read messages until the client closes the socket; then every source ends."""
        try:
            async for message in self.ws:
                if message.type == WSMsgType.BINARY:
                    await self._dispatch(bytes(message.data))
                elif message.type == WSMsgType.TEXT and self.base64:
                    await self._dispatch_text(str(message.data))
                elif message.type == WSMsgType.ERROR:
                    log.debug("WebSocket error: %s", self.ws.exception())
                    break
        finally:
            for source in self._sources.values():
                source._end()

    async def _dispatch(self, data: bytes) -> None:
        if not data:
            return
        channel, payload = data[0], data[1:]
        if channel == CLOSE_CHANNEL and self.close_signals:
            if len(payload) == 1 and payload[0] in self._sources:
                self._sources[payload[0]]._end()
            return
        source = self._sources.get(channel)
        if source is not None:
            await source._put(payload)

    async def _dispatch_text(self, text: str) -> None:
        if not text:
            return
        channel = ord(text[0]) - ord("0")
        source = self._sources.get(channel)
        if source is None:
            return
        try:
            payload = base64.b64decode(text[1:], validate=True)
        except (binascii.Error, ValueError):
            log.debug("dropping a base64 message that does not decode on channel %d", channel)
            return
        await source._put(payload)

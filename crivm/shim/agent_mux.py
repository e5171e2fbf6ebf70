"""One agent connection shared by many host clients: the daemon, and every container's shim.

QEMU's chardev socket behind the agent's virtio-serial port takes one connection at a time, but
a VM pod has many host-side users. The pod's supervisor holds that one connection and serves
a unix socket of its own; this module moves frames between the two (Clear Containers'
cc-proxy did the same job).

Stream ids belong to a connection, so each call gets a fresh id on the agent side and its
replies are mapped back to the client's own id. When a client goes away its open calls are
cancelled on the agent. The agent's replies to a client are written without waiting for the
client to read them: the RPC layer's window already bounds how much a call can have in
flight, and a slow shim must not stall the other calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field

from crivm.agent.framing import (
    MAX_STREAM_ID,
    Frame,
    FrameTooLarge,
    FrameType,
    FramingError,
    encode_frame,
    random_first_stream_id,
    read_frame,
)

log = logging.getLogger(__name__)

# Frames that end a call on the agent's side.
_FINAL = (FrameType.RESPONSE, FrameType.CLOSE)


@dataclass(eq=False)
class _Client:
    number: int
    writer: asyncio.StreamWriter
    # client stream id -> agent stream id
    calls: dict[int, int] = field(default_factory=dict)


class AgentMux:
    """Serves ``listen_path`` for clients, relaying to an already connected agent stream."""

    def __init__(self, agent_reader: asyncio.StreamReader,
                 agent_writer: asyncio.StreamWriter) -> None:
        self._agent_reader = agent_reader
        self._agent_writer = agent_writer
        # agent stream id -> (client, client stream id)
        self._routes: dict[int, tuple[_Client, int]] = {}
        self._next_id = random_first_stream_id()
        self._clients: set[_Client] = set()
        self._count = 0
        self._server: asyncio.Server | None = None
        self._listen_path = ""

    async def listen(self, listen_path: str) -> None:
        """Accept clients on ``listen_path`` (replacing a stale socket)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen_path)
        self._listen_path = listen_path
        self._server = await asyncio.start_unix_server(self._serve_client, listen_path)
        os.chmod(listen_path, 0o600)

    async def relay(self) -> None:
        """Relay the agent's replies until its connection ends (the VM stopped), then close
        every client and the socket."""
        try:
            await self._relay_replies()
        finally:
            if self._server is not None:
                self._server.close()
            for client in list(self._clients):
                client.writer.close()
            if self._listen_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._listen_path)

    def _allocate(self) -> int:
        stream_id = self._next_id
        while stream_id in self._routes:
            stream_id = (stream_id + 2) % MAX_STREAM_ID | 1
        self._next_id = (stream_id + 2) % MAX_STREAM_ID | 1
        return stream_id

    def _to_agent(self, frame: Frame) -> None:
        if not self._agent_writer.is_closing():
            self._agent_writer.write(encode_frame(frame))

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        self._count += 1
        client = _Client(self._count, writer)
        self._clients.add(client)
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    return
                self._from_client(client, frame)
                await self._agent_writer.drain()
        except (FramingError, OSError) as exc:
            log.warning("agent client %d dropped: %s", client.number, exc)
        finally:
            self._clients.discard(client)
            for agent_id in client.calls.values():
                self._routes.pop(agent_id, None)
                self._to_agent(Frame(agent_id, FrameType.CANCEL))
            client.calls.clear()
            writer.close()

    def _from_client(self, client: _Client, frame: Frame) -> None:
        if frame.type == FrameType.REQUEST:
            if frame.stream_id in client.calls:
                log.warning("client %d reused busy stream %d", client.number, frame.stream_id)
                return
            agent_id = self._allocate()
            client.calls[frame.stream_id] = agent_id
            self._routes[agent_id] = (client, frame.stream_id)
        else:
            found = client.calls.get(frame.stream_id)
            if found is None:
                return  # a CANCEL or WINDOW for a call that already ended
            agent_id = found
            if frame.type == FrameType.CANCEL:
                # The agent still answers a cancelled call; that reply has nowhere to go.
                client.calls.pop(frame.stream_id, None)
                self._routes.pop(agent_id, None)
        self._to_agent(Frame(agent_id, frame.type, frame.payload, frame.flags))

    async def _relay_replies(self) -> None:
        while True:
            try:
                frame = await read_frame(self._agent_reader)
            except FrameTooLarge as exc:
                # Cannot happen with a well-behaved agent; the stream is unusable after it.
                raise FramingError(f"agent sent {exc}") from exc
            except (FramingError, OSError) as exc:
                log.warning("agent connection broke: %s", exc)
                return
            if frame is None:
                log.info("agent connection closed")
                return
            route = self._routes.get(frame.stream_id)
            if route is None:
                continue  # the client left or cancelled
            client, client_id = route
            if frame.type in _FINAL:
                del self._routes[frame.stream_id]
                client.calls.pop(client_id, None)
            if not client.writer.is_closing():
                client.writer.write(encode_frame(Frame(client_id, frame.type, frame.payload,
                                                       frame.flags)))

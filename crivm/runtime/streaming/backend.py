"""What the streaming server asks of whatever runs processes, and the byte channels it lends.

The protocol layer (SPDY, WebSocket) turns each client stream into a ``ByteSource`` (data from
the client) or ``ByteSink`` (data to the client). A ``StreamBackend`` connects them to a
process: an exec'd command, a container's stdio, or a TCP port inside a pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from crivm.errors import CrivmError


class StreamClosed(CrivmError):
    """The client went away or reset the stream; nothing more can be written to it."""


class ByteSource(Protocol):
    async def read(self) -> bytes:
        """The next chunk from the client; ``b""`` once the client closed its side."""
        ...


class ByteSink(Protocol):
    async def write(self, data: bytes) -> None:
        """Send ``data``; raises StreamClosed when the client is gone."""
        ...

    async def close(self) -> None:
        """Tell the client this side is done (idempotent)."""
        ...


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


# Resize events from the client; None ends them.
ResizeQueue = asyncio.Queue["TerminalSize | None"]


@dataclass
class Stdio:
    """The client streams of one exec or attach session; absent ones are None."""

    stdin: ByteSource | None
    stdout: ByteSink | None
    stderr: ByteSink | None
    tty: bool
    resize: ResizeQueue | None = None


class StreamBackend(Protocol):
    """Runs the far end of a session. Cancelling a call must leave no process or fd behind."""

    async def exec(self, container_id: str, cmd: Sequence[str], stdio: Stdio) -> int:
        """Run ``cmd`` in the container with ``stdio``; return its exit code once it exited
        and its output has been written."""
        ...

    async def attach(self, container_id: str, stdio: Stdio) -> None:
        """Connect ``stdio`` to the container's main process until it exits or the client
        closes stdin (when the container does not keep stdin open)."""
        ...

    async def port_forward(
        self, pod_id: str, port: int, source: ByteSource, sink: ByteSink
    ) -> None:
        """Connect to ``port`` on the pod's loopback and copy both ways until both ends close."""
        ...

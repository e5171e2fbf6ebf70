"""The remote command protocol (``channel.k8s.io`` v1-v5) behind exec and attach.

A session has up to five streams, identified by the ``streamtype`` header over SPDY or by the
channel number over WebSocket: stdin 0, stdout 1, stderr 2, error 3, resize 4. The error stream
carries the outcome once the command ends: from v4 on it is a JSON ``metav1.Status`` whose
``details.causes`` hold the exit code; before v4 it is the failure message as plain text, and
nothing at all on success. The resize stream carries JSON ``{"Width": w, "Height": h}``
objects back to back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from crivm.errors import CrivmError, DeadlineExceeded, InvalidArgument
from crivm.runtime.streaming.backend import (
    ByteSink,
    ByteSource,
    ResizeQueue,
    Stdio,
    StreamBackend,
    StreamClosed,
    TerminalSize,
)
from crivm.runtime.streaming.spdy_session import SpdyStream
from crivm.runtime.streaming.tokens import AttachSpec, ExecSpec

log = logging.getLogger(__name__)

V1, V2, V3, V4, V5 = (
    "channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io", "v4.channel.k8s.io",
    "v5.channel.k8s.io",
)
# Most preferred first.
SPDY_PROTOCOLS = (V4, V3, V2, V1)
STREAM_CREATION_TIMEOUT_S = 30.0

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_TYPES = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR,
                "resize": RESIZE}

RemoteSpec = ExecSpec | AttachSpec


@dataclass
class Channels:
    """The streams of one session once the transport has set them up."""

    stdio: Stdio
    error: ByteSink
    # v4 and later: JSON Status on the error stream; before: failure text only.
    structured_status: bool


@dataclass(frozen=True)
class Outcome:
    exit_code: int = 0
    # Set when the command could not be run at all.
    error: str = ""


def status_bytes(outcome: Outcome, structured: bool) -> bytes:
    if outcome.error:
        message = f"error executing command in container: {outcome.error}"
        status: dict[str, object] = {
            "metadata": {}, "status": "Failure", "message": message,
            "reason": "InternalError", "details": {"causes": [{"message": message}]},
            "code": 500,
        }
    elif outcome.exit_code != 0:
        message = f"command terminated with non-zero exit code: exit status {outcome.exit_code}"
        status = {
            "metadata": {}, "status": "Failure", "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(outcome.exit_code)}]},
        }
    else:
        return b'{"metadata":{},"status":"Success"}' if structured else b""
    if not structured:
        return message.encode()
    return json.dumps(status, separators=(",", ":")).encode()


async def read_resize_events(source: ByteSource, queue: ResizeQueue) -> None:
    """Parse the resize stream into ``queue``; None is queued when it ends."""
    decoder = json.JSONDecoder()
    pending = ""
    try:
        while chunk := await source.read():
            pending += chunk.decode(errors="replace")
            while pending.strip():
                text = pending.lstrip()
                try:
                    event, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    break  # an object split across reads; wait for the rest
                pending = text[end:]
                size = _terminal_size(event)
                if size is not None:
                    queue.put_nowait(size)
    finally:
        queue.put_nowait(None)


def _terminal_size(event: object) -> TerminalSize | None:
    if not isinstance(event, dict):
        return None
    width, height = event.get("Width"), event.get("Height")
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
        return None
    return TerminalSize(width, height)


async def collect_spdy_streams(
    incoming: asyncio.Queue[SpdyStream],
    spec: RemoteSpec,
    protocol: str,
    timeout_s: float = STREAM_CREATION_TIMEOUT_S,
) -> tuple[Channels, list[SpdyStream]]:
    """Wait for the streams the client must open for ``spec``: error, plus stdin/stdout/stderr
    as requested, plus resize for a tty from v3 on."""
    resizable = protocol in (V3, V4)
    expected = 1 + spec.stdin + spec.stdout + spec.stderr + (spec.tty and resizable)
    by_type: dict[int, SpdyStream] = {}
    received: list[SpdyStream] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(received) < expected:
                stream = await incoming.get()
                received.append(stream)
                kind = STREAM_TYPES.get(stream.header("streamtype"))
                if kind is None:
                    log.warning("ignoring SPDY stream of unknown type %r",
                                stream.header("streamtype"))
                    continue
                by_type[kind] = stream
    except TimeoutError as exc:
        raise DeadlineExceeded("timed out waiting for the client to create streams") from exc
    if ERROR not in by_type:
        raise InvalidArgument("the client did not open an error stream")
    resize: ResizeQueue | None = None
    if RESIZE in by_type:
        resize = asyncio.Queue()
    stdio = Stdio(
        stdin=by_type.get(STDIN), stdout=by_type.get(STDOUT), stderr=by_type.get(STDERR),
        tty=spec.tty, resize=resize,
    )
    channels = Channels(stdio, by_type[ERROR], structured_status=protocol == V4)
    if resize is not None:
        channels_resize = by_type[RESIZE]
        _background(read_resize_events(channels_resize, resize))
    return channels, received


_tasks: set[asyncio.Task[None]] = set()


def _background(coro: Coroutine[Any, Any, None]) -> None:
    # The task ends by itself: its stream reads EOF when the session ends.
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def serve(backend: StreamBackend, spec: RemoteSpec, channels: Channels) -> None:
    """Run the command (or attach), then close the output streams and report the outcome."""
    stdio = channels.stdio
    try:
        if isinstance(spec, ExecSpec):
            outcome = Outcome(exit_code=await backend.exec(spec.container_id, spec.cmd, stdio))
        else:
            await backend.attach(spec.container_id, stdio)
            outcome = Outcome()
    except CrivmError as exc:
        log.warning("%s in container %s failed: %s", type(spec).__name__, spec.container_id,
                    exc, extra={"container_id": spec.container_id})
        outcome = Outcome(error=str(exc))
    except Exception as exc:  # noqa: BLE001
        # A bug, not a runtime failure. The session task's caller drops exceptions, so
        # without this the client saw a clean, empty session and the log said nothing.
        log.exception("%s in container %s crashed", type(spec).__name__, spec.container_id,
                      extra={"container_id": spec.container_id})
        outcome = Outcome(error=f"internal error: {exc!r}")
    for sink in (stdio.stdout, stdio.stderr):
        if sink is not None:
            await _quietly_close(sink)
    try:
        report = status_bytes(outcome, channels.structured_status)
        if report:
            await channels.error.write(report)
    except StreamClosed:
        pass
    await _quietly_close(channels.error)


async def _quietly_close(sink: ByteSink) -> None:
    try:
        await sink.close()
    except StreamClosed:
        pass

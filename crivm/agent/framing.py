"""Length-prefixed frames with stream ids: the wire format between the host and the agent.

Modelled on Kata's ttrpc. Every frame is a 10-byte header followed by its payload::

    +----------------+----------------+--------+--------+=============+
    | length  u32 BE | stream id u32  | type u8| flags  |  payload    |
    |  (payload only)|       BE       |        |   u8   | length bytes|
    +----------------+----------------+--------+--------+=============+

The format knows nothing about the transport, so it runs the same over a virtio-serial port, a
vsock connection or a unix socket. This module is imported by both sides. It must not import
anything else from crivm: the guest has no grpcio, and crivm.errors needs it. The host side
translates these exceptions into crivm.errors at its own boundary.
"""

from __future__ import annotations

import asyncio
import enum
import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size

# Large enough for any control message and a 64 KiB output chunk; small enough that a corrupt or
# hostile length cannot make either side allocate much.
DEFAULT_MAX_PAYLOAD = 4 * 1024 * 1024

# Discarding an oversized payload reads it in pieces of this size, so memory stays bounded.
_DISCARD_CHUNK = 64 * 1024

MAX_STREAM_ID = 0xFFFFFFFF


def random_first_stream_id() -> int:
    """An odd stream id in the lower half of the id space, for a connection's first call.

    os.urandom rather than the random module: importing random (hashlib, bisect, ...) cost the
    guest's agent boot time and every pod supervisor memory, for one number per connection.
    """
    return (1 + int.from_bytes(os.urandom(4), "big") % (MAX_STREAM_ID // 2 - 1)) | 1


class FrameType(enum.IntEnum):
    """What a frame means to the RPC layer (see crivm.agent.rpc)."""

    REQUEST = 1  # client -> server: opens a call on a new stream id
    RESPONSE = 2  # server -> client: ends a unary call, carries the status
    DATA = 3  # server -> client: one message of a streamed reply
    CLOSE = 4  # server -> client: ends a streamed reply, carries the status
    CANCEL = 5  # client -> server: the client abandons the call
    WINDOW = 6  # client -> server: the client can take more DATA frames on the stream


class Flags(enum.IntFlag):
    """Header flags. No flag is defined yet; receivers keep unknown bits and ignore them."""

    NONE = 0


class FramingError(Exception):
    """The byte stream cannot be read as frames."""


class FrameTooLarge(FramingError):
    """A frame's payload exceeds the limit.

    On receive, it is raised after the header only: the payload is still unread. The reader can
    skip it with :func:`discard_payload` and carry on, or drop the connection.
    """

    def __init__(self, stream_id: int, frame_type: int, length: int, limit: int) -> None:
        super().__init__(
            f"frame on stream {stream_id} (type {frame_type}) has a {length}-byte payload, "
            f"over the {limit}-byte limit"
        )
        self.stream_id = stream_id
        self.frame_type = frame_type
        self.length = length
        self.limit = limit


class PeerHungUp(FramingError):
    """The peer closed the connection in the middle of a frame."""


class UnknownFrameType(FramingError):
    """The header names a frame type this side does not know; the stream cannot be trusted."""


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: FrameType
    payload: bytes = b""
    flags: int = Flags.NONE


def encode_frame(frame: Frame, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """The frame's bytes, header first. Refuses payloads the peer would reject."""
    length = len(frame.payload)
    if length > max_payload:
        raise FrameTooLarge(frame.stream_id, frame.type, length, max_payload)
    if not 0 <= frame.stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream_id} does not fit in 32 bits")
    return HEADER.pack(length, frame.stream_id, frame.type, frame.flags) + frame.payload


async def read_frame(
    reader: asyncio.StreamReader, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> Frame | None:
    """Read one frame. None means the peer closed the connection cleanly between frames.

    StreamReader.readexactly gathers partial reads, however the transport splits the bytes.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise PeerHungUp(
            f"peer hung up after {len(exc.partial)} of {HEADER_SIZE} header bytes"
        ) from exc
    length, stream_id, type_code, flags = HEADER.unpack(header)
    if length > max_payload:
        raise FrameTooLarge(stream_id, type_code, length, max_payload)
    try:
        frame_type = FrameType(type_code)
    except ValueError as exc:
        raise UnknownFrameType(f"frame on stream {stream_id} has unknown type {type_code}") from exc
    try:
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as exc:
        raise PeerHungUp(
            f"peer hung up after {len(exc.partial)} of {length} payload bytes "
            f"of a frame on stream {stream_id}"
        ) from exc
    return Frame(stream_id, frame_type, payload, flags)


async def discard_payload(reader: asyncio.StreamReader, length: int) -> None:
    """Skip the unread payload of a frame rejected by :class:`FrameTooLarge`."""
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
        if not chunk:
            raise PeerHungUp(f"peer hung up with {remaining} bytes of an oversized frame unread")
        remaining -= len(chunk)


async def write_frame(
    writer: asyncio.StreamWriter, frame: Frame, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> None:
    """Write one frame and wait for the transport's buffer to drain.

    One write() call per frame keeps frames from concurrent tasks whole on the wire.
    """
    writer.write(encode_frame(frame, max_payload))
    await writer.drain()

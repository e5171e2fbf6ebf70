"""SPDY/3.1 framing: frame layouts, the incremental frame parser and header block compression.

Only bytes in and bytes out; the session that multiplexes streams over a connection lives in
``spdy_session``. Layouts follow the SPDY/3.1 draft (chromium.org/spdy/spdy-protocol):

    control frame: |1| version:15 | type:16 | flags:8 | length:24 | payload
    data frame:    |0| stream id:31         | flags:8 | length:24 | payload

Header blocks of SYN_STREAM, SYN_REPLY and HEADERS are one zlib stream per direction for the
whole connection, primed with the SPDY/3 dictionary and sync-flushed after every block, so the
compressor and decompressor must see blocks in wire order.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from crivm.errors import CrivmError

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024
MAX_FRAME_PAYLOAD = (1 << 24) - 1
# Header blocks are small; a peer sending more is broken or hostile.
MAX_HEADER_BLOCK = 256 * 1024

_STREAM_ID_MASK = 0x7FFFFFFF

# The SPDY/3 header compression dictionary: length-prefixed common header names and values,
# then a run of status lines, dates and media types. Written as data and assembled once.
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = (
    b"".join(len(w).to_bytes(4, "big") + w.encode() for w in _DICTIONARY_WORDS)
    + _DICTIONARY_TAIL.encode()
)


class SpdyProtocolError(CrivmError):
    """The peer sent bytes that are not valid SPDY/3.1; the connection cannot continue."""


# A header block maps lower-case names to one or more values (sent NUL-separated).
Headers = Mapping[str, list[str]]


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    flags: int = 0


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers
    flags: int = 0
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    # (flags, id, value) triples.
    entries: tuple[tuple[int, int, int], ...] = ()
    flags: int = 0


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True)
class UnknownControl:
    """A control frame type SPDY/3.1 does not define; the spec says to ignore it."""

    frame_type: int


Frame = (
    DataFrame | SynStream | SynReply | RstStream | Settings | Ping | GoAway | HeadersFrame
    | WindowUpdate | UnknownControl
)


@dataclass
class HeaderCodec:
    """One direction's zlib context each way; a connection owns exactly one codec."""

    _compressor: zlib._Compress = field(
        default_factory=lambda: zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zdict=DICTIONARY)
    )
    _decompressor: zlib._Decompress = field(
        default_factory=lambda: zlib.decompressobj(zdict=DICTIONARY)
    )

    def compress(self, headers: Headers) -> bytes:
        block = encode_header_block(headers)
        return self._compressor.compress(block) + self._compressor.flush(zlib.Z_SYNC_FLUSH)

    def decompress(self, data: bytes) -> dict[str, list[str]]:
        try:
            block = self._decompressor.decompress(data, MAX_HEADER_BLOCK + 1)
        except zlib.error as exc:
            raise SpdyProtocolError(f"header block does not decompress: {exc}") from exc
        if len(block) > MAX_HEADER_BLOCK or self._decompressor.unconsumed_tail:
            raise SpdyProtocolError("header block is larger than 256 KiB")
        return decode_header_block(block)


def encode_header_block(headers: Headers) -> bytes:
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        raw_name = name.lower().encode()
        raw_value = b"\x00".join(v.encode() for v in values)
        parts += [struct.pack(">I", len(raw_name)), raw_name]
        parts += [struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(parts)


def decode_header_block(block: bytes) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        offset = 4
        for _ in range(count):
            name, offset = _length_prefixed(block, offset)
            value, offset = _length_prefixed(block, offset)
            key = name.decode()
            if key != key.lower() or not key:
                raise SpdyProtocolError(f"header name {key!r} is empty or not lower case")
            if key in headers:
                raise SpdyProtocolError(f"header {key!r} appears twice")
            headers[key] = value.decode().split("\x00")
    except (struct.error, UnicodeDecodeError) as exc:
        raise SpdyProtocolError(f"malformed header block: {exc}") from exc
    return headers


def _length_prefixed(block: bytes, offset: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from(">I", block, offset)
    start = offset + 4
    if start + length > len(block):
        raise SpdyProtocolError("header block field runs past its end")
    return block[start:start + length], start + length


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError("control frame payload too large")
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, flags << 24 | len(payload)) + payload


def encode_frame(frame: Frame, codec: HeaderCodec) -> bytes:
    """Serialise one frame. Header-carrying frames advance ``codec``'s compressor."""
    match frame:
        case DataFrame(stream_id, data, flags):
            if len(data) > MAX_FRAME_PAYLOAD:
                raise ValueError("data frame payload too large")
            return struct.pack(">II", stream_id & _STREAM_ID_MASK, flags << 24 | len(data)) + data
        case SynStream(stream_id, headers, flags, associated_id, priority):
            head = struct.pack(">IIBB", stream_id, associated_id, (priority & 7) << 5, 0)
            return _control(SYN_STREAM, flags, head + codec.compress(headers))
        case SynReply(stream_id, headers, flags):
            block = codec.compress(headers)
            return _control(SYN_REPLY, flags, struct.pack(">I", stream_id) + block)
        case HeadersFrame(stream_id, headers, flags):
            block = codec.compress(headers)
            return _control(HEADERS, flags, struct.pack(">I", stream_id) + block)
        case RstStream(stream_id, status):
            return _control(RST_STREAM, 0, struct.pack(">II", stream_id, status))
        case Settings(entries, flags):
            body = struct.pack(">I", len(entries)) + b"".join(
                struct.pack(">II", f << 24 | ident, value) for f, ident, value in entries
            )
            return _control(SETTINGS, flags, body)
        case Ping(ping_id):
            return _control(PING, 0, struct.pack(">I", ping_id))
        case GoAway(last_good, status):
            return _control(GOAWAY, 0, struct.pack(">II", last_good, status))
        case WindowUpdate(stream_id, delta):
            return _control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))
        case UnknownControl():
            raise ValueError("unknown control frames are never sent")
    raise TypeError(f"not a SPDY frame: {frame!r}")


class FrameParser:
    """Turns a byte stream, fed in arbitrary pieces, into frames."""

    def __init__(self, codec: HeaderCodec) -> None:
        self._codec = codec
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buffer += data
        while len(self._buffer) >= 8:
            (length,) = struct.unpack_from(">I", self._buffer, 4)
            length &= 0xFFFFFF
            if len(self._buffer) < 8 + length:
                return
            head = bytes(self._buffer[:8])
            payload = bytes(self._buffer[8:8 + length])
            del self._buffer[:8 + length]
            yield self._parse(head, payload)

    def _parse(self, head: bytes, payload: bytes) -> Frame:
        first, second = struct.unpack(">II", head)
        flags = second >> 24
        if not first & 0x80000000:
            return DataFrame(first & _STREAM_ID_MASK, payload, flags)
        version = (first >> 16) & 0x7FFF
        frame_type = first & 0xFFFF
        if version != VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}")
        try:
            return self._control(frame_type, flags, payload)
        except struct.error as exc:
            raise SpdyProtocolError(f"control frame type {frame_type} is too short") from exc

    def _control(self, frame_type: int, flags: int, payload: bytes) -> Frame:
        if frame_type == SYN_STREAM:
            stream_id, associated, priority = struct.unpack_from(">IIB", payload)
            headers = self._codec.decompress(payload[10:])
            return SynStream(
                stream_id & _STREAM_ID_MASK, headers, flags, associated & _STREAM_ID_MASK,
                priority >> 5,
            )
        if frame_type in (SYN_REPLY, HEADERS):
            (stream_id,) = struct.unpack_from(">I", payload)
            headers = self._codec.decompress(payload[4:])
            cls = SynReply if frame_type == SYN_REPLY else HeadersFrame
            return cls(stream_id & _STREAM_ID_MASK, headers, flags)
        if frame_type == RST_STREAM:
            stream_id, status = struct.unpack_from(">II", payload)
            return RstStream(stream_id & _STREAM_ID_MASK, status)
        if frame_type == SETTINGS:
            (count,) = struct.unpack_from(">I", payload)
            entries = []
            for index in range(count):
                flag_id, value = struct.unpack_from(">II", payload, 4 + 8 * index)
                entries.append((flag_id >> 24, flag_id & 0xFFFFFF, value))
            return Settings(tuple(entries), flags)
        if frame_type == PING:
            (ping_id,) = struct.unpack_from(">I", payload)
            return Ping(ping_id)
        if frame_type == GOAWAY:
            (last_good,) = struct.unpack_from(">I", payload)
            # SPDY/2 peers omit the status; SPDY/3 always sends it.
            status = struct.unpack_from(">I", payload, 4)[0] if len(payload) >= 8 else GOAWAY_OK
            return GoAway(last_good & _STREAM_ID_MASK, status)
        if frame_type == WINDOW_UPDATE:
            stream_id, delta = struct.unpack_from(">II", payload)
            return WindowUpdate(stream_id & _STREAM_ID_MASK, delta & _STREAM_ID_MASK)
        return UnknownControl(frame_type)

"""HPACK (RFC 7541) header-block decoding for the CRI front end's HTTP/2 connections.

A gRPC client repeats nearly the same headers on every call, and after the first call most of
them are one-byte references into the connection's dynamic table; what changes per call is
the path and ``grpc-timeout``. Decoding such a block with the general-purpose ``hpack``
package cost ~40 us per call, a tenth of a cheap CRI call, so the representations are walked
here directly. Huffman-coded strings and the static table come from that package.

The encoder side is not needed: crivm's own header blocks are a few constant literals that
never enter the peer's table (see ``crivm.runtime.grpc_server``).
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

# RFC 7541 section 4.1: each entry costs its name and value plus 32 octets of overhead.
ENTRY_OVERHEAD = 32
DEFAULT_TABLE_SIZE = 4096
# Decoded blocks kept for reuse (see ``HeaderDecoder.decode``), and the largest kept.
MAX_REMEMBERED = 64
MAX_REMEMBERED_BLOCK = 256

_STATIC: tuple[tuple[str, str], ...] = tuple(
    (name.decode("latin-1"), value.decode("latin-1")) for name, value in HeaderTable.STATIC_TABLE
)


class HpackError(Exception):
    """The header block cannot be decoded: a COMPRESSION_ERROR for the whole connection."""


class HeaderDecoder:
    """The decoding half of one HTTP/2 connection's header compression state."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        # The most recent entry is at index 0, as the RFC numbers them (62 = newest).
        self._table: deque[tuple[str, str]] = deque()
        self._table_bytes = 0
        # The limit this endpoint advertised; the peer may shrink the table below it.
        self._limit = max_table_size
        self._size = max_table_size
        # Blocks that only referred to the table, by their bytes, until the table changes.
        # A gRPC client's repeated calls send the same few bytes each time once their
        # headers are in the table.
        self._decoded: dict[bytes, list[tuple[str, str]]] = {}
        self._changes = 0

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The headers of ``block``. The list may be shared with earlier calls: read only."""
        known = self._decoded.get(block)
        if known is not None:
            return known
        changes = self._changes
        headers = self._decode(block)
        if self._changes == changes and len(block) <= MAX_REMEMBERED_BLOCK:
            if len(self._decoded) >= MAX_REMEMBERED:
                self._decoded.clear()
            self._decoded[block] = headers
        return headers

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        end = len(block)
        try:
            while pos < end:
                first = block[pos]
                if first & 0x80:  # indexed field
                    index, pos = _integer(block, pos, 7)
                    headers.append(self._entry(index))
                elif first & 0x40:  # literal, added to the table
                    name, value, pos = self._literal(block, pos, 6)
                    headers.append((name, value))
                    self._add(name, value)
                elif first & 0x20:  # dynamic table size update
                    size, pos = _integer(block, pos, 5)
                    if size > self._limit:
                        raise HpackError(f"table size update to {size} above {self._limit}")
                    self._size = size
                    self._evict(0)
                    self._changed()
                else:  # literal without indexing (0x00) or never indexed (0x10)
                    name, value, pos = self._literal(block, pos, 4)
                    headers.append((name, value))
        except IndexError as exc:
            raise HpackError("header block ends inside a field") from exc
        return headers

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        dynamic = index - len(_STATIC) - 1
        if index == 0 or dynamic >= len(self._table):
            raise HpackError(f"header index {index} is not in the table")
        return self._table[dynamic]

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return name, value, pos

    def _changed(self) -> None:
        # Indexes now mean other entries: what was decoded before no longer holds.
        self._changes += 1
        self._decoded.clear()

    def _add(self, name: str, value: str) -> None:
        self._changed()
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self._size:
            # An entry larger than the table empties it and is not kept (section 4.4).
            self._table.clear()
            self._table_bytes = 0
            return
        self._evict(size)
        self._table.appendleft((name, value))
        self._table_bytes += size

    def _evict(self, room: int) -> None:
        while self._table and self._table_bytes + room > self._size:
            name, value = self._table.pop()
            self._table_bytes -= len(name) + len(value) + ENTRY_OVERHEAD


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """The prefixed integer at ``pos`` (section 5.1), and the position after it."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        octet = block[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HpackError("integer too large")


def _string(block: bytes, pos: int) -> tuple[str, int]:
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise HpackError("header block ends inside a string")
    raw = block[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except Exception as exc:  # the package raises its own HPACKDecodingError
            raise HpackError(f"bad Huffman string: {exc}") from exc
    # Header names and values are octets; gRPC's are ASCII (binary ones are base64).
    return raw.decode("latin-1"), end

"""A layer blob's bytes, as they arrive, turned into its tar stream, with both sides hashed.

The compressed bytes are hashed for the blob digest and decompressed (gzip, bzip2 or xz,
told apart by magic number rather than by media type); the tar stream is hashed for the
diff_id. ``TarStreamReader`` offers the tar stream to ``tarfile`` as a file read front to back,
so one pass over the download does everything and no blob is written to disk first.

Runs in the unpacking thread. Everything here works on blocks of up to ``BLOCK`` bytes: each
hash update, inflate call and write releases the GIL once, so large blocks mean few hand-offs
between the unpacking threads and the event loop.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

from crivm.errors import CrivmError, Unimplemented

# The most decompressed bytes held at once: bounds memory for a compression bomb.
BLOCK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAGIC_BYTES = 6
# What the decompressors raise on bad input (bz2 says OSError, but only about its input here).
_DECOMPRESS_ERRORS = (zlib.error, lzma.LZMAError, OSError, EOFError)


class CorruptLayer(CrivmError):
    """The layer is not a readable tar stream (truncated, bad header, bad compression)."""

    code = "DATA_LOSS"


class _Decompressor(Protocol):
    """What bz2.BZ2Decompressor and lzma.LZMADecompressor share."""

    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class LayerDecoder:
    """Pulls compressed chunks from ``next_chunk`` (b"" at the end) and yields the tar stream.

    ``check`` runs before every block, so a cancelled pull stops even a decompression bomb
    whose input is already buffered; ``progress`` is told each block's size.
    """

    def __init__(self, next_chunk: Callable[[], bytes], digest_algorithm: str,
                 check: Callable[[], None], progress: Callable[[int], None] | None) -> None:
        self._next_chunk = next_chunk
        self._check = check
        self._progress = progress
        self._algorithm = digest_algorithm
        self._blob_hash = hashlib.new(digest_algorithm)
        self._diff_hash = hashlib.sha256()
        self.size = 0  # of the tar stream

    @property
    def blob_digest(self) -> str:
        return f"{self._algorithm}:{self._blob_hash.hexdigest()}"

    @property
    def diff_id(self) -> str:
        return f"sha256:{self._diff_hash.hexdigest()}"

    def blocks(self) -> Iterator[bytes]:
        """The tar stream, hashed on the way; raises CorruptLayer for bad compression."""
        for block in _decompress(self._compressed()):
            self._check()
            self._diff_hash.update(block)
            self.size += len(block)
            if self._progress is not None:
                self._progress(len(block))
            yield block

    def drain(self) -> None:
        """Hash the rest of the compressed input without decompressing it."""
        for _ in self._compressed():
            self._check()

    def _compressed(self) -> Iterator[bytes]:
        while chunk := self._next_chunk():
            self._blob_hash.update(chunk)
            yield chunk


def _decompress(chunks: Iterator[bytes]) -> Iterator[bytes]:
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= _MAGIC_BYTES:
            break
    if head.startswith(_ZSTD_MAGIC):
        raise Unimplemented("zstd-compressed layers are not supported; use gzip")
    if head.startswith(_GZIP_MAGIC):
        yield from _inflate(head, chunks, _new_gzip)
    elif head.startswith(_BZIP2_MAGIC):
        yield from _inflate(head, chunks, bz2.BZ2Decompressor)
    elif head.startswith(_XZ_MAGIC):
        yield from _inflate(head, chunks, lzma.LZMADecompressor)
    else:
        if head:
            yield head
        yield from chunks


class _Gzip:
    """zlib's gzip decompressor shaped like the bz2/lzma ones: bounded output, ``needs_input``."""

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._drained = True

    @property
    def eof(self) -> bool:
        return self._inflater.eof

    @property
    def needs_input(self) -> bool:
        return self._drained and not self._inflater.unconsumed_tail

    @property
    def unused_data(self) -> bytes:
        return self._inflater.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._inflater.decompress(self._inflater.unconsumed_tail + data, max_length)
        # A full block may leave output pending inside zlib even with all input consumed.
        self._drained = len(out) < max_length
        return out


def _new_gzip() -> _Decompressor:
    return _Gzip()


def _inflate(head: bytes, chunks: Iterator[bytes],
             new: Callable[[], _Decompressor]) -> Iterator[bytes]:
    """Decompress every stream in the input, as gzip/bzip2/xz tools do for concatenations."""
    decompressor = new()
    pending = head
    while True:
        while pending:
            if decompressor.eof:
                # gzip allows zero padding between and after members.
                pending = pending.lstrip(b"\x00") if isinstance(decompressor, _Gzip) else pending
                if not pending:
                    break
                decompressor = new()
            yield from _output(decompressor, pending)
            pending = decompressor.unused_data if decompressor.eof else b""
        chunk = next(chunks, b"")
        if not chunk:
            break
        pending = chunk
    if not decompressor.eof:
        raise CorruptLayer("the compressed layer ended before its end-of-stream marker")


def _output(decompressor: _Decompressor, data: bytes) -> Iterator[bytes]:
    while True:
        try:
            out = decompressor.decompress(data, BLOCK)
        except _DECOMPRESS_ERRORS as exc:
            raise CorruptLayer(f"the compressed layer is damaged: {exc}") from exc
        if out:
            yield out
        data = b""
        if decompressor.eof or decompressor.needs_input:
            return


class TarStreamReader:
    """The tar stream as the file ``tarfile`` reads: ``read`` and ``tell``, and ``seek``
    forward only (tarfile seeks only past data it skips when the file is read in order)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._buffer = b""
        self._start = 0
        self._position = 0

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or position < self._position:
            raise tarfile.ReadError(f"layer stream read out of order (to {position}, "
                                    f"whence {whence}, at {self._position})")
        while self._position < position:
            if not self.read(min(position - self._position, BLOCK)):
                raise tarfile.ReadError("unexpected end of data")
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = 1 << 62
        available = len(self._buffer) - self._start
        if size <= available:
            start = self._start
            self._start += size
            self._position += size
            return self._buffer[start:self._start]
        parts = [self._buffer[self._start:]] if available else []
        wanted = size - available
        self._buffer, self._start = b"", 0
        for block in self._blocks:
            if len(block) >= wanted:
                parts.append(block[:wanted])
                self._buffer, self._start = block, wanted
                break
            parts.append(block)
            wanted -= len(block)
        data = b"".join(parts)
        self._position += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (what follows the tar's end marker counts toward the diff_id)."""
        self._position += len(self._buffer) - self._start
        self._buffer, self._start = b"", 0
        for block in self._blocks:
            self._position += len(block)

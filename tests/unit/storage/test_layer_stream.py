"""Decoding a layer blob as it arrives: formats, concatenated streams, damage, bounded blocks."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import tarfile
from collections.abc import Callable

import pytest

from crivm.errors import Unimplemented
from crivm.storage.layer_stream import BLOCK, CorruptLayer, LayerDecoder, TarStreamReader

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: crosses a block boundary


def _source(data: bytes, piece: int) -> Callable[[], bytes]:
    pieces = iter([data[i:i + piece] for i in range(0, len(data), piece)])
    return lambda: next(pieces, b"")


def _decode(data: bytes, piece: int = 4096) -> tuple[bytes, LayerDecoder]:
    decoder = LayerDecoder(_source(data, piece), "sha256", lambda: None, None)
    return b"".join(decoder.blocks()), decoder


@pytest.mark.parametrize("compress", [
    pytest.param(lambda d: d, id="plain"),
    pytest.param(gzip.compress, id="gzip"),
    pytest.param(bz2.compress, id="bzip2"),
    pytest.param(lzma.compress, id="xz"),
])
@pytest.mark.parametrize("piece", [1, 3, 4096, 1 << 22])
def test_formats_and_piece_sizes_give_the_same_stream_and_digests(
    compress: Callable[[bytes], bytes], piece: int
) -> None:
    plain = PAYLOAD if piece > 1 else PAYLOAD[:20_000]  # one call per byte: keep it quick
    blob = compress(plain)
    out, decoder = _decode(blob, piece)
    assert out == plain
    assert decoder.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert decoder.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert decoder.size == len(plain)


def test_concatenated_gzip_members_and_zero_padding() -> None:
    blob = gzip.compress(b"first ") + b"\0" * 7 + gzip.compress(b"second") + b"\0" * 3
    for piece in (1, 5, len(blob)):
        assert _decode(blob, piece)[0] == b"first second"


@pytest.mark.parametrize("blob", [
    pytest.param(gzip.compress(PAYLOAD)[:-20], id="truncated"),
    pytest.param(gzip.compress(b"x") + b"garbage", id="trailing-garbage"),
    pytest.param(b"\x1f\x8b" + b"\xff" * 100, id="bad-header"),
    pytest.param(bz2.compress(PAYLOAD)[:-10], id="truncated-bzip2"),
])
def test_damaged_compression_is_corrupt(blob: bytes) -> None:
    with pytest.raises(CorruptLayer):
        _decode(blob)


def test_zstd_is_refused_by_name() -> None:
    with pytest.raises(Unimplemented, match="zstd"):
        _decode(b"\x28\xb5\x2f\xfd" + b"\0" * 64)


def test_a_compression_bomb_comes_out_in_bounded_blocks_and_can_be_stopped() -> None:
    blob = gzip.compress(b"\0" * (64 << 20))  # 64 MiB from ~64 KiB
    checks = 0

    def check() -> None:
        nonlocal checks
        checks += 1
        if checks > 5:
            raise RuntimeError("stopped")

    decoder = LayerDecoder(_source(blob, len(blob)), "sha256", check, None)
    sizes = []
    with pytest.raises(RuntimeError, match="stopped"):
        for block in decoder.blocks():
            sizes.append(len(block))
    assert sizes and max(sizes) <= BLOCK and len(sizes) == 5


def test_drain_hashes_the_rest_without_decompressing() -> None:
    blob = b"not compressed at all, and never read as a tar"
    decoder = LayerDecoder(_source(blob, 4), "sha256", lambda: None, None)
    next(decoder.blocks())
    decoder.drain()
    assert decoder.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()


def test_reader_reads_across_blocks_and_seeks_only_forward() -> None:
    reader = TarStreamReader(iter([b"abc", b"defg", b"h", b"ijkl"]))
    assert reader.read(2) == b"ab"
    assert reader.read(6) == b"cdefgh"
    assert reader.tell() == 8
    assert reader.seek(9) == 9
    assert reader.read(100) == b"jkl"
    with pytest.raises(tarfile.ReadError):
        reader.seek(3)
    with pytest.raises(tarfile.ReadError):
        reader.seek(20)

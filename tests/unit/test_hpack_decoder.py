"""crivm.runtime.hpack_decoder against the ``hpack`` package's encoder and RFC 7541's examples."""

from __future__ import annotations

import random

import hpack
import pytest

from crivm.runtime.hpack_decoder import HeaderDecoder, HpackError


def test_rfc_7541_c3_requests_without_huffman() -> None:
    decoder = HeaderDecoder()
    first = bytes.fromhex("828684410f7777772e6578616d706c652e636f6d")
    assert decoder.decode(first) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"),
        (":authority", "www.example.com"),
    ]
    second = bytes.fromhex("828684be58086e6f2d6361636865")
    assert decoder.decode(second) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"),
        (":authority", "www.example.com"), ("cache-control", "no-cache"),
    ]


def test_rfc_7541_c4_requests_with_huffman() -> None:
    decoder = HeaderDecoder()
    decoder.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    decoder.decode(bytes.fromhex("828684be5886a8eb10649cbf"))
    third = bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")
    assert decoder.decode(third) == [
        (":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
        (":authority", "www.example.com"), ("custom-key", "custom-value"),
    ]


def test_matches_a_reference_encoder_over_many_blocks() -> None:
    # Random headers, some repeated (indexed), some long (multi-byte lengths, eviction),
    # table size changes: the decoder's table must track the encoder's exactly.
    rng = random.Random(7)
    encoder = hpack.Encoder()
    decoder = HeaderDecoder()
    names = [":path", "grpc-timeout", "user-agent", "x-a", "x-long-" + "n" * 200, "te"]
    for round_ in range(300):
        if round_ % 50 == 49:
            encoder.header_table_size = rng.choice((0, 256, 4096))
        headers = [
            (rng.choice(names), "".join(rng.choices("abc/%=~\x7f", k=rng.randint(0, 300))))
            for _ in range(rng.randint(1, 8))
        ]
        sensitive = [hpack.NeverIndexedHeaderTuple(n, v) if i % 3 == 0 else (n, v)
                     for i, (n, v) in enumerate(headers)]
        assert decoder.decode(encoder.encode(sensitive)) == headers


@pytest.mark.parametrize("block", [
    b"\xbe",  # index 62, with an empty dynamic table
    b"\x80",  # index 0
    b"\x41\x05abc",  # a string longer than what is left
    b"\x3f\xe2\x1f",  # table size update to 4097, above the advertised 4096
    b"\x82\x7f\xff\xff\xff\xff\xff",  # integer that never ends
])
def test_bad_blocks_are_compression_errors(block: bytes) -> None:
    with pytest.raises(HpackError):
        HeaderDecoder().decode(block)


def test_a_remembered_block_is_forgotten_when_the_table_changes() -> None:
    decoder = HeaderDecoder()
    newest = b"\xbe"  # index 62: whatever entry was added last
    decoder.decode(b"\x40\x01a\x01x")  # literal a: x, added to the table
    first = decoder.decode(newest)
    assert first == [("a", "x")]
    assert decoder.decode(newest) is first  # remembered: the table did not change
    decoder.decode(b"\x40\x01b\x01y")
    assert decoder.decode(newest) == [("b", "y")]
    decoder.decode(b"\x20")  # size update to 0 empties the table
    with pytest.raises(HpackError):
        decoder.decode(newest)

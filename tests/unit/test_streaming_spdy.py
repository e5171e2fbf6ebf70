"""SPDY/3.1 framing and header compression; token cache; remote command status encoding."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import pytest

from crivm.runtime.streaming import spdy
from crivm.runtime.streaming.remotecommand import Outcome, status_bytes
from crivm.runtime.streaming.tokens import AttachSpec, ExecSpec, TokenCache
from tests.fixtures.spdy_client import DICTIONARY as CLIENT_DICTIONARY


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest() == (
        "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
    )
    assert spdy.DICTIONARY == CLIENT_DICTIONARY


def roundtrip(frames: list[spdy.Frame], split: int = 0) -> list[spdy.Frame]:
    sender, receiver = spdy.HeaderCodec(), spdy.HeaderCodec()
    # One codec per side: the receiver's decompressor mirrors the sender's compressor.
    receiver._decompressor = zlib.decompressobj(zdict=spdy.DICTIONARY)
    wire = b"".join(spdy.encode_frame(f, sender) for f in frames)
    parser = spdy.FrameParser(receiver)
    if not split:
        return list(parser.feed(wire))
    out: list[spdy.Frame] = []
    for start in range(0, len(wire), split):
        out += parser.feed(wire[start:start + split])
    return out


ALL_FRAMES: list[spdy.Frame] = [
    spdy.SynStream(1, {"streamtype": ["error"], "port": ["80"]}, spdy.FLAG_FIN, 0, 3),
    spdy.SynReply(1, {}),
    spdy.SynReply(3, {"multi": ["a", "b"]}, spdy.FLAG_FIN),
    spdy.HeadersFrame(5, {"x": ["y"]}),
    spdy.DataFrame(1, b"\x00\xffpayload" * 100, spdy.FLAG_FIN),
    spdy.DataFrame(7, b""),
    spdy.RstStream(9, spdy.CANCEL),
    spdy.Settings(((0, spdy.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),)),
    spdy.Ping(7),
    spdy.GoAway(11, spdy.GOAWAY_OK),
    spdy.WindowUpdate(1, 65536),
]


@pytest.mark.parametrize("split", [0, 1, 7, 1000])
def test_frames_roundtrip_in_any_pieces(split: int) -> None:
    assert roundtrip(ALL_FRAMES, split) == ALL_FRAMES


def test_header_compression_is_stateful_across_blocks() -> None:
    frames: list[spdy.Frame] = [
        spdy.SynStream(i, {"streamtype": ["stdout"], "requestid": [str(i)]})
        for i in range(1, 40, 2)
    ]
    sender = spdy.HeaderCodec()
    sizes = [len(spdy.encode_frame(f, sender)) for f in frames]
    # Later blocks reuse the earlier ones through the shared zlib window.
    assert sizes[-1] < sizes[0]
    assert roundtrip(frames) == frames


def test_control_frame_layout_on_the_wire() -> None:
    wire = spdy.encode_frame(spdy.Ping(5), spdy.HeaderCodec())
    assert wire == struct.pack(">HHII", 0x8003, 6, 4, 5)
    data = spdy.encode_frame(spdy.DataFrame(3, b"ab", spdy.FLAG_FIN), spdy.HeaderCodec())
    assert data == struct.pack(">II", 3, 0x01000002) + b"ab"


def test_header_block_layout() -> None:
    block = spdy.encode_header_block({"Port": ["80"], "v": ["a", "b"]})
    assert block == (struct.pack(">I", 2) + struct.pack(">I", 4) + b"port" + struct.pack(">I", 2)
                     + b"80" + struct.pack(">I", 1) + b"v" + struct.pack(">I", 3) + b"a\x00b")
    assert spdy.decode_header_block(block) == {"port": ["80"], "v": ["a", "b"]}


@pytest.mark.parametrize("block", [
    struct.pack(">I", 1) + struct.pack(">I", 4) + b"Port" + struct.pack(">I", 0),
    struct.pack(">I", 2) + (struct.pack(">I", 1) + b"a" + struct.pack(">I", 0)) * 2,
    struct.pack(">I", 1) + struct.pack(">I", 99) + b"a",
])
def test_bad_header_blocks_are_protocol_errors(block: bytes) -> None:
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.decode_header_block(block)


def test_wrong_version_and_garbage_compression_are_rejected() -> None:
    parser = spdy.FrameParser(spdy.HeaderCodec())
    with pytest.raises(spdy.SpdyProtocolError):
        list(parser.feed(struct.pack(">HHI", 0x8002, 6, 4) + b"\0\0\0\1"))
    parser = spdy.FrameParser(spdy.HeaderCodec())
    garbage = struct.pack(">IIBB", 1, 0, 0, 0) + b"not zlib at all"
    with pytest.raises(spdy.SpdyProtocolError):
        list(parser.feed(struct.pack(">HHI", 0x8003, 1, len(garbage)) + garbage))


def test_unknown_control_frames_are_passed_over() -> None:
    parser = spdy.FrameParser(spdy.HeaderCodec())
    frames = list(parser.feed(struct.pack(">HHI", 0x8003, 42, 2) + b"zz"))
    assert frames == [spdy.UnknownControl(42)]


def test_tokens_are_single_use_and_typed() -> None:
    cache = TokenCache(ttl_s=60)
    spec = ExecSpec("c", ("ls",), False, False, True, True)
    token = cache.issue(spec)
    assert len(token) >= 32
    assert cache.redeem("attach", token) is None  # wrong kind uses it up too
    token = cache.issue(spec)
    assert cache.redeem("exec", token) == spec
    assert cache.redeem("exec", token) is None


def test_tokens_expire() -> None:
    now = [100.0]
    cache = TokenCache(ttl_s=10, clock=lambda: now[0])
    token = cache.issue(AttachSpec("c", False, True, True, False))
    now[0] += 10.5
    assert cache.redeem("attach", token) is None
    assert len(cache) == 0


def test_status_encoding() -> None:
    assert json.loads(status_bytes(Outcome(), True)) == {"metadata": {}, "status": "Success"}
    assert status_bytes(Outcome(), False) == b""
    failed = json.loads(status_bytes(Outcome(exit_code=2), True))
    assert failed["reason"] == "NonZeroExitCode"
    assert failed["details"]["causes"] == [{"reason": "ExitCode", "message": "2"}]
    broken = json.loads(status_bytes(Outcome(error="no such container"), True))
    assert broken["reason"] == "InternalError" and broken["code"] == 500
    assert b"no such container" in status_bytes(Outcome(error="no such container"), False)

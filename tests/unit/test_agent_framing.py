"""The agent wire format and the RPC layer on top of it, over real unix socket pairs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator

import pytest
from google.protobuf.wrappers_pb2 import StringValue, UInt32Value

from crivm.agent.framing import (
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameTooLarge,
    FrameType,
    PeerHungUp,
    UnknownFrameType,
    discard_payload,
    encode_frame,
    read_frame,
)
from crivm.agent.rpc import INITIAL_WINDOW, Code, ConnectionLost, RpcClient, RpcError, RpcServer

pytestmark = pytest.mark.timeout(30)


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_frame_round_trip() -> None:
    frames = [
        Frame(1, FrameType.REQUEST, b"hello"),
        Frame(0xFFFFFFFF, FrameType.DATA, bytes(range(256)) * 10, flags=0x80),
        Frame(7, FrameType.CANCEL),
    ]
    reader = reader_with(b"".join(encode_frame(f) for f in frames))
    for expected in frames:
        assert await read_frame(reader) == expected
    assert await read_frame(reader) is None


async def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    wire = encode_frame(Frame(0x01020304, FrameType.RESPONSE, b"xyz", flags=5))
    assert HEADER_SIZE == 10
    assert wire[:HEADER_SIZE] == b"\x00\x00\x00\x03\x01\x02\x03\x04\x02\x05"
    assert wire[HEADER_SIZE:] == b"xyz"


async def test_partial_reads_one_byte_at_a_time() -> None:
    frames = [Frame(3, FrameType.REQUEST, b"a" * 1000), Frame(5, FrameType.CLOSE, b"")]
    wire = b"".join(encode_frame(f) for f in frames)
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        for i in range(len(wire)):
            reader.feed_data(wire[i : i + 1])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(trickle())
    assert await read_frame(reader) == frames[0]
    assert await read_frame(reader) == frames[1]
    assert await read_frame(reader) is None
    await feeder


async def test_oversized_frame_rejected_from_its_header_alone() -> None:
    # The header claims 1 GiB, and no payload follows: read_frame must fail at once instead of
    # waiting for (or buffering) the payload.
    reader = reader_with(HEADER.pack(1 << 30, 9, FrameType.REQUEST, 0), eof=False)
    with pytest.raises(FrameTooLarge) as caught:
        await asyncio.wait_for(read_frame(reader, max_payload=1024), 1)
    assert caught.value.stream_id == 9
    assert caught.value.length == 1 << 30
    assert "over the 1024-byte limit" in str(caught.value)


async def test_oversized_payload_can_be_skipped_to_resync() -> None:
    big = Frame(1, FrameType.REQUEST, b"x" * 300_000)
    small = Frame(3, FrameType.REQUEST, b"ok")
    reader = reader_with(encode_frame(big) + encode_frame(small))
    with pytest.raises(FrameTooLarge) as caught:
        await read_frame(reader, max_payload=1000)
    await discard_payload(reader, caught.value.length)
    assert await read_frame(reader, max_payload=1000) == small


async def test_encoding_an_oversized_frame_is_refused() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(Frame(1, FrameType.DATA, b"x" * 11), max_payload=10)


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 50])
async def test_peer_hang_up_mid_frame(cut: int) -> None:
    wire = encode_frame(Frame(1, FrameType.REQUEST, b"p" * 100))
    with pytest.raises(PeerHungUp):
        await read_frame(reader_with(wire[:cut]))


async def test_unknown_frame_type_is_an_error() -> None:
    with pytest.raises(UnknownFrameType):
        await read_frame(reader_with(HEADER.pack(0, 1, 99, 0)))


# ---------------------------------------------------------------------------- RPC layer


class EchoService:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.produced = 0

    async def echo(self, request: StringValue) -> StringValue:
        return StringValue(value=request.value)

    async def slow(self, request: UInt32Value) -> UInt32Value:
        await asyncio.sleep(request.value / 1000)
        return request

    async def missing(self, request: StringValue) -> StringValue:
        raise RpcError(Code.NOT_FOUND, f"no such thing {request.value!r}")

    async def broken(self, request: StringValue) -> StringValue:
        raise ValueError("handler bug")

    async def hang(self, request: StringValue) -> StringValue:
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
        raise AssertionError("unreachable")

    async def count(self, request: UInt32Value) -> AsyncGenerator[UInt32Value, None]:
        for i in range(request.value):
            self.produced += 1
            yield UInt32Value(value=i)


def echo_server(service: EchoService, max_payload: int = 1 << 20) -> RpcServer:
    server = RpcServer(max_payload=max_payload)
    server.add_unary("Echo", StringValue, service.echo)
    server.add_unary("Slow", UInt32Value, service.slow)
    server.add_unary("Missing", StringValue, service.missing)
    server.add_unary("Broken", StringValue, service.broken)
    server.add_unary("Hang", StringValue, service.hang)
    server.add_stream("Count", UInt32Value, service.count)
    return server


async def connect(
    server: RpcServer, client_max_payload: int = 1 << 20
) -> tuple[RpcClient, asyncio.Task[None]]:
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s_reader, s_writer = await asyncio.open_unix_connection(sock=server_sock)
    c_reader, c_writer = await asyncio.open_unix_connection(sock=client_sock)
    serving = asyncio.create_task(server.serve_connection(s_reader, s_writer))
    return RpcClient(c_reader, c_writer, max_payload=client_max_payload), serving


async def test_unary_call_and_error_statuses() -> None:
    service = EchoService()
    client, serving = await connect(echo_server(service))
    reply = await client.call("Echo", StringValue(value="hi"), StringValue)
    assert reply.value == "hi"
    with pytest.raises(RpcError) as caught:
        await client.call("Missing", StringValue(value="x"), StringValue)
    assert caught.value.code == Code.NOT_FOUND
    assert caught.value.message == "no such thing 'x'"
    with pytest.raises(RpcError) as caught:
        await client.call("Broken", StringValue(), StringValue)
    assert caught.value.code == Code.INTERNAL
    assert "handler bug" in caught.value.message
    with pytest.raises(RpcError) as caught:
        await client.call("Nope", StringValue(), StringValue)
    assert caught.value.code == Code.UNIMPLEMENTED
    await client.close()
    await asyncio.wait_for(serving, 5)


async def test_concurrent_calls_are_multiplexed_and_answered_out_of_order() -> None:
    client, serving = await connect(echo_server(EchoService()))
    finished: list[int] = []

    async def slow(ms: int) -> None:
        reply = await client.call("Slow", UInt32Value(value=ms), UInt32Value)
        assert reply.value == ms
        finished.append(ms)

    await asyncio.gather(*(slow(ms) for ms in (300, 200, 100, 0)))
    assert finished == [0, 100, 200, 300]
    replies = await asyncio.gather(
        *(client.call("Echo", StringValue(value=str(i)), StringValue) for i in range(200))
    )
    assert [r.value for r in replies] == [str(i) for i in range(200)]
    await client.close()
    await serving


async def test_streamed_reply_with_flow_control() -> None:
    service = EchoService()
    client, serving = await connect(echo_server(service))
    received = []
    async for message in client.stream("Count", UInt32Value(value=100), UInt32Value):
        received.append(message.value)
        await asyncio.sleep(0.001)
        # The agent may run ahead of the consumer by its window, never further.
        assert service.produced - len(received) <= INITIAL_WINDOW + 1
    assert received == list(range(100))
    await client.close()
    await serving


async def test_timeout_cancels_the_call_on_the_server() -> None:
    service = EchoService()
    client, serving = await connect(echo_server(service))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.call("Hang", StringValue(), StringValue)
    await asyncio.wait_for(service.cancelled.wait(), 5)
    assert (await client.call("Echo", StringValue(value="still up"), StringValue)).value
    await client.close()
    await serving


async def test_oversized_request_is_rejected_and_the_connection_survives() -> None:
    client, serving = await connect(echo_server(EchoService(), max_payload=1000), 1 << 20)
    with pytest.raises(RpcError) as caught:
        await client.call("Echo", StringValue(value="x" * 5000), StringValue)
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert (await client.call("Echo", StringValue(value="small"), StringValue)).value == "small"
    await client.close()
    await serving


async def test_server_hang_up_fails_calls_in_flight() -> None:
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    c_reader, c_writer = await asyncio.open_unix_connection(sock=client_sock)
    client = RpcClient(c_reader, c_writer)
    call = asyncio.create_task(client.call("Echo", StringValue(value="x"), StringValue))
    await asyncio.sleep(0.05)
    # Half a frame, then the peer goes away.
    server_sock.sendall(encode_frame(Frame(1, FrameType.RESPONSE, b"abcdef"))[:12])
    server_sock.close()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(call, 5)
    assert client.closed
    with pytest.raises(ConnectionLost):
        await client.call("Echo", StringValue(), StringValue)
    await client.close()


async def test_client_hang_up_cancels_server_handlers() -> None:
    service = EchoService()
    client, serving = await connect(echo_server(service))
    call = asyncio.create_task(client.call("Hang", StringValue(), StringValue))
    await asyncio.sleep(0.05)
    await client.close()
    await asyncio.wait_for(serving, 5)
    assert service.cancelled.is_set()
    with pytest.raises(ConnectionLost):
        await call

"""crivm.runtime.grpc_server + http2, served in-process and called by grpcio's own client.

The handlers here are small fakes; the daemon's real ones are exercised through this server by
every integration test, and by critest's grpc-go client.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from crivm.errors import NotFound
from crivm.proto import api_pb2, api_pb2_grpc
from crivm.runtime import http2, wire
from crivm.runtime.call_scope import CallScope
from crivm.runtime.grpc_server import (
    STATUS_CODES,
    GrpcServer,
    Method,
    parse_timeout,
    percent_encode,
)

MAX_MESSAGE = 8 << 20


class Handlers:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.observed: list[tuple[str, str]] = []

    async def version(self, request: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(version=request.version, runtime_name="crivm")

    async def status(self, request: api_pb2.ContainerStatusRequest) -> Any:
        if request.container_id == "boom":
            raise RuntimeError("unexpected")
        raise NotFound(f"container {request.container_id!r} not found: 100% gone, ünïcode")

    async def list_containers(self, request: api_pb2.ListContainersRequest) -> wire.Encoded:
        # ~3 MB: far beyond the 64 KiB windows a peer starts with.
        item = api_pb2.Container(id="c" * 64, labels={"k": "v" * 3000})
        return wire.Encoded(wire.field_element(1, item) * 1000)

    async def create(self, request: api_pb2.CreateContainerRequest) -> Any:
        return api_pb2.CreateContainerResponse(
            container_id=str(len(request.config.annotations["big"])))

    async def stop(self, request: api_pb2.StopContainerRequest) -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return api_pb2.StopContainerResponse()

    async def pods(self, request: api_pb2.ListPodSandboxRequest) -> Any:
        await asyncio.sleep(0.5)
        return api_pb2.ListPodSandboxResponse(items=[api_pb2.PodSandbox(id="p")])

    async def events(self, request: api_pb2.GetEventsRequest) -> AsyncIterator[Any]:
        for number in range(2000):
            yield api_pb2.ContainerEventResponse(container_id=f"{number}" + "x" * 1000)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Handlers, str, GrpcServer]]:
    handlers = Handlers()
    service = "/runtime.v1.RuntimeService/"
    methods = {
        service + "Version": Method("Version", api_pb2.VersionRequest.FromString, handlers.version),
        service + "ContainerStatus": Method(
            "ContainerStatus", api_pb2.ContainerStatusRequest.FromString, handlers.status),
        service + "ListContainers": Method(
            "ListContainers", api_pb2.ListContainersRequest.FromString, handlers.list_containers),
        service + "CreateContainer": Method(
            "CreateContainer", api_pb2.CreateContainerRequest.FromString, handlers.create),
        service + "StopContainer": Method(
            "StopContainer", api_pb2.StopContainerRequest.FromString, handlers.stop),
        service + "ListPodSandbox": Method(
            "ListPodSandbox", api_pb2.ListPodSandboxRequest.FromString, handlers.pods),
        service + "GetContainerEvents": Method(
            "GetContainerEvents", api_pb2.GetEventsRequest.FromString, handlers.events, True),
    }
    scope = CallScope([lambda method, seconds, code: handlers.observed.append((method, code))])
    server = GrpcServer(methods, scope, MAX_MESSAGE)
    path = str(tmp_path / "crivm.sock")
    await server.listen(path)
    yield handlers, path, server
    await server.stop(1.0)


def _channel(path: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix://{path}", options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ])


async def test_unary_calls_errors_and_unknown_methods(served: Any) -> None:
    handlers, path, _ = served
    async with _channel(path) as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        for number in range(50):  # the header table fills and is reused
            reply = await runtime.Version(api_pb2.VersionRequest(version=str(number)), timeout=5)
            assert reply.version == str(number) and reply.runtime_name == "crivm"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="x"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "container 'x' not found: 100% gone, ünïcode"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="boom"))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "unexpected" in (caught.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id="p"))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # Bytes that are no VersionRequest: a field 1 claiming 100 bytes, with 1 there.
        malformed = channel.unary_unary("/runtime.v1.RuntimeService/Version")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await malformed(b"\x0a\x64x")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed Version request" in (caught.value.details() or "")
    assert ("Version", "OK") in handlers.observed
    assert ("ContainerStatus", "NOT_FOUND") in handlers.observed


async def test_large_messages_both_ways_and_concurrent_calls(served: Any) -> None:
    _, path, _ = served
    async with _channel(path) as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        big = api_pb2.CreateContainerRequest(
            config=api_pb2.ContainerConfig(annotations={"big": "a" * (5 << 20)}))
        lists = [runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=20)
                 for _ in range(4)]
        creates = [runtime.CreateContainer(big, timeout=20) for _ in range(3)]
        replies = await asyncio.gather(*lists, *creates)
        for reply in replies[:4]:
            assert len(reply.containers) == 1000
            assert reply.containers[999].labels["k"] == "v" * 3000
        for reply in replies[4:]:
            assert reply.container_id == str(5 << 20)

        too_big = api_pb2.CreateContainerRequest(
            config=api_pb2.ContainerConfig(annotations={"big": "a" * (MAX_MESSAGE + 1)}))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.CreateContainer(too_big, timeout=20)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection is still good.
        assert (await runtime.Version(api_pb2.VersionRequest(), timeout=5)).runtime_name


async def test_server_streaming(served: Any) -> None:
    _, path, _ = served
    async with _channel(path) as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        numbers = [int(event.container_id.rstrip("x"))
                   async for event in runtime.GetContainerEvents(api_pb2.GetEventsRequest())]
        assert numbers == list(range(2000))


async def test_deadline_and_cancel_stop_the_handler(served: Any) -> None:
    handlers, path, _ = served
    async with _channel(path) as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.StopContainer(api_pb2.StopContainerRequest(), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(handlers.cancelled.wait(), 5)

        handlers.cancelled.clear()
        call = runtime.StopContainer(api_pb2.StopContainerRequest())
        await asyncio.sleep(0.2)
        call.cancel()
        await asyncio.wait_for(handlers.cancelled.wait(), 5)
        assert (await runtime.Version(api_pb2.VersionRequest(), timeout=5)).runtime_name


async def test_protocol_violations_close_only_that_connection(served: Any) -> None:
    _, path, _ = served
    loop = asyncio.get_running_loop()

    async def exchange(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.setblocking(False)
            await loop.sock_connect(raw, path)
            await loop.sock_sendall(raw, data)
            received = b""
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(raw, 65536), 5)
                if not chunk:
                    return received
                received += chunk

    # Closed after the server's own preface (its SETTINGS and window), nothing more.
    refused = _frames(await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert [kind for kind, *_ in refused] == [http2.SETTINGS, http2.WINDOW_UPDATE]

    settings = http2.frame(http2.SETTINGS, 0, 0)
    ping = http2.frame(http2.PING, 0, 0, b"12345678")
    oversized = struct.pack(">BHBBI", 0, 20000, http2.DATA, 0, 1)
    received = await exchange(http2.PREFACE + settings + ping + oversized)
    frames = _frames(received)
    assert (http2.PING, http2.ACK, b"12345678") in [(k, f, p) for k, f, _, p in frames]
    goaway = [p for k, _, _, p in frames if k == http2.GOAWAY]
    assert goaway and struct.unpack(">I", goaway[0][4:8])[0] == http2.FRAME_SIZE_ERROR

    async with _channel(path) as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        assert (await runtime.Version(api_pb2.VersionRequest(), timeout=5)).runtime_name


async def test_stop_lets_running_calls_finish(served: Any) -> None:
    handlers, path, server = served
    async with _channel(path) as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        quick = runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)
        slow = runtime.StopContainer(api_pb2.StopContainerRequest())
        await asyncio.sleep(0.2)
        await server.stop(2.0)
        # Within the grace: answered; beyond it: cancelled.
        assert [pod.id for pod in (await quick).items] == ["p"]
        await asyncio.wait_for(handlers.cancelled.wait(), 5)
        with pytest.raises(grpc.aio.AioRpcError):
            await slow
        # Nothing new is taken.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.Version(api_pb2.VersionRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    while len(data) >= 9:
        high, low, kind, flags, stream_id = struct.unpack_from(">BHBBI", data)
        length = high << 16 | low
        frames.append((kind, flags, stream_id, data[9:9 + length]))
        data = data[9 + length:]
    return frames


def test_status_codes_are_grpcs() -> None:
    for name, number in STATUS_CODES.items():
        assert grpc.StatusCode[name].value[0] == number


def test_timeouts_and_messages() -> None:
    assert parse_timeout("179999m") == pytest.approx(179.999)
    assert parse_timeout("2S") == 2.0 and parse_timeout("1H") == 3600.0
    assert parse_timeout("123456789S") is None and parse_timeout("5x") is None
    assert parse_timeout("") is None
    assert percent_encode("a%b\nü") == b"a%25b%0A%C3%BC"

"""The supervisor's agent multiplexer, between real RPC clients and a real RPC server that
stands in for the agent (no VM: the server runs on the other end of a unix socket pair)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from crivm.agent.rpc import RpcClient, RpcServer
from crivm.proto import agent_pb2 as pb
from crivm.shim.agent_mux import AgentMux

pytestmark = pytest.mark.timeout(30)


class FakeAgent:
    """Echoes WriteStdin's data as WriteStdinResponse.written; ReadStdout streams chunks;
    WaitProcess blocks until released and records cancellations."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def write(self, request: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        await asyncio.sleep(0.01 * len(request.data))  # later calls may answer first
        return pb.WriteStdinResponse(written=len(request.data))

    async def wait(self, request: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return pb.WaitProcessResponse(exit_code=7)

    async def read(
        self, request: pb.ReadStreamRequest
    ) -> AsyncGenerator[pb.ReadStreamResponse, None]:
        for index in range(40):  # more than one flow-control window
            yield pb.ReadStreamResponse(data=f"{request.container_id}:{index};".encode())

    def server(self) -> RpcServer:
        server = RpcServer()
        server.add_unary("WriteStdin", pb.WriteStdinRequest, self.write)
        server.add_unary("WaitProcess", pb.WaitProcessRequest, self.wait)
        server.add_stream("ReadStdout", pb.ReadStreamRequest, self.read)
        return server


async def _client(path: str) -> RpcClient:
    return RpcClient(*await asyncio.open_unix_connection(path))


async def test_clients_share_one_agent_connection(tmp_path: Path) -> None:
    agent = FakeAgent()
    host_end, guest_end = socket.socketpair()
    guest_reader, guest_writer = await asyncio.open_connection(sock=guest_end)
    serving = asyncio.create_task(agent.server().serve_connection(guest_reader, guest_writer))
    mux = AgentMux(*await asyncio.open_connection(sock=host_end))
    path = str(tmp_path / "mux.sock")
    await mux.listen(path)
    relay = asyncio.create_task(mux.relay())

    one, two = await _client(path), await _client(path)
    # Both clients start their stream ids at random; force a clash on purpose.
    two._next_stream_id = one._next_stream_id  # noqa: SLF001
    calls = [client.call("WriteStdin", pb.WriteStdinRequest(data=b"x" * size),
                         pb.WriteStdinResponse)
             for client, size in ((one, 5), (two, 1), (one, 3), (two, 2))]
    replies = await asyncio.gather(*calls)
    assert [reply.written for reply in replies] == [5, 1, 3, 2]

    streamed = [m.data async for m in two.stream("ReadStdout", pb.ReadStreamRequest(
        container_id="c"), pb.ReadStreamResponse)]
    assert b"".join(streamed) == b"".join(f"c:{i};".encode() for i in range(40))

    # A client that goes away cancels its call in the agent.
    waiting = asyncio.create_task(one.call("WaitProcess", pb.WaitProcessRequest(),
                                           pb.WaitProcessResponse))
    await asyncio.sleep(0.1)
    await one.close()
    await asyncio.wait_for(agent.cancelled.wait(), 5)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)

    # The other client is unaffected, and the agent hanging up ends the relay.
    agent.release.set()
    reply = await two.call("WaitProcess", pb.WaitProcessRequest(), pb.WaitProcessResponse)
    assert reply.exit_code == 7
    guest_writer.close()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await asyncio.wait_for(relay, 5)
    assert not Path(path).exists()
    await two.close()

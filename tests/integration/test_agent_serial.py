"""The agent's serial transport, with a pty standing in for the virtio-serial port.

A pty is a character device like /dev/virtio-ports/agent.0, so the agent opens and serves it
the same way. The test holds the master side, as QEMU's chardev socket would.
"""

from __future__ import annotations

import asyncio
import os
import tty
from pathlib import Path

import pytest
from google.protobuf.message import Message

from crivm.agent.rpc import RpcClient
from crivm.agent.transport import char_device_streams
from crivm.proto import agent_pb2 as pb
from tests.fixtures.agent import start_agent, stop_agent

pytestmark = pytest.mark.timeout(60)


async def host_side(fd: int) -> tuple[RpcClient, asyncio.BaseTransport]:
    reader, writer, read_transport = await char_device_streams(os.dup(fd))
    return RpcClient(reader, writer), read_transport


async def call_until_answered(rpc: RpcClient, request: Message) -> pb.CheckResponse:
    # The agent may not have opened the port yet; a request it never read gets no answer.
    for _ in range(50):
        try:
            async with asyncio.timeout(0.5):
                return await rpc.call("Check", request, pb.CheckResponse)
        except TimeoutError:
            continue
    raise AssertionError("the agent never answered on the serial port")


async def test_serial_port_sessions(short_tmp: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    port = os.ttyname(slave)
    agent = await start_agent(short_tmp / "state", "", transport=f"serial:{port}")
    try:
        first, first_reading = await host_side(master)
        reply = await call_until_answered(first, pb.CheckRequest())
        assert reply.status == pb.CheckResponse.SERVING
        # A second host connection on the same port: its random stream ids keep it from
        # taking replies meant for the first.
        await first.close()
        first_reading.close()
        second, second_reading = await host_side(master)
        checks = [second.call("Check", pb.CheckRequest(), pb.CheckResponse) for _ in range(20)]
        replies = await asyncio.wait_for(asyncio.gather(*checks), 10)
        assert all(r.status == pb.CheckResponse.SERVING for r in replies)
        await second.close()
        second_reading.close()
        # The host side goes away for good: the agent keeps running and waits for the port.
        os.close(master)
        os.close(slave)
        await asyncio.sleep(1.5)
        assert agent.process.returncode is None
    finally:
        await stop_agent(agent)
        print(agent.log_text())
    assert agent.process.returncode == 0

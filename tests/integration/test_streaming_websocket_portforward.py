"""Exec over WebSocket channels, and port-forward over SPDY, WebSocket channels and tunnelled
SPDY, to an HTTP server inside a network namespace this test creates."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from crivm.netbridge.netns import create_netns, netns_argv_prefix, remove_netns
from crivm.runtime.streaming.server import StreamingServer
from crivm.runtime.streaming.tokens import ExecSpec, PortForwardSpec
from tests.fixtures.host_streams import KNOWN_CONTAINER, HostStreams
from tests.fixtures.spdy_client import SpdyClient

pytestmark = pytest.mark.timeout(90)

POD = "pod-under-test"
PAGE = b"hello from inside the netns\n" * 100


@pytest.fixture
async def pod_http_server(tmp_path: object) -> AsyncIterator[tuple[str, int]]:
    """A netns with lo up and a python HTTP server on 127.0.0.1:8080 serving PAGE."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    ns = await create_netns(f"crivm-test-{uuid.uuid4().hex[:8]}", "/run/crivm-test/netns")
    root = f"/tmp/crivm-pf-{uuid.uuid4().hex[:8]}"
    os.makedirs(root)
    await asyncio.to_thread(Path(root, "index.html").write_bytes, PAGE)
    proc = await asyncio.create_subprocess_exec(
        *netns_argv_prefix(ns.path), "python3", "-m", "http.server", "--bind", "127.0.0.1",
        "--directory", root, "8080",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.1)
        for _ in range(100):
            probe = await asyncio.create_subprocess_exec(
                *netns_argv_prefix(ns.path), "python3", "-c",
                "import socket; socket.create_connection(('127.0.0.1', 8080), 1)",
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await probe.wait() == 0:
                break
            await asyncio.sleep(0.1)
        yield ns.path, 8080
    finally:
        proc.kill()
        await proc.wait()
        await remove_netns(ns.path)
        for name in os.listdir(root):
            os.unlink(os.path.join(root, name))
        os.rmdir(root)


@pytest.fixture
async def server(pod_http_server: tuple[str, int]) -> AsyncIterator[StreamingServer]:
    srv = StreamingServer(HostStreams({POD: pod_http_server[0]}), "127.0.0.1", 0, 30)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def exec_server() -> AsyncIterator[StreamingServer]:
    srv = StreamingServer(HostStreams(), "127.0.0.1", 0, 30)
    await srv.start()
    yield srv
    await srv.close()


HTTP_GET = b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n"


# -- exec over WebSocket --------------------------------------------------------------------

async def ws_exec(url: str, protocol: str, stdin: bytes | None = None,
                  resize: tuple[int, int] | None = None) -> tuple[dict[int, bytes], str]:
    channels: dict[int, bytes] = {}
    b64 = "base64" in protocol
    async with aiohttp.ClientSession() as session, session.ws_connect(
        url, protocols=[protocol]
    ) as ws:
        chosen = ws.protocol or ""

        async def send(channel: int, data: bytes) -> None:
            if b64:
                await ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
            else:
                await ws.send_bytes(bytes([channel]) + data)

        if resize is not None:
            await send(4, json.dumps({"Width": resize[0], "Height": resize[1]}).encode())
        if stdin is not None:
            await send(0, stdin)
            if protocol.startswith("v5."):
                await ws.send_bytes(bytes([255, 0]))
        async with asyncio.timeout(30):
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    data = bytes(message.data)
                    if data[0] == 255:
                        continue  # v5 close signal
                    channels[data[0]] = channels.get(data[0], b"") + data[1:]
                elif message.type == aiohttp.WSMsgType.TEXT:
                    text = str(message.data)
                    channel = ord(text[0]) - ord("0")
                    channels[channel] = channels.get(channel, b"") + base64.b64decode(text[1:])
    return channels, chosen


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io",
                                      "v4.base64.channel.k8s.io"])
async def test_ws_exec_exit_code(exec_server: StreamingServer, protocol: str) -> None:
    url = exec_server.url_for(ExecSpec(KNOWN_CONTAINER, ("sh", "-c", "echo a; echo b >&2; exit 5"),
                                       False, False, True, True))
    channels, chosen = await ws_exec(url, protocol)
    assert chosen == protocol
    assert channels[1] == b"a\n" and channels[2] == b"b\n"
    status = json.loads(channels[3])
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "5"}]


async def test_ws_v5_stdin_close_reaches_process(exec_server: StreamingServer) -> None:
    url = exec_server.url_for(ExecSpec(KNOWN_CONTAINER, ("cat",), False, True, True, False))
    channels, _ = await ws_exec(url, "v5.channel.k8s.io", stdin=b"echo me\n")
    assert channels[1] == b"echo me\n"
    assert json.loads(channels[3])["status"] == "Success"


async def test_ws_tty_resize(exec_server: StreamingServer) -> None:
    url = exec_server.url_for(ExecSpec(KNOWN_CONTAINER, ("stty", "size"), True, False, True,
                                       False))
    channels, _ = await ws_exec(url, "v5.channel.k8s.io", resize=(77, 33))
    assert channels[1].strip() == b"33 77"


async def test_ws_token_reuse_refused(exec_server: StreamingServer) -> None:
    url = exec_server.url_for(ExecSpec(KNOWN_CONTAINER, ("true",), False, False, True, False))
    await ws_exec(url, "v5.channel.k8s.io")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, protocols=["v5.channel.k8s.io"])
    assert refused.value.status == 404


# -- port-forward ----------------------------------------------------------------------------

async def test_spdy_port_forward(server: StreamingServer, pod_http_server: tuple[str, int]
                                 ) -> None:
    url = server.url_for(PortForwardSpec(POD, (8080,)))
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert client.protocol == "portforward.k8s.io"
    pages = []
    for request_id in range(3):  # several connections over one session, as kubectl does
        headers = {"port": "8080", "requestid": str(request_id)}
        error = await client.open_stream({**headers, "streamtype": "error"})
        data = await client.open_stream({**headers, "streamtype": "data"})
        await client.send(data, HTTP_GET, fin=True)
        pages.append(await data.read_all())
        assert await error.read_all() == b""
    assert all(page.endswith(PAGE) and page.startswith(b"HTTP/1.0 200") for page in pages)
    await client.close()


async def test_spdy_port_forward_to_closed_port_reports_error(server: StreamingServer) -> None:
    client = await SpdyClient.connect(server.url_for(PortForwardSpec(POD, ())),
                                      ["portforward.k8s.io"])
    headers = {"port": "9", "requestid": "0"}
    error = await client.open_stream({**headers, "streamtype": "error"})
    data = await client.open_stream({**headers, "streamtype": "data"})
    assert b"error forwarding port 9" in await error.read_all()
    assert await data.read_all() == b""
    await client.close()


async def test_spdy_stream_without_port_is_refused(server: StreamingServer) -> None:
    client = await SpdyClient.connect(server.url_for(PortForwardSpec(POD, ())),
                                      ["portforward.k8s.io"])
    stream = await client.open_stream({"streamtype": "data"})
    assert stream.reset
    await client.close()


async def test_ws_channel_port_forward(server: StreamingServer) -> None:
    url = server.url_for(PortForwardSpec(POD, (8080,)))
    received = b""
    async with aiohttp.ClientSession() as session, session.ws_connect(
        url, protocols=["v4.channel.k8s.io"]
    ) as ws:
        prefixes = []
        for _ in range(2):
            message = await ws.receive_bytes(timeout=10)
            prefixes.append(message)
        assert sorted(prefixes) == [b"\x00" + struct.pack("<H", 8080),
                                    b"\x01" + struct.pack("<H", 8080)]
        await ws.send_bytes(b"\x00" + HTTP_GET)
        async with asyncio.timeout(20):
            async for message in ws:
                data = bytes(message.data)
                if data[0] == 0:
                    received += data[1:]
                if received.endswith(PAGE):
                    break
    assert received.startswith(b"HTTP/1.0 200")


async def test_ws_tunnelled_spdy_port_forward(server: StreamingServer) -> None:
    """kubectl/crictl --transport websocket: SPDY frames inside binary WebSocket messages."""
    url = server.url_for(PortForwardSpec(POD, (8080,)))
    async with aiohttp.ClientSession() as session, session.ws_connect(
        url, protocols=["SPDY/3.1+portforward.k8s.io"]
    ) as ws:
        assert ws.protocol == "SPDY/3.1+portforward.k8s.io"
        reader = asyncio.StreamReader()

        async def pump() -> None:
            async for message in ws:
                reader.feed_data(bytes(message.data))
            reader.feed_eof()

        pumping = asyncio.create_task(pump())

        class WsWriter:
            def write(self, data: bytes) -> None:
                asyncio.get_running_loop().create_task(ws.send_bytes(bytes(data)))

            async def drain(self) -> None:
                await asyncio.sleep(0)

            def close(self) -> None:
                pass

            async def wait_closed(self) -> None:
                pass

        client = SpdyClient(reader, WsWriter(), "")  # type: ignore[arg-type]
        headers = {"port": "8080", "requestid": "0"}
        await client.open_stream({**headers, "streamtype": "error"})
        data = await client.open_stream({**headers, "streamtype": "data"})
        await client.send(data, HTTP_GET, fin=True)
        page = await data.read_all()
        assert page.endswith(PAGE)
        await client.close()
        pumping.cancel()

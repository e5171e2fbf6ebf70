"""Exec sessions over SPDY/3.1 against the real streaming server, with host processes."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import pytest

from crivm.runtime.streaming.server import StreamingServer
from crivm.runtime.streaming.tokens import ExecSpec
from tests.fixtures.host_streams import KNOWN_CONTAINER, HostStreams
from tests.fixtures.spdy_client import SpdyClient, UpgradeRefused

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server() -> AsyncIterator[StreamingServer]:
    srv = StreamingServer(HostStreams(), "127.0.0.1", 0, token_ttl_s=30)
    await srv.start()
    yield srv
    await srv.close()


def exec_url(srv: StreamingServer, cmd: list[str], tty: bool = False, stdin: bool = False,
             stdout: bool = True, stderr: bool = True) -> str:
    return srv.url_for(ExecSpec(KNOWN_CONTAINER, tuple(cmd), tty, stdin, stdout, stderr))


async def run_session(
    url: str, protocol: str, tty: bool = False, stdin_data: bytes | None = None,
    resize: tuple[int, int] | None = None, stderr: bool = True,
) -> tuple[bytes, bytes, bytes, SpdyClient]:
    client = await SpdyClient.connect(url, [protocol])
    error = await client.open_stream({"streamtype": "error"})
    stdin = None
    if stdin_data is not None:
        stdin = await client.open_stream({"streamtype": "stdin"})
    stdout = await client.open_stream({"streamtype": "stdout"})
    err_stream = None
    if stderr and not tty:
        err_stream = await client.open_stream({"streamtype": "stderr"})
    if tty and protocol != "v2.channel.k8s.io":
        resize_stream = await client.open_stream({"streamtype": "resize"})
        if resize is not None:
            size = {"Width": resize[0], "Height": resize[1]}
            await client.send(resize_stream, json.dumps(size).encode() + b"\n")
    if stdin is not None and stdin_data is not None:
        await client.send(stdin, stdin_data, fin=True)
    out = await stdout.read_all()
    err = await err_stream.read_all() if err_stream else b""
    status = await error.read_all()
    return out, err, status, client


async def test_exit_code_and_output_v4(server: StreamingServer) -> None:
    url = exec_url(server, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    out, err, status, client = await run_session(url, "v4.channel.k8s.io")
    assert client.protocol == "v4.channel.k8s.io"
    assert (out, err) == (b"out\n", b"err\n")
    parsed = json.loads(status)
    assert parsed["status"] == "Failure"
    assert parsed["reason"] == "NonZeroExitCode"
    assert parsed["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    await asyncio.wait_for(client.goaway.wait(), 10)
    await client.close()


async def test_success_status_v4(server: StreamingServer) -> None:
    out, _, status, client = await run_session(exec_url(server, ["true"]), "v4.channel.k8s.io")
    assert out == b""
    assert json.loads(status) == {"metadata": {}, "status": "Success"}
    await client.close()


async def test_v2_reports_failure_as_text(server: StreamingServer) -> None:
    url = exec_url(server, ["sh", "-c", "exit 7"])
    _, _, status, client = await run_session(url, "v2.channel.k8s.io")
    assert client.protocol == "v2.channel.k8s.io"
    assert b"exit status 7" in status
    await client.close()


async def test_stdin_echo_and_close_reaches_process(server: StreamingServer) -> None:
    payload = b"hello\x00world\n" * 1000
    url = exec_url(server, ["cat"], stdin=True)
    out, _, status, client = await run_session(url, "v4.channel.k8s.io", stdin_data=payload)
    # cat exits only when stdin closes, so getting its output and status proves the close.
    assert out == payload
    assert json.loads(status)["status"] == "Success"
    await client.close()


async def test_large_binary_output(server: StreamingServer) -> None:
    url = exec_url(server, ["head", "-c", str(8 * 1024 * 1024), "/dev/urandom"], stderr=False)
    out, _, status, client = await run_session(url, "v4.channel.k8s.io", stderr=False)
    assert len(out) == 8 * 1024 * 1024
    assert json.loads(status)["status"] == "Success"
    await client.close()


async def test_tty_resize_shows_in_stty_size(server: StreamingServer) -> None:
    url = exec_url(server, ["sh", "-c", "stty size"], tty=True, stderr=False)
    out, _, status, client = await run_session(url, "v4.channel.k8s.io", tty=True,
                                               resize=(123, 45), stderr=False)
    assert out.strip() == b"45 123"
    assert json.loads(status)["status"] == "Success"
    await client.close()


async def test_tty_interactive_shell(server: StreamingServer) -> None:
    url = exec_url(server, ["sh"], tty=True, stdin=True, stderr=False)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    error = await client.open_stream({"streamtype": "error"})
    stdin = await client.open_stream({"streamtype": "stdin"})
    stdout = await client.open_stream({"streamtype": "stdout"})
    resize = await client.open_stream({"streamtype": "resize"})
    await client.send(resize, b'{"Width":80,"Height":24}')
    await client.send(stdin, b"stty size; exit 4\n")
    out = await stdout.read_all()
    assert b"24 80" in out
    assert json.loads(await error.read_all())["details"]["causes"][0]["message"] == "4"
    await client.close()


async def test_token_is_single_use(server: StreamingServer) -> None:
    url = exec_url(server, ["true"])
    _, _, _, client = await run_session(url, "v4.channel.k8s.io")
    await client.close()
    with pytest.raises(UpgradeRefused) as refused:
        await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert refused.value.status == 404


async def test_expired_token_is_404() -> None:
    srv = StreamingServer(HostStreams(), "127.0.0.1", 0, token_ttl_s=0.2)
    await srv.start()
    try:
        url = exec_url(srv, ["true"])
        await asyncio.sleep(0.4)
        with pytest.raises(UpgradeRefused) as refused:
            await SpdyClient.connect(url, ["v4.channel.k8s.io"])
        assert refused.value.status == 404
    finally:
        await srv.close()


async def test_unknown_protocol_is_refused(server: StreamingServer) -> None:
    with pytest.raises(UpgradeRefused) as refused:
        await SpdyClient.connect(exec_url(server, ["true"]), ["v9.channel.k8s.io"])
    assert refused.value.status == 403


async def test_ping_is_answered(server: StreamingServer) -> None:
    client = await SpdyClient.connect(exec_url(server, ["sleep", "5"]), ["v4.channel.k8s.io"])
    await client.ping(1)
    for _ in range(100):
        if getattr(client, "last_ping", None) == 1:
            break
        await asyncio.sleep(0.05)
    assert client.last_ping == 1
    await client.close()


async def test_many_concurrent_sessions(server: StreamingServer) -> None:
    async def one(index: int) -> None:
        url = exec_url(server, ["sh", "-c", f"echo {index}; exit {index % 5}"])
        out, _, status, client = await run_session(url, "v4.channel.k8s.io")
        assert out == f"{index}\n".encode()
        code = index % 5
        if code:
            assert json.loads(status)["details"]["causes"][0]["message"] == str(code)
        await client.close()

    await asyncio.gather(*(one(i) for i in range(40)))


async def test_hung_up_client_leaves_no_process(server: StreamingServer) -> None:
    backend = server.backend
    assert isinstance(backend, HostStreams)
    fds_before = len(os.listdir("/proc/self/fd"))
    url = exec_url(server, ["sleep", "1000"], stdin=True)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    await client.open_stream({"streamtype": "error"})
    await client.open_stream({"streamtype": "stdin"})
    await client.open_stream({"streamtype": "stdout"})
    await client.open_stream({"streamtype": "stderr"})
    for _ in range(100):
        if backend.started_pids:
            break
        await asyncio.sleep(0.05)
    (pid,) = backend.started_pids
    await client.close()
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        await asyncio.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    await asyncio.sleep(0.2)
    assert len(os.listdir("/proc/self/fd")) <= fds_before

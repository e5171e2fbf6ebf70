"""QmpControl against a scripted QMP peer on a unix socket (a fake QEMU monitor).

tests/integration/test_qemu_vm.py drives the same client against a real QEMU."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from crivm.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from crivm.hypervisor.qemu.qmp import QmpControl

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GREETING = {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}


def _send(writer: asyncio.StreamWriter, message: object) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def _serve(tmp_path: Path, peer: Peer) -> tuple[asyncio.Server, str]:
    path = str(tmp_path / "qmp.sock")

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _send(writer, GREETING)
        request = json.loads(await reader.readline())
        assert request == {"execute": "qmp_capabilities"}
        _send(writer, {"return": {}})
        await peer(reader, writer)
        writer.close()

    return await asyncio.start_unix_server(session, path), path


async def test_commands_answered_by_id_with_events_between(tmp_path: Path) -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = json.loads(await reader.readline())
        second = json.loads(await reader.readline())
        assert (first["execute"], second["execute"]) == ("query-status", "device_add")
        assert second["arguments"] == {"driver": "virtio-net-pci", "id": "n1", "mac": "x"}
        _send(writer, {"event": "RTC_CHANGE", "data": {}})
        _send(writer, {"id": second["id"], "error": {"class": "GenericError",
                                                      "desc": "Duplicate ID 'n1'"}})
        _send(writer, {"id": first["id"], "return": {"status": "running", "running": True}})
        await reader.readline()  # until the client goes

    server, path = await _serve(tmp_path, peer)
    qmp = QmpControl("vm1")
    try:
        await qmp.connect(path, timeout_s=5)
        status = asyncio.create_task(qmp.query_status())
        await asyncio.sleep(0)
        with pytest.raises(FailedPrecondition, match="Duplicate ID 'n1'"):
            await qmp.device_add("virtio-net-pci", "n1", mac="x")
        assert await status == "running"
    finally:
        await qmp.close()
        server.close()


async def test_connection_lost_and_slow_answers(tmp_path: Path) -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = json.loads(await reader.readline())
        if request["execute"] == "quit":
            return  # QEMU closes the socket as it exits
        await reader.readline()

    server, path = await _serve(tmp_path, peer)
    qmp = QmpControl("vm2")
    try:
        await qmp.connect(path, timeout_s=5)
        await qmp.quit()  # a close instead of an answer is a successful quit
        with pytest.raises(Unavailable):
            await qmp.query_status()
        await qmp.close()
        await qmp.connect(path, timeout_s=5)
        with pytest.raises(DeadlineExceeded):
            await qmp.execute("query-status", timeout_s=0.2)
    finally:
        await qmp.close()
        server.close()


async def test_no_socket_and_no_greeting(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="not answering"):
        await QmpControl("vm3").connect(str(tmp_path / "missing.sock"), timeout_s=0.3)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_unix_server(silent, str(tmp_path / "silent.sock"))
    try:
        with pytest.raises(DeadlineExceeded):
            await QmpControl("vm4").connect(str(tmp_path / "silent.sock"), timeout_s=0.3)
    finally:
        server.close()

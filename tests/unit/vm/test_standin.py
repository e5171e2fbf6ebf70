"""The stand-in hand-off: a real stand-in process gives its stdio to a real StandinServer,
whose relays talk to a fake agent (tests/integration/vm runs it all against a guest)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from crivm.errors import NotFound, Unavailable
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim import standin
from crivm.shim.bundle import ANNOTATION_AGENT_SOCKET, ANNOTATION_GUEST_ROOTFS
from crivm.shim.console import open_terminal
from crivm.shim.main import main
from crivm.shim.standin_relay import StandinServer

pytestmark = pytest.mark.timeout(60)


@dataclass
class _Reply:
    exit_code: int
    oom_killed: bool = False


@dataclass
class FakeAgent:
    """The calls a relay makes, for one process; the test decides when it exits."""

    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    exited: asyncio.Future[_Reply] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: asyncio.Event = field(default_factory=asyncio.Event)
    signals: asyncio.Queue[tuple[str, str, int]] = field(default_factory=asyncio.Queue)
    resizes: asyncio.Queue[tuple[int, int]] = field(default_factory=asyncio.Queue)

    async def _chunks(self, chunks: list[bytes]) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
        await asyncio.shield(self.exited)  # the stream ends when the process does

    def read_stdout(self, container_id: str, exec_id: str = "") -> AsyncIterator[bytes]:
        return self._chunks(self.stdout)

    def read_stderr(self, container_id: str, exec_id: str = "") -> AsyncIterator[bytes]:
        return self._chunks(self.stderr)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.stdin += data
        return len(data)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self.stdin_closed.set()

    async def wait_process_reply(self, container_id: str, exec_id: str = "",
                                 time_limit: float | None = None) -> _Reply:
        return await asyncio.shield(self.exited)

    async def signal_process(self, container_id: str, exec_id: str, signum: int,
                             *, all_processes: bool = False) -> None:
        await self.signals.put((container_id, exec_id, signum))

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        await self.resizes.put((rows, columns))

    async def close(self) -> None:
        pass


class LostAgent(FakeAgent):
    """The VM went away: every call fails, as over a broken mux connection."""

    async def _chunks(self, chunks: list[bytes]) -> AsyncIterator[bytes]:
        raise Unavailable("agent ReadStdout: connection lost")
        yield b""  # an async generator, all the same

    async def wait_process_reply(self, container_id: str, exec_id: str = "",
                                 time_limit: float | None = None) -> _Reply:
        raise Unavailable("agent WaitProcess: connection lost")

    async def signal_process(self, container_id: str, exec_id: str, signum: int,
                             *, all_processes: bool = False) -> None:
        raise NotFound("no such process")


async def _server(tmp_path: Path, agent: FakeAgent) -> tuple[StandinServer, str]:
    server = StandinServer(cast(AgentClient, agent))
    path = str(tmp_path / "standin.sock")
    await server.listen(path)
    return server, path


async def _start_standin(socket_path: str, *, exec_id: str = "", terminal: bool = False,
                         with_stdin: bool = False, oom_file: str = "",
                         **stdio: Any) -> asyncio.subprocess.Process:
    argv = standin.argv(sys.executable, socket_path, "ctr", exec_id, terminal, with_stdin,
                        oom_file)
    return await asyncio.create_subprocess_exec(*argv, start_new_session=True, **stdio)


async def _until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within 10 s")


async def test_output_and_exit_code_reach_the_standins_fds(tmp_path: Path) -> None:
    agent = FakeAgent(stdout=[b"hello ", b"world\n"], stderr=[b"oops\n"])
    server, path = await _server(tmp_path, agent)
    oom = tmp_path / "oom"
    proc = await _start_standin(path, oom_file=str(oom), stdout=asyncio.subprocess.PIPE,
                                stderr=asyncio.subprocess.PIPE)
    await _until(lambda: server.relaying == 1)
    # A bare interpreter: neither asyncio nor protobuf is loaded in the stand-in.
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "_asyncio" not in maps and "protobuf" not in maps and "_upb" not in maps
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == standin.PROCESS_NAME
    agent.exited.set_result(_Reply(exit_code=3, oom_killed=True))
    stdout, stderr = await proc.communicate()
    assert (proc.returncode, stdout, stderr) == (3, b"hello world\n", b"oops\n")
    assert oom.exists()  # before the stand-in exited, as conmon's marker would be
    await server.close()
    assert not os.path.exists(path)


async def test_stdin_is_relayed_and_closed(tmp_path: Path) -> None:
    agent = FakeAgent()
    server, path = await _server(tmp_path, agent)
    proc = await _start_standin(path, with_stdin=True, stdin=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"line one\n")
    await proc.stdin.drain()
    proc.stdin.close()
    await asyncio.wait_for(agent.stdin_closed.wait(), 10)
    assert bytes(agent.stdin) == b"line one\n"
    agent.exited.set_result(_Reply(exit_code=0))
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    await server.close()


async def test_signals_are_forwarded_and_a_signal_death_is_mirrored(tmp_path: Path) -> None:
    agent = FakeAgent()
    server, path = await _server(tmp_path, agent)
    proc = await _start_standin(path, exec_id="exec-1")
    await _until(lambda: server.relaying == 1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(agent.signals.get(), 10) == ("ctr", "exec-1", signal.SIGTERM)
    proc.send_signal(signal.SIGUSR1)
    assert (await asyncio.wait_for(agent.signals.get(), 10))[2] == signal.SIGUSR1
    agent.exited.set_result(_Reply(exit_code=128 + signal.SIGTERM))  # as the agent reports it
    assert await asyncio.wait_for(proc.wait(), 10) == 143
    await server.close()


async def test_a_killed_standin_takes_its_process_along(tmp_path: Path) -> None:
    agent = FakeAgent()
    server, path = await _server(tmp_path, agent)
    proc = await _start_standin(path, exec_id="exec-2", stdout=asyncio.subprocess.PIPE)
    await _until(lambda: server.relaying == 1)
    proc.kill()
    assert await asyncio.wait_for(agent.signals.get(), 10) == ("ctr", "exec-2", signal.SIGKILL)
    await _until(lambda: server.relaying == 0)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.read(), 10) == b""  # no fd copy left open
    await proc.wait()
    await server.close()


async def test_standins_exit_137_when_the_supervisor_goes(tmp_path: Path) -> None:
    server, path = await _server(tmp_path, FakeAgent())
    proc = await _start_standin(path, stderr=asyncio.subprocess.PIPE)
    await _until(lambda: server.relaying == 1)
    await server.close()
    _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == standin.LOST_EXIT_CODE
    assert b"supervisor went away" in stderr


async def test_a_lost_agent_is_exit_137_with_a_word_on_stderr(tmp_path: Path) -> None:
    server, path = await _server(tmp_path, LostAgent())
    proc = await _start_standin(path, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == standin.LOST_EXIT_CODE
    assert b"lost the process in the VM" in stderr
    await server.close()


async def test_no_supervisor_is_exit_137(tmp_path: Path) -> None:
    proc = await _start_standin(str(tmp_path / "nobody.sock"), stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == standin.LOST_EXIT_CODE
    assert b"cannot hand the process over" in stderr


async def test_a_terminal_carries_output_input_and_resizes(tmp_path: Path) -> None:
    agent = FakeAgent(stdout=[b"prompt$ "])
    server, path = await _server(tmp_path, agent)
    terminal = open_terminal()  # raw, as the CLI makes it
    master, slave = terminal.master, terminal.slave
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = await _start_standin(path, terminal=True, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        # The first size goes to the guest when the relay starts.
        assert await asyncio.wait_for(agent.resizes.get(), 10) == (24, 80)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        assert await asyncio.wait_for(agent.resizes.get(), 10) == (50, 132)
        os.write(master, b"ls\r")
        await _until(lambda: bytes(agent.stdin) == b"ls\r")
        assert os.read(master, 100) == b"prompt$ "
        agent.exited.set_result(_Reply(exit_code=0))
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        os.close(master)
        await server.close()


def test_the_supervisor_does_not_load_grpc_or_the_daemon_side() -> None:
    # One supervisor runs per VM pod and relays all its containers' stdio: what it imports
    # is host memory per pod.
    # It is started through supervisor_entry, which keeps OpenSSL (~4.5 MiB) out as well.
    probe = ("import sys, crivm.shim.supervisor_entry; "
             "print(sorted(m for m in ('grpc', 'pyroute2', 'aiohttp', 'ssl', '_ssl', 'qemu')"
             " if sys.modules.get(m)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]"


def test_create_refuses_a_pod_without_a_standin_socket(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A supervisor that is gone, or predates the stand-in relay: the CLI says so before it
    # asks the guest for anything (there is no agent socket here to ask either).
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    spec = {"process": {"args": ["sh"]},
            "annotations": {ANNOTATION_AGENT_SOCKET: str(pod_dir / "agent-mux.sock"),
                            ANNOTATION_GUEST_ROOTFS: "/g"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    started = time.monotonic()
    assert main(["--root", str(tmp_path / "root"), "create", "--bundle", str(tmp_path),
                 "ctr"]) == 1
    assert "serves no" in capsys.readouterr().err
    assert time.monotonic() - started < 5

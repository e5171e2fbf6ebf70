"""The real agent on the host (unix socket), driven by the real AgentClient, running real runc."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crivm import errors
from crivm.proto import agent_pb2 as pb
from crivm.runtime.vm_backend.agent_client import AgentClient
from tests.fixtures.agent import (
    RunningAgent,
    busybox_rootfs,
    container_processes,
    default_spec,
    processes_mentioning,
    start_agent,
    stop_agent,
)

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.timeout(120)]


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
    return b"".join(chunks)


async def test_echo_container_output_and_exit_code(
    client: AgentClient, short_tmp: Path, agent: RunningAgent
) -> None:
    rootfs = busybox_rootfs(short_tmp / "echo")
    spec = await default_spec(short_tmp / "echo-spec", ["sh", "-c", "echo hi; echo oops >&2"])
    pid = await client.create_container("echo", spec, str(rootfs))
    assert pid > 0
    stdout = asyncio.create_task(collect(client.read_stdout("echo")))
    stderr = asyncio.create_task(collect(client.read_stderr("echo")))
    await client.start_container("echo")
    assert await client.wait_process("echo", time_limit=30) == (0, 0)
    assert await asyncio.wait_for(stdout, 10) == b"hi\n"
    assert await asyncio.wait_for(stderr, 10) == b"oops\n"
    await client.remove_container("echo")
    assert container_processes("echo") == []
    # Removing again, or something never created, succeeds.
    await client.remove_container("echo")
    with pytest.raises(errors.NotFound):
        await client.wait_process("echo", time_limit=5)


async def test_exec_stdin_tty_stats_and_signal(client: AgentClient, short_tmp: Path) -> None:
    rootfs = busybox_rootfs(short_tmp / "sleeper")
    spec = await default_spec(short_tmp / "sleeper-spec", ["sleep", "1000"])
    await client.create_container("sleeper", spec, str(rootfs))
    with pytest.raises(errors.AlreadyExists):
        await client.create_container("sleeper", spec, str(rootfs))
    await client.start_container("sleeper")

    # An exec with stdin: what goes in comes back out, and its exit code is its own.
    script = "echo from exec; cat; exit 7"
    process = pb.Process(args=["sh", "-c", script], stdin=True, env=["PATH=/bin"], cwd="/")
    assert await client.exec_process("sleeper", "e1", process) > 0
    out = asyncio.create_task(collect(client.read_stdout("sleeper", "e1")))
    await client.write_stdin("sleeper", "e1", b"piped\n")
    await client.close_stdin("sleeper", "e1")
    assert await client.wait_process("sleeper", "e1", time_limit=30) == (7, 0)
    assert await asyncio.wait_for(out, 10) == b"from exec\npiped\n"

    # An exec on a terminal.
    tty = pb.Process(args=["sh", "-c", "tty; stty size"], terminal=True, env=["PATH=/bin"])
    await client.exec_process("sleeper", "t1", tty)
    await client.resize_tty("sleeper", "t1", 33, 111)
    tty_out = await asyncio.wait_for(collect(client.read_stdout("sleeper", "t1")), 10)
    assert await client.wait_process("sleeper", "t1", time_limit=30) == (0, 0)
    assert b"/dev/pts/" in tty_out, tty_out

    stats = await client.stats_container("sleeper")
    assert stats.pids.current >= 1
    assert stats.memory.usage_bytes > 0
    assert stats.cpu.usage_ns > 0

    with pytest.raises(errors.InvalidArgument):
        await client.exec_process("sleeper", "bad/id", process)
    with pytest.raises(errors.NotFound):
        await client.signal_process("sleeper", "nope", signal.SIGTERM)

    await client.signal_process("sleeper", "", signal.SIGKILL)
    assert await client.wait_process("sleeper", time_limit=30) == (128 + signal.SIGKILL, 9)
    assert container_processes("sleeper") == []
    await client.remove_container("sleeper")


async def test_remove_kills_a_running_container(client: AgentClient, short_tmp: Path) -> None:
    rootfs = busybox_rootfs(short_tmp / "busy")
    spec = await default_spec(short_tmp / "busy-spec", ["sleep", "1000"])
    await client.create_container("busy", spec, str(rootfs))
    await client.start_container("busy")
    await client.exec_process("busy", "bg", pb.Process(args=["sleep", "999"]))
    assert len(container_processes("busy")) == 2
    await client.remove_container("busy")
    assert container_processes("busy") == []


async def test_guest_details_dns_and_mounts(
    client: AgentClient, agent: RunningAgent, short_tmp: Path
) -> None:
    assert os.readlink(f"/proc/{agent.process.pid}/exe").startswith("/usr/bin/python3")
    details = await client.guest_details()
    assert details.kernel_release
    assert details.mem_total_bytes > 0
    assert details.online_cpus >= 1
    assert details.runc_version.startswith("runc version")
    await client.set_dns(["10.96.0.10"], ["svc.cluster.local"], ["ndots:5"])
    assert (agent.state_dir / "resolv.conf").read_text() == (
        "nameserver 10.96.0.10\nsearch svc.cluster.local\noptions ndots:5\n"
    )

    # virtio-fs needs a guest; tmpfs takes the same mount(2) path.
    target = short_tmp / "mnt" / "shared"
    await client.mount("crivmtest", str(target), "tmpfs", ["size=1m"])
    try:
        assert f"crivmtest {target} tmpfs" in Path("/proc/self/mounts").read_text()
        await client.mount("crivmtest", str(target), "tmpfs")  # a retry succeeds
        with pytest.raises(errors.AlreadyExists):
            await client.mount("other", str(target), "tmpfs")
    finally:
        await client.unmount(str(target))
    assert str(target) not in Path("/proc/self/mounts").read_text()
    await client.unmount(str(target))  # unmounting twice succeeds


async def test_client_reconnects_after_the_agent_restarts(short_tmp: Path) -> None:
    sock = str(short_tmp / "agent.sock")
    async with AgentClient(sock, call_timeout=3, connect_timeout=15) as client:
        # The client keeps trying while nothing listens yet.
        early = asyncio.create_task(client.check(time_limit=15))
        await asyncio.sleep(0.5)
        first = await start_agent(short_tmp / "state", sock)
        try:
            assert (await asyncio.wait_for(early, 15)).status == pb.CheckResponse.SERVING
            waiting = asyncio.create_task(client.wait_process("nothing"))
            with pytest.raises(errors.NotFound):
                await waiting
            first.process.kill()
            await first.process.wait()
            with pytest.raises(errors.Unavailable):
                await client.check()
        finally:
            await stop_agent(first)
        second = await start_agent(short_tmp / "state", sock)
        try:
            assert (await client.wait_ready(15)).status == pb.CheckResponse.SERVING
        finally:
            await stop_agent(second)


async def test_call_deadline(client: AgentClient, short_tmp: Path) -> None:
    rootfs = busybox_rootfs(short_tmp / "slow")
    spec = await default_spec(short_tmp / "slow-spec", ["sleep", "1000"])
    await client.create_container("slow", spec, str(rootfs))
    await client.start_container("slow")
    with pytest.raises(errors.DeadlineExceeded):
        await client.wait_process("slow", time_limit=0.5)
    # The connection is still good after a call was abandoned.
    assert (await client.check()).status == pb.CheckResponse.SERVING
    await client.remove_container("slow")


def namespace_pid(pid: int) -> int:
    """The pid as the process's own, innermost pid namespace numbers it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


async def test_as_pid_1_the_agent_runs_in_a_child_and_powers_off_when_it_dies(
    short_tmp: Path,
) -> None:
    # In a new pid namespace the agent starts as PID 1: it must fork, run the agent in the child,
    # and "power off" (end the namespace) once that child is gone.
    sock = str(short_tmp / "agent.sock")
    unshare = ("unshare", "--pid", "--fork", "--mount-proc")
    agent = await start_agent(short_tmp / "state", sock, wrapper=unshare)
    try:
        async with AgentClient(sock, call_timeout=20) as client:
            await client.wait_ready(15)
            rootfs = busybox_rootfs(short_tmp / "p1")
            spec = await default_spec(short_tmp / "p1-spec", ["echo", "inside"])
            await client.create_container("p1", spec, str(rootfs))
            out = asyncio.create_task(collect(client.read_stdout("p1")))
            await client.start_container("p1")
            assert await client.wait_process("p1", time_limit=30) == (0, 0)
            assert await asyncio.wait_for(out, 10) == b"inside\n"
            await client.remove_container("p1")
        inside = [pid for pid in processes_mentioning(sock) if pid != agent.process.pid]
        by_ns_pid = {namespace_pid(pid): pid for pid in inside}
        assert sorted(by_ns_pid) == [1, 2], by_ns_pid
        os.kill(by_ns_pid[2], signal.SIGTERM)
        await asyncio.wait_for(agent.process.wait(), 15)
        assert "powering off" in agent.log_text()
        assert processes_mentioning(sock) == []
    finally:
        await stop_agent(agent)

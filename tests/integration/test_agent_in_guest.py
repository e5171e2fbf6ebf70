"""The agent in a real guest: containers whose rootfs comes from the host over virtio-fs.

This is the VM bring-up acceptance path below the CRI layer: boot the built image under QEMU
(TCG here), wait for the agent's health check over virtio-serial, run `echo hi` in a busybox
container, signal a `sleep`, shut down, and leave no qemu or virtiofsd behind (``vm_factory``
asserts that at teardown).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crivm.hypervisor.qemu.cmdline import VirtioFs
from crivm.proto import agent_pb2 as pb
from crivm.runtime.vm_backend.agent_client import AgentClient
from tests.fixtures.agent import busybox_rootfs, default_spec, processes_mentioning
from tests.fixtures.guest import BOOT_TIMEOUT_S, VmFactory

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.runc, pytest.mark.timeout(500)]

GUEST_SHARE = "/run/share"


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    out = b""
    async for chunk in stream:
        out += chunk
    return out


async def test_containers_in_a_guest(vm_factory: VmFactory, share_dir: Path) -> None:
    busybox_rootfs(share_dir / "c1")
    echo_spec = await default_spec(share_dir / "spec-echo", ["sh", "-c", "echo hi; exit 4"])
    sleep_spec = await default_spec(share_dir / "spec-sleep", ["sleep", "1000"])
    fs = await vm_factory.start_virtiofsd(share_dir, "fs0")
    config = vm_factory.config(
        "q35", filesystems=(VirtioFs("fs0", str(fs.socket_path), "share"),)
    )
    vm = await vm_factory.launch(config)
    socket_path = config.agent.socket_path  # type: ignore[union-attr]
    async with AgentClient(socket_path, call_timeout=60) as client:
        await client.wait_ready(BOOT_TIMEOUT_S)
        await client.mount("share", GUEST_SHARE, "virtiofs")

        await client.create_container("echo", echo_spec, f"{GUEST_SHARE}/c1/rootfs")
        output = asyncio.create_task(collect(client.read_stdout("echo")))
        await client.start_container("echo")
        assert await client.wait_process("echo", time_limit=60) == (4, 0)
        assert await asyncio.wait_for(output, 30) == b"hi\n"
        await client.remove_container("echo")

        await client.create_container("sleep", sleep_spec, f"{GUEST_SHARE}/c1/rootfs")
        await client.start_container("sleep")
        exec_out = pb.Process(args=["sh", "-c", "echo from-exec"], env=["PATH=/bin"])
        await client.exec_process("sleep", "e1", exec_out)
        assert await collect(client.read_stdout("sleep", "e1")) == b"from-exec\n"
        assert await client.wait_process("sleep", "e1", time_limit=60) == (0, 0)
        await client.signal_process("sleep", "", signal.SIGKILL)
        assert await client.wait_process("sleep", time_limit=60) == (128 + 9, 9)
        await client.remove_container("sleep")
        await client.unmount(GUEST_SHARE)

    await vm.shutdown()
    await asyncio.wait_for(fs.process.wait(), 20)
    assert not processes_mentioning(str(share_dir))

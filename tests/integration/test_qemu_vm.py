"""Boot the built guest image under QEMU (TCG here) and control it through QMP.

Each test checks at teardown (in ``vm_factory``) that no qemu or virtiofsd it started survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from crivm.errors import FailedPrecondition
from crivm.guestimage.build import BuildResult, build
from crivm.guestimage.init_script import INIT_DONE_MARKER
from crivm.hypervisor.qemu.cmdline import VirtioFs, VirtioSerialAgent, hotplug_port_id
from crivm.runtime.vm_backend.agent_client import AgentClient
from tests.fixtures.agent import processes_mentioning
from tests.fixtures.guest import BOOT_TIMEOUT_S, GUEST_CACHE, VmFactory

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.timeout(400)]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_rebuild_with_same_inputs_is_cached(guest_image: BuildResult) -> None:
    again = await build(GUEST_CACHE / "out", GUEST_CACHE)
    assert again.cached
    manifest = json.loads(again.manifest.read_text())
    names = {p["name"] for p in manifest["packages"]}
    assert {"busybox-static", "crun", "python3.11-minimal"} <= names
    assert any(n.startswith("linux-image-") and n.endswith("-cloud-amd64") for n in names)
    assert "virtiofs" in manifest["kernel_modules"]
    # On demand, with what it needs (see rootfs.ON_DEMAND_MODULES).
    assert {"bridge", "stp", "llc"} <= set(manifest["kernel_modules"])
    assert manifest["outputs"]["initrd.img"]["bytes"] == again.initrd_bytes


async def test_forced_rebuild_is_byte_identical(guest_image: BuildResult, tmp_path: Path) -> None:
    fresh = await build(tmp_path / "out", GUEST_CACHE, force=True)
    assert not fresh.cached
    assert fresh.initrd.read_bytes() == guest_image.initrd.read_bytes()
    assert fresh.kernel.read_bytes() == guest_image.kernel.read_bytes()
    assert fresh.boot_initrd.read_bytes() == guest_image.boot_initrd.read_bytes()
    assert fresh.usr_image.read_bytes() == guest_image.usr_image.read_bytes()


@pytest.mark.parametrize("machine", ["q35", "microvm"])
async def test_boots_with_virtiofs_and_agent_channel(
    vm_factory: VmFactory, share_dir: Path, machine: str
) -> None:
    (share_dir / "hello.txt").write_text("hi from the host\n")
    fs = await vm_factory.start_virtiofsd(share_dir, "fs0")
    config = vm_factory.config(
        machine,  # type: ignore[arg-type]
        filesystems=(VirtioFs("fs0", str(fs.socket_path), "share"),),
    )
    vm = await vm_factory.launch(config)
    assert await vm.status() == "running"
    await vm.wait_for_console(INIT_DONE_MARKER, BOOT_TIMEOUT_S)

    if vm_factory.image.has_agent:
        assert isinstance(config.agent, VirtioSerialAgent)
        async with AgentClient(config.agent.socket_path, call_timeout=30) as client:
            await client.wait_ready(BOOT_TIMEOUT_S)
            details = await client.guest_details()
            assert details.kernel_release == vm_factory.image.kernel_version
            assert details.cgroup_version == 2
            # Mounting makes the guest's FUSE driver handshake with virtiofsd over the device.
            await client.mount("share", "/mnt/share", "virtiofs")
            await client.unmount("/mnt/share")

    assert await vm.status() == "running"
    assert await vm.shutdown() == 0
    assert not _alive(vm.pid)
    # virtiofsd serves one connection: it exits once QEMU is gone.
    await asyncio.wait_for(fs.process.wait(), 10)


def _pci_devices(reply: object) -> list[tuple[int, str]]:
    """(device id, qdev id) of every device on every bus in a query-pci reply."""
    found: list[tuple[int, str]] = []

    def walk(devices: list[dict[str, object]]) -> None:
        for dev in devices:
            ident = dev.get("id")
            assert isinstance(ident, dict)
            found.append((int(str(ident["device"])), str(dev.get("qdev_id", ""))))
            bridge = dev.get("pci_bridge")
            if isinstance(bridge, dict) and isinstance(bridge.get("devices"), list):
                walk(bridge["devices"])

    assert isinstance(reply, list)
    for bus in reply:
        walk(bus["devices"])
    return found


async def test_nic_hotplug_over_qmp(vm_factory: VmFactory) -> None:
    config = dataclasses.replace(vm_factory.config("q35"), hotplug_ports=1)
    vm = await vm_factory.launch(config)
    await vm.wait_for_console(INIT_DONE_MARKER, BOOT_TIMEOUT_S)
    await vm.qmp.netdev_add({"type": "socket", "id": "hp-net0", "udp": "127.0.0.1:9",
                             "localaddr": "127.0.0.1:0"})
    await vm.qmp.device_add("virtio-net-pci", "hp-nic0", netdev="hp-net0",
                            bus=hotplug_port_id(0), mac="02:00:00:00:00:42")
    assert any(qdev == "hp-nic0" for _, qdev in _pci_devices(await vm.qmp.execute("query-pci")))
    # Unplug needs the guest's consent (PCIe native hotplug): wait until it lets go.
    await vm.qmp.device_del("hp-nic0")
    for _ in range(600):
        if not any(q == "hp-nic0" for _, q in _pci_devices(await vm.qmp.execute("query-pci"))):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the guest never released the hot-unplugged NIC")
    await vm.qmp.netdev_del("hp-net0")
    assert await vm.shutdown() == 0


async def test_qmp_errors_are_translated(vm_factory: VmFactory) -> None:
    vm = await vm_factory.launch(vm_factory.config("q35"))
    with pytest.raises(FailedPrecondition):
        await vm.qmp.device_del("no-such-device")
    await vm.qmp.netdev_add({"type": "socket", "id": "probe0", "udp": "127.0.0.1:9",
                             "localaddr": "127.0.0.1:0"})
    await vm.qmp.netdev_del("probe0")
    await vm.qmp.system_powerdown()  # accepted even before the guest has ACPI up
    await vm.shutdown()


_OWNER = """
import asyncio, sys
from pathlib import Path
from tests.fixtures.guest import QEMU, VmFactory
from crivm.guestimage.build import BuildResult

async def main():
    image = BuildResult(Path(sys.argv[2]), Path(sys.argv[3]), Path(), "", 0, 0.0, True, False)
    factory = VmFactory(Path(sys.argv[1]), image, "tcg")
    vm = await factory.launch(factory.config("q35"))
    print(vm.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_vm_dies_with_its_owner(vm_factory: VmFactory) -> None:
    """Kill the process that launched QEMU with SIGKILL: QEMU must not outlive it."""
    image = vm_factory.image
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OWNER, str(vm_factory.directory), str(image.kernel),
        str(image.initrd), stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(owner.stdout.readline(), 30)
        qemu_pid = int(line)
        assert _alive(qemu_pid)
        owner.send_signal(signal.SIGKILL)
        await owner.wait()
        for _ in range(100):
            if not _alive(qemu_pid):
                break
            await asyncio.sleep(0.05)
        assert not _alive(qemu_pid), "qemu outlived its owner"
        assert not processes_mentioning(f"{vm_factory.directory}/")
    finally:
        if owner.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                owner.kill()
            await owner.wait()

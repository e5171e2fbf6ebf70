"""A VM container's stand-in on the host: a bare interpreter that conmon watches, whose stdio,
signals and exit the pod supervisor relays (crivm/shim/standin.py, standin_relay.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from crivm.proto import api_pb2
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim import standin
from crivm.shim.vm_spec import PodPaths
from tests.fixtures.images import PushedImage
from tests.fixtures.vm_daemon import VmCrivmDaemon
from tests.integration.vm.test_vm_pods import BUSYBOX, busybox, read_log

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(900)]

# A bare interpreter with _socket and _signal measures about 4.5 MiB PSS here (docs/
# performance.md); the forked CLI it replaces was 28-31 MiB.
STANDIN_PSS_BOUND_KIB = 12 * 1024


def standin_pid(daemon: VmCrivmDaemon, container_id: str) -> int:
    """The pid conmon watches for the container, as ``crivm-shim state`` reports it."""
    shim_cli = [str(daemon.runroot / "vm" / "bin" / "crivm-shim"),
                "--root", str(daemon.runroot / "vm-shim" / "vm")]
    state = subprocess.run([*shim_cli, "state", container_id], check=True, timeout=60,
                           capture_output=True).stdout
    return int(json.loads(state)["pid"])


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Pss in /proc/{pid}/smaps_rollup")


def wait_for_log(pod_config: api_pb2.PodSandboxConfig, name: str, text: str) -> None:
    deadline = time.monotonic() + 120
    while ("stdout", text) not in read_log(pod_config, name):
        assert time.monotonic() < deadline, f"{text!r} never reached {name}'s log"
        time.sleep(0.5)


def test_standin_relays_output_signals_and_exit_through_conmon(
        vm_daemon: VmCrivmDaemon, busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmstandin")
    pod_id = cri.run_pod(pod_config, handler="vm")
    trapper = cri.create(pod_id, busybox("trapper", "trap 'echo got TERM; exit 5' TERM; "
                                                    "echo ready; while true; do sleep 1; done"),
                         pod_config)
    cri.start(trapper)
    wait_for_log(pod_config, "trapper", "ready")

    pid = standin_pid(vm_daemon, trapper)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == standin.PROCESS_NAME
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "_asyncio" not in maps and "protobuf" not in maps
    measured = pss_kib(pid)
    print(f"stand-in {pid}: PSS {measured} KiB")
    assert measured < STANDIN_PSS_BOUND_KIB

    # A signal the stand-in gets reaches the guest process, whose exit code and last words
    # reach conmon: the exit file and the CRI log.
    os.kill(pid, signal.SIGTERM)
    exited = cri.wait_exited(trapper, timeout_s=120)
    assert exited.exit_code == 5
    assert ("stdout", "got TERM") in read_log(pod_config, "trapper")

    # A stand-in killed outright takes its guest process along, as runc's would be gone.
    sleeper = cri.create(pod_id, busybox("sleeper", "trap '' TERM; while true; do sleep 1; done"),
                         pod_config)
    cri.start(sleeper)
    os.kill(standin_pid(vm_daemon, sleeper), signal.SIGKILL)
    assert cri.wait_exited(sleeper, timeout_s=120).exit_code == 137
    paths = PodPaths(str(next((vm_daemon.runroot / "vm").glob("*/vm.json")).parent))

    async def guest_exit() -> tuple[int, int]:
        async with AgentClient(paths.mux_socket) as agent:
            return await agent.wait_process(sleeper, time_limit=60)

    assert asyncio.run(guest_exit()) == (128 + signal.SIGKILL, signal.SIGKILL)
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

"""Untrusted pods in QEMU VMs through a real crivm daemon (TCG here: slow, generous timeouts)."""

from __future__ import annotations

import time

import pytest

from crivm.proto import api_pb2
from tests.fixtures.images import PushedImage
from tests.fixtures.vm_daemon import VmCrivmDaemon

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(900)]

BUSYBOX = "docker.io/library/busybox:latest"


def test_vm_pod_boots_and_goes(vm_daemon: VmCrivmDaemon, busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    pod_config = vm_daemon.pod_config("vmboot")
    started = time.monotonic()
    pod_id = cri.run_pod(pod_config, handler="vm")
    print(f"VM pod ready in {time.monotonic() - started:.1f} s")
    status = cri.pod_status(pod_id).status
    assert status.state == api_pb2.SANDBOX_READY
    assert status.network.ip.startswith("10.91.")
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert cri.pod_status(pod_id).status.state == api_pb2.SANDBOX_NOTREADY
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

"""A VM pod's QEMU gives back its mapping of the guest initramfs once the guest runs
(crivm/hypervisor/qemu/page_out.py), and the pod works as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crivm.proto import api_pb2
from tests.fixtures.images import PushedImage
from tests.fixtures.vm_daemon import VmCrivmDaemon
from tests.integration.vm.test_vm_pods import BUSYBOX, busybox
from tests.integration.vm.test_vm_standin import wait_for_log
from tests.unit.test_page_out import resident_kib

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(900)]


def qemu_of_pod(pod_id: str) -> tuple[int, str]:
    """The pid of the QEMU named after ``pod_id`` and the initrd file it was given."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv]
        if words and words[0].endswith("qemu-system-x86_64") and "-initrd" in words and \
                any(w.startswith(pod_id) for w in words):
            return int(entry.name), os.path.realpath(words[words.index("-initrd") + 1])
    raise AssertionError(f"no QEMU runs pod {pod_id}")


def test_vm_pod_qemu_keeps_no_initramfs_pages(vm_daemon: VmCrivmDaemon,
                                              busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmpageout")
    pod_id = cri.run_pod(pod_config, handler="vm")
    pid, initrd = qemu_of_pod(pod_id)
    size_kib = Path(initrd).stat().st_size // 1024
    resident = resident_kib(pid, initrd)
    print(f"QEMU {pid}: {resident} of {size_kib} KiB of {initrd} resident")
    # Another test's VM on the same image may share (and so keep) some of the pages.
    assert resident < size_kib // 4

    sleeper = cri.create(pod_id, busybox("sleeper", "echo up; sleep 600"), pod_config)
    cri.start(sleeper)
    wait_for_log(pod_config, "sleeper", "up")
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

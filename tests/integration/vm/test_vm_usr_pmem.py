"""A VM pod's guest reads /usr from the shared image on virtio-pmem (the vm handler's default on
q35), which its QEMU can only read: a guest cannot change what other pods boot from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crivm.proto import api_pb2
from tests.fixtures.images import PushedImage
from tests.fixtures.vm_daemon import VmCrivmDaemon
from tests.integration.vm.test_vm_initrd_page_out import qemu_of_pod
from tests.integration.vm.test_vm_pods import BUSYBOX, busybox
from tests.integration.vm.test_vm_standin import wait_for_log
from tests.unit.test_page_out import resident_kib

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(900)]


def _option(words: list[str], flag: str, prefix: str) -> str:
    return next(w for i, w in enumerate(words[1:], 1)
                if words[i - 1] == flag and w.startswith(prefix))


def _mappings(pid: int, path: str) -> list[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return [line.split()[1] for line in maps if line.rstrip().endswith(" " + path)]


def _open_flags(pid: int, path: str) -> list[int]:
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags += [int(line.split()[1], 8) for line in info.splitlines()
                  if line.startswith("flags:")]
    return flags


def test_vm_pod_reads_usr_from_a_read_only_shared_image(vm_daemon: VmCrivmDaemon,
                                                        busybox_image: PushedImage) -> None:
    cri = vm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = vm_daemon.pod_config("vmusr")
    pod_id = cri.run_pod(pod_config, handler="vm")
    pid, initrd = qemu_of_pod(pod_id)
    words = [w.decode() for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    backend = _option(words, "-object", "memory-backend-file,id=usr0-mem,")
    props = dict(p.split("=", 1) for p in backend.split(",")[1:])
    usr = os.path.realpath(props["mem-path"])
    assert (props["share"], props["readonly"]) == ("off", "on")
    assert _option(words, "-device", "virtio-pmem-pci").endswith("memdev=usr0-mem")
    assert "crivm.usr=pmem" in words[words.index("-append") + 1].split()
    assert Path(initrd).name == "initrd-boot.img"
    assert Path(initrd).stat().st_size < Path(usr).stat().st_size // 4

    # Read-only and private on the host: the file is open O_RDONLY and no mapping of it can
    # be written, so a guest writing to its pmem device changes nothing in the shared image.
    perms = _mappings(pid, usr)
    assert perms, f"QEMU {pid} does not map {usr}"
    assert all("w" not in p and p.endswith("p") for p in perms), perms
    flags = _open_flags(pid, usr)
    assert flags and all(f & os.O_ACCMODE == os.O_RDONLY for f in flags), flags
    # The daemon paged QEMU's copy out once the guest was up (other VMs on the same image may
    # keep some pages shared).
    size_kib = Path(usr).stat().st_size // 1024
    assert resident_kib(pid, usr) < size_kib // 2

    # Everything the container runs comes from the image: the agent, crun, and the pod works.
    sleeper = cri.create(pod_id, busybox("sleeper", "echo up; sleep 600"), pod_config)
    cri.start(sleeper)
    wait_for_log(pod_config, "sleeper", "up")
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

"""The agent's sysctl writer, against a stand-in /proc/sys tree (the real one is the VM's; the
VM tests in tests/integration/vm/test_vm_pods.py set pod sysctls in a guest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crivm.agent import sysctls
from crivm.agent.errors import InvalidArgument


def _proc_sys(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    for rel in ("kernel/shm_rmid_forced", "fs/mqueue/msg_max", "net/ipv4/conf/eth0.100/forwarding"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("0\n")
    return root


def test_names_map_to_files_as_kubelet_writes_them(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert sysctls.sysctl_path("kernel.shm_rmid_forced", root) == f"{root}/kernel/shm_rmid_forced"
    # A slash stands for a dot inside one component (an interface name with a VLAN id).
    assert sysctls.sysctl_path("net.ipv4.conf.eth0/100.forwarding", root) == \
        f"{root}/net/ipv4/conf/eth0.100/forwarding"


@pytest.mark.parametrize("name", ["", "kernel..x", ".kernel", "kernel.", "net.ipv4.conf./.x",
                                  "net.ipv4.conf.//.x", "kernel.x\0y"])
def test_names_that_could_leave_proc_sys_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a sysctl name"):
        sysctls.sysctl_path(name, "/proc/sys")


def test_apply_writes_every_value(tmp_path: Path) -> None:
    root = _proc_sys(tmp_path)
    sysctls.apply({"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100",
                   "net.ipv4.conf.eth0/100.forwarding": "1"}, str(root))
    assert (root / "kernel/shm_rmid_forced").read_text() == "1"
    assert (root / "fs/mqueue/msg_max").read_text() == "100"
    assert (root / "net/ipv4/conf/eth0.100/forwarding").read_text() == "1"


def test_an_unknown_sysctl_changes_nothing(tmp_path: Path) -> None:
    root = _proc_sys(tmp_path)
    with pytest.raises(InvalidArgument, match="kernel.no_such_knob does not exist"):
        sysctls.apply({"kernel.shm_rmid_forced": "1", "kernel.no_such_knob": "1"}, str(root))
    assert (root / "kernel/shm_rmid_forced").read_text() == "0\n"

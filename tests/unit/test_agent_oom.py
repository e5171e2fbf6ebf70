"""The agent's OOM verdict from fixture cgroup trees in the kernel's file formats.

The real counterpart is the memory-limit check in tests/integration/vm/test_vm_pods.py, where
the guest kernel kills a hog and the container's reason must read OOMKilled.
"""

from __future__ import annotations

from pathlib import Path

from crivm.agent.stats import oom_killed

V2_EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kills}\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n"


def _v2_tree(root: Path, kills: int) -> None:
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    group = root / "crivm" / "c1"
    group.mkdir(parents=True)
    (group / "memory.events").write_text(V2_EVENTS.format(max=5, oom=kills, kills=kills))


def test_v2_counts_kills(tmp_path: Path) -> None:
    _v2_tree(tmp_path, kills=1)
    assert oom_killed("/crivm/c1", str(tmp_path))


def test_v2_reaching_the_limit_without_a_kill_is_no_oom(tmp_path: Path) -> None:
    _v2_tree(tmp_path, kills=0)
    assert not oom_killed("/crivm/c1", str(tmp_path))


def test_v1_counts_kills(tmp_path: Path) -> None:
    group = tmp_path / "memory" / "crivm" / "c1"
    group.mkdir(parents=True)
    (group / "memory.oom_control").write_text(V1_OOM_CONTROL.format(kills=2))
    assert oom_killed("/crivm/c1", str(tmp_path))
    (group / "memory.oom_control").write_text(V1_OOM_CONTROL.format(kills=0))
    assert not oom_killed("/crivm/c1", str(tmp_path))


def test_missing_cgroup_is_no_oom(tmp_path: Path) -> None:
    assert not oom_killed("/crivm/gone", str(tmp_path))

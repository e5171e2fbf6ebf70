"""The warm VM pool's bookkeeping, with the boot and the teardown faked (the real thing:
tests/integration/vm/test_vm_warm.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from crivm.proto import api_pb2
from crivm.runtime.config import RuntimeHandler
from crivm.runtime.vm_backend import sandbox, warm_pool
from crivm.runtime.vm_backend.sandbox import BootedVm, VmEnvironment
from crivm.shim.vm_spec import PodPaths


def environment(name: str = "vm") -> VmEnvironment:
    return VmEnvironment(name, RuntimeHandler(runtime_type="vm"), "/run/crivm-test", "tcg",
                         kernel="/k", initrd="/i")


class FakeVms:
    """boot_warm, discard and the liveness checks, recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: int = 0) -> None:
        self.tmp_path = tmp_path
        self.booted: list[str] = []
        self.discarded: list[str] = []
        self.dead: set[str] = set()
        self.fail = fail
        monkeypatch.setattr(warm_pool, "boot_warm", self.boot)
        monkeypatch.setattr(warm_pool, "discard", self.discard)
        monkeypatch.setattr(sandbox, "supervisor_pid",
                            lambda paths: 0 if paths.pod_dir in self.dead else 1)

    async def boot(self, env: VmEnvironment) -> warm_pool.WarmVm:
        await asyncio.sleep(0)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("QEMU said no")
        pod_dir = str(self.tmp_path / f"warm-{len(self.booted)}")
        self.booted.append(pod_dir)
        os.makedirs(pod_dir)
        Path(PodPaths(pod_dir).mux_socket).touch()
        vm = BootedVm(PodPaths(pod_dir), 1, 384, {"qemu_pid": 1}, 5.0)
        return warm_pool.WarmVm(vm, pod_dir + "/netns", "02:00:00:00:00:01")

    async def discard(self, paths: PodPaths) -> None:
        self.discarded.append(paths.pod_dir)


async def settle(pool: warm_pool.WarmPool, ready: int) -> None:
    for _ in range(200):
        if pool.info()["ready"] == ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool never had {ready} ready: {pool.info()}")


async def test_the_pool_fills_hands_out_and_refills(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vms = FakeVms(monkeypatch, tmp_path)
    env = environment()
    pool = warm_pool.WarmPool(env, 2)
    pool.start()
    await settle(pool, 2)
    default = warm_pool.default_size(env)
    assert default == (1, 256 + 128)
    first = pool.take(default)
    assert first is not None and first.paths.pod_dir == vms.booted[0]
    await settle(pool, 2)
    assert len(vms.booted) == 3
    await pool.close()
    assert sorted(vms.discarded) == sorted(vms.booted[1:])
    assert pool.info()["ready"] == 0


async def test_only_a_pod_of_the_default_size_takes_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeVms(monkeypatch, tmp_path)
    env = environment()
    pool = warm_pool.WarmPool(env, 1)
    pool.start()
    await settle(pool, 1)
    bigger = api_pb2.PodSandboxConfig()
    bigger.linux.resources.memory_limit_in_bytes = 1024 << 20
    assert pool.take(sandbox.vm_size(env.handler, bigger)) is None
    assert pool.take(sandbox.vm_size(env.handler, api_pb2.PodSandboxConfig())) is not None
    await pool.close()


async def test_a_warm_vm_that_died_is_discarded_not_handed_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vms = FakeVms(monkeypatch, tmp_path)
    env = environment()
    pool = warm_pool.WarmPool(env, 1)
    pool.start()
    await settle(pool, 1)
    vms.dead.add(vms.booted[0])
    assert pool.take(warm_pool.default_size(env)) is None
    await settle(pool, 1)
    assert vms.booted[0] in vms.discarded
    await pool.close()


async def test_failed_boots_back_off_and_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeVms(monkeypatch, tmp_path, fail=2)
    monkeypatch.setattr(warm_pool, "RETRY_FIRST_S", 0.01)
    pool = warm_pool.WarmPool(environment(), 1)
    pool.start()
    for _ in range(100):
        if pool.info()["failures"] == 2:
            break
        await asyncio.sleep(0.005)
    assert pool.info()["last_error"] == "QEMU said no"
    await settle(pool, 1)
    assert pool.info()["failures"] == 0 and pool.info()["last_error"] == ""
    await pool.close()


def test_names_fit_the_pod_directory_and_tell_handlers_apart() -> None:
    first, second = warm_pool.warm_prefix("vm"), warm_pool.warm_prefix("vm-warm")
    assert first != second and first.startswith("warm-")
    assert len(first) < sandbox.POD_DIR_ID_CHARS


def test_warm_macs_are_local_unicast() -> None:
    for _ in range(50):
        first = int(warm_pool._random_mac()[:2], 16)
        assert first & 0x02 and not first & 0x01

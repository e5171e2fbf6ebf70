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
        return warm_pool.WarmVm(vm, pod_dir + "/netns", "02:00:00:00:00:01",
                                warm_pool.image_stamp(env))

    async def discard(self, paths: PodPaths) -> None:
        self.discarded.append(paths.pod_dir)


async def settle(pool: warm_pool.WarmPool, ready: int) -> None:
    for _ in range(200):
        if pool.info()["ready"] == ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool never had {ready} ready: {pool.info()}")


async def started_pool(env: VmEnvironment, size: int) -> warm_pool.WarmPool:
    """A pool of ``size`` that has booted them all."""
    pool = warm_pool.WarmPool(env, size)
    pool.start()
    await settle(pool, size)
    return pool


async def test_the_pool_fills_hands_out_and_refills(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vms = FakeVms(monkeypatch, tmp_path)
    env = environment()
    pool = await started_pool(env, 2)
    default = warm_pool.default_size(env)
    assert default == (1, 256 + 128)
    first = pool.take(default)
    assert first is not None and first.paths.pod_dir == vms.booted[0]
    # Nothing boots while the pod's start goes on; refill() (its end) starts the next one.
    await asyncio.sleep(0.05)
    assert len(vms.booted) == 2
    pool.refill()
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
    pool = await started_pool(env, 1)
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
    pool = await started_pool(env, 1)
    vms.dead.add(vms.booted[0])
    assert pool.take(warm_pool.default_size(env)) is None
    pool.refill()  # the backend's, once the pod's (cold) start is over
    await settle(pool, 1)
    assert vms.booted[0] in vms.discarded
    await pool.close()


async def test_failed_boots_back_off_and_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeVms(monkeypatch, tmp_path, fail=3)
    monkeypatch.setattr(warm_pool, "RETRY_FIRST_S", 0.05)
    pool = warm_pool.WarmPool(environment(), 1)
    pool.start()
    seen = set()
    for _ in range(400):
        info = pool.info()
        if info["failures"]:
            seen.add((info["failures"], info["retry_in_s"], info["last_error"]))
        if info["ready"]:
            break
        await asyncio.sleep(0.005)
    # Each failure doubles the wait before the next try.
    assert seen == {(1, 0.05, "QEMU said no"), (2, 0.1, "QEMU said no"),
                    (3, 0.2, "QEMU said no")}
    assert pool.info() == {"size": 1, "ready": 1, "failures": 0, "last_error": "",
                           "retry_in_s": 0.0}
    await pool.close()


async def test_a_vm_from_an_older_guest_image_is_not_handed_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vms = FakeVms(monkeypatch, tmp_path)
    env = environment()
    pool = await started_pool(env, 1)
    monkeypatch.setattr(warm_pool, "image_stamp", lambda env: ((1, 2, 3, 4),))
    assert pool.take(warm_pool.default_size(env)) is None
    await pool.close()
    assert vms.discarded == vms.booted


def test_image_stamp_follows_a_rebuilt_file(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"old")
    env = VmEnvironment("vm", RuntimeHandler(runtime_type="vm"), str(tmp_path), "tcg",
                        kernel=str(kernel), initrd=str(tmp_path / "missing"))
    before = warm_pool.image_stamp(env)
    assert before == warm_pool.image_stamp(env)
    replacement = tmp_path / "vmlinuz.new"
    replacement.write_bytes(b"new")
    replacement.replace(kernel)  # as the image builder does
    assert warm_pool.image_stamp(env) != before


async def test_close_waits_for_discards_and_logs_their_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vms = FakeVms(monkeypatch, tmp_path)

    async def failing(paths: PodPaths) -> None:
        await asyncio.sleep(0.05)
        vms.discarded.append(paths.pod_dir)
        raise OSError("umount: busy")

    monkeypatch.setattr(warm_pool, "discard", failing)
    pool = await started_pool(environment(), 2)
    await pool.close()
    assert sorted(vms.discarded) == sorted(vms.booted)
    assert caplog.text.count("could not discard warm VM") == 2


async def test_leftovers_are_those_no_pod_names_of_this_or_no_handler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = VmEnvironment("vm", RuntimeHandler(runtime_type="vm"), str(tmp_path), "tcg",
                        kernel="/k", initrd="/i")
    mine, other = warm_pool.warm_prefix("vm"), warm_pool.warm_prefix("vm-big")
    gone = warm_pool.warm_prefix("renamed")
    names = [mine + "aaaa", mine + "bbbb", other + "cccc", gone + "dddd", mine + "eeee"]
    for name in names:
        (tmp_path / "vm" / name).mkdir(parents=True)
    discarded: list[str] = []

    async def discard(paths: PodPaths) -> None:
        discarded.append(os.path.basename(paths.pod_dir))
        if paths.pod_dir.endswith("eeee"):
            raise OSError("umount: busy")

    monkeypatch.setattr(warm_pool, "discard", discard)
    in_use = {str(tmp_path / "vm" / (mine + "bbbb"))}
    removed = await warm_pool.remove_leftovers(env, in_use, ["vm", "vm-big"])
    # bbbb is a pod's; cccc is another handler's (its pool may be booting it right now).
    assert sorted(discarded) == sorted([mine + "aaaa", mine + "eeee", gone + "dddd"])
    assert removed == 2
    assert "could not discard warm VM" in caplog.text


def test_names_fit_the_pod_directory_and_tell_handlers_apart() -> None:
    first, second = warm_pool.warm_prefix("vm"), warm_pool.warm_prefix("vm-warm")
    assert first != second and first.startswith("warm-")
    assert len(first) < sandbox.POD_DIR_ID_CHARS


def test_warm_macs_are_local_unicast() -> None:
    for _ in range(50):
        first = int(warm_pool._random_mac()[:2], 16)
        assert first & 0x02 and not first & 0x01


async def test_a_waiting_vm_that_stopped_is_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vms = FakeVms(monkeypatch, tmp_path)
    monkeypatch.setattr(warm_pool, "CHECK_INTERVAL_S", 0.02)
    pool = await started_pool(environment(), 1)
    vms.dead.add(vms.booted[0])
    for _ in range(200):
        if len(vms.booted) == 2 and pool.info()["ready"] == 1:
            break
        await asyncio.sleep(0.01)
    assert len(vms.booted) == 2 and vms.discarded == vms.booted[:1]
    await pool.close()

"""A running QEMU: launch it from a ``VmConfig``, watch its console, stop it, and clean up.

QEMU runs in its own session, so a Ctrl-C at the daemon's terminal does not reach it. It dies
with its owner through PR_SET_PDEATHSIG (see ``owner.py``, which also covers daemon restarts).
After launch, the VM is controlled only through QMP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from crivm.errors import DeadlineExceeded, Unavailable
from crivm.hypervisor.qemu.accel import host_tsc_khz
from crivm.hypervisor.qemu.cmdline import VmConfig, build_argv
from crivm.hypervisor.qemu.owner import StrPath, die_with_owner, open_log, remove_socket
from crivm.hypervisor.qemu.qmp import QmpControl

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)


def _read_bytes(path: StrPath) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def with_host_facts(config: VmConfig) -> VmConfig:
    """Fill in what the pure command line cannot know: a microvm under TCG needs the host's TSC
    rate, or its kernel may hang calibrating against nothing (see ``kernel_cmdline``)."""
    machine = config.machine
    if machine.type == "microvm" and machine.accel == "tcg" and not machine.tsc_khz:
        tsc_khz = host_tsc_khz()
        if tsc_khz:
            return dataclasses.replace(config, machine=dataclasses.replace(machine,
                                                                           tsc_khz=tsc_khz))
    return config


class QemuVm:
    def __init__(self, config: VmConfig, process: asyncio.subprocess.Process,
                 qmp: QmpControl, stderr_log: StrPath) -> None:
        self.config = config
        self.process = process
        self.qmp = qmp
        self.stderr_log = stderr_log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def console_log(self) -> Path:
        from pathlib import Path  # for callers only; see owner.StrPath

        return Path(self.config.console.log_path)

    @classmethod
    async def launch(cls, qemu_path: str, config: VmConfig, stderr_log: StrPath, *,
                     tie_to_owner: bool = True, pass_fds: Sequence[int] = (),
                     startup_timeout_s: float = 10.0) -> QemuVm:
        """Start QEMU and return once its QMP socket answers."""
        config = with_host_facts(config)
        for stale in (config.qmp.socket_path, getattr(config.agent, "socket_path", None)):
            if stale:
                remove_socket(stale)
        argv = build_argv(qemu_path, config)
        if tie_to_owner:
            argv = die_with_owner(argv)
        log.debug("starting VM %s: %s", config.name, argv)
        err_fd = open_log(stderr_log)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err_fd, stderr=err_fd,
                pass_fds=tuple(pass_fds), start_new_session=True,
            )
        except OSError as exc:
            raise Unavailable(f"cannot start {qemu_path}: {exc.strerror}") from exc
        finally:
            os.close(err_fd)
        qmp = QmpControl(config.name)
        vm = cls(config, proc, qmp, stderr_log)
        connect = asyncio.ensure_future(qmp.connect(config.qmp.socket_path, startup_timeout_s))
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done() and not connect.done():
                raise Unavailable(f"QEMU for {config.name} exited ({proc.returncode}) at "
                                  f"startup: {vm.stderr_tail()}")
            connect.result()
        except BaseException:
            connect.cancel()
            await vm.kill()
            raise
        finally:
            exited.cancel()
        log.info("VM %s started (qemu pid %d, %s/%s)", config.name, proc.pid,
                 config.machine.type, config.machine.accel)
        return vm

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            with open(self.stderr_log, errors="replace") as log_file:
                text = log_file.read().strip()
        except OSError:
            return "(no stderr log)"
        return " | ".join(text.splitlines()[-lines:]) or "(empty stderr)"

    async def wait_for_console(self, marker: str, timeout_s: float) -> None:
        """Wait until ``marker`` appears in the guest console log."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        needle = marker.encode()
        while True:
            with contextlib.suppress(FileNotFoundError):
                if needle in _read_bytes(self.config.console.log_path):
                    return
            if self.process.returncode is not None:
                raise Unavailable(f"VM {self.config.name} exited ({self.process.returncode}) "
                                  f"before {marker!r}: {self.stderr_tail()}")
            if loop.time() >= deadline:
                raise DeadlineExceeded(f"VM {self.config.name}: no {marker!r} on the console "
                                       f"within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def status(self) -> str:
        return await self.qmp.query_status()

    async def shutdown(self, timeout_s: float = 10.0) -> int:
        """Stop the VM through QMP ``quit``; kill it if it lingers. Returns QEMU's exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(Unavailable, DeadlineExceeded):
                await self.qmp.quit()
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                log.warning("VM %s ignored quit for %.0f s; killing it", self.config.name,
                            timeout_s)
        return await self.kill()

    async def kill(self) -> int:
        """SIGKILL QEMU if it still runs, reap it, and remove its sockets. Idempotent."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        code = await self.process.wait()
        await self.qmp.close()
        for path in (self.config.qmp.socket_path, getattr(self.config.agent, "socket_path", None)):
            if path:
                remove_socket(path)
        return code

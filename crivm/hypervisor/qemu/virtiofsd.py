"""One virtiofsd per shared directory, serving a vhost-user socket that QEMU connects to.

QEMU 7.2's C virtiofsd is used (``/usr/lib/qemu/virtiofsd``). It sandboxes itself in new mount,
pid and net namespaces and pivots into the shared directory. It serves one connection, so it
exits when its VM disconnects; ``stop`` also covers a VM that never connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Literal

from crivm.errors import DeadlineExceeded, Unavailable
from crivm.hypervisor.qemu.owner import StrPath, die_with_owner, open_log, remove_socket

log = logging.getLogger(__name__)

CacheMode = Literal["auto", "always", "none"]


def virtiofsd_argv(virtiofsd_path: str, source_dir: str, socket_path: str,
                   cache: CacheMode = "auto") -> list[str]:
    return [
        virtiofsd_path, f"--socket-path={socket_path}",
        "-o", f"source={source_dir}", "-o", f"cache={cache}", "-o", "sandbox=namespace",
        # No "allow_root": in libfuse terms it refuses every request whose guest uid is not
        # 0, so a container process running as a non-root user (nginx's worker) got EACCES.
    ]


@dataclass
class Virtiofsd:
    socket_path: StrPath
    log_path: StrPath
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate (then kill) the daemon and remove its socket. Safe to call twice."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        remove_socket(self.socket_path)


async def start(virtiofsd_path: str, source_dir: StrPath, socket_path: StrPath,
                log_path: StrPath,
                cache: CacheMode = "auto", timeout_s: float = 5.0) -> Virtiofsd:
    """Start virtiofsd for ``source_dir`` and wait until its socket accepts QEMU."""
    remove_socket(socket_path)
    argv = die_with_owner(virtiofsd_argv(virtiofsd_path, str(source_dir), str(socket_path),
                                         cache))
    log_fd = open_log(log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            start_new_session=True,
        )
    except OSError as exc:
        raise Unavailable(f"cannot start {virtiofsd_path}: {exc.strerror}") from exc
    finally:
        os.close(log_fd)
    daemon = Virtiofsd(socket_path, log_path, proc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not os.path.exists(socket_path):
        if proc.returncode is not None:
            raise Unavailable(f"virtiofsd for {source_dir} exited ({proc.returncode}): "
                              f"{_tail(log_path)}")
        if loop.time() >= deadline:
            await daemon.stop()
            raise DeadlineExceeded(f"virtiofsd made no socket at {socket_path} in {timeout_s} s")
        await asyncio.sleep(0.02)
    log.debug("virtiofsd %d serves %s on %s", proc.pid, source_dir, socket_path)
    return daemon


def _tail(path: StrPath, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as log_file:
            return " | ".join(log_file.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"

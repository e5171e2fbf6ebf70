"""What every runc-backend operation needs: the binaries, the directories, the host's facts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Any

from crivm.runtime.runc_backend.conmon import ContainerLayout, ExitRecord, read_exit, read_pid
from crivm.runtime.runc_backend.oci import OciRuntime
from crivm.runtime.runc_backend.spec import HostFacts

log = logging.getLogger(__name__)

EXIT_POLL_S = 0.05
CONMON_EXIT_WAIT_S = 5.0


@dataclass(frozen=True)
class RuncEnvironment:
    handler: str
    conmon_path: str
    runtime: OciRuntime
    runroot: str
    root: str
    host: HostFacts

    def layout(self, container_id: str, log_path: str) -> ContainerLayout:
        return ContainerLayout.under(self.runroot, self.root, container_id, log_path)

    def pod_dir(self, pod_id: str) -> str:
        return os.path.join(self.runroot, "pods", pod_id)


def make_layout_dirs(layout: ContainerLayout) -> None:
    for directory in (layout.bundle, layout.persist_dir, layout.exit_dir):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    if layout.log_path:
        os.makedirs(os.path.dirname(layout.log_path), mode=0o755, exist_ok=True)


def remove_layout(layout: ContainerLayout) -> None:
    shutil.rmtree(layout.bundle, ignore_errors=True)
    shutil.rmtree(layout.persist_dir, ignore_errors=True)
    try:
        os.unlink(layout.exit_file)
    except FileNotFoundError:
        pass


async def wait_for_exit(layout: ContainerLayout, timeout_s: float) -> ExitRecord | None:
    """Poll conmon's exit file; None if the container still runs after ``timeout_s``.
    conmon writes the file right after it reaps the container, so polling is cheap and
    needs no connection to conmon (which may predate this daemon)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        record = read_exit(layout)
        if record is not None or loop.time() >= deadline:
            return record
        await asyncio.sleep(EXIT_POLL_S)


def write_spec(layout: ContainerLayout, spec: dict[str, Any]) -> None:
    with open(os.path.join(layout.bundle, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh)


async def wait_pid_gone(pid: int, timeout_s: float) -> bool:
    """Wait for a process we are not the parent of (conmon) to exit; True if it did.
    A pidfd becomes readable when the process exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(pidfd, gone.set)
    try:
        await asyncio.wait_for(gone.wait(), timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def delete_container(env: RuncEnvironment, layout: ContainerLayout) -> None:
    """Force-delete the container in the runtime and wait for its conmon to leave, so no
    monitor outlives it. Deleting a container that is gone succeeds."""
    await env.runtime.delete(layout.container_id)
    pid = read_pid(layout.conmon_pidfile)
    if pid > 0 and not await wait_pid_gone(pid, CONMON_EXIT_WAIT_S):
        log.warning("conmon %d of %s did not exit; killing it", pid, layout.container_id)
        os.kill(pid, signal.SIGKILL)

"""What every runc-backend operation needs: the binaries, the directories, the host's facts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
from dataclasses import dataclass, field
from typing import Any

from crivm.runtime.runc_backend.conmon import ContainerLayout, ExitRecord, read_exit, read_pid
from crivm.runtime.runc_backend.exit_watch import ExitWatches
from crivm.runtime.runc_backend.oci import OciRuntime
from crivm.runtime.runc_backend.spec import HostFacts

log = logging.getLogger(__name__)

EXIT_POLL_S = 0.05
# While conmon's pidfd is watched, the exit file is still read this often: a safety net
# for a conmon pid file that names a reused pid, or a conmon that lingers after writing.
PIDFD_RECHECK_S = 0.25
CONMON_EXIT_WAIT_S = 5.0
TRASH_DIR = "oci-trash"


@dataclass(frozen=True)
class RuncEnvironment:
    handler: str
    conmon_path: str
    runtime: OciRuntime
    runroot: str
    root: str
    host: HostFacts
    trash: LayoutTrash = field(init=False, compare=False)
    exits: ExitWatches = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # A frozen dataclass still builds its own helpers once.
        object.__setattr__(self, "trash", LayoutTrash(
            (os.path.join(self.runroot, TRASH_DIR), os.path.join(self.root, TRASH_DIR))
        ))
        object.__setattr__(self, "exits", ExitWatches())

    async def open(self) -> None:
        """Nothing is being deleted yet: what is in the trash a crash left behind."""
        await asyncio.to_thread(self.trash.sweep)

    async def close(self) -> None:
        """Stop the exit watches and wait for the bundle deletions still running."""
        self.exits.close()
        await self.trash.drain()

    def layout(self, container_id: str, log_path: str) -> ContainerLayout:
        return ContainerLayout.under(self.runroot, self.root, container_id, log_path)

    def pod_dir(self, pod_id: str) -> str:
        return os.path.join(self.runroot, "pods", pod_id)


def make_layout_dirs(layout: ContainerLayout) -> None:
    for directory in (layout.bundle, layout.persist_dir, layout.exit_dir):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    if layout.log_path:
        os.makedirs(os.path.dirname(layout.log_path), mode=0o755, exist_ok=True)


class LayoutTrash:
    """Deletes container dirs off the event loop: a dir is renamed into a trash dir on the
    same file system (one rename, so it is gone from its container's name at once) and
    deleted in a thread. ``sweep`` at start removes what a crash left; ``drain`` waits."""

    def __init__(self, dirs: tuple[str, str]) -> None:
        self.runroot_dir, self.root_dir = dirs
        self._deletions: set[asyncio.Task[None]] = set()

    def sweep(self) -> None:
        for directory in (self.runroot_dir, self.root_dir):
            shutil.rmtree(directory, ignore_errors=True)

    def discard(self, path: str, trash_dir: str) -> None:
        try:
            os.makedirs(trash_dir, mode=0o700, exist_ok=True)
            aside = os.path.join(
                trash_dir, f"{os.path.basename(path)}.{secrets.token_hex(4)}"
            )
            os.rename(path, aside)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot move %s aside (%s); deleting it in place", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            return
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(shutil.rmtree, aside, True)
        )
        self._deletions.add(task)
        task.add_done_callback(self._deletions.discard)

    async def drain(self) -> None:
        if self._deletions:
            await asyncio.gather(*self._deletions, return_exceptions=True)


def remove_layout(layout: ContainerLayout) -> None:
    """Delete the container's dirs in place (undo steps of a create)."""
    shutil.rmtree(layout.bundle, ignore_errors=True)
    shutil.rmtree(layout.persist_dir, ignore_errors=True)
    _unlink_exit_file(layout)


def discard_layout(env: RuncEnvironment, layout: ContainerLayout) -> None:
    """Like ``remove_layout``, but the dirs go to the trash and are deleted in the
    background (6-20 ms of unlinks that RemoveContainer need not wait for)."""
    env.trash.discard(layout.bundle, env.trash.runroot_dir)
    env.trash.discard(layout.persist_dir, env.trash.root_dir)
    _unlink_exit_file(layout)


def _unlink_exit_file(layout: ContainerLayout) -> None:
    try:
        os.unlink(layout.exit_file)
    except FileNotFoundError:
        pass


def _open_pidfd(pid: int) -> int | None:
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # gone already, or a kernel without pidfds: the caller polls
        return None


async def _readable(fd: int, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(ready, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def wait_for_exit(layout: ContainerLayout, timeout_s: float) -> ExitRecord | None:
    """conmon's exit record; None if the container still runs after ``timeout_s``.

    conmon writes the exit file after it reaps the container and then exits, so a pidfd
    on conmon wakes this up as soon as the file is there. Where no pidfd can be had
    (conmon gone without writing, or no pidfd support) the file is polled."""
    record = read_exit(layout)
    if record is not None or timeout_s <= 0:
        return record
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pidfd = _open_pidfd(read_pid(layout.conmon_pidfile))
    try:
        while True:
            # Read after the pidfd is open too: a conmon that exited before it did has
            # written the file already.
            record = read_exit(layout)
            remaining = deadline - loop.time()
            if record is not None or remaining <= 0:
                return record
            if pidfd is None:
                await asyncio.sleep(min(EXIT_POLL_S, remaining))
            elif await _readable(pidfd, min(PIDFD_RECHECK_S, remaining)):
                os.close(pidfd)
                pidfd = None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def write_spec(layout: ContainerLayout, spec: dict[str, Any]) -> None:
    with open(os.path.join(layout.bundle, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh)


def read_spec(layout: ContainerLayout) -> dict[str, Any]:
    with open(os.path.join(layout.bundle, "config.json"), encoding="utf-8") as fh:
        spec: dict[str, Any] = json.load(fh)
    return spec


def live_conmon_pid(layout: ContainerLayout) -> int:
    """The pid of the container's conmon while it runs, else 0."""
    pid = read_pid(layout.conmon_pidfile)
    return pid if pid > 0 and _is_conmon(pid) else 0


def _is_conmon(pid: int) -> bool:
    """Whether ``pid`` is still a conmon; a pid file outlives its process, and the pid may
    have been reused since."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip() == "conmon"
    except OSError:
        return False


async def wait_pid_gone(pid: int, timeout_s: float) -> bool:
    """Wait for a process we are not the parent of (conmon) to exit; True if it did.
    A pidfd becomes readable when the process exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return await _readable(pidfd, timeout_s)
    finally:
        os.close(pidfd)


async def delete_container(env: RuncEnvironment, layout: ContainerLayout) -> None:
    """Force-delete the container in the runtime and wait for its conmon to leave, so no
    monitor outlives it. Deleting a container that is gone succeeds."""
    await env.runtime.delete(layout.container_id)
    pid = read_pid(layout.conmon_pidfile)
    if pid > 0 and _is_conmon(pid) and not await wait_pid_gone(pid, CONMON_EXIT_WAIT_S):
        log.warning("conmon %d of %s did not exit; killing it", pid, layout.container_id)
        os.kill(pid, signal.SIGKILL)

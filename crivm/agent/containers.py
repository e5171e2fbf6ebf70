"""The containers running in this guest, and their processes, driven through runc.

A container is a runc bundle in the agent's state directory whose rootfs is a directory the host
shares over virtio-fs. runc runs detached; the agent, a child subreaper, adopts the processes
and collects their exit statuses (crivm.agent.reaper).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from crivm.agent import oci_spec, process_io, stats
from crivm.agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    GuestError,
    InvalidArgument,
    NotFound,
)
from crivm.agent.process_io import ProcessIO
from crivm.agent.reaper import Reaper, exit_code_of
from crivm.agent.runc import Runc, Stdio
from crivm.proto import agent_pb2

log = logging.getLogger(__name__)

# Container and exec ids become file names and runc ids.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

CGROUP_PARENT = "/crivm"


@dataclass
class Process:
    container_id: str
    exec_id: str
    io: ProcessIO
    pid: int = 0
    exited: asyncio.Future[int] | None = None

    @property
    def running(self) -> bool:
        return self.exited is not None and not self.exited.done()

    def describe(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id


@dataclass
class Container:
    id: str
    bundle: str
    spec: oci_spec.Spec
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    started: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Containers:
    def __init__(self, runc: Runc, reaper: Reaper, state_dir: str) -> None:
        self._runc = runc
        self._reaper = reaper
        self._bundles = os.path.join(state_dir, "bundles")
        self._sockets = os.path.join(state_dir, "tty")
        os.makedirs(self._bundles, exist_ok=True)
        os.makedirs(self._sockets, exist_ok=True)
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._tty_count = 0

    def get(self, container_id: str) -> Container:
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFound(f"container {container_id!r} does not exist") from None

    def process(self, container_id: str, exec_id: str) -> Process:
        container = self.get(container_id)
        if not exec_id:
            return container.init
        try:
            return container.execs[exec_id]
        except KeyError:
            raise NotFound(f"process {exec_id!r} does not exist in {container_id!r}") from None

    def cgroup_path(self, container_id: str) -> str:
        return f"{CGROUP_PARENT}/{container_id}"

    async def create(self, request: agent_pb2.CreateContainerRequest) -> Process:
        cid = _check_id("container id", request.container_id)
        if cid in self._containers or cid in self._creating:
            raise AlreadyExists(f"container {cid!r} already exists")
        if not os.path.isdir(request.rootfs_path):
            raise InvalidArgument(f"rootfs {request.rootfs_path!r} is not a directory in the guest")
        spec = oci_spec.guest_spec(
            oci_spec.parse_spec(request.oci_spec_json),
            request.rootfs_path,
            request.terminal,
            self.cgroup_path(cid),
        )
        self._creating.add(cid)
        bundle = os.path.join(self._bundles, cid)
        try:
            async with contextlib.AsyncExitStack() as undo:
                os.makedirs(bundle)
                undo.callback(shutil.rmtree, bundle, True)
                _write_json(os.path.join(bundle, "config.json"), spec)
                pid_file = os.path.join(bundle, "init.pid")
                async with self._stdio(cid, request.terminal, request.stdin) as (stdio, sock, io):
                    await self._runc.create(cid, bundle, pid_file, stdio, sock)
                    undo.push_async_callback(self._delete_quietly, cid)
                process = Process(cid, "", await io)
                undo.callback(process.io.close)
                process.pid = _read_pid(pid_file)
                process.exited = self._reaper.watch(process.pid)
                self._containers[cid] = Container(cid, bundle, spec, process)
                undo.pop_all()
        finally:
            self._creating.discard(cid)
        log.info("created container %s, init pid %d", cid, process.pid)
        return process

    async def start(self, container_id: str) -> None:
        container = self.get(container_id)
        async with container.lock:
            if container.started:
                raise FailedPrecondition(f"container {container_id!r} was already started")
            await self._runc.start(container_id)
            container.started = True

    async def exec(self, container_id: str, exec_id: str, spec: agent_pb2.Process) -> Process:
        container = self.get(container_id)
        exec_id = _check_id("exec id", exec_id)
        async with container.lock:
            if exec_id in container.execs:
                raise AlreadyExists(f"process {exec_id!r} already exists in {container_id!r}")
            if not container.init.running:
                raise FailedPrecondition(f"container {container_id!r} is not running")
            process_file = os.path.join(container.bundle, f"exec-{exec_id}.json")
            _write_json(process_file, oci_spec.exec_process(container.spec, spec))
            pid_file = os.path.join(container.bundle, f"exec-{exec_id}.pid")
            name = f"{container_id}/{exec_id}"
            async with self._stdio(name, spec.terminal, spec.stdin) as (stdio, sock, io):
                await self._runc.exec(container_id, process_file, pid_file, stdio, sock)
            process = Process(container_id, exec_id, await io)
            try:
                process.pid = _read_pid(pid_file)
            except GuestError:
                process.io.close()
                raise
            process.exited = self._reaper.watch(process.pid)
            container.execs[exec_id] = process
        log.info("exec %s in %s, pid %d", exec_id, container_id, process.pid)
        return process

    async def signal(self, container_id: str, exec_id: str, sig: int, all_procs: bool) -> None:
        process = self.process(container_id, exec_id)
        if not 0 < sig < signal.NSIG:
            raise InvalidArgument(f"no signal {sig}")
        if not process.running:
            return  # signalling an exited process is not an error, like kill(1) on a zombie
        if not exec_id:
            await self._runc.kill(container_id, sig, all_procs)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)

    async def wait(self, container_id: str, exec_id: str) -> tuple[int, int, bool]:
        """(exit code, signal, whether the container's cgroup saw an OOM kill) once the
        process exited. The OOM answer is only for the init process, as conmon's is."""
        process = self.process(container_id, exec_id)
        if process.exited is None:
            raise FailedPrecondition(f"process {process.describe()} never ran")
        # Output may still be buffered here: the host reads it to end of file on its own.
        code, signum = exit_code_of(await asyncio.shield(process.exited))
        oom = not exec_id and stats.oom_killed(self.cgroup_path(container_id))
        return code, signum, oom

    async def remove(self, container_id: str, grace_seconds: float) -> None:
        container = self._containers.get(container_id)
        if container is None:
            if self._runc.knows(container_id):
                await self._runc.delete(container_id)  # left from a create that failed midway
            return
        async with container.lock:
            # runc delete --force SIGKILLs init; the pid namespace takes the execs with it.
            if self._runc.knows(container_id):
                await self._runc.delete(container_id)
            processes = [container.init, *container.execs.values()]
            for process in processes:
                if process.running:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
            pending = [p.exited for p in processes if p.exited is not None]
            try:
                async with asyncio.timeout(grace_seconds):
                    await asyncio.gather(*(asyncio.shield(f) for f in pending))
            except TimeoutError as exc:
                raise GuestError(
                    f"processes of {container_id!r} still alive {grace_seconds:.0f} s after SIGKILL"
                ) from exc
            for process in processes:
                process.io.close()
            shutil.rmtree(container.bundle, ignore_errors=True)
            del self._containers[container_id]
        log.info("removed container %s", container_id)

    async def remove_all(self) -> None:
        for container_id in list(self._containers):
            try:
                await self.remove(container_id, 10.0)
            except GuestError as exc:
                log.error("%s", exc)

    @contextlib.asynccontextmanager
    async def _stdio(
        self, name: str, terminal: bool, stdin: bool
    ) -> AsyncIterator[tuple[Stdio, str | None, asyncio.Future[ProcessIO]]]:
        if terminal:
            self._tty_count += 1
            path = os.path.join(self._sockets, f"{self._tty_count}.sock")
            async with process_io.console(name, path) as (stdio, sock, received):
                yield stdio, sock, received
            return
        async with process_io.pipes(name, stdin) as (stdio, io):
            ready: asyncio.Future[ProcessIO] = asyncio.get_running_loop().create_future()
            ready.set_result(io)
            yield stdio, None, ready

    async def _delete_quietly(self, container_id: str) -> None:
        try:
            await self._runc.delete(container_id)
        except GuestError as exc:
            log.warning("undoing the create of %s: %s", container_id, exc)


def _check_id(what: str, value: str) -> str:
    if not _ID.match(value):
        raise InvalidArgument(f"{what} {value!r} must match {_ID.pattern}")
    return value


def _write_json(path: str, value: object) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def _read_pid(pid_file: str) -> int:
    try:
        with open(pid_file) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise GuestError(f"runc left no usable pid file at {pid_file}: {exc}") from exc

"""ExecSync: run a command in a running container and collect its output.

The runtime's ``exec`` runs the process with our pipes as its stdio; there is no need for a
conmon in between because nothing has to outlive the call. On timeout the process is killed
by pid (runc cannot forward SIGKILL) and the call fails with DEADLINE_EXCEEDED, which kubelet
turns into a probe timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

from crivm.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from crivm.runtime.backend import ExecResult
from crivm.runtime.runc_backend import conmon
from crivm.runtime.runc_backend.environment import RuncEnvironment

READ_CHUNK = 64 * 1024
REAP_TIMEOUT_S = 5.0
PIDFILE_WAIT_S = 2.0


def exec_process(container_process: dict[str, Any], cmd: list[str]) -> dict[str, Any]:
    """The container's own process settings (user, env, cwd, capabilities...), running
    ``cmd`` without a terminal."""
    if not cmd:
        raise InvalidArgument("exec needs a command")
    process = dict(container_process)
    process["args"] = list(cmd)
    process["terminal"] = False
    process.pop("consoleSize", None)
    return process


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes; the rest is read and dropped so the process never blocks."""
    kept = bytearray()
    while chunk := await stream.read(READ_CHUNK):
        room = limit - len(kept)
        if room > 0:
            kept += chunk[:room]
    return bytes(kept)


async def _kill_from_pidfile(path: str, proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the exec'd process. A very short timeout can fire before runc has written
    the pid file, so wait for it while runc exec still runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PIDFILE_WAIT_S
    pid = conmon.read_pid(path)
    while pid <= 0 and proc.returncode is None and loop.time() < deadline:
        await asyncio.sleep(0.02)
        pid = conmon.read_pid(path)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def exec_sync(
    env: RuncEnvironment,
    layout: conmon.ContainerLayout,
    cmd: list[str],
    timeout_s: float,
    max_output: int,
    known_running: bool = False,
) -> ExecResult:
    # ``known_running``: the caller's exit watch says so; saves a `runc state` (8-10 ms),
    # and the runtime refuses to exec in a stopped container either way.
    if not known_running:
        state = await env.runtime.state(layout.container_id)
        if state is None or state.status != "running":
            raise FailedPrecondition(f"container {layout.container_id} is not running")
    spec = json.loads(Path(layout.bundle, "config.json").read_text())
    token = secrets.token_hex(8)
    process_path = os.path.join(layout.bundle, f"exec-{token}.json")
    pidfile = os.path.join(layout.bundle, f"exec-{token}.pid")
    Path(process_path).write_text(json.dumps(exec_process(spec["process"], cmd)))
    try:
        proc = await asyncio.create_subprocess_exec(
            *env.runtime.exec_argv(layout.container_id, process_path, pidfile),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        collect = asyncio.gather(
            _read_capped(proc.stdout, max_output),
            _read_capped(proc.stderr, max_output),
            proc.wait(),
        )
        try:
            stdout, stderr, code = await asyncio.wait_for(collect, timeout_s or None)
        except TimeoutError as exc:
            await _kill_from_pidfile(pidfile, proc)
            # runc exec is the killed process's parent: let it reap the process and exit,
            # or the zombie would be re-parented outside the pod and linger.
            try:
                await asyncio.wait_for(proc.wait(), REAP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            raise DeadlineExceeded(
                f"command {cmd[0]!r} in container {layout.container_id} timed out after "
                f"{timeout_s}s"
            ) from exc
    finally:
        for path in (process_path, pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return ExecResult(exit_code=code, stdout=stdout, stderr=stderr)

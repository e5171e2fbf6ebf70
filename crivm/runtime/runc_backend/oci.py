"""The low-level OCI runtime's CLI (runc, or crun which speaks the same verbs).

Every call runs ``<runtime> --root <state dir> <verb> ...`` with a timeout. A failed call
becomes ``OciRuntimeError`` here, once, carrying the runtime's stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crivm.errors import CrivmError, DeadlineExceeded

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0


class OciRuntimeError(CrivmError):
    """The OCI runtime refused or failed a command."""


@dataclass(frozen=True)
class RuntimeState:
    """``runc state``: status is creating, created, running, paused or stopped."""

    status: str
    pid: int


class OciRuntime:
    def __init__(
        self, runtime_path: str, state_root: str, console_socket_in_foreground: bool = False
    ) -> None:
        self.runtime_path = runtime_path
        self.state_root = state_root
        # How a foreground ``exec`` with a terminal hands over the terminal: runc refuses
        # --console-socket unless it detaches and uses its own stdio instead; crivm-shim
        # sends the master over --console-socket either way.
        self.console_socket_in_foreground = console_socket_in_foreground

    @property
    def global_args(self) -> list[str]:
        return ["--root", self.state_root]

    def exists(self, container_id: str) -> bool:
        """Whether the runtime still keeps state for the container. runc and crun both keep
        it in ``<root>/<id>``; checking it avoids parsing error text."""
        return Path(self.state_root, container_id).is_dir()

    async def _run(
        self, *args: str, timeout_s: float = DEFAULT_TIMEOUT_S, stdin: bytes | None = None
    ) -> bytes:
        argv = [self.runtime_path, *self.global_args, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise OciRuntimeError(f"cannot run {self.runtime_path}: {exc.strerror}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise DeadlineExceeded(f"{self.runtime_path} {args[0]} ran past {timeout_s}s") from exc
        if proc.returncode != 0:
            message = stderr.decode(errors="replace").strip()
            raise OciRuntimeError(f"{self.runtime_path} {' '.join(args[:1])} failed: {message}")
        return stdout

    async def state(self, container_id: str) -> RuntimeState | None:
        """None when the runtime has no such container."""
        if not self.exists(container_id):
            return None
        try:
            out = await self._run("state", container_id)
        except OciRuntimeError:
            if not self.exists(container_id):
                return None
            raise
        data: dict[str, Any] = json.loads(out)
        return RuntimeState(status=str(data.get("status", "")), pid=int(data.get("pid") or 0))

    async def start(self, container_id: str) -> None:
        await self._run("start", container_id)

    async def kill(self, container_id: str, signum: int, all_processes: bool = False) -> None:
        args = ["kill"] + (["--all"] if all_processes else []) + [container_id, str(signum)]
        await self._run(*args)

    async def delete(self, container_id: str) -> None:
        """Force-delete; a container the runtime no longer knows is already deleted."""
        if not self.exists(container_id):
            return
        try:
            await self._run("delete", "--force", container_id)
        except OciRuntimeError:
            if self.exists(container_id):
                raise

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._run(
            "update", "--resources", "-", container_id, stdin=json.dumps(resources).encode()
        )

    def exec_argv(self, container_id: str, process_json: str, pidfile: str) -> list[str]:
        return [
            self.runtime_path, *self.global_args, "exec", "--process", process_json,
            "--pid-file", pidfile, container_id,
        ]


def signal_number(name: str) -> int:
    """An image's StopSignal ("SIGQUIT", "QUIT", "3") as a number; SIGTERM when unset."""
    if not name:
        return int(signal.SIGTERM)
    if name.isdigit():
        return int(name)
    upper = name.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    try:
        return int(signal.Signals[upper])
    except KeyError:
        log.warning("unknown stop signal %r; using SIGTERM", name)
        return int(signal.SIGTERM)


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""runc inside the guest, driven through its CLI.

Every call logs to a JSON file (runc --log) rather than to stderr: for `create` and `exec`,
runc's stdio is the container's stdio, and runc's own messages must not end up in the
container's output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass

from crivm.agent.errors import GuestError

log = logging.getLogger(__name__)

_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Stdio:
    """The fds runc passes through to the container process."""

    stdin: int
    stdout: int
    stderr: int


class Runc:
    def __init__(self, binary: str, root: str, log_dir: str, *, no_pivot: bool = False) -> None:
        self.binary = binary
        self.root = root
        self.log_dir = log_dir
        self.no_pivot = no_pivot

    async def version(self) -> str:
        out = await self._run("version", argv=["--version"], container_id="")
        return out.splitlines()[0] if out else ""

    async def create(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None,
    ) -> None:
        argv = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if self.no_pivot:
            argv.append("--no-pivot")
        if console_socket is not None:
            argv += ["--console-socket", console_socket]
        await self._run(
            "create", argv=[*argv, container_id], container_id=container_id, stdio=stdio
        )

    async def start(self, container_id: str) -> None:
        await self._run("start", argv=["start", container_id], container_id=container_id)

    async def exec(
        self,
        container_id: str,
        process_file: str,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None,
    ) -> None:
        argv = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket is not None:
            argv += ["--console-socket", console_socket]
        await self._run("exec", argv=[*argv, container_id], container_id=container_id, stdio=stdio)

    async def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        argv = ["kill", *(["--all"] if all_processes else []), container_id, str(signal)]
        await self._run("kill", argv=argv, container_id=container_id)

    async def delete(self, container_id: str) -> None:
        await self._run(
            "delete", argv=["delete", "--force", container_id], container_id=container_id
        )

    def knows(self, container_id: str) -> bool:
        """Whether runc has state for the container (it keeps one directory per container)."""
        return os.path.isdir(os.path.join(self.root, container_id))

    async def _run(
        self,
        verb: str,
        *,
        argv: list[str],
        container_id: str,
        stdio: Stdio | None = None,
    ) -> str:
        log_file = os.path.join(self.log_dir, f"runc-{verb}-{container_id or 'agent'}.log")
        _truncate(log_file)  # each call starts with an empty log: its error is the last line
        full = [self.binary, "--root", self.root, "--log", log_file, "--log-format", "json", *argv]
        log.debug("running %s", full)
        try:
            proc = await asyncio.create_subprocess_exec(
                *full,
                stdin=stdio.stdin if stdio else asyncio.subprocess.DEVNULL,
                stdout=stdio.stdout if stdio else asyncio.subprocess.PIPE,
                stderr=stdio.stderr if stdio else asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise GuestError(f"cannot run {self.binary}: {exc}") from exc
        try:
            async with asyncio.timeout(_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise GuestError(f"runc {verb} {container_id}: no answer in {_TIMEOUT:.0f} s") from exc
        if proc.returncode != 0:
            message = _last_error(log_file) or (err or b"").decode(errors="replace").strip()
            raise GuestError(f"runc {verb} {container_id} failed ({proc.returncode}): {message}")
        return (out or b"").decode(errors="replace")


def root_is_initramfs(mounts: str = "/proc/self/mounts") -> bool:
    """Whether / is still the kernel's initial rootfs, which pivot_root(2) cannot move away.

    runc then has to jail containers with MS_MOVE and chroot (--no-pivot), as Kata's agent does
    in an initramfs guest.
    """
    fstype = ""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "/":
                fstype = fields[2]  # the last entry for / is the one on top
    return fstype == "rootfs"


def _truncate(path: str) -> None:
    with open(path, "wb"):
        pass


def _last_error(log_file: str) -> str:
    try:
        with open(log_file, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return line.strip()
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", ""))
    return ""

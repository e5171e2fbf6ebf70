"""conmon: the per-container monitor that outlives the daemon.

conmon runs ``<runtime> create`` for the container, then stays as its parent: it copies the
container's output into the CRI log file, serves the attach socket, and writes the exit code
into the exit dir when the container dies. Because it is a daemonized process of its own,
the crivm daemon can restart without touching running containers.

``conmon_argv`` is a pure function; ``spawn`` starts conmon and waits for its report on the
sync pipe (``{"data": <pid or -1>, "message": ...}``, API version 1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from crivm.errors import CrivmError, DeadlineExceeded

log = logging.getLogger(__name__)

SPAWN_TIMEOUT_S = 60.0
# Wrapped log lines start with their own timestamp; keep a file from filling the disk when
# kubelet's rotation is not running (crictl). -1 = unlimited, conmon's own default.
LOG_SIZE_MAX = -1


class ConmonError(CrivmError):
    """conmon could not start the container (the runtime's own error is in the message)."""


@dataclass(frozen=True)
class ContainerLayout:
    """Where one container's files live.

    ``bundle`` (config.json, conmon's attach socket and ctl fifo, pid files) is under the
    runroot and gone after a reboot, like the container; ``persist_dir`` (conmon's ``oom`` and
    ``exit`` files) is under the root; the exit dir is shared by all containers."""

    container_id: str
    bundle: str
    persist_dir: str
    exit_dir: str
    log_path: str

    @classmethod
    def under(cls, runroot: str, root: str, container_id: str, log_path: str) -> ContainerLayout:
        return cls(
            container_id=container_id,
            bundle=os.path.join(runroot, "oci", container_id),
            persist_dir=os.path.join(root, "oci", container_id),
            exit_dir=os.path.join(runroot, "oci-exits"),
            log_path=log_path,
        )

    @property
    def pidfile(self) -> str:
        return os.path.join(self.bundle, "pidfile")

    @property
    def conmon_pidfile(self) -> str:
        return os.path.join(self.bundle, "conmon.pid")

    @property
    def attach_socket(self) -> str:
        return os.path.join(self.bundle, "attach")

    @property
    def ctl_fifo(self) -> str:
        return os.path.join(self.bundle, "ctl")

    @property
    def exit_file(self) -> str:
        return os.path.join(self.exit_dir, self.container_id)

    @property
    def oom_file(self) -> str:
        return os.path.join(self.persist_dir, "oom")

    @property
    def persisted_exit_file(self) -> str:
        """conmon's second copy of the exit code; it survives a reboot, unlike the runroot."""
        return os.path.join(self.persist_dir, "exit")


@dataclass(frozen=True)
class Stdio:
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False


def conmon_argv(
    *,
    conmon_path: str,
    runtime_path: str,
    runtime_args: list[str],
    layout: ContainerLayout,
    name: str,
    stdio: Stdio,
    log_level: str = "info",
) -> list[str]:
    argv = [
        conmon_path,
        "--api-version", "1",
        "--cid", layout.container_id,
        "--cuuid", layout.container_id,
        "--name", name,
        "--runtime", runtime_path,
        "--bundle", layout.bundle,
        "--container-pidfile", layout.pidfile,
        "--conmon-pidfile", layout.conmon_pidfile,
        "--log-path", f"k8s-file:{layout.log_path}",
        "--log-size-max", str(LOG_SIZE_MAX),
        "--exit-dir", layout.exit_dir,
        "--persist-dir", layout.persist_dir,
        # The attach socket goes into the bundle (short, private path) rather than a
        # shared socket dir, so it is removed with the bundle.
        "--socket-dir-path", layout.bundle,
        "--full-attach",
        "--log-level", log_level,
    ]
    for arg in runtime_args:
        argv += ["--runtime-arg", arg]
    if stdio.tty:
        argv.append("--terminal")
    if stdio.stdin:
        argv.append("--stdin")
        if not stdio.stdin_once:
            argv.append("--leave-stdin-open")
    return argv


async def spawn(argv: list[str], cwd: str, timeout_s: float = SPAWN_TIMEOUT_S) -> int:
    """Start conmon in ``cwd`` (the bundle) and return the container's pid once the runtime
    created it. conmon drops files such as ``oom`` into its working directory, so it must
    never inherit the daemon's."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    env = {**os.environ, "_OCI_SYNCPIPE": str(write_fd)}
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ConmonError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        os.close(write_fd)
        write_fd = -1
        # conmon forks: the parent exits at once; the monitor child reports on the pipe.
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            raise ConmonError(
                f"conmon exited {proc.returncode}: {stderr.decode(errors='replace').strip()}"
            )
        message = await asyncio.wait_for(_read_line(read_fd), timeout_s)
    except TimeoutError as exc:
        raise DeadlineExceeded(f"conmon did not report within {timeout_s}s") from exc
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
    if not message:
        raise ConmonError("conmon exited without reporting the container's pid")
    report = json.loads(message)
    pid = int(report.get("data", -1))
    if pid <= 0:
        raise ConmonError(f"creating the container failed: {report.get('message', '')}")
    return pid


async def _read_line(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    try:
        return await reader.readline()
    finally:
        transport.close()


def read_pid(path: str) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@dataclass(frozen=True)
class ExitRecord:
    exit_code: int
    finished_at: int  # ns since the epoch: the exit file's mtime
    oom_killed: bool


def read_exit(layout: ContainerLayout) -> ExitRecord | None:
    """The container's exit as conmon recorded it, or None while it runs."""
    for path in (layout.exit_file, layout.persisted_exit_file):
        try:
            stat = os.stat(path)
            text = Path(path).read_text().strip()
            break
        except FileNotFoundError:
            continue
    else:
        return None
    try:
        code = int(text)
    except ValueError:
        # conmon writes the file in one go; an empty one is still being written.
        return None
    return ExitRecord(
        exit_code=code, finished_at=stat.st_mtime_ns, oom_killed=os.path.exists(layout.oom_file)
    )


def reopen_log(layout: ContainerLayout) -> None:
    """Ask conmon to reopen its log file (after kubelet rotated it), over the ctl fifo."""
    try:
        fd = os.open(layout.ctl_fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        # ENOENT: the bundle is gone; ENXIO: no conmon reads the fifo any more.
        raise ConmonError(f"conmon is not serving {layout.ctl_fifo}: {exc.strerror}") from exc
    try:
        # Message type 2 = reopen the log; the two numbers only matter for resizes.
        os.write(fd, b"2 0 0\n")
    finally:
        os.close(fd)

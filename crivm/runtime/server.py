"""``crivm serve``: the CRI gRPC server on the configured unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from crivm.runtime import servicer
from crivm.runtime.call_scope import CallScope
from crivm.runtime.config import Config
from crivm.runtime.daemon import Daemon
from crivm.runtime.grpc_server import GrpcServer
from crivm.storage import heap

log = logging.getLogger(__name__)

# Grace period for in-flight calls when SIGTERM/SIGINT arrives. Containers keep running.
SHUTDOWN_GRACE_S = 5.0
# The largest request accepted. (kubelet's own requests are small; its client takes the
# large answers: ListContainers with many containers, big exec output.)
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    # Before any thread exists: see crivm.storage.heap.
    if not heap.use_one_arena():
        log.debug("malloc is not glibc's: its arenas are left as they are")
    socket_path = Path(config.listen)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _remove_stale_socket(socket_path)

    daemon = await Daemon.open(config)
    scope = CallScope()
    metrics = daemon.components.get("metrics")
    if metrics is not None:
        scope.observers.append(metrics.observe_call)
    server = GrpcServer(servicer.methods(daemon), scope, MAX_MESSAGE_BYTES)
    # Create the socket with no access for others, then widen to 0660: no window in
    # which another user could connect.
    # The socket is bound under a temporary name and renamed into place once the server
    # listens, so its appearance means "ready": nobody connects to a bound, unlistened socket.
    binding = socket_path.with_name(f".{socket_path.name}.binding")
    binding.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        await server.listen(binding)
    finally:
        os.umask(old_umask)
    os.chmod(binding, 0o660)
    os.rename(binding, socket_path)
    log.info("crivm serving CRI runtime.v1 on %s", socket_path)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down; containers keep running")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop(SHUTDOWN_GRACE_S)
        await daemon.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        log.info("crivm stopped")


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a crashed daemon blocks bind(); a live daemon on it is an error."""
    if not path.exists():
        return
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    from crivm.errors import Unavailable

    raise Unavailable(f"another daemon is already serving on {path}")

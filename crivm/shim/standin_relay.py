"""The supervisor's side of the stand-ins: it takes over their stdio and relays it.

Each VM container (and each exec) has a stand-in on the host (``crivm.shim.standin``), the
process conmon watches. It connects to the pod supervisor's stand-in socket, hands over its
stdio fds with SCM_RIGHTS and waits. The supervisor runs a ``StdioRelay`` for it on its own
event loop and one shared agent connection, passes on the signals the stand-in reports, and
sends it the exit code once the guest process has exited and its output is drained.

A stand-in that goes away before that (killed, or its conmon gone) takes its process along,
as killing runc's container process would: the relay stops and the guest process gets
SIGKILL. When the supervisor stops (the VM is gone) every stand-in sees its connection close
and exits with ``LOST_EXIT_CODE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from crivm.errors import CrivmError
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim import standin
from crivm.shim.stdio_proxy import HostStdio, RelayTarget, StdioRelay

log = logging.getLogger(__name__)

# A hand-off must arrive this soon after the stand-in connects.
HANDOFF_TIMEOUT_S = 10.0
# How long killing the process of a stand-in that went away may take.
KILL_TIMEOUT_S = 10.0


class HandoffError(Exception):
    """The stand-in's first message was not a usable hand-off."""


async def _receive_handoff(conn: socket.socket) -> tuple[RelayTarget, HostStdio]:
    loop = asyncio.get_running_loop()
    while True:
        try:
            message, fds, flags, _ = socket.recv_fds(conn, standin.MAX_MESSAGE,
                                                      len(standin.HANDED_FDS))
            break
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())
    if flags & socket.MSG_CTRUNC or len(fds) != len(standin.HANDED_FDS):
        _close_all(fds)
        raise HandoffError(f"expected {len(standin.HANDED_FDS)} fds, got {len(fds)}")
    kind, fields = standin.decode(message)
    if kind != standin.HANDOFF or len(fields) != 4 or not fields[0]:
        _close_all(fds)
        raise HandoffError(f"not a hand-off: {message[:80]!r}")
    container_id, exec_id, flag_text, oom_file = fields
    flag_set = set(flag_text.split(","))
    target = RelayTarget(container_id, exec_id, terminal=standin.FLAG_TERMINAL in flag_set,
                         stdin=standin.FLAG_STDIN in flag_set, oom_file=oom_file)
    return target, HostStdio(*fds)


def _close_all(fds: list[int] | set[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class StandinServer:
    """Serves ``listen_path`` for the pod's stand-ins, relaying through ``agent``."""

    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent
        self._listener: socket.socket | None = None
        self._listen_path = ""
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def listen(self, listen_path: str) -> None:
        """Accept stand-ins on ``listen_path`` (replacing a stale socket)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(listen_path)
        os.chmod(listen_path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._listener, self._listen_path = listener, listen_path
        self._accepting = asyncio.create_task(self._accept())

    @property
    def relaying(self) -> int:
        """How many stand-ins are being served now."""
        return len(self._serving)

    async def close(self) -> None:
        """Stop accepting and drop every stand-in (each exits with LOST_EXIT_CODE)."""
        tasks = [*([self._accepting] if self._accepting else []), *self._serving]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._listen_path)
        with contextlib.suppress(CrivmError):
            await self.agent.close()

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            try:
                async with asyncio.timeout(HANDOFF_TIMEOUT_S):
                    target, stdio = await _receive_handoff(conn)
            except (HandoffError, TimeoutError, OSError) as exc:
                log.warning("stand-in dropped before its hand-off: %s", exc)
                return
            relay = StdioRelay(self.agent, target, stdio)
            used = relay.fds_in_use()
            _close_all({stdio.stdin, stdio.stdout, stdio.stderr} - used)
            try:
                code = await self._relay(conn, relay)
            except Exception:  # noqa: BLE001 - one broken relay must not take the others
                log.exception("relaying %s failed", target.container_id)
                code = standin.LOST_EXIT_CODE
            finally:
                # Closed before the stand-in exits: conmon sees end of file on its pipes only
                # once the stand-in's own copies go, as with runc's container process.
                _close_all(used)
            if code is not None:
                with contextlib.suppress(OSError):
                    await asyncio.get_running_loop().sock_sendall(
                        conn, standin.encode(standin.EXIT, str(code)))

    async def _relay(self, conn: socket.socket, relay: StdioRelay) -> int | None:
        """The process's exit code, or None if its stand-in went away first."""
        target = relay.target
        name = target.container_id + (f"/{target.exec_id}" if target.exec_id else "")
        # Debug only: every exec (ExecSync probes too) gets a relay; the log would grow by it.
        log.debug("relaying %s for its stand-in", name)
        running = asyncio.create_task(relay.run())
        listening = asyncio.create_task(self._take_signals(conn, relay))
        try:
            await asyncio.wait({running, listening}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The supervisor stops, and the VM with it: nothing to kill.
            running.cancel()
            listening.cancel()
            await asyncio.gather(running, listening, return_exceptions=True)
            raise
        listening.cancel()
        if running.done():
            await asyncio.gather(listening, return_exceptions=True)
            code = running.result()
            log.debug("%s exited with %d", name, code)
            return code
        # The stand-in went away (killed, or its conmon died): its process goes too, as
        # runc's container process would be gone.
        running.cancel()
        await asyncio.gather(running, listening, return_exceptions=True)
        log.info("%s: its stand-in went away; killing the process", name)
        with contextlib.suppress(CrivmError, TimeoutError):
            async with asyncio.timeout(KILL_TIMEOUT_S):
                await self.agent.signal_process(target.container_id, target.exec_id,
                                                signal.SIGKILL)
        return None

    async def _take_signals(self, conn: socket.socket, relay: StdioRelay) -> None:
        """Forward the stand-in's signals until it hangs up."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await loop.sock_recv(conn, standin.MAX_MESSAGE)
            except OSError as exc:
                log.warning("stand-in of %s: %s", relay.target.container_id, exc)
                return
            if not message:
                return
            kind, fields = standin.decode(message)
            if kind == standin.SIGNAL and fields and fields[0].isdigit():
                relay.forward(int(fields[0]))
            else:
                log.warning("stand-in of %s sent %r", relay.target.container_id, message[:80])

"""VM control over QMP. Nothing else talks to a running QEMU.

QMP is one JSON object per line on QEMU's monitor socket: QEMU greets (``{"QMP": ...}``), the
client enters command mode with ``qmp_capabilities``, and every command is answered by a
``return`` or an ``error`` carrying the command's ``id``; ``event`` objects arrive in between
at any time. This client is that protocol and nothing more (crivm needs a handful of
commands and no events). It replaced the ``qemu.qmp`` library, whose import of ``ssl`` cost
every VM pod's supervisor ~4 MiB PSS for a unix socket.

Errors are translated here, once: a socket that can't be reached or drops is
``Unavailable``, a command that QEMU rejects is ``FailedPrecondition``, and a slow answer is
``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from crivm.errors import DeadlineExceeded, FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 10.0
# QEMU's replies are small; a query-* answer for a big VM stays far below this.
MAX_LINE = 4 * 1024 * 1024


class QmpControl:
    """One QMP connection to one VM."""

    def __init__(self, vm_name: str) -> None:
        self._name = vm_name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._receiver: asyncio.Task[None] | None = None

    async def connect(self, socket_path: str, timeout_s: float = 10.0) -> None:
        """Connect, retrying while QEMU has not created or opened the socket yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(socket_path, limit=MAX_LINE)
                break
            except OSError as exc:
                if loop.time() >= deadline:
                    raise Unavailable(
                        f"VM {self._name}: QMP socket {socket_path} not answering: {exc}"
                    ) from exc
                await asyncio.sleep(0.02 if not os.path.exists(socket_path) else 0.05)
        try:
            await asyncio.wait_for(self._handshake(reader, writer),
                                   max(0.1, deadline - loop.time()))
        except TimeoutError as exc:
            writer.close()
            raise DeadlineExceeded(f"VM {self._name}: QMP handshake timed out") from exc
        except BaseException:
            writer.close()
            raise
        self._reader, self._writer = reader, writer
        self._receiver = asyncio.create_task(self._receive(reader))

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        greeting = await self._read_message(reader)
        if "QMP" not in greeting:
            raise Unavailable(f"VM {self._name}: not a QMP greeting: {greeting!r}")
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        await writer.drain()
        while True:
            reply = await self._read_message(reader)
            if "event" in reply:
                continue
            if "error" in reply:
                raise Unavailable(f"VM {self._name}: qmp_capabilities refused: {reply['error']}")
            return

    async def _read_message(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise Unavailable(f"VM {self._name}: QMP message over {MAX_LINE} bytes") from exc
        if not line:
            raise Unavailable(f"VM {self._name}: QMP connection closed")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise Unavailable(f"VM {self._name}: QMP sent something that is not JSON") from exc
        if not isinstance(message, dict):
            raise Unavailable(f"VM {self._name}: QMP sent {message!r}")
        return message

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        """Route answers to their commands and drop events, until the connection ends."""
        error: Exception = Unavailable(f"VM {self._name}: QMP connection closed")
        try:
            while True:
                message = await self._read_message(reader)
                if "event" in message:
                    log.debug("VM %s: QMP event %s", self._name, message.get("event"))
                    continue
                waiter = self._pending.pop(message.get("id", -1), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except (Unavailable, ConnectionError) as exc:
            error = exc if isinstance(exc, Unavailable) else Unavailable(
                f"VM {self._name}: QMP connection lost: {exc}")
        finally:
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(error)
            self._pending.clear()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S) -> object:
        if self._writer is None or self._receiver is None or self._receiver.done():
            raise Unavailable(f"VM {self._name}: QMP is not connected (during {command})")
        command_id = next(self._ids)
        request: dict[str, object] = {"execute": command, "id": command_id}
        if arguments:
            request["arguments"] = dict(arguments)
        waiter = asyncio.get_running_loop().create_future()
        self._pending[command_id] = waiter
        try:
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            reply = await asyncio.wait_for(waiter, timeout_s)
        except (ConnectionError, Unavailable) as exc:
            raise Unavailable(f"VM {self._name}: QMP connection lost during {command}") from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"VM {self._name}: QMP {command} took over {timeout_s} s") from exc
        finally:
            self._pending.pop(command_id, None)
        if "error" in reply:
            error = reply["error"]
            detail = error.get("desc", error) if isinstance(error, dict) else error
            raise FailedPrecondition(f"VM {self._name}: QMP {command} failed: {detail}")
        return reply.get("return")

    async def query_status(self) -> str:
        """The run state: ``running``, ``paused``, ``shutdown``, ``prelaunch``, ..."""
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise Unavailable(f"VM {self._name}: malformed query-status reply {reply!r}")
        return str(reply["status"])

    async def quit(self) -> None:
        """Stop QEMU now. QEMU may close the socket before it answers; that is success."""
        try:
            await self.execute("quit")
        except Unavailable:
            log.debug("VM %s: QMP closed while quitting", self._name)

    async def system_powerdown(self) -> None:
        """Press the ACPI power button; the guest decides whether and when to stop."""
        await self.execute("system_powerdown")

    async def device_add(self, driver: str, device_id: str, **props: object) -> None:
        await self.execute("device_add", {"driver": driver, "id": device_id, **props})

    async def device_del(self, device_id: str) -> None:
        await self.execute("device_del", {"id": device_id})

    async def netdev_add(self, props: Mapping[str, object]) -> None:
        """``props`` as from ``TapNetwork.netdev_props()``: type, id and backend options."""
        await self.execute("netdev_add", dict(props))

    async def netdev_del(self, netdev_id: str) -> None:
        await self.execute("netdev_del", {"id": netdev_id})

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
            self._receiver = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None

"""VM control over QMP, with the ``qemu.qmp`` library. Nothing else talks to a running QEMU.

Library errors are translated here, once: a socket that can't be reached or drops is
``Unavailable``, a command that QEMU rejects is ``FailedPrecondition``, and a slow answer is
``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

from crivm.errors import DeadlineExceeded, FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 10.0


class QmpControl:
    """One QMP connection to one VM."""

    def __init__(self, vm_name: str) -> None:
        self._name = vm_name
        self._client = QMPClient(vm_name)
        # qemu.qmp logs every message at DEBUG; keep that out of crivm's debug logs.
        logging.getLogger("qemu.qmp").setLevel(logging.WARNING)

    async def connect(self, socket_path: str, timeout_s: float = 10.0) -> None:
        """Connect, retrying while QEMU has not created or opened the socket yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Connecting before QEMU made the socket only fills the log with library errors.
        while True:
            if os.path.exists(socket_path) or loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        while True:
            try:
                await asyncio.wait_for(self._client.connect(socket_path),
                                       max(0.1, deadline - loop.time()))
                return
            except (ConnectError, OSError) as exc:
                if loop.time() >= deadline:
                    raise Unavailable(
                        f"VM {self._name}: QMP socket {socket_path} not answering: {exc}"
                    ) from exc
            except TimeoutError as exc:
                raise DeadlineExceeded(f"VM {self._name}: QMP handshake timed out") from exc
            self._client = QMPClient(self._name)  # a failed connect leaves the client unusable
            await asyncio.sleep(0.05)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S) -> object:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout_s)
        except ExecuteError as exc:
            raise FailedPrecondition(f"VM {self._name}: QMP {command} failed: {exc}") from exc
        except (StateError, ExecInterruptedError, ConnectionError, EOFError) as exc:
            raise Unavailable(f"VM {self._name}: QMP connection lost during {command}") from exc
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"VM {self._name}: QMP {command} took over {timeout_s} s") from exc

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
        try:
            await self._client.disconnect()
        except (ConnectionError, EOFError, StateError) as exc:
            log.debug("VM %s: QMP disconnect: %s", self._name, exc)

"""The host's client of the in-guest agent (crivm.agent), over a unix socket.

The socket is QEMU's chardev socket behind the agent's virtio-serial port, or a proxy in front
of vsock. Each call has a deadline; a lost connection is re-established with backoff on the next
call. This is the one place where agent and transport errors become crivm.errors:

- an agent status code becomes the crivm error class with that code;
- a lost or unreachable agent becomes Unavailable;
- a call past its deadline becomes DeadlineExceeded.

Calls in flight when the connection drops are not retried: most change state in the guest, and
the host cannot know whether the agent acted on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from crivm import errors
from crivm.agent.rpc import Code, ConnectionLost, RpcClient, RpcError
from crivm.proto import agent_pb2 as pb

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
# wait_ready's pause between Checks stays short: a Check sent before the guest opens its port
# waits in QEMU and is answered as soon as the agent reads, but one that timed out is lost, and
# under TCG a 2 s backoff after it added up to 2 s (about 1 s on average) to every VM boot.
_READY_MAX_BACKOFF = 0.2

_ERRORS: Mapping[Code, type[errors.CrivmError]] = {
    Code.INVALID_ARGUMENT: errors.InvalidArgument,
    Code.NOT_FOUND: errors.NotFound,
    Code.ALREADY_EXISTS: errors.AlreadyExists,
    Code.FAILED_PRECONDITION: errors.FailedPrecondition,
    Code.PERMISSION_DENIED: errors.PermissionDenied,
    Code.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    Code.UNIMPLEMENTED: errors.Unimplemented,
    Code.UNAVAILABLE: errors.Unavailable,
    Code.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}

# A call's timeout: seconds, None for no deadline, or the client's default.
_DEFAULT: Any = object()


class AgentClient:
    def __init__(
        self,
        socket_path: str,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self._rpc: RpcClient | None = None
        self._connecting = asyncio.Lock()

    async def close(self) -> None:
        if self._rpc is not None:
            await self._rpc.close()
            self._rpc = None

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, time_limit: float) -> pb.CheckResponse:
        """Check the agent until it answers: the guest may still be booting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        backoff = _FIRST_BACKOFF
        while True:
            remaining = deadline - loop.time()
            try:
                return await self.check(time_limit=min(max(remaining, 0.01), 2.0))
            except (errors.Unavailable, errors.DeadlineExceeded) as exc:
                if loop.time() + backoff >= deadline:
                    raise errors.DeadlineExceeded(
                        f"agent at {self.socket_path} not ready after {time_limit:.0f} s: {exc}"
                    ) from exc
                # A timed-out Check may have left a connection nobody answers on; start afresh.
                await self.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _READY_MAX_BACKOFF)

    # ------------------------------------------------------------------------ health, details

    async def check(self, time_limit: float | None = _DEFAULT) -> pb.CheckResponse:
        return await self._call("Check", pb.CheckRequest(), pb.CheckResponse, time_limit)

    async def guest_details(self) -> pb.GetGuestDetailsResponse:
        request = pb.GetGuestDetailsRequest()
        return await self._call("GetGuestDetails", request, pb.GetGuestDetailsResponse)

    # ------------------------------------------------------------------------ lifecycle

    async def create_container(
        self,
        container_id: str,
        oci_spec: Mapping[str, Any] | bytes,
        rootfs_path: str,
        *,
        terminal: bool = False,
        stdin: bool = False,
    ) -> int:
        """Create the container in the guest; returns its init pid there."""
        raw = oci_spec if isinstance(oci_spec, bytes) else json.dumps(oci_spec).encode()
        request = pb.CreateContainerRequest(
            container_id=container_id,
            oci_spec_json=raw,
            rootfs_path=rootfs_path,
            terminal=terminal,
            stdin=stdin,
        )
        reply = await self._call("CreateContainer", request, pb.CreateContainerResponse)
        return reply.pid

    async def start_container(self, container_id: str) -> None:
        request = pb.StartContainerRequest(container_id=container_id)
        await self._call("StartContainer", request, pb.StartContainerResponse)

    async def remove_container(self, container_id: str, grace_seconds: int = 10) -> None:
        request = pb.RemoveContainerRequest(
            container_id=container_id, timeout_seconds=grace_seconds
        )
        await self._call(
            "RemoveContainer",
            request,
            pb.RemoveContainerResponse,
            self.call_timeout + grace_seconds,
        )

    async def exec_process(self, container_id: str, exec_id: str, process: pb.Process) -> int:
        request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id, process=process)
        return (await self._call("ExecProcess", request, pb.ExecProcessResponse)).pid

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, *, all_processes: bool = False
    ) -> None:
        request = pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
        )
        await self._call("SignalProcess", request, pb.SignalProcessResponse)

    async def wait_process(
        self, container_id: str, exec_id: str = "", time_limit: float | None = None
    ) -> tuple[int, int]:
        """(exit code, signal) once the process exits. No deadline unless one is given."""
        reply = await self.wait_process_reply(container_id, exec_id, time_limit)
        return reply.exit_code, reply.signal

    async def wait_process_reply(
        self, container_id: str, exec_id: str = "", time_limit: float | None = None
    ) -> pb.WaitProcessResponse:
        """The whole reply, with the OOM verdict too, once the process exits."""
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        return await self._call("WaitProcess", request, pb.WaitProcessResponse, time_limit)

    # ------------------------------------------------------------------------ stdio

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        request = pb.WriteStdinRequest(container_id=container_id, exec_id=exec_id, data=data)
        return (await self._call("WriteStdin", request, pb.WriteStdinResponse)).written

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        request = pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id)
        await self._call("CloseStdin", request, pb.CloseStdinResponse)

    def read_stdout(self, container_id: str, exec_id: str = "") -> AsyncIterator[bytes]:
        """The process's output until end of file. No deadline: output comes when it comes."""
        return self._read("ReadStdout", container_id, exec_id)

    def read_stderr(self, container_id: str, exec_id: str = "") -> AsyncIterator[bytes]:
        return self._read("ReadStderr", container_id, exec_id)

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        request = pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, columns=columns
        )
        await self._call("TtyWinResize", request, pb.TtyWinResizeResponse)

    # ------------------------------------------------------------------------ network

    async def update_interfaces(self, interfaces: Iterable[pb.Interface]) -> list[pb.Interface]:
        request = pb.UpdateInterfacesRequest(interfaces=interfaces)
        reply = await self._call("UpdateInterfaces", request, pb.UpdateInterfacesResponse)
        return list(reply.interfaces)

    async def update_routes(self, routes: Iterable[pb.Route]) -> None:
        request = pb.UpdateRoutesRequest(routes=routes)
        await self._call("UpdateRoutes", request, pb.UpdateRoutesResponse)

    async def add_arp_neighbors(self, neighbors: Iterable[pb.ARPNeighbor]) -> None:
        request = pb.AddARPNeighborsRequest(neighbors=neighbors)
        await self._call("AddARPNeighbors", request, pb.AddARPNeighborsResponse)

    async def set_dns(
        self,
        nameservers: Iterable[str],
        searches: Iterable[str] = (),
        options: Iterable[str] = (),
    ) -> None:
        request = pb.SetDNSRequest(nameservers=nameservers, searches=searches, options=options)
        await self._call("SetDNS", request, pb.SetDNSResponse)

    async def set_sysctls(self, sysctls: Mapping[str, str]) -> None:
        await self._call("SetSysctls", pb.SetSysctlsRequest(sysctls=dict(sysctls)),
                         pb.SetSysctlsResponse)

    # ------------------------------------------------------------------------ mounts, stats

    async def mount(
        self,
        source: str,
        target: str,
        fstype: str = "virtiofs",
        options: Iterable[str] = (),
        *,
        read_only: bool = False,
    ) -> None:
        request = pb.MountRequest(
            source=source, target=target, fstype=fstype, options=options, read_only=read_only
        )
        await self._call("Mount", request, pb.MountResponse)

    async def unmount(self, target: str) -> None:
        await self._call("Unmount", pb.UnmountRequest(target=target), pb.UnmountResponse)

    async def stats_container(self, container_id: str) -> pb.StatsContainerResponse:
        request = pb.StatsContainerRequest(container_id=container_id)
        return await self._call("StatsContainer", request, pb.StatsContainerResponse)

    # ------------------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        request: Message,
        reply_type: type[M],
        time_limit: float | None = _DEFAULT,
    ) -> M:
        if time_limit is _DEFAULT:
            time_limit = self.call_timeout
        loop = asyncio.get_running_loop()
        deadline = None if time_limit is None else loop.time() + time_limit
        try:
            rpc = await self._connection(deadline)
            async with asyncio.timeout_at(deadline):
                return await rpc.call(method, request, reply_type)
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(
                f"agent {method}: no reply within {time_limit:.1f} s"
            ) from exc
        except RpcError as exc:
            raise _translate(method, exc) from exc
        except ConnectionLost as exc:
            raise errors.Unavailable(f"agent {method}: {exc}") from exc

    async def _read(self, method: str, container_id: str, exec_id: str) -> AsyncIterator[bytes]:
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id)
        try:
            rpc = await self._connection(asyncio.get_running_loop().time() + self.call_timeout)
            # aclosing: a consumer that stops early cancels the call in the agent at once,
            # not whenever the generator happens to be collected.
            async with contextlib.aclosing(
                rpc.stream(method, request, pb.ReadStreamResponse)
            ) as messages:
                async for message in messages:
                    yield message.data
        except RpcError as exc:
            raise _translate(method, exc) from exc
        except ConnectionLost as exc:
            raise errors.Unavailable(f"agent {method}: {exc}") from exc

    async def _connection(self, deadline: float | None) -> RpcClient:
        """The current connection, or a new one made before `deadline` (loop time)."""
        async with self._connecting:
            if self._rpc is not None and not self._rpc.closed:
                return self._rpc
            if self._rpc is not None:
                await self._rpc.close()
                self._rpc = None
            self._rpc = RpcClient(*await self._open(deadline))
            return self._rpc

    async def _open(
        self, deadline: float | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.connect_timeout
        if deadline is not None:
            give_up = min(give_up, deadline)
        backoff = _FIRST_BACKOFF
        while True:
            try:
                async with asyncio.timeout_at(give_up):
                    return await asyncio.open_unix_connection(self.socket_path)
            except TimeoutError as exc:
                raise ConnectionLost(f"cannot connect to {self.socket_path} in time") from exc
            except OSError as exc:
                if loop.time() + backoff >= give_up:
                    raise ConnectionLost(
                        f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
                    ) from exc
                log.debug("agent socket %s: %s; retrying in %.2f s", self.socket_path, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)


def _translate(method: str, exc: RpcError) -> errors.CrivmError:
    return _ERRORS.get(exc.code, errors.CrivmError)(f"agent {method}: {exc.message}")

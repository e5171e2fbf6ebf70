"""The AgentService methods: thin, each one checks, calls the module that does the work, replies.

Errors are raised as crivm.agent.errors classes, which the RPC layer sends with their codes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator
from typing import Literal

from crivm import __version__
from crivm.agent import mounts, stats, sysctls
from crivm.agent.containers import Containers
from crivm.agent.errors import FailedPrecondition, GuestError
from crivm.agent.network import GuestNetwork
from crivm.agent.rpc import RpcServer
from crivm.agent.runc import Runc
from crivm.agent.stdio import OutputBuffer
from crivm.proto import agent_pb2 as pb

log = logging.getLogger(__name__)

_DEFAULT_REMOVE_GRACE = 10.0


class AgentService:
    def __init__(self, containers: Containers, runc: Runc, network: GuestNetwork) -> None:
        self._containers = containers
        self._runc = runc
        self._network = network

    def register(self, server: RpcServer) -> None:
        for name, request_type in [
            ("Check", pb.CheckRequest),
            ("GetGuestDetails", pb.GetGuestDetailsRequest),
            ("CreateContainer", pb.CreateContainerRequest),
            ("StartContainer", pb.StartContainerRequest),
            ("RemoveContainer", pb.RemoveContainerRequest),
            ("ExecProcess", pb.ExecProcessRequest),
            ("SignalProcess", pb.SignalProcessRequest),
            ("WaitProcess", pb.WaitProcessRequest),
            ("WriteStdin", pb.WriteStdinRequest),
            ("CloseStdin", pb.CloseStdinRequest),
            ("TtyWinResize", pb.TtyWinResizeRequest),
            ("UpdateInterfaces", pb.UpdateInterfacesRequest),
            ("UpdateRoutes", pb.UpdateRoutesRequest),
            ("AddARPNeighbors", pb.AddARPNeighborsRequest),
            ("SetDNS", pb.SetDNSRequest),
            ("SetSysctls", pb.SetSysctlsRequest),
            ("Mount", pb.MountRequest),
            ("Unmount", pb.UnmountRequest),
            ("StatsContainer", pb.StatsContainerRequest),
        ]:
            server.add_unary(name, request_type, getattr(self, name))
        server.add_stream("ReadStdout", pb.ReadStreamRequest, self.ReadStdout)
        server.add_stream("ReadStderr", pb.ReadStreamRequest, self.ReadStderr)

    # ------------------------------------------------------------------------ health, details

    async def Check(self, request: pb.CheckRequest) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING, agent_version=__version__)

    async def GetGuestDetails(
        self, request: pb.GetGuestDetailsRequest
    ) -> pb.GetGuestDetailsResponse:
        meminfo = _meminfo()
        return pb.GetGuestDetailsResponse(
            agent_version=__version__,
            kernel_release=os.uname().release,
            mem_total_bytes=meminfo.get("MemTotal", 0),
            mem_available_bytes=meminfo.get("MemAvailable", 0),
            online_cpus=len(os.sched_getaffinity(0)),
            cgroup_version=stats.cgroup_version(),
            runc_version=await self._runc.version(),
        )

    # ------------------------------------------------------------------------ lifecycle

    async def CreateContainer(
        self, request: pb.CreateContainerRequest
    ) -> pb.CreateContainerResponse:
        process = await self._containers.create(request)
        return pb.CreateContainerResponse(pid=process.pid)

    async def StartContainer(self, request: pb.StartContainerRequest) -> pb.StartContainerResponse:
        await self._containers.start(request.container_id)
        return pb.StartContainerResponse()

    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest
    ) -> pb.RemoveContainerResponse:
        grace = float(request.timeout_seconds) or _DEFAULT_REMOVE_GRACE
        await self._containers.remove(request.container_id, grace)
        return pb.RemoveContainerResponse()

    async def ExecProcess(self, request: pb.ExecProcessRequest) -> pb.ExecProcessResponse:
        process = await self._containers.exec(
            request.container_id, request.exec_id, request.process
        )
        return pb.ExecProcessResponse(pid=process.pid)

    async def SignalProcess(self, request: pb.SignalProcessRequest) -> pb.SignalProcessResponse:
        await self._containers.signal(
            request.container_id, request.exec_id, request.signal, request.all
        )
        return pb.SignalProcessResponse()

    async def WaitProcess(self, request: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        code, signal, oom = await self._containers.wait(request.container_id, request.exec_id)
        return pb.WaitProcessResponse(exit_code=code, signal=signal, oom_killed=oom)

    # ------------------------------------------------------------------------ stdio

    async def WriteStdin(self, request: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        stdin = self._containers.process(request.container_id, request.exec_id).io.stdin
        if stdin is None or stdin.closed:
            raise FailedPrecondition("the process has no open stdin")
        try:
            written = await stdin.write(request.data)
        except OSError as exc:
            raise FailedPrecondition(f"writing stdin: {exc}") from exc
        return pb.WriteStdinResponse(written=written)

    async def CloseStdin(self, request: pb.CloseStdinRequest) -> pb.CloseStdinResponse:
        await self._containers.process(request.container_id, request.exec_id).io.close_stdin()
        return pb.CloseStdinResponse()

    async def ReadStdout(
        self, request: pb.ReadStreamRequest
    ) -> AsyncGenerator[pb.ReadStreamResponse, None]:
        async for chunk in self._read(request, "stdout"):
            yield chunk

    async def ReadStderr(
        self, request: pb.ReadStreamRequest
    ) -> AsyncGenerator[pb.ReadStreamResponse, None]:
        async for chunk in self._read(request, "stderr"):
            yield chunk

    async def _read(
        self, request: pb.ReadStreamRequest, which: Literal["stdout", "stderr"]
    ) -> AsyncGenerator[pb.ReadStreamResponse, None]:
        io = self._containers.process(request.container_id, request.exec_id).io
        buffer: OutputBuffer = io.stdout if which == "stdout" else io.stderr
        while data := await buffer.read():
            yield pb.ReadStreamResponse(data=data)

    async def TtyWinResize(self, request: pb.TtyWinResizeRequest) -> pb.TtyWinResizeResponse:
        io = self._containers.process(request.container_id, request.exec_id).io
        io.resize(request.rows, request.columns)
        return pb.TtyWinResizeResponse()

    # ------------------------------------------------------------------------ network

    async def UpdateInterfaces(
        self, request: pb.UpdateInterfacesRequest
    ) -> pb.UpdateInterfacesResponse:
        configured = await self._network.update_interfaces(request.interfaces)
        return pb.UpdateInterfacesResponse(interfaces=configured)

    async def UpdateRoutes(self, request: pb.UpdateRoutesRequest) -> pb.UpdateRoutesResponse:
        await self._network.update_routes(request.routes)
        return pb.UpdateRoutesResponse()

    async def AddARPNeighbors(
        self, request: pb.AddARPNeighborsRequest
    ) -> pb.AddARPNeighborsResponse:
        await self._network.add_arp_neighbors(request.neighbors)
        return pb.AddARPNeighborsResponse()

    async def SetDNS(self, request: pb.SetDNSRequest) -> pb.SetDNSResponse:
        await self._network.set_dns(request)
        return pb.SetDNSResponse()

    async def SetSysctls(self, request: pb.SetSysctlsRequest) -> pb.SetSysctlsResponse:
        await asyncio.to_thread(sysctls.apply, dict(request.sysctls))
        return pb.SetSysctlsResponse()

    # ------------------------------------------------------------------------ mounts, stats

    async def Mount(self, request: pb.MountRequest) -> pb.MountResponse:
        await asyncio.to_thread(mounts.mount, request)
        return pb.MountResponse()

    async def Unmount(self, request: pb.UnmountRequest) -> pb.UnmountResponse:
        await asyncio.to_thread(mounts.unmount, request.target)
        return pb.UnmountResponse()

    async def StatsContainer(self, request: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        self._containers.get(request.container_id)
        path = self._containers.cgroup_path(request.container_id)
        try:
            return await asyncio.to_thread(stats.container_stats, path)
        except OSError as exc:
            raise GuestError(f"reading stats of {request.container_id}: {exc}") from exc


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            number = rest.split()
            if number and number[0].isdigit():
                values[key] = int(number[0]) * (1024 if rest.strip().endswith("kB") else 1)
    return values

"""RuntimeConfig: the cgroup driver kubelet must match."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon


async def handle(
    daemon: Daemon, request: api_pb2.RuntimeConfigRequest
) -> api_pb2.RuntimeConfigResponse:
    driver = (
        api_pb2.CgroupDriver.SYSTEMD
        if daemon.config.cgroup_manager == "systemd"
        else api_pb2.CgroupDriver.CGROUPFS
    )
    return api_pb2.RuntimeConfigResponse(
        linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver)
    )

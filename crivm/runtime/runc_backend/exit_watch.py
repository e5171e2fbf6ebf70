"""In-memory liveness of containers: one pidfd per container's conmon.

conmon lives from ``runc create`` until it has written the container's exit file, so while
its pidfd is not readable the container has not exited, and ContainerStatus and
ListContainers can say so without touching the file system. When conmon exits, the event
loop drops the watch and the next status reads the exit file once, as before.

A container without a watch (over the cap, or seen before this daemon started and not
re-watched) takes the file-checking path; the watches only ever make a call cheaper.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

log = logging.getLogger(__name__)

# Each watch holds one fd; leave most of the daemon's fd budget to sockets and pipes.
MAX_WATCHES = 4096


def _watch_cap() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_WATCHES
    return min(MAX_WATCHES, soft // 4)


class ExitWatches:
    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._cap = _watch_cap()

    def watch(self, container_id: str, conmon_pid: int) -> None:
        """Watch ``conmon_pid``, which the caller knows to be this container's live conmon."""
        if container_id in self._fds or conmon_pid <= 0 or len(self._fds) >= self._cap:
            return
        try:
            fd = os.pidfd_open(conmon_pid)
        except OSError:
            return  # gone already, or no pidfds: status reads the files
        self._fds[container_id] = fd
        asyncio.get_running_loop().add_reader(fd, self.forget, container_id)

    def monitor_alive(self, container_id: str) -> bool:
        """True only while a watched conmon runs, i.e. the container has not exited."""
        return container_id in self._fds

    def forget(self, container_id: str) -> None:
        fd = self._fds.pop(container_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for container_id in list(self._fds):
            self.forget(container_id)

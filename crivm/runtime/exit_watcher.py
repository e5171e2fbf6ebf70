"""The daemon's "exit_watcher" component: notices containers that exit on their own.

Backends report a container's state when asked (runc: conmon's exit file); nothing tells the
daemon the moment a process dies. While someone follows GetContainerEvents, this polls every
live container once a second through ``refresh_container``, which records the exit and
publishes the stopped event. Without subscribers it stays idle: the CRI calls that read state
refresh it themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from crivm.errors import CrivmError
from crivm.runtime.backend import CONTAINER_EXITED
from crivm.runtime.events import EventBus
from crivm.runtime.records import refresh_container

if TYPE_CHECKING:
    from crivm.runtime.daemon import Daemon

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class ExitWatcher:
    def __init__(self, daemon: Daemon, interval_s: float = POLL_INTERVAL_S) -> None:
        self._daemon = daemon
        self._interval_s = interval_s
        self._task = asyncio.create_task(self._run(), name="crivm-exit-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            bus = self._daemon.components.get("events")
            if not (isinstance(bus, EventBus) and bus.has_subscribers):
                continue
            try:
                await self.poll()
            except Exception:  # keep watching: one bad round must not end the task
                log.exception("polling container states failed")

    async def poll(self) -> None:
        store = self._daemon.store
        for ctr in store.list_containers():
            if ctr.state == CONTAINER_EXITED:
                continue
            pod = store.get_pod(ctr.pod_id)
            if pod is None:
                continue
            try:
                await refresh_container(self._daemon, pod, ctr)
            except CrivmError as exc:
                # The next round tries again; a removal racing with us is the usual cause.
                log.debug("could not refresh container %s: %s", ctr.id, exc,
                          extra={"container_id": ctr.id, "pod_id": pod.id})

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def open_component(daemon: Daemon) -> ExitWatcher:
    """The daemon's opener for the "exit_watcher" component (see crivm.runtime.daemon)."""
    return ExitWatcher(daemon)

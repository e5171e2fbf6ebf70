"""The vm backend as the daemon sees it: pods in QEMU VMs, containers run by the in-guest agent.

The backend is imported only when the daemon creates it: ``crivm-shim`` (a process per runtime
call conmon makes) and the pod supervisor (one per VM pod, relaying every container's stdio)
import ``agent_client`` from this package and must not pay for pyroute2 and the rest of the
daemon side in memory and start-up time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crivm.runtime.config import Config, RuntimeHandler
    from crivm.runtime.vm_backend.backend import VmBackend


def create_backend(name: str, handler: RuntimeHandler, config: Config) -> VmBackend:
    from crivm.runtime.vm_backend.backend import VmBackend

    return VmBackend(name, handler, config)


__all__ = ["create_backend"]

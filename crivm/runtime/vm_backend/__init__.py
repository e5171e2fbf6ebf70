"""The vm backend as the daemon sees it: pods in QEMU VMs, containers run by the in-guest agent."""

from __future__ import annotations

from crivm.runtime.config import Config, RuntimeHandler
from crivm.runtime.vm_backend.backend import VmBackend


def create_backend(name: str, handler: RuntimeHandler, config: Config) -> VmBackend:
    return VmBackend(name, handler, config)


__all__ = ["VmBackend", "create_backend"]

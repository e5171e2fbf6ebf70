"""The oci backend: trusted pods as runc containers around a pause infra container."""

from __future__ import annotations

from crivm.runtime.config import Config, RuntimeHandler
from crivm.runtime.runc_backend.backend import RuncBackend


def create_backend(name: str, handler: RuntimeHandler, config: Config) -> RuncBackend:
    return RuncBackend(name, handler, config)


__all__ = ["RuncBackend", "create_backend"]

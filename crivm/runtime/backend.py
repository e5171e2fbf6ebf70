"""The runtime backend interface, and the registry that picks one per pod.

A backend runs a pod's infrastructure and its containers. ``runtime_type`` in
``[runtimes.<handler>]`` names the implementation; handlers never ``isinstance``-check a
backend. Each implementation lives in its own package (``runc_backend``, ``vm_backend``) and
registers a factory in ``BACKEND_FACTORIES``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from crivm.errors import InvalidArgument

if TYPE_CHECKING:
    from crivm.runtime.config import Config, RuntimeHandler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """A CRI condition: ``ok`` plus, when it is false, a reason and a message."""

    ok: bool
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class HandlerFeatures:
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False


class RuntimeBackend(Protocol):
    """What every backend provides to the daemon. Pod/container lifecycle methods are added
    by the backends' issue work; the CRI layer reaches them only through this protocol."""

    runtime_type: str

    def readiness(self) -> Readiness:
        """Whether this backend can run pods on this host right now."""
        ...

    def features(self) -> HandlerFeatures:
        ...


# runtime_type -> "module:factory"; a factory takes (handler name, handler config, Config).
BACKEND_FACTORIES: dict[str, str] = {
    "oci": "crivm.runtime.runc_backend:create_backend",
    "vm": "crivm.runtime.vm_backend:create_backend",
}

Factory = Callable[[str, "RuntimeHandler", "Config"], RuntimeBackend]


@dataclass
class HandlerRegistry:
    """The configured handlers, each with its backend instance."""

    config: Config
    backends: dict[str, RuntimeBackend] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> HandlerRegistry:
        registry = cls(config)
        for name, handler in config.runtimes.items():
            factory = _load_factory(handler.runtime_type)
            registry.backends[name] = (
                factory(name, handler, config) if factory else _Missing(handler.runtime_type)
            )
        return registry

    def get(self, name: str) -> RuntimeBackend:
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(sorted(self.backends))
            raise InvalidArgument(
                f"unknown runtime handler {name!r}; configured handlers: {known}"
            ) from None

    def resolve(self, runtime_handler: str, annotations: dict[str, str]) -> str:
        """The handler name a pod runs on, from its RuntimeClass handler and trust annotations.

        An explicit RuntimeClass handler wins. Otherwise the pod is untrusted when the CRI-O
        annotation says ``TrustedSandbox: "false"``, the containerd one says
        ``untrusted-workload: "true"``, or the default trust is untrusted.
        """
        if runtime_handler:
            self.get(runtime_handler)
            return runtime_handler
        trusted = self.config.default_workload_trust == "trusted"
        if annotations.get("io.kubernetes.cri-o.TrustedSandbox", "").lower() == "false":
            trusted = False
        elif annotations.get("io.kubernetes.cri-o.TrustedSandbox", "").lower() == "true":
            trusted = True
        if annotations.get("io.kubernetes.cri.untrusted-workload", "").lower() == "true":
            trusted = False
        name = self.config.default_runtime if trusted else self.config.untrusted_runtime
        self.get(name)
        return name


@dataclass
class _Missing:
    """A backend whose implementation is not part of this build: reports not ready."""

    runtime_type: str

    def readiness(self) -> Readiness:
        return Readiness(
            False, "BackendMissing", f"the {self.runtime_type!r} backend is not built yet"
        )

    def features(self) -> HandlerFeatures:
        return HandlerFeatures()


def _load_factory(runtime_type: str) -> Factory | None:
    module_name, _, attr = BACKEND_FACTORIES[runtime_type].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            log.warning("runtime type %s is not available in this build", runtime_type)
            return None
        raise
    factory: Factory | None = getattr(module, attr, None)
    return factory

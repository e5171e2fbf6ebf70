"""The runtime backend interface, and the registry that picks one per pod.

A backend runs a pod's infrastructure and its containers. ``runtime_type`` in
``[runtimes.<handler>]`` names the implementation; handlers never ``isinstance``-check a
backend. Each implementation lives in its own package (``runc_backend``, ``vm_backend``) and
registers a factory in ``BACKEND_FACTORIES``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from crivm.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from crivm.proto import api_pb2
    from crivm.runtime.config import Config, RuntimeHandler
    from crivm.runtime.stats.sample import ResourceSample
    from crivm.runtime.store import ContainerRecord, PodRecord, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """A CRI condition: ``ok`` plus, when it is false, a reason and a message."""

    ok: bool
    reason: str = ""
    message: str = ""


def binaries_readiness(binaries: Iterable[tuple[str, str]]) -> Readiness:
    """Ready unless one of the (what, path) executables a backend runs is missing."""
    for what, path in binaries:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return Readiness(False, "RuntimeBinaryMissing", f"{what} {path} is not installed")
    return Readiness(True)


@dataclass(frozen=True)
class HandlerFeatures:
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False


# Container states as the store records them; the CRI layer maps them to ContainerState.
CONTAINER_CREATED = "created"
CONTAINER_RUNNING = "running"
CONTAINER_EXITED = "exited"
CONTAINER_UNKNOWN = "unknown"
# Pod states as the store records them.
POD_READY = "ready"
POD_NOTREADY = "notready"


@dataclass(frozen=True)
class ImageSettings:
    """What a container inherits from its image's config (OCI image-spec ``config``)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""

    @classmethod
    def from_oci_config(cls, image_config: Mapping[str, Any]) -> ImageSettings:
        """From an OCI/docker image config JSON object (the one holding ``config``)."""
        inner = image_config.get("config") or {}
        return cls(
            entrypoint=tuple(inner.get("Entrypoint") or ()),
            cmd=tuple(inner.get("Cmd") or ()),
            env=tuple(inner.get("Env") or ()),
            working_dir=inner.get("WorkingDir") or "",
            user=inner.get("User") or "",
            stop_signal=inner.get("StopSignal") or "",
        )


@dataclass(frozen=True)
class SandboxRequest:
    """A pod to start. The CRI layer has made its store row and its network namespace.

    CNI ADD may still be running in that namespace when the backend starts: it takes as long
    as creating the runc infra container (~100-150 ms each, mostly plugin and runc execs), so
    RunPodSandbox runs the two at once. A backend awaits ``ips()`` where it needs the
    addresses; a failed ADD raises there, inside the backend's own undo steps.
    """

    pod: PodRecord
    config: api_pb2.PodSandboxConfig
    # The pinned network namespace; "" when the pod uses the host network.
    netns_path: str
    # The pod's addresses from CNI, IPv4 first; see ips().
    addresses: asyncio.Future[tuple[str, ...]]

    async def ips(self) -> tuple[str, ...]:
        # Shielded: a cancelled RunPodSandbox must not cancel a CNI ADD halfway; the CRI
        # layer waits for it to end and then runs DEL.
        return await asyncio.shield(self.addresses)


@dataclass(frozen=True)
class ContainerRequest:
    """A container to create in a running pod, on a rootfs the image service has mounted."""

    pod: PodRecord
    pod_config: api_pb2.PodSandboxConfig
    container: ContainerRecord
    config: api_pb2.ContainerConfig
    image: ImageSettings
    rootfs: str


@dataclass(frozen=True)
class ContainerStatus:
    """A container's life as the backend observed it; times in ns since the epoch, 0 = never."""

    state: str
    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class BackendServices:
    """What the daemon lends a backend when it opens: the store and the components."""

    store: Store
    components: Mapping[str, Any]


class RuntimeBackend(Protocol):
    """What every backend provides to the daemon; the CRI layer reaches pods and containers
    only through this protocol, whatever runs them.

    Division of work: the CRI layer owns ids, store rows, the pod network (netns + CNI) and
    container rootfs mounts, because they are the same for every backend. A backend owns the
    processes: the pod's infrastructure, each container's runtime state, its log and exit.
    Methods that create things return a JSON-able dict the CRI layer merges into the row's
    ``extra``; methods that take a record read their own state back from that ``extra``.
    Stop and remove of something already gone succeed.
    """

    runtime_type: str

    def readiness(self) -> Readiness:
        """Whether this backend can run pods on this host right now."""
        ...

    def features(self) -> HandlerFeatures:
        ...

    def details(self) -> dict[str, Any]:
        """What Status reports about this handler in verbose mode, beyond its readiness."""
        ...

    async def recover(self, services: BackendServices) -> None:
        """Called once when the daemon opens, before any other lifecycle call: keep
        ``services`` and reconcile the store's pods and containers of this handler with what
        is really running (a container that exited while the daemon was down becomes exited)."""
        ...

    async def start_sandbox(self, request: SandboxRequest) -> dict[str, Any]:
        """Start the pod's infrastructure; on failure leave nothing behind."""
        ...

    async def stop_sandbox(self, pod: PodRecord) -> None:
        """Stop the infrastructure (the containers are already stopped); idempotent."""
        ...

    async def remove_sandbox(self, pod: PodRecord) -> None:
        """Delete what start_sandbox made; idempotent."""
        ...

    async def sandbox_alive(self, pod: PodRecord) -> bool:
        """Whether the pod's infrastructure still runs."""
        ...

    async def create_container(self, request: ContainerRequest) -> dict[str, Any]:
        """Create (not start) the container; on failure leave nothing behind."""
        ...

    async def start_container(
        self, pod: PodRecord, container: ContainerRecord
    ) -> dict[str, Any]:
        """Start a created container; fields to add to its row's ``extra`` (may be empty)."""
        ...

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout_s: float
    ) -> None:
        """The image's stop signal (else SIGTERM), then SIGKILL after ``timeout_s``."""
        ...

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        ...

    async def container_status(
        self, pod: PodRecord, container: ContainerRecord
    ) -> ContainerStatus:
        ...

    def known_running(self, container: ContainerRecord) -> bool:
        """True when the backend knows without any I/O that this container, recorded as
        running, still runs (its conmon is watched and alive). ListContainers then skips
        ``container_status`` for it; False means "ask"."""
        ...

    async def exec_sync(
        self,
        pod: PodRecord,
        container: ContainerRecord,
        cmd: list[str],
        timeout_s: float,
        max_output: int,
    ) -> ExecResult:
        """Run ``cmd`` in the container; ``timeout_s`` 0 means none. Output past
        ``max_output`` bytes per stream is cut off."""
        ...

    async def update_resources(
        self,
        pod: PodRecord,
        container: ContainerRecord,
        resources: api_pb2.LinuxContainerResources,
    ) -> None:
        ...

    async def reopen_log(self, pod: PodRecord, container: ContainerRecord) -> None:
        ...

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> ResourceSample | None:
        """The container's counters now (cgroup for runc; the agent's StatsContainer for a
        VM pod, i.e. the guest's figures). None when nothing can be measured (no cgroup)."""
        ...

    async def sandbox_stats(self, pod: PodRecord) -> ResourceSample | None:
        """The whole pod as the host sees it: the pod cgroup for runc; for a VM pod the VMM's
        own host usage (QEMU, virtiofsd, shims). The CRI layer adds the network counters."""
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
    """A backend whose implementation is not part of this build: reports not ready, and
    every lifecycle call is UNAVAILABLE."""

    runtime_type: str

    def readiness(self) -> Readiness:
        return Readiness(
            False, "BackendMissing", f"the {self.runtime_type!r} backend is not built yet"
        )

    def features(self) -> HandlerFeatures:
        return HandlerFeatures()

    def details(self) -> dict[str, Any]:
        return {}

    async def recover(self, services: BackendServices) -> None:
        return None

    def _refuse(self) -> NoReturn:
        raise Unavailable(f"the {self.runtime_type!r} backend is not part of this build")

    async def start_sandbox(self, request: SandboxRequest) -> dict[str, Any]:
        self._refuse()

    async def stop_sandbox(self, pod: PodRecord) -> None:
        self._refuse()

    async def remove_sandbox(self, pod: PodRecord) -> None:
        self._refuse()

    async def sandbox_alive(self, pod: PodRecord) -> bool:
        return False

    async def create_container(self, request: ContainerRequest) -> dict[str, Any]:
        self._refuse()

    async def start_container(
        self, pod: PodRecord, container: ContainerRecord
    ) -> dict[str, Any]:
        self._refuse()

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout_s: float
    ) -> None:
        self._refuse()

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        self._refuse()

    async def container_status(
        self, pod: PodRecord, container: ContainerRecord
    ) -> ContainerStatus:
        return ContainerStatus(state=CONTAINER_UNKNOWN)

    def known_running(self, container: ContainerRecord) -> bool:
        return False

    async def exec_sync(
        self,
        pod: PodRecord,
        container: ContainerRecord,
        cmd: list[str],
        timeout_s: float,
        max_output: int,
    ) -> ExecResult:
        self._refuse()

    async def update_resources(
        self,
        pod: PodRecord,
        container: ContainerRecord,
        resources: api_pb2.LinuxContainerResources,
    ) -> None:
        self._refuse()

    async def reopen_log(self, pod: PodRecord, container: ContainerRecord) -> None:
        self._refuse()

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> ResourceSample | None:
        return None

    async def sandbox_stats(self, pod: PodRecord) -> ResourceSample | None:
        return None


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

"""The daemon's StreamBackend: finds the container's pod and hands the session to the pod's
runtime backend; port-forward connects inside the pod's network namespace, or through the
backend's ``port_forward_connect(pod, port) -> socket`` when it has one (a VM pod's ports are
in its guest).

Exec and attach need process plumbing only a runtime backend has (runc with a console
socket, conmon's attach socket, a VM agent). A backend offers it with two coroutines,
``exec_stream(pod, ctr, cmd, stdio) -> exit code`` and ``attach_stream(pod, ctr, stdio)``;
one that does not is answered UNIMPLEMENTED rather than pretending.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from crivm.errors import FailedPrecondition, Unimplemented
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, pod_of, require_container, require_pod
from crivm.runtime.store import ContainerRecord, PodRecord
from crivm.runtime.streaming.backend import ByteSink, ByteSource, Stdio
from crivm.runtime.streaming.portforward import connect_in_netns, forward_socket


class ContainerStreaming(Protocol):
    async def exec_stream(
        self, pod: PodRecord, ctr: ContainerRecord, cmd: list[str], stdio: Stdio
    ) -> int: ...

    async def attach_stream(self, pod: PodRecord, ctr: ContainerRecord, stdio: Stdio) -> None: ...


class RuntimeStreams:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _method(self, container_id: str, name: str) -> tuple[
        Callable[..., Awaitable[Any]], PodRecord, ContainerRecord
    ]:
        ctr = require_container(self.daemon, container_id)
        pod = pod_of(self.daemon, ctr)
        backend = backend_of(self.daemon, pod)
        method = getattr(backend, name, None)
        if method is None:
            raise Unimplemented(
                f"the {backend.runtime_type!r} runtime does not support streaming {name}"
            )
        return method, pod, ctr

    async def exec(self, container_id: str, cmd: Sequence[str], stdio: Stdio) -> int:
        method, pod, ctr = self._method(container_id, "exec_stream")
        code: int = await method(pod, ctr, list(cmd), stdio)
        return code

    async def attach(self, container_id: str, stdio: Stdio) -> None:
        method, pod, ctr = self._method(container_id, "attach_stream")
        await method(pod, ctr, stdio)

    async def port_forward(
        self, pod_id: str, port: int, source: ByteSource, sink: ByteSink
    ) -> None:
        pod = require_pod(self.daemon, pod_id)
        # A VM pod's ports are in its guest, not in its netns: its backend connects.
        connect = getattr(backend_of(self.daemon, pod), "port_forward_connect", None)
        if connect is not None:
            await forward_socket(await connect(pod, port), source, sink)
            return
        netns_path = str(pod.extra.get("netns_path", ""))
        if not netns_path and not _host_network(pod):
            raise FailedPrecondition(f"pod sandbox {pod_id} has no network namespace")
        sock = await connect_in_netns(netns_path, port)
        await forward_socket(sock, source, sink)


def _host_network(pod: PodRecord) -> bool:
    # A pod on the host network has no netns of its own: its ports are the host's.
    return "netns_path" in pod.extra

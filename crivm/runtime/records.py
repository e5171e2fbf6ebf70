"""Finding pods and containers by (possibly truncated) id, and keeping container rows in step
with what their backend observes. Shared by the CRI call modules.

Container rows are read and written through ``containers(daemon)`` (see ``container_view``),
never through the store directly, so the in-memory view stays in step."""

from __future__ import annotations

import logging
import secrets

from crivm.errors import InvalidArgument, NotFound
from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.backend import CONTAINER_EXITED, RuntimeBackend
from crivm.runtime.container_view import ContainerView
from crivm.runtime.daemon import Daemon
from crivm.runtime.store import ContainerRecord, PodRecord

log = logging.getLogger(__name__)

VIEW_COMPONENT = "container_view"


def new_id() -> str:
    """64 hex characters, like every CRI runtime's ids."""
    return secrets.token_hex(32)


def find_pod(daemon: Daemon, id_or_prefix: str) -> PodRecord | None:
    if not id_or_prefix:
        raise InvalidArgument("a pod sandbox id is required")
    exact = daemon.store.get_pod(id_or_prefix)
    if exact is not None:
        return exact
    found = daemon.store.find_pods(id_or_prefix)
    if len(found) > 1:
        raise InvalidArgument(f"pod sandbox id prefix {id_or_prefix!r} is ambiguous")
    return found[0] if found else None


def require_pod(daemon: Daemon, id_or_prefix: str) -> PodRecord:
    pod = find_pod(daemon, id_or_prefix)
    if pod is None:
        raise NotFound(f"pod sandbox {id_or_prefix} not found")
    return pod


def containers(daemon: Daemon) -> ContainerView:
    """The daemon's container view, loaded on first use: the backends have reconciled the
    store by then (they recover before the server takes calls)."""
    view: ContainerView | None = daemon.components.get(VIEW_COMPONENT)
    if view is None:
        view = ContainerView(daemon.store)
        daemon.components[VIEW_COMPONENT] = view
    return view


def find_container(daemon: Daemon, id_or_prefix: str) -> ContainerRecord | None:
    if not id_or_prefix:
        raise InvalidArgument("a container id is required")
    view = containers(daemon)
    exact = view.get(id_or_prefix)
    if exact is not None:
        return exact
    found = view.find(id_or_prefix)
    if len(found) > 1:
        raise InvalidArgument(f"container id prefix {id_or_prefix!r} is ambiguous")
    return found[0] if found else None


def require_container(daemon: Daemon, id_or_prefix: str) -> ContainerRecord:
    ctr = find_container(daemon, id_or_prefix)
    if ctr is None:
        raise NotFound(f"container {id_or_prefix} not found")
    return ctr


def backend_of(daemon: Daemon, pod: PodRecord) -> RuntimeBackend:
    return daemon.handlers.get(pod.handler)


def pod_of(daemon: Daemon, ctr: ContainerRecord) -> PodRecord:
    pod = daemon.store.get_pod(ctr.pod_id)
    if pod is None:  # the foreign key makes this impossible short of a corrupt store
        raise NotFound(f"pod sandbox {ctr.pod_id} of container {ctr.id} not found")
    return pod


def settled(backend: RuntimeBackend, ctr: ContainerRecord) -> bool:
    """The row is the container's state without asking: exited (final), or running by the
    backend's own watch. Callers that walk many rows check this before awaiting
    ``refresh_container``: a coroutine per row was most of a 200-row ListContainers."""
    return ctr.state == CONTAINER_EXITED or backend.known_running(ctr)


async def refresh_container(
    daemon: Daemon, pod: PodRecord, ctr: ContainerRecord
) -> ContainerRecord:
    """The row with the backend's current view applied (and saved when it changed). An
    exited container never changes again, so it costs nothing, and neither does a running
    one whose backend knows it still runs."""
    backend = backend_of(daemon, pod)
    if settled(backend, ctr):
        return ctr
    status = await backend.container_status(pod, ctr)
    if status.state == ctr.state:
        return ctr
    fields = {
        "state": status.state,
        "finished_at": status.finished_at,
        "exit_code": status.exit_code,
        "reason": status.reason,
        "message": status.message,
    }
    updated = containers(daemon).update(ctr.id, **fields)
    if status.state == CONTAINER_EXITED:
        events.emit_container(daemon, pod.id, ctr.id, api_pb2.CONTAINER_STOPPED_EVENT)
    log.info("container %s is now %s", ctr.id, status.state,
             extra={"container_id": ctr.id, "pod_id": pod.id})
    return updated if updated is not None else ctr

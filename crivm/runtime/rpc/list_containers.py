"""ListContainers, filtered by id prefix, pod id prefix, state and labels."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime import wire
from crivm.runtime.backend import RuntimeBackend
from crivm.runtime.cri_messages import container_config, container_state, labels_match
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, refresh_container, settled
from crivm.runtime.store import PodRecord


async def handle(daemon: Daemon, request: api_pb2.ListContainersRequest) -> wire.Encoded:
    return wire.Encoded(b"".join(await encoded_items(daemon, request.filter)))


async def encoded_items(daemon: Daemon, wanted: api_pb2.ContainerFilter) -> list[bytes]:
    """The matching containers, each encoded as an element of the ``containers`` field
    (``ContainerView.item``), in creation order."""
    view = containers(daemon)
    pods: dict[str, tuple[PodRecord, RuntimeBackend] | None] = {}
    items = []
    for ctr in view.all():
        if wanted.id and not ctr.id.startswith(wanted.id):
            continue
        if wanted.pod_sandbox_id and not ctr.pod_id.startswith(wanted.pod_sandbox_id):
            continue
        # Parsing the config only for a selector: kubelet lists without one, 200 rows at a time.
        if wanted.label_selector and not labels_match(
            container_config(ctr).labels, wanted.label_selector
        ):
            continue
        if ctr.pod_id not in pods:
            found = daemon.store.get_pod(ctr.pod_id)
            pods[ctr.pod_id] = (found, backend_of(daemon, found)) if found else None
        pod_and_backend = pods[ctr.pod_id]
        if pod_and_backend is None:  # removed while this call waited on another's status
            continue
        pod, backend = pod_and_backend
        if not settled(backend, ctr):
            ctr = await refresh_container(daemon, pod, ctr)
        if wanted.HasField("state") and wanted.state.state != container_state(ctr):
            continue
        items.append(view.item(ctr))
    return items

"""ContainerView against a real SQLite store: every write reaches both, reads need no SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from crivm.errors import StoreError
from crivm.proto import api_pb2
from crivm.runtime.container_view import CONTAINERS_FIELD, STATUS_FIELD, ContainerView
from crivm.runtime.cri_messages import container_status
from crivm.runtime.store import ContainerRecord, PodRecord, Store


def _store(tmp_path: Path) -> Store:
    store = Store.open(tmp_path / "state.db")
    config = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="p"))
    for pod_id in ("pod-a", "pod-b"):
        store.add_pod(PodRecord(id=pod_id, name=pod_id, namespace="n", uid=pod_id, attempt=0,
                                handler="runc", state="ready", created_at=1,
                                config=config.SerializeToString()))
    return store


def _container(ctr_id: str, pod_id: str, created_at: int) -> ContainerRecord:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=ctr_id), labels={"app": ctr_id}
    )
    return ContainerRecord(id=ctr_id, pod_id=pod_id, name=ctr_id, attempt=0, image_ref="img",
                           image_id="sha256:1", state="created", created_at=created_at,
                           config=config.SerializeToString())


def test_view_loads_in_creation_order_and_writes_through(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add_container(_container("c2", "pod-a", 2))
    store.add_container(_container("c1", "pod-a", 1))
    view = ContainerView(store)
    assert [c.id for c in view.all()] == ["c1", "c2"]

    view.add(_container("c3", "pod-b", 3))
    updated = view.update("c3", state="running", extra={"pid": 7})
    assert updated is not None and updated.state == "running"
    stored = store.get_container("c3")
    assert stored is not None and stored.state == "running" and stored.extra == {"pid": 7}
    assert view.get("c3") == stored
    assert [c.id for c in view.of_pod("pod-b")] == ["c3"]
    assert [c.id for c in view.find("c")] == ["c1", "c2", "c3"]

    view.delete("c1")
    assert store.get_container("c1") is None and view.get("c1") is None
    store.delete_pod("pod-a")
    view.forget_pod("pod-a")
    assert [c.id for c in view.all()] == [c.id for c in store.list_containers()] == ["c3"]


def test_cached_item_follows_row_changes(tmp_path: Path) -> None:
    view = ContainerView(_store(tmp_path))
    view.add(_container("c1", "pod-a", 1))
    row = view.get("c1")
    assert row is not None
    first = view.item(row)
    assert view.item(row) is first
    # The element decodes as a one-item ListContainersResponse, and as a StreamContainers one.
    listed = api_pb2.ListContainersResponse.FromString(first).containers
    assert [c.id for c in listed] == ["c1"]
    assert listed[0].state == api_pb2.CONTAINER_CREATED and listed[0].labels["app"] == "c1"
    streamed = api_pb2.StreamContainersResponse.FromString(first).containers
    assert streamed[0] == listed[0]
    running = view.update("c1", state="running")
    assert running is not None
    (item,) = api_pb2.ListContainersResponse.FromString(view.item(running)).containers
    assert item.state == api_pb2.CONTAINER_RUNNING


def test_cached_status_is_the_status_response(tmp_path: Path) -> None:
    view = ContainerView(_store(tmp_path))
    view.add(_container("c1", "pod-a", 1))
    row = view.get("c1")
    assert row is not None
    assert view.status(row) is view.status(row)
    decoded = api_pb2.ContainerStatusResponse.FromString(view.status(row))
    assert decoded == api_pb2.ContainerStatusResponse(status=container_status(row))
    exited = view.update("c1", state="exited", exit_code=3, reason="Error")
    assert exited is not None
    status = api_pb2.ContainerStatusResponse.FromString(view.status(exited)).status
    assert (status.state, status.exit_code, status.reason) == (
        api_pb2.CONTAINER_EXITED, 3, "Error")


def test_container_field_numbers() -> None:
    assert api_pb2.ContainerStatusResponse.DESCRIPTOR.fields_by_name["status"].number == (
        STATUS_FIELD)
    for response in (api_pb2.ListContainersResponse, api_pb2.StreamContainersResponse):
        assert response.DESCRIPTOR.fields_by_name["containers"].number == CONTAINERS_FIELD


def test_failed_store_write_leaves_the_view_alone(tmp_path: Path) -> None:
    view = ContainerView(_store(tmp_path))
    view.add(_container("c1", "pod-a", 1))
    with pytest.raises(StoreError):
        view.add(_container("c1", "pod-a", 2))  # duplicate id
    with pytest.raises(StoreError):
        view.add(_container("c9", "no-such-pod", 3))  # foreign key
    assert [c.id for c in view.all()] == ["c1"]

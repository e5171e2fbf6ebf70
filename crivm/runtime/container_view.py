"""Every container row in memory, written through to the store.

ContainerStatus and ListContainers are the calls kubelet makes most; reading 200 rows
from SQLite and decoding their JSON took ~35 us a row, and building each row's CRI message
as much again. The view loads the rows once (after the backends' recovery, on the first
call that needs it) and is then kept in step by the CRI call modules, which write container
rows only through it (``records.py``). The store stays the source of truth: a write goes to
the store first and reaches the view only when it succeeded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from crivm.runtime import wire
from crivm.runtime.cri_messages import container, container_status
from crivm.runtime.store import ContainerRecord, Store

# The field number of ``containers`` in ListContainersResponse and StreamContainersResponse.
CONTAINERS_FIELD = 1
# The field number of ``status`` in ContainerStatusResponse.
STATUS_FIELD = 1
_ENCODINGS = ("item", "status")


class ContainerView:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Insertion order is creation order: the store's rows come sorted by created_at,
        # and a new container is created after every one already here.
        self._rows = {ctr.id: ctr for ctr in store.list_containers()}
        # A row's encoded CRI messages (see ``item`` and ``status``) by (kind, id): made on
        # first use, dropped when the row changes.
        self._encoded: dict[tuple[str, str], bytes] = {}

    def get(self, container_id: str) -> ContainerRecord | None:
        return self._rows.get(container_id)

    def find(self, prefix: str) -> list[ContainerRecord]:
        return [ctr for ctr_id, ctr in self._rows.items() if ctr_id.startswith(prefix)]

    def all(self) -> list[ContainerRecord]:
        return list(self._rows.values())

    def of_pod(self, pod_id: str) -> list[ContainerRecord]:
        return [ctr for ctr in self._rows.values() if ctr.pod_id == pod_id]

    def item(self, ctr: ContainerRecord) -> bytes:
        """The row as an encoded element of ListContainersResponse.containers (field 1, as
        in StreamContainersResponse); see ``crivm.runtime.wire``."""
        return self._encoding("item", ctr, CONTAINERS_FIELD, container)

    def status(self, ctr: ContainerRecord) -> bytes:
        """The row as an encoded ContainerStatusResponse without verbose info (building it
        parses the container's config: ~60 us)."""
        return self._encoding("status", ctr, STATUS_FIELD, container_status)

    def _encoding(self, kind: str, ctr: ContainerRecord, field_number: int,
                  build: Callable[[ContainerRecord], Message]) -> bytes:
        key = (kind, ctr.id)
        current = self._rows.get(ctr.id) is ctr
        cached = self._encoded.get(key) if current else None
        if cached is None:
            cached = wire.field_element(field_number, build(ctr))
            if current:
                self._encoded[key] = cached
        return cached

    def _forget_encodings(self, container_id: str) -> None:
        for kind in _ENCODINGS:
            self._encoded.pop((kind, container_id), None)

    def add(self, ctr: ContainerRecord) -> None:
        self._store.add_container(ctr)
        self._rows[ctr.id] = ctr

    def update(self, container_id: str, **fields: Any) -> ContainerRecord | None:
        """Write ``fields``; the updated row (None if the view has no such row)."""
        self._store.update_container(container_id, **fields)
        self._forget_encodings(container_id)
        current = self._rows.get(container_id)
        if current is None:
            return None
        updated = dataclasses.replace(current, **fields)
        self._rows[container_id] = updated
        return updated

    def delete(self, container_id: str) -> None:
        self._store.delete_container(container_id)
        self._rows.pop(container_id, None)
        self._forget_encodings(container_id)

    def forget_pod(self, pod_id: str) -> None:
        """After the pod's row was deleted: the store dropped its containers (cascade)."""
        for ctr in self.of_pod(pod_id):
            self._rows.pop(ctr.id, None)
            self._forget_encodings(ctr.id)

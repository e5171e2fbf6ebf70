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
from typing import Any

from crivm.runtime import wire
from crivm.runtime.cri_messages import container
from crivm.runtime.store import ContainerRecord, Store

# The field number of ``containers`` in ListContainersResponse and StreamContainersResponse.
CONTAINERS_FIELD = 1


class ContainerView:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Insertion order is creation order: the store's rows come sorted by created_at,
        # and a new container is created after every one already here.
        self._rows = {ctr.id: ctr for ctr in store.list_containers()}
        # A row's ListContainers item, encoded on first listing, dropped when the row changes.
        self._items: dict[str, bytes] = {}

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
        cached = self._items.get(ctr.id)
        if cached is None or self._rows.get(ctr.id) is not ctr:
            cached = wire.field_element(CONTAINERS_FIELD, container(ctr))
            if self._rows.get(ctr.id) is ctr:
                self._items[ctr.id] = cached
        return cached

    def add(self, ctr: ContainerRecord) -> None:
        self._store.add_container(ctr)
        self._rows[ctr.id] = ctr

    def update(self, container_id: str, **fields: Any) -> ContainerRecord | None:
        """Write ``fields``; the updated row (None if the view has no such row)."""
        self._store.update_container(container_id, **fields)
        self._items.pop(container_id, None)
        current = self._rows.get(container_id)
        if current is None:
            return None
        updated = dataclasses.replace(current, **fields)
        self._rows[container_id] = updated
        return updated

    def delete(self, container_id: str) -> None:
        self._store.delete_container(container_id)
        self._rows.pop(container_id, None)
        self._items.pop(container_id, None)

    def forget_pod(self, pod_id: str) -> None:
        """After the pod's row was deleted: the store dropped its containers (cascade)."""
        for ctr in self.of_pod(pod_id):
            self._rows.pop(ctr.id, None)
            self._items.pop(ctr.id, None)

import sqlite3
from pathlib import Path

import pytest

from crivm.errors import StoreError
from crivm.runtime.store import ContainerRecord, PodRecord, Store


def pod(pod_id: str = "a" * 64, name: str = "web") -> PodRecord:
    return PodRecord(
        id=pod_id,
        name=name,
        namespace="default",
        uid="u1",
        attempt=0,
        handler="runc",
        state="SANDBOX_READY",
        created_at=1,
        config=b"\x01",
        extra={"netns": "/run/crivm/netns/x"},
    )


def container(ctr_id: str, pod_id: str = "a" * 64) -> ContainerRecord:
    return ContainerRecord(
        id=ctr_id,
        pod_id=pod_id,
        name="c",
        attempt=0,
        image_ref="busybox",
        image_id="sha256:1",
        state="CONTAINER_CREATED",
        created_at=2,
        config=b"",
    )


def test_records_survive_reopen(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state.db", {"core": "crivm.runtime.store:CORE_MIGRATIONS"})
    store.add_pod(pod())
    store.add_container(container("c" * 64))
    store.update_container("c" * 64, state="CONTAINER_RUNNING", extra={"pid": 42})
    store.close()

    store = Store.open(tmp_path / "state.db", {"core": "crivm.runtime.store:CORE_MIGRATIONS"})
    assert store.get_pod("a" * 64) == pod()
    ctr = store.get_container("c" * 64)
    assert ctr is not None and ctr.state == "CONTAINER_RUNNING" and ctr.extra == {"pid": 42}
    assert [p.id for p in store.find_pods("aaa")] == ["a" * 64]
    assert store.find_pods("b") == []
    assert store.schema_version("core") == 2


def test_prefix_search_treats_wildcards_literally(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db", {"core": "crivm.runtime.store:CORE_MIGRATIONS"})
    store.add_pod(pod())
    assert store.find_pods("%") == []
    assert store.find_pods("_") == []


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db", {"core": "crivm.runtime.store:CORE_MIGRATIONS"})
    store.add_pod(pod())
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        conn.execute("UPDATE pods SET state = 'SANDBOX_NOTREADY'")
        conn.execute("INSERT INTO pods (id) VALUES (NULL)")  # violates NOT NULL
    got = store.get_pod("a" * 64)
    assert got is not None and got.state == "SANDBOX_READY"


def test_duplicate_pod_is_rejected_and_store_stays_usable(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db", {"core": "crivm.runtime.store:CORE_MIGRATIONS"})
    store.add_pod(pod())
    with pytest.raises(StoreError):
        store.add_pod(pod())
    store.add_pod(pod("b" * 64, name="other"))
    assert len(store.list_pods()) == 2


def test_removing_a_pod_removes_its_containers(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db", {"core": "crivm.runtime.store:CORE_MIGRATIONS"})
    store.add_pod(pod())
    store.add_container(container("c" * 64))
    store.delete_pod("a" * 64)
    assert store.list_containers() == []


MIGRATIONS_V1 = ["CREATE TABLE t (a INTEGER)"]
MIGRATIONS_V2 = [*MIGRATIONS_V1, "ALTER TABLE t ADD COLUMN b TEXT"]
MIGRATIONS_BAD = [*MIGRATIONS_V2, "ALTER TABLE t ADD COLUMN c TEXT; THIS IS NOT SQL"]


def test_migrations_apply_in_order_and_a_bad_one_rolls_back(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    Store.open(db, {"x": f"{__name__}:MIGRATIONS_V1"}).close()
    store = Store.open(db, {"x": f"{__name__}:MIGRATIONS_V2"})
    assert store.schema_version("x") == 2
    store.close()
    with pytest.raises(sqlite3.OperationalError):
        Store.open(db, {"x": f"{__name__}:MIGRATIONS_BAD"})
    store = Store.open(db, {"x": f"{__name__}:MIGRATIONS_V2"})
    assert store.schema_version("x") == 2
    columns = [r[1] for r in store.query("PRAGMA table_info(t)")]
    assert columns == ["a", "b"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    Store.open(db, {"x": f"{__name__}:MIGRATIONS_V2"}).close()
    with pytest.raises(StoreError, match="refusing to downgrade"):
        Store.open(db, {"x": f"{__name__}:MIGRATIONS_V1"})


def test_pod_reads_are_cached_until_the_pod_is_written(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state.db")
    pod = PodRecord(id="p1", name="p", namespace="n", uid="u", attempt=0, handler="runc",
                    state="notready", created_at=1, config=b"")
    store.add_pod(pod)
    first = store.get_pod("p1")
    assert first is not None and store.get_pod("p1") is first
    store.update_pod("p1", state="ready", extra={"ips": ["10.0.0.2"]})
    updated = store.get_pod("p1")
    assert updated is not None
    assert (updated.state, updated.extra) == ("ready", {"ips": ["10.0.0.2"]})
    store.delete_pod("p1")
    assert store.get_pod("p1") is None
    store.add_pod(pod)  # the same id again (a restore, a test) is read afresh
    again = store.get_pod("p1")
    assert again is not None and again.state == "notready"

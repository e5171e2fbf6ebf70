"""The state store: one SQLite database (WAL) under ``root``.

Each component owns its tables and a list of migrations. The store records, per component,
how many of that component's migrations have run, and applies the rest on open, each inside
its own transaction, so a failed migration leaves the previous schema intact. Components
register their migrations in ``COMPONENTS`` below; a component's list only ever grows.

Calls are synchronous: a WAL write with ``synchronous=NORMAL`` costs well under a millisecond,
cheaper than a hop to a thread. Every write goes through ``transaction()``, which rolls back
on any exception, so a failed write leaves the store consistent.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crivm.errors import StoreError

log = logging.getLogger(__name__)

# component name -> "module:ATTRIBUTE" holding that component's list of migration scripts.
COMPONENTS: dict[str, str] = {
    "core": "crivm.runtime.store:CORE_MIGRATIONS",
    "storage": "crivm.storage.schema:MIGRATIONS",
}

CORE_MIGRATIONS: list[str] = [
    # 1: pods and containers. `config` holds the serialized CRI config message; `extra` is a
    # JSON object for backend-specific state (netns path, VM pid, conmon pid, ...).
    """
    CREATE TABLE pods (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        namespace   TEXT NOT NULL,
        uid         TEXT NOT NULL,
        attempt     INTEGER NOT NULL,
        handler     TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        config      BLOB NOT NULL,
        extra       TEXT NOT NULL DEFAULT '{}',
        UNIQUE (name, namespace, uid, attempt)
    );
    CREATE TABLE containers (
        id          TEXT PRIMARY KEY,
        pod_id      TEXT NOT NULL REFERENCES pods(id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        attempt     INTEGER NOT NULL,
        image_ref   TEXT NOT NULL,
        image_id    TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        started_at  INTEGER NOT NULL DEFAULT 0,
        finished_at INTEGER NOT NULL DEFAULT 0,
        exit_code   INTEGER NOT NULL DEFAULT 0,
        reason      TEXT NOT NULL DEFAULT '',
        message     TEXT NOT NULL DEFAULT '',
        config      BLOB NOT NULL,
        extra       TEXT NOT NULL DEFAULT '{}',
        UNIQUE (pod_id, name, attempt)
    );
    CREATE INDEX containers_pod ON containers(pod_id);
    """,
    # 2: the runtime-wide settings kubelet pushes (UpdateRuntimeConfig).
    """
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
]


@dataclass(frozen=True)
class PodRecord:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    handler: str
    state: str
    created_at: int
    config: bytes
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ContainerRecord:
    id: str
    pod_id: str
    name: str
    attempt: int
    image_ref: str
    image_id: str
    state: str
    created_at: int
    config: bytes
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def now_ns() -> int:
    return time.time_ns()


class Store:
    """The open state database. Use ``Store.open(path)``; close with ``close()``."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        # Decoded pod rows by id. Every container call reads its pod (the pod's handler
        # picks the backend) and ListContainers one per pod; decoding a row (its config
        # blob, its extra JSON) took ~25 us. Pod writes go only through add_pod,
        # update_pod and delete_pod, which drop the entry; all of them and get_pod run on
        # the event loop without awaiting, so no write falls between a read and its
        # caching. A returned record is shared: do not modify it.
        self._pods: dict[str, PodRecord] = {}

    @classmethod
    def open(cls, path: Path, components: dict[str, str] | None = None) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state store {path}: {exc}") from exc
        store = cls(conn, path)
        store._migrate(COMPONENTS if components is None else components)
        return store

    def close(self) -> None:
        self._conn.close()

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self, components: dict[str, str]) -> None:
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions "
            "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        for component, target in components.items():
            migrations = _load_migrations(target)
            if migrations is None:
                continue
            current = self.schema_version(component)
            if current > len(migrations):
                raise StoreError(
                    f"state store {self.path} has {component} schema v{current}, newer than "
                    f"this crivm knows (v{len(migrations)}); refusing to downgrade"
                )
            for version in range(current + 1, len(migrations) + 1):
                log.info("migrating %s schema to v%d", component, version)
                with self.transaction() as conn:
                    for statement in _split_sql(migrations[version - 1]):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                        "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                        (component, version),
                    )

    def schema_version(self, component: str) -> int:
        row = self._conn.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        ).fetchone()
        return int(row[0]) if row else 0

    # -- generic access -------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; any exception rolls the whole transaction back."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"state store: cannot begin a transaction: {exc}") from exc
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._conn.execute("ROLLBACK")
            raise StoreError(f"state store: commit failed: {exc}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store query failed: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write in its own transaction; returns the number of rows changed."""
        try:
            with self.transaction() as conn:
                return conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"state store write failed: {exc}") from exc

    # -- pods -----------------------------------------------------------------------------

    def add_pod(self, pod: PodRecord) -> None:
        self._forget_pod(pod.id)
        self.execute(
            "INSERT INTO pods (id, name, namespace, uid, attempt, handler, state, created_at,"
            " config, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pod.id, pod.name, pod.namespace, pod.uid, pod.attempt, pod.handler, pod.state,
             pod.created_at, pod.config, json.dumps(pod.extra)),
        )

    def update_pod(self, pod_id: str, **fields: Any) -> None:
        try:
            self._update("pods", pod_id, fields)
        finally:
            self._forget_pod(pod_id)

    def get_pod(self, pod_id: str) -> PodRecord | None:
        cached = self._pods.get(pod_id)
        if cached is not None:
            return cached
        rows = self.query("SELECT * FROM pods WHERE id = ?", (pod_id,))
        if not rows:
            return None
        pod = self._pods[pod_id] = _pod(rows[0])
        return pod

    def _forget_pod(self, pod_id: str) -> None:
        self._pods.pop(pod_id, None)

    def find_pods(self, prefix: str) -> list[PodRecord]:
        """Pods whose id starts with ``prefix`` (crictl passes truncated ids)."""
        rows = self.query("SELECT * FROM pods WHERE id LIKE ? ESCAPE '\\'", (_like(prefix),))
        return [_pod(r) for r in rows]

    def list_pods(self) -> list[PodRecord]:
        return [_pod(r) for r in self.query("SELECT * FROM pods ORDER BY created_at")]

    def delete_pod(self, pod_id: str) -> None:
        try:
            self.execute("DELETE FROM pods WHERE id = ?", (pod_id,))
        finally:
            self._forget_pod(pod_id)

    # -- containers -----------------------------------------------------------------------

    def add_container(self, ctr: ContainerRecord) -> None:
        self.execute(
            "INSERT INTO containers (id, pod_id, name, attempt, image_ref, image_id, state,"
            " created_at, started_at, finished_at, exit_code, reason, message, config, extra)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ctr.id, ctr.pod_id, ctr.name, ctr.attempt, ctr.image_ref, ctr.image_id, ctr.state,
             ctr.created_at, ctr.started_at, ctr.finished_at, ctr.exit_code, ctr.reason,
             ctr.message, ctr.config, json.dumps(ctr.extra)),
        )

    def update_container(self, ctr_id: str, **fields: Any) -> None:
        self._update("containers", ctr_id, fields)

    def get_container(self, ctr_id: str) -> ContainerRecord | None:
        rows = self.query("SELECT * FROM containers WHERE id = ?", (ctr_id,))
        return _container(rows[0]) if rows else None

    def find_containers(self, prefix: str) -> list[ContainerRecord]:
        rows = self.query(
            "SELECT * FROM containers WHERE id LIKE ? ESCAPE '\\'", (_like(prefix),)
        )
        return [_container(r) for r in rows]

    def list_containers(self, pod_id: str | None = None) -> list[ContainerRecord]:
        if pod_id is None:
            rows = self.query("SELECT * FROM containers ORDER BY created_at")
        else:
            rows = self.query(
                "SELECT * FROM containers WHERE pod_id = ? ORDER BY created_at", (pod_id,)
            )
        return [_container(r) for r in rows]

    def delete_container(self, ctr_id: str) -> None:
        self.execute("DELETE FROM containers WHERE id = ?", (ctr_id,))

    # -- settings -------------------------------------------------------------------------

    def get_setting(self, key: str, default: str = "") -> str:
        rows = self.query("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else default

    def set_setting(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- helpers --------------------------------------------------------------------------

    def _update(self, table: str, row_id: str, fields: dict[str, Any]) -> None:
        if not fields:
            return
        if "extra" in fields:
            fields = {**fields, "extra": json.dumps(fields["extra"])}
        # Column names come from our own keyword arguments, never from a request.
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.execute(
            f"UPDATE {table} SET {assignments} WHERE id = ?",  # noqa: S608
            (*fields.values(), row_id),
        )


def _load_migrations(target: str) -> list[str] | None:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # the component is not part of this build yet
        raise
    migrations: list[str] = getattr(module, attr)
    return migrations


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _like(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _pod(row: sqlite3.Row) -> PodRecord:
    data = dict(row)
    data["extra"] = json.loads(data["extra"])
    return PodRecord(**data)


def _container(row: sqlite3.Row) -> ContainerRecord:
    data = dict(row)
    data["extra"] = json.loads(data["extra"])
    return ContainerRecord(**data)

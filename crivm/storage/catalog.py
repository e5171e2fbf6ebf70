"""Image, layer and rootfs records in the state store (tables in ``crivm.storage.schema``)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from crivm.runtime.store import Store, now_ns


@dataclass(frozen=True)
class LayerRecord:
    chain_id: str
    diff_id: str
    parent: str  # chain id of the layer below, "" for the bottom layer
    blob_digest: str  # the (compressed) blob it was unpacked from
    link_id: str  # short name under <storage>/l/, keeps overlay mount options short
    size: int


@dataclass(frozen=True)
class ImageRecord:
    id: str  # the config digest
    manifest_digest: str
    index_digest: str  # the manifest list / index it was picked from, "" if none
    size: int
    pinned: bool
    created_at: int
    config: dict[str, Any]
    layers: tuple[str, ...]  # chain ids, bottom first
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]


@dataclass(frozen=True)
class RootfsRecord:
    container_id: str
    image_id: str
    layers: tuple[str, ...]  # chain ids, bottom first


class Catalog:
    def __init__(self, store: Store) -> None:
        self._store = store

    # -- images ---------------------------------------------------------------------------

    def get_image(self, image_id: str) -> ImageRecord | None:
        rows = self._store.query("SELECT * FROM images WHERE id = ?", (image_id,))
        return self._image(rows[0]) if rows else None

    def list_images(self) -> list[ImageRecord]:
        rows = self._store.query("SELECT * FROM images ORDER BY created_at")
        return [self._image(row) for row in rows]

    def image_id_by_name(self, name: str) -> str | None:
        rows = self._store.query("SELECT image_id FROM image_names WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def image_ids_by_prefix(self, hex_prefix: str) -> list[str]:
        rows = self._store.query(
            "SELECT id FROM images WHERE substr(id, 8, ?) = ?", (len(hex_prefix), hex_prefix)
        )
        return [str(row[0]) for row in rows]

    def save_image(
        self, image: ImageRecord, names: list[tuple[str, str]], pinned: bool
    ) -> None:
        """Insert the image (or keep the existing row) and point ``names`` at it."""
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO images (id, manifest_digest, index_digest, size, pinned, created_at,"
                " config) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " pinned = max(pinned, excluded.pinned)",
                (image.id, image.manifest_digest, image.index_digest, image.size, int(pinned),
                 image.created_at, json.dumps(image.config)),
            )
            if not conn.execute(
                "SELECT 1 FROM image_layers WHERE image_id = ?", (image.id,)
            ).fetchone():
                conn.executemany(
                    "INSERT INTO image_layers (image_id, position, chain_id) VALUES (?, ?, ?)",
                    [(image.id, pos, chain) for pos, chain in enumerate(image.layers)],
                )
            conn.executemany(
                "INSERT INTO image_names (name, image_id, kind) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id",
                [(name, image.id, kind) for name, kind in names],
            )

    def remove_name(self, name: str) -> None:
        self._store.execute("DELETE FROM image_names WHERE name = ?", (name,))

    def remove_image(self, image_id: str) -> None:
        self._store.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def _image(self, row: sqlite3.Row) -> ImageRecord:
        image_id = str(row["id"])
        names = self._store.query(
            "SELECT name, kind FROM image_names WHERE image_id = ? ORDER BY name", (image_id,)
        )
        layers = self._store.query(
            "SELECT chain_id FROM image_layers WHERE image_id = ? ORDER BY position", (image_id,)
        )
        return ImageRecord(
            id=image_id,
            manifest_digest=str(row["manifest_digest"]),
            index_digest=str(row["index_digest"]),
            size=int(row["size"]),
            pinned=bool(row["pinned"]),
            created_at=int(row["created_at"]),
            config=json.loads(row["config"]),
            layers=tuple(str(r[0]) for r in layers),
            repo_tags=tuple(str(n[0]) for n in names if n[1] == "tag"),
            repo_digests=tuple(str(n[0]) for n in names if n[1] == "digest"),
        )

    # -- layers ---------------------------------------------------------------------------

    def get_layer(self, chain_id: str) -> LayerRecord | None:
        rows = self._store.query(
            "SELECT chain_id, diff_id, parent, blob_digest, link_id, size FROM layers"
            " WHERE chain_id = ?", (chain_id,),
        )
        return LayerRecord(*rows[0]) if rows else None

    def list_layers(self) -> list[LayerRecord]:
        rows = self._store.query(
            "SELECT chain_id, diff_id, parent, blob_digest, link_id, size FROM layers"
        )
        return [LayerRecord(*row) for row in rows]

    def add_layer(self, layer: LayerRecord) -> None:
        self._store.execute(
            "INSERT INTO layers (chain_id, diff_id, parent, blob_digest, link_id, size,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (layer.chain_id, layer.diff_id, layer.parent, layer.blob_digest, layer.link_id,
             layer.size, now_ns()),
        )

    def unreferenced_layers(self) -> list[LayerRecord]:
        """Layers that no image and no container rootfs holds."""
        rows = self._store.query(
            "SELECT chain_id, diff_id, parent, blob_digest, link_id, size FROM layers l"
            " WHERE NOT EXISTS (SELECT 1 FROM image_layers i WHERE i.chain_id = l.chain_id)"
            " AND NOT EXISTS (SELECT 1 FROM rootfs_layers r WHERE r.chain_id = l.chain_id)"
        )
        return [LayerRecord(*row) for row in rows]

    def layer_is_referenced(self, chain_id: str) -> bool:
        rows = self._store.query(
            "SELECT EXISTS (SELECT 1 FROM image_layers WHERE chain_id = ?)"
            " OR EXISTS (SELECT 1 FROM rootfs_layers WHERE chain_id = ?)", (chain_id, chain_id)
        )
        return bool(rows[0][0])

    def delete_layer(self, chain_id: str) -> None:
        self._store.execute("DELETE FROM layers WHERE chain_id = ?", (chain_id,))

    # -- container rootfs -----------------------------------------------------------------

    def add_rootfs(self, container_id: str, image_id: str, layers: tuple[str, ...]) -> None:
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO rootfs_mounts (container_id, image_id, created_at) VALUES (?, ?, ?)",
                (container_id, image_id, now_ns()),
            )
            conn.executemany(
                "INSERT INTO rootfs_layers (container_id, position, chain_id) VALUES (?, ?, ?)",
                [(container_id, pos, chain) for pos, chain in enumerate(layers)],
            )

    def get_rootfs(self, container_id: str) -> RootfsRecord | None:
        rows = self._store.query(
            "SELECT image_id FROM rootfs_mounts WHERE container_id = ?", (container_id,)
        )
        if not rows:
            return None
        layers = self._store.query(
            "SELECT chain_id FROM rootfs_layers WHERE container_id = ? ORDER BY position",
            (container_id,),
        )
        return RootfsRecord(container_id, str(rows[0][0]), tuple(str(r[0]) for r in layers))

    def list_rootfs(self) -> list[str]:
        return [str(r[0]) for r in self._store.query("SELECT container_id FROM rootfs_mounts")]

    def remove_rootfs(self, container_id: str) -> None:
        self._store.execute("DELETE FROM rootfs_mounts WHERE container_id = ?", (container_id,))

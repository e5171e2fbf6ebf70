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
    """The records. Only this class writes the image tables, so it keeps an in-memory view of
    the images and their names, read from the store in three queries and dropped on every
    change: ImageStatus, ListImages and CreateContainer's lookup then run no SQL. Records are
    shared between callers and must be treated as read-only."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._images: dict[str, ImageRecord] | None = None  # by id, oldest first
        self._names: dict[str, str] = {}  # tag or repo digest -> image id

    # -- images ---------------------------------------------------------------------------

    def get_image(self, image_id: str) -> ImageRecord | None:
        return self._view().get(image_id)

    def list_images(self) -> list[ImageRecord]:
        return list(self._view().values())

    def image_id_by_name(self, name: str) -> str | None:
        self._view()
        return self._names.get(name)

    def image_ids_by_prefix(self, hex_prefix: str) -> list[str]:
        # Ids are "sha256:<hex>"; the prefix is matched against the hex.
        return [image_id for image_id in self._view()
                if image_id[7:7 + len(hex_prefix)] == hex_prefix]

    def save_image(
        self, image: ImageRecord, names: list[tuple[str, str]], pinned: bool
    ) -> None:
        """Insert the image (or keep the existing row) and point ``names`` at it."""
        try:
            with self._store.transaction() as conn:
                conn.execute(
                    "INSERT INTO images (id, manifest_digest, index_digest, size, pinned,"
                    " created_at, config) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE"
                    " SET pinned = max(pinned, excluded.pinned)",
                    (image.id, image.manifest_digest, image.index_digest, image.size,
                     int(pinned), image.created_at, json.dumps(image.config)),
                )
                if not conn.execute(
                    "SELECT 1 FROM image_layers WHERE image_id = ?", (image.id,)
                ).fetchone():
                    conn.executemany(
                        "INSERT INTO image_layers (image_id, position, chain_id)"
                        " VALUES (?, ?, ?)",
                        [(image.id, pos, chain) for pos, chain in enumerate(image.layers)],
                    )
                conn.executemany(
                    "INSERT INTO image_names (name, image_id, kind) VALUES (?, ?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id",
                    [(name, image.id, kind) for name, kind in names],
                )
        finally:
            self._images = None

    def remove_name(self, name: str) -> None:
        try:
            self._store.execute("DELETE FROM image_names WHERE name = ?", (name,))
        finally:
            self._images = None

    def remove_image(self, image_id: str) -> None:
        try:
            self._store.execute("DELETE FROM images WHERE id = ?", (image_id,))
        finally:
            self._images = None

    def _view(self) -> dict[str, ImageRecord]:
        if self._images is not None:
            return self._images
        rows = self._store.query("SELECT * FROM images ORDER BY created_at")
        names: dict[str, list[sqlite3.Row]] = {}
        for row in self._store.query(
            "SELECT name, kind, image_id FROM image_names ORDER BY name"
        ):
            names.setdefault(str(row["image_id"]), []).append(row)
        layers: dict[str, list[str]] = {}
        for row in self._store.query(
            "SELECT image_id, chain_id FROM image_layers ORDER BY image_id, position"
        ):
            layers.setdefault(str(row["image_id"]), []).append(str(row["chain_id"]))
        images = {}
        for row in rows:
            image_id = str(row["id"])
            own_names = names.get(image_id, [])
            images[image_id] = ImageRecord(
                id=image_id,
                manifest_digest=str(row["manifest_digest"]),
                index_digest=str(row["index_digest"]),
                size=int(row["size"]),
                pinned=bool(row["pinned"]),
                created_at=int(row["created_at"]),
                config=json.loads(row["config"]),
                layers=tuple(layers.get(image_id, ())),
                repo_tags=tuple(str(n["name"]) for n in own_names if n["kind"] == "tag"),
                repo_digests=tuple(str(n["name"]) for n in own_names if n["kind"] == "digest"),
            )
        self._names = {str(n["name"]): image_id for image_id, listed in names.items()
                       for n in listed if image_id in images}
        self._images = images
        return images

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

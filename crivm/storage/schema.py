"""The storage component's tables, applied by ``crivm.runtime.store`` as component "storage".

The list only ever grows: a change to the schema is a new entry, never an edit. Statements are
split on ``;``, so none may contain one inside a string.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: images and their names, unpacked layers, and the rootfs of each container.
    """
    CREATE TABLE images (
        id              TEXT PRIMARY KEY,
        manifest_digest TEXT NOT NULL,
        index_digest    TEXT NOT NULL DEFAULT '',
        size            INTEGER NOT NULL,
        pinned          INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL,
        config          TEXT NOT NULL
    );
    CREATE TABLE image_names (
        name     TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        kind     TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
    );
    CREATE INDEX image_names_image ON image_names(image_id);
    CREATE TABLE layers (
        chain_id    TEXT PRIMARY KEY,
        diff_id     TEXT NOT NULL,
        parent      TEXT NOT NULL DEFAULT '',
        blob_digest TEXT NOT NULL,
        link_id     TEXT NOT NULL UNIQUE,
        size        INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE image_layers (
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        chain_id TEXT NOT NULL REFERENCES layers(chain_id),
        PRIMARY KEY (image_id, position)
    );
    CREATE INDEX image_layers_chain ON image_layers(chain_id);
    CREATE TABLE rootfs_mounts (
        container_id TEXT PRIMARY KEY,
        image_id     TEXT NOT NULL,
        created_at   INTEGER NOT NULL
    );
    CREATE TABLE rootfs_layers (
        container_id TEXT NOT NULL REFERENCES rootfs_mounts(container_id) ON DELETE CASCADE,
        position     INTEGER NOT NULL,
        chain_id     TEXT NOT NULL REFERENCES layers(chain_id),
        PRIMARY KEY (container_id, position)
    );
    CREATE INDEX rootfs_layers_chain ON rootfs_layers(chain_id);
    """,
]

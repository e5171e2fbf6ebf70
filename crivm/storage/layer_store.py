"""Unpacked layers, one directory per chain id, shared by every image that has that chain.

Layout under ``<root>/storage``::

    layers/<chain-id hex>/diff   the unpacked layer, in overlayfs form
    l/<link id>                  -> ../layers/<chain-id hex>/diff, a short name for mount options
    tmp/                         unpacks in progress

A layer is unpacked into ``tmp/`` and renamed into ``layers/`` only when complete, and recorded
in the catalog after that, so a crash never leaves a half layer visible: ``recover()`` at start
deletes whatever in ``layers/`` the catalog does not know.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from crivm.storage.blobs import DigestMismatch
from crivm.storage.catalog import Catalog, LayerRecord
from crivm.storage.layer_unpack import UnpackResult, unpack_layer

log = logging.getLogger(__name__)


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            text = f"{chains[-1]} {diff_id}".encode()
            chains.append(f"sha256:{hashlib.sha256(text).hexdigest()}")
    return chains


def _hex(digest: str) -> str:
    return digest.partition(":")[2]


class LayerStore:
    def __init__(self, storage_dir: Path, tmp_dir: Path, catalog: Catalog) -> None:
        self._layers_dir = storage_dir / "layers"
        self.links_dir = storage_dir / "l"
        self._tmp_dir = tmp_dir
        self._catalog = catalog
        for directory in (self._layers_dir, self.links_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def diff_dir(self, chain_id: str) -> Path:
        return self._layers_dir / _hex(chain_id) / "diff"

    def link_path(self, layer: LayerRecord) -> Path:
        return self.links_dir / layer.link_id

    async def unpack(
        self, chain_id: str, parent: str, diff_id: str, blob: Path, blob_digest: str,
        progress: Callable[[int], None],
    ) -> LayerRecord:
        """Unpack ``blob`` as layer ``chain_id``; the uncompressed stream must hash to diff_id."""
        work = Path(tempfile.mkdtemp(prefix="layer-", dir=self._tmp_dir))
        try:
            (work / "diff").mkdir(mode=0o755)
            result = await _unpack_in_thread(blob, work / "diff", progress)
            if result.diff_id != diff_id:
                raise DigestMismatch(
                    f"layer {blob_digest} unpacks to {result.diff_id}, but the image config "
                    f"says {diff_id}; discarded"
                )
            final = self._layers_dir / _hex(chain_id)
            if final.exists():
                # Left by a crash after the rename and before the catalog row: not trusted.
                await asyncio.to_thread(shutil.rmtree, final)
            os.rename(work, final)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        link_id = _new_link_id()
        temp_link = self.links_dir / f".{link_id}.tmp"
        temp_link.symlink_to(Path("..") / "layers" / _hex(chain_id) / "diff")
        os.replace(temp_link, self.links_dir / link_id)
        layer = LayerRecord(chain_id, diff_id, parent, blob_digest, link_id, result.size)
        self._catalog.add_layer(layer)
        log.info("unpacked layer %s (%d bytes) from %s", chain_id, result.size, blob_digest)
        return layer

    async def delete(self, layer: LayerRecord) -> None:
        """Forget the layer, then remove its files (renamed away first, so removal is atomic)."""
        self._catalog.delete_layer(layer.chain_id)
        self.link_path(layer).unlink(missing_ok=True)
        directory = self._layers_dir / _hex(layer.chain_id)
        if directory.exists():
            doomed = Path(tempfile.mkdtemp(prefix="gc-", dir=self._tmp_dir))
            os.rename(directory, doomed / "layer")
            await asyncio.to_thread(shutil.rmtree, doomed, True)
        log.info("removed layer %s", layer.chain_id)

    def recover(self) -> None:
        """At start: drop unpacks a crash interrupted, and links or dirs without a record."""
        known = {_hex(layer.chain_id): layer for layer in self._catalog.list_layers()}
        for entry in self._layers_dir.iterdir():
            if entry.name not in known:
                log.warning("removing layer directory %s that no record names", entry)
                shutil.rmtree(entry, ignore_errors=True)
        links = {layer.link_id for layer in known.values()}
        for link in self.links_dir.iterdir():
            if link.name not in links:
                link.unlink(missing_ok=True)
        for layer in known.values():
            if not self.diff_dir(layer.chain_id).is_dir():
                log.error("layer %s is recorded but its files are gone; remove the images "
                          "that use it and pull them again", layer.chain_id)


class _Stopped(Exception):
    """Raised inside the unpack thread to stop it when the pull was cancelled."""


async def _unpack_in_thread(
    blob: Path, dest: Path, progress: Callable[[int], None]
) -> UnpackResult:
    """Unpack in a worker thread; a cancelled caller stops the thread and waits for it, so the
    directory is no longer written to once this returns."""
    stop = threading.Event()

    def tick(count: int) -> None:
        if stop.is_set():
            raise _Stopped()
        progress(count)

    future = asyncio.ensure_future(asyncio.to_thread(unpack_layer, blob, dest, tick))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.gather(future, return_exceptions=True)
        raise


def _new_link_id() -> str:
    # 26 base32 characters, like containers/storage: unique, and short in mount options.
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=")

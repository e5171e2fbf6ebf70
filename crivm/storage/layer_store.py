"""Unpacked layers, one directory per chain id, shared by every image that has that chain.

Layout under ``<root>/storage``::

    layers/<chain-id hex>/diff   the unpacked layer, in overlayfs form
    l/<link id>                  -> ../layers/<chain-id hex>/diff, a short name for mount options
    tmp/                         unpacks in progress

A layer blob is never stored: it is unpacked into ``tmp/`` while it downloads, renamed into
``layers/`` only when complete and both its digests matched, and recorded in the catalog after
that, so a crash never leaves a half layer visible: ``recover()`` at start deletes whatever in
``layers/`` the catalog does not know.
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
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from crivm.storage.blobs import DigestMismatch
from crivm.storage.catalog import Catalog, LayerRecord
from crivm.storage.chunk_pipe import ChunkPipe
from crivm.storage.layer_unpack import UnpackResult, unpack_stream

log = logging.getLogger(__name__)

# The unpacking thread takes the download in batches of at least this many bytes (see
# chunk_pipe), and at most _PIPE_LIMIT wait for it before the download is held back.
_PIPE_BATCH = 1 << 20
_PIPE_LIMIT = 8 << 20


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
        self, chain_id: str, parent: str, diff_id: str, blob_digest: str, source: str,
        download: AsyncIterator[bytes], progress: Callable[[int], None],
    ) -> LayerRecord:
        """Unpack the blob ``download`` yields, as it arrives, as layer ``chain_id``. The blob
        must hash to ``blob_digest`` and its tar stream to ``diff_id``; the layer becomes
        visible only after both matched."""
        work = Path(tempfile.mkdtemp(prefix="layer-", dir=self._tmp_dir))
        try:
            (work / "diff").mkdir(mode=0o755)
            result = await _unpack_while_downloading(
                download, work / "diff", blob_digest, source, progress)
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


async def _unpack_while_downloading(
    download: AsyncIterator[bytes], dest: Path, blob_digest: str, source: str,
    progress: Callable[[int], None],
) -> UnpackResult:
    """Feed the download to an unpacking thread as it arrives. On any failure or cancellation
    the thread is stopped and waited for, so ``dest`` is no longer written to once this
    returns or raises."""
    pipe = ChunkPipe(batch=_PIPE_BATCH, limit=_PIPE_LIMIT)

    def unpack() -> UnpackResult:
        try:
            return unpack_stream(pipe.get, dest, blob_digest, source, check=pipe.check,
                                 progress=progress)
        finally:
            pipe.reader_done()

    thread = asyncio.ensure_future(asyncio.to_thread(unpack))
    try:
        async for chunk in download:
            if not await pipe.put(chunk):
                break  # the thread stopped early; its result says why
        pipe.close()
        return await asyncio.shield(thread)
    except BaseException:
        pipe.abort()
        await asyncio.gather(thread, return_exceptions=True)
        raise


def _new_link_id() -> str:
    # 26 base32 characters, like containers/storage: unique, and short in mount options.
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=")

"""The images component: what the ImageService RPCs and the runtime backends call.

Registered in the daemon as ``daemon.component("images")``. Everything lives under
``<root>/storage`` (see docs/storage.md) with records in the state store, so a new instance on
the same root, after a daemon restart, sees the same images, layers and container rootfs.

Backend API (runc and vm backends)::

    rootfs = await images.create_rootfs(image_ref_or_id, container_id)  # mounted overlay
    rootfs.path                      # merged dir: the OCI root.path / the virtio-fs export
    rootfs = await images.get_rootfs(container_id)  # existing one, remounted if needed
    await images.remove_rootfs(container_id)        # unmount, delete upper/work, GC layers
    record = await images.ensure_image(ref)         # pulled on demand (the pause image)
    config = images.image_config(ref_or_id)         # the OCI image config as a dict
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crivm.errors import AlreadyExists, InvalidArgument, NotFound
from crivm.runtime.config import Config
from crivm.runtime.store import Store
from crivm.storage import heap
from crivm.storage import rootfs as rootfs_mod
from crivm.storage.blobs import BlobStore
from crivm.storage.catalog import Catalog, ImageRecord
from crivm.storage.credentials import Credentials
from crivm.storage.disk_usage import FsUsage, measure
from crivm.storage.layer_store import LayerStore
from crivm.storage.pull import Puller, PullSettings
from crivm.storage.reference import ImageReference, looks_like_image_id, parse
from crivm.storage.rootfs import Rootfs

if TYPE_CHECKING:
    from crivm.runtime.daemon import Daemon

log = logging.getLogger(__name__)

_HEX_PREFIX_RE = re.compile(r"(?:sha256:)?([0-9a-f]{3,63})")


class ImageService:
    def __init__(self, config: Config, store: Store) -> None:
        self.storage_dir = Path(config.root) / "storage"
        self._tmp_dir = self.storage_dir / "tmp"
        self.containers_dir = self.storage_dir / "containers"
        self.containers_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._catalog = Catalog(store)
        self._blobs = BlobStore(self.storage_dir / "blobs", self._tmp_dir)
        self._layers = LayerStore(self.storage_dir, self._tmp_dir, self._catalog)
        self._empty_lower = self.storage_dir / "empty"
        self._empty_lower.mkdir(exist_ok=True, mode=0o755)
        settings = PullSettings(
            registries_conf=config.registries_conf,
            auth_file=config.auth_file,
            certs_dir=config.registry_certs_dir,
            progress_timeout=config.image_pull_progress_timeout_s,
        )
        self._puller = Puller(settings, self._blobs, self._layers, self._catalog)
        self._pause_image = config.pause_image
        self._gc_lock = asyncio.Lock()
        # Removed containers' dirs being deleted in the background (see _forget_rootfs).
        self._deletions: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, config: Config, store: Store) -> ImageService:
        service = cls(config, store)
        # Anything in tmp/ is an interrupted download or unpack.
        await asyncio.to_thread(shutil.rmtree, service._tmp_dir, True)
        service._tmp_dir.mkdir(mode=0o700)
        service._layers.recover()
        await service.collect_garbage()
        return service

    async def close(self) -> None:
        await self._puller.close()
        if self._deletions:
            await asyncio.gather(*self._deletions, return_exceptions=True)

    def observe_pulls(self, observer: Callable[[float, bool], None]) -> None:
        """Call ``observer(seconds, succeeded)`` after every pull."""
        self._puller.observers.append(observer)

    @property
    def bytes_downloaded(self) -> int:
        """Blob bytes fetched from registries since the daemon started."""
        return self._puller.bytes_downloaded

    # -- images ---------------------------------------------------------------------------

    async def pull(self, image: str, credentials: Credentials | None = None) -> ImageRecord:
        ref = parse(image)
        try:
            pulled = await self._puller.pull(ref, credentials or Credentials(), self._record)
        finally:
            # Shielded: a cancelled pull's blocks are freed too.
            await asyncio.shield(asyncio.to_thread(heap.return_freed_memory))
        record = self._catalog.get_image(pulled.id)
        assert record is not None, "the puller records the image before returning"
        return record

    async def _record(self, image: ImageRecord) -> None:
        names = [(tag, "tag") for tag in image.repo_tags]
        names += [(digest, "digest") for digest in image.repo_digests]
        pause = parse(self._pause_image)
        pinned = str(pause) in image.repo_tags + image.repo_digests or (
            pause.digest is not None and pause.with_digest(pause.digest) in image.repo_digests
        )
        self._catalog.save_image(image, names, pinned)

    def resolve(self, image: str) -> ImageRecord | None:
        """The image ``image`` names: an id (or unique id prefix), a tag, or a repo digest."""
        if not image:
            raise InvalidArgument("no image given")
        if looks_like_image_id(image):
            record = self._catalog.get_image("sha256:" + image.removeprefix("sha256:"))
            if record is not None:
                return record
        hex_prefix = _HEX_PREFIX_RE.fullmatch(image)
        try:
            ref = parse(image)
        except InvalidArgument:
            if hex_prefix is None:
                raise
            ref = None
        if ref is not None:
            image_id = self._catalog.image_id_by_name(_record_name(ref))
            if image_id is not None:
                return self._catalog.get_image(image_id)
        if hex_prefix is not None:
            matches = self._catalog.image_ids_by_prefix(hex_prefix.group(1))
            if len(matches) == 1:
                return self._catalog.get_image(matches[0])
            if len(matches) > 1:
                raise InvalidArgument(f"image id prefix {image!r} is ambiguous")
        return None

    def list_images(self) -> list[ImageRecord]:
        return self._catalog.list_images()

    async def ensure_image(self, image: str,
                           credentials: Credentials | None = None) -> ImageRecord:
        """The image if it is stored, else pulled now (how the pause image arrives)."""
        return self.resolve(image) or await self.pull(image, credentials)

    def image_config(self, image: str) -> dict[str, Any]:
        return self._require(image).config

    async def remove(self, image: str) -> None:
        """Remove by id, tag or digest. A tag of an image with other tags is only untagged.
        Removing what is not there succeeds."""
        record = self.resolve(image)
        if record is None:
            return
        ref = None if looks_like_image_id(image) else _parse_or_none(image)
        tag = ref.tagged() if ref is not None and not ref.digest else None
        if tag in record.repo_tags and len(record.repo_tags) > 1:
            self._catalog.remove_name(tag)
            log.info("untagged %s from image %s", image, record.id)
            return
        self._catalog.remove_image(record.id)
        for digest in (record.id, record.manifest_digest, record.index_digest):
            if digest:
                self._blobs.delete(digest)
        log.info("removed image %s (%s)", record.id, ", ".join(record.repo_tags) or "untagged")
        await self.collect_garbage()

    async def collect_garbage(self) -> None:
        """Delete layers no image, container or pull in progress uses."""
        async with self._gc_lock:
            for layer in self._catalog.unreferenced_layers():
                # Re-checked per layer: a pull or a create_rootfs may have claimed it meanwhile.
                if layer.chain_id in self._puller.chains_in_use:
                    continue
                if self._catalog.layer_is_referenced(layer.chain_id):
                    continue
                await self._layers.delete(layer)

    async def fs_info(self) -> tuple[FsUsage, FsUsage]:
        """Usage of the image store, and of the containers' writable layers."""
        image_dirs = [self.storage_dir / "layers", self.storage_dir / "blobs"]
        uppers = [self.containers_dir / cid / part
                  for cid in self._catalog.list_rootfs() for part in ("upper", "work")]
        images = await asyncio.to_thread(measure, self.storage_dir, image_dirs)
        containers = await asyncio.to_thread(measure, self.containers_dir, uppers)
        return images, containers

    # -- container rootfs -----------------------------------------------------------------

    async def create_rootfs(self, image: str, container_id: str) -> Rootfs:
        """Mount a new overlay rootfs of ``image`` for ``container_id``."""
        rootfs_mod.check_container_id(container_id)
        if self._catalog.get_rootfs(container_id) is not None:
            raise AlreadyExists(f"container {container_id} already has a rootfs")
        record = self._require(image)
        # No await between resolving the image and recording the rootfs: the rootfs rows
        # hold the layers against garbage collection from here on.
        self._catalog.add_rootfs(container_id, record.id, record.layers)
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(self._forget_rootfs, container_id)
            rootfs = self._layout(container_id, record.id, record.layers)
            await rootfs_mod.mount_overlay(rootfs, self._layers.links_dir)
            undo.pop_all()
        log.info("mounted rootfs of container %s (image %s) at %s", container_id, record.id,
                 rootfs.path, extra={"container_id": container_id})
        return rootfs

    async def get_rootfs(self, container_id: str) -> Rootfs:
        """The rootfs made earlier for ``container_id``, mounted again if it is not (reboot)."""
        found = self._catalog.get_rootfs(rootfs_mod.check_container_id(container_id))
        if found is None:
            raise NotFound(f"container {container_id} has no rootfs")
        rootfs = self._layout(container_id, found.image_id, found.layers)
        await rootfs_mod.mount_overlay(rootfs, self._layers.links_dir)
        return rootfs

    async def unmount_rootfs(self, container_id: str) -> None:
        """Unmount an exited container's rootfs and keep its writable layer, as containerd
        does at task delete: nothing reads the merged view of an exited container, and
        RemoveContainer is then left with a rename. ``get_rootfs`` mounts it again."""
        rootfs_mod.check_container_id(container_id)
        await rootfs_mod.unmount(rootfs_mod.container_dir(self.containers_dir, container_id)
                                 / "merged")

    async def remove_rootfs(self, container_id: str) -> None:
        """Unmount and delete the container's rootfs; succeeds if there is none."""
        rootfs_mod.check_container_id(container_id)
        await self._forget_rootfs(container_id)
        await self.collect_garbage()

    async def _forget_rootfs(self, container_id: str) -> None:
        await self.unmount_rootfs(container_id)
        # Deleting the writable layer file by file took 2-10 ms of every RemoveContainer;
        # moved into tmp/ it is gone from the container's name at once, is deleted in the
        # background, and a crash leaves it to the tmp/ sweep in open().
        aside = rootfs_mod.move_container_dir_aside(self.containers_dir, container_id,
                                                    self._tmp_dir)
        self._catalog.remove_rootfs(container_id)
        if aside is not None:
            task = asyncio.create_task(asyncio.to_thread(shutil.rmtree, aside, True))
            self._deletions.add(task)
            task.add_done_callback(self._deletions.discard)

    def _layout(self, container_id: str, image_id: str, chains: tuple[str, ...]) -> Rootfs:
        lowerdirs = []
        for chain in reversed(chains):
            layer = self._catalog.get_layer(chain)
            if layer is None:
                raise NotFound(f"layer {chain} of image {image_id} is missing from the store")
            lowerdirs.append(self._layers.link_path(layer))
        if not lowerdirs:
            lowerdirs.append(self._empty_lower)
        return rootfs_mod.layout(self.containers_dir, container_id, image_id, tuple(lowerdirs))

    def _require(self, image: str) -> ImageRecord:
        record = self.resolve(image)
        if record is None:
            raise NotFound(f"image {image} is not in the image store")
        return record


def _record_name(ref: ImageReference) -> str:
    """The name an image is recorded under: the repo digest if given, else the tag."""
    if ref.digest:
        return ref.with_digest(ref.digest)
    return ref.tagged() or str(ref)


def _parse_or_none(image: str) -> ImageReference | None:
    try:
        return parse(image)
    except InvalidArgument:
        return None


async def open_component(daemon: Daemon) -> ImageService:
    """The daemon's opener for the "images" component (see crivm.runtime.daemon)."""
    return await ImageService.open(daemon.config, daemon.store)

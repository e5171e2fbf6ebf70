"""Dedup of concurrent pulls, removal and layer GC, container rootfs, usage, and a restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from crivm.errors import AlreadyExists, NotFound
from crivm.storage import rootfs as rootfs_mod
from crivm.storage.service import ImageService
from tests.fixtures.images import PushedImage
from tests.fixtures.registry import Registry
from tests.integration.storage.conftest import OpenImages

pytestmark = [pytest.mark.registry, pytest.mark.root, pytest.mark.timeout(180)]


def _layer_dirs(images: ImageService) -> set[str]:
    return {p.name for p in (images.storage_dir / "layers").iterdir()}


def _blob_gets(registry: Registry, repository: str, digest: str) -> int:
    needle = f"GET /v2/{repository}/blobs/{digest}"
    return sum(1 for line in registry.log_tail(50_000_000).splitlines()
               if needle in line and "HTTP/1.1\" 200" in line)


async def test_concurrent_pulls_share_one_download(
    images: ImageService, big_image: PushedImage, registry: Registry
) -> None:
    before = {d: _blob_gets(registry, big_image.repository, d) for d in big_image.layer_digests}
    records = await asyncio.gather(*[images.pull(big_image.ref) for _ in range(4)])
    assert {r.id for r in records} == {big_image.image_id}
    for digest in big_image.layer_digests:
        assert _blob_gets(registry, big_image.repository, digest) == before[digest] + 1, digest
    assert len(images.list_images()) == 1


async def test_remove_by_tag_id_digest_and_gc(
    images: ImageService, busybox_image: PushedImage, multilayer_image: PushedImage
) -> None:
    busybox = await images.pull("busybox:latest")
    await images.pull("busybox:1.36")
    multi = await images.pull(multilayer_image.ref)
    assert len(_layer_dirs(images)) == 4
    # A tag of an image with two tags only untags it.
    await images.remove("busybox:1.36")
    record = images.resolve(busybox.id)
    assert record is not None and record.repo_tags == ("docker.io/library/busybox:latest",)
    # An id prefix names the whole image, not a tag, even though it parses as a name.
    await images.pull("busybox:1.36")
    await images.remove(busybox.id[7:19])
    assert images.resolve(busybox.id) is None
    busybox = await images.pull("busybox:latest")
    # By digest: gone; its only layer is still used by the multilayer image, so kept.
    await images.remove(busybox.repo_digests[0])
    assert images.resolve(busybox.id) is None
    assert len(_layer_dirs(images)) == 4
    await images.remove(busybox.id)  # idempotent
    await images.remove("docker.io/library/never-pulled:1")
    # By id: the last image goes and all of its layers with it.
    await images.remove(multi.id)
    assert images.list_images() == [] and _layer_dirs(images) == set()
    assert not any((images.storage_dir / "l").iterdir())
    assert not any(p.is_file() for p in (images.storage_dir / "blobs").rglob("*"))


async def test_rootfs_holds_layers_until_removed(
    images: ImageService, busybox_image: PushedImage
) -> None:
    record = await images.pull(busybox_image.ref)
    rootfs = await images.create_rootfs(busybox_image.ref, "ctr-1")
    assert os.path.ismount(rootfs.path)
    (rootfs.path / "written-by-container").write_bytes(b"x" * 100_000)
    assert (rootfs.upper / "written-by-container").is_file()
    with pytest.raises(AlreadyExists):
        await images.create_rootfs(busybox_image.ref, "ctr-1")

    image_usage, container_usage = await images.fs_info()
    assert image_usage.used_bytes >= busybox_image.unpacked_size // 2
    assert image_usage.inodes_used > 50
    assert container_usage.used_bytes >= 100_000 and container_usage.inodes_used >= 2

    await images.remove(record.id)
    assert images.resolve(record.id) is None
    assert len(_layer_dirs(images)) == 1  # in use by ctr-1
    assert (rootfs.path / "bin/busybox").is_file()

    await images.remove_rootfs("ctr-1")
    assert not rootfs.path.exists() and _layer_dirs(images) == set()
    assert not (images.containers_dir / "ctr-1").exists()
    await images.remove_rootfs("ctr-1")  # idempotent
    with pytest.raises(NotFound):
        await images.create_rootfs(busybox_image.ref, "ctr-2")
    # The writable layer was moved into tmp/ and is deleted in the background; close()
    # waits for that.
    await images.close()
    assert list((images.storage_dir / "tmp").iterdir()) == []


async def test_restart_keeps_images_and_rootfs(
    open_images: OpenImages, local_registries_conf: Path, busybox_image: PushedImage,
    multilayer_image: PushedImage,
) -> None:
    first = await open_images(registries_conf=str(local_registries_conf))
    busybox = await first.pull("busybox")
    multi = await first.pull(multilayer_image.ref)
    rootfs = await first.create_rootfs("busybox", "survivor")
    (rootfs.path / "state").write_text("kept")
    # Leave debris like a crash would: a half unpack in tmp/ and an unrecorded layer dir.
    (first.storage_dir / "tmp" / "layer-crashed" / "diff").mkdir(parents=True)
    (first.storage_dir / "layers" / ("0" * 64) / "diff").mkdir(parents=True)
    await first.close()

    second = await open_images(registries_conf=str(local_registries_conf))
    assert {r.id for r in second.list_images()} == {busybox.id, multi.id}
    assert not (second.storage_dir / "tmp" / "layer-crashed").exists()
    assert ("0" * 64) not in _layer_dirs(second)
    again = await second.get_rootfs("survivor")  # still mounted: the container kept running
    assert (again.path / "state").read_text() == "kept"
    # The mount is gone after a host reboot; get_rootfs mounts it again.
    await second.remove_rootfs("other-not-there")
    await rootfs_mod.unmount(again.path)
    assert not os.path.ismount(again.path)
    remounted = await second.get_rootfs("survivor")
    assert (remounted.path / "state").read_text() == "kept"
    fresh = await second.create_rootfs(multi.id, "new-after-restart")
    assert sorted(os.listdir(fresh.path / "data")) == ["added-late.txt", "keep.txt"]

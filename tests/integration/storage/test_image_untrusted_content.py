"""Content a registry should never send: bad digests, escaping layers, stalls; and Bearer auth."""

from __future__ import annotations

import asyncio
import gzip
import io
import tarfile
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from crivm.errors import DeadlineExceeded, Unauthenticated, Unavailable
from crivm.storage.blobs import DigestMismatch
from crivm.storage.credentials import Credentials
from crivm.storage.layer_unpack import UnsafeLayer
from crivm.storage.service import ImageService
from tests.fixtures import image_recipes
from tests.fixtures.images import push
from tests.fixtures.oci_builder import OCI_LAYER_GZIP, Blob, Layer, RuntimeConfig, build_image
from tests.fixtures.oci_builder import sha256_digest as digest_of
from tests.fixtures.registry import Registry
from tests.integration.storage.conftest import OpenImages
from tests.integration.storage.fake_registry import FakeRegistry, fake_registry

__all__ = ["fake_registry"]  # the fixture, imported so pytest finds it

pytestmark = [pytest.mark.registry, pytest.mark.root, pytest.mark.timeout(120)]


def _stored_files(images: ImageService) -> list[Path]:
    found = []
    for part in ("blobs", "layers", "tmp"):
        found += [p for p in (images.storage_dir / part).rglob("*") if p.is_file()]
    return found


async def _images_for(open_images: OpenImages, tmp_path: Path, host: str,
                      **overrides: object) -> ImageService:
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return await open_images(registries_conf=str(conf), **overrides)


def _evil_layer(*entries: tuple[str, bytes, str]) -> Layer:
    """A layer with raw tar names, which the fixture's LayerBuilder would normalise away."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, link in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            data = b"pwned\n" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    tar = buffer.getvalue()
    return Layer(Blob(OCI_LAYER_GZIP, gzip.compress(tar, mtime=0)), digest_of(tar), len(tar),
                 compressed=True)


TRAVERSALS = {
    "dotdot": [("../../../../../../tmp/crivm-escape-dotdot", tarfile.REGTYPE, "")],
    "absolute": [("/tmp/crivm-escape-absolute", tarfile.REGTYPE, "")],
    "symlink-then-write": [("evil", tarfile.SYMTYPE, "/tmp"),
                           ("evil/crivm-escape-symlink", tarfile.REGTYPE, "")],
    "hardlink-outside": [("passwd", tarfile.LNKTYPE, "../../../../../../etc/passwd")],
}


@pytest.mark.parametrize("case", sorted(TRAVERSALS))
async def test_escaping_layer_is_rejected_and_nothing_kept(
    images: ImageService, registry: Registry, case: str
) -> None:
    image = build_image([image_recipes.busybox_layer(), _evil_layer(*TRAVERSALS[case])],
                        RuntimeConfig(cmd=["sh"]))
    pushed = push(registry, f"crivm-test/evil-{case}", ("latest",), image)
    with pytest.raises(UnsafeLayer):
        await images.pull(pushed.ref)
    for escaped in Path("/tmp").glob("crivm-escape-*"):
        pytest.fail(f"{escaped} was written outside the layer")
    assert images.list_images() == []
    evil_blob = image.layers[1].blob.digest.partition(":")[2]
    assert not any(evil_blob in str(p) for p in _stored_files(images))
    assert not any((images.storage_dir / "tmp").iterdir())


async def test_corrupt_blob_is_rejected_and_not_stored(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.busybox_image()
    fake_registry.add_image("library/busybox", "latest", image)
    fake_registry.corrupt.add(image.layers[0].blob.digest)
    images = await _images_for(open_images, tmp_path, fake_registry.host)
    with pytest.raises(DigestMismatch, match=image.layers[0].blob.digest):
        await images.pull(fake_registry.ref("library/busybox", "latest"))
    assert images.list_images() == [] and images._catalog.list_layers() == []
    layer_hex = image.layers[0].blob.digest.partition(":")[2]
    assert not any(layer_hex in str(p) for p in _stored_files(images))
    assert not any((images.storage_dir / "tmp").iterdir())


def _assert_nothing_half_made(images: ImageService, layer_digest: str) -> None:
    """No temp dir, no layer without its row, and nothing of the layer ``layer_digest``."""
    assert not any((images.storage_dir / "tmp").iterdir())
    recorded = {layer.chain_id.partition(":")[2] for layer in images._catalog.list_layers()}
    assert {p.name for p in (images.storage_dir / "layers").iterdir()} == recorded
    assert all(layer.blob_digest != layer_digest for layer in images._catalog.list_layers())
    layer_hex = layer_digest.partition(":")[2]
    assert not any(layer_hex in str(p) for p in _stored_files(images))


async def test_truncated_download_is_unavailable_and_nothing_kept(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.multilayer_image()
    fake_registry.add_image("crivm-test/multi", "latest", image)
    truncated = image.layers[-1].blob.digest
    fake_registry.truncate.add(truncated)
    images = await _images_for(open_images, tmp_path, fake_registry.host)
    with pytest.raises(Unavailable, match=f"download of {truncated} broke off"):
        await images.pull(fake_registry.ref("crivm-test/multi", "latest"))
    assert images.list_images() == []
    _assert_nothing_half_made(images, truncated)


async def test_pull_cancelled_mid_layer_leaves_nothing(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    """The watchdog cancels the pull while one layer is half streamed into its unpacking
    thread and the others are done: the thread stops and its temp dir goes."""
    image = image_recipes.multilayer_image()
    fake_registry.add_image("crivm-test/multi", "latest", image)
    stalled = image.layers[0].blob.digest
    fake_registry.stall.add(stalled)
    images = await _images_for(open_images, tmp_path, fake_registry.host,
                               image_pull_progress_timeout_s=1.5)
    pull = asyncio.create_task(images.pull(fake_registry.ref("crivm-test/multi", "latest")))
    deadline = time.monotonic() + 10
    while f"GET blob {stalled}" not in fake_registry.requests:
        assert time.monotonic() < deadline, "the stalled layer was never requested"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    assert any((images.storage_dir / "tmp").iterdir()), "the stalled layer is mid-unpack"
    with pytest.raises(DeadlineExceeded):
        await pull
    assert images.list_images() == []
    _assert_nothing_half_made(images, stalled)


async def test_corrupt_config_is_rejected(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.busybox_image()
    fake_registry.add_image("library/busybox", "latest", image)
    fake_registry.corrupt.add(image.config_digest)
    images = await _images_for(open_images, tmp_path, fake_registry.host)
    with pytest.raises(DigestMismatch):
        await images.pull(fake_registry.ref("library/busybox", "latest"))
    assert not images._blobs.has(image.config_digest)


async def test_stalled_pull_times_out(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.busybox_image()
    fake_registry.add_image("library/busybox", "latest", image)
    fake_registry.stall.add(image.layers[0].blob.digest)
    images = await _images_for(open_images, tmp_path, fake_registry.host,
                               image_pull_progress_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="made no progress for 2s"):
        await images.pull(fake_registry.ref("library/busybox", "latest"))
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 6.0
    assert images.list_images() == []
    _assert_nothing_half_made(images, image.layers[0].blob.digest)


async def test_bearer_token_flow(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.busybox_image()
    fake_registry.add_image("library/busybox", "latest", image)
    fake_registry.bearer_user = ("alice", "s3cret")
    images = await _images_for(open_images, tmp_path, fake_registry.host)
    ref = fake_registry.ref("library/busybox", "latest")
    with pytest.raises(Unauthenticated, match="refused the given credentials"):
        await images.pull(ref, Credentials("alice", "wrong"))
    record = await images.pull(ref, Credentials("alice", "s3cret"))
    assert record.id == image.config_digest
    token_requests = [unquote(r) for r in fake_registry.requests if r.startswith("TOKEN")]
    assert any("scope=repository:library/busybox:pull" in r for r in token_requests)

"""Pulling from the real docker-registry fixture: names, formats, auth, mirrors, failures."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from crivm.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from crivm.storage.credentials import Credentials
from crivm.storage.manifest import user_of
from tests.fixtures.images import PushedImage, PushedIndex
from tests.fixtures.registry import AuthRegistry, Registry
from tests.integration.storage.conftest import OpenImages

pytestmark = [pytest.mark.registry, pytest.mark.root, pytest.mark.timeout(120)]


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens once the probe socket is closed


async def test_short_name_pull_records_the_image(images, busybox_image: PushedImage) -> None:
    record = await images.pull("busybox")
    assert record.id == busybox_image.image_id
    assert record.repo_tags == ("docker.io/library/busybox:latest",)
    assert record.repo_digests == (
        f"docker.io/library/busybox@{busybox_image.manifest_digest}",
    )
    assert record.size >= busybox_image.unpacked_size
    assert not record.pinned
    # Every name resolves to it, and a second pull is a no-op that answers the same id.
    for name in ("busybox", "docker.io/library/busybox:latest", record.id, record.id[7:19],
                 f"docker.io/library/busybox@{busybox_image.manifest_digest}"):
        found = images.resolve(name)
        assert found is not None and found.id == record.id, name
    again = await images.pull("docker.io/library/busybox")
    assert again.id == record.id


async def test_pull_by_digest_and_second_tag(images, busybox_image: PushedImage) -> None:
    by_digest = await images.pull(busybox_image.digest_ref)
    assert by_digest.id == busybox_image.image_id
    assert by_digest.repo_tags == ()
    tagged = await images.pull(busybox_image.mirrored_ref(tag="1.36"))
    assert tagged.id == by_digest.id
    assert "docker.io/library/busybox:1.36" in tagged.repo_tags
    assert len(images.list_images()) == 1


@pytest.mark.parametrize("fixture", ["busybox_oci_index", "busybox_manifest_list"])
async def test_index_selects_linux_amd64(
    images, request: pytest.FixtureRequest, fixture: str
) -> None:
    index: PushedIndex = request.getfixturevalue(fixture)
    record = await images.pull(index.ref)
    assert record.id == index.amd64.config_digest
    assert record.manifest_digest == index.amd64.manifest_digest
    assert record.repo_digests == (f"{index.registry.host}/library/busybox@{index.index_digest}",)


async def test_layers_are_shared_and_whiteouts_apply(
    images, busybox_image: PushedImage, multilayer_image: PushedImage
) -> None:
    await images.pull(busybox_image.ref)
    record = await images.pull(multilayer_image.ref)
    # The busybox base layer is one chain, unpacked once, used by both images.
    assert len({layer.chain_id for layer in images._catalog.list_layers()}) == 4
    rootfs = await images.create_rootfs(record.id, "multilayer-ctr")
    root = rootfs.path
    assert sorted(os.listdir(root / "data")) == ["added-late.txt", "keep.txt"]
    assert sorted(os.listdir(root / "opaque")) == ["new.txt"]
    assert (root / "links/hard").stat().st_ino == (root / "links/target.txt").stat().st_ino
    assert os.readlink(root / "links/soft") == "target.txt"
    assert stat.S_IMODE((root / "secret").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "secret/private.txt").stat().st_mode) == 0o600
    owned = (root / "owned/by-1234.txt").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 1234)
    assert (root / "bin/busybox").is_file()


async def test_setuid_bits_survive(images, setuid_image: PushedImage) -> None:
    record = await images.pull(setuid_image.ref)
    rootfs = await images.create_rootfs(record.id, "suid-ctr")
    suid = (rootfs.path / "usr/local/bin/suid-busybox").stat()
    assert stat.S_IMODE(suid.st_mode) == 0o4755 and suid.st_uid == 0
    sgid = (rootfs.path / "usr/local/bin/sgid-script").stat()
    assert stat.S_IMODE(sgid.st_mode) == 0o2755


async def test_user_from_config(
    images, user_image: PushedImage, user_numeric_image: PushedImage
) -> None:
    named = await images.pull(user_image.ref)
    numeric = await images.pull(user_numeric_image.ref)
    assert user_of(named.config["config"]["User"]) == (None, "nobody")
    assert user_of(numeric.config["config"]["User"]) == (1234, "")


async def test_pause_image_on_demand_is_pinned(
    open_images: OpenImages, registries_conf: Path, pause_image: PushedImage
) -> None:
    images = await open_images(registries_conf=str(registries_conf),
                               pause_image="registry.k8s.io/pause:3.9")
    record = await images.ensure_image("registry.k8s.io/pause:3.9")
    assert record.pinned and record.id == pause_image.image_id
    assert images.image_config("registry.k8s.io/pause:3.9")["config"]["Entrypoint"] == ["/pause"]
    assert (await images.ensure_image(record.id)).id == record.id


# -- auth -----------------------------------------------------------------------------------


@pytest.fixture
def auth_busybox(
    push_to_auth_registry: Callable[[PushedImage], PushedImage], busybox_image: PushedImage
) -> PushedImage:
    return push_to_auth_registry(busybox_image)


async def test_basic_auth_registry(
    open_images: OpenImages, tmp_path: Path, auth_registry: AuthRegistry,
    auth_busybox: PushedImage,
) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{auth_registry.host}"\ninsecure = true\n')
    images = await open_images(registries_conf=str(conf))
    with pytest.raises(Unauthenticated, match="no credentials were given"):
        await images.pull(auth_busybox.ref)
    with pytest.raises(Unauthenticated, match="refused the given credentials"):
        await images.pull(auth_busybox.ref, Credentials(auth_registry.username, "wrong"))
    good = Credentials(auth_registry.username, auth_registry.password)
    record = await images.pull(auth_busybox.ref, good)
    assert record.id == auth_busybox.image_id


async def test_auth_file_credentials(
    open_images: OpenImages, tmp_path: Path, auth_registry: AuthRegistry,
    auth_busybox: PushedImage,
) -> None:
    import base64

    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{auth_registry.host}"\ninsecure = true\n')
    pair = f"{auth_registry.username}:{auth_registry.password}".encode()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps(
        {"auths": {auth_registry.host: {"auth": base64.b64encode(pair).decode()}}}
    ))
    images = await open_images(registries_conf=str(conf), auth_file=str(auth_file))
    record = await images.pull(auth_busybox.ref)
    assert record.id == auth_busybox.image_id


# -- registries.conf ------------------------------------------------------------------------


async def test_mirror_down_falls_back_to_next_location(
    open_images: OpenImages, tmp_path: Path, registry: Registry, busybox_image: PushedImage
) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nprefix = "docker.io"\n'
        f'location = "{registry.host}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "127.0.0.1:{_closed_port()}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}/no-such-prefix"\ninsecure = true\n'
    )
    images = await open_images(registries_conf=str(conf))
    record = await images.pull("busybox:latest")
    assert record.id == busybox_image.image_id
    assert record.repo_tags == ("docker.io/library/busybox:latest",)


async def test_mirror_serves_when_origin_is_unreachable(
    open_images: OpenImages, registries_conf_mirrors: Path, busybox_image: PushedImage
) -> None:
    images = await open_images(registries_conf=str(registries_conf_mirrors))
    record = await images.pull("docker.io/library/busybox:latest")
    assert record.id == busybox_image.image_id


async def test_all_locations_down_is_unavailable_naming_them(
    open_images: OpenImages, tmp_path: Path
) -> None:
    port_a, port_b = _closed_port(), _closed_port()
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nprefix = "example.test"\nlocation = "127.0.0.1:{port_a}"\n'
        f'insecure = true\n[[registry.mirror]]\nlocation = "127.0.0.1:{port_b}"\n'
        "insecure = true\n"
    )
    images = await open_images(registries_conf=str(conf))
    with pytest.raises(Unavailable) as caught:
        await images.pull("example.test/app:1")
    assert f"127.0.0.1:{port_a}" in str(caught.value)
    assert f"127.0.0.1:{port_b}" in str(caught.value)


async def test_secure_registry_is_not_downgraded_to_http(
    open_images: OpenImages, registry: Registry, busybox_image: PushedImage
) -> None:
    images = await open_images()  # no registries.conf: the plain-http registry is not insecure
    with pytest.raises(Unavailable, match=registry.host):
        await images.pull(busybox_image.ref)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "UPPER/case", "busybox:bad tag", "a@sha256:123",
                                  "busybox:", "-leading/dash"])
async def test_malformed_reference_is_invalid_argument(images, name: str) -> None:
    with pytest.raises(InvalidArgument):
        await images.pull(name)


async def test_missing_repository_and_tag_are_not_found(
    images, busybox_image: PushedImage, registry: Registry
) -> None:
    with pytest.raises(NotFound, match="crivm-test/no-such-repo"):
        await images.pull(f"{registry.host}/crivm-test/no-such-repo:latest")
    with pytest.raises(NotFound, match="no-such-tag"):
        await images.pull(f"{registry.host}/library/busybox:no-such-tag")
    assert images.list_images() == []


async def test_pull_timings(images, busybox_image: PushedImage, big_image: PushedImage) -> None:
    """Not a benchmark gate: prints what a pull costs here, for the record."""
    started = time.monotonic()
    await images.pull(busybox_image.ref)
    small = time.monotonic() - started
    started = time.monotonic()
    await images.pull(big_image.ref)
    big = time.monotonic() - started
    print(f"\npull timings: busybox {busybox_image.size} B in {small:.2f}s; "
          f"big {big_image.size} B in {big:.2f}s")

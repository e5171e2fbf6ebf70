"""TLS with a per-registry CA directory, and the CRI identity_token / registry_token flows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crivm.errors import Unavailable
from crivm.storage.credentials import Credentials
from tests.fixtures import image_recipes
from tests.integration.storage.conftest import OpenImages
from tests.integration.storage.fake_registry import (
    FakeRegistry,
    ThrowawayCA,
    fake_registry,
    serve,
    throwaway_ca,
)

__all__ = ["fake_registry", "throwaway_ca"]  # fixtures, imported so pytest finds them

pytestmark = [pytest.mark.registry, pytest.mark.root, pytest.mark.timeout(120)]


async def test_tls_registry_needs_its_ca(
    open_images: OpenImages, tmp_path: Path, throwaway_ca: ThrowawayCA
) -> None:
    image = image_recipes.busybox_image()
    async with serve(throwaway_ca.server_context()) as tls_registry:
        tls_registry.add_image("library/busybox", "latest", image)
        ref = tls_registry.ref("library/busybox", "latest")
        certs = tmp_path / "certs.d"
        images = await open_images(registry_certs_dir=str(certs))
        # Not insecure, and its CA is unknown: refused, and never retried over http.
        with pytest.raises(Unavailable, match="TLS failed"):
            await images.pull(ref)
        assert not any(r.startswith("GET manifest") for r in tls_registry.requests)
        (certs / tls_registry.host).mkdir(parents=True)
        shutil.copy(throwaway_ca.ca_cert, certs / tls_registry.host / "ca.crt")
        record = await images.pull(ref)
        assert record.id == image.config_digest


async def test_identity_token_is_exchanged_for_an_access_token(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.busybox_image()
    fake_registry.add_image("library/busybox", "latest", image)
    fake_registry.bearer_user = ("nobody-uses-this", "x")
    fake_registry.refresh_token = "refresh-me"  # noqa: S105 - test token
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{fake_registry.host}"\ninsecure = true\n')
    images = await open_images(registries_conf=str(conf))
    ref = fake_registry.ref("library/busybox", "latest")
    record = await images.pull(ref, Credentials(identity_token="refresh-me"))
    assert record.id == image.config_digest
    assert any(r.startswith("POST TOKEN refresh_token repository:library/busybox:pull")
               for r in fake_registry.requests)


async def test_registry_token_is_sent_as_it_is(
    open_images: OpenImages, tmp_path: Path, fake_registry: FakeRegistry
) -> None:
    image = image_recipes.busybox_image()
    fake_registry.add_image("library/busybox", "latest", image)
    fake_registry.bearer_user = ("alice", "pw")
    fake_registry.tokens.add("pre-issued")
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{fake_registry.host}"\ninsecure = true\n')
    images = await open_images(registries_conf=str(conf))
    record = await images.pull(fake_registry.ref("library/busybox", "latest"),
                               Credentials(registry_token="pre-issued"))
    assert record.id == image.config_digest
    assert not any("TOKEN" in r for r in fake_registry.requests)

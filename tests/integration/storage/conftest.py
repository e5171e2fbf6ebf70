"""Fixtures for the storage tests: an ImageService on a fresh root, torn down with its mounts."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from crivm.runtime.config import Config, defaults
from crivm.runtime.store import Store
from crivm.storage.service import ImageService
from tests.fixtures.registries_conf import rewrite_conf
from tests.fixtures.registry import Registry

OpenImages = Callable[..., Awaitable[ImageService]]


@pytest.fixture
async def open_images(tmp_path: Path) -> AsyncIterator[OpenImages]:
    """open_images(**config_overrides) -> an ImageService; every one opened is closed, and
    every rootfs it mounted unmounted, at teardown."""
    opened: list[tuple[ImageService, Store]] = []

    async def open_one(**overrides: object) -> ImageService:
        values: dict[str, object] = {
            "root": str(tmp_path / "root"),
            "runroot": str(tmp_path / "run"),
            "registries_conf": str(tmp_path / "no-registries.conf"),
            "registry_certs_dir": str(tmp_path / "certs.d"),
            "image_pull_progress_timeout_s": 20.0,
        }
        values.update(overrides)
        config: Config = dataclasses.replace(defaults(), **values)  # type: ignore[arg-type]
        store = Store.open(config.state_db)
        service = await ImageService.open(config, store)
        opened.append((service, store))
        return service

    yield open_one
    for service, store in reversed(opened):
        for container_id in service._catalog.list_rootfs():
            await service.remove_rootfs(container_id)
        await service.close()
        store.close()


@pytest.fixture
def local_registries_conf(registry: Registry, tmp_path: Path) -> Path:
    """docker.io, registry.k8s.io and gcr.io rewritten to the local registry, which is also
    reachable (insecure, plain http) under its own 127.0.0.1 name."""
    path = tmp_path / "registries.conf"
    path.write_text(
        rewrite_conf(registry.host)
        + f'\n[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    return path


@pytest.fixture
async def images(open_images: OpenImages, local_registries_conf: Path) -> ImageService:
    """An ImageService whose registries.conf sends docker.io etc. to the local registry."""
    return await open_images(registries_conf=str(local_registries_conf))

"""The image set of hack/critest-images.py: identities critest's image specs rely on, and the
busybox userland behaving like upstream's where specs depend on it.

Needs Debian's `busybox` package (fetched with apt into the critest image cache once); the
tests skip when apt cannot provide it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from crivm.guestimage.errors import GuestImageError
from tests.fixtures import image_recipes
from tests.fixtures.oci_builder import Image

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "critest-images.py"
RUN_TIMEOUT = 30

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("critest_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def tools(script: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("critest-tools")
    built = image_recipes.compile_userland_tools(work)
    built["pause"] = image_recipes.compile_pause(work)
    try:
        built["busybox"] = script.asyncio.run(script.debian_busybox(script.DEFAULT_CACHE_DIR, work))
    except GuestImageError as exc:
        pytest.skip(f"Debian's busybox package is not available: {exc}")
    return built


@pytest.fixture(scope="module")
def images(script: ModuleType, tools: dict[str, Path]) -> dict[str, Image]:
    return {
        f"{spec.repository}:{tag}": spec.build(tools)
        for spec in script.CRITEST_IMAGES
        for tag in spec.tags
    }


def _config(image: Image) -> dict[str, object]:
    runtime: dict[str, object] = json.loads(image.config.data)["config"]
    return runtime


def _members(image: Image) -> dict[str, tarfile.TarInfo]:
    """Path -> entry of the final tree (later layers win; these images have no whiteouts)."""
    tree: dict[str, tarfile.TarInfo] = {}
    for layer in image.layers:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob.data))) as archive:
            tree.update({member.name: member for member in archive.getmembers()})
    return tree


def test_image_ids_match_what_the_image_specs_expect(images: dict[str, Image]) -> None:
    staging = "k8s-staging-cri-tools/"
    distinct = {images[f"{staging}test-image-{n}:latest"].config_digest for n in (1, 2, 3)}
    assert len(distinct) == 3
    same = {images[f"{staging}test-image-tags:{n}"].config_digest for n in (1, 2, 3)}
    assert len(same) == 1
    assert _config(images[f"{staging}test-image-user-uid:latest"])["User"] == "1002"
    assert _config(images[f"{staging}test-image-user-username-group:latest"])["User"] == (
        "www-data:1004"
    )
    assert _config(images["pause:3.9"])["Entrypoint"] == ["/pause"]


def test_busybox_has_the_tools_critest_calls(images: dict[str, Image]) -> None:
    tree = _members(images["e2e-test-images/busybox:1.29-2"])
    for tool in ("top", "sh", "sleep", "pgrep", "ipcs", "pidof", "ping", "netstat", "brctl",
                 "hostname", "id", "dd", "mount", "ls"):
        assert f"bin/{tool}" in tree, tool
    # Hard links (not symlinks): masking /bin/ls must not mask the busybox binary.
    assert tree["bin/ls"].islnk() and tree["bin/ls"].linkname == "bin/busybox"
    assert tree["tmp"].mode == 0o1777
    assert _config(images["e2e-test-images/busybox:1.29-2"])["Cmd"] == ["sh"]


def test_nonewprivs_binary_is_setuid_root(images: dict[str, Image]) -> None:
    nnp = _members(images["e2e-test-images/nonewprivs:1.3"])["usr/local/bin/nnp"]
    assert (nnp.mode, nnp.uid, nnp.gid) == (0o4755, 0, 0)


@pytest.mark.root
def test_masked_ls_is_refused_by_the_shell(
    images: dict[str, Image], tmp_path: Path
) -> None:
    """What "runtime should support MaskedPaths" checks, with a /dev/null bind mount as runc
    makes it: `/bin/sh -c ls` must fail with exactly this message."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace and chroot")
    rootfs = tmp_path / "rootfs"
    for layer in images["e2e-test-images/busybox:1.29-2"].layers:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob.data))) as archive:
            archive.extractall(rootfs, filter="fully_trusted")
    masked = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         'mount --bind /dev/null "$0/bin/ls" && exec chroot "$0" /bin/sh -c ls', str(rootfs)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert masked.returncode != 0
    assert masked.stderr == "/bin/sh: ls: Permission denied\n"
    unmasked = subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", "ls /"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert unmasked.returncode == 0 and "bin" in unmasked.stdout.split()

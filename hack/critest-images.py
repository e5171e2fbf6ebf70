#!/usr/bin/env python3
"""Build every image critest 1.36 pulls and push it to a local registry, offline.

The images come from the test fixtures' deterministic builder (tests/fixtures/image_recipes.py),
so each run pushes byte-identical blobs. Each goes to the upstream repository path with the
host dropped (registry.k8s.io/pause:3.9 -> <registry>/pause:3.9), and the registries.conf
written next to them relocates every upstream host to the local registry. critest therefore
keeps using the upstream names, which its image specs compare RepoTags against.

    hack/critest-images.py --registry 127.0.0.1:5000 --registries-conf /tmp/x/registries.conf

What each image must contain is listed in /opt/src/critest-images.txt; the digest-pinned
test-image-digest cannot be rebuilt (its manifest digest is upstream's), so it is not pushed.
The busybox-based images need Debian's `busybox` package: it is fetched with apt (the Debian
mirror is the one network source this needs) into --cache-dir, once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crivm.guestimage import debian  # noqa: E402 - needs the repo root on sys.path
from crivm.guestimage.errors import GuestImageError  # noqa: E402
from tests.fixtures import image_recipes  # noqa: E402
from tests.fixtures.oci_builder import Image  # noqa: E402
from tests.fixtures.registries_conf import rewrite_conf  # noqa: E402
from tests.fixtures.registry_client import RegistryClient, RegistryHTTPError  # noqa: E402

# Every registry critest (and `critest -benchmark`) names; all are relocated to the local one.
UPSTREAM_REGISTRIES = ("registry.k8s.io", "k8s.gcr.io", "gcr.io", "docker.io", "public.ecr.aws")
# Downloaded .debs are kept (and re-checked against apt's SHA256) here between runs.
DEFAULT_CACHE_DIR = Path("/var/cache/crivm/critest-images")

Tools = dict[str, Path]


@dataclass(frozen=True)
class CritestImage:
    repository: str  # upstream path without the host
    tags: tuple[str, ...]
    build: Callable[[Tools], Image]


def _staging(name: str) -> str:
    return f"k8s-staging-cri-tools/{name}"


def _pause(tools: Tools) -> Image:
    return image_recipes.pause_image(tools["pause"])


def _marker(path: str, user: str = "") -> Callable[[Tools], Image]:
    return lambda tools: image_recipes.marker_image(tools, path, user=user)


def _nginx(port: int) -> Callable[[Tools], Image]:
    return lambda _tools: image_recipes.nginx_image(port)


USER_IMAGES = (
    ("uid", "1002"),
    ("username", "www-data"),
    ("uid-group", "1003:1004"),
    ("username-group", "www-data:1004"),
)

CRITEST_IMAGES = (
    # registry.k8s.io/... (pause:3.9 also serves k8s.gcr.io/pause:3.9: same path, same bytes)
    CritestImage("e2e-test-images/busybox", ("1.29-2",), image_recipes.userland_image),
    CritestImage("e2e-test-images/nginx", ("1.14-2",), _nginx(80)),
    CritestImage("e2e-test-images/httpd", ("2.4.39-4",), image_recipes.httpd_image),
    CritestImage("e2e-test-images/nonewprivs", ("1.3",), image_recipes.nonewprivs_image),
    CritestImage("pause", ("3.9",), _pause),
    # gcr.io/k8s-staging-cri-tools/...
    CritestImage(_staging("hostnet-nginx-amd64"), ("latest",), _nginx(12003)),
    CritestImage(_staging("test-image-latest"), ("latest",), _marker("/test-image-latest")),
    CritestImage(_staging("test-image-tag"), ("test",), _marker("/test")),
    CritestImage(_staging("test-image-tag"), ("all",), _marker("/all")),
    *(
        CritestImage(_staging(f"test-image-{n}"), ("latest",), _marker(f"/test-image-{n}"))
        for n in (1, 2, 3)
    ),
    CritestImage(_staging("test-image-tags"), ("1", "2", "3"), _marker("/same-image")),
    *(
        CritestImage(
            _staging(f"test-image-user-{kind}"),
            ("latest",),
            _marker(f"/test-image-user-{kind}", user),
        )
        for kind, user in USER_IMAGES
    ),
    CritestImage(
        _staging("test-image-predefined-group"), ("latest",), image_recipes.predefined_group_image
    ),
    # public.ecr.aws/docker/library/busybox: the default image list of `critest -benchmark`.
    CritestImage(
        "docker/library/busybox",
        ("1.35.0-glibc", "1-uclibc", "1", "1-glibc", "1-musl"),
        image_recipes.userland_image,
    ),
)


def _check_identities(built: dict[str, Image]) -> None:
    """The image specs rely on these: fail here rather than in a confusing critest spec."""
    ids = {built[_staging(f"test-image-{n}:latest")].config_digest for n in (1, 2, 3)}
    if len(ids) != 3:
        raise SystemExit("test-image-1/2/3 must have three different image ids")
    markers = _staging("test-image")
    marker_ids = {image.config_digest for ref, image in built.items() if ref.startswith(markers)}
    if built["e2e-test-images/busybox:1.29-2"].config_digest in marker_ids:
        raise SystemExit("the cri-tools test images must differ from the default busybox image")


async def debian_busybox(cache_dir: Path, work_dir: Path) -> Path:
    """/bin/busybox of Debian's dynamically linked busybox package, fetched through apt."""
    [package] = await debian.resolve([image_recipes.USERLAND_BUSYBOX_PACKAGE])
    deb = await debian.fetch(package, cache_dir)
    tree = work_dir / "busybox-deb"
    await debian.extract(deb, tree)
    return tree / "bin" / "busybox"


def build_and_push(registry: str, work_dir: Path, cache_dir: Path) -> dict[str, Image]:
    work_dir.mkdir(parents=True, exist_ok=True)
    tools = image_recipes.compile_userland_tools(work_dir)
    tools["pause"] = image_recipes.compile_pause(work_dir)
    tools["busybox"] = asyncio.run(debian_busybox(cache_dir, work_dir))
    client = RegistryClient(registry)
    built: dict[str, Image] = {}
    for spec in CRITEST_IMAGES:
        image = spec.build(tools)
        client.push_image(spec.repository, image, spec.tags)
        for tag in spec.tags:
            built[f"{spec.repository}:{tag}"] = image
    _check_identities(built)
    return built


def fetch_only(cache_dir: Path) -> int:
    try:
        with tempfile.TemporaryDirectory(prefix="critest-images-") as scratch:
            asyncio.run(debian_busybox(cache_dir, Path(scratch)))
    except (GuestImageError, OSError) as exc:
        print(f"critest-images: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", help="HOST:PORT of a plain-http registry")
    parser.add_argument("--registries-conf", type=Path,
                        help="where to write the registries.conf v2 that points at it")
    parser.add_argument("--work-dir", type=Path, help="where to compile the static tools")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"where downloaded .debs are kept (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--fetch-only", action="store_true",
                        help="only download what the images need into --cache-dir (run this"
                        " where the Debian mirror is reachable; building can then be offline)")
    args = parser.parse_args(argv)
    if args.fetch_only:
        return fetch_only(args.cache_dir)
    if args.registry is None or args.registries_conf is None:
        parser.error("--registry and --registries-conf are required unless --fetch-only")
    try:
        with tempfile.TemporaryDirectory(prefix="critest-images-") as scratch:
            built = build_and_push(args.registry, args.work_dir or Path(scratch), args.cache_dir)
    except (image_recipes.RecipeError, GuestImageError, RegistryHTTPError, OSError) as exc:
        print(f"critest-images: {exc}", file=sys.stderr)
        return 1
    args.registries_conf.write_text(rewrite_conf(args.registry, UPSTREAM_REGISTRIES))
    for ref, image in built.items():
        print(f"{args.registry}/{ref}  id {image.config_digest[:19]}  {image.size} bytes")
    print(f"wrote {args.registries_conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Image reference parsing and kubelet-style normalisation."""

from __future__ import annotations

import pytest

from crivm.errors import InvalidArgument
from crivm.storage.reference import looks_like_image_id, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("user/app", "docker.io/user/app:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/a/b/c:v1.2-rc_3", "localhost:5000/a/b/c:v1.2-rc_3"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"quay.io/a/b:t@{DIGEST}", f"quay.io/a/b:t@{DIGEST}"),
        ("my-registry.example.com/team/app__x", "my-registry.example.com/team/app__x:latest"),
    ],
)
def test_normalises(text: str, expected: str) -> None:
    assert str(parse(text)) == expected


def test_parts() -> None:
    ref = parse(f"quay.io:443/a/b:t@{DIGEST}")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("quay.io:443", "a/b", "t", DIGEST)
    assert ref.manifest_ref == DIGEST
    assert parse("busybox").manifest_ref == "latest"
    assert parse("busybox").tagged() == "docker.io/library/busybox:latest"


@pytest.mark.parametrize(
    "text",
    ["", " busybox", "Busybox", "UPPER/case", "busybox:", "busybox:bad tag", "a@sha256:123",
     "a@md5:" + "0" * 32, "-a/b", "a//b", "a/b/", "busybox:" + "t" * 129,
     "a@sha256:" + "AB" * 32, "registry.io:port/x", "x/" + "a" * 260],
)
def test_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse(text)


def test_image_ids() -> None:
    assert looks_like_image_id(DIGEST)
    assert looks_like_image_id("ab" * 32)
    assert not looks_like_image_id("busybox")
    assert not looks_like_image_id("ab" * 31)

"""Manifest and config documents: platform choice, media types, users, chain ids."""

from __future__ import annotations

import hashlib
import json

import pytest

from crivm.errors import NotFound, Unimplemented
from crivm.storage.layer_store import chain_ids
from crivm.storage.manifest import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    BadManifest,
    check_supported,
    media_type_of,
    parse_config,
    parse_manifest,
    select_platform,
    user_of,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def _index(*platforms: tuple[str, str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": 10,
         "platform": {"os": os_name, "architecture": arch}}
        for digest, os_name, arch in platforms
    ]}).encode()


def test_select_linux_amd64() -> None:
    body = _index((D1, "linux", "arm64"), (D2, "windows", "amd64"), (D3, "linux", "amd64"))
    assert select_platform(body, "x").digest == D3
    with pytest.raises(NotFound, match="linux/arm64"):
        select_platform(_index((D1, "linux", "arm64")), "x")


def test_media_type_detection() -> None:
    assert media_type_of(_index((D1, "linux", "amd64")), "") == OCI_INDEX
    assert media_type_of(b'{"mediaType": "%s"}' % DOCKER_LIST.encode(), "text/plain") == DOCKER_LIST
    assert media_type_of(b'{"config": {}}', "") == OCI_MANIFEST
    with pytest.raises(Unimplemented):
        check_supported("application/vnd.docker.distribution.manifest.v1+prettyjws", "x")
    with pytest.raises(BadManifest):
        media_type_of(b"<html>", "text/html")


def test_parse_manifest_and_config() -> None:
    manifest = parse_manifest(json.dumps({
        "config": {"mediaType": "c", "digest": D1, "size": 3},
        "layers": [{"mediaType": "l", "digest": D2, "size": 5}],
    }).encode(), "x")
    assert manifest.config.digest == D1 and [la.digest for la in manifest.layers] == [D2]
    with pytest.raises(BadManifest):
        parse_manifest(b'{"config": {"digest": "nope", "size": 1}, "layers": []}', "x")
    config = parse_config(json.dumps({
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]}, "config": {"User": "www:www"},
    }).encode(), "x")
    assert config.diff_ids == (D1, D2) and config.user == "www:www"


@pytest.mark.parametrize(
    ("user", "expected"),
    [("", (None, "")), ("0", (0, "")), ("1234:5678", (1234, "")), ("nobody", (None, "nobody")),
     ("www-data:www-data", (None, "www-data"))],
)
def test_user_of(user: str, expected: tuple[int | None, str]) -> None:
    assert user_of(user) == expected


def test_chain_ids() -> None:
    second = "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()
    third = "sha256:" + hashlib.sha256(f"{second} {D3}".encode()).hexdigest()
    assert chain_ids([D1, D2, D3]) == [D1, second, third]
    assert chain_ids([]) == []

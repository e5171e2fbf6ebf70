"""Manifests, indexes and image configs: the JSON documents of the distribution protocol.

Docker schema 2 and OCI image manifests are accepted, and so are Docker manifest lists and OCI
indexes, from which the linux/amd64 entry is chosen. Schema 1 is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from crivm.errors import InvalidArgument, NotFound, Unimplemented
from crivm.storage.reference import validate_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)

TARGET_OS = "linux"
TARGET_ARCHITECTURE = "amd64"


class BadManifest(InvalidArgument):
    """The registry sent a document we cannot read as a manifest, index or config."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config that crivm reads; ``raw`` keeps the whole document."""

    diff_ids: tuple[str, ...]
    user: str
    raw: dict[str, Any]


def media_type_of(body: bytes, header_type: str) -> str:
    """The manifest's own ``mediaType`` wins; the Content-Type header is the fallback."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise BadManifest(f"manifest is not JSON: {exc}") from exc
    declared = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    header_type = header_type.split(";")[0].strip()
    if header_type in INDEX_TYPES + MANIFEST_TYPES + _SCHEMA1:
        return header_type
    # An OCI document may leave mediaType out; tell index from manifest by shape.
    if isinstance(document, dict) and "manifests" in document:
        return OCI_INDEX
    if isinstance(document, dict) and "config" in document:
        return OCI_MANIFEST
    return header_type


def check_supported(media_type: str, what: str) -> None:
    if media_type in _SCHEMA1:
        raise Unimplemented(f"{what} is a Docker schema 1 manifest, which crivm cannot pull")
    if media_type not in INDEX_TYPES + MANIFEST_TYPES:
        raise BadManifest(f"{what} has unsupported manifest type {media_type!r}")


def select_platform(body: bytes, what: str) -> Descriptor:
    """The linux/amd64 manifest of an index or manifest list."""
    document = _load_object(body, what)
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise BadManifest(f"{what}: index has no manifests array")
    for entry in entries:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):
            continue
        if platform.get("os") == TARGET_OS and platform.get("architecture") == TARGET_ARCHITECTURE:
            return _descriptor(entry, what)
    platforms = sorted(
        f"{e['platform'].get('os')}/{e['platform'].get('architecture')}"
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("platform"), dict)
    )
    raise NotFound(
        f"{what} has no {TARGET_OS}/{TARGET_ARCHITECTURE} image (it has: {', '.join(platforms)})"
    )


def parse_manifest(body: bytes, what: str) -> ImageManifest:
    document = _load_object(body, what)
    config = document.get("config")
    layers = document.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise BadManifest(f"{what}: manifest needs a config and a layers array")
    return ImageManifest(
        config=_descriptor(config, what),
        layers=tuple(_descriptor(layer, what) for layer in layers),
    )


def parse_config(body: bytes, what: str) -> ImageConfig:
    document = _load_object(body, what)
    rootfs = document.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise BadManifest(f"{what}: image config has no rootfs.diff_ids")
    for diff_id in diff_ids:
        validate_digest(diff_id)
    runtime = document.get("config")
    user = runtime.get("User", "") if isinstance(runtime, dict) else ""
    return ImageConfig(tuple(diff_ids), user if isinstance(user, str) else "", document)


def user_of(user: str) -> tuple[int | None, str]:
    """CRI's reading of config.User: a numeric uid, or else a user name (group dropped)."""
    if not user:
        return None, ""
    name = user.split(":")[0]
    try:
        return int(name), ""
    except ValueError:
        return None, name


def _load_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise BadManifest(f"{what} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadManifest(f"{what} is not a JSON object")
    return document


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise BadManifest(f"{what}: descriptor is not an object")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
        raise BadManifest(f"{what}: descriptor needs a digest and a size")
    try:
        validate_digest(digest)
    except InvalidArgument as exc:
        raise BadManifest(f"{what}: {exc}") from exc
    return Descriptor(str(media_type), digest, size)

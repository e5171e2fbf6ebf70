"""The test-image builder itself: deterministic bytes, well-formed tars, manifests and indexes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from tests.fixtures import image_recipes
from tests.fixtures.oci_builder import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    LAYER_MTIME,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    LayerBuilder,
    ManifestFormat,
    RuntimeConfig,
    build_image,
    build_index,
    sha256_digest,
)


def sample_layer() -> LayerBuilder:
    layer = LayerBuilder()
    layer.add_file("/z/last.txt", b"z")
    layer.add_file("/a/target", b"data", mode=0o600, uid=1234, gid=99)
    layer.add_hardlink("/a/0-hard", "/a/target")  # sorts before its target by name
    layer.add_symlink("/a/soft", "target")
    layer.add_whiteout("/gone/file")
    layer.add_opaque_dir("/opaque")
    return layer


def members(tar_bytes: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        return archive.getmembers()


def test_same_input_gives_same_digests() -> None:
    first, second = sample_layer().build(), sample_layer().build()
    assert first.blob.digest == second.blob.digest
    assert first.diff_id == second.diff_id
    assert image_recipes.busybox_image().manifest_digest == (
        image_recipes.busybox_image().manifest_digest
    )


def test_gzip_stream_has_no_timestamp_or_name() -> None:
    data = sample_layer().build().blob.data
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\x00\x00\x00\x00"  # MTIME
    assert data[3] & 0x08 == 0  # FLG.FNAME unset


def test_tar_entries_are_sorted_with_parents_and_links_last() -> None:
    layer = sample_layer().build()
    names = [(m.name, m.type) for m in members(gzip.decompress(layer.blob.data))]
    assert [name for name, _ in names] == [
        "a",
        "a/soft",
        "a/target",
        "gone",
        "gone/.wh.file",
        "opaque",
        "opaque/.wh..wh..opq",
        "z",
        "z/last.txt",
        "a/0-hard",
    ]
    assert names[-1][1] == tarfile.LNKTYPE


def test_entry_metadata_is_kept() -> None:
    by_name = {m.name: m for m in members(sample_layer().tar_bytes())}
    target = by_name["a/target"]
    assert (target.mode, target.uid, target.gid, target.size) == (0o600, 1234, 99, 4)
    assert all(m.mtime == LAYER_MTIME for m in by_name.values())
    assert all(m.uname == "" and m.gname == "" for m in by_name.values())
    assert by_name["a/0-hard"].linkname == "a/target"
    assert by_name["a/soft"].linkname == "target"
    assert by_name["a"].isdir()


def test_diff_id_is_the_uncompressed_tar_digest() -> None:
    builder = sample_layer()
    tar = builder.tar_bytes()
    compressed, plain = builder.build(), builder.build(compressed=False)
    assert compressed.diff_id == plain.diff_id == sha256_digest(tar)
    assert plain.blob.data == tar and plain.blob.media_type == OCI_LAYER_TAR
    assert compressed.blob.digest != plain.blob.digest


def test_hardlink_to_a_file_outside_the_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="hard link target"):
        LayerBuilder().add_hardlink("/b", "/not-here")


@pytest.mark.parametrize("path", ["/", "../etc/passwd", "a/../../x"])
def test_escaping_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="bad path"):
        LayerBuilder().add_file(path, b"")


def test_oci_manifest_and_config_agree() -> None:
    layers = [sample_layer().build(), sample_layer().build(compressed=False)]
    runtime = RuntimeConfig(
        entrypoint=["/bin/app"],
        cmd=["--flag"],
        env=["A=1"],
        user="1:2",
        working_dir="/w",
        exposed_ports=["80/tcp"],
    )
    image = build_image(layers, runtime)
    manifest = json.loads(image.manifest.data)
    config = json.loads(image.config.data)
    assert manifest["mediaType"] == image.manifest.media_type == OCI_MANIFEST
    assert manifest["config"]["digest"] == image.config_digest
    assert [entry["digest"] for entry in manifest["layers"]] == list(image.layer_digests)
    assert config["rootfs"] == {"type": "layers", "diff_ids": list(image.diff_ids)}
    assert config["config"] == {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--flag"],
        "Env": ["A=1"],
        "User": "1:2",
        "WorkingDir": "/w",
        "ExposedPorts": {"80/tcp": {}},
    }
    assert image.size == image.config.size + sum(layer.blob.size for layer in layers)


def test_docker_format_uses_docker_media_types_and_refuses_plain_tar() -> None:
    layer = sample_layer().build(media_types=ManifestFormat.DOCKER)
    image = build_image([layer], RuntimeConfig(), manifest_format=ManifestFormat.DOCKER)
    manifest = json.loads(image.manifest.data)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["layers"][0]["mediaType"] == DOCKER_LAYER_GZIP
    with pytest.raises(ValueError):
        build_image(
            [sample_layer().build(compressed=False)],
            RuntimeConfig(),
            manifest_format=ManifestFormat.DOCKER,
        )


@pytest.mark.parametrize(
    ("manifest_format", "media_type"),
    [(ManifestFormat.OCI, OCI_INDEX), (ManifestFormat.DOCKER, DOCKER_MANIFEST_LIST)],
)
def test_index_lists_each_platform(manifest_format: ManifestFormat, media_type: str) -> None:
    amd64 = build_image([sample_layer().build()], RuntimeConfig(cmd=["sh"]))
    arm64 = build_image([sample_layer().build()], RuntimeConfig(), architecture="arm64")
    index = build_index([amd64, arm64], manifest_format=manifest_format)
    body = json.loads(index.manifest.data)
    assert body["mediaType"] == index.manifest.media_type == media_type
    platforms = {(e["platform"]["os"], e["platform"]["architecture"]) for e in body["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}
    assert index.image_for("arm64") is arm64
    assert json.loads(arm64.config.data)["architecture"] == "arm64"

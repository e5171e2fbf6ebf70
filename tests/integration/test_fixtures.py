"""Proof that the registry and image fixtures are real: read back via HTTP, skopeo, umoci."""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import NGINX_INDEX_HTML, PushedImage, PushedIndex
from tests.fixtures.oci_builder import OCI_LAYER_TAR, sha256_digest
from tests.fixtures.registry import AuthRegistry, Registry
from tests.fixtures.registry_client import RegistryClient, RegistryHTTPError

pytestmark = pytest.mark.registry

IMAGE_FIXTURES = [
    "busybox_image",
    "multilayer_image",
    "user_image",
    "user_numeric_image",
    "setuid_image",
    "nginx_image",
    "pause_image",
    "big_image",
]
TOOL_TIMEOUT = 120


def run_tool(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, **kwargs
    )
    assert result.returncode == 0, f"{argv} -> {result.returncode}\n{result.stderr}"
    return result


def skopeo_inspect(ref: str, *extra: str) -> dict[str, Any]:
    argv = ["skopeo", *extra, "inspect", "--tls-verify=false", f"docker://{ref}"]
    inspected: dict[str, Any] = json.loads(run_tool(argv).stdout)
    return inspected


def unpack_with_umoci(ref: str, workdir: Path) -> Path:
    """skopeo copy to an OCI layout, then `umoci raw unpack`: a rootfs made without our code."""
    layout = workdir / "layout"
    rootfs = workdir / "rootfs"
    run_tool(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         f"docker://{ref}", f"oci:{layout}:image"]
    )  # fmt: skip
    run_tool(["umoci", "raw", "unpack", "--image", f"{layout}:image", str(rootfs)])
    return rootfs


def has_program_interpreter(elf_path: Path) -> bool:
    """True if a 64-bit little-endian ELF has a PT_INTERP header, i.e. is dynamically linked."""
    data = elf_path.read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", "not a 64-bit little-endian ELF"
    (program_headers_at,) = struct.unpack_from("<Q", data, 0x20)
    entry_size, count = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    return any(
        struct.unpack_from("<I", data, program_headers_at + i * entry_size)[0] == pt_interp
        for i in range(count)
    )


@pytest.fixture(params=IMAGE_FIXTURES)
def pushed(request: pytest.FixtureRequest) -> PushedImage:
    image: PushedImage = request.getfixturevalue(request.param)
    return image


def test_registry_serves_v2_api(registry: Registry) -> None:
    reply = registry.client().request("GET", "/v2/")
    assert reply.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert registry.url == f"http://{registry.host}"
    assert registry.host.startswith("127.0.0.1:")
    assert registry.data_dir.is_dir()


def test_pushed_image_reads_back_over_http(pushed: PushedImage) -> None:
    client = pushed.registry.client()
    for tag in pushed.tags:
        reply = client.get_manifest(pushed.repository, tag)
        assert sha256_digest(reply.body) == pushed.manifest_digest
        assert reply.headers["Docker-Content-Digest"] == pushed.manifest_digest
        assert reply.headers["Content-Type"] == pushed.manifest_media_type
    manifest = json.loads(client.get_manifest(pushed.repository, pushed.manifest_digest).body)
    assert manifest["config"]["digest"] == pushed.config_digest == pushed.image_id
    assert tuple(layer["digest"] for layer in manifest["layers"]) == pushed.layer_digests

    config_bytes = client.get_blob(pushed.repository, pushed.config_digest)
    assert sha256_digest(config_bytes) == pushed.config_digest
    config = json.loads(config_bytes)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert tuple(config["rootfs"]["diff_ids"]) == pushed.diff_ids

    total = len(config_bytes)
    for descriptor, diff_id in zip(manifest["layers"], pushed.diff_ids, strict=True):
        blob = client.get_blob(pushed.repository, descriptor["digest"])
        assert sha256_digest(blob) == descriptor["digest"]
        assert len(blob) == descriptor["size"]
        tar = blob if descriptor["mediaType"] == OCI_LAYER_TAR else gzip.decompress(blob)
        assert sha256_digest(tar) == diff_id
        total += len(blob)
    assert total == pushed.size


def test_big_image_is_about_50_megabytes(big_image: PushedImage) -> None:
    assert len(big_image.layer_digests) >= 5
    assert 45 * 1024 * 1024 < big_image.size < 60 * 1024 * 1024


@pytest.mark.parametrize("fixture_name", ["busybox_oci_index", "busybox_manifest_list"])
def test_index_lists_amd64_and_arm64(
    fixture_name: str, request: pytest.FixtureRequest, busybox_image: PushedImage
) -> None:
    pushed: PushedIndex = request.getfixturevalue(fixture_name)
    client = pushed.registry.client()
    reply = client.get_manifest(pushed.repository, pushed.tag)
    assert sha256_digest(reply.body) == pushed.index_digest
    assert reply.headers["Content-Type"] == pushed.media_type
    entries = {
        entry["platform"]["architecture"]: entry["digest"]
        for entry in json.loads(reply.body)["manifests"]
    }
    assert entries == {
        "amd64": pushed.amd64.manifest_digest,
        "arm64": pushed.arm64.manifest_digest,
    }
    for digest in entries.values():
        child = client.get_manifest(pushed.repository, digest)
        assert sha256_digest(child.body) == digest
    # The amd64 entry is busybox itself: same config, so the same image id.
    assert pushed.amd64.config_digest == busybox_image.config_digest

    # skopeo resolves the index for this (amd64) host to the amd64 image.
    inspected = skopeo_inspect(pushed.ref)
    assert inspected["Architecture"] == "amd64"
    assert inspected["Layers"] == list(pushed.amd64.layer_digests)


def test_auth_registry_refuses_anonymous_and_accepts_credentials(
    auth_registry: AuthRegistry,
    busybox_image: PushedImage,
    push_to_auth_registry: Callable[[PushedImage], PushedImage],
) -> None:
    anonymous = RegistryClient(auth_registry.host)
    refused = anonymous.request("GET", "/v2/", expect=(401,))
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    wrong = RegistryClient(auth_registry.host, auth_registry.username, "not-the-password")
    wrong.request("GET", "/v2/", expect=(401,))
    auth_registry.client().request("GET", "/v2/", expect=(200,))

    copy = push_to_auth_registry(busybox_image)
    assert copy.registry == auth_registry
    assert copy.ref == f"{auth_registry.host}/library/busybox:latest"
    with pytest.raises(RegistryHTTPError) as refused_manifest:
        anonymous.get_manifest(copy.repository, "latest")
    assert refused_manifest.value.status == 401
    reply = auth_registry.client().get_manifest(copy.repository, "latest")
    assert sha256_digest(reply.body) == busybox_image.manifest_digest

    creds = f"{auth_registry.username}:{auth_registry.password}"
    inspected = subprocess.run(  # noqa: S603 - fixed argv, no shell
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{copy.ref}"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False,
    )  # fmt: skip
    assert inspected.returncode != 0
    authed = json.loads(
        run_tool(
            ["skopeo", "inspect", "--tls-verify=false", "--creds", creds, f"docker://{copy.ref}"]
        ).stdout
    )
    assert authed["Digest"] == busybox_image.manifest_digest


def test_skopeo_reads_every_image(pushed: PushedImage) -> None:
    for ref in (*pushed.refs, pushed.digest_ref):
        inspected = skopeo_inspect(ref)
        assert inspected["Digest"] == pushed.manifest_digest
        assert inspected["Layers"] == list(pushed.layer_digests)
        assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")


def test_registries_conf_resolves_upstream_names(
    registries_conf: Path,
    registries_conf_mirrors: Path,
    busybox_image: PushedImage,
    pause_image: PushedImage,
) -> None:
    expected = {
        "docker.io/library/busybox:latest": busybox_image.manifest_digest,
        "docker.io/library/busybox:1.36": busybox_image.manifest_digest,
        "registry.k8s.io/pause:3.9": pause_image.manifest_digest,
        "gcr.io/pause:3.9": pause_image.manifest_digest,
    }
    assert pause_image.mirrored_ref("registry.k8s.io") == "registry.k8s.io/pause:3.9"
    assert busybox_image.mirrored_ref() == "docker.io/library/busybox:latest"
    for conf in (registries_conf, registries_conf_mirrors):
        for ref, digest in expected.items():
            # --no-tags: tag listing ignores registries.conf and would dial the real upstream.
            argv = ["skopeo", "--registries-conf", str(conf), "inspect", "--no-tags"]
            argv.append(f"docker://{ref}")
            inspected = json.loads(run_tool(argv).stdout)
            assert inspected["Digest"] == digest, (conf.read_text(), ref)


@pytest.mark.root
def test_umoci_unpacks_whiteouts_links_and_ownership(
    multilayer_image: PushedImage, tmp_path: Path
) -> None:
    rootfs = unpack_with_umoci(multilayer_image.ref, tmp_path)
    assert sorted(os.listdir(rootfs / "data")) == ["added-late.txt", "keep.txt"]
    assert os.listdir(rootfs / "opaque") == ["new.txt"]
    target = (rootfs / "links/target.txt").stat()
    hard = (rootfs / "links/hard").stat()
    assert (hard.st_ino, hard.st_dev) == (target.st_ino, target.st_dev)
    assert target.st_nlink == 2
    assert os.readlink(rootfs / "links/soft") == "target.txt"
    assert stat.S_IMODE((rootfs / "secret/private.txt").stat().st_mode) == 0o600
    owned = (rootfs / "owned/by-1234.txt").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 1234)
    assert not any(name.startswith(".wh.") for _, _, files in os.walk(rootfs) for name in files)


@pytest.mark.root
def test_umoci_keeps_setuid_bit(setuid_image: PushedImage, tmp_path: Path) -> None:
    rootfs = unpack_with_umoci(setuid_image.ref, tmp_path)
    suid = (rootfs / "usr/local/bin/suid-busybox").stat()
    assert stat.S_IMODE(suid.st_mode) == 0o4755
    assert suid.st_uid == 0
    sgid = (rootfs / "usr/local/bin/sgid-script").stat()
    assert stat.S_IMODE(sgid.st_mode) == 0o2755


@pytest.mark.root
def test_busybox_rootfs_runs_a_shell(busybox_image: PushedImage, tmp_path: Path) -> None:
    rootfs = unpack_with_umoci(busybox_image.ref, tmp_path)
    result = run_tool(["chroot", str(rootfs), "/bin/sh", "-c", "echo hello; id -un; ls /bin"])
    lines = result.stdout.split()
    assert lines[:2] == ["hello", "root"]
    assert {"sh", "ls", "cat", "wget", "nc", "sleep", "top"} <= set(lines)


@pytest.mark.root
def test_nginx_rootfs_config_is_valid(nginx_image: PushedImage, tmp_path: Path) -> None:
    rootfs = unpack_with_umoci(nginx_image.ref, tmp_path)
    assert has_program_interpreter(rootfs / "usr/sbin/nginx")
    result = run_tool(["chroot", str(rootfs), "/usr/sbin/nginx", "-t"])
    assert "test is successful" in result.stderr
    assert (rootfs / "usr/share/nginx/html/index.html").read_bytes() == NGINX_INDEX_HTML


@pytest.mark.root
def test_nginx_rootfs_serves_the_page(nginx_image: PushedImage, tmp_path: Path) -> None:
    """Runs the image's Cmd chrooted in a private network namespace, where port 80 is free."""
    rootfs = unpack_with_umoci(nginx_image.ref, tmp_path)
    # unshare execs chroot which execs nginx: the Popen pid is nginx's master in the new netns.
    nginx = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        ["unshare", "--net", "chroot", str(rootfs), "/usr/sbin/nginx"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    in_netns = ["nsenter", f"--target={nginx.pid}", "--net", "chroot", str(rootfs)]
    try:
        deadline = time.monotonic() + 10
        # Until unshare has made the new netns, nsenter would land in the host's.
        host_netns = os.readlink("/proc/self/ns/net")
        while os.readlink(f"/proc/{nginx.pid}/ns/net") == host_netns:
            assert time.monotonic() < deadline and nginx.poll() is None, "no new netns"
            time.sleep(0.01)
        run_tool([*in_netns, "ip", "link", "set", "lo", "up"])
        page = b""
        while time.monotonic() < deadline and nginx.poll() is None:
            fetch = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [*in_netns, "wget", "-q", "-O", "-", "http://127.0.0.1/"],
                capture_output=True, timeout=TOOL_TIMEOUT, check=False,
            )  # fmt: skip
            if fetch.returncode == 0:
                page = fetch.stdout
                break
            time.sleep(0.1)
    finally:
        nginx.terminate()
        try:
            _, stderr = nginx.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            _, stderr = nginx.communicate()
    assert page == NGINX_INDEX_HTML, stderr.decode(errors="replace")


@pytest.mark.root
def test_pause_exits_zero_on_sigterm_and_sigint(pause_image: PushedImage, tmp_path: Path) -> None:
    rootfs = unpack_with_umoci(pause_image.ref, tmp_path)
    binary = rootfs / "pause"
    assert not has_program_interpreter(binary), "pause must be statically linked"
    assert run_tool([str(binary), "-v"]).stdout.startswith("crivm-pause")
    for signo in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [str(binary)], stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(0.2)  # let it install its handlers
            assert process.poll() is None
            process.send_signal(signo)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

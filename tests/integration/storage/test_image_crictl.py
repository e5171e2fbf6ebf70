"""The ImageService through a real daemon process: crictl pull/images/inspecti/imagefsinfo/rmi,
gRPC status codes for bad input, and images that survive a daemon restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from crivm.proto import api_pb2, api_pb2_grpc
from tests.fixtures.images import PushedImage
from tests.fixtures.registry import AuthRegistry

pytestmark = [
    pytest.mark.registry,
    pytest.mark.root,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("crictl") is None, reason="crictl not installed"),
]


class DaemonProcess:
    def __init__(self, tmp: Path, registries_conf: Path) -> None:
        self.socket = tmp / "crivm.sock"
        self.config = tmp / "crivm.toml"
        self.config.write_text(
            f'listen = "{self.socket}"\nroot = "{tmp / "root"}"\nrunroot = "{tmp / "run"}"\n'
            f'cni_config_dir = "{tmp / "cni"}"\nregistries_conf = "{registries_conf}"\n'
        )
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
                [sys.executable, "-m", "crivm", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def crictl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        endpoint = f"unix://{self.socket}"
        result = subprocess.run(  # noqa: S603 - fixed argv
            ["crictl", "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
             "--timeout", "60s", *args],
            capture_output=True, text=True, timeout=90, check=False,
        )
        if check:
            assert result.returncode == 0, f"crictl {args}: {result.stderr}\n{self.log_tail()}"
        return result

    def images_stub(self, channel: grpc.Channel) -> api_pb2_grpc.ImageServiceStub:
        return api_pb2_grpc.ImageServiceStub(channel)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


@pytest.fixture
def daemon(tmp_path: Path, local_registries_conf: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, local_registries_conf)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_crictl_image_commands(daemon: DaemonProcess, busybox_image: PushedImage) -> None:
    pulled = daemon.crictl("pull", "busybox")
    assert busybox_image.image_id in pulled.stdout
    listed = daemon.crictl("images", "-o", "json")
    images = json.loads(listed.stdout)["images"]
    assert [i["id"] for i in images] == [busybox_image.image_id]
    assert images[0]["repoTags"] == ["docker.io/library/busybox:latest"]
    inspected = json.loads(daemon.crictl("inspecti", "busybox").stdout)
    assert inspected["status"]["id"] == busybox_image.image_id
    assert inspected["info"]["config"]["Cmd"] == ["sh"]  # crictl unwraps info["info"]
    usage = json.loads(daemon.crictl("imagefsinfo").stdout)["status"]
    assert int(usage["imageFilesystems"][0]["usedBytes"]["value"]) > 1_000_000
    assert "containerFilesystems" in usage
    daemon.crictl("rmi", "busybox")
    assert json.loads(daemon.crictl("images", "-o", "json").stdout)["images"] == []
    # Removing again is not an error at the CRI level.
    with daemon.channel() as channel:
        daemon.images_stub(channel).RemoveImage(
            api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=busybox_image.image_id)),
            timeout=10,
        )


def test_status_codes(
    daemon: DaemonProcess, busybox_image: PushedImage, auth_registry: AuthRegistry
) -> None:
    with daemon.channel() as channel:
        stub = daemon.images_stub(channel)

        def pull(name: str, auth: api_pb2.AuthConfig | None = None) -> grpc.StatusCode:
            try:
                stub.PullImage(api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=name), auth=auth), timeout=60)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        unknown = stub.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image="nothing:here")), timeout=10)
        assert not unknown.HasField("image")
        assert pull("Not/A/Valid:Name") == grpc.StatusCode.INVALID_ARGUMENT
        assert pull("docker.io/library/no-such-image:1") == grpc.StatusCode.NOT_FOUND
        auth_ref = f"{auth_registry.host}/library/busybox:latest"
        assert pull(auth_ref) == grpc.StatusCode.UNAVAILABLE  # not marked insecure: no http
        assert pull("busybox:latest") == grpc.StatusCode.OK
        status = stub.ImageStatus(api_pb2.ImageStatusRequest(
            image=api_pb2.ImageSpec(image="busybox"), verbose=True), timeout=10)
        assert status.image.id == busybox_image.image_id
        assert not status.image.HasField("uid") and status.image.username == ""
        assert json.loads(status.info["info"])["rootfs"]["diff_ids"] == list(
            busybox_image.diff_ids)
        filtered = stub.ListImages(api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(
            image=api_pb2.ImageSpec(image=busybox_image.image_id))), timeout=10)
        assert [i.id for i in filtered.images] == [busybox_image.image_id]


def test_auth_codes_through_grpc(
    tmp_path: Path, auth_registry: AuthRegistry,
    push_to_auth_registry, busybox_image: PushedImage,  # type: ignore[no-untyped-def]
) -> None:
    pushed = push_to_auth_registry(busybox_image)
    conf = tmp_path / "auth-registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{auth_registry.host}"\ninsecure = true\n')
    process = DaemonProcess(tmp_path, conf)
    process.start()
    try:
        with process.channel() as channel:
            stub = process.images_stub(channel)
            request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=pushed.ref))
            with pytest.raises(grpc.RpcError) as caught:
                stub.PullImage(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "no credentials were given" in caught.value.details()
            request.auth.username = auth_registry.username
            request.auth.password = auth_registry.password
            assert stub.PullImage(request, timeout=60).image_ref == pushed.image_id
    finally:
        process.stop()


def test_images_survive_daemon_restart(daemon: DaemonProcess,
                                       busybox_image: PushedImage) -> None:
    daemon.crictl("pull", "busybox")
    daemon.stop()
    daemon.start()
    images = json.loads(daemon.crictl("images", "-o", "json").stdout)["images"]
    assert [i["id"] for i in images] == [busybox_image.image_id]

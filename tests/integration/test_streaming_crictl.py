"""crictl exec / attach / port-forward against a real crivm daemon with runc containers,
over both transports crictl offers (SPDY and WebSocket)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.images import NGINX_INDEX_HTML, PushedImage

pytestmark = [
    pytest.mark.root, pytest.mark.runc, pytest.mark.registry,
    pytest.mark.skipif(shutil.which("crictl") is None, reason="crictl is not installed"),
    pytest.mark.timeout(300),
]

BUSYBOX = "docker.io/library/busybox:latest"
NGINX = "docker.io/library/nginx:latest"


def crictl(daemon: CrivmDaemon, *args: str, stdin: str | None = None, check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("crictl")
    assert binary is not None
    endpoint = f"unix://{daemon.socket}"
    result = subprocess.run(  # noqa: S603
        [binary, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
         "--timeout", "60s", *args],
        capture_output=True, text=True, timeout=timeout, check=False, input=stdin,
    )
    if check:
        assert result.returncode == 0, f"crictl {' '.join(args)}: {result.stderr}"
    return result


def start_pod(daemon: CrivmDaemon, tmp_path: Path, name: str, image: str,
              command: list[str] | None, **ctr: object) -> tuple[str, str]:
    pod_json = tmp_path / f"{name}-pod.json"
    pod_json.write_text(json.dumps({
        "metadata": {"name": name, "namespace": "crivmtest", "uid": f"{name}-uid"},
        "log_directory": str(daemon.log_dir / name), "linux": {},
    }))
    spec: dict[str, object] = {"metadata": {"name": name}, "image": {"image": image},
                               "log_path": f"{name}.log", "linux": {}, **ctr}
    if command is not None:
        spec["command"] = command
    ctr_json = tmp_path / f"{name}-ctr.json"
    ctr_json.write_text(json.dumps(spec))
    crictl(daemon, "pull", image)
    pod_id = crictl(daemon, "runp", str(pod_json)).stdout.strip()
    ctr_id = crictl(daemon, "create", pod_id, str(ctr_json), str(pod_json)).stdout.strip()
    crictl(daemon, "start", ctr_id)
    return pod_id, ctr_id


def stop_pod(daemon: CrivmDaemon, pod_id: str, ctr_id: str) -> None:
    # Stop the container before the pod: the daemon fixture's teardown removes pods with
    # running containers directly, which currently leaks the pod cgroup (runc backend).
    crictl(daemon, "stop", "--timeout", "1", ctr_id, check=False)
    crictl(daemon, "rm", ctr_id, check=False)
    crictl(daemon, "stopp", pod_id, check=False)
    crictl(daemon, "rmp", pod_id, check=False)


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec(crivm_daemon: CrivmDaemon, busybox_image: PushedImage, tmp_path: Path,
                     transport: str) -> None:
    pod, ctr = start_pod(crivm_daemon, tmp_path, f"exec-{transport}", BUSYBOX, ["sleep", "600"])
    try:
        _exec_checks(crivm_daemon, ctr, transport)
    finally:
        stop_pod(crivm_daemon, pod, ctr)


def _exec_checks(crivm_daemon: CrivmDaemon, ctr: str, transport: str) -> None:
    out = crictl(crivm_daemon, "exec", "-r", transport, ctr, "sh", "-c", "echo out; echo err >&2")
    assert out.stdout == "out\n" and "err" in out.stderr
    failed = crictl(crivm_daemon, "exec", "-r", transport, ctr, "sh", "-c", "exit 3",
                    check=False)
    assert failed.returncode != 0 and "exit code 3" in failed.stderr
    echoed = crictl(crivm_daemon, "exec", "-r", transport, "-i", ctr, "cat",
                    stdin="line one\nline two\n")
    assert echoed.stdout == "line one\nline two\n"
    big = crictl(crivm_daemon, "exec", "-r", transport, ctr, "sh", "-c",
                 "head -c 3000000 /dev/zero | tr '\\0' x")
    assert big.stdout == "x" * 3000000


def test_crictl_attach(crivm_daemon: CrivmDaemon, busybox_image: PushedImage,
                       tmp_path: Path) -> None:
    pod, ctr = start_pod(
        crivm_daemon, tmp_path, "attach", BUSYBOX,
        ["sh", "-c", "read line; echo got:$line; sleep 1"], stdin=True, stdin_once=True,
    )
    result = crictl(crivm_daemon, "attach", "-i", ctr, stdin="hello\n", timeout=60,
                    check=False)
    stop_pod(crivm_daemon, pod, ctr)
    assert "got:hello" in result.stdout


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_port_forward_to_nginx(crivm_daemon: CrivmDaemon, nginx_image: PushedImage,
                                      tmp_path: Path, transport: str) -> None:
    pod, ctr = start_pod(crivm_daemon, tmp_path, f"pf-{transport}", NGINX, None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    binary = shutil.which("crictl")
    assert binary is not None
    endpoint = f"unix://{crivm_daemon.socket}"
    forwarder = subprocess.Popen(  # noqa: S603
        [binary, "--runtime-endpoint", endpoint, "port-forward", "-r", transport, pod,
         f"{local_port}:80"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        page = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", local_port), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    while chunk := conn.recv(65536):
                        page += chunk
                if page:
                    break
            except OSError:
                time.sleep(0.3)
        assert page.startswith(b"HTTP/1.1 200"), page[:200]
        assert page.endswith(NGINX_INDEX_HTML)
    finally:
        forwarder.terminate()
        forwarder.wait(10)
        stop_pod(crivm_daemon, pod, ctr)

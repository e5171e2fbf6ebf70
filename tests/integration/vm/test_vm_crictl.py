"""crictl against VM pods: ``crictl runp --runtime vm``, exec (piped, stdin, big output,
exit codes, a terminal), attach, stats and an ExecSync timeout."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.images import NGINX_INDEX_HTML, PushedImage
from tests.fixtures.vm_daemon import VmCrivmDaemon

pytestmark = [
    pytest.mark.root, pytest.mark.qemu, pytest.mark.runc, pytest.mark.registry,
    pytest.mark.skipif(shutil.which("crictl") is None, reason="crictl is not installed"),
    pytest.mark.timeout(900),
]

BUSYBOX = "docker.io/library/busybox:latest"
NGINX = "docker.io/library/nginx:latest"


def crictl_argv(daemon: VmCrivmDaemon, *args: str) -> list[str]:
    binary = shutil.which("crictl")
    assert binary is not None
    endpoint = f"unix://{daemon.socket}"
    return [binary, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
            "--timeout", "300s", *args]


def crictl(daemon: VmCrivmDaemon, *args: str, stdin: str | None = None, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(  # noqa: S603
        crictl_argv(daemon, *args), capture_output=True, text=True, timeout=timeout,
        check=False, input=stdin,
    )
    if check:
        assert result.returncode == 0, f"crictl {' '.join(args)}: {result.stderr}"
    return result


def run_on_terminal(argv: list[str], typed: bytes, timeout_s: float = 120) -> bytes:
    """Run ``argv`` with a pty as its stdio, type ``typed``, return all it printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,  # noqa: S603
                            start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout_s
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break  # EIO: the child closed the terminal
                if not chunk:
                    break
                output += chunk
            if not sent and time.monotonic() > deadline - timeout_s + 5:
                os.write(master, typed)
                sent = True
            if proc.poll() is not None and not ready:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return output


def test_crictl_runp_runtime_vm(vm_daemon: VmCrivmDaemon, busybox_image: PushedImage,
                                tmp_path: Path) -> None:
    pod_json = tmp_path / "pod.json"
    pod_json.write_text(json.dumps({
        "metadata": {"name": "vmcrictl", "namespace": "crivmtest", "uid": "vmcrictl-uid"},
        "hostname": "vmcrictl", "log_directory": str(vm_daemon.log_dir / "vmcrictl"),
        "linux": {},
    }))
    ctr_json = tmp_path / "ctr.json"
    ctr_json.write_text(json.dumps({
        "metadata": {"name": "main"}, "image": {"image": BUSYBOX},
        "command": ["sh", "-c", "read line; echo got:$line; sleep 600"],
        "log_path": "main.log", "stdin": True, "stdin_once": True, "linux": {},
    }))
    crictl(vm_daemon, "pull", BUSYBOX)
    started = time.monotonic()
    pod = crictl(vm_daemon, "runp", "--runtime", "vm", str(pod_json)).stdout.strip()
    print(f"crictl runp --runtime vm: {time.monotonic() - started:.1f} s")
    inspect = json.loads(crictl(vm_daemon, "inspectp", pod).stdout)
    assert inspect["status"]["state"] == "SANDBOX_READY"
    assert inspect["status"]["runtimeHandler"] == "vm"
    ctr = crictl(vm_daemon, "create", pod, str(ctr_json), str(pod_json)).stdout.strip()
    crictl(vm_daemon, "start", ctr)

    # The container keeps running after it answers, so read until the answer, then detach.
    attach = subprocess.Popen(crictl_argv(vm_daemon, "attach", "-i", ctr),  # noqa: S603
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert attach.stdin is not None and attach.stdout is not None
        attach.stdin.write(b"hello\n")
        attach.stdin.flush()
        ready, _, _ = select.select([attach.stdout], [], [], 120)
        assert ready, "no answer through attach"
        assert b"got:hello" in attach.stdout.readline()
    finally:
        attach.kill()
        attach.wait()

    out = crictl(vm_daemon, "exec", ctr, "sh", "-c", "echo out; echo err >&2")
    assert out.stdout == "out\n" and "err" in out.stderr
    failed = crictl(vm_daemon, "exec", ctr, "sh", "-c", "exit 3", check=False)
    assert failed.returncode != 0 and "exit code 3" in failed.stderr
    echoed = crictl(vm_daemon, "exec", "-i", ctr, "cat", stdin="line one\nline two\n")
    assert echoed.stdout == "line one\nline two\n"
    big = crictl(vm_daemon, "exec", ctr, "sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x")
    assert big.stdout == "x" * 1000000

    # A terminal: the guest's pty echoes what we type and the shell sees a tty.
    shown = run_on_terminal(crictl_argv(vm_daemon, "exec", "-it", ctr, "sh"),
                            b"tty; echo mark-$((6*7)); exit\n")
    assert b"mark-42" in shown and b"/dev/pts/" in shown

    # ExecSync with a timeout: the call fails in time, and the process is gone in the guest.
    started = time.monotonic()
    slow = crictl(vm_daemon, "exec", "--timeout", "3", "--sync", ctr, "sleep", "300",
                  check=False)
    assert slow.returncode != 0 and time.monotonic() - started < 90
    left = crictl(vm_daemon, "exec", ctr, "ps", "-o", "args").stdout
    assert "sleep 300" not in left

    stats = json.loads(crictl(vm_daemon, "stats", "-o", "json", ctr).stdout)["stats"]
    assert stats and int(stats[0]["memory"]["workingSetBytes"]["value"]) > 0

    crictl(vm_daemon, "stop", "--timeout", "2", ctr)
    crictl(vm_daemon, "rm", ctr)
    crictl(vm_daemon, "stopp", pod)
    crictl(vm_daemon, "rmp", pod)


def test_crictl_port_forward_to_vm_nginx(vm_daemon: VmCrivmDaemon, nginx_image: PushedImage,
                                         tmp_path: Path) -> None:
    pod_json = tmp_path / "pod.json"
    pod_json.write_text(json.dumps({
        "metadata": {"name": "vmpf", "namespace": "crivmtest", "uid": "vmpf-uid"},
        "log_directory": str(vm_daemon.log_dir / "vmpf"), "linux": {},
    }))
    ctr_json = tmp_path / "ctr.json"
    ctr_json.write_text(json.dumps({"metadata": {"name": "nginx"}, "image": {"image": NGINX},
                                    "log_path": "nginx.log", "linux": {}}))
    crictl(vm_daemon, "pull", NGINX)
    pod = crictl(vm_daemon, "runp", "--runtime", "vm", str(pod_json)).stdout.strip()
    ctr = crictl(vm_daemon, "create", pod, str(ctr_json), str(pod_json)).stdout.strip()
    crictl(vm_daemon, "start", ctr)
    # No waiting for nginx: like critest, forward at once; the backend waits out the refusals
    # of a guest service that is still starting.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    forwarder = subprocess.Popen(  # noqa: S603
        crictl_argv(vm_daemon, "port-forward", pod, f"{local_port}:80"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        page = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not page.startswith(b"HTTP/1.1 200"):
            page = b""
            try:
                with socket.create_connection(("127.0.0.1", local_port), timeout=10) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    while chunk := conn.recv(65536):
                        page += chunk
            except OSError:
                pass
            time.sleep(0.5)
        assert page.startswith(b"HTTP/1.1 200"), page[:200]
        assert page.endswith(NGINX_INDEX_HTML)
    finally:
        forwarder.terminate()
        forwarder.wait(10)

"""crictl against a real crivm daemon: the acceptance commands of the runc backend."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"


def crictl(daemon: CrivmDaemon, *args: str) -> str:
    binary = shutil.which("crictl")
    assert binary is not None
    endpoint = f"unix://{daemon.socket}"
    result = subprocess.run(  # noqa: S603
        [binary, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
         "--timeout", "60s", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"crictl {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.mark.skipif(shutil.which("crictl") is None, reason="crictl is not installed")
def test_crictl_pod_and_container(
    crivm_daemon: CrivmDaemon, busybox_image: PushedImage, tmp_path: Path
) -> None:
    pod_json = tmp_path / "pod.json"
    pod_json.write_text(json.dumps({
        "metadata": {"name": "crictl-pod", "namespace": "crivmtest", "uid": "crictl-uid"},
        "hostname": "crictl-pod",
        "log_directory": str(crivm_daemon.log_dir / "crictl-pod"),
        "linux": {},
    }))
    ctr_json = tmp_path / "ctr.json"
    ctr_json.write_text(json.dumps({
        "metadata": {"name": "talker"},
        "image": {"image": BUSYBOX},
        "command": ["/bin/sh", "-c", "echo from-crictl; exec sleep 600"],
        "log_path": "talker.log",
        "linux": {},
    }))
    crictl(crivm_daemon, "pull", BUSYBOX)
    pod_id = crictl(crivm_daemon, "runp", str(pod_json)).strip()
    ctr_id = crictl(crivm_daemon, "create", pod_id, str(ctr_json), str(pod_json)).strip()
    crictl(crivm_daemon, "start", ctr_id)

    assert ctr_id[:13] in crictl(crivm_daemon, "ps")
    assert pod_id[:13] in crictl(crivm_daemon, "pods")
    assert crictl(crivm_daemon, "exec", "-s", ctr_id[:12], "echo", "hi").strip() == "hi"
    assert "from-crictl" in crictl(crivm_daemon, "logs", ctr_id)
    inspected = json.loads(crictl(crivm_daemon, "inspect", ctr_id))
    assert inspected["status"]["state"] == "CONTAINER_RUNNING"
    pod_inspected = json.loads(crictl(crivm_daemon, "inspectp", pod_id))
    assert pod_inspected["status"]["state"] == "SANDBOX_READY"
    assert pod_inspected["status"]["network"]["ip"].startswith("10.90.")

    crictl(crivm_daemon, "stop", "--timeout", "1", ctr_id)
    assert json.loads(crictl(crivm_daemon, "inspect", ctr_id))["status"]["state"] == (
        "CONTAINER_EXITED"
    )
    crictl(crivm_daemon, "rm", ctr_id)
    crictl(crivm_daemon, "stopp", pod_id)
    crictl(crivm_daemon, "rmp", pod_id)
    assert pod_id[:13] not in crictl(crivm_daemon, "pods")

"""Restart safety: containers outlive the daemon, and their status is right afterwards."""

from __future__ import annotations

import time

import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"


def config(name: str, script: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", script],
        log_path=f"{name}.log",
    )


def test_restart_keeps_containers(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("restart")
    pod_id = cri.run_pod(pod_config)
    long_id = cri.create(pod_id, config("long", "while true; do sleep 1; done"), pod_config)
    cri.start(long_id)
    # Exits while the daemon is down.
    short_id = cri.create(pod_id, config("short", "sleep 2; exit 5"), pod_config)
    cri.start(short_id)
    # Created before the restart, started after it.
    later_id = cri.create(pod_id, config("later", "echo later"), pod_config)
    assert cri.status(short_id).status.state == api_pb2.CONTAINER_RUNNING

    # conmon lives in the pod's cgroup, not the daemon's: a service manager stopping the
    # daemon's cgroup leaves the monitors (and so the containers) alone.
    conmon_pid = (crivm_daemon.runroot / "oci" / long_id / "conmon.pid").read_text().strip()
    with open(f"/proc/{conmon_pid}/cgroup") as fh:
        assert f"/crivm/pod-{pod_id}" in fh.read()

    crivm_daemon.stop()
    time.sleep(3)
    crivm_daemon.start()
    cri = crivm_daemon.cri

    assert cri.pod_status(pod_id).status.state == api_pb2.SANDBOX_READY
    assert cri.status(long_id).status.state == api_pb2.CONTAINER_RUNNING
    assert cri.exec_sync(long_id, ["echo", "alive"]).stdout == b"alive\n"
    short = cri.status(short_id).status
    assert short.state == api_pb2.CONTAINER_EXITED
    assert (short.exit_code, short.reason) == (5, "Error")
    assert short.finished_at > short.started_at > 0

    cri.start(later_id)
    assert cri.wait_exited(later_id).exit_code == 0

    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=long_id, timeout=1))
    assert cri.status(long_id).status.state == api_pb2.CONTAINER_EXITED

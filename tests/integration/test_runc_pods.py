"""Trusted pods on runc through a real crivm daemon: lifecycle, logs, exec, exit codes, OOM."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import grpc
import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import TEST_SUBNET, CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"
CRI_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) [FP] (.*)$"
)


def busybox(name: str, script: str, **kwargs: object) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", script],
        log_path=f"{name}.log",
        **kwargs,  # type: ignore[arg-type]
    )


def read_log(pod_config: api_pb2.PodSandboxConfig, name: str) -> list[tuple[str, str]]:
    """(stream, text) per line of a container's CRI-format log."""
    entries = []
    with open(os.path.join(pod_config.log_directory, f"{name}.log")) as fh:
        for line in fh:
            match = CRI_LOG_LINE.match(line.rstrip("\n"))
            assert match, f"not a CRI log line: {line!r}"
            entries.append((match.group(2), match.group(3)))
    return entries


def test_busybox_pod_lifecycle(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("lifecycle", labels={"app": "lifecycle"})
    pod_id = cri.run_pod(pod_config)
    assert re.fullmatch(r"[0-9a-f]{64}", pod_id)

    status = cri.pod_status(pod_id).status
    assert status.state == api_pb2.SANDBOX_READY
    assert status.network.ip.startswith(TEST_SUBNET.split(".0.0/")[0] + ".")
    assert status.labels["app"] == "lifecycle"

    ctr_id = cri.create(pod_id, busybox("hello", "echo hello; echo oops >&2; hostname; exit 3"),
                        pod_config)
    assert cri.status(ctr_id).status.state == api_pb2.CONTAINER_CREATED
    cri.start(ctr_id)
    exited = cri.wait_exited(ctr_id)
    assert exited.exit_code == 3
    assert exited.reason == "Error"
    assert exited.started_at > 0 and exited.finished_at >= exited.started_at
    assert exited.log_path == os.path.join(pod_config.log_directory, "hello.log")
    # stdout and stderr are separate pipes, so only each stream's own order is fixed.
    assert sorted(read_log(pod_config, "hello")) == [
        ("stderr", "oops"), ("stdout", "hello"), ("stdout", "lifecycle"),
    ]

    # Lists and their filters; crictl passes id prefixes.
    listed = cri.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=pod_id[:12])
    )).containers
    assert [c.id for c in listed] == [ctr_id]
    running = cri.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(
            state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)
        )
    )).containers
    assert running == []
    pods = cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(
        filter=api_pb2.PodSandboxFilter(label_selector={"app": "lifecycle"})
    )).items
    assert [p.id for p in pods] == [pod_id]
    assert cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(
        filter=api_pb2.PodSandboxFilter(label_selector={"app": "other"})
    )).items == []

    cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=ctr_id[:16]))
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert cri.pod_status(pod_id).status.state == api_pb2.SANDBOX_NOTREADY
    # Stop and remove are idempotent, also for ids that never existed.
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id="ab" * 32))
    with pytest.raises(grpc.RpcError) as info:
        cri.pod_status(pod_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_exec_sync_and_stop(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("execs")
    pod_id = cri.run_pod(pod_config)
    # A shell that ignores SIGTERM, so StopContainer has to escalate to SIGKILL.
    ctr_id = cri.create(pod_id, busybox("sleeper", "trap '' TERM; while true; do sleep 1; done"),
                        pod_config)
    cri.start(ctr_id)
    assert cri.status(ctr_id).status.state == api_pb2.CONTAINER_RUNNING

    reply = cri.exec_sync(ctr_id, ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"out\n", b"err\n", 7)
    assert cri.exec_sync(ctr_id, ["cat", "/etc/hostname"]).stdout == b"execs\n"

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        cri.exec_sync(ctr_id, ["tail", "-f", "/dev/null"], timeout=1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    # The timed-out process is gone, not even a zombie.
    assert b"tail" not in cri.exec_sync(ctr_id, ["ps", "-o", "args"]).stdout

    # Output is capped at 16 MiB per stream.
    big = cri.exec_sync(ctr_id, ["/bin/sh", "-c", "head -c 20000000 /dev/zero"])
    assert big.exit_code == 0 and len(big.stdout) == 16 * 1024 * 1024

    started = time.monotonic()
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=ctr_id, timeout=2))
    elapsed = time.monotonic() - started
    status = cri.status(ctr_id).status
    assert status.state == api_pb2.CONTAINER_EXITED
    assert status.exit_code == 137  # SIGKILL after the 2 s grace period
    assert 1.5 < elapsed < 15
    # Stopped means unmounted (as containerd's task delete): RemoveContainer only renames.
    layer = crivm_daemon.root / "storage" / "containers" / ctr_id
    assert (layer / "upper").is_dir() and not os.path.ismount(layer / "merged")
    cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=ctr_id))
    assert not layer.exists()


def test_oom_killed(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("oom")
    pod_id = cri.run_pod(pod_config)
    config = busybox("hog", "head -c 200000000 /dev/zero | tail > /dev/null")
    config.linux.resources.memory_limit_in_bytes = 32 * 1024 * 1024
    ctr_id = cri.create(pod_id, config, pod_config)
    cri.start(ctr_id)
    status = cri.wait_exited(ctr_id)
    assert status.reason == "OOMKilled", status
    assert status.exit_code == 137


def test_completed_and_verbose_status(crivm_daemon: CrivmDaemon,
                                      busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("done")
    pod_id = cri.run_pod(pod_config)
    ctr_id = cri.create(pod_id, busybox("ok", "id -u"), pod_config)
    cri.start(ctr_id)
    status = cri.wait_exited(ctr_id)
    assert (status.exit_code, status.reason) == (0, "Completed")
    info = json.loads(cri.status(ctr_id, verbose=True).info["info"])
    assert info["sandboxID"] == pod_id
    assert read_log(pod_config, "ok") == [("stdout", "0")]

    # With a terminal, conmon logs what the tty shows (as stdout, with the tty's CRLF).
    tty_id = cri.create(pod_id, busybox("tty", "test -t 1 && echo on-a-tty", tty=True,
                                        stdin=True), pod_config)
    cri.start(tty_id)
    assert cri.wait_exited(tty_id).exit_code == 0
    assert [(stream, text.rstrip("\r")) for stream, text in read_log(pod_config, "tty")] == [
        ("stdout", "on-a-tty")
    ]


def test_stop_after_infra_died(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    """The pause process dies on its own: the pod turns NOTREADY, and StopPodSandbox still
    takes the network down (the fixture's leak check then finds no netns or veth)."""
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("orphan")
    pod_id = cri.run_pod(pod_config)
    info = json.loads(cri.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
    ).info["info"])
    netns_path = info["netns_path"]
    assert os.path.exists(netns_path)
    os.kill(int(info["infra_pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cri.pod_status(pod_id).status.state != api_pb2.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "pod still READY after its infra died"
        time.sleep(0.1)
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert not os.path.exists(netns_path)
    with pytest.raises(grpc.RpcError) as failure:
        cri.create(pod_id, busybox("late", "true"), pod_config)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _conmons_of(container_id: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"conmon") and container_id.encode() in b" ".join(argv):
            found.append(int(entry))
    return found


def test_runtime_create_waits_for_start(crivm_daemon: CrivmDaemon,
                                        busybox_image: PushedImage) -> None:
    """CreateContainer writes the bundle; conmon and `runc create` run in StartContainer
    (as containerd does), so until then there is no runtime state and no monitor."""
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("deferred")
    pod_id = cri.run_pod(pod_config)
    runc_state = crivm_daemon.runroot / "runc"

    # Resources updated while only created reach the container when it starts.
    ctr_id = cri.create(pod_id, busybox("limited", "sleep 600"), pod_config)
    assert cri.status(ctr_id).status.state == api_pb2.CONTAINER_CREATED
    assert not list(runc_state.glob(f"*/{ctr_id}")) and not _conmons_of(ctr_id)
    cri.runtime.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
        container_id=ctr_id,
        linux=api_pb2.LinuxContainerResources(memory_limit_in_bytes=64 << 20),
    ))
    cri.start(ctr_id)
    assert cri.status(ctr_id).status.state == api_pb2.CONTAINER_RUNNING
    assert len(_conmons_of(ctr_id)) == 1
    limit = cri.exec_sync(ctr_id, ["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
    assert int(limit.stdout) == 64 << 20
    with pytest.raises(grpc.RpcError) as again:
        cri.start(ctr_id)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A command the image cannot vouch for (it is on a volume) fails at start, and the
    # failed start leaves the container as it was: created, no runtime state, no conmon.
    volume = crivm_daemon.base / "empty-volume"
    volume.mkdir()
    on_volume = busybox("on-volume", "")
    on_volume.command[:] = ["/data/missing"]
    on_volume.mounts.append(api_pb2.Mount(container_path="/data", host_path=str(volume)))
    broken_id = cri.create(pod_id, on_volume, pod_config)
    with pytest.raises(grpc.RpcError):
        cri.start(broken_id)
    assert cri.status(broken_id).status.state == api_pb2.CONTAINER_CREATED
    assert not list(runc_state.glob(f"*/{broken_id}")) and not _conmons_of(broken_id)

    # Stopping a container that never started leaves it created (nothing runs); removal
    # takes its bundle, rootfs and row (the fixture checks for leaks at teardown).
    idle_id = cri.create(pod_id, busybox("idle", "sleep 600"), pod_config)
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=idle_id, timeout=5))
    assert cri.status(idle_id).status.state == api_pb2.CONTAINER_CREATED
    for container_id in (broken_id, idle_id):
        cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id))
    remaining = cri.runtime.ListContainers(api_pb2.ListContainersRequest()).containers
    assert [c.id for c in remaining] == [ctr_id]


def test_concurrent_starts_run_one_container(crivm_daemon: CrivmDaemon,
                                             busybox_image: PushedImage) -> None:
    """A second StartContainer while the first is creating the container is refused; it must
    not undo (delete) the container the first one is making."""
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("twice")
    pod_id = cri.run_pod(pod_config)
    ctr_id = cri.create(pod_id, busybox("twice", "sleep 600"), pod_config)
    request = api_pb2.StartContainerRequest(container_id=ctr_id)
    first = cri.runtime.StartContainer.future(request, timeout=60)
    second = cri.runtime.StartContainer.future(request, timeout=60)
    codes = []
    for call in (first, second):
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert sorted(code.name for code in codes) == ["FAILED_PRECONDITION", "OK"]
    assert cri.status(ctr_id).status.state == api_pb2.CONTAINER_RUNNING
    assert len(_conmons_of(ctr_id)) == 1

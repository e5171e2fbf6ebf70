"""What the OCI spec asks for really happens in runc containers: users, capabilities,
seccomp, read-only rootfs, pod files, sysctls, shared pid namespace, resources, log reopen,
and creates that fail leave nothing behind (the fixture's leak check proves it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import CriClient, CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"
NGINX = "docker.io/library/nginx:latest"
CAP_NET_RAW = 13
CAP_NET_ADMIN = 12


def sleeper(name: str, image: str = BUSYBOX) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=image),
        command=["sleep", "600"],
        log_path=f"{name}.log",
    )


def run(cri: CriClient, pod_id: str, pod_config: api_pb2.PodSandboxConfig,
        config: api_pb2.ContainerConfig) -> str:
    ctr_id = cri.create(pod_id, config, pod_config)
    cri.start(ctr_id)
    return ctr_id


def sh(cri: CriClient, ctr_id: str, script: str) -> api_pb2.ExecSyncResponse:
    return cri.exec_sync(ctr_id, ["/bin/sh", "-c", script], timeout=30)


def _has_sys_resource() -> bool:
    with open("/proc/self/status") as fh:
        mask = next(line for line in fh if line.startswith("CapEff:")).split()[1]
    return bool(int(mask, 16) >> 24 & 1)  # CAP_SYS_RESOURCE


def cap_eff(cri: CriClient, ctr_id: str) -> int:
    out = sh(cri, ctr_id, "grep CapEff /proc/self/status").stdout.decode()
    return int(out.split()[1], 16)


def test_security_context(crivm_daemon: CrivmDaemon, busybox_image: PushedImage,
                          nginx_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    cri.pull(NGINX)
    pod_config = crivm_daemon.pod_config(
        "secure",
        dns_config=api_pb2.DNSConfig(servers=["10.96.0.10"], searches=["svc.local"],
                                     options=["ndots:5"]),
    )
    pod_config.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "1000"
    pod_config.linux.security_context.namespace_options.pid = api_pb2.POD
    pod_id = cri.run_pod(pod_config)

    # A user name from the image's /etc/passwd; supplemental groups added.
    named = sleeper("named", NGINX)
    named.linux.security_context.run_as_username = "www-data"
    named.linux.security_context.supplemental_groups.append(4242)
    named.linux.security_context.namespace_options.pid = api_pb2.POD
    named_id = run(cri, pod_id, pod_config, named)
    assert sh(cri, named_id, "id -u; id -g").stdout == b"33\n33\n"
    assert "4242" in sh(cri, named_id, "id -G").stdout.decode().split()

    # Capabilities: drop one of the defaults, add one outside them.
    caps = sleeper("caps")
    caps.linux.security_context.capabilities.drop_capabilities.append("NET_RAW")
    caps.linux.security_context.capabilities.add_capabilities.append("NET_ADMIN")
    caps.linux.security_context.readonly_rootfs = True
    caps.linux.security_context.no_new_privs = True
    caps.linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    caps.linux.security_context.namespace_options.pid = api_pb2.POD
    caps_id = run(cri, pod_id, pod_config, caps)
    effective = cap_eff(cri, caps_id)
    assert not effective >> CAP_NET_RAW & 1
    assert effective >> CAP_NET_ADMIN & 1
    assert sh(cri, caps_id, "touch /rootfs-write").exit_code != 0
    assert sh(cri, caps_id, "grep NoNewPrivs /proc/self/status").stdout.split()[1] == b"1"
    assert sh(cri, caps_id, "grep Seccomp: /proc/self/status").stdout.split()[1] == b"2"
    # unshare(2) is not in the default profile for a container without CAP_SYS_ADMIN.
    assert sh(cri, caps_id, "unshare -n true").exit_code != 0
    assert sh(cri, caps_id, "echo ok > /tmp/../dev/shm/x && cat /dev/shm/x").exit_code == 0

    # Pod files and sysctls.
    resolv = sh(cri, caps_id, "cat /etc/resolv.conf").stdout.decode()
    assert "nameserver 10.96.0.10" in resolv and "search svc.local" in resolv
    assert "options ndots:5" in resolv
    assert sh(cri, caps_id, "hostname").stdout == b"secure\n"
    assert "secure" in sh(cri, caps_id, "cat /etc/hosts").stdout.decode()
    assert sh(cri, caps_id, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start").stdout == (
        b"1000\n"
    )
    # Shared pid namespace: the pause process and the other container are visible.
    procs = sh(cri, caps_id, "ps -o comm").stdout.decode().split()
    assert "pause" in procs and procs.count("sleep") >= 2


def test_resources_update_and_log_reopen(crivm_daemon: CrivmDaemon,
                                         busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("resources")
    pod_id = cri.run_pod(pod_config)
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="ticker"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", "while true; do echo tick; sleep 0.2; done"],
        log_path="ticker.log",
    )
    config.linux.resources.memory_limit_in_bytes = 64 << 20
    config.linux.resources.cpu_shares = 256
    # The daemon lacks CAP_SYS_RESOURCE here, so it cannot hand out a score below its own;
    # the value is clamped instead of failing the container.
    config.linux.resources.oom_score_adj = -999
    ctr_id = run(cri, pod_id, pod_config, config)
    with open("/proc/self/oom_score_adj") as fh:
        floor = int(fh.read()) if not _has_sys_resource() else -999
    assert int(sh(cri, ctr_id, "cat /proc/self/oom_score_adj").stdout) == floor
    memory = f"/sys/fs/cgroup/memory/crivm/pod-{pod_id}/crivm-{ctr_id}/memory.limit_in_bytes"
    with open(memory) as fh:
        assert int(fh.read()) == 64 << 20
    cri.runtime.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
        container_id=ctr_id,
        linux=api_pb2.LinuxContainerResources(memory_limit_in_bytes=128 << 20, cpu_shares=512),
    ))
    with open(memory) as fh:
        assert int(fh.read()) == 128 << 20
    status = cri.status(ctr_id).status
    assert status.resources.linux.memory_limit_in_bytes == 128 << 20

    # kubelet's rotation: rename the file, then ask for a reopen; new lines go to a new file.
    log_path = status.log_path
    os.rename(log_path, log_path + ".1")
    cri.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=ctr_id))
    assert os.path.exists(log_path)  # kubelet relies on this when the call returns
    deadline = time.monotonic() + 10
    while not (os.path.exists(log_path) and os.path.getsize(log_path) > 0):
        assert time.monotonic() < deadline, "conmon did not reopen the log"
        time.sleep(0.1)
    with open(log_path) as fh:
        assert " stdout F tick" in fh.readline()


def test_failed_creates_leave_nothing(crivm_daemon: CrivmDaemon,
                                      busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    # runc rejects an unknown sysctl when creating the infra container: the netns, CNI
    # attachment, pod files and rootfs made before it must all be undone.
    bad_pod = crivm_daemon.pod_config("badpod")
    bad_pod.linux.sysctls["kernel.no_such_sysctl"] = "1"
    with pytest.raises(grpc.RpcError):
        cri.run_pod(bad_pod)
    assert cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []

    pod_config = crivm_daemon.pod_config("good")
    pod_id = cri.run_pod(pod_config)
    missing = sleeper("missing")
    missing.command[:] = ["/no/such/binary"]
    with pytest.raises(grpc.RpcError):
        cri.create(pod_id, missing, pod_config)
    unknown = sleeper("unknown-user")
    unknown.linux.security_context.run_as_username = "nobody-at-all"
    with pytest.raises(grpc.RpcError) as info:
        cri.create(pod_id, unknown, pod_config)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cri.runtime.ListContainers(api_pb2.ListContainersRequest()).containers == []
    # The same name can be used again after the failure.
    ok_id = run(cri, pod_id, pod_config, sleeper("missing"))
    assert cri.status(ok_id).status.state == api_pb2.CONTAINER_RUNNING


def test_mounts_and_devices(crivm_daemon: CrivmDaemon, busybox_image: PushedImage,
                            tmp_path: Path) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("volumes")
    pod_id = cri.run_pod(pod_config)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("from the host\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    config = sleeper("mounter")
    config.mounts.extend([
        api_pb2.Mount(container_path="/ro", host_path=str(shared), readonly=True,
                      selinux_relabel=True),  # no SELinux here: ignored, not an error
        api_pb2.Mount(container_path="/rw", host_path=str(scratch),
                      propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER),
        api_pb2.Mount(container_path="/made", host_path=str(tmp_path / "made-by-crivm")),
    ])
    config.devices.append(api_pb2.Device(container_path="/dev/mynull", host_path="/dev/null",
                                         permissions="rw"))
    ctr_id = run(cri, pod_id, pod_config, config)
    assert sh(cri, ctr_id, "cat /ro/hello.txt").stdout == b"from the host\n"
    assert sh(cri, ctr_id, "touch /ro/nope").exit_code != 0
    assert sh(cri, ctr_id, "echo written > /rw/out.txt").exit_code == 0
    assert (scratch / "out.txt").read_text() == "written\n"
    assert (tmp_path / "made-by-crivm").is_dir()
    assert sh(cri, ctr_id, "echo x > /dev/mynull && test -c /dev/mynull").exit_code == 0
    mounts = {m.container_path for m in cri.status(ctr_id).status.mounts}
    assert mounts == {"/ro", "/rw", "/made"}

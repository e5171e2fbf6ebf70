"""OCI spec generation for the runc backend: pure functions, no host needed."""

from __future__ import annotations

from typing import Any

import pytest

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.backend import ImageSettings
from crivm.runtime.runc_backend import spec, spec_security
from crivm.runtime.runc_backend.passwd import ProcessUser, resolve_user
from crivm.runtime.runc_backend.spec_resources import (
    ResourceHost,
    clamp_oom_score_adj,
    resources_section,
)

ALL_CAPS = frozenset(spec_security.CAPABILITY_NUMBERS)
HOST = spec.HostFacts(capability_bounding=ALL_CAPS - {"CAP_SYS_RESOURCE"})
ROOT = ProcessUser(uid=0, gid=0, additional_gids=(), home="/root")
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"
    "# a comment\n"
    "broken line\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nweb:x:500:www-data,other\nvideo:x:44:\n"


def make_spec(config: api_pb2.ContainerConfig, *,
              pod: api_pb2.PodSandboxConfig | None = None,
              image: ImageSettings | None = None,
              namespaces: spec.PodNamespaces | None = None,
              host: spec.HostFacts = HOST) -> dict[str, Any]:
    return spec.container_spec(
        pod_id="p" * 64,
        config=config,
        pod_config=pod or api_pb2.PodSandboxConfig(hostname="podhost"),
        image=image or ImageSettings(cmd=("sh",)),
        user=ROOT,
        rootfs="/rootfs",
        cgroups_path="/crivm/pod-x/crivm-y",
        namespaces=namespaces or spec.PodNamespaces(
            network="/run/netns/x", ipc="/proc/1/ns/ipc", uts="/proc/1/ns/uts",
            pid="/proc/1/ns/pid",
        ),
        files=spec.PodFiles(resolv_conf="/pod/resolv.conf", hostname="/pod/hostname",
                            hosts="/pod/hosts", shm="/pod/shm"),
        devices=[],
        host=host,
    )


def test_kubernetes_command_rules() -> None:
    image = ImageSettings(entrypoint=("/entry",), cmd=("default-arg",))
    assert spec.process_args(api_pb2.ContainerConfig(), image) == ["/entry", "default-arg"]
    assert spec.process_args(api_pb2.ContainerConfig(args=["x"]), image) == ["/entry", "x"]
    assert spec.process_args(api_pb2.ContainerConfig(command=["/bin/ls"]), image) == ["/bin/ls"]
    assert spec.process_args(
        api_pb2.ContainerConfig(command=["/bin/ls"], args=["-l"]), image
    ) == ["/bin/ls", "-l"]
    with pytest.raises(InvalidArgument):
        spec.process_args(api_pb2.ContainerConfig(), ImageSettings())


def test_env_merges_image_then_config() -> None:
    config = api_pb2.ContainerConfig(envs=[api_pb2.KeyValue(key="A", value=b"from-cri")])
    image = ImageSettings(env=("A=from-image", "B=kept", "PATH=/only"))
    env = spec.process_env(config, image, "host", "/home/u")
    assert "A=from-cri" in env and "B=kept" in env and "PATH=/only" in env
    assert "HOSTNAME=host" in env and "HOME=/home/u" in env


def test_user_resolution_from_image_files() -> None:
    assert resolve_user("www-data", None, (), PASSWD, GROUP) == ProcessUser(
        uid=33, gid=33, additional_gids=(500,), home="/var/www"
    )
    assert resolve_user("1234", None, (44,), PASSWD, GROUP) == ProcessUser(
        uid=1234, gid=0, additional_gids=(44,), home="/"
    )
    assert resolve_user("www-data:video", None, (), PASSWD, GROUP).gid == 44
    assert resolve_user("33", 7, (), PASSWD, GROUP).gid == 7
    with pytest.raises(InvalidArgument):
        resolve_user("nobody-here", None, (), PASSWD, GROUP)


def test_user_request_prefers_run_as_user() -> None:
    config = api_pb2.ContainerConfig()
    image = ImageSettings(user="www-data:web")
    assert spec.user_request(config, image) == ("www-data:web", None, ())
    config.linux.security_context.run_as_username = "root"
    assert spec.user_request(config, image)[0] == "root"
    config.linux.security_context.run_as_group.value = 2000
    config.linux.security_context.run_as_username = ""
    with pytest.raises(InvalidArgument):  # a group without a user is an error in the CRI
        spec.user_request(config, image)
    config.linux.security_context.run_as_user.value = 1000
    config.linux.security_context.supplemental_groups.append(3000)
    assert spec.user_request(config, image) == ("1000", 2000, (3000,))


def test_capabilities_add_drop_and_bounding() -> None:
    requested = api_pb2.Capability(add_capabilities=["NET_ADMIN", "SYS_RESOURCE"],
                                   drop_capabilities=["KILL"])
    caps = spec_security.capability_set(requested, False, HOST.capability_bounding)
    assert "CAP_NET_ADMIN" in caps["bounding"]
    assert "CAP_KILL" not in caps["bounding"]
    assert "CAP_CHOWN" in caps["effective"]
    # The daemon itself lacks CAP_SYS_RESOURCE, so no container can get it.
    assert "CAP_SYS_RESOURCE" not in caps["permitted"]
    drop_all = api_pb2.Capability(drop_capabilities=["ALL"], add_capabilities=["CHOWN"])
    assert spec_security.capability_set(drop_all, False, ALL_CAPS)["bounding"] == ["CAP_CHOWN"]
    with pytest.raises(InvalidArgument):
        spec_security.capability_set(
            api_pb2.Capability(add_capabilities=["NOT_A_CAP"]), False, ALL_CAPS
        )
    privileged = spec_security.capability_set(api_pb2.Capability(), True,
                                              HOST.capability_bounding)
    assert set(privileged["bounding"]) == HOST.capability_bounding


def test_seccomp_profiles(tmp_path: Any) -> None:
    ctx = api_pb2.LinuxContainerSecurityContext()
    assert spec_security.seccomp_section(ctx, frozenset()) is None  # nothing asked: unconfined
    ctx.seccomp.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    default = spec_security.seccomp_section(ctx, frozenset())
    assert default is not None and default["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for rule in default["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
               for n in rule["names"]}
    assert {"read", "write", "execve", "clone"} <= allowed
    assert "mount" not in allowed and "unshare" not in allowed
    assert all("includes" not in r and "excludes" not in r for r in default["syscalls"])
    admin = spec_security.seccomp_section(ctx, frozenset({"CAP_SYS_ADMIN"}))
    assert admin is not None
    assert "mount" in {n for r in admin["syscalls"] for n in r["names"]}

    profile = tmp_path / "profile.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_LOG"}')
    ctx.seccomp.profile_type = api_pb2.SecurityProfile.Localhost
    ctx.seccomp.localhost_ref = str(profile)
    assert spec_security.seccomp_section(ctx, frozenset()) == {"defaultAction": "SCMP_ACT_LOG"}
    ctx.seccomp.profile_type = api_pb2.SecurityProfile.Unconfined
    assert spec_security.seccomp_section(ctx, frozenset()) is None
    legacy = api_pb2.LinuxContainerSecurityContext(seccomp_profile_path="runtime/default")
    assert spec_security.seccomp_section(legacy, frozenset()) is not None


def test_apparmor_without_host_support() -> None:
    ctx = api_pb2.LinuxContainerSecurityContext()
    ctx.apparmor.profile_type = api_pb2.SecurityProfile.RuntimeDefault
    assert spec_security.apparmor_profile(ctx, host_has_apparmor=False) == ""
    ctx.apparmor.profile_type = api_pb2.SecurityProfile.Localhost
    ctx.apparmor.localhost_ref = "my-profile"
    with pytest.raises(InvalidArgument):
        spec_security.apparmor_profile(ctx, host_has_apparmor=False)
    assert spec_security.apparmor_profile(ctx, host_has_apparmor=True) == "my-profile"


def test_resources_and_oom_clamp() -> None:
    resources = api_pb2.LinuxContainerResources(
        cpu_shares=512, cpu_quota=50000, cpu_period=100000, cpuset_cpus="0",
        memory_limit_in_bytes=64 << 20, oom_score_adj=-999,
        hugepage_limits=[api_pb2.HugepageLimit(page_size="2MB", limit=1 << 21)],
    )
    resources.unified["pids.max"] = "100"
    host = ResourceHost(swap_accounting=True, hugetlb=False, oom_score_adj_floor=0)
    section = resources_section(resources, host)
    assert section["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"}
    assert section["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert section["pids"] == {"limit": 100}
    assert "hugepageLimits" not in section  # no hugetlb controller on this host
    assert resources_section(resources, ResourceHost(hugetlb=True))["hugepageLimits"] == [
        {"pageSize": "2MB", "limit": 1 << 21}
    ]
    assert "swap" not in resources_section(resources, ResourceHost())["memory"]
    assert clamp_oom_score_adj(-999, host) == 0
    assert clamp_oom_score_adj(-999, ResourceHost()) == -999
    assert clamp_oom_score_adj(5000, ResourceHost()) == 1000


def test_container_spec_namespaces_mounts_and_security() -> None:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="c"),
        command=["sh"],
        tty=True,
        mounts=[
            api_pb2.Mount(container_path="/data", host_path="/srv/data", readonly=True,
                          selinux_relabel=True),
            api_pb2.Mount(container_path="/shared", host_path="/srv/shared",
                          propagation=api_pb2.PROPAGATION_BIDIRECTIONAL),
            api_pb2.Mount(container_path="/etc/hosts", host_path="/kubelet/hosts"),
        ],
    )
    sc = config.linux.security_context
    sc.readonly_rootfs = True
    sc.no_new_privs = True
    sc.masked_paths.append("/proc/secret")
    config.linux.resources.oom_score_adj = 500
    result = make_spec(config)
    ns = {n["type"]: n.get("path") for n in result["linux"]["namespaces"]}
    assert ns == {"mount": None, "network": "/run/netns/x", "ipc": "/proc/1/ns/ipc",
                  "uts": "/proc/1/ns/uts", "pid": "/proc/1/ns/pid"}
    mounts = {m["destination"]: m for m in result["mounts"]}
    assert mounts["/data"]["options"] == ["rbind", "rprivate", "ro"]
    assert mounts["/shared"]["options"] == ["rbind", "rshared", "rw"]
    assert mounts["/etc/hosts"]["source"] == "/kubelet/hosts"  # kubelet's mount wins
    assert mounts["/etc/resolv.conf"]["source"] == "/pod/resolv.conf"
    assert mounts["/dev/shm"]["source"] == "/pod/shm"
    assert result["linux"]["rootfsPropagation"] == "rshared"
    assert result["root"] == {"path": "/rootfs", "readonly": True}
    assert result["process"]["terminal"] is True
    assert result["process"]["noNewPrivileges"] is True
    assert result["process"]["oomScoreAdj"] == 500
    assert result["linux"]["maskedPaths"] == ["/proc/secret"]
    assert result["linux"]["cgroupsPath"] == "/crivm/pod-x/crivm-y"
    assert result["annotations"][spec.ANNOTATION_SANDBOX_ID] == "p" * 64


def test_pid_namespace_modes_and_host_network() -> None:
    config = api_pb2.ContainerConfig(command=["sh"])
    config.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
    ns = [n for n in make_spec(config)["linux"]["namespaces"] if n["type"] == "pid"]
    assert ns == [{"type": "pid"}]
    host = spec.PodNamespaces(ipc="/proc/1/ns/ipc")  # host network, uts and pid
    config.linux.security_context.namespace_options.pid = api_pb2.NODE
    types = {n["type"] for n in make_spec(config, namespaces=host)["linux"]["namespaces"]}
    assert types == {"mount", "ipc"}
    sys_mount = next(m for m in make_spec(config, namespaces=host)["mounts"]
                     if m["destination"] == "/sys")
    assert sys_mount["type"] == "bind"


def test_privileged_needs_privileged_pod() -> None:
    config = api_pb2.ContainerConfig(command=["sh"])
    config.linux.security_context.privileged = True
    with pytest.raises(InvalidArgument):
        make_spec(config)
    pod = api_pb2.PodSandboxConfig()
    pod.linux.security_context.privileged = True
    result = make_spec(config, pod=pod)
    assert result["linux"]["maskedPaths"] == [] and result["linux"]["readonlyPaths"] == []
    assert result["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "seccomp" not in result["linux"]


def test_devices() -> None:
    device = spec.DeviceNode(path="/dev/fuse", kind="c", major=10, minor=229,
                             file_mode=0o666, uid=0, gid=0, permissions="rw")
    result = spec.container_spec(
        pod_id="p", config=api_pb2.ContainerConfig(command=["sh"]),
        pod_config=api_pb2.PodSandboxConfig(), image=ImageSettings(), user=ROOT,
        rootfs="/r", cgroups_path="/c", namespaces=spec.PodNamespaces(),
        files=spec.PodFiles(), devices=[device], host=HOST,
    )
    assert result["linux"]["devices"][0]["path"] == "/dev/fuse"
    assert {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"} in (
        result["linux"]["resources"]["devices"]
    )


def test_sandbox_spec() -> None:
    pod = api_pb2.PodSandboxConfig(hostname="h")
    pod.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    result = spec.sandbox_spec(
        pod_id="p" * 64, config=pod, image=ImageSettings(entrypoint=("/pause",)),
        rootfs="/r", cgroups_path="/crivm/pod-p/crivm-p", netns_path="/run/netns/p",
        files=spec.PodFiles(shm="/pod/shm"), host=HOST,
    )
    types = {n["type"]: n.get("path") for n in result["linux"]["namespaces"]}
    assert types == {"mount": None, "network": "/run/netns/p", "ipc": None, "uts": None,
                     "pid": None}
    assert result["hostname"] == "h"
    assert result["process"]["args"] == ["/pause"]
    assert result["linux"]["sysctl"] == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert result["root"]["readonly"] is True


def test_cgroup_parent() -> None:
    assert spec.cgroup_parent(api_pb2.PodSandboxConfig(), "abc") == "/crivm/pod-abc"
    pod = api_pb2.PodSandboxConfig()
    pod.linux.cgroup_parent = "/kubepods/besteffort/pod123/"
    assert spec.cgroup_parent(pod, "abc") == "/kubepods/besteffort/pod123"
    pod.linux.cgroup_parent = "kubepods-besteffort.slice"
    with pytest.raises(InvalidArgument):
        spec.cgroup_parent(pod, "abc")

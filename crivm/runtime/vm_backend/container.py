"""Creating a container in a VM pod: its rootfs and volumes into the shared directory, a
guest-side OCI spec into its bundle, and conmon running the crivm shim CLI on it.

The spec comes from the runc backend's generator, fed guest paths: the rootfs and volumes as
the guest sees them under the virtio-fs mount, the pod's files from the shared dir, no host
devices and no host namespace paths. The agent adapts the rest (root path, cgroups, network).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from crivm.proto import api_pb2
from crivm.runtime.backend import ContainerRequest
from crivm.runtime.runc_backend import spec
from crivm.runtime.runc_backend.container import request_layout, spawn_under_conmon
from crivm.runtime.runc_backend.environment import (
    RuncEnvironment,
)
from crivm.runtime.runc_backend.passwd import resolve_user
from crivm.runtime.store import ContainerRecord, PodRecord
from crivm.runtime.undo import UndoSteps
from crivm.runtime.vm_backend import shared_dir
from crivm.runtime.vm_backend.sandbox import VmEnvironment, guest_pod_file
from crivm.shim.bundle import (
    ANNOTATION_AGENT_SOCKET,
    ANNOTATION_GUEST_ROOTFS,
    ANNOTATION_OOM_FILE,
    ANNOTATION_STDIN,
)
from crivm.shim.vm_spec import GUEST_SHARED_DIR

log = logging.getLogger(__name__)

# The guest's own network namespace: the agent drops namespace paths, but naming one keeps
# the generator from treating the container as host-network (which would bind /sys).
GUEST_NETNS = "/proc/1/ns/net"


def _read_image_file(rootfs: str, relative: str) -> str:
    path = os.path.realpath(os.path.join(rootfs, relative))
    if not path.startswith(os.path.realpath(rootfs) + os.sep):
        return ""
    try:
        return Path(path).read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def guest_spec(request: ContainerRequest, env: RuncEnvironment, mux_socket: str) -> dict[str, Any]:
    """The OCI spec the agent receives, with every path a guest path."""
    ctr = request.container
    guest_dir = f"{GUEST_SHARED_DIR}/{ctr.id}"
    config = api_pb2.ContainerConfig()
    config.CopyFrom(request.config)
    for index, mount in enumerate(config.mounts):
        mount.host_path = f"{guest_dir}/volumes/{index}"
    if config.devices:
        log.warning("container %s: host devices are not passed into VMs; ignoring %d",
                    ctr.id, len(config.devices))
        del config.devices[:]
    user, group, supplemental = spec.user_request(config, request.image)
    process_user = resolve_user(
        user, group, supplemental,
        _read_image_file(request.rootfs, "etc/passwd"),
        _read_image_file(request.rootfs, "etc/group"),
    )
    files = spec.PodFiles(resolv_conf=guest_pod_file("resolv.conf"),
                          hostname=guest_pod_file("hostname"), hosts=guest_pod_file("hosts"))
    result = spec.container_spec(
        pod_id=request.pod.id,
        config=config,
        pod_config=request.pod_config,
        image=request.image,
        user=process_user,
        rootfs=f"{guest_dir}/rootfs",
        cgroups_path=f"/crivm/{ctr.id}",
        namespaces=spec.PodNamespaces(network=GUEST_NETNS),
        files=files,
        devices=[],
        # The guest kernel has no AppArmor.
        host=dataclasses.replace(env.host, apparmor=False),
    )
    # The VM is the pod, so containers share its IPC; each gets a UTS namespace only to carry
    # the pod's hostname (the guest's own is the VM's).
    result["linux"]["namespaces"].append({"type": "uts"})
    result["hostname"] = request.pod_config.hostname
    result["annotations"].update({
        ANNOTATION_AGENT_SOCKET: mux_socket,
        ANNOTATION_GUEST_ROOTFS: f"{guest_dir}/rootfs",
        ANNOTATION_STDIN: "true" if request.config.stdin else "false",
    })
    return result


def _host_mounts(config: api_pb2.ContainerConfig) -> list[tuple[str, bool]]:
    mounts = []
    for mount in config.mounts:
        # kubelet makes volume dirs itself; crictl users expect a missing one to be made.
        if mount.host_path and not os.path.exists(mount.host_path):
            os.makedirs(mount.host_path, mode=0o755, exist_ok=True)
        mounts.append((mount.host_path, mount.readonly))
    return mounts


async def create(vm: VmEnvironment, env: RuncEnvironment,
                 request: ContainerRequest) -> dict[str, Any]:
    ctr = request.container
    config = request.config
    extra = {"pod_id": request.pod.id, "container_id": ctr.id}
    paths = vm.paths_of(request.pod)
    host_dir = os.path.join(paths.shared_dir, ctr.id)
    layout = request_layout(env, request)
    container_spec = guest_spec(request, env, paths.mux_socket)
    # The shim marks an OOM kill in the guest where conmon would, so status reads it alike.
    container_spec["annotations"][ANNOTATION_OOM_FILE] = layout.oom_file
    async with UndoSteps(extra) as undo:
        undo.add("unbind the container's shared files", shared_dir.unbind_tree, host_dir)
        await shared_dir.bind_async(request.rootfs, os.path.join(host_dir, "rootfs"))
        for index, (source, readonly) in enumerate(_host_mounts(config)):
            await shared_dir.bind_async(
                source, os.path.join(host_dir, "volumes", str(index)), readonly=readonly,
                directory=os.path.isdir(source),
            )
        pid = await spawn_under_conmon(env, undo, layout, container_spec, config)
        undo.commit()
    log.info("created VM container %s (shim pid %d)", ctr.id, pid, extra=extra)
    user = container_spec["process"]["user"]
    return {
        "pid": pid,
        "log_path": layout.log_path,
        "stop_signal": request.image.stop_signal,
        "user": {"uid": user["uid"], "gid": user["gid"],
                 "groups": list(user.get("additionalGids", []))},
    }


async def remove_shared(vm: VmEnvironment, pod: PodRecord, ctr: ContainerRecord) -> None:
    """Unbind the container's rootfs and volumes from the pod's shared directory."""
    await shared_dir.unbind_tree(os.path.join(vm.paths_of(pod).shared_dir, ctr.id))

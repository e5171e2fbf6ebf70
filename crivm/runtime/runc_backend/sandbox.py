"""The pod's infra container: a pause process under conmon + runc that holds the namespaces.

The CRI layer made the netns and the CNI attachment already; this module adds the pod's shared
files, the pause rootfs (from the image service), and the infra container itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from crivm.runtime.backend import ImageSettings, SandboxRequest
from crivm.runtime.runc_backend import conmon, spec
from crivm.runtime.runc_backend.environment import (
    RuncEnvironment,
    delete_container,
    discard_layout,
    make_layout_dirs,
    remove_layout,
    wait_for_exit,
    write_spec,
)
from crivm.runtime.runc_backend.host import move_to_cgroup, remove_cgroup
from crivm.runtime.runc_backend.oci import OciRuntimeError, process_alive
from crivm.runtime.runc_backend.pod_files import remove_pod_files, write_hosts, write_pod_files
from crivm.runtime.store import PodRecord
from crivm.runtime.undo import UndoSteps

if TYPE_CHECKING:
    from crivm.storage.service import ImageService

log = logging.getLogger(__name__)

INFRA_STOP_TIMEOUT_S = 10.0


def infra_layout(env: RuncEnvironment, pod_id: str) -> conmon.ContainerLayout:
    # pause writes nothing, but conmon wants a log file.
    return env.layout(pod_id, os.path.join(env.root, "oci", pod_id, "infra.log"))


async def start(
    env: RuncEnvironment, images: ImageService, pause_image: str, request: SandboxRequest
) -> dict[str, Any]:
    pod_id = request.pod.id
    config = request.config
    extra = {"pod_id": pod_id}
    pod_dir = env.pod_dir(pod_id)
    parent = spec.cgroup_parent(config, pod_id)
    layout = infra_layout(env, pod_id)
    async with UndoSteps(extra) as undo:
        undo.add("remove the pod's shared files", remove_pod_files, pod_dir)
        # /etc/hosts gets the pod's addresses once CNI ADD (running meanwhile) has them.
        files = await asyncio.to_thread(write_pod_files, pod_dir, config, ())

        image = await images.ensure_image(pause_image)
        rootfs = await images.create_rootfs(image.id, pod_id)
        undo.add("remove the pause rootfs", images.remove_rootfs, pod_id)

        undo.add("remove the infra bundle", remove_layout, layout)
        make_layout_dirs(layout)
        infra_spec = spec.sandbox_spec(
            pod_id=pod_id,
            config=config,
            image=ImageSettings.from_oci_config(image.config),
            rootfs=str(rootfs.path),
            cgroups_path=spec.cgroups_path(parent, pod_id),
            netns_path=request.netns_path,
            files=files,
            host=env.host,
        )
        write_spec(layout, infra_spec)

        if not config.linux.cgroup_parent:
            undo.add("remove the pod cgroup", remove_cgroup, parent, "/crivm")
        undo.add("delete the infra container", delete_container, env, layout)
        pid = await conmon.spawn(
            _conmon_argv(env, layout, config.metadata.name), cwd=layout.bundle
        )
        move_to_cgroup(conmon.read_pid(layout.conmon_pidfile), parent)
        await env.runtime.start(pod_id)
        ips = await request.ips()
        if ips:
            write_hosts(files.hosts, config.hostname, ips)
        undo.commit()
    log.info("infra container of pod %s runs as pid %d", pod_id, pid, extra=extra)
    return {
        "infra_pid": pid,
        "cgroup_parent": parent,
        "own_cgroup_parent": not config.linux.cgroup_parent,
        "netns_path": request.netns_path,
        "pod_files": {
            "resolv_conf": files.resolv_conf,
            "hostname": files.hostname,
            "hosts": files.hosts,
            "shm": files.shm,
        },
    }


def _conmon_argv(env: RuncEnvironment, layout: conmon.ContainerLayout, name: str) -> list[str]:
    return conmon.conmon_argv(
        conmon_path=env.conmon_path,
        runtime_path=env.runtime.runtime_path,
        runtime_args=env.runtime.global_args,
        layout=layout,
        name=f"{name}-infra",
        stdio=conmon.Stdio(),
    )


async def stop(env: RuncEnvironment, pod: PodRecord) -> None:
    """Kill the pause process; a pod whose infra is gone is already stopped."""
    layout = infra_layout(env, pod.id)
    if not env.runtime.exists(pod.id) or conmon.read_exit(layout) is not None:
        return
    # No `runc state` first (8-10 ms): a kill that races the infra's exit is checked after.
    try:
        await env.runtime.kill(pod.id, int(signal.SIGKILL), all_processes=True)
    except OciRuntimeError:
        state = await env.runtime.state(pod.id)
        if state is None or state.status == "stopped":
            return
        raise
    if await wait_for_exit(layout, INFRA_STOP_TIMEOUT_S) is None:
        log.warning("infra container of pod %s did not report its exit", pod.id,
                    extra={"pod_id": pod.id})


async def remove(env: RuncEnvironment, images: ImageService, pod: PodRecord) -> None:
    layout = infra_layout(env, pod.id)
    await delete_container(env, layout)
    await images.remove_rootfs(pod.id)
    await asyncio.to_thread(remove_pod_files, env.pod_dir(pod.id))
    discard_layout(env, layout)
    if pod.extra.get("own_cgroup_parent", True):
        remove_cgroup(pod.extra.get("cgroup_parent") or f"/crivm/pod-{pod.id}", "/crivm")


async def alive(env: RuncEnvironment, pod: PodRecord) -> bool:
    """Cheap: the infra's exit file, else whether its pid lives (no runc call per pod)."""
    if conmon.read_exit(infra_layout(env, pod.id)) is not None:
        return False
    return process_alive(int(pod.extra.get("infra_pid", 0)))

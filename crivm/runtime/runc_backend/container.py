"""A pod's workload containers: created by conmon + runc into the infra container's
namespaces, observed through runc's state and conmon's exit files."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
from pathlib import Path
from typing import Any

from crivm.errors import FailedPrecondition, InvalidArgument, NotFound
from crivm.proto import api_pb2
from crivm.runtime.backend import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    ContainerRequest,
    ContainerStatus,
)
from crivm.runtime.runc_backend import conmon, spec
from crivm.runtime.runc_backend.environment import (
    RuncEnvironment,
    delete_container,
    discard_layout,
    live_conmon_pid,
    make_layout_dirs,
    read_spec,
    remove_layout,
    wait_for_exit,
    write_spec,
)
from crivm.runtime.runc_backend.host import move_to_cgroup
from crivm.runtime.runc_backend.image_command import check_command
from crivm.runtime.runc_backend.oci import OciRuntimeError, process_alive, signal_number
from crivm.runtime.runc_backend.passwd import resolve_user
from crivm.runtime.runc_backend.spec_resources import resources_section
from crivm.runtime.store import ContainerRecord, PodRecord
from crivm.runtime.undo import UndoSteps

log = logging.getLogger(__name__)

# A row's extra field: False while the container exists only as its bundle (see ``create``).
RUNTIME_CREATED = "runtime_created"
# Containers whose start is under way. A second start meanwhile would find the row still
# created, and its failing `runc create` would undo the first one's container.
_STARTING: set[str] = set()

KILL_WAIT_S = 10.0
# A container whose process is gone gets this long for conmon to write its exit file.
EXIT_FILE_GRACE_S = 2.0
REOPEN_WAIT_S = 5.0


def container_log_path(pod_config: api_pb2.PodSandboxConfig, log_path: str) -> str:
    if not log_path:
        return ""
    if os.path.isabs(log_path):
        return log_path
    if not pod_config.log_directory:
        raise InvalidArgument("the container has a relative log_path but the pod no log_directory")
    return os.path.join(pod_config.log_directory, log_path)


def layout_of(env: RuncEnvironment, container: ContainerRecord) -> conmon.ContainerLayout:
    log_path = container.extra.get("log_path") or os.path.join(
        env.root, "oci", container.id, "console.log"
    )
    return env.layout(container.id, str(log_path))


def _read_image_file(rootfs: str, relative: str) -> str:
    """A file of the image, never following a symlink out of the rootfs."""
    path = os.path.realpath(os.path.join(rootfs, relative))
    if not path.startswith(os.path.realpath(rootfs) + os.sep):
        return ""
    try:
        return Path(path).read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""


def _device_nodes(devices: list[api_pb2.Device]) -> list[spec.DeviceNode]:
    nodes = []
    for device in devices:
        try:
            info = os.stat(device.host_path)
        except OSError as exc:
            raise InvalidArgument(f"device {device.host_path}: {exc.strerror}") from exc
        if stat.S_ISCHR(info.st_mode):
            kind = "c"
        elif stat.S_ISBLK(info.st_mode):
            kind = "b"
        else:
            raise InvalidArgument(f"{device.host_path} is not a device node")
        nodes.append(spec.DeviceNode(
            path=device.container_path or device.host_path,
            kind=kind,
            major=os.major(info.st_rdev),
            minor=os.minor(info.st_rdev),
            file_mode=stat.S_IMODE(info.st_mode),
            uid=info.st_uid,
            gid=info.st_gid,
            permissions=device.permissions or "rwm",
        ))
    return nodes


def _ensure_mount_sources(mounts: list[api_pb2.Mount]) -> None:
    # kubelet creates volume dirs itself; crictl users expect a missing host dir to be made,
    # as CRI-O does.
    for mount in mounts:
        if mount.host_path and not os.path.exists(mount.host_path):
            os.makedirs(mount.host_path, mode=0o755, exist_ok=True)


def _pod_namespaces(
    pod: PodRecord, config: api_pb2.ContainerConfig, target: ContainerRecord | None
) -> spec.PodNamespaces:
    infra = f"/proc/{pod.extra['infra_pid']}/ns"
    pod_config = api_pb2.PodSandboxConfig.FromString(pod.config)
    pod_ns = pod_config.linux.security_context.namespace_options
    pid_mode = config.linux.security_context.namespace_options.pid
    pid = ""
    if pid_mode == api_pb2.POD and pod_ns.pid != api_pb2.NODE:
        pid = f"{infra}/pid"
    elif pid_mode == api_pb2.TARGET:
        if target is None or not target.extra.get("pid"):
            raise NotFound("the pid namespace target container is not running")
        pid = f"/proc/{target.extra['pid']}/ns/pid"
    host_network = pod_ns.network == api_pb2.NODE
    return spec.PodNamespaces(
        network=pod.extra.get("netns_path", "") if not host_network else "",
        ipc="" if pod_ns.ipc == api_pb2.NODE else f"{infra}/ipc",
        uts="" if host_network else f"{infra}/uts",
        pid=pid,
    )


def request_layout(env: RuncEnvironment, request: ContainerRequest) -> conmon.ContainerLayout:
    """Where a container's bundle, exit file and log go (the log where kubelet asked)."""
    ctr_id = request.container.id
    log_path = container_log_path(request.pod_config, request.config.log_path)
    return env.layout(ctr_id, log_path or os.path.join(env.root, "oci", ctr_id, "console.log"))


def write_bundle(undo: UndoSteps, layout: conmon.ContainerLayout,
                 container_spec: dict[str, Any]) -> None:
    undo.add("remove the container bundle", remove_layout, layout)
    make_layout_dirs(layout)
    write_spec(layout, container_spec)


async def spawn_under_conmon(
    env: RuncEnvironment, undo: UndoSteps, layout: conmon.ContainerLayout,
    container_spec: dict[str, Any], config: api_pb2.ContainerConfig,
) -> int:
    """Write the bundle and have conmon create the container through the handler's runtime
    (runc, or crivm-shim for VM containers); each step registers its undo."""
    write_bundle(undo, layout, container_spec)
    return await _conmon_create(env, undo, layout, config)


async def _conmon_create(env: RuncEnvironment, undo: UndoSteps, layout: conmon.ContainerLayout,
                         config: api_pb2.ContainerConfig) -> int:
    """conmon runs the runtime's ``create`` on the written bundle; the container's pid."""
    undo.add("delete the container", delete_container, env, layout)
    return await conmon.spawn(conmon.conmon_argv(
        conmon_path=env.conmon_path,
        runtime_path=env.runtime.runtime_path,
        runtime_args=env.runtime.global_args,
        layout=layout,
        name=config.metadata.name,
        stdio=conmon.Stdio(tty=config.tty, stdin=config.stdin, stdin_once=config.stdin_once),
    ), cwd=layout.bundle)


async def create(
    env: RuncEnvironment, request: ContainerRequest, target: ContainerRecord | None
) -> dict[str, Any]:
    ctr = request.container
    config = request.config
    extra = {"pod_id": request.pod.id, "container_id": ctr.id}
    layout = request_layout(env, request)
    user, group, supplemental = spec.user_request(config, request.image)
    process_user = resolve_user(
        user, group, supplemental,
        _read_image_file(request.rootfs, "etc/passwd"),
        _read_image_file(request.rootfs, "etc/group"),
    )
    files = request.pod.extra.get("pod_files", {})
    pod_config = request.pod_config
    container_spec = spec.container_spec(
        pod_id=request.pod.id,
        config=config,
        pod_config=pod_config,
        image=request.image,
        user=process_user,
        rootfs=request.rootfs,
        cgroups_path=spec.cgroups_path(request.pod.extra["cgroup_parent"], ctr.id),
        namespaces=_pod_namespaces(request.pod, config, target),
        files=spec.PodFiles(**files),
        devices=_device_nodes(list(config.devices)),
        host=env.host,
    )
    check_command(request.rootfs, container_spec)
    async with UndoSteps(extra) as undo:
        _ensure_mount_sources(list(config.mounts))
        write_bundle(undo, layout, container_spec)
        undo.commit()
    log.info("created container %s (runtime create deferred to its start)", ctr.id,
             extra=extra)
    return {
        # The runtime's ``create`` runs in StartContainer, as containerd does it: a created
        # container is its bundle, its rootfs and its row until then.
        RUNTIME_CREATED: False,
        "log_path": layout.log_path,
        "stop_signal": request.image.stop_signal,
        "user": {"uid": process_user.uid, "gid": process_user.gid,
                 "groups": list(process_user.additional_gids)},
    }


async def start(env: RuncEnvironment, pod: PodRecord, container: ContainerRecord
                ) -> dict[str, Any]:
    """conmon + the runtime's ``create`` on the bundle CreateContainer wrote, then its
    ``start``; the fields to add to the row. A failure leaves the container as it was,
    created, with no runtime state and no conmon."""
    if container.state != CONTAINER_CREATED:
        raise FailedPrecondition(f"container {container.id} is {container.state}, not created")
    if container.id in _STARTING:
        raise FailedPrecondition(f"container {container.id} is being started")
    _STARTING.add(container.id)
    try:
        return await _start(env, pod, container)
    finally:
        _STARTING.discard(container.id)


async def _start(env: RuncEnvironment, pod: PodRecord, container: ContainerRecord
                 ) -> dict[str, Any]:
    if runtime_created(container):
        # Created in the runtime at CreateContainer: a VM container (conmon and the shim),
        # or a row from before the create moved here. The runtime itself refuses a
        # container that is not in its created state.
        await env.runtime.start(container.id)
        return {}
    config = api_pb2.ContainerConfig.FromString(container.config)
    layout = layout_of(env, container)
    extra = {"pod_id": pod.id, "container_id": container.id}
    async with UndoSteps(extra) as undo:
        pid = await _conmon_create(env, undo, layout, config)
        conmon_pid = conmon.read_pid(layout.conmon_pidfile)
        move_to_cgroup(conmon_pid, pod.extra["cgroup_parent"])
        env.exits.watch(container.id, conmon_pid)
        undo.add("forget the exit watch", env.exits.forget, container.id)
        await env.runtime.start(container.id)
        undo.commit()
    log.info("started container %s (pid %d)", container.id, pid, extra=extra)
    return {"pid": pid, RUNTIME_CREATED: True}


def runtime_created(container: ContainerRecord) -> bool:
    return bool(container.extra.get(RUNTIME_CREATED, True))


async def stop(env: RuncEnvironment, container: ContainerRecord, timeout_s: float) -> None:
    if not runtime_created(container):
        return  # nothing runs yet; it stays created, as in containerd
    layout = layout_of(env, container)
    if conmon.read_exit(layout) is not None:
        return
    # No `runc state` first: the row says whether the container was started, and a kill
    # that races the container's own exit is sorted out by ``_kill``.
    if container.state == CONTAINER_RUNNING and timeout_s > 0:
        signum = signal_number(str(container.extra.get("stop_signal", "")))
        if not await _kill(env, container.id, signum, all_processes=False):
            await wait_for_exit(layout, EXIT_FILE_GRACE_S)
            return
        if await wait_for_exit(layout, timeout_s) is not None:
            return
        log.info("container %s ignored signal %d for %.0fs; killing it", container.id, signum,
                 timeout_s, extra={"container_id": container.id})
    # --all: with a private pid namespace the init's death kills the rest anyway, but a
    # container sharing the pod's pid namespace leaves its other processes otherwise.
    if not await _kill(env, container.id, int(signal.SIGKILL), all_processes=True):
        await wait_for_exit(layout, EXIT_FILE_GRACE_S)
        return
    if await wait_for_exit(layout, KILL_WAIT_S) is None:
        log.warning("container %s did not exit after SIGKILL", container.id,
                    extra={"container_id": container.id})


async def _kill(env: RuncEnvironment, container_id: str, signum: int, all_processes: bool) -> bool:
    """Signal the container; False when it had stopped already (the runtime refuses to
    signal a stopped container, or no longer knows it)."""
    try:
        await env.runtime.kill(container_id, signum, all_processes=all_processes)
        return True
    except OciRuntimeError:
        state = await env.runtime.state(container_id)
        if state is None or state.status == "stopped":
            return False
        raise


async def release(env: RuncEnvironment, container: ContainerRecord) -> bool:
    """Delete an exited container's runtime state right away, as containerd does when it
    sees the exit, so RemoveContainer has only files left to drop. A container still
    running is left alone (False)."""
    layout = layout_of(env, container)
    if conmon.read_exit(layout) is None:
        return False
    await delete_container(env, layout)
    return True


def watch_exit(env: RuncEnvironment, container: ContainerRecord) -> None:
    """Watch a container found running after a daemon restart (see ``exit_watch``)."""
    layout = layout_of(env, container)
    pid = live_conmon_pid(layout)
    if pid:
        env.exits.watch(container.id, pid)
        # conmon may have exited between the read and the watch; the file says so.
        if conmon.read_exit(layout) is not None:
            env.exits.forget(container.id)


async def remove(env: RuncEnvironment, container: ContainerRecord) -> None:
    env.exits.forget(container.id)
    layout = layout_of(env, container)
    await delete_container(env, layout)
    discard_layout(env, layout)


def known_running(env: RuncEnvironment, container: ContainerRecord) -> bool:
    """Recorded as running, and its conmon is watched and alive: it runs, no I/O needed."""
    return container.state == CONTAINER_RUNNING and env.exits.monitor_alive(container.id)


async def status(env: RuncEnvironment, container: ContainerRecord) -> ContainerStatus:
    """Cheap when nothing changed: a watched live conmon answers from memory, an exit
    file or a live pid without runc."""
    if not runtime_created(container):
        return ContainerStatus(state=CONTAINER_CREATED)
    pid = int(container.extra.get("pid", 0))
    if known_running(env, container):
        return ContainerStatus(state=CONTAINER_RUNNING, pid=pid)
    layout = layout_of(env, container)
    exited = conmon.read_exit(layout)
    if exited is None and container.state == CONTAINER_RUNNING and process_alive(pid):
        return ContainerStatus(state=CONTAINER_RUNNING, pid=pid)
    if exited is None:
        state = await env.runtime.state(container.id)
        if state is not None and state.status == "created":
            return ContainerStatus(state=CONTAINER_CREATED, pid=pid)
        if state is not None and state.status in ("running", "paused"):
            return ContainerStatus(state=CONTAINER_RUNNING, pid=pid)
        exited = await wait_for_exit(layout, EXIT_FILE_GRACE_S)
    if exited is None:
        return ContainerStatus(
            state=CONTAINER_EXITED if container.state == CONTAINER_RUNNING else CONTAINER_UNKNOWN,
            exit_code=255,
            reason="Error",
            message="crivm lost the container's state (no exit file, no runtime state)",
        )
    if exited.oom_killed:
        reason = "OOMKilled"
    elif exited.exit_code == 0:
        reason = "Completed"
    else:
        reason = "Error"
    return ContainerStatus(
        state=CONTAINER_EXITED,
        pid=pid,
        finished_at=exited.finished_at,
        exit_code=exited.exit_code,
        reason=reason,
    )


async def update_resources(
    env: RuncEnvironment,
    container: ContainerRecord,
    resources: api_pb2.LinuxContainerResources,
) -> None:
    section = resources_section(resources, env.host.resources)
    if runtime_created(container):
        await env.runtime.update(container.id, section)
        return
    # Not in the runtime yet: the bundle's spec is what the create will apply.
    layout = layout_of(env, container)
    container_spec = read_spec(layout)
    container_spec.setdefault("linux", {}).setdefault("resources", {}).update(section)
    write_spec(layout, container_spec)


async def reopen_log(env: RuncEnvironment, container: ContainerRecord) -> None:
    layout = layout_of(env, container)
    if not runtime_created(container) or conmon.read_exit(layout) is not None:
        raise FailedPrecondition(f"container {container.id} is not running")
    await asyncio.to_thread(conmon.reopen_log, layout)
    # conmon handles the fifo on its own loop; kubelet expects the new file to exist when
    # the call returns.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REOPEN_WAIT_S
    while not os.path.exists(layout.log_path):
        if loop.time() > deadline:
            raise FailedPrecondition(f"conmon did not reopen {layout.log_path}")
        await asyncio.sleep(0.02)

"""Store records → CRI messages, and the CRI list filters."""

from __future__ import annotations

from collections.abc import Mapping

from crivm.proto import api_pb2
from crivm.runtime.backend import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    POD_READY,
)
from crivm.runtime.store import ContainerRecord, PodRecord

CONTAINER_STATES = {
    CONTAINER_CREATED: api_pb2.CONTAINER_CREATED,
    CONTAINER_RUNNING: api_pb2.CONTAINER_RUNNING,
    CONTAINER_EXITED: api_pb2.CONTAINER_EXITED,
}


def pod_state(pod: PodRecord, alive: bool) -> api_pb2.PodSandboxState:
    return api_pb2.SANDBOX_READY if pod.state == POD_READY and alive else api_pb2.SANDBOX_NOTREADY


def container_state(ctr: ContainerRecord) -> api_pb2.ContainerState:
    return CONTAINER_STATES.get(ctr.state, api_pb2.CONTAINER_UNKNOWN)


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_config(pod: PodRecord) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig.FromString(pod.config)


def container_config(ctr: ContainerRecord) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig.FromString(ctr.config)


def pod_sandbox(pod: PodRecord, state: api_pb2.PodSandboxState) -> api_pb2.PodSandbox:
    config = pod_config(pod)
    return api_pb2.PodSandbox(
        id=pod.id,
        metadata=config.metadata,
        state=state,
        created_at=pod.created_at,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        runtime_handler=pod.handler,
    )


def pod_sandbox_status(
    pod: PodRecord, state: api_pb2.PodSandboxState
) -> api_pb2.PodSandboxStatus:
    config = pod_config(pod)
    ips = list(pod.extra.get("ips", ()))
    network = api_pb2.PodSandboxNetworkStatus(
        ip=ips[0] if ips else "",
        additional_ips=[api_pb2.PodIP(ip=ip) for ip in ips[1:]],
    )
    return api_pb2.PodSandboxStatus(
        id=pod.id,
        metadata=config.metadata,
        state=state,
        created_at=pod.created_at,
        network=network,
        linux=api_pb2.LinuxPodSandboxStatus(
            namespaces=api_pb2.Namespace(
                options=config.linux.security_context.namespace_options
            )
        ),
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        runtime_handler=pod.handler,
    )


def _image_spec(ctr: ContainerRecord, config: api_pb2.ContainerConfig) -> api_pb2.ImageSpec:
    image = api_pb2.ImageSpec()
    image.CopyFrom(config.image)
    image.image = image.image or ctr.image_ref
    return image


def container(ctr: ContainerRecord) -> api_pb2.Container:
    config = container_config(ctr)
    return api_pb2.Container(
        id=ctr.id,
        pod_sandbox_id=ctr.pod_id,
        metadata=config.metadata,
        image=_image_spec(ctr, config),
        image_ref=str(ctr.extra.get("image_digest_ref") or ctr.image_id),
        state=container_state(ctr),
        created_at=ctr.created_at,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        image_id=ctr.image_id,
    )


def container_status(ctr: ContainerRecord) -> api_pb2.ContainerStatus:
    config = container_config(ctr)
    status = api_pb2.ContainerStatus(
        id=ctr.id,
        metadata=config.metadata,
        state=container_state(ctr),
        created_at=ctr.created_at,
        started_at=ctr.started_at,
        finished_at=ctr.finished_at,
        exit_code=ctr.exit_code,
        image=_image_spec(ctr, config),
        image_ref=str(ctr.extra.get("image_digest_ref") or ctr.image_id),
        reason=ctr.reason,
        message=ctr.message,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        mounts=list(config.mounts),
        log_path=str(ctr.extra.get("log_path", "")),
        image_id=ctr.image_id,
    )
    if config.linux.HasField("resources"):
        status.resources.linux.CopyFrom(config.linux.resources)
    user = ctr.extra.get("user")
    if isinstance(user, dict):
        status.user.linux.uid = int(user.get("uid", 0))
        status.user.linux.gid = int(user.get("gid", 0))
        status.user.linux.supplemental_groups.extend(user.get("groups", ()))
    return status

"""CreateContainer: a rootfs from the image service, then the container on the pod's backend."""

from __future__ import annotations

import logging

from crivm.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from crivm.proto import api_pb2
from crivm.runtime import events
from crivm.runtime.backend import CONTAINER_CREATED, POD_READY, ContainerRequest, ImageSettings
from crivm.runtime.cri_messages import pod_config
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import backend_of, containers, new_id, require_pod
from crivm.runtime.store import ContainerRecord, PodRecord, now_ns
from crivm.runtime.undo import UndoSteps

log = logging.getLogger(__name__)


async def handle(
    daemon: Daemon, request: api_pb2.CreateContainerRequest
) -> api_pb2.CreateContainerResponse:
    pod = require_pod(daemon, request.pod_sandbox_id)
    container_id = await _create(daemon, pod, request.config)
    return api_pb2.CreateContainerResponse(container_id=container_id)


def _check(daemon: Daemon, pod: PodRecord, config: api_pb2.ContainerConfig) -> None:
    if pod.state != POD_READY:
        raise FailedPrecondition(f"pod sandbox {pod.id} is not ready")
    if not config.metadata.name:
        raise InvalidArgument("container metadata needs a name")
    if not config.image.image:
        raise InvalidArgument("container config needs an image")
    for other in containers(daemon).of_pod(pod.id):
        if other.name == config.metadata.name and other.attempt == config.metadata.attempt:
            raise AlreadyExists(
                f"container {config.metadata.name} attempt {config.metadata.attempt} exists "
                f"in pod {pod.id} as {other.id}"
            )


async def _create(daemon: Daemon, pod: PodRecord, config: api_pb2.ContainerConfig) -> str:
    _check(daemon, pod, config)
    images = daemon.component("images")
    image = images.resolve(config.image.image)
    if image is None:
        raise NotFound(f"image {config.image.image} is not present; pull it first")
    ctr = ContainerRecord(
        id=new_id(), pod_id=pod.id, name=config.metadata.name,
        attempt=config.metadata.attempt, image_ref=config.image.image, image_id=image.id,
        state=CONTAINER_CREATED, created_at=now_ns(), config=config.SerializeToString(),
    )
    log_extra = {"pod_id": pod.id, "container_id": ctr.id}
    backend = backend_of(daemon, pod)
    view = containers(daemon)
    async with UndoSteps(log_extra) as undo:
        view.add(ctr)
        undo.add("delete the container's store row", view.delete, ctr.id)
        undo.add("remove the container's rootfs", images.remove_rootfs, ctr.id)
        rootfs = await images.create_rootfs(image.id, ctr.id)
        extra = await backend.create_container(ContainerRequest(
            pod=pod, pod_config=pod_config(pod), container=ctr, config=config,
            image=ImageSettings.from_oci_config(image.config), rootfs=str(rootfs.path),
        ))
        undo.add("remove the container", backend.remove_container, pod, ctr)
        digests = image.repo_digests
        extra["image_digest_ref"] = digests[0] if digests else image.id
        view.update(ctr.id, extra=extra)
        undo.commit()
    events.emit_container(daemon, pod.id, ctr.id, api_pb2.CONTAINER_CREATED_EVENT)
    log.info("created container %s (%s) from %s", ctr.id, ctr.name, config.image.image,
             extra=log_extra)
    return ctr.id

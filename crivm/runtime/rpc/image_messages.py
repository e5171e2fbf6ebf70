"""Image records as CRI messages, shared by the ImageService call modules."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.storage.catalog import ImageRecord
from crivm.storage.manifest import user_of
from crivm.storage.service import ImageService


def images_of(daemon: Daemon) -> ImageService:
    service: ImageService = daemon.component("images")
    return service


def image_message(record: ImageRecord) -> api_pb2.Image:
    runtime = record.config.get("config")
    user = runtime.get("User", "") if isinstance(runtime, dict) else ""
    uid, username = user_of(user if isinstance(user, str) else "")
    message = api_pb2.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        username=username,
        spec=api_pb2.ImageSpec(image=record.id),
        pinned=record.pinned,
    )
    if uid is not None:
        message.uid.value = uid
    return message

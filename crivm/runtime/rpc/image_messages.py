"""Image records as CRI messages, shared by the ImageService call modules."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime import wire
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


# ImageStatusResponse.image and ListImagesResponse.images are both field 1, so one encoded
# element answers either (tests/unit/test_image_messages.py holds the numbers to that).
IMAGE_FIELD = 1
# Encoded elements by record. The catalog makes new records whenever an image or its names
# change and never alters one, so a record's encoding stays right for its life; the entry
# keeps its record alive, so its id cannot be reused meanwhile.
_ELEMENTS: dict[int, tuple[ImageRecord, bytes]] = {}
_MAX_ELEMENTS = 4096


def image_element(record: ImageRecord) -> bytes:
    """``record`` as the encoded image field of ImageStatus and ListImages responses."""
    cached = _ELEMENTS.get(id(record))
    if cached is not None and cached[0] is record:
        return cached[1]
    if len(_ELEMENTS) >= _MAX_ELEMENTS:
        _ELEMENTS.clear()  # records of old catalog views; the live ones come back
    element = wire.field_element(IMAGE_FIELD, image_message(record))
    _ELEMENTS[id(record)] = (record, element)
    return element

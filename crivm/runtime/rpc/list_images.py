"""ListImages: every stored image, or only the one the filter's image names."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime import wire
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import image_element, images_of
from crivm.storage.catalog import ImageRecord


def matching(daemon: Daemon, request_filter: api_pb2.ImageFilter) -> list[ImageRecord]:
    images = images_of(daemon)
    wanted = request_filter.image.image
    if not wanted:
        return images.list_images()
    record = images.resolve(wanted)
    return [record] if record is not None else []


async def handle(daemon: Daemon, request: api_pb2.ListImagesRequest) -> wire.Encoded:
    return wire.Encoded(
        b"".join(image_element(record) for record in matching(daemon, request.filter))
    )

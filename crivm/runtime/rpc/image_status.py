"""ImageStatus: an unknown image is an empty answer, not an error; verbose adds the config."""

from __future__ import annotations

import json

from crivm.proto import api_pb2
from crivm.runtime import wire
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import image_element, image_message, images_of


async def handle(
    daemon: Daemon, request: api_pb2.ImageStatusRequest
) -> api_pb2.ImageStatusResponse | wire.Encoded:
    record = images_of(daemon).resolve(request.image.image)
    if record is None:
        return api_pb2.ImageStatusResponse()
    if not request.verbose:
        return wire.Encoded(image_element(record))
    response = api_pb2.ImageStatusResponse(image=image_message(record))
    if request.verbose:
        response.info["info"] = json.dumps(record.config)
    return response

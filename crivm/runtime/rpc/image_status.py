"""ImageStatus: an unknown image is an empty answer, not an error; verbose adds the config."""

from __future__ import annotations

import json

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import image_message, images_of


async def handle(
    daemon: Daemon, request: api_pb2.ImageStatusRequest
) -> api_pb2.ImageStatusResponse:
    record = images_of(daemon).resolve(request.image.image)
    if record is None:
        return api_pb2.ImageStatusResponse()
    response = api_pb2.ImageStatusResponse(image=image_message(record))
    if request.verbose:
        response.info["info"] = json.dumps(record.config)
    return response

"""RemoveImage: by id, tag or digest; removing an absent image succeeds."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import images_of


async def handle(
    daemon: Daemon, request: api_pb2.RemoveImageRequest
) -> api_pb2.RemoveImageResponse:
    await images_of(daemon).remove(request.image.image)
    return api_pb2.RemoveImageResponse()

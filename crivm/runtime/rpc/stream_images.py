"""StreamImages: ListImages in batches, for nodes with very many images."""

from __future__ import annotations

from collections.abc import AsyncIterator

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import image_message
from crivm.runtime.rpc.list_images import matching

BATCH = 100


async def handle(
    daemon: Daemon, request: api_pb2.StreamImagesRequest
) -> AsyncIterator[api_pb2.StreamImagesResponse]:
    records = matching(daemon, request.filter)
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        yield api_pb2.StreamImagesResponse(images=[image_message(r) for r in batch])

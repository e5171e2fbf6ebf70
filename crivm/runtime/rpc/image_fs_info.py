"""ImageFsInfo: bytes and inodes of the image store and of the containers' writable layers."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import images_of
from crivm.storage.disk_usage import FsUsage


def _usage(usage: FsUsage) -> api_pb2.FilesystemUsage:
    message = api_pb2.FilesystemUsage(
        timestamp=usage.timestamp_ns,
        fs_id=api_pb2.FilesystemIdentifier(mountpoint=usage.mountpoint),
    )
    message.used_bytes.value = usage.used_bytes
    message.inodes_used.value = usage.inodes_used
    return message


async def handle(
    daemon: Daemon, request: api_pb2.ImageFsInfoRequest
) -> api_pb2.ImageFsInfoResponse:
    images, containers = await images_of(daemon).fs_info()
    return api_pb2.ImageFsInfoResponse(
        image_filesystems=[_usage(images)], container_filesystems=[_usage(containers)]
    )

"""PullImage: pull through registries.conf with the request's credentials; answer the id."""

from __future__ import annotations

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.rpc.image_messages import images_of
from crivm.storage.credentials import Credentials


async def handle(daemon: Daemon, request: api_pb2.PullImageRequest) -> api_pb2.PullImageResponse:
    auth = request.auth
    try:
        credentials = Credentials.from_auth_fields(
            username=auth.username, password=auth.password, auth=auth.auth,
            identity_token=auth.identity_token, registry_token=auth.registry_token,
        )
    except ValueError as exc:
        raise InvalidArgument(f"PullImage auth: {exc}") from exc
    record = await images_of(daemon).pull(request.image.image, credentials)
    return api_pb2.PullImageResponse(image_ref=record.id)

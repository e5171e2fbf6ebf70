"""Attach: validate the request and return a single-use URL of the streaming server."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import require_container
from crivm.runtime.rpc.exec import check_streams
from crivm.runtime.streaming.server import StreamingServer
from crivm.runtime.streaming.tokens import AttachSpec


async def handle(daemon: Daemon, request: api_pb2.AttachRequest) -> api_pb2.AttachResponse:
    check_streams(request.tty, request.stdin, request.stdout, request.stderr)
    ctr = require_container(daemon, request.container_id)
    server: StreamingServer = daemon.component("streaming")
    spec = AttachSpec(ctr.id, request.tty, request.stdin, request.stdout, request.stderr)
    return api_pb2.AttachResponse(url=server.url_for(spec))

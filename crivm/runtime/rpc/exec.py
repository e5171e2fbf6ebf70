"""Exec: validate the request and return a single-use URL of the streaming server."""

from __future__ import annotations

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.records import require_container
from crivm.runtime.streaming.server import StreamingServer
from crivm.runtime.streaming.tokens import ExecSpec


def check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    """kubelet's rules: some stream must be wanted, and a terminal merges stderr into stdout."""
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")


async def handle(daemon: Daemon, request: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
    if not request.cmd:
        raise InvalidArgument("exec needs a command")
    check_streams(request.tty, request.stdin, request.stdout, request.stderr)
    ctr = require_container(daemon, request.container_id)
    server: StreamingServer = daemon.component("streaming")
    spec = ExecSpec(ctr.id, tuple(request.cmd), request.tty, request.stdin, request.stdout,
                    request.stderr)
    return api_pb2.ExecResponse(url=server.url_for(spec))

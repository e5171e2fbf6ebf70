"""Dispatch of the CRI services to one module per call.

Each RPC ``FooBar`` lives in ``crivm.runtime.rpc.foo_bar`` as ``async def handle(daemon,
request)`` (an async generator for server-streaming calls). The method table is built from the
service descriptors in the generated proto, so every published method is served: a call whose
module does not exist yet answers UNIMPLEMENTED, never a fake success. A handler returns
its response message, or a ``wire.Encoded`` response it assembled from cached encodings.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from crivm.errors import Unimplemented
from crivm.proto import api_pb2
from crivm.runtime.daemon import Daemon
from crivm.runtime.grpc_server import Method

SERVICES = ("RuntimeService", "ImageService")


def module_name(method: str) -> str:
    return "crivm.runtime.rpc." + re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


def methods(daemon: Daemon) -> dict[str, Method]:
    """Every CRI method by its request path, "/runtime.v1.RuntimeService/Version"."""
    table: dict[str, Method] = {}
    for service_name in SERVICES:
        service = api_pb2.DESCRIPTOR.services_by_name[service_name]
        for method in service.methods:
            table[f"/{service.full_name}/{method.name}"] = _method(daemon, method)
    return table


def _method(daemon: Daemon, method: MethodDescriptor) -> Method:
    request_cls = GetMessageClass(method.input_type)
    handle = _load(method.name)
    if handle is None:
        behavior = _unimplemented_stream if method.server_streaming else _unimplemented
        return Method(method.name, request_cls.FromString,
                      functools.partial(behavior, method.name), method.server_streaming)
    return Method(method.name, request_cls.FromString, functools.partial(handle, daemon),
                  method.server_streaming)


def _load(method: str) -> Callable[..., Any] | None:
    name = module_name(method)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise
    handle: Callable[..., Any] = module.handle
    return handle


async def _unimplemented(method: str, request: Any) -> Any:
    raise Unimplemented(f"crivm does not implement {method} yet")


async def _unimplemented_stream(method: str, request: Any) -> AsyncIterator[Any]:
    raise Unimplemented(f"crivm does not implement {method} yet")
    yield  # an async generator, like the streaming handlers

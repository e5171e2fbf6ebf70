"""Dispatch of the CRI services to one module per call.

Each RPC ``FooBar`` lives in ``crivm.runtime.rpc.foo_bar`` as ``async def handle(daemon,
request)`` (an async generator for server-streaming calls). The method table is built from the
service descriptors in the generated proto, so every published method is served: a call whose
module does not exist yet answers UNIMPLEMENTED, never a fake success. A handler returns
its response message, or a ``wire.Encoded`` response it assembled from cached encodings.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from crivm.errors import Unimplemented
from crivm.proto import api_pb2
from crivm.runtime import wire
from crivm.runtime.daemon import Daemon

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    MethodHandler = grpc.RpcMethodHandler[Any, Any]

SERVICES = ("RuntimeService", "ImageService")


def module_name(method: str) -> str:
    return "crivm.runtime.rpc." + re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


def generic_handlers(
    daemon: Daemon, wrap: Callable[[str, MethodHandler], MethodHandler] | None = None
) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """One generic handler per CRI service; ``wrap(method, handler)`` decorates each method
    once, here, rather than on every call."""
    handlers: list[grpc.GenericRpcHandler[Any, Any]] = []
    for service_name in SERVICES:
        service = api_pb2.DESCRIPTOR.services_by_name[service_name]
        methods = {m.name: _method_handler(daemon, m) for m in service.methods}
        if wrap is not None:
            methods = {name: wrap(name, handler) for name, handler in methods.items()}
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


def _method_handler(daemon: Daemon, method: MethodDescriptor) -> MethodHandler:
    request_cls = GetMessageClass(method.input_type)
    handle = _load(method.name)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _stream_behavior(daemon, method.name, handle),
            request_deserializer=request_cls.FromString,
            response_serializer=wire.serialize,
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary_behavior(daemon, method.name, handle),
        request_deserializer=request_cls.FromString,
        response_serializer=wire.serialize,
    )


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


def _unary_behavior(daemon: Daemon, method: str, handle: Callable[..., Any] | None) -> Any:
    async def behavior(request: Any, context: Context) -> Any:
        if handle is None:
            raise Unimplemented(f"crivm does not implement {method} yet")
        return await handle(daemon, request)

    return behavior


def _stream_behavior(daemon: Daemon, method: str, handle: Callable[..., Any] | None) -> Any:
    async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
        if handle is None:
            raise Unimplemented(f"crivm does not implement {method} yet")
        async for item in handle(daemon, request):
            yield item

    return behavior

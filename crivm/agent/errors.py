"""The agent's errors. Each is an RpcError, so the RPC layer sends its code to the host as is."""

from __future__ import annotations

from crivm.agent.rpc import Code, RpcError


class NotFound(RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(Code.NOT_FOUND, message)


class AlreadyExists(RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(Code.ALREADY_EXISTS, message)


class InvalidArgument(RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT, message)


class FailedPrecondition(RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(Code.FAILED_PRECONDITION, message)


class GuestError(RpcError):
    """A guest-side operation (runc, a syscall, netlink) failed."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.INTERNAL, message)

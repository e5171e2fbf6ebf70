"""The one place where crivm errors become gRPC status codes.

Every call gets a request id (logged on each line of the call), its duration and outcome are
logged and handed to the observers (the metrics endpoint), ``CrivmError`` subclasses are mapped
by class to their status code, and anything else is an INTERNAL error that is logged with its
traceback. The front end (``crivm.runtime.grpc_server``) brackets each call with ``begin`` and
``finish`` and asks ``failure`` what to answer for an exception.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from crivm.errors import CrivmError
from crivm.runtime import log as requestlog

log = logging.getLogger(__name__)

# Called with (method, seconds, status code name) after each call; the metrics endpoint hooks in.
CallObserver = Callable[[str, float, str], None]


class CallScope:
    def __init__(self, observers: list[CallObserver] | None = None) -> None:
        self.observers: list[CallObserver] = observers if observers is not None else []

    def begin(self) -> float:
        """Start a call in the current task; returns its start time for ``finish``."""
        # Each call runs in a task of its own, so the id stays in that task's context (and
        # in the tasks it spawns) and needs no reset.
        requestlog.request_id.set(secrets.token_hex(4))
        return time.perf_counter()

    def failure(self, method: str, exc: BaseException) -> tuple[str, str]:
        """The status code name and message that answer ``exc``."""
        if isinstance(exc, CrivmError):
            log.warning("%s failed: %s: %s", method, exc.code, exc)
            return exc.code, str(exc)
        log.error("%s failed with an unexpected error", method, exc_info=exc)
        return "INTERNAL", f"{method}: internal error: {exc}"

    def finish(self, method: str, started: float, code: str) -> None:
        seconds = time.perf_counter() - started
        level = logging.DEBUG if code == "OK" else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s in %.1f ms", method, code, seconds * 1000)
        for observer in self.observers:
            observer(method, seconds, code)

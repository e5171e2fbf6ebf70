"""Undo steps for multi-step creates, run in reverse when a later step fails.

    async with UndoSteps() as undo:
        ns = await make_netns()
        undo.add("remove the pod's netns", remove_netns, ns)
        ...
        undo.commit()          # success: keep everything

Each step is described, so the log says what was rolled back. A failing undo step is
logged and the rest still run; the error that caused the rollback is the one raised.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class UndoSteps:
    def __init__(self, log_extra: dict[str, str] | None = None) -> None:
        self._steps: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
        self._extra = log_extra or {}

    def add(self, description: str, fn: Callable[..., Any], *args: Any) -> None:
        self._steps.append((description, fn, args))

    def commit(self) -> None:
        self._steps.clear()

    async def __aenter__(self) -> UndoSteps:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._steps.clear()
            return
        await self.rollback()

    async def rollback(self) -> None:
        while self._steps:
            description, fn, args = self._steps.pop()
            log.info("undo: %s", description, extra=self._extra)
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("undo step failed: %s", description, extra=self._extra)

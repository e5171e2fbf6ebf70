"""The daemon's shared state: what every CRI call module receives as ``daemon``.

Components are created in ``Daemon.open()`` in dependency order and closed in reverse by
``close()``. The store comes first (everything records into it); the runtime backends last.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crivm.runtime.backend import BackendServices, HandlerRegistry
from crivm.runtime.config import Config
from crivm.runtime.store import Store

log = logging.getLogger(__name__)


@dataclass
class Daemon:
    config: Config
    store: Store
    handlers: HandlerRegistry
    # Components added by later work register here (images, network, streaming, events...).
    # Each is created in open() and, if it has an async close(), closed in close().
    components: dict[str, Any] = field(default_factory=dict)
    _exit_stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @classmethod
    async def open(cls, config: Config) -> Daemon:
        for directory in (config.root, config.runroot):
            Path(directory).mkdir(parents=True, exist_ok=True, mode=0o711)
        store = Store.open(config.state_db)
        daemon = cls(config=config, store=store, handlers=HandlerRegistry.from_config(config))
        daemon._exit_stack.callback(store.close)
        try:
            for name, opener in _component_openers():
                component = await opener(daemon)
                if component is not None:
                    daemon.components[name] = component
                    closer = getattr(component, "close", None)
                    if closer is not None:
                        daemon._exit_stack.push_async_callback(closer)
            # Backends come last: they use the components, and reconcile the store with
            # what kept running while the daemon was down.
            services = BackendServices(store=store, components=daemon.components)
            for backend in daemon.handlers.backends.values():
                await backend.recover(services)
                # Closed before the components they use (the stack unwinds in reverse).
                closer = getattr(backend, "close", None)
                if closer is not None:
                    daemon._exit_stack.push_async_callback(closer)
        except BaseException:
            await daemon._exit_stack.aclose()
            raise
        return daemon

    async def close(self) -> None:
        await self._exit_stack.aclose()

    def component(self, name: str) -> Any:
        """A component by name; a call that needs a component not in this build is
        UNIMPLEMENTED, not a crash."""
        try:
            return self.components[name]
        except KeyError:
            from crivm.errors import Unimplemented

            raise Unimplemented(f"the {name} component is not part of this build") from None


def _component_openers() -> list[tuple[str, Any]]:
    """(name, async opener) pairs, in start order. Each opener takes the daemon and returns
    the component (or None). Modules that are not built yet are skipped."""
    import importlib

    openers = []
    for name, target in COMPONENT_OPENERS:
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        openers.append((name, getattr(module, attr)))
    return openers


# name -> "module:async_opener(daemon)". Order matters: later components may use earlier ones.
COMPONENT_OPENERS: list[tuple[str, str]] = [
    ("images", "crivm.storage.service:open_component"),
    ("network", "crivm.netbridge.component:open_component"),
    ("streaming", "crivm.runtime.streaming.server:open_component"),
    ("stats", "crivm.runtime.stats.collector:open_component"),
    ("events", "crivm.runtime.events:open_component"),
    ("exit_watcher", "crivm.runtime.exit_watcher:open_component"),
    ("metrics", "crivm.runtime.metrics.endpoint:open_component"),
]

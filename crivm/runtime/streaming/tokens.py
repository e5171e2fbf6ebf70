"""Single-use, expiring tokens that stand for a validated Exec, Attach or PortForward request.

The CRI call validates the request and parks it here; the URL it returns carries only the
token. The streaming server redeems the token once: a second use, or a use after
``ttl_s``, finds nothing and is answered 404.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# A flood of unredeemed requests must not grow memory without bound; kubelet caps at 1000.
MAX_PENDING = 1000


@dataclass(frozen=True)
class ExecSpec:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class AttachSpec:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class PortForwardSpec:
    pod_id: str
    ports: tuple[int, ...]


StreamSpec = ExecSpec | AttachSpec | PortForwardSpec

KIND_OF: dict[type, str] = {ExecSpec: "exec", AttachSpec: "attach", PortForwardSpec: "portforward"}


class TokenCache:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._pending: OrderedDict[str, tuple[float, StreamSpec]] = OrderedDict()

    def issue(self, spec: StreamSpec) -> str:
        self._expire()
        while len(self._pending) >= MAX_PENDING:
            self._pending.popitem(last=False)
        token = secrets.token_urlsafe(32)
        self._pending[token] = (self._clock() + self.ttl_s, spec)
        return token

    def redeem(self, kind: str, token: str) -> StreamSpec | None:
        """The request behind ``token`` if it is live and of ``kind``; it is used up either way."""
        self._expire()
        entry = self._pending.pop(token, None)
        if entry is None:
            return None
        spec = entry[1]
        return spec if KIND_OF[type(spec)] == kind else None

    def __len__(self) -> int:
        self._expire()
        return len(self._pending)

    def _expire(self) -> None:
        now = self._clock()
        while self._pending:
            token, (deadline, _) = next(iter(self._pending.items()))
            if deadline > now:
                return
            del self._pending[token]

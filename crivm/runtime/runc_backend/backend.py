"""RuncBackend: the oci runtime type, driving conmon + runc (or crun)."""

from __future__ import annotations

import os

from crivm.runtime.backend import HandlerFeatures, Readiness
from crivm.runtime.config import Config, RuntimeHandler


class RuncBackend:
    runtime_type = "oci"

    def __init__(self, name: str, handler: RuntimeHandler, config: Config) -> None:
        self.name = name
        self.handler = handler
        self.config = config

    def readiness(self) -> Readiness:
        for what, path in (("OCI runtime", self.handler.runtime_path),
                           ("conmon", self.config.conmon_path)):
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                return Readiness(False, "RuntimeBinaryMissing", f"{what} {path} is not installed")
        return Readiness(True)

    def features(self) -> HandlerFeatures:
        return HandlerFeatures()

"""What the shim CLI reads from a VM container's bundle (``config.json``).

The daemon writes the guest-side OCI spec into the bundle and adds annotations that tell the
CLI how to reach the pod's agent, where the rootfs is inside the guest, and where conmon would
drop its ``oom`` marker (conmon watches the shim's host cgroup, which never runs out). The agent
receives the same spec; it ignores annotations it does not know.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

ANNOTATION_AGENT_SOCKET = "io.crivm.vm.agent-socket"
ANNOTATION_GUEST_ROOTFS = "io.crivm.vm.guest-rootfs"
ANNOTATION_STDIN = "io.crivm.vm.stdin"
ANNOTATION_OOM_FILE = "io.crivm.vm.oom-file"


class BundleError(Exception):
    """The bundle is not one the daemon wrote for a VM container."""


@dataclass(frozen=True)
class Bundle:
    path: str
    spec: dict[str, Any]
    agent_socket: str
    guest_rootfs: str
    terminal: bool
    stdin: bool
    oom_file: str  # "" when the daemon named none

    @property
    def spec_json(self) -> bytes:
        return json.dumps(self.spec).encode()


def load_bundle(path: str) -> Bundle:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {config_path}: {exc}") from exc
    annotations = spec.get("annotations") or {}
    missing = [key for key in (ANNOTATION_AGENT_SOCKET, ANNOTATION_GUEST_ROOTFS)
               if not annotations.get(key)]
    if missing:
        raise BundleError(f"{config_path} lacks {', '.join(missing)}: not a VM container bundle")
    return Bundle(
        path=path,
        spec=spec,
        agent_socket=annotations[ANNOTATION_AGENT_SOCKET],
        guest_rootfs=annotations[ANNOTATION_GUEST_ROOTFS],
        terminal=bool(spec.get("process", {}).get("terminal", False)),
        stdin=annotations.get(ANNOTATION_STDIN, "false") == "true",
        oom_file=annotations.get(ANNOTATION_OOM_FILE, ""),
    )

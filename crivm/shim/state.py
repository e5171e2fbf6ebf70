"""The CLI's record of each VM container, under ``--root``, and runc's ``state`` JSON.

``<root>/<id>/state.json`` is written at create and updated at start. The directory's
existence is what "the runtime knows the container" means, as for runc (the daemon's
``OciRuntime.exists`` checks exactly that). Status follows runc: ``created`` until start,
``running`` while the shim (the container's stand-in process) lives, ``stopped`` after.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from typing import Any

OCI_VERSION = "1.0.2"


class StateError(Exception):
    """No such container, or its record is unreadable."""


@dataclass(frozen=True)
class ContainerState:
    id: str
    bundle: str
    agent_socket: str
    guest_rootfs: str
    shim_pid: int
    created: str  # RFC 3339, like runc
    started: bool = False
    annotations: dict[str, str] | None = None


def container_dir(root: str, container_id: str) -> str:
    if not container_id or "/" in container_id or container_id in (".", ".."):
        raise StateError(f"invalid container id {container_id!r}")
    return os.path.join(root, container_id)


def save(root: str, state: ContainerState) -> None:
    directory = container_dir(root, state.id)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, "state.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(asdict(state), fh)
    os.replace(tmp, path)


def load(root: str, container_id: str) -> ContainerState:
    path = os.path.join(container_dir(root, container_id), "state.json")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError as exc:
        raise StateError(f"container {container_id} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    return ContainerState(**raw)


def mark_started(root: str, state: ContainerState) -> ContainerState:
    started = replace(state, started=True)
    save(root, started)
    return started


def forget(root: str, container_id: str) -> None:
    shutil.rmtree(container_dir(root, container_id), ignore_errors=True)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes: conmon reaps it soon.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def status_of(state: ContainerState, shim_alive: bool) -> str:
    if not shim_alive:
        return "stopped"
    return "running" if state.started else "created"


def state_json(state: ContainerState, shim_alive: bool) -> dict[str, Any]:
    """What ``runc state`` prints for the container."""
    status = status_of(state, shim_alive)
    return {
        "ociVersion": OCI_VERSION,
        "id": state.id,
        "pid": state.shim_pid if status != "stopped" else 0,
        "status": status,
        "bundle": state.bundle,
        "rootfs": state.guest_rootfs,
        "created": state.created,
        "owner": "",
        "annotations": state.annotations or {},
    }

"""Turning the host's OCI spec into one that runc can run inside the guest."""

from __future__ import annotations

import copy
import json
from typing import Any

from crivm.agent.errors import InvalidArgument
from crivm.proto import agent_pb2

Spec = dict[str, Any]


def parse_spec(raw: bytes) -> Spec:
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"OCI spec is not JSON: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise InvalidArgument("OCI spec needs a process object")
    if not spec["process"].get("args"):
        raise InvalidArgument("OCI spec has no process.args")
    return spec


def guest_spec(spec: Spec, rootfs: str, terminal: bool, cgroups_path: str) -> Spec:
    """The spec to write into the guest bundle.

    - root.path points at the rootfs the host shared over virtio-fs.
    - Namespace paths name host namespaces, which do not exist in the guest: they are dropped,
      and so is the network namespace, because the guest's own network is the pod's network.
    - Hooks are host binaries; the guest has none of them.
    - The cgroups path is the agent's, so stats know where to look.
    """
    out = copy.deepcopy(spec)
    root = out.get("root")
    readonly = bool(root.get("readonly", False)) if isinstance(root, dict) else False
    out["root"] = {"path": rootfs, "readonly": readonly}
    out["process"]["terminal"] = terminal
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    linux["namespaces"] = [
        {"type": ns["type"]}
        for ns in linux.get("namespaces", [])
        if isinstance(ns, dict) and ns.get("type") != "network"
    ]
    linux["cgroupsPath"] = cgroups_path
    return out


def exec_process(container_spec: Spec, process: agent_pb2.Process) -> Spec:
    """An OCI process object for `runc exec --process`: the container's, with the exec's fields.

    Starting from the container's process keeps its capabilities, rlimits, no_new_privileges and
    security labels; runc would otherwise run the exec with none of them.
    """
    if not process.args:
        raise InvalidArgument("exec process has no args")
    out: Spec = copy.deepcopy(container_spec["process"])
    out["args"] = list(process.args)
    out["terminal"] = process.terminal
    if process.env:
        out["env"] = list(process.env)
    if process.cwd:
        out["cwd"] = process.cwd
    if process.HasField("user"):
        user: Spec = {"uid": process.user.uid, "gid": process.user.gid}
        if process.user.additional_gids:
            user["additionalGids"] = list(process.user.additional_gids)
        out["user"] = user
    out.pop("consoleSize", None)
    return out

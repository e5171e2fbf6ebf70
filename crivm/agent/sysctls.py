"""The pod's sysctls, written under /proc/sys in the guest.

A VM pod's containers share the guest's IPC namespace and its network namespace, so the pod's
namespaced sysctls (kernel.shm_*, kernel.msg*, fs.mqueue.*, net.*) belong to the guest itself,
where the runc backend gives them to the pod's infra container instead.

Names come as the CRI passes them from kubelet: dots separate components, and a slash stands
for a dot inside one component (``net.ipv4.conf.eth0/100.forwarding`` is
``/proc/sys/net/ipv4/conf/eth0.100/forwarding``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from crivm.agent.errors import InvalidArgument

PROC_SYS = "/proc/sys"


def sysctl_path(name: str, proc_sys: str = PROC_SYS) -> str:
    """The file under ``proc_sys`` for ``name``; a name that could leave it is refused."""
    # A component turns into "." or ".." only from slashes, so that is checked after the swap.
    components = [c.replace("/", ".") for c in name.split(".")]
    if "\0" in name or any(c in ("", ".", "..") for c in components):
        raise InvalidArgument(f"sysctl {name!r} is not a sysctl name")
    return os.path.join(proc_sys, *components)


def apply(sysctls: Mapping[str, str], proc_sys: str = PROC_SYS) -> None:
    """Write every sysctl, after checking every name first, so a bad name changes nothing."""
    paths = {name: sysctl_path(name, proc_sys) for name in sorted(sysctls)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise InvalidArgument(f"sysctl {name} does not exist in the guest kernel")
    for name, path in paths.items():
        try:
            with open(path, "w") as knob:
                knob.write(sysctls[name])
        except OSError as exc:
            raise InvalidArgument(
                f"sysctl {name} = {sysctls[name]!r}: {exc.strerror or exc}") from exc

"""What this host lets containers have, probed once when the backend starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crivm.runtime.runc_backend.spec import HostFacts
from crivm.runtime.runc_backend.spec_resources import OOM_SCORE_ADJ_MIN, ResourceHost
from crivm.runtime.runc_backend.spec_security import CAPABILITY_NUMBERS, capabilities_from_mask

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"


def _status_mask(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


def probe_host() -> HostFacts:
    bounding = capabilities_from_mask(_status_mask("CapBnd"))
    effective = _status_mask("CapEff")
    has_sys_resource = bool(effective >> CAPABILITY_NUMBERS["CAP_SYS_RESOURCE"] & 1)
    floor = OOM_SCORE_ADJ_MIN
    if not has_sys_resource:
        # Without CAP_SYS_RESOURCE a child may not go below our own oom_score_adj.
        floor = int(Path("/proc/self/oom_score_adj").read_text().strip() or 0)
        log.info("no CAP_SYS_RESOURCE: container oom_score_adj is clamped to >= %d", floor)
    resources = ResourceHost(
        swap_accounting=os.path.exists(
            os.path.join(CGROUP_ROOT, "memory", "memory.memsw.limit_in_bytes")
        ),
        hugetlb=os.path.isdir(os.path.join(CGROUP_ROOT, "hugetlb")),
        oom_score_adj_floor=floor,
    )
    return HostFacts(
        capability_bounding=bounding,
        resources=resources,
        apparmor=os.path.isdir("/sys/kernel/security/apparmor"),
    )


def cgroup_hierarchies() -> list[str]:
    """Every mounted cgroup hierarchy under /sys/fs/cgroup (v1 controllers, systemd, unified)."""
    try:
        names = sorted(os.listdir(CGROUP_ROOT))
    except FileNotFoundError:
        return []
    return [
        os.path.join(CGROUP_ROOT, name) for name in names
        if os.path.isdir(os.path.join(CGROUP_ROOT, name))
        and not os.path.islink(os.path.join(CGROUP_ROOT, name))
    ]


def remove_cgroup(path: str, stop_at: str = "/") -> None:
    """rmdir ``path`` in every hierarchy, then its parents up to (not including) ``stop_at``,
    as long as they are empty. runc removes a container's own cgroup; the pod level that crivm
    made is left to us."""
    for hierarchy in cgroup_hierarchies():
        current = path.rstrip("/")
        while current and current != stop_at.rstrip("/") and current != "/":
            try:
                os.rmdir(hierarchy + current)
            except FileNotFoundError:
                pass
            except OSError:
                break  # busy or not empty: something else still lives there
            current = os.path.dirname(current)


def move_to_cgroup(pid: int, path: str) -> None:
    """Move ``pid`` into cgroup ``path`` in every hierarchy that has it.

    conmon starts in the daemon's cgroup. Moving it into the pod's cgroup (CRI-O's
    conmon_cgroup = "pod") keeps it alive when a service manager kills the daemon's whole
    cgroup on stop, and charges the monitor to the pod it serves."""
    if pid <= 0:
        return
    for hierarchy in cgroup_hierarchies():
        procs = os.path.join(hierarchy + path, "cgroup.procs")
        if not os.path.exists(procs):
            continue
        try:
            with open(procs, "w") as fh:
                fh.write(str(pid))
        except OSError as exc:
            log.warning("could not move pid %d into %s: %s", pid, procs, exc.strerror)

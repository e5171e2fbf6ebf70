"""Choose KVM or TCG, and the agent transport, from what this host really does.

``/dev/kvm`` may exist while a KVM guest never runs, so ``auto`` trusts only the bounded boot
probe in ``kvm_probe``. The answer is cached under runroot (a tmpfs), which keeps it for the
host's uptime and drops it on reboot, when the answer may change.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Literal

from crivm.hypervisor.qemu.cmdline import AccelKind
from crivm.hypervisor.qemu.owner import StrPath

if TYPE_CHECKING:
    # Only the daemon's choose_accel takes a Path; the pod supervisor, which imports this
    # module for host_tsc_khz, stays free of pathlib (see owner.StrPath).
    from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FILE = "accel.json"
AgentTransportKind = Literal["vsock", "virtio-serial"]
VHOST_VSOCK = "/dev/vhost-vsock"


async def choose_accel(requested: str, qemu_path: str, runroot: Path,
                       probe_timeout_s: float = 3.0) -> AccelKind:
    """``requested`` is the config's ``accel``: kvm, tcg, or auto (probe, then cache)."""
    if requested == "kvm":
        return "kvm"
    if requested == "tcg":
        return "tcg"
    cache = runroot / CACHE_FILE
    key = {"qemu": qemu_path, "host_kernel": os.uname().release}
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
            accel: AccelKind = cached["accel"]
            return accel
    except (OSError, ValueError):
        pass
    # Imported here: kvm_probe brings tempfile (random, shutil, ...), ~0.6 MiB PSS in every VM
    # pod's supervisor, which imports this module for host_tsc_khz and never probes.
    from crivm.hypervisor.qemu import kvm_probe

    result = await kvm_probe.probe("kvm", qemu_path, probe_timeout_s)
    accel = "kvm" if result.works else "tcg"
    if result.works:
        log.info("KVM runs guests: VMs use KVM")
    else:
        log.warning("KVM does not run guests here (%s): VMs use TCG, which is much slower",
                    result.detail)
    runroot.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{CACHE_FILE}.tmp")
    tmp.write_text(json.dumps({"key": key, "accel": accel, "detail": result.detail}))
    os.replace(tmp, cache)
    return accel


def choose_agent_transport(requested: str,
                           vhost_vsock: StrPath = VHOST_VSOCK) -> AgentTransportKind:
    """vsock where the host has vhost-vsock, virtio-serial otherwise (or when configured)."""
    if requested == "virtio-serial":
        return "virtio-serial"
    if requested == "vsock":
        return "vsock"
    return "vsock" if os.path.exists(vhost_vsock) else "virtio-serial"


def host_tsc_khz(cpuinfo: StrPath = "/proc/cpuinfo") -> int:
    """The host's TSC rate in kHz, as /proc/cpuinfo reports it; 0 when unknown.

    Under TCG the guest's TSC runs at the host's rate, so this is what a microvm guest, which
    has no timer to calibrate against, should be told.
    """
    try:
        with open(cpuinfo) as info:
            text = info.read()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1000)
            except ValueError:
                return 0
    return 0

"""``crivm doctor``: probe the host and say, line by line, what works and what crivm will use.

Exit status is non-zero when the runc backend cannot work (no runc/crun, no conmon, no overlay),
because then no pod can run at all. Missing VM pieces only make the vm handler unavailable.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from crivm.hypervisor.qemu import kvm_probe
from crivm.runtime.config import Config

CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    # A failed essential check makes `crivm doctor` exit non-zero.
    essential: bool = False


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def check_oci_runtimes(config: Config) -> list[Check]:
    checks = []
    paths = {h.runtime_path for h in config.runtimes.values() if h.runtime_type == "oci"}
    for path in sorted(paths):
        checks.append(Check(f"oci runtime {path}", _executable(path),
                            "found" if _executable(path) else "missing", essential=True))
    crun = shutil.which("crun")
    checks.append(Check("crun", crun is not None, crun or "not installed (optional)"))
    return checks


def check_conmon(config: Config) -> Check:
    ok = _executable(config.conmon_path)
    return Check("conmon", ok, config.conmon_path if ok else f"{config.conmon_path} missing",
                 essential=True)


def check_cni(config: Config) -> list[Check]:
    wanted = ("bridge", "host-local", "portmap", "loopback")
    found = {
        name: next((d for d in config.cni_plugin_dirs if _executable(f"{d}/{name}")), None)
        for name in wanted
    }
    missing = [n for n, d in found.items() if d is None]
    dirs = ", ".join(sorted({d for d in found.values() if d}))
    detail = f"missing {', '.join(missing)}" if missing else f"{', '.join(wanted)} in {dirs}"
    plugins = Check("cni plugins", not missing, detail)
    conf_dir = Path(config.cni_config_dir)
    confs = sorted(conf_dir.glob("*.conflist")) + sorted(conf_dir.glob("*.conf"))
    conf = Check("cni config", bool(confs), str(confs[0]) if confs
                 else f"no network config in {conf_dir} (NetworkReady=false)")
    return [plugins, conf]


def check_overlay() -> Check:
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return Check("overlayfs", False, f"cannot read /proc/filesystems: {exc}", essential=True)
    if "overlay" in filesystems:
        return Check("overlayfs", True, "available", essential=True)
    if Path("/lib/modules").exists() and any(Path("/lib/modules").glob("*/kernel/fs/overlayfs")):
        return Check("overlayfs", True, "module present, not loaded yet", essential=True)
    return Check("overlayfs", False, "not supported by this kernel", essential=True)


def check_cgroups() -> Check:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return Check("cgroups", True, "v2 (unified)")
    if Path("/sys/fs/cgroup/unified").is_dir():
        return Check("cgroups", True, "v1 (hybrid; cgroup2 at /sys/fs/cgroup/unified)")
    if Path("/sys/fs/cgroup/memory").is_dir():
        return Check("cgroups", True, "v1 (legacy)")
    return Check("cgroups", False, "no cgroup hierarchy mounted", essential=True)


def check_cap_sys_resource() -> Check:
    cap_eff = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            cap_eff = int(line.split()[1], 16)
    has = bool(cap_eff & (1 << CAP_SYS_RESOURCE))
    return Check("CAP_SYS_RESOURCE", True,
                 "present" if has else "missing: oom_score_adj will be clamped, not lowered")


async def check_qemu(config: Config) -> list[Check]:
    vm_handlers = [h for h in config.runtimes.values() if h.runtime_type == "vm"]
    if not vm_handlers:
        return [Check("qemu", True, "no vm handler configured")]
    handler = vm_handlers[0]
    checks = [Check("qemu", _executable(handler.qemu_path),
                    handler.qemu_path if _executable(handler.qemu_path) else "not installed")]
    if not _executable(handler.qemu_path):
        return checks
    kvm = await kvm_probe.probe("kvm", handler.qemu_path)
    if kvm.works:
        checks.append(Check("kvm", True, "a guest runs: VMs use KVM"))
    else:
        tcg = await kvm_probe.probe("tcg", handler.qemu_path)
        checks.append(Check(
            "kvm", tcg.works,
            f"{kvm.detail}: VMs fall back to TCG (software emulation)" if tcg.works
            else f"{kvm.detail}; TCG failed too: {tcg.detail}",
        ))
    if handler.accel != "auto":
        checks.append(Check("accel override", True, f"config forces {handler.accel}"))
    vsock = Path("/dev/vhost-vsock").exists()
    checks.append(Check("vhost-vsock", True, "present: agent over vsock" if vsock
                        else "missing: agent over virtio-serial"))
    vfs = _executable(handler.virtiofsd_path)
    checks.append(Check("virtiofsd", vfs, handler.virtiofsd_path if vfs else
                        f"{handler.virtiofsd_path} missing: vm pods cannot share rootfs"))
    files = config.guest_files(handler)
    missing = [str(path) for path in files if not path.exists()]
    checks.append(Check("guest image", not missing, ", ".join(map(str, files)) if not missing
                        else f"{', '.join(missing)} not built: run `crivm guest-image build`"))
    return checks


async def run(config: Config) -> list[Check]:
    checks: list[Check] = []
    checks += check_oci_runtimes(config)
    checks.append(check_conmon(config))
    checks += check_cni(config)
    checks.append(check_overlay())
    checks.append(check_cgroups())
    checks.append(check_cap_sys_resource())
    checks += await check_qemu(config)
    return checks


def render(checks: list[Check]) -> tuple[str, int]:
    width = max(len(c.name) for c in checks)
    lines = [f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}" for c in checks]
    failed = [c for c in checks if c.essential and not c.ok]
    if failed:
        lines.append("the runc backend cannot work: " + ", ".join(c.name for c in failed))
    return "\n".join(lines), 1 if failed else 0


def main(config: Config) -> int:
    text, status = render(asyncio.run(run(config)))
    print(text)
    return status

import asyncio
import subprocess
import sys

from crivm.hypervisor.qemu import kvm_probe
from crivm.runtime import config, doctor


def test_render_fails_only_on_essential_checks() -> None:
    checks = [
        doctor.Check("runc", True, "found", essential=True),
        doctor.Check("guest image", False, "not built"),
    ]
    text, status = doctor.render(checks)
    assert status == 0 and "FAIL guest image" in text
    text, status = doctor.render([*checks, doctor.Check("conmon", False, "missing", True)])
    assert status == 1 and "runc backend cannot work: conmon" in text


def test_missing_runtime_binary_is_essential() -> None:
    cfg = config.from_dict({"conmon_path": "/nonexistent/conmon",
                            "runtimes": {"runc": {"runtime_path": "/nonexistent/runc"}}})
    checks = doctor.check_oci_runtimes(cfg) + [doctor.check_conmon(cfg)]
    assert [c.ok for c in checks if c.essential] == [False, False]


def test_boot_sector_is_a_valid_mbr() -> None:
    sector = kvm_probe.boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")


def test_tcg_probe_runs_guest_code() -> None:
    result = asyncio.run(kvm_probe.probe("tcg", timeout_s=10))
    assert result.works, result.detail


def test_doctor_command_prints_every_probe() -> None:
    result = subprocess.run([sys.executable, "-m", "crivm", "doctor"],
                            capture_output=True, text=True, timeout=60)
    for name in ("conmon", "cni plugins", "overlayfs", "cgroups", "CAP_SYS_RESOURCE",
                 "qemu", "kvm", "vhost-vsock", "virtiofsd"):
        assert name in result.stdout
    assert result.returncode in (0, 1)

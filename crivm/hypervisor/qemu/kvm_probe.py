"""A bounded probe of whether KVM actually runs guest code on this host.

``/dev/kvm`` can exist while a guest never makes progress (the vCPU spins, as on some nested
setups). So the probe boots a 512-byte boot sector that writes one byte to the serial port, once
with KVM, and waits a few seconds for that byte. No guest kernel is needed, so ``crivm doctor``
can answer before any guest image is built. The result is a plain fact for the caller to cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# 16-bit real mode: mov dx,0x3f8; mov al,'K'; out dx,al; cli; hlt; jmp $-2
_BOOT_CODE = bytes.fromhex("baf803b04beefaf4ebfd")
_MARKER = b"K"


def boot_sector() -> bytes:
    return _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b"\x55\xaa"


@dataclass(frozen=True)
class ProbeResult:
    accel: str
    works: bool
    detail: str


async def probe(accel: str, qemu: str = "/usr/bin/qemu-system-x86_64",
                timeout_s: float = 3.0) -> ProbeResult:
    """Boot the probe sector with ``accel`` (kvm or tcg) and report whether it ran."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ProbeResult(accel, False, "/dev/kvm is missing or not accessible")
    if not os.access(qemu, os.X_OK):
        return ProbeResult(accel, False, f"{qemu} is not installed")
    with tempfile.TemporaryDirectory(prefix="crivm-kvm-probe-") as tmp:
        disk = Path(tmp) / "boot.img"
        disk.write_bytes(boot_sector())
        serial = Path(tmp) / "serial.out"
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"pc,accel={accel}", "-m", "16",
            "-drive", f"file={disk},format=raw,if=floppy",
            "-serial", f"file:{serial}", "-no-reboot",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while loop.time() < deadline:
                if serial.exists() and _MARKER in serial.read_bytes():
                    return ProbeResult(accel, True, "guest code ran")
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            if proc.returncode is not None and proc.stderr is not None:
                err = (await proc.stderr.read()).decode(errors="replace").strip()
                return ProbeResult(accel, False, f"qemu exited: {err.splitlines()[-1:]}")
            return ProbeResult(accel, False, f"no guest output within {timeout_s:.0f} s")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()

"""``crivm guest-image build``: the guest kernel, initramfs and /usr image, from Debian packages.

Outputs: ``vmlinuz``; ``initrd.img``, the whole guest tree as an initramfs; and for VMs that get
``/usr`` on virtio-pmem (pods on q35, the vm handler's default), ``usr.img`` (``/usr`` as a
read-only ext4 image) with ``initrd-boot.img``, the initramfs without it (see ``usr_image``).

Inputs are pinned by what apt resolves now (name, version, SHA256) plus the protobuf wheel and the
agent's sources; their combined digest names the build. When ``<out>/manifest.json`` records the
same digest and the outputs still hash as recorded, the build is skipped. The initramfs is a
sorted newc cpio with fixed owners and mtimes, so equal inputs give equal bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crivm.guestimage import cpio, debian, rootfs, usr_image
from crivm.guestimage.errors import GuestImageError

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("/var/lib/crivm/guest")
DEFAULT_CACHE_DIR = Path("/var/cache/crivm/guest-image")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
PACKAGES = (
    # crun, not runc: under TCG a runc create + start costs the guest about 3 s (a Go runtime
    # starts for runc and again for runc init), crun about 0.5 s; it is also 4 MiB smaller.
    "busybox-static", "crun",
    f"python{rootfs.PYTHON_MINOR}-minimal", f"libpython{rootfs.PYTHON_MINOR}-minimal",
    f"libpython{rootfs.PYTHON_MINOR}-stdlib",
    # Libraries of python, crun and the kept extension modules; install_libraries checks that
    # nothing is missing.
    "libc6", "libseccomp2", "zlib1g", "libexpat1", "libffi8", "libcap2", "libyajl2",
    "libsystemd0", "libgcrypt20", "libgpg-error0", "liblz4-1", "liblzma5", "libzstd1",
    # protobuf's compiled upb backend is C++.
    "libstdc++6", "libgcc-s1",
)
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
BOOT_INITRD_FILE = "initrd-boot.img"
USR_IMAGE_FILE = "usr.img"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2
Compression = Literal["none", "lz4", "zstd", "gzip"]
# Uncompressed is the default. Under TCG (q35, 256 MiB; 5 alternating runs per variant, kernel
# console timestamps and QEMU's CPU time until the agent answered) the kernel reached /init
# 0.0-0.5 s later from lz4 than from the same tree as a plain cpio, and gzip and zstd were slower
# still (gunzip in emulation: 0.4-3.5 s). lz4 writes 45% of the bytes; that no longer buys memory,
# because the vm backend has QEMU drop its pages of the initrd file once the guest has booted
# (crivm.hypervisor.qemu.page_out), but it saves disk and page cache where those are tight.
DEFAULT_COMPRESSION: Compression = "none"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    kernel: Path
    initrd: Path
    manifest: Path
    kernel_version: str
    initrd_bytes: int
    seconds: float
    cached: bool
    has_agent: bool
    compression: Compression = DEFAULT_COMPRESSION

    @property
    def boot_initrd(self) -> Path:
        """The initramfs to boot with ``usr_image`` on virtio-pmem."""
        return self.initrd.with_name(BOOT_INITRD_FILE)

    @property
    def usr_image(self) -> Path:
        return self.initrd.with_name(USR_IMAGE_FILE)


def _source_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _builder_fingerprint() -> dict[str, str]:
    """Hashes of this builder's own modules, so a changed builder invalidates the cache."""
    here = Path(__file__).resolve().parent
    return {p.name: debian.file_sha256(p) for p in sorted(here.glob("*.py"))}


async def _fetch_protobuf_wheel(cache_dir: Path) -> Path:
    """The CPython abi3 protobuf wheel (with the upb extension) of the host's protobuf version.

    The generated ``*_pb2`` modules check that the runtime is at least as new as the protoc that
    wrote them, and they are generated with the host's toolchain, so the guest gets that version.
    """
    version = importlib.metadata.version("protobuf")
    wheel_dir = cache_dir / "wheels"
    pattern = f"protobuf-{version}-cp*-abi3-manylinux*_x86_64.whl"
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        await debian.run_tool(
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--implementation",
            "cp", "--abi", "abi3", "--python-version", rootfs.PYTHON_MINOR, "-d", str(wheel_dir),
            f"protobuf=={version}",
        )
        found = sorted(wheel_dir.glob(pattern))
    if not found:
        raise GuestImageError(f"pip left no {pattern} in {wheel_dir}")
    return found[-1]


def _outputs_match(out_dir: Path, digest: str) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((out_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("input_digest") != digest:
        return None
    for name, facts in manifest.get("outputs", {}).items():
        path = out_dir / name
        if not path.exists() or debian.file_sha256(path) != facts.get("sha256"):
            return None
    return manifest


def _special_entries() -> list[cpio.Entry]:
    # The kernel opens /dev/console for init before devtmpfs is mounted, so the node must be in
    # the archive itself.
    return [
        cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        cpio.Entry("dev/null", stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3),
    ]


def _write_initrd(root: Path, dest: Path, compression: Compression,
                  boot_only: bool = False) -> None:
    entries = cpio.entries_from_tree(root) + _special_entries()
    if boot_only:
        entries = usr_image.boot_entries(entries)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as raw:
        if compression == "gzip":
            # mtime=0 and no file name keep the gzip header reproducible.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                               compresslevel=6) as gz:
                cpio.write_archive(gz, entries)
        else:
            cpio.write_archive(raw, entries)
    os.replace(tmp, dest)


def _compressor_argv(compression: Compression, src: Path, dest: Path) -> list[str] | None:
    """The host tool that writes ``compression``; None for the formats written in Python."""
    if compression == "lz4":
        # The kernel reads only lz4's legacy frame format (-l).
        return ["lz4", "-l", "-9", "-q", "-f", str(src), str(dest)]
    if compression == "zstd":
        return ["zstd", "-19", "-T1", "-q", "-f", str(src), "-o", str(dest)]
    return None


async def _write_compressed_initrd(root: Path, dest: Path, compression: Compression,
                                   work: Path, boot_only: bool = False) -> None:
    plain = work / "initrd.cpio"
    packed = dest.with_name(f".{dest.name}.tmp")
    argv = _compressor_argv(compression, plain, packed)
    if argv is None:
        await asyncio.to_thread(_write_initrd, root, dest, compression, boot_only)
        return
    await asyncio.to_thread(_write_initrd, root, plain, "none", boot_only)
    await debian.run_tool(*argv)
    os.replace(packed, dest)
    plain.unlink()


def _assemble(staging: Path, root: Path, wheel: Path, agent: dict[str, Path],
              applets: list[str]) -> dict[str, Any]:
    rootfs.skeleton(root)
    rootfs.install_busybox(staging, root, applets)
    rootfs.install_oci_runtime(staging, root)
    rootfs.install_python(staging, root)
    rootfs.install_protobuf(wheel, root)
    rootfs.install_agent(agent, root)
    kver = rootfs.kernel_version(staging)
    modules = rootfs.install_kernel_modules(staging, root, kver)
    libraries = rootfs.install_libraries(staging, root)
    rootfs.compile_python(root)
    return {"kernel_version": kver, "modules": modules, "libraries": libraries}


async def build(out_dir: Path = DEFAULT_OUT_DIR, cache_dir: Path = DEFAULT_CACHE_DIR,
                compression: Compression = DEFAULT_COMPRESSION, force: bool = False,
                progress: Progress | None = None) -> BuildResult:
    """Build (or reuse) the outputs named in this module's docstring and ``manifest.json``."""
    started = time.monotonic()
    say = progress or log.info
    say("resolving Debian packages")
    kernel_pkg = await debian.resolve_kernel(KERNEL_METAPACKAGE)
    packages = [kernel_pkg, *await debian.resolve(list(PACKAGES))]
    say(f"fetching {len(packages)} packages into {cache_dir}")
    debs = [await debian.fetch(pkg, cache_dir / "debs") for pkg in packages]
    wheel = await _fetch_protobuf_wheel(cache_dir)
    agent = rootfs.agent_sources(_source_root())
    if not agent:
        say("crivm/agent is absent: the image will boot to init and idle")
    wheel_sha256 = debian.file_sha256(wheel)
    inputs = {
        "packages": [[p.name, p.version, p.sha256] for p in packages],
        "protobuf_wheel": [wheel.name, wheel_sha256],
        "agent": {rel: debian.file_sha256(path) for rel, path in agent.items()},
        "builder": _builder_fingerprint(),
        "compression": compression,
    }
    digest = _digest(inputs)
    kernel_out, initrd_out = out_dir / KERNEL_FILE, out_dir / INITRD_FILE
    boot_out, usr_out = out_dir / BOOT_INITRD_FILE, out_dir / USR_IMAGE_FILE
    if not force and (manifest := _outputs_match(out_dir, digest)) is not None:
        say(f"up to date (inputs {digest[:12]})")
        return BuildResult(kernel_out, initrd_out, out_dir / MANIFEST_FILE,
                           manifest["kernel_version"], initrd_out.stat().st_size,
                           time.monotonic() - started, cached=True, has_agent=bool(agent),
                           compression=compression)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=cache_dir) as work:
        staging, root = Path(work) / "staging", Path(work) / "root"
        say("extracting packages")
        for deb in debs:
            await debian.extract(deb, staging)
        listing = await debian.run_tool(str(staging / "bin/busybox"), "--list-full")
        say("assembling the guest tree and compiling its Python modules")
        facts = await asyncio.to_thread(
            _assemble, staging, root, wheel, agent, listing.decode().split())
        say(f"writing {INITRD_FILE} and {BOOT_INITRD_FILE} ({compression})")
        await _write_compressed_initrd(root, initrd_out, compression, Path(work))
        await _write_compressed_initrd(root, boot_out, compression, Path(work), boot_only=True)
        say(f"writing {USR_IMAGE_FILE}")
        await usr_image.write_image(root / "usr", usr_out)
        kver = facts["kernel_version"]
        tmp_kernel = kernel_out.with_name(f".{KERNEL_FILE}.tmp")
        shutil.copyfile(staging / f"boot/vmlinuz-{kver}", tmp_kernel)
        os.replace(tmp_kernel, kernel_out)
    seconds = time.monotonic() - started
    manifest = {
        "format": MANIFEST_FORMAT,
        "input_digest": digest,
        "kernel_version": kver,
        "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256}
                     for p in packages],
        "protobuf_wheel": {"file": wheel.name, "sha256": wheel_sha256},
        "agent_files": sorted(agent),
        "kernel_modules": facts["modules"],
        "libraries": facts["libraries"],
        "compression": compression,
        "outputs": {
            name: {"sha256": debian.file_sha256(path), "bytes": path.stat().st_size}
            for name, path in ((KERNEL_FILE, kernel_out), (INITRD_FILE, initrd_out),
                               (BOOT_INITRD_FILE, boot_out), (USR_IMAGE_FILE, usr_out))
        },
        "build_seconds": round(seconds, 1),
    }
    tmp_manifest = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_manifest, out_dir / MANIFEST_FILE)
    size = initrd_out.stat().st_size
    say(f"built {initrd_out} ({size / 2**20:.1f} MiB) and {kernel_out} in {seconds:.1f} s")
    return BuildResult(kernel_out, initrd_out, out_dir / MANIFEST_FILE, kver, size, seconds,
                       cached=False, has_agent=bool(agent), compression=compression)

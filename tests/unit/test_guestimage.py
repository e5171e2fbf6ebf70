"""Pure parts of the guest image builder: the cpio writer, ELF reading, the agent's import
closure and the init script. The full build and boot run in tests/integration/test_qemu_vm.py."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from crivm.guestimage import cpio, elf, rootfs
from crivm.guestimage.errors import GuestImageError
from crivm.guestimage.init_script import INIT_SCRIPT


def _read_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """An independent newc reader: (name, mode, body, mtime, ino) per member."""
    members: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, mtime, size, namesize = fields[0], fields[1], fields[5], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body_start = (name_start + namesize + 3) & ~3
        body = data[body_start:body_start + size]
        pos = (body_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return members
        members.append((name, mode, body, mtime, ino))


def _tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc").mkdir()
    (root / "etc/odd").write_bytes(b"abc")  # 3 bytes: exercises padding


def test_cpio_round_trip_and_reproducible(tmp_path: Path) -> None:
    _tree(tmp_path / "a")
    first, second = io.BytesIO(), io.BytesIO()
    cpio.write_archive(first, cpio.entries_from_tree(tmp_path / "a"))
    _tree(tmp_path / "b")  # same content, different inodes and mtimes
    cpio.write_archive(second, cpio.entries_from_tree(tmp_path / "b"))
    assert first.getvalue() == second.getvalue()
    members = {name: (mode, body, mtime) for name, mode, body, mtime, _ in
               _read_newc(first.getvalue())}
    assert list(members) == sorted(members)
    assert members["usr/bin/tool"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", 0)
    assert members["bin"][0] == stat.S_IFLNK | 0o777 and members["bin"][1] == b"usr/bin"
    assert stat.S_ISDIR(members["usr"][0])
    assert members["etc/odd"][1] == b"abc"


def test_cpio_device_nodes() -> None:
    out = io.BytesIO()
    cpio.write_archive(out, [cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5,
                                        rdev_minor=1)])
    header = out.getvalue()[:110]
    assert int(header[6 + 8 * 9:6 + 8 * 10], 16) == 5  # rdevmajor
    assert int(header[6 + 8 * 10:6 + 8 * 11], 16) == 1  # rdevminor


def test_elf_needed_libraries_of_a_real_binary() -> None:
    binary = Path(shutil.which("python3.11") or sys.executable).resolve()
    needed = elf.needed_libraries(binary)
    assert "libc.so.6" in needed
    busybox = Path("/bin/busybox")
    if busybox.exists():
        assert elf.needed_libraries(busybox) == []  # busybox-static


def test_elf_rejects_non_elf(tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n" * 20)
    assert not elf.is_elf(text)
    with pytest.raises(elf.ElfFormatError):
        elf.needed_libraries(text)


def test_module_depends_when_host_has_modules() -> None:
    candidates = sorted(Path("/lib/modules").glob("*/kernel/fs/fuse/virtiofs.ko"))
    if not candidates:
        pytest.skip("no uncompressed virtiofs.ko under /lib/modules on this host")
    assert "fuse" in elf.module_depends(candidates[0])


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_agent_sources_follow_imports(tmp_path: Path) -> None:
    _write(tmp_path, "crivm/__init__.py", "")
    _write(tmp_path, "crivm/agent/__init__.py", "")
    _write(tmp_path, "crivm/agent/main.py",
           "import asyncio\nfrom . import helper\nfrom crivm.proto import agent_pb2\n"
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import grpc\n"
           "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n")
    _write(tmp_path, "crivm/agent/helper.py", "import google.protobuf\n")
    _write(tmp_path, "crivm/proto/__init__.py", "")
    _write(tmp_path, "crivm/proto/agent_pb2.py", "from google.protobuf import descriptor\n")
    _write(tmp_path, "crivm/proto/api_pb2_grpc.py", "import grpc\n")
    _write(tmp_path, "crivm/runtime/server.py", "import grpc\n")
    assert sorted(rootfs.agent_sources(tmp_path)) == [
        "crivm/__init__.py", "crivm/agent/__init__.py", "crivm/agent/helper.py",
        "crivm/agent/main.py", "crivm/proto/__init__.py", "crivm/proto/agent_pb2.py",
    ]


def test_agent_sources_reject_host_only_imports(tmp_path: Path) -> None:
    _write(tmp_path, "crivm/__init__.py", "")
    _write(tmp_path, "crivm/agent/__init__.py", "")
    _write(tmp_path, "crivm/agent/main.py", "from crivm.errors import CrivmError\n")
    _write(tmp_path, "crivm/errors.py", "import grpc\n")
    with pytest.raises(GuestImageError, match="grpc"):
        rootfs.agent_sources(tmp_path)


def test_agent_sources_empty_without_agent(tmp_path: Path) -> None:
    assert rootfs.agent_sources(tmp_path) == {}


def test_real_agent_closure_fits_the_guest() -> None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "crivm/agent").is_dir():
        pytest.skip("crivm/agent is not written yet")
    sources = rootfs.agent_sources(repo)
    assert "crivm/agent/main.py" in sources
    assert not any(rel.startswith(("crivm/runtime/", "crivm/hypervisor/")) for rel in sources)


def test_init_script_parses_under_busybox(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox")
    script = tmp_path / "init"
    script.write_text(INIT_SCRIPT)
    result = subprocess.run([busybox, "sh", "-n", str(script)], capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    assert INIT_SCRIPT.startswith("#!/bin/sh\n")


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_install_protobuf_keeps_the_upb_extension(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "p.whl", {
        "google/protobuf/__init__.py": b"",
        "google/_upb/_message.abi3.so": b"\x7fELF",
        "protobuf-1.dist-info/RECORD": b"",
    })
    rootfs.install_protobuf(wheel, tmp_path / "root")
    base = tmp_path / "root" / rootfs.GUEST_PYTHONPATH.lstrip("/")
    assert (base / "google/protobuf/__init__.py").exists()
    assert (base / "google/_upb/_message.abi3.so").stat().st_mode & 0o111
    assert not (base / "protobuf-1.dist-info").exists()


def test_install_protobuf_rejects_a_pure_python_wheel(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "p.whl", {"google/protobuf/__init__.py": b""})
    with pytest.raises(GuestImageError, match="_upb"):
        rootfs.install_protobuf(wheel, tmp_path / "root")


def test_compile_python_drops_stdlib_sources_but_keeps_the_agents(tmp_path: Path) -> None:
    stdlib = tmp_path / f"usr/lib/python{rootfs.PYTHON_MINOR}"
    agent = tmp_path / rootfs.GUEST_PYTHONPATH.lstrip("/") / "crivm/agent"
    for directory in (stdlib / "pkg", agent):
        directory.mkdir(parents=True)
    (stdlib / "pkg/__init__.py").write_text("X = 1\n")
    (agent / "main.py").write_text("Y = 2\n")
    rootfs.compile_python(tmp_path)
    assert (stdlib / "pkg/__init__.pyc").exists()
    assert not (stdlib / "pkg/__init__.py").exists()
    assert (agent / "main.py").exists()
    assert list((agent / "__pycache__").glob("main.*.pyc"))


def test_modules_dep_lists_what_a_module_needs_for_modprobe() -> None:
    """modprobe loads a modules.dep line's list from its end: each module after its needs."""
    needs = {"bridge": ["stp", "llc", "ipv6"], "stp": ["llc"], "llc": [], "ipv6": []}
    order = rootfs._load_order("bridge", needs)
    assert order == ["llc", "stp", "ipv6"]
    assert rootfs._load_order("llc", needs) == []

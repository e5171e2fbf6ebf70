"""What the guest image leaves out, how it compresses the initramfs, and the agent's own argv."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google import protobuf

from crivm.agent.main import AgentArgs, parse_args
from crivm.guestimage import build, rootfs

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(shutil.__file__).resolve().parent
# -S as in the guest, so only the agent's imports run; protobuf from where the host has it.
PROBE_PATH = f"{REPO}:{Path(protobuf.__file__).resolve().parents[2]}"
# Loaded on the host, absent from the guest on purpose: asyncio (ssl) and shutil (bz2, lzma)
# import them inside ``try: ... except ImportError``.
OPTIONAL_ON_THE_HOST = {"ssl.py", "bz2.py", "lzma.py"}
LZ4_LEGACY_MAGIC = bytes.fromhex("02214c18")


def _stdlib_files_the_agent_loads() -> list[str]:
    """Paths (relative to the stdlib) of every module that importing the agent executes."""
    probe = (
        "import json, sys\n"
        "import crivm.agent.main\n"
        "print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values())\n"
        "                         if getattr(m, '__file__', None)})))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": PROBE_PATH, "PATH": "/usr/bin:/bin",
                              "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "upb"}).stdout
    loaded = []
    for name in json.loads(out):
        path = Path(name).resolve()
        if path.is_relative_to(STDLIB) and "site-packages" not in path.parts:
            loaded.append(path.relative_to(STDLIB).as_posix())
    return loaded


def test_no_stdlib_module_the_agent_imports_is_left_out() -> None:
    loaded = _stdlib_files_the_agent_loads()
    assert "asyncio/base_events.py" in loaded  # the probe saw the agent's imports
    dropped = [rel for rel in loaded if rel not in OPTIONAL_ON_THE_HOST and (
        rel.split("/")[0] in rootfs.STDLIB_EXCLUDE
        or any(rel == f or rel.startswith(f + "/") for f in rootfs.STDLIB_EXCLUDE_FILES))]
    assert dropped == []


def test_stdlib_package_filter_drops_the_listed_files(tmp_path: Path) -> None:
    src = tmp_path / "lib"
    for rel in ("asyncio/base_events.py", "asyncio/windows_events.py", "asyncio/test/x.py",
                "importlib/metadata/__init__.py", "importlib/util.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("")
    for package in ("asyncio", "importlib"):
        shutil.copytree(src / package, tmp_path / "out" / package,
                        ignore=rootfs._stdlib_package_filter(src))
    kept = sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*.py"))
    assert kept == ["asyncio/base_events.py", "importlib/util.py"]


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool (Debian: lz4)")
def test_lz4_initramfs_is_a_legacy_frame_of_the_plain_cpio(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "init").write_text("#!/bin/sh\n" * 1000)
    (root / "usr/bin/tool").write_bytes(bytes(range(256)) * 64)
    plain, packed = tmp_path / "plain.img", tmp_path / "packed.img"
    build._write_initrd(root, plain, "none")
    work = tmp_path / "work"
    work.mkdir()
    asyncio.run(build._write_compressed_initrd(root, packed, "lz4", work))
    data = packed.read_bytes()
    # The kernel's initramfs unpacker knows only the legacy lz4 format, not lz4 frames.
    assert data[:4] == LZ4_LEGACY_MAGIC
    assert len(data) < plain.stat().st_size
    unpacked = subprocess.run(["lz4", "-d", "-c", str(packed)], check=True,
                              capture_output=True, timeout=30).stdout
    assert unpacked == plain.read_bytes()
    assert list(work.iterdir()) == []


def test_agent_args_both_spellings_and_defaults() -> None:
    args = parse_args(["--transport", "serial:/dev/virtio-ports/agent.0", "--runc=crun",
                       "--log-level", "debug"])
    assert args == AgentArgs(transport="serial:/dev/virtio-ports/agent.0", runc="crun",
                             log_level="debug")
    assert parse_args(["--transport=vsock:1024"]).state_dir == "/run/crivm-agent"


def test_agent_args_transport_from_init_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIVM_AGENT_TRANSPORT", "vsock")
    monkeypatch.setenv("CRIVM_AGENT_VSOCK_PORT", "2048")
    assert parse_args([]).transport == "vsock:2048"


@pytest.mark.parametrize("argv", [["--bogus"], ["--runc"], ["runc"]])
def test_agent_args_reject_what_they_do_not_know(argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "crivm-agent: error:" in capsys.readouterr().err

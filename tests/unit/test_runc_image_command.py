"""crivm.runtime.runc_backend.image_command: the command looked up in the image as runc will."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from crivm.errors import InvalidArgument
from crivm.runtime.runc_backend.image_command import check_command


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "app").mkdir()
    (root / "etc").mkdir()
    (root / "bin").symlink_to("usr/bin")  # relative, as merged-/usr images have it
    (root / "sbin").symlink_to("/usr/bin")  # absolute: must resolve inside the rootfs
    for path in ("usr/bin/sh", "app/server"):
        (root / path).write_text("#!/bin/sh\n")
        os.chmod(root / path, 0o755)
    (root / "etc/config").write_text("not a program\n")
    (root / "usr/local/bin/tool").symlink_to("../../bin/sh")
    (root / "usr/bin/loop").symlink_to("loop")
    (root / "usr/bin/escape").symlink_to("../../../../../../usr/bin/sh")
    return root


def _spec(args: list[str], path: str | None = "/usr/local/bin:/usr/bin:/bin",
          cwd: str = "/", mounts: tuple[str, ...] = ("/proc", "/dev", "/data")) -> dict[str, Any]:
    env = [f"PATH={path}"] if path is not None else []
    return {
        "process": {"args": args, "env": env, "cwd": cwd},
        "mounts": [{"destination": m} for m in mounts],
    }


@pytest.mark.parametrize("args,cwd", [
    (["sh", "-c", "true"], "/"),
    (["/bin/sh"], "/"),
    (["/sbin/sh"], "/"),
    (["tool"], "/"),
    (["./server"], "/app"),
    (["../app/server"], "/etc"),
    (["/usr/bin/escape"], "/"),  # ".." stops at the rootfs's root, as in the container
    (["/data/bin/anything"], "/"),  # a volume: only runc can tell
    (["/proc/self/exe"], "/"),
])
def test_commands_that_are_there_or_cannot_be_judged(rootfs: Path, args: list[str],
                                                     cwd: str) -> None:
    check_command(str(rootfs), _spec(args, cwd=cwd))


@pytest.mark.parametrize("args,message", [
    (["/no/such/binary"], "'/no/such/binary' is not in the image"),
    (["nosuch"], "looked along PATH=/usr/local/bin:/usr/bin:/bin"),
    (["/etc/config"], "is not in the image"),  # not executable
    (["/usr/bin"], "is not in the image"),  # a directory
    (["loop"], "is not in the image"),  # a symlink loop
    ([], "no command"),
])
def test_commands_that_are_not_there(rootfs: Path, args: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_command(str(rootfs), _spec(args))


def test_no_path_in_the_environment_uses_runcs_default(rootfs: Path) -> None:
    check_command(str(rootfs), _spec(["sh"], path=None))
    with pytest.raises(InvalidArgument, match="PATH=/usr/local/sbin"):
        check_command(str(rootfs), _spec(["server"], path=None))

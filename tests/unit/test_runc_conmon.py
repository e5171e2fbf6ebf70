"""conmon's command line and exit files, the pod's shared files, undo steps: no root needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crivm.errors import InvalidArgument
from crivm.proto import api_pb2
from crivm.runtime.runc_backend import conmon, pod_files
from crivm.runtime.undo import UndoSteps


def layout(tmp_path: Path) -> conmon.ContainerLayout:
    return conmon.ContainerLayout.under(str(tmp_path / "run"), str(tmp_path / "root"), "c" * 64,
                                        str(tmp_path / "logs" / "c.log"))


def test_conmon_argv(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    argv = conmon.conmon_argv(
        conmon_path="/usr/bin/conmon", runtime_path="/usr/sbin/runc",
        runtime_args=["--root", "/run/x"], layout=lay, name="web",
        stdio=conmon.Stdio(tty=True, stdin=True, stdin_once=False),
    )
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "/usr/bin/conmon"
    assert pairs["--api-version"] == "1"
    assert pairs["--log-path"] == f"k8s-file:{lay.log_path}"
    assert pairs["--exit-dir"] == str(tmp_path / "run" / "oci-exits")
    assert pairs["--bundle"] == lay.bundle
    assert argv.count("--runtime-arg") == 2
    assert argv[argv.index("--runtime-arg") + 1] == "--root"
    assert {"--terminal", "--stdin", "--leave-stdin-open"} <= set(argv)
    plain = conmon.conmon_argv(
        conmon_path="c", runtime_path="r", runtime_args=[], layout=lay, name="n",
        stdio=conmon.Stdio(stdin=True, stdin_once=True),
    )
    assert "--stdin" in plain and "--leave-stdin-open" not in plain and "--terminal" not in plain


def test_read_exit(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    assert conmon.read_exit(lay) is None
    os.makedirs(lay.exit_dir)
    Path(lay.exit_file).write_text("")  # conmon is still writing it
    assert conmon.read_exit(lay) is None
    Path(lay.exit_file).write_text("137")
    record = conmon.read_exit(lay)
    assert record is not None and record.exit_code == 137 and not record.oom_killed
    os.makedirs(lay.persist_dir)
    Path(lay.oom_file).touch()
    assert conmon.read_exit(lay) == conmon.ExitRecord(137, record.finished_at, True)
    # After a reboot the runroot copy is gone; the persist dir still has one.
    os.unlink(lay.exit_file)
    Path(lay.persisted_exit_file).write_text("3")
    again = conmon.read_exit(lay)
    assert again is not None and again.exit_code == 3


def test_pod_files() -> None:
    dns = api_pb2.DNSConfig(servers=["10.0.0.10", "8.8.8.8"], searches=["a.svc", "svc"],
                            options=["ndots:5"])
    assert pod_files.resolv_conf(dns) == (
        "nameserver 10.0.0.10\nnameserver 8.8.8.8\nsearch a.svc svc\noptions ndots:5\n"
    )
    hosts = pod_files.hosts_file("web", ("10.90.0.5",))
    assert hosts.splitlines()[0] == "127.0.0.1\tlocalhost"
    assert hosts.splitlines()[-1] == "10.90.0.5\tweb"
    assert pod_files.shm_size({}) == 64 << 20
    assert pod_files.shm_size({pod_files.SHM_SIZE_ANNOTATION: "128m"}) == 128 << 20
    assert pod_files.shm_size({pod_files.SHM_SIZE_ANNOTATION: "4096"}) == 4096
    with pytest.raises(InvalidArgument):
        pod_files.shm_size({pod_files.SHM_SIZE_ANNOTATION: "lots"})


async def test_undo_steps_run_in_reverse_and_survive_failures() -> None:
    done: list[str] = []

    async def async_step(name: str) -> None:
        done.append(name)

    def failing() -> None:
        raise OSError("undo step broke")

    with pytest.raises(RuntimeError, match="create failed"):
        async with UndoSteps() as undo:
            undo.add("first", done.append, "first")
            undo.add("broken", failing)
            undo.add("third", async_step, "third")
            raise RuntimeError("create failed")
    assert done == ["third", "first"]

    async with UndoSteps() as undo:
        undo.add("kept", done.append, "never")
        undo.commit()
    assert "never" not in done

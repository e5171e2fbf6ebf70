"""The shim CLI's argument parsing, its state records and runc-style state JSON."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from crivm.shim import state as state_mod
from crivm.shim.bundle import (
    ANNOTATION_AGENT_SOCKET,
    ANNOTATION_GUEST_ROOTFS,
    ANNOTATION_STDIN,
    BundleError,
    load_bundle,
)
from crivm.shim.cli_args import ArgumentError, parse, parse_signal
from crivm.shim.main import exec_process, main
from crivm.shim.state import ContainerState


def test_create_as_conmon_calls_it() -> None:
    args = parse(["--root", "/run/x", "--systemd-cgroup", "create", "--bundle", "/b",
                  "--pid-file", "/b/pidfile", "--console-socket", "/b/console.sock",
                  "--no-pivot", "abc"])
    assert (args.verb, args.root, args.bundle, args.pid_file, args.console_socket,
            args.container_id) == ("create", "/run/x", "/b", "/b/pidfile", "/b/console.sock",
                                   "abc")


def test_exec_as_the_daemon_calls_it() -> None:
    args = parse(["--root", "/r", "exec", "--process", "/b/p.json", "--pid-file", "/b/e.pid",
                  "--console-socket", "/b/c.sock", "abc"])
    assert (args.process, args.pid_file, args.console_socket, args.detach) == (
        "/b/p.json", "/b/e.pid", "/b/c.sock", False)
    detached = parse(["exec", "-d", "--tty", "abc", "sh", "-c", "echo hi"])
    assert detached.detach and detached.tty and detached.command == ["sh", "-c", "echo hi"]


@pytest.mark.parametrize("text,number", [("9", 9), ("KILL", 9), ("SIGKILL", 9),
                                         ("term", int(signal.SIGTERM)), ("SIGUSR1", 10)])
def test_signals(text: str, number: int) -> None:
    assert parse_signal(text) == number


def test_kill_defaults_to_sigterm_and_takes_all() -> None:
    args = parse(["kill", "--all", "abc"])
    assert (args.all, args.signal) == (True, signal.SIGTERM)
    assert parse(["kill", "abc", "KILL"]).signal == 9


@pytest.mark.parametrize("argv", [[], ["frobnicate", "x"], ["exec", "abc"], ["start"],
                                  ["kill", "abc", "SIGNOPE"], ["kill", "abc", "99"]])
def test_bad_command_lines(argv: list[str]) -> None:
    with pytest.raises(ArgumentError):
        parse(argv)


def test_main_reports_bad_arguments_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "crivm-shim" in capsys.readouterr().err


def _state(started: bool = False, pid: int = 4242) -> ContainerState:
    return ContainerState(id="abc", bundle="/b", agent_socket="/s", guest_rootfs="/g/rootfs",
                          shim_pid=pid, created="2026-01-01T00:00:00Z", started=started,
                          annotations={"k": "v"})


def test_state_json_follows_runc() -> None:
    created = state_mod.state_json(_state(), shim_alive=True)
    assert created == {"ociVersion": "1.0.2", "id": "abc", "pid": 4242, "status": "created",
                       "bundle": "/b", "rootfs": "/g/rootfs",
                       "created": "2026-01-01T00:00:00Z", "owner": "",
                       "annotations": {"k": "v"}}
    assert state_mod.state_json(_state(started=True), True)["status"] == "running"
    stopped = state_mod.state_json(_state(started=True), False)
    assert (stopped["status"], stopped["pid"]) == ("stopped", 0)


def test_state_records_round_trip(tmp_path: Path) -> None:
    root = str(tmp_path)
    state_mod.save(root, _state())
    assert state_mod.load(root, "abc") == _state()
    state_mod.mark_started(root, state_mod.load(root, "abc"))
    assert state_mod.load(root, "abc").started
    state_mod.forget(root, "abc")
    with pytest.raises(state_mod.StateError):
        state_mod.load(root, "abc")
    with pytest.raises(state_mod.StateError):
        state_mod.container_dir(root, "../etc")


def test_state_verb_prints_json_and_sees_a_dead_shim(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_mod.save(str(tmp_path), _state(started=True, pid=os.getpid()))
    assert main(["--root", str(tmp_path), "state", "abc"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "running"
    state_mod.save(str(tmp_path), _state(started=True, pid=2**22 + 1))  # no such pid
    assert main(["--root", str(tmp_path), "state", "abc"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "stopped"
    assert main(["--root", str(tmp_path), "state", "nope"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_kill_of_a_stopped_container_is_a_no_op(tmp_path: Path) -> None:
    # Unlike runc: a stop that races the container's own exit must not fail.
    state_mod.save(str(tmp_path), _state(started=True, pid=2**22 + 1))
    assert main(["--root", str(tmp_path), "kill", "abc", "KILL"]) == 0
    assert main(["--root", str(tmp_path), "kill", "nope", "KILL"]) == 1


def test_bundle_needs_the_vm_annotations(tmp_path: Path) -> None:
    spec = {"process": {"args": ["sh"], "terminal": True},
            "annotations": {ANNOTATION_AGENT_SOCKET: "/s", ANNOTATION_GUEST_ROOTFS: "/g",
                            ANNOTATION_STDIN: "true"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    bundle = load_bundle(str(tmp_path))
    assert (bundle.agent_socket, bundle.guest_rootfs, bundle.terminal, bundle.stdin) == (
        "/s", "/g", True, True)
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["sh"]}}))
    with pytest.raises(BundleError):
        load_bundle(str(tmp_path))


def test_exec_process_from_oci_process_json(tmp_path: Path) -> None:
    process_file = tmp_path / "p.json"
    process_file.write_text(json.dumps({
        "args": ["ls", "/"], "env": ["A=1"], "cwd": "/tmp", "terminal": False,
        "user": {"uid": 33, "gid": 33, "additionalGids": [4]},
    }))
    process = exec_process(parse(["exec", "--process", str(process_file), "abc"]))
    assert (list(process.args), list(process.env), process.cwd, process.terminal) == (
        ["ls", "/"], ["A=1"], "/tmp", False)
    assert (process.user.uid, process.user.gid, list(process.user.additional_gids)) == (
        33, 33, [4])
    from_flags = exec_process(parse(["exec", "-t", "--cwd", "/w", "abc", "top"]))
    assert (list(from_flags.args), from_flags.cwd, from_flags.terminal) == (["top"], "/w", True)

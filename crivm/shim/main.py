"""``crivm-shim``: an OCI runtime CLI, with runc's verbs, for containers in VM pods.

conmon runs it as ``--runtime`` exactly as it would run runc::

    crivm-shim --root R create --bundle B --pid-file P [--console-socket S] ID
    crivm-shim --root R start|state ID
    crivm-shim --root R kill [--all] ID [SIGNAL]
    crivm-shim --root R delete [--force] ID
    crivm-shim --root R exec [--process P.json] [--pid-file P] [--detach] [--tty
                              --console-socket S] ID [CMD...]

``create`` asks the pod's agent to create the container in the guest, then starts the
container's stand-in on the host (``standin``: a fresh, small interpreter that hands its stdio
to the pod's supervisor, which relays it) and writes its pid where runc would write the
container's. ``exec`` does the same for a new process; without ``--detach`` the CLI waits for
the stand-in and exits as it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import stat
import sys
from argparse import Namespace
from datetime import UTC, datetime
from typing import Any

from crivm import __version__
from crivm.errors import CrivmError, NotFound, Unavailable
from crivm.proto import agent_pb2
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim import standin
from crivm.shim import state as state_mod
from crivm.shim.bundle import BundleError, load_bundle
from crivm.shim.cli_args import ArgumentError, parse
from crivm.shim.console import (
    HostTerminal,
    open_terminal,
    send_master,
    take_as_controlling_terminal,
)
from crivm.shim.state import ContainerState, StateError
from crivm.shim.vm_spec import PodPaths

log = logging.getLogger("crivm.shim")

REMOVE_GRACE_S = 10


class CommandError(Exception):
    """The verb failed; the message goes to stderr, as runc's errors do."""


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _write_pidfile(path: str, pid: int) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(str(pid))
    os.replace(tmp, path)


def _standin_argv(agent_socket: str, container_id: str, exec_id: str, terminal: bool,
                  stdin: bool, oom_file: str = "") -> list[str]:
    # The bundle names the pod's agent (mux) socket; the supervisor's stand-in socket is
    # its neighbour in the pod directory.
    socket_path = PodPaths(os.path.dirname(agent_socket)).standin_socket
    if not os.path.exists(socket_path):
        # Checked before the guest is asked for anything: a stand-in that cannot hand over
        # would only show as a container that exits 137 at once.
        raise CommandError(f"the pod's supervisor serves no {socket_path}: it is gone, or "
                           "older than this crivm-shim (recreate the pod)")
    return standin.argv(sys.executable, socket_path, container_id, exec_id, terminal, stdin,
                        oom_file)


def _start_standin(argv: list[str], terminal: HostTerminal | None) -> int:
    """Start the stand-in and return its pid. The CLI exits right after, so the stand-in is
    re-parented to conmon (a child subreaper), like runc's container process. It is exec'd
    afresh: a forked CLI would keep the CLI's whole heap for the container's lifetime."""
    pid = os.fork()
    if pid:
        if terminal is not None:
            os.close(terminal.slave)
        return pid
    try:
        if terminal is not None:
            take_as_controlling_terminal(terminal.slave)
            os.close(terminal.slave)
        else:
            os.setsid()  # away from conmon's process group: its signals are not ours
        os.execv(argv[0], argv)
    except BaseException as exc:  # noqa: BLE001 - the child's last word goes to its stderr
        with contextlib.suppress(OSError):
            os.write(2, f"crivm-shim: cannot start the stand-in: {exc}\n".encode())
    os._exit(1)


def _terminal_for(console_socket: str, wanted: bool) -> HostTerminal | None:
    if not wanted:
        return None
    if not console_socket:
        raise CommandError("a terminal needs --console-socket")
    terminal = open_terminal()
    send_master(console_socket, terminal)
    return terminal


async def _create_in_guest(args: Namespace) -> None:
    bundle = load_bundle(os.path.abspath(args.bundle))
    async with AgentClient(bundle.agent_socket) as agent:
        await agent.create_container(args.container_id, bundle.spec_json, bundle.guest_rootfs,
                                     terminal=bundle.terminal, stdin=bundle.stdin)


def cmd_create(args: Namespace) -> int:
    bundle = load_bundle(os.path.abspath(args.bundle))
    with contextlib.suppress(StateError):
        state_mod.load(args.root, args.container_id)
        raise CommandError(f"container {args.container_id} already exists")
    argv = _standin_argv(bundle.agent_socket, args.container_id, "", bundle.terminal,
                         bundle.stdin, bundle.oom_file)
    asyncio.run(_create_in_guest(args))
    try:
        terminal = _terminal_for(args.console_socket, bundle.terminal)
        pid = _start_standin(argv, terminal)
        state_mod.save(args.root, ContainerState(
            id=args.container_id, bundle=bundle.path, agent_socket=bundle.agent_socket,
            guest_rootfs=bundle.guest_rootfs, shim_pid=pid, created=_now_rfc3339(),
            annotations=dict(bundle.spec.get("annotations") or {}),
        ))
        _write_pidfile(args.pid_file, pid)
    except BaseException:
        asyncio.run(_remove_in_guest(bundle.agent_socket, args.container_id))
        state_mod.forget(args.root, args.container_id)
        raise
    return 0


def _require(args: Namespace) -> tuple[ContainerState, bool]:
    found = state_mod.load(args.root, args.container_id)
    return found, state_mod.pid_alive(found.shim_pid)


def cmd_state(args: Namespace) -> int:
    found, alive = _require(args)
    print(json.dumps(state_mod.state_json(found, alive), indent=2))
    return 0


def cmd_start(args: Namespace) -> int:
    found, alive = _require(args)
    status = state_mod.status_of(found, alive)
    if status != "created":
        raise CommandError(f"cannot start a container that is {status}")

    async def start() -> None:
        async with AgentClient(found.agent_socket) as agent:
            await agent.start_container(found.id)

    asyncio.run(start())
    state_mod.mark_started(args.root, found)
    return 0


def cmd_kill(args: Namespace) -> int:
    found, alive = _require(args)
    if not alive:
        # runc fails here; but the container can stop between the caller's `state` and this
        # `kill` (the shim outlives its process while it drains the output), and a stop
        # that races an exit must not fail: there is nothing left to signal.
        log.info("kill %s: the container is not running; nothing to signal", found.id)
        return 0

    async def kill() -> None:
        async with AgentClient(found.agent_socket) as agent:
            await agent.signal_process(found.id, "", args.signal, all_processes=args.all)

    asyncio.run(kill())
    return 0


async def _remove_in_guest(agent_socket: str, container_id: str) -> None:
    try:
        async with AgentClient(agent_socket, connect_timeout=2.0) as agent:
            await agent.remove_container(container_id, REMOVE_GRACE_S)
    except (NotFound, Unavailable) as exc:
        # The VM or the container is gone already: nothing is left to remove in the guest.
        log.info("container %s: %s", container_id, exc)


def cmd_delete(args: Namespace) -> int:
    found, alive = _require(args)
    if alive and found.started and not args.force:
        raise CommandError("cannot delete a running container without --force")
    asyncio.run(_remove_in_guest(found.agent_socket, found.id))
    if state_mod.pid_alive(found.shim_pid):
        # Its process is gone from the guest; the shim would only report that late.
        with contextlib.suppress(ProcessLookupError):
            os.kill(found.shim_pid, signal.SIGKILL)
    state_mod.forget(args.root, found.id)
    return 0


def exec_process(args: Namespace) -> agent_pb2.Process:
    """The agent's Process for ``exec``, from ``--process`` (an OCI process object) or from
    the command and flags."""
    if args.process:
        with open(args.process, encoding="utf-8") as fh:
            raw: dict[str, Any] = json.load(fh)
        user = raw.get("user") or {}
        process = agent_pb2.Process(
            args=raw.get("args") or [], env=raw.get("env") or [], cwd=raw.get("cwd", ""),
            terminal=bool(raw.get("terminal", False)),
        )
        if user:
            process.user.uid = int(user.get("uid", 0))
            process.user.gid = int(user.get("gid", 0))
            process.user.additional_gids.extend(user.get("additionalGids") or [])
    else:
        process = agent_pb2.Process(args=args.command, env=args.env, cwd=args.cwd,
                                    terminal=args.tty)
    if not process.args:
        raise CommandError("exec: the process has no args")
    process.terminal = process.terminal or args.tty
    return process


def cmd_exec(args: Namespace) -> int:
    found, alive = _require(args)
    if not alive or not found.started:
        raise CommandError("cannot exec in a container that is not running")
    process = exec_process(args)
    # Without a terminal the process gets a stdin pipe when ours is one (an attached exec).
    process.stdin = process.terminal or not os.isatty(0) and _is_pipe(0)
    exec_id = "exec-" + secrets.token_hex(6)

    async def start() -> None:
        async with AgentClient(found.agent_socket) as agent:
            await agent.exec_process(found.id, exec_id, process)

    argv = _standin_argv(found.agent_socket, found.id, exec_id, process.terminal,
                         process.stdin)
    asyncio.run(start())
    terminal = _terminal_for(args.console_socket, process.terminal)
    pid = _start_standin(argv, terminal)
    _write_pidfile(args.pid_file, pid)
    if args.detach:
        return 0
    return _wait_foreground(pid)


def _wait_foreground(standin_pid: int) -> int:
    """Wait for the exec's stand-in and exit as it did. Callers kill the pid-file pid (the
    stand-in) on a timeout; the supervisor then kills the guest process too."""
    while True:
        try:
            _, status = os.waitpid(standin_pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def cmd_update(args: Namespace) -> int:
    raise CommandError("updating the resources of a container in a VM is not supported yet")


COMMANDS = {
    "create": cmd_create, "start": cmd_start, "state": cmd_state, "kill": cmd_kill,
    "delete": cmd_delete, "exec": cmd_exec, "update": cmd_update,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except ArgumentError as exc:
        print(f"crivm-shim: {exc}", file=sys.stderr)
        return 2
    if args.version:
        print(f"crivm-shim version {__version__}\nspec: {state_mod.OCI_VERSION}")
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        filename=args.log or None,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.verb](args)
    except (CommandError, StateError, BundleError, CrivmError, OSError) as exc:
        log.error("%s %s: %s", args.verb, getattr(args, "container_id", ""), exc)
        print(f"crivm-shim: {args.verb}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

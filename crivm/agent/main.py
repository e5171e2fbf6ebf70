"""Entry point of the in-guest agent: `python3 -m crivm.agent.main [--transport ...]`."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from crivm import __version__
from crivm.agent.containers import Containers
from crivm.agent.network import RESOLV_CONF, GuestNetwork
from crivm.agent.reaper import Reaper, become_subreaper
from crivm.agent.rpc import RpcServer
from crivm.agent.runc import Runc, root_is_initramfs
from crivm.agent.server import AgentService
from crivm.agent.transport import parse_endpoint, serve_forever

log = logging.getLogger("crivm.agent")

_LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def transport_from_environment(env: Mapping[str, str]) -> str:
    """The transport the guest's /init announces (see guest-image/README.md), else serial."""
    kind = env.get("CRIVM_AGENT_TRANSPORT", "")
    if kind == "virtio-serial":
        device = env.get("CRIVM_AGENT_DEVICE", "")
        return f"serial:{device}" if device else "serial"
    if kind == "vsock":
        port = env.get("CRIVM_AGENT_VSOCK_PORT", "")
        return f"vsock:{port}" if port else "vsock"
    return "serial"


@dataclass(frozen=True)
class AgentArgs:
    transport: str
    state_dir: str = "/run/crivm-agent"
    runc: str = "runc"
    resolv_conf: str = RESOLV_CONF
    log_level: str = "info"


_USAGE = """usage: crivm-agent [--transport T] [--state-dir DIR] [--runc PATH] [--resolv-conf PATH]
                   [--log-level LEVEL]

  --transport    serial[:PATH] (default /dev/virtio-ports/agent.0), vsock[:PORT] (default 1024)
                 or unix:PATH. Without it: CRIVM_AGENT_TRANSPORT and CRIVM_AGENT_DEVICE or
                 CRIVM_AGENT_VSOCK_PORT from the guest's init.
  --state-dir    default /run/crivm-agent
  --runc         the runc binary (default runc)
  --resolv-conf  default {resolv}
  --log-level    default info
"""


def parse_args(argv: list[str] | None) -> AgentArgs:
    """``--name VALUE`` or ``--name=VALUE`` for each field of AgentArgs.

    Not argparse: under TCG, importing argparse (and gettext with it) and building its parser
    cost the guest about 0.1-0.2 s of every VM's boot, for five options.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    values: dict[str, str] = {}
    names = {f"--{name.replace('_', '-')}": name for name in AgentArgs.__dataclass_fields__}
    while args:
        word = args.pop(0)
        if word in ("-h", "--help"):
            sys.stdout.write(_USAGE.format(resolv=RESOLV_CONF))
            sys.exit(0)
        flag, eq, value = word.partition("=")
        if flag not in names:
            _usage_error(f"unrecognized argument: {word}")
        if not eq:
            if not args:
                _usage_error(f"{flag} needs a value")
            value = args.pop(0)
        values[names[flag]] = value
    values.setdefault("transport", transport_from_environment(os.environ))
    return AgentArgs(**values)


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(_USAGE.format(resolv=RESOLV_CONF) + f"crivm-agent: error: {message}\n")
    sys.exit(2)


async def run(args: AgentArgs) -> None:
    endpoint = parse_endpoint(args.transport)
    become_subreaper()
    state_dir = os.path.abspath(args.state_dir)
    log_dir = os.path.join(state_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    no_pivot = root_is_initramfs()
    if no_pivot:
        log.info("/ is the initramfs: containers are jailed with runc --no-pivot")
    runc = Runc(args.runc, os.path.join(state_dir, "runc"), log_dir, no_pivot=no_pivot)
    reaper = Reaper()
    reaper.start()
    containers = Containers(runc, reaper, state_dir)
    rpc = RpcServer()
    AgentService(containers, runc, GuestNetwork(args.resolv_conf)).register(rpc)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(serve_forever(endpoint, rpc.serve_connection))
    log.info("crivm agent %s serving on %s:%s", __version__, endpoint.kind, endpoint.address)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        serving.cancel()
        stopped.cancel()
        await asyncio.gather(serving, stopped, return_exceptions=True)
        # Containers left behind would have no one to manage them: take them down with us.
        await containers.remove_all()
        await reaper.stop()
    failure = serving.exception() if serving.done() and not serving.cancelled() else None
    if failure is not None:
        raise failure
    log.info("agent stopped")


def _supervise_as_init() -> None:
    """As PID 1, fork: the child becomes the agent, this process reaps orphans.

    PID 1 inherits every orphan in the guest. Leaving that to a tiny loop here keeps the agent's
    own reaping down to the container processes it watches, which never races with asyncio's
    reaping of the runc commands. When the agent dies, the VM powers off: the host sees the VM
    stop instead of a guest that no longer answers.
    """
    agent = os.fork()
    if agent == 0:
        return
    status = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == agent:
            break
    print(f"crivm-agent: agent exited with status {status:#x}; powering off", file=sys.stderr)
    os.sync()
    ctypes.CDLL(None).reboot(_LINUX_REBOOT_CMD_POWER_OFF)
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.getpid() == 1:
        _supervise_as_init()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()

"""The per-pod VM supervisor, started as ``python3 -m crivm.shim.supervisor_entry <vm.json>``.

One supervisor per VM pod owns the pod's virtiofsd and QEMU (both die with it, through
PR_SET_PDEATHSIG) and the one connection QEMU's agent socket accepts, which it shares with the
daemon and the shims (``agent_mux``). It also relays the stdio of every container's stand-in
(``standin_relay``), so conmon's per-container process stays a bare interpreter. It detaches
from whoever started it, so VM pods keep running while the daemon restarts; a daemon finds it
again by its pid file.

Startup handshake: the first process forks the real supervisor and waits for one JSON line on
a pipe, ``{"ok": true, ...}`` once QEMU runs and the agent socket is shared, or
``{"ok": false, "error": ...}``. It prints the line and exits 0 or 1, so the daemon learns the
outcome from an ordinary child's exit. The daemon starts the supervisor inside the pod's
network namespace, so QEMU opens the pod's tap by name.

The supervisor exits when the VM stops (the guest powered off, or QEMU died), and on SIGTERM
it quits the VM first. Either way virtiofsd goes with it and the sockets are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from crivm.errors import DeadlineExceeded, Unavailable
from crivm.hypervisor.qemu import cmdline, owner, virtiofsd
from crivm.hypervisor.qemu.vm import QemuVm
from crivm.runtime.vm_backend.agent_client import AgentClient
from crivm.shim.agent_mux import AgentMux
from crivm.shim.standin_relay import StandinServer
from crivm.shim.vm_spec import SHARED_TAG, PodPaths, VmSpec

log = logging.getLogger("crivm.shim.vm_supervisor")

SHUTDOWN_TIMEOUT_S = 10.0


def vm_config(spec: VmSpec) -> cmdline.VmConfig:
    paths = spec.paths
    networks: tuple[cmdline.TapNetwork, ...] = ()
    if spec.tap_name:
        networks = (cmdline.TapNetwork(id="net0", mac=spec.mac, ifname=spec.tap_name),)
    return cmdline.VmConfig(
        name=spec.name,
        machine=cmdline.Machine(
            type="microvm" if spec.machine == "microvm" else "q35",
            accel="kvm" if spec.accel == "kvm" else "tcg",
            tcg_tb_size_mb=spec.tcg_tb_size_mb,
        ),
        kernel_path=spec.kernel,
        initrd_path=spec.initrd,
        memory=cmdline.Memory(spec.memory_mb, spec.vcpus),
        console=cmdline.Console(paths.console_log),
        qmp=cmdline.Qmp(paths.qmp_socket),
        agent=cmdline.VirtioSerialAgent(paths.agent_socket),
        filesystems=(cmdline.VirtioFs("fs0", paths.virtiofsd_socket, SHARED_TAG),),
        networks=networks,
        extra_kernel_args=spec.extra_kernel_args,
        balloon=cmdline.Balloon() if spec.free_page_reporting else None,
        usr=(cmdline.UsrImage(spec.usr_image, os.path.getsize(spec.usr_image))
             if spec.usr_image else None),
    )


async def _connect_agent(path: str, timeout_s: float) -> tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except OSError as exc:
            if loop.time() >= deadline:
                raise Unavailable(f"cannot connect to the agent socket {path}: {exc}") from exc
            await asyncio.sleep(0.02)


class Supervisor:
    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.paths: PodPaths = spec.paths
        self.vm: QemuVm | None = None
        self.fs: virtiofsd.Virtiofsd | None = None
        # The stand-ins' relays reach the agent through the mux, as any other client.
        self.standins = StandinServer(AgentClient(spec.paths.mux_socket))

    async def start(self) -> AgentMux:
        spec, paths = self.spec, self.paths
        self.fs = await virtiofsd.start(
            spec.virtiofsd_path, paths.shared_dir, paths.virtiofsd_socket, paths.virtiofsd_log,
        )
        self.vm = await QemuVm.launch(spec.qemu_path, vm_config(spec), paths.qemu_log,
                                      startup_timeout_s=spec.startup_timeout_s)
        if spec.nice:
            # Each runs in a session, and so an autogroup, of its own.
            for pid in (self.fs.pid, self.vm.pid):
                owner.set_priority(pid, spec.nice)
        reader, writer = await _connect_agent(paths.agent_socket, spec.startup_timeout_s)
        mux = AgentMux(reader, writer)
        await mux.listen(paths.mux_socket)
        await self.standins.listen(paths.standin_socket)
        return mux

    async def stop(self) -> None:
        # First the stand-ins: they exit with LOST_EXIT_CODE, as when the VM goes.
        await self.standins.close()
        if self.vm is not None:
            await self.vm.shutdown(SHUTDOWN_TIMEOUT_S)
        if self.fs is not None:
            await self.fs.stop()

    async def run(self, report_fd: int) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            mux = await self.start()
        except Exception as exc:  # noqa: BLE001 - whatever it was, the daemon must hear it
            log.exception("VM %s did not start", self.spec.name)
            await self.stop()
            _report(report_fd, {"ok": False, "error": str(exc)})
            return 1
        assert self.vm is not None and self.fs is not None
        _report(report_fd, {"ok": True, "qemu_pid": self.vm.pid, "virtiofsd_pid": self.fs.pid,
                            "supervisor_pid": os.getpid()})
        relay = asyncio.ensure_future(mux.relay())
        stopping = asyncio.ensure_future(stop.wait())
        qemu_exit = asyncio.ensure_future(self.vm.process.wait())
        await asyncio.wait({relay, stopping, qemu_exit}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            log.info("VM %s: stopping on request", self.spec.name)
        elif qemu_exit.done():
            log.info("VM %s: QEMU exited with %s", self.spec.name, qemu_exit.result())
        else:
            log.info("VM %s: the agent connection ended", self.spec.name)
        await self.stop()
        for task in (relay, stopping, qemu_exit):
            task.cancel()
        await asyncio.gather(relay, stopping, qemu_exit, return_exceptions=True)
        log.info("VM %s: supervisor exits", self.spec.name)
        return 0


def _report(fd: int, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(message) + "\n").encode())
        os.close(fd)


def _redirect_stdio(log_path: str) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _wait_for_report(read_fd: int, child: int) -> int:
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    line = b"".join(chunks).decode(errors="replace").strip()
    if not line:
        # The supervisor died before it could say anything; its log says why.
        _, status = os.waitpid(child, os.WNOHANG)
        line = json.dumps({"ok": False, "error": f"supervisor exited early (status {status})"})
    print(line, flush=True)
    return 0 if json.loads(line).get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m crivm.shim.vm_supervisor <vm.json>", file=sys.stderr)
        return 2
    spec = VmSpec.load(args[0])
    paths = spec.paths
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        return _wait_for_report(read_fd, child)
    # The supervisor: its own session, away from the daemon's terminal and process group.
    os.close(read_fd)
    os.setsid()
    if spec.nice:
        owner.set_priority(os.getpid(), spec.nice)  # virtiofsd and QEMU inherit the threads'
    _redirect_stdio(paths.supervisor_log)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(paths.supervisor_pidfile, "w") as pidfile:
        pidfile.write(f"{os.getpid()}\n")
    try:
        code = asyncio.run(Supervisor(spec).run(write_fd))
    except DeadlineExceeded as exc:
        log.error("%s", exc)
        code = 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.supervisor_pidfile)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

"""The two runtimes under test, each started by the bench with its own temporary state.

Both daemons get the same CNI conflist directory (bridge ``crivmbench0`` on 10.92.0.0/16, its
own host-local IPAM dir) and the same plugin dir, and both reach the local registry through
their own mirror syntax: crivm through a registries.conf, containerd through a hosts.toml
directory (``config_path``). Everything a daemon makes lives under its base dir, so the final
sweep can tell what was left behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from crivm.netbridge.cni_config import conflist_on
from crivm.proto import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_BRIDGE = "crivmbench0"
# Apart from the test fixtures' networks (10.90/16 runc, 10.91/16 vm), which may be up at the
# same time on this host: two bridges with one subnet would steal each other's routes.
BENCH_SUBNET = "10.92.0.0/16"
BENCH_GATEWAY = "10.92.0.1"
CNI_PLUGIN_DIR = "/usr/lib/cni"
RUNC = "/usr/sbin/runc"
CONTAINERD = "/usr/bin/containerd"
PAUSE_IMAGE = "registry.k8s.io/pause:3.9"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class DaemonError(Exception):
    """A runtime under test did not start or stop as it should; the message has its log."""


def write_conflist(conf_dir: Path, ipam_dir: Path) -> Path:
    """The one CNI network both runtimes use: bridge + portmap + firewall + tuning."""
    conflist = conflist_on(BENCH_BRIDGE, BENCH_SUBNET, BENCH_GATEWAY, str(ipam_dir))
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / f"10-{BENCH_BRIDGE}.conflist"
    path.write_text(json.dumps(conflist, indent=2))
    return path


def _toml(value: str) -> str:
    # A JSON string literal is a valid TOML basic string for the paths and URLs we write.
    return json.dumps(value)


@dataclass
class RuntimeUnderTest:
    """One daemon process: how to start it, its socket, and what belongs to it."""

    name: str
    base: Path
    socket: Path
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, env=env,
            )
        self.channel = grpc.insecure_channel(
            f"unix://{self.socket}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        stub = api_pb2_grpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise DaemonError(f"{self.name} exited {self.process.returncode}:\n"
                                  f"{self.log_tail()}")
            try:
                stub.Version(api_pb2.VersionRequest(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise DaemonError(f"{self.name} did not serve within {START_TIMEOUT_S}s:\n"
                                      f"{self.log_tail()}") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DaemonError(f"{self.name} ignored SIGTERM:\n{self.log_tail()}") from None

    def log_tail(self, max_bytes: int = 6000) -> str:
        try:
            return self.log_path.read_bytes()[-max_bytes:].decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def version(self) -> str:
        assert self.channel is not None
        stub = api_pb2_grpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        reply = stub.Version(api_pb2.VersionRequest(), timeout=10)
        return f"{reply.runtime_name} {reply.runtime_version}"


def crivm_runtime(base: Path, registries_conf: Path, cni_conf_dir: Path,
                  log_level: str = "info", extra_toml: str = "") -> RuntimeUnderTest:
    """crivm serving on base/crivm.sock with root, runroot and config under ``base``;
    ``extra_toml`` is appended (more ``[runtimes.<name>]`` tables)."""
    base.mkdir(parents=True)
    socket = base / "crivm.sock"
    config = base / "crivm.toml"
    config.write_text(
        f"listen = {_toml(str(socket))}\n"
        f"root = {_toml(str(base / 'root'))}\n"
        f"runroot = {_toml(str(base / 'run'))}\n"
        f"registries_conf = {_toml(str(registries_conf))}\n"
        f"pause_image = {_toml(PAUSE_IMAGE)}\n"
        f"cni_config_dir = {_toml(str(cni_conf_dir))}\n"
        f"cni_plugin_dirs = [{_toml(CNI_PLUGIN_DIR)}]\n"
        'default_runtime = "runc"\n'
        'untrusted_runtime = ""\n'
        f"log_level = {_toml(log_level)}\n"
        "\n[runtimes.runc]\n"
        'runtime_type = "oci"\n'
        f"runtime_path = {_toml(RUNC)}\n"
        + extra_toml
    )
    argv = [sys.executable, "-m", "crivm", "serve", "--config", str(config)]
    return RuntimeUnderTest("crivm", base, socket, argv, base / "crivm.log")


def containerd_runtime(base: Path, registry_host: str, upstreams: tuple[str, ...],
                       cni_conf_dir: Path) -> RuntimeUnderTest:
    """containerd with the CRI plugin, runc v2 shims, and mirrors to ``registry_host``."""
    base.mkdir(parents=True)
    socket = base / "containerd.sock"
    certs_dir = base / "certs.d"
    for upstream in upstreams:
        host_dir = certs_dir / upstream
        host_dir.mkdir(parents=True)
        server = "https://registry-1.docker.io" if upstream == "docker.io" else f"https://{upstream}"
        (host_dir / "hosts.toml").write_text(
            f"server = {_toml(server)}\n\n"
            f"[host.{_toml('http://' + registry_host)}]\n"
            '  capabilities = ["pull", "resolve"]\n'
        )
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f"root = {_toml(str(base / 'root'))}\n"
        f"state = {_toml(str(base / 'state'))}\n"
        # Snapshotters this host cannot run only add start-up noise.
        'disabled_plugins = ["io.containerd.snapshotter.v1.btrfs",'
        ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",'
        ' "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.opt"]\n'
        "\n[grpc]\n"
        f"  address = {_toml(str(socket))}\n"
        "\n[ttrpc]\n"
        f"  address = {_toml(str(base / 'containerd.sock.ttrpc'))}\n"
        f'\n{cri}]\n'
        f"  sandbox_image = {_toml(PAUSE_IMAGE)}\n"
        '  stream_server_address = "127.0.0.1"\n'
        '  stream_server_port = "0"\n'
        # Like crivm, which pins pod netns under its runroot.
        "  netns_mounts_under_state_dir = true\n"
        # Without CAP_SYS_RESOURCE runc cannot set the sandbox's -998; crivm clamps too.
        "  restrict_oom_score_adj = true\n"
        f"{cri}.containerd]\n"
        '  default_runtime_name = "runc"\n'
        '  snapshotter = "overlayfs"\n'
        f"{cri}.containerd.runtimes.runc]\n"
        '  runtime_type = "io.containerd.runc.v2"\n'
        f"{cri}.containerd.runtimes.runc.options]\n"
        f"  BinaryName = {_toml(RUNC)}\n"
        f"  Root = {_toml(str(base / 'runc'))}\n"
        f"{cri}.cni]\n"
        f"  bin_dir = {_toml(CNI_PLUGIN_DIR)}\n"
        f"  conf_dir = {_toml(str(cni_conf_dir))}\n"
        "  max_conf_num = 1\n"
        f"{cri}.registry]\n"
        f"  config_path = {_toml(str(certs_dir))}\n"
    )
    argv = [CONTAINERD, "--config", str(config)]
    return RuntimeUnderTest("containerd", base, socket, argv, base / "containerd.log")

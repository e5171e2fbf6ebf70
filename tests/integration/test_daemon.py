"""The daemon as a real process: socket, lifecycle, errors, and what survives a restart."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from crivm.proto import api_pb2, api_pb2_grpc


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.socket = tmp / "run" / "nested" / "crivm.sock"
        self.config = tmp / "crivm.toml"
        self.config.write_text(
            f'listen = "{self.socket}"\nroot = "{tmp / "root"}"\nrunroot = "{tmp / "run"}"\n'
            f'cni_config_dir = "{tmp / "cni"}"\n'
        )
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crivm", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_version_and_socket_mode(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660
    with daemon.channel() as ch:
        v = api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(), timeout=5)
    assert (v.runtime_name, v.runtime_api_version) == ("crivm", "v1")


def test_status_reports_conditions_with_reasons(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        status = api_pb2_grpc.RuntimeServiceStub(ch).Status(
            api_pb2.StatusRequest(verbose=True), timeout=5
        )
    conditions = {c.type: c for c in status.status.conditions}
    assert set(conditions) == {"RuntimeReady", "NetworkReady"}
    # The test config points CNI at an empty directory: the network cannot be ready.
    assert conditions["NetworkReady"].status is False
    assert conditions["NetworkReady"].reason and conditions["NetworkReady"].message
    assert conditions["RuntimeReady"].status is True, conditions["RuntimeReady"].message
    assert {h.name for h in status.runtime_handlers} == {"runc", "vm"}
    assert "config" in status.info


def test_malformed_request_and_unknown_method_leave_daemon_serving(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        raw = ch.unary_unary("/runtime.v1.RuntimeService/Version")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed Version request" in (err.value.details() or "")

        unknown = ch.unary_unary("/runtime.v1.RuntimeService/NoSuchCall")
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        stub = api_pb2_grpc.RuntimeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateRuntimeConfig(
                api_pb2.UpdateRuntimeConfigRequest(
                    runtime_config=api_pb2.RuntimeConfig(
                        network_config=api_pb2.NetworkConfig(pod_cidr="10.0.0.0/99")
                    )
                ),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pod_cidr" in (err.value.details() or "")
        assert stub.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "crivm"


def test_sigterm_stops_cleanly_and_restart_keeps_state(daemon: Daemon) -> None:
    with daemon.channel() as ch:
        api_pb2_grpc.RuntimeServiceStub(ch).UpdateRuntimeConfig(
            api_pb2.UpdateRuntimeConfigRequest(
                runtime_config=api_pb2.RuntimeConfig(
                    network_config=api_pb2.NetworkConfig(pod_cidr="10.244.1.0/24")
                )
            ),
            timeout=5,
        )
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    assert "crivm stopped" in daemon.log.read_text()

    daemon.start()
    with daemon.channel() as ch:
        status = api_pb2_grpc.RuntimeServiceStub(ch).Status(
            api_pb2.StatusRequest(verbose=True), timeout=5
        )
    assert status.info["podCIDR"] == "10.244.1.0/24"
    assert daemon.stop(signal.SIGINT) == 0


def test_bad_config_fails_fast_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('listen = "/tmp/x.sock"\nstream_prot = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "crivm", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{config}: stream_prot: unknown key" in result.stderr


def test_second_daemon_on_a_live_socket_is_refused(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crivm", "serve", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "already serving" in result.stderr
    with daemon.channel() as ch:
        api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(), timeout=5)

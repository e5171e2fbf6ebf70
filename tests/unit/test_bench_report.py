"""The bench's statistics, tables and generated daemon configs (no daemons started)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from bench import report
from bench.daemons import (
    BENCH_BRIDGE,
    BENCH_SUBNET,
    PAUSE_IMAGE,
    containerd_runtime,
    crivm_runtime,
    write_conflist,
)
from crivm.runtime.config import from_dict


def test_summary_median_and_nearest_rank_p90() -> None:
    summary = report.Summary.of([0.001 * n for n in range(1, 11)])  # 1..10 ms
    assert summary is not None
    assert summary.count == 10
    assert summary.median_ms == pytest.approx(5.5)
    assert summary.p90_ms == pytest.approx(9.0)
    assert report.Summary.of([]) is None


def test_latency_table_has_ratio_crivm_over_containerd() -> None:
    samples = {"crivm": {"Op": [0.002, 0.002]}, "containerd": {"Op": [0.004, 0.004]}}
    table = report.summarize(samples, ["Op", "Missing"])
    assert list(table) == ["Op"]
    row = report.latency_markdown(table).splitlines()[2]
    assert row == "| Op | 2 | 2.00 | 2.00 | 4.00 | 4.00 | 0.50 | 0.50 |"


def test_memory_table_lists_helpers() -> None:
    entry = {"daemon_rss_kib": 2048, "daemon_pss_kib": 1024,
             "helpers": {"conmon": {"count": 2, "rss_kib": 10, "pss_kib": 1024}}}
    other = {"daemon_rss_kib": 1024, "daemon_pss_kib": 1024, "helpers": {}}
    text = report.memory_markdown({"idle": {"crivm": entry, "containerd": other}})
    assert "| idle | 2.0 | 1.0 | 2.00 | 2 conmon, 1.0 | none |" in text


def test_both_daemons_get_the_same_conflist(tmp_path: Path) -> None:
    path = write_conflist(tmp_path / "cni", tmp_path / "ipam")
    conflist = json.loads(path.read_text())
    bridge = conflist["plugins"][0]
    assert bridge["bridge"] == BENCH_BRIDGE
    assert bridge["ipam"]["ranges"] == [[{"subnet": BENCH_SUBNET, "gateway": "10.92.0.1"}]]
    crivm = crivm_runtime(tmp_path / "crivm", tmp_path / "registries.conf", tmp_path / "cni")
    config = from_dict(tomllib.loads((tmp_path / "crivm" / "crivm.toml").read_text()))
    assert config.cni_config_dir == str(tmp_path / "cni")
    assert config.pause_image == PAUSE_IMAGE
    assert config.listen == str(crivm.socket)
    containerd = containerd_runtime(tmp_path / "ctrd", "127.0.0.1:5000",
                                    ("docker.io", "registry.k8s.io"), tmp_path / "cni")
    toml = tomllib.loads((tmp_path / "ctrd" / "config.toml").read_text())
    cri = toml["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["cni"]["conf_dir"] == str(tmp_path / "cni")
    assert cri["sandbox_image"] == PAUSE_IMAGE
    assert cri["restrict_oom_score_adj"] is True
    assert cri["containerd"]["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert toml["grpc"]["address"] == str(containerd.socket)
    hosts = tomllib.loads(
        (Path(cri["registry"]["config_path"]) / "docker.io" / "hosts.toml").read_text())
    assert hosts["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull", "resolve"]

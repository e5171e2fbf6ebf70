"""The side-by-side bench, run end to end at its smallest: both daemons start, every phase
produces samples for both runtimes, and nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench import cri_bench

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry,
              pytest.mark.timeout(600)]


def test_bench_runs_both_runtimes_and_cleans_up(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the bench needs root")
    for binary in ("containerd", "conmon", "runc", "docker-registry"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed")
    code = cri_bench.main(["--iterations", "1", "--big-pull-iterations", "1", "--inner", "1",
                           "--memory-pods", "2", "--list-sizes", "2", "3",
                           "--out", str(tmp_path)])
    assert code == 0  # non-zero when the sweep found leftovers
    (results,) = tmp_path.glob("*.json")
    payload = json.loads(results.read_text())
    assert payload["leaks"] == []
    for runtime in ("crivm", "containerd"):
        samples = payload["samples"][runtime]
        for op in ("RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer",
                   "RemoveContainer", "StopPodSandbox", "RemovePodSandbox", "ExecSync",
                   "ListContainers (3 containers)", "ImageStatus", "ListImages"):
            assert len(samples[op]) >= 1, (runtime, op)
        memory = payload["memory"]["2 pods (1 container each)"][runtime]
        assert memory["daemon_rss_kib"] > 0
    assert not Path("/sys/class/net/crivmbench0").exists()
    assert "| RunPodSandbox |" in (tmp_path / results.name.replace(".json", ".md")).read_text()

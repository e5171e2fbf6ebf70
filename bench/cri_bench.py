"""Side-by-side CRI benchmark: crivm against containerd 1.6 (CRI plugin, runc v2 shims).

    sudo python3 -m bench.cri_bench [--iterations 20] [--py-spy out.txt]

In one run it starts a docker-registry on 127.0.0.1 with the test images (pause, busybox and
a ~50 MB five-layer image, built by tests/fixtures), starts both daemons with temporary
state (see bench/daemons.py), drives both with the same client through the same calls
(bench/workloads.py), prints a Markdown table, writes bench/results/<stamp>.{json,md}, and
removes everything it made: pods, daemons, mounts, netns, the bridge, the registry.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import report, workloads
from bench.cleanup import sweep
from bench.cri_client import TimedCri
from bench.daemons import (
    BENCH_BRIDGE,
    PAUSE_IMAGE,
    RuntimeUnderTest,
    containerd_runtime,
    crivm_runtime,
    write_conflist,
)
from bench.workloads import MemorySnapshot, Plan, Watched
from tests.fixtures import image_recipes
from tests.fixtures.images import PushedImage, push
from tests.fixtures.registries_conf import mirror_conf
from tests.fixtures.registry import Registry, _start_registry, _stop

log = logging.getLogger("bench")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIRRORED = ("docker.io", "registry.k8s.io")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20,
                        help="lifecycle/pull iterations per runtime (default 20)")
    parser.add_argument("--big-pull-iterations", type=int, default=10,
                        help="cold pulls of the ~50 MB image per runtime (default 10)")
    parser.add_argument("--inner", type=int, default=5,
                        help="samples of each read-only call per iteration (default 5)")
    parser.add_argument("--memory-pods", type=int, default=50)
    parser.add_argument("--list-sizes", type=int, nargs=2, default=(10, 200))
    parser.add_argument("--phases", default="images,lifecycle,list,memory",
                        help="comma-separated subset of images,lifecycle,list,memory")
    parser.add_argument("--crivm-log-level", default="info")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="OUT",
                        help="record crivm with py-spy (folded stacks) during the run; the "
                             "timings then include the profiler's overhead")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def _push_images(registry: Registry, work: Path) -> dict[str, PushedImage]:
    pause_dir = work / "pause-build"
    pause_dir.mkdir()
    binary = image_recipes.compile_pause(pause_dir)
    return {
        "pause": push(registry, "pause", ("3.9",), image_recipes.pause_image(binary)),
        "small": push(registry, "library/busybox", ("latest",), image_recipes.busybox_image()),
        "big": push(registry, "crivm-test/big", ("latest",), image_recipes.big_image()),
    }


def _image_label(name: str, image: PushedImage) -> str:
    layers = len(image.layer_digests)
    return f"{name} ({layers} layer{'s' if layers > 1 else ''}, {image.size / 1e6:.1f} MB)"


@contextlib.contextmanager
def _py_spy(pid: int, out: Path | None) -> Iterator[None]:
    if out is None:
        yield
        return
    binary = shutil.which("py-spy")
    if binary is None:
        raise SystemExit("--py-spy needs py-spy (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # --nonblocking: sampling does not stop the daemon, so timings stay close to real.
    recorder = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [binary, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--threads",
         "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield
    finally:
        recorder.send_signal(2)  # SIGINT makes py-spy write its output
        _, err = recorder.communicate(timeout=60)
        if recorder.returncode not in (0, -2):
            log.warning("py-spy exited %s: %s", recorder.returncode, err.decode()[-2000:])


def _machine(runtimes: dict[str, RuntimeUnderTest]) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        return (done.stdout or done.stderr).splitlines()[0]

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    head = first_line(["git", "-C", str(Path(__file__).resolve().parents[1]),
                       "rev-parse", "--short", "HEAD"])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "runc": first_line(["runc", "--version"]),
        "conmon": first_line(["conmon", "--version"]),
        "containerd": runtimes["containerd"].version(),
        "crivm": f"{runtimes['crivm'].version()} (git {head})",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    phases = set(args.phases.split(","))
    plan = Plan(iterations=args.iterations, big_pull_iterations=args.big_pull_iterations,
                inner=args.inner, list_sizes=tuple(args.list_sizes),
                containers_per_pod=10, memory_pods=args.memory_pods)
    work = Path(tempfile.mkdtemp(prefix="crivm-bench-", dir="/tmp"))
    log.info("working in %s", work)
    registry_dir = work / "registry"
    registry_dir.mkdir()
    registry, registry_process = _start_registry(registry_dir, auth=False)
    runtimes: dict[str, RuntimeUnderTest] = {}
    clients: dict[str, TimedCri] = {}
    payload: dict[str, Any] = {"plan": plan.__dict__, "phases": sorted(phases)}
    try:
        pushed = _push_images(registry, work)
        registries_conf = work / "registries.conf"
        registries_conf.write_text(mirror_conf(registry.host))
        cni_dir = work / "cni"
        write_conflist(cni_dir, work / "ipam")
        runtimes["crivm"] = crivm_runtime(work / "crivm", registries_conf, cni_dir,
                                          args.crivm_log_level)
        runtimes["containerd"] = containerd_runtime(work / "containerd", registry.host,
                                                    MIRRORED, cni_dir)
        for name, runtime in runtimes.items():
            runtime.start()
            assert runtime.channel is not None
            clients[name] = TimedCri(runtime.channel, str(work / "pod-logs" / name))
        payload["machine"] = _machine(runtimes)
        for cri in clients.values():
            cri.pull(PAUSE_IMAGE)
            cri.pull(workloads.SMALL_IMAGE)
        snapshot = MemorySnapshot({
            "crivm": Watched(runtimes["crivm"].pid,
                             {"conmon": (str(runtimes["crivm"].base), "conmon")}),
            "containerd": Watched(runtimes["containerd"].pid,
                                  {"shim": (str(runtimes["containerd"].socket),
                                            "containerd-shim-runc-v2")}),
        })
        snapshot.take("idle (pause + busybox stored, no pods)")
        started = time.monotonic()
        payload["load_average_1m"] = {"start": os.getloadavg()[0]}
        with _py_spy(runtimes["crivm"].pid, args.py_spy):
            if "images" in phases:
                workloads.image_phase(clients, plan, _image_label("busybox", pushed["small"]),
                                      _image_label("big", pushed["big"]))
            if "lifecycle" in phases:
                workloads.lifecycle_phase(clients, plan)
            if "list" in phases:
                workloads.list_phase(clients, plan, snapshot)
            if "memory" in phases:
                workloads.memory_phase(clients, plan, snapshot)
        snapshot.take("idle after the run")
        payload["load_average_1m"]["end"] = os.getloadavg()[0]
        payload["duration_s"] = round(time.monotonic() - started, 1)
        payload["samples"] = {name: dict(cri.samples) for name, cri in clients.items()}
        payload["memory"] = snapshot.states
    finally:
        payload["leaks"] = _teardown(runtimes, clients, registry_process, work, args.keep)
    return payload


def _teardown(runtimes: dict[str, RuntimeUnderTest], clients: dict[str, TimedCri],
              registry_process: subprocess.Popen[bytes], work: Path, keep: bool) -> list[str]:
    for name, cri in clients.items():
        try:
            cri.remove_all_pods()
        except Exception:  # noqa: BLE001 - teardown goes on; the sweep reports leftovers
            log.exception("%s: removing pods failed", name)
    for runtime in runtimes.values():
        try:
            runtime.stop()
        except Exception:  # noqa: BLE001
            log.exception("%s: stop failed", runtime.name)
    _stop(registry_process)
    leaks = sweep(work, BENCH_BRIDGE)
    if keep:
        log.info("kept %s", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return leaks


def _latency_order(payload: dict[str, Any]) -> list[str]:
    seen: list[str] = list(workloads.OPERATION_ORDER)
    for by_op in payload.get("samples", {}).values():
        for op in by_op:
            if op not in seen:
                seen.append(op)
    return seen


def render(payload: dict[str, Any]) -> str:
    table = report.summarize(payload.get("samples", {}), _latency_order(payload))
    payload["summary"] = table
    machine = payload.get("machine", {})
    lines = ["### Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    load = payload.get("load_average_1m", {})
    if load:
        lines.append("- load average (1 min) at start / end of the measured phases: "
                     f"{load.get('start', 0):.1f} / {load.get('end', 0):.1f}")
    if payload.get("command"):
        lines.append(f"- command: `{payload['command']}` ({payload.get('duration_s', '?')} s)")
    lines += ["", "### Latency (ms; ratio = crivm / containerd)", "",
              report.latency_markdown(table), "### Memory", "",
              report.memory_markdown(payload.get("memory", {}))]
    if payload.get("leaks"):
        lines += ["### Left behind (cleaned by force)", ""]
        lines += [f"- {leak}" for leak in payload["leaks"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    payload = run(args)
    payload["command"] = " ".join(["python3", "-m", "bench.cri_bench", *(argv or sys.argv[1:])])
    markdown = render(payload)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report.write_json(args.out / f"{stamp}.json", payload)
    (args.out / f"{stamp}.md").write_text(markdown)
    print(markdown)
    print(f"results: {args.out / stamp}.{{json,md}}")
    return 1 if payload["leaks"] else 0


if __name__ == "__main__":
    sys.exit(main())

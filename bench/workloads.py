"""The measured phases. Each drives every runtime with the same calls in the same order.

Runtimes take turns: iteration i runs them in one order, iteration i+1 in the other, so
neither always goes first after the other has warmed the page cache or left work behind.
Only one runtime is busy at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.cri_client import SLEEPER_COMMAND, TimedCri
from bench.memory import group_memory, process_memory, processes_mentioning

log = logging.getLogger(__name__)

SMALL_IMAGE = "docker.io/library/busybox:latest"
BIG_IMAGE = "docker.io/crivm-test/big:latest"
EXEC_COMMAND = ["echo", "bench"]
# Time for lazily started work (GC, log flushers) to settle before memory is read.
MEMORY_SETTLE_S = 3.0


@dataclass(frozen=True)
class Plan:
    iterations: int
    big_pull_iterations: int
    inner: int  # samples of each cheap, read-only call per iteration
    list_sizes: tuple[int, int]
    containers_per_pod: int
    memory_pods: int


def turns(clients: Mapping[str, TimedCri], iteration: int) -> Iterator[tuple[str, TimedCri]]:
    names = sorted(clients)
    if iteration % 2:
        names.reverse()
    for name in names:
        yield name, clients[name]


def image_phase(clients: Mapping[str, TimedCri], plan: Plan, small_label: str,
                big_label: str) -> None:
    """Cold pulls (the image removed first, which also drops its layers in both runtimes),
    then ImageStatus and ListImages while pause, busybox and the big image are stored."""
    pull_small = f"PullImage cold: {small_label}"
    pull_big = f"PullImage cold: {big_label}"
    for iteration in range(plan.iterations):
        for name, cri in turns(clients, iteration):
            # The big image contains the busybox layer; with both gone, neither pull is warm.
            cri.remove_image(SMALL_IMAGE)
            cri.remove_image(BIG_IMAGE)
            cri.pull(SMALL_IMAGE, pull_small)
            if iteration < plan.big_pull_iterations:
                cri.remove_image(SMALL_IMAGE)
                cri.pull(BIG_IMAGE, pull_big)
                cri.pull(SMALL_IMAGE)
            for _ in range(plan.inner):
                status = cri.image_status(SMALL_IMAGE, "ImageStatus")
                if not status.image.id:
                    raise AssertionError(f"{name}: ImageStatus found no {SMALL_IMAGE}")
                cri.list_images("ListImages")
        log.info("image phase: iteration %d/%d done", iteration + 1, plan.iterations)
    for cri in clients.values():
        cri.remove_image(BIG_IMAGE)
        cri.pull(SMALL_IMAGE)


def lifecycle_phase(clients: Mapping[str, TimedCri], plan: Plan) -> None:
    """One pod with one container, through every lifecycle call, N times per runtime."""
    for iteration in range(plan.iterations):
        for name, cri in turns(clients, iteration):
            config = cri.pod_config(f"life-{iteration}")
            pod_id = cri.run_pod(config, "RunPodSandbox")
            ctr = cri.create(pod_id, config, "sleeper", SMALL_IMAGE, SLEEPER_COMMAND,
                             "CreateContainer")
            cri.start(ctr, "StartContainer")
            for _ in range(plan.inner):
                cri.status(ctr, "ContainerStatus")
                # The cheapest call there is: what any RPC costs in transport alone.
                cri.version("Version (gRPC floor)")
            reply = cri.exec_sync(ctr, EXEC_COMMAND, "ExecSync")
            if reply.exit_code != 0 or reply.stdout != b"bench\n":
                raise AssertionError(f"{name}: ExecSync gave {reply.exit_code} {reply.stdout!r}"
                                     f" {reply.stderr!r}")
            cri.stop_container(ctr, "StopContainer")
            cri.remove_container(ctr, "RemoveContainer")
            cri.stop_pod(pod_id, "StopPodSandbox")
            cri.remove_pod(pod_id, "RemovePodSandbox")
        log.info("lifecycle phase: iteration %d/%d done", iteration + 1, plan.iterations)


def _fill_to(clients: Mapping[str, TimedCri], counts: dict[str, int], target: int,
             per_pod: int) -> None:
    """Adds pods of ``per_pod`` running sleepers, alternating runtimes, up to ``target``."""
    pod = 0
    while any(counts[name] < target for name in clients):
        for name, cri in turns(clients, pod):
            if counts[name] < target:
                size = min(per_pod, target - counts[name])
                cri.run_sleeper_pod(f"list-{counts[name]}", SMALL_IMAGE, size)
                counts[name] += size
        pod += 1


def list_phase(clients: Mapping[str, TimedCri], plan: Plan,
               snapshot: MemorySnapshot) -> None:
    """ListContainers (and ContainerStatus) with 10 and then 200 running containers."""
    counts = dict.fromkeys(clients, 0)
    for size in plan.list_sizes:
        _fill_to(clients, counts, size, plan.containers_per_pod)
        for name, cri in clients.items():
            listed = cri.list_containers()
            if listed != size:
                raise AssertionError(f"{name}: ListContainers gave {listed}, expected {size}")
        for iteration in range(plan.iterations):
            for _, cri in turns(clients, iteration):
                cri.list_containers(f"ListContainers ({size} containers)")
        log.info("list phase: %d containers done", size)
    snapshot.take(f"{plan.list_sizes[-1]} running containers")
    for cri in clients.values():
        cri.remove_all_pods()


def memory_phase(clients: Mapping[str, TimedCri], plan: Plan, snapshot: MemorySnapshot) -> None:
    """Daemon and helper memory with ``memory_pods`` pods of one running sleeper each."""
    for index in range(plan.memory_pods):
        for _, cri in turns(clients, index):
            cri.run_sleeper_pod(f"mem-{index}", SMALL_IMAGE)
    snapshot.take(f"{plan.memory_pods} pods (1 container each)")
    for cri in clients.values():
        cri.remove_all_pods()


@dataclass
class Watched:
    """What to read memory from for one runtime: the daemon pid and its helpers."""

    daemon_pid: int
    # helper name -> (marker in its command line, its comm name)
    helpers: Mapping[str, tuple[str, str]]


class MemorySnapshot:
    def __init__(self, watched: Mapping[str, Watched]) -> None:
        self.watched = watched
        self.states: dict[str, dict[str, dict[str, Any]]] = {}

    def take(self, state: str) -> None:
        time.sleep(MEMORY_SETTLE_S)
        entry: dict[str, dict[str, Any]] = {}
        for name, watched in self.watched.items():
            daemon = process_memory(watched.daemon_pid)
            if daemon is None:
                raise AssertionError(f"{name} daemon (pid {watched.daemon_pid}) is gone")
            helpers = {}
            for helper, (marker, comm) in watched.helpers.items():
                group = group_memory(processes_mentioning(marker, comm))
                helpers[helper] = {"count": group.count, "rss_kib": group.rss_kib,
                                   "pss_kib": group.pss_kib}
            entry[name] = {"daemon_rss_kib": daemon.rss_kib, "daemon_pss_kib": daemon.pss_kib,
                           "helpers": helpers}
        self.states[state] = entry
        log.info("memory (%s): %s", state,
                 {n: e["daemon_rss_kib"] // 1024 for n, e in entry.items()})


OPERATION_ORDER: Sequence[str] = (
    "RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
    "StopPodSandbox", "RemovePodSandbox", "ContainerStatus", "ExecSync", "Version (gRPC floor)",
)

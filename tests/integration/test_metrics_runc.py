"""The Prometheus /metrics endpoint and the CRI metrics calls, through a real crivm daemon.

The scrape is parsed here by a small reader of the text format written for the test, not
with crivm's own writer.
"""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.http import free_port
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]



def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(LABEL.findall(match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_endpoint(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    port = free_port()
    crivm_daemon.stop()
    config = crivm_daemon.config_path.read_text()
    crivm_daemon.config_path.write_text(f"metrics_port = {port}\n" + config)
    crivm_daemon.start()
    cri = crivm_daemon.cri

    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("metrics")
    pod_id = cri.run_pod(pod_config)
    running = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="runs"),
        image=api_pb2.ImageSpec(image=BUSYBOX), command=["sleep", "3600"],
    )
    done = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="done"),
        image=api_pb2.ImageSpec(image=BUSYBOX), command=["true"],
    )
    running_id = cri.create(pod_id, running, pod_config)
    done_id = cri.create(pod_id, done, pod_config)
    cri.start(running_id)
    cri.start(done_id)
    deadline = time.monotonic() + 20
    while True:
        # The container exits on its own; the scrape must notice without a status call.
        samples, types = scrape(port)
        if value(samples, "crivm_containers", state="exited", handler="runc") == 1:
            break
        assert time.monotonic() < deadline, "the exited container was never counted"
        time.sleep(0.3)
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            cri.status("0" * 64)
    # A failed call is counted just after its status went out: allow the scrape to race it.
    deadline = time.monotonic() + 5
    while True:
        samples, types = scrape(port)
        errors = value(samples, "crivm_grpc_request_errors_total",
                       method="ContainerStatus", code="NOT_FOUND")
        if errors == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert value(samples, "crivm_pods", state="ready", handler="runc") == 1
    assert value(samples, "crivm_containers", state="running", handler="runc") == 1
    assert types["crivm_grpc_request_duration_seconds"] == "histogram"
    assert value(samples, "crivm_grpc_requests_total", method="RunPodSandbox", code="OK") == 1
    assert value(samples, "crivm_grpc_requests_total", method="StartContainer", code="OK") == 2
    assert value(samples, "crivm_grpc_request_errors_total",
                 method="ContainerStatus", code="NOT_FOUND") == 2
    assert value(samples, "crivm_grpc_request_errors_total",
                 method="StartContainer", code="NOT_FOUND") == 0
    count = value(samples, "crivm_grpc_request_duration_seconds_count", method="CreateContainer")
    assert count == 2
    assert value(samples, "crivm_grpc_request_duration_seconds_bucket",
                 method="CreateContainer", le="+Inf") == 2
    assert value(samples, "crivm_grpc_request_duration_seconds_sum", method="CreateContainer") > 0
    # Buckets are cumulative.
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
        if name == "crivm_grpc_request_duration_seconds_bucket"
        and dict(labels)["method"] == "CreateContainer"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)

    # busybox from the explicit pull, pause from RunPodSandbox.
    assert value(samples, "crivm_image_pulls_total", outcome="success") == 2
    assert value(samples, "crivm_image_pull_duration_seconds_count", outcome="success") == 2
    assert types["crivm_image_pull_bytes_total"] == "counter"
    assert value(samples, "crivm_image_pull_bytes_total") >= busybox_image.size


def test_cri_metrics(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("crimetrics")
    pod_id = cri.run_pod(pod_config)
    ctr_id = cri.create(pod_id, api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="spin"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", "while :; do :; done"],
    ), pod_config)
    cri.start(ctr_id)
    time.sleep(2.5)

    descriptors = {d.name: list(d.label_keys) for d in cri.runtime.ListMetricDescriptors(
        api_pb2.ListMetricDescriptorsRequest(), timeout=30).descriptors}
    assert descriptors["container_cpu_usage_seconds_total"] == ["id", "name", "image", "cpu"]
    assert "container_memory_working_set_bytes" in descriptors
    assert descriptors["container_network_receive_bytes_total"][-1] == "interface"

    def cpu_ns() -> int:
        stats = cri.runtime.ContainerStats(
            api_pb2.ContainerStatsRequest(container_id=ctr_id), timeout=30).stats
        return int(stats.cpu.usage_core_nano_seconds.value)

    before = cpu_ns()
    reply = cri.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=30)
    after = cpu_ns()
    (pod,) = reply.pod_metrics
    assert pod.pod_sandbox_id == pod_id
    for metric in [*pod.metrics, *(m for c in pod.container_metrics for m in c.metrics)]:
        assert len(metric.label_values) == len(descriptors[metric.name]), metric
    names = {m.name for m in pod.metrics}
    assert {"container_cpu_usage_seconds_total", "container_processes",
            "container_network_receive_bytes_total"} <= names
    (ctr,) = pod.container_metrics
    assert ctr.container_id == ctr_id
    by_name = {m.name: m for m in ctr.metrics}
    cpu = by_name["container_cpu_usage_seconds_total"]
    assert cpu.metric_type == api_pb2.COUNTER
    assert list(cpu.label_values) == [ctr_id, "spin", BUSYBOX, "total"]
    # Whole seconds of the same counter ContainerStats reports, read between two of those.
    assert before // 10**9 <= cpu.value.value <= after // 10**9
    assert before > 0
    assert by_name["container_memory_working_set_bytes"].value.value > 0
    assert by_name["container_memory_working_set_bytes"].metric_type == api_pb2.GAUGE

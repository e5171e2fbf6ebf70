"""The daemon's "metrics" component: an opt-in Prometheus ``/metrics`` on 127.0.0.1.

Off unless ``metrics_port`` is set. Call latencies and outcomes arrive from the gRPC
call scope (``observe_call``), pull durations from the image service (``observe_pull``);
pod and container counts are taken from the store at each scrape, with container states
refreshed from their backends first, so a container that died unobserved counts as exited.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from typing import TYPE_CHECKING

from aiohttp import web

from crivm.errors import CrivmError, Unavailable
from crivm.runtime.backend import CONTAINER_EXITED, CONTAINER_UNKNOWN, POD_NOTREADY, POD_READY
from crivm.runtime.metrics.prometheus import CONTENT_TYPE, Counter, Gauge, Histogram, render
from crivm.runtime.records import backend_of, refresh_container
from crivm.storage.service import ImageService

if TYPE_CHECKING:
    from crivm.runtime.daemon import Daemon

log = logging.getLogger(__name__)

LISTEN_ADDRESS = "127.0.0.1"
PULL_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class MetricsEndpoint:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.requests = Counter(
            "crivm_grpc_requests_total", "CRI calls served, by method and gRPC status code.",
            ("method", "code"))
        self.errors = Counter(
            "crivm_grpc_request_errors_total",
            "CRI calls that failed, by method and gRPC status code.", ("method", "code"))
        self.latency = Histogram(
            "crivm_grpc_request_duration_seconds", "Time to serve a CRI call, by method.",
            ("method",))
        self.pods = Gauge(
            "crivm_pods", "Pod sandboxes by state and runtime handler.", ("state", "handler"))
        self.containers = Gauge(
            "crivm_containers", "Containers by state and runtime handler.", ("state", "handler"))
        self.pulls = Counter(
            "crivm_image_pulls_total", "Image pulls by outcome (success or failure).",
            ("outcome",))
        self.pull_duration = Histogram(
            "crivm_image_pull_duration_seconds", "Time an image pull took, by outcome.",
            ("outcome",), buckets=PULL_BUCKETS)
        self.pull_bytes = Counter(
            "crivm_image_pull_bytes_total", "Blob bytes downloaded from registries by pulls.")

    # -- observers ------------------------------------------------------------------------

    def observe_call(self, method: str, seconds: float, code: str) -> None:
        self.requests.inc(method, code)
        self.latency.observe(seconds, method)
        if code != "OK":
            self.errors.inc(method, code)

    def observe_pull(self, seconds: float, succeeded: bool) -> None:
        outcome = "success" if succeeded else "failure"
        self.pulls.inc(outcome)
        self.pull_duration.observe(seconds, outcome)

    # -- scraping -------------------------------------------------------------------------

    async def render(self) -> str:
        await self._count_objects()
        images = self._daemon.components.get("images")
        if isinstance(images, ImageService):
            self.pull_bytes.set_total(float(images.bytes_downloaded))
        return render([self.requests, self.errors, self.latency, self.pods, self.containers,
                       self.pulls, self.pull_duration, self.pull_bytes])

    async def _count_objects(self) -> None:
        daemon = self._daemon
        pods: Tally[tuple[str, str]] = Tally()
        containers: Tally[tuple[str, str]] = Tally()
        for pod in daemon.store.list_pods():
            state = pod.state
            if state == POD_READY:
                try:
                    alive = await backend_of(daemon, pod).sandbox_alive(pod)
                except CrivmError:
                    alive = False
                state = POD_READY if alive else POD_NOTREADY
            pods[(state, pod.handler)] += 1
            for ctr in daemon.store.list_containers(pod.id):
                try:
                    ctr = await refresh_container(daemon, pod, ctr)
                    ctr_state = ctr.state
                except CrivmError:
                    ctr_state = ctr.state if ctr.state == CONTAINER_EXITED else CONTAINER_UNKNOWN
                containers[(ctr_state, pod.handler)] += 1
        self.pods.replace(((key, float(n)) for key, n in pods.items()))
        self.containers.replace(((key, float(n)) for key, n in containers.items()))

    async def _serve(self, request: web.Request) -> web.Response:
        text = await self.render()
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LISTEN_ADDRESS, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(
                f"cannot serve metrics on {LISTEN_ADDRESS}:{port}: {exc.strerror}"
            ) from exc
        self._runner = runner
        self.port = port
        log.info("serving Prometheus metrics on http://%s:%d/metrics", LISTEN_ADDRESS, port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def open_component(daemon: Daemon) -> MetricsEndpoint | None:
    """The daemon's opener for the "metrics" component; None when ``metrics_port`` is 0."""
    port = daemon.config.metrics_port
    if port == 0:
        return None
    endpoint = MetricsEndpoint(daemon)
    images = daemon.components.get("images")
    if isinstance(images, ImageService):
        images.observe_pulls(endpoint.observe_pull)
    await endpoint.start(port)
    return endpoint

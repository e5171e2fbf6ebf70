"""One synchronous CRI client, used unchanged against both runtimes.

Every call goes through ``_call``, which times the RPC alone (request already built, reply
not yet inspected) with ``perf_counter`` and files the sample under the operation's name.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from crivm.proto import api_pb2, api_pb2_grpc

RPC_TIMEOUT_S = 180.0
# Ask for a graceful stop, as the kubelet does; the bench containers exit on SIGTERM.
STOP_TIMEOUT_S = 10

_Reply = TypeVar("_Reply")

# A container that exits promptly on SIGTERM: `wait` is interrupted by the trapped signal.
SLEEPER_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]


@dataclass
class TimedCri:
    """CRI stubs over one channel; samples[op] collects seconds per call when recording."""

    channel: grpc.Channel
    log_dir: str
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    runtime: api_pb2_grpc.RuntimeServiceStub = field(init=False)
    images: api_pb2_grpc.ImageServiceStub = field(init=False)
    _pods: int = 0

    def __post_init__(self) -> None:
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def _call(self, op: str | None, rpc: Callable[..., _Reply], request: object) -> _Reply:
        started = time.perf_counter()
        reply = rpc(request, timeout=RPC_TIMEOUT_S)
        if op is not None:
            self.samples[op].append(time.perf_counter() - started)
        return reply

    def version(self, op: str | None = None) -> str:
        reply = self._call(op, self.runtime.Version, api_pb2.VersionRequest())
        return str(reply.runtime_version)

    # -- images -----------------------------------------------------------------------

    def pull(self, image: str, op: str | None = None) -> str:
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image))
        return str(self._call(op, self.images.PullImage, request).image_ref)

    def remove_image(self, image: str) -> None:
        request = api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image))
        self._call(None, self.images.RemoveImage, request)

    def image_status(self, image: str, op: str | None = None) -> api_pb2.ImageStatusResponse:
        request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image))
        reply: api_pb2.ImageStatusResponse = self._call(op, self.images.ImageStatus, request)
        return reply

    def list_images(self, op: str | None = None) -> int:
        reply = self._call(op, self.images.ListImages, api_pb2.ListImagesRequest())
        return len(reply.images)

    # -- pods and containers ----------------------------------------------------------

    def pod_config(self, name: str) -> api_pb2.PodSandboxConfig:
        self._pods += 1
        uid = f"bench-{name}-{self._pods}-{time.monotonic_ns()}"
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="crivm-bench", uid=uid),
            hostname=name,
            log_directory=f"{self.log_dir}/{uid}",
        )

    def run_pod(self, config: api_pb2.PodSandboxConfig, op: str | None = None,
                handler: str = "") -> str:
        request = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return str(self._call(op, self.runtime.RunPodSandbox, request).pod_sandbox_id)

    def create(self, pod_id: str, pod_config: api_pb2.PodSandboxConfig, name: str,
               image: str, command: list[str], op: str | None = None) -> str:
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name),
            image=api_pb2.ImageSpec(image=image),
            command=command,
            log_path=f"{name}.log",
        )
        request = api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config
        )
        return str(self._call(op, self.runtime.CreateContainer, request).container_id)

    def start(self, container_id: str, op: str | None = None) -> None:
        request = api_pb2.StartContainerRequest(container_id=container_id)
        self._call(op, self.runtime.StartContainer, request)

    def status(self, container_id: str, op: str | None = None) -> api_pb2.ContainerStatus:
        request = api_pb2.ContainerStatusRequest(container_id=container_id)
        reply: api_pb2.ContainerStatusResponse = self._call(
            op, self.runtime.ContainerStatus, request
        )
        return reply.status

    def exec_sync(self, container_id: str, cmd: list[str],
                  op: str | None = None) -> api_pb2.ExecSyncResponse:
        request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=30)
        reply: api_pb2.ExecSyncResponse = self._call(op, self.runtime.ExecSync, request)
        return reply

    def stop_container(self, container_id: str, op: str | None = None) -> None:
        request = api_pb2.StopContainerRequest(container_id=container_id, timeout=STOP_TIMEOUT_S)
        self._call(op, self.runtime.StopContainer, request)

    def remove_container(self, container_id: str, op: str | None = None) -> None:
        request = api_pb2.RemoveContainerRequest(container_id=container_id)
        self._call(op, self.runtime.RemoveContainer, request)

    def list_containers(self, op: str | None = None) -> int:
        reply = self._call(op, self.runtime.ListContainers, api_pb2.ListContainersRequest())
        return len(reply.containers)

    def stop_pod(self, pod_id: str, op: str | None = None) -> None:
        request = api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id)
        self._call(op, self.runtime.StopPodSandbox, request)

    def remove_pod(self, pod_id: str, op: str | None = None) -> None:
        request = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        self._call(op, self.runtime.RemovePodSandbox, request)

    def pod_ids(self) -> list[str]:
        reply = self._call(None, self.runtime.ListPodSandbox, api_pb2.ListPodSandboxRequest())
        return [pod.id for pod in reply.items]

    def remove_all_pods(self) -> None:
        for pod_id in self.pod_ids():
            self.stop_pod(pod_id)
            self.remove_pod(pod_id)

    def run_sleeper_pod(self, name: str, image: str,
                        containers: int = 1) -> tuple[str, list[str]]:
        """A pod with ``containers`` running sleepers; nothing is timed."""
        config = self.pod_config(name)
        pod_id = self.run_pod(config)
        ids = []
        for index in range(containers):
            container_id = self.create(pod_id, config, f"c{index}", image, SLEEPER_COMMAND)
            self.start(container_id)
            ids.append(container_id)
        return pod_id, ids

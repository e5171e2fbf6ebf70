"""StreamPodSandboxes and StreamContainers answer what the List calls answer, in batches."""

from __future__ import annotations

import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"


def test_stream_lists_match_list_calls(crivm_daemon: CrivmDaemon,
                                       busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("streamlists", labels={"app": "streamlists"})
    pod_id = cri.run_pod(pod_config)
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="sleeper"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["sleep", "1000"],
        labels={"role": "sleeper"},
    )
    ctr_id = cri.create(pod_id, config, pod_config)

    pods = [
        p.id
        for reply in cri.runtime.StreamPodSandboxes(api_pb2.StreamPodSandboxesRequest(
            filter=api_pb2.PodSandboxFilter(label_selector={"app": "streamlists"})))
        for p in reply.pod_sandboxes
    ]
    assert pods == [pod_id]

    ctrs = [
        c.id
        for reply in cri.runtime.StreamContainers(api_pb2.StreamContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=pod_id[:12])))
        for c in reply.containers
    ]
    listed = cri.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=pod_id[:12])))
    assert ctrs == [c.id for c in listed.containers] == [ctr_id]

    none = list(cri.runtime.StreamContainers(api_pb2.StreamContainersRequest(
        filter=api_pb2.ContainerFilter(label_selector={"role": "absent"}))))
    assert sum(len(r.containers) for r in none) == 0

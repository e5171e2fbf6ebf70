"""GetContainerEvents through a real crivm daemon, over a whole runc pod lifecycle.

The stream is read on a thread into a queue; every wait has a deadline, and the stream is
cancelled at the end of the test.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from crivm.proto import api_pb2
from tests.fixtures.daemon import CrivmDaemon
from tests.fixtures.images import PushedImage

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

BUSYBOX = "docker.io/library/busybox:latest"
CREATED = api_pb2.CONTAINER_CREATED_EVENT
STARTED = api_pb2.CONTAINER_STARTED_EVENT
STOPPED = api_pb2.CONTAINER_STOPPED_EVENT
DELETED = api_pb2.CONTAINER_DELETED_EVENT


class EventReader:
    def __init__(self, stream: grpc.Future) -> None:  # type: ignore[type-arg]
        self.stream = stream
        self.events: queue.Queue[api_pb2.ContainerEventResponse | Exception] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:  # type: ignore[attr-defined]
                self.events.put(event)
        except grpc.RpcError as exc:
            self.events.put(exc)

    def next(self, timeout_s: float = 30.0) -> api_pb2.ContainerEventResponse:
        item = self.events.get(timeout=timeout_s)
        if isinstance(item, Exception):
            raise item
        return item

    def expect(self, subject: str, event_type: int) -> api_pb2.ContainerEventResponse:
        event = self.next()
        got = (event.container_id, api_pb2.ContainerEventType.Name(event.container_event_type))
        want = (subject, api_pb2.ContainerEventType.Name(event_type))
        assert got == want, event
        return event


@pytest.fixture
def events(crivm_daemon: CrivmDaemon) -> Iterator[EventReader]:
    stream = crivm_daemon.cri.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=300)
    reader = EventReader(stream)
    # The subscription exists once the server has the call; give it a moment.
    time.sleep(0.5)
    yield reader
    stream.cancel()
    reader.thread.join(10)


def test_pod_lifecycle_events(
    crivm_daemon: CrivmDaemon, busybox_image: PushedImage, events: EventReader
) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("events")
    pod_id = cri.run_pod(pod_config)
    event = events.expect(pod_id, CREATED)
    assert event.pod_sandbox_status.id == pod_id
    assert event.pod_sandbox_status.state == api_pb2.SANDBOX_READY
    assert event.created_at > 0
    events.expect(pod_id, STARTED)

    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="short"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["/bin/sh", "-c", "sleep 1; exit 4"],
    )
    ctr_id = cri.create(pod_id, config, pod_config)
    event = events.expect(ctr_id, CREATED)
    assert [(s.id, s.state) for s in event.containers_statuses] == [
        (ctr_id, api_pb2.CONTAINER_CREATED)
    ]
    cri.start(ctr_id)
    event = events.expect(ctr_id, STARTED)
    assert event.containers_statuses[0].state == api_pb2.CONTAINER_RUNNING

    # Nobody asks about the container: the exit must be noticed and reported anyway.
    event = events.expect(ctr_id, STOPPED)
    (status,) = event.containers_statuses
    assert (status.state, status.exit_code) == (api_pb2.CONTAINER_EXITED, 4)

    # A second container stopped by the CRI, then the pod torn down.
    sleeper = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="sleeper"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["sleep", "3600"],
    )
    sleeper_id = cri.create(pod_id, sleeper, pod_config)
    events.expect(sleeper_id, CREATED)
    cri.start(sleeper_id)
    events.expect(sleeper_id, STARTED)
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=sleeper_id, timeout=5))
    events.expect(sleeper_id, STOPPED)

    cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=ctr_id))
    event = events.expect(ctr_id, DELETED)
    assert [s.id for s in event.containers_statuses] == [sleeper_id]
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    event = events.expect(pod_id, STOPPED)
    assert event.pod_sandbox_status.state == api_pb2.SANDBOX_NOTREADY
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    events.expect(sleeper_id, DELETED)
    events.expect(pod_id, DELETED)
    with pytest.raises(queue.Empty):
        events.next(timeout_s=1.5)

"""PodNetworkService: a repeated detach does not run the CNI DEL chain again, until the pod
attaches anew. Fake plugins (from test_netbridge_cni_invoke) log each call; the netns
functions are replaced so that no root is needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from crivm.netbridge import component, netns
from crivm.netbridge.cni_result import CniPluginError
from crivm.netbridge.netns import NetNamespace
from crivm.proto import api_pb2
from crivm.runtime.config import Config
from tests.unit.test_netbridge_cni_invoke import calls, make_chain


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[
        component.PodNetworkService, Path, list[str]]:
    network, log = make_chain(tmp_path, [{"type": "bridge"}, {"type": "portmap"}])
    svc = component.PodNetworkService(Config(runroot=str(tmp_path / "run")))
    svc.cni = network
    unpinned: list[str] = []

    async def create_netns(name: str, netns_dir: str) -> NetNamespace:
        # Any nsfs file passes the netns checks; the fake plugins never enter it.
        return NetNamespace(name, "/proc/self/ns/net")

    async def remove_netns(path: str) -> None:
        unpinned.append(path)

    monkeypatch.setattr(netns, "create_netns", create_netns)
    monkeypatch.setattr(netns, "remove_netns", remove_netns)
    return svc, log, unpinned


def _pod_config() -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="p", namespace="d", uid="u"))


async def _attach(svc: component.PodNetworkService, pod_id: str) -> None:
    await svc.add(pod_id, _pod_config(), await svc.create_namespace(pod_id))


def _dels(log: Path) -> list[str]:
    return [c["type"] for c in calls(log) if c["cmd"] == "DEL"]


async def test_second_detach_skips_the_del_chain(
        service: tuple[component.PodNetworkService, Path, list[str]]) -> None:
    svc, log, unpinned = service
    await _attach(svc, "pod1")
    await svc.detach("pod1", _pod_config())
    await svc.detach("pod1", _pod_config())
    assert _dels(log) == ["portmap", "bridge"]
    assert len(unpinned) == 1


async def test_attaching_again_makes_detach_run_del_again(
        service: tuple[component.PodNetworkService, Path, list[str]]) -> None:
    svc, log, _ = service
    await _attach(svc, "pod1")
    await svc.detach("pod1", _pod_config())
    await _attach(svc, "pod1")
    await svc.detach("pod1", _pod_config())
    assert _dels(log) == ["portmap", "bridge", "portmap", "bridge"]


async def test_detach_of_a_pod_never_seen_runs_del(
        service: tuple[component.PodNetworkService, Path, list[str]]) -> None:
    # After a daemon restart nothing is remembered: DEL must still release what ADD made.
    svc, log, unpinned = service
    await svc.detach("pod2", _pod_config())
    assert _dels(log) == ["portmap", "bridge"]
    assert unpinned == [str(Path(svc.netns_dir) / "pod2")]


async def test_failed_del_is_not_remembered(
        service: tuple[component.PodNetworkService, Path, list[str]], tmp_path: Path) -> None:
    svc, _, _ = service
    (tmp_path / "failing").mkdir()
    network, log = make_chain(tmp_path / "failing",
                              [{"type": "bridge", "fail_on": "DEL"}])
    svc.cni = network
    with pytest.raises(CniPluginError, match="try later"):
        await svc.detach("pod3", _pod_config())
    with pytest.raises(CniPluginError, match="try later"):
        await svc.detach("pod3", _pod_config())
    assert _dels(log) == ["bridge", "bridge"]

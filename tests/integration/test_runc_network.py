"""Pod networking on the runc backend: nginx on its pod IP and a host port, host-network pods."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import grpc
import pytest

from crivm.netbridge.cni import CniNetwork, PodNetwork
from crivm.netbridge.netns import call_in_netns
from crivm.proto import api_pb2
from tests.fixtures.daemon import CriClient, CrivmDaemon
from tests.fixtures.http import free_port, http_get
from tests.fixtures.images import NGINX_INDEX_HTML, PushedImage
from tests.fixtures.netns import NetnsFactory

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.registry]

NGINX = "docker.io/library/nginx:latest"
BUSYBOX = "docker.io/library/busybox:latest"




def run_probe(cri: CriClient, pod_id: str, pod_config: api_pb2.PodSandboxConfig) -> str:
    """A busybox sleeper in the pod, to exec into."""
    ctr_id = cri.create(pod_id, api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="probe"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=["sleep", "600"],
    ), pod_config)
    cri.start(ctr_id)
    return ctr_id

async def test_nginx_on_pod_ip_and_host_port(
    crivm_daemon: CrivmDaemon,
    nginx_image: PushedImage,
    netns_factory: NetnsFactory,
    tmp_path: Path,
) -> None:
    cri = crivm_daemon.cri
    cri.pull(NGINX)
    host_port = free_port()
    pod_config = crivm_daemon.pod_config(
        "web",
        port_mappings=[api_pb2.PortMapping(container_port=80, host_port=host_port)],
    )
    pod_id = cri.run_pod(pod_config)
    ctr_id = cri.create(pod_id, api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="nginx"),
        image=api_pb2.ImageSpec(image=NGINX),
        log_path="nginx.log",
    ), pod_config)
    cri.start(ctr_id)
    pod_ip = cri.pod_status(pod_id).status.network.ip

    # From the host, through portmap's DNAT on 127.0.0.1.
    assert http_get(f"http://127.0.0.1:{host_port}/") == NGINX_INDEX_HTML

    # From a client namespace of the test's own, attached to the same CNI network.
    client_ns = await netns_factory.create("client")
    client_net = CniNetwork(
        str(crivm_daemon.cni_conf_dir), ["/usr/lib/cni"], str(tmp_path / "client-cni")
    )
    client = PodNetwork(pod_id="client-" + os.urandom(4).hex(), netns=client_ns.path)
    await client_net.add(client)
    try:
        body = await call_in_netns(client_ns.path, http_get, f"http://{pod_ip}:80/")
        assert body == NGINX_INDEX_HTML
    finally:
        await client_net.delete(client)


def test_host_network_pod(crivm_daemon: CrivmDaemon, busybox_image: PushedImage) -> None:
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    pod_config = crivm_daemon.pod_config("hostnet")
    pod_config.linux.security_context.namespace_options.network = api_pb2.NODE
    pod_id = cri.run_pod(pod_config)
    assert cri.pod_status(pod_id).status.network.ip == ""
    ctr_id = run_probe(cri, pod_id, pod_config)
    reply = cri.exec_sync(ctr_id, ["readlink", "/proc/self/ns/net"])
    assert reply.stdout.decode().strip() == os.readlink("/proc/self/ns/net")
    assert cri.exec_sync(ctr_id, ["hostname"]).stdout.decode().strip() == socket.gethostname()


def test_cni_add_failure_during_infra_create(crivm_daemon: CrivmDaemon,
                                             busybox_image: PushedImage) -> None:
    """CNI ADD runs while the infra container is created. When ADD fails (here the tuning
    plugin, last in the chain, after bridge and host-local did their part), the infra made
    meanwhile is undone with it; the fixture's leak check then finds no netns, veth, mount,
    conmon or row. A pod that succeeds has its address in /etc/hosts."""
    cri = crivm_daemon.cri
    cri.pull(BUSYBOX)
    conflist_path = next(crivm_daemon.cni_conf_dir.glob("*.conflist"))
    good = conflist_path.read_text()
    broken = json.loads(good)
    broken["plugins"].append({"type": "tuning",
                              "sysctl": {"net.ipv4.conf.eth0.no_such_setting": "1"}})
    conflist_path.write_text(json.dumps(broken))
    try:
        with pytest.raises(grpc.RpcError) as info:
            cri.run_pod(crivm_daemon.pod_config("cni-fails"))
        assert "tuning" in (info.value.details() or "")
        assert cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items == []
        assert not list((crivm_daemon.runroot / "netns").glob("*"))
    finally:
        conflist_path.write_text(good)

    pod_config = crivm_daemon.pod_config("hosts-check")
    pod_id = cri.run_pod(pod_config)
    ip = cri.pod_status(pod_id).status.network.ip
    assert ip
    ctr_id = run_probe(cri, pod_id, pod_config)
    hosts = cri.exec_sync(ctr_id, ["cat", "/etc/hosts"]).stdout.decode()
    assert f"{ip}\thosts-check" in hosts

"""The agent's resolv.conf write: whole file or nothing, mode 0644, no temporary left over."""

from __future__ import annotations

import stat
from pathlib import Path

from crivm.agent.network import GuestNetwork
from crivm.proto import agent_pb2


def test_resolv_conf_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "resolv.conf"
    target.write_text("nameserver 192.0.2.1\n")
    network = GuestNetwork(str(target))
    request = agent_pb2.SetDNSRequest(nameservers=["10.0.0.10", "10.0.0.11"],
                                      searches=["svc.cluster.local"], options=["ndots:5"])
    for _ in range(2):
        network._write_resolv_conf(request)
    assert target.read_text() == ("nameserver 10.0.0.10\nnameserver 10.0.0.11\n"
                                  "search svc.cluster.local\noptions ndots:5\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolv.conf"]

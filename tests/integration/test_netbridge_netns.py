"""Pinned network namespaces, for real (root)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from crivm.errors import AlreadyExists, InvalidArgument, NotFound
from crivm.netbridge import netns
from tests.fixtures.netns import NetnsFactory

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(60),
]


def links_and_state() -> list[tuple[str, bool]]:
    with IPRoute() as ipr:
        return [(link.get_attr("IFLA_IFNAME"), bool(link["flags"] & 1))
                for link in ipr.get_links()]


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == path for line in fh)


async def test_create_pins_a_fresh_netns_with_lo_up(tmp_path: Path) -> None:
    ns = await netns.create_netns("pod-a", str(tmp_path))
    try:
        assert ns.path == str(tmp_path / "pod-a")
        assert netns.is_netns(ns.path) and mounted(ns.path)
        assert os.stat(ns.path).st_ino != os.stat("/proc/self/ns/net").st_ino
        assert await netns.call_in_netns(ns.path, links_and_state) == [("lo", True)]
        assert netns.list_netns(str(tmp_path)) == ["pod-a"]
    finally:
        await netns.remove_netns(ns.path)
    assert not mounted(ns.path) and not os.path.exists(ns.path)
    assert netns.list_netns(str(tmp_path)) == []
    await netns.remove_netns(ns.path)  # again: nothing to do, no error


async def test_running_code_inside_does_not_move_the_caller(tmp_path: Path) -> None:
    ns = await netns.create_netns("pod-b", str(tmp_path))
    try:
        before = os.stat("/proc/thread-self/ns/net").st_ino
        inside = await netns.call_in_netns(
            ns.path, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        blocking = netns.run_in_netns(
            ns.path, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inside == blocking == os.stat(ns.path).st_ino != before
        assert os.stat("/proc/thread-self/ns/net").st_ino == before
    finally:
        await netns.remove_netns(ns.path)


async def test_create_twice_and_bad_names_fail_cleanly(tmp_path: Path) -> None:
    ns = await netns.create_netns("dup", str(tmp_path))
    try:
        with pytest.raises(AlreadyExists):
            await netns.create_netns("dup", str(tmp_path))
        assert netns.is_netns(ns.path)  # the failed create did not touch the existing one
        with pytest.raises(InvalidArgument):
            await netns.create_netns("../escape", str(tmp_path))
    finally:
        await netns.remove_netns(ns.path)


async def test_entering_a_missing_netns_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await netns.call_in_netns(str(tmp_path / "gone"), lambda: None)
    assert not netns.is_netns(str(tmp_path))


async def test_remove_cleans_a_half_made_pin(tmp_path: Path) -> None:
    pin = tmp_path / "half"
    pin.touch()  # a crash between creating the pin file and mounting onto it
    assert not netns.is_netns(str(pin))
    await netns.remove_netns(str(pin))
    assert not pin.exists()


async def test_argv_prefix_runs_a_program_inside(netns_factory: NetnsFactory) -> None:
    ns = await netns_factory.create()
    proc = await asyncio.create_subprocess_exec(
        *netns.netns_argv_prefix(ns.path), sys.executable, "-c",
        "import socket; print([name for _, name in socket.if_nameindex()])",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert out.decode().strip() == "['lo']"


async def test_netns_factory_removes_what_it_made(tmp_path: Path) -> None:
    factory = NetnsFactory(tmp_path / "f")
    made = [await factory.create(), await factory.create("named")]
    assert all(netns.is_netns(ns.path) for ns in made)
    await factory.cleanup()
    assert not any(os.path.exists(ns.path) or mounted(ns.path) for ns in made)

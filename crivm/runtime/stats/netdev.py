"""Per-interface network counters of a pod, read inside its network namespace.

``/proc/thread-self/net/dev`` describes the netns of the reading *thread*; ``/proc/self/net``
would describe the main thread's, and ``/sys/class/net`` the netns that mounted sysfs. So the
file is read on a thread that has entered the pod's netns (``call_in_netns``).
"""

from __future__ import annotations

from crivm.netbridge.netns import call_in_netns
from crivm.runtime.stats.sample import InterfaceSample

THREAD_NET_DEV = "/proc/thread-self/net/dev"


def parse_net_dev(text: str) -> tuple[InterfaceSample, ...]:
    """Interfaces of a /proc/net/dev table, loopback left out (it is not pod traffic)."""
    interfaces = []
    for line in text.splitlines()[2:]:
        name, sep, counters = line.partition(":")
        name = name.strip()
        if not sep or name == "lo":
            continue
        # Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        values = [int(v) for v in counters.split()]
        if len(values) < 16:
            continue
        interfaces.append(InterfaceSample(
            name=name, rx_bytes=values[0], rx_errors=values[2],
            tx_bytes=values[8], tx_errors=values[10],
        ))
    return tuple(interfaces)


def _read_thread_net_dev() -> str:
    with open(THREAD_NET_DEV) as f:
        return f.read()


async def netns_interfaces(netns_path: str) -> tuple[InterfaceSample, ...]:
    """The interfaces of the netns pinned at ``netns_path``."""
    return parse_net_dev(await call_in_netns(netns_path, _read_thread_net_dev))

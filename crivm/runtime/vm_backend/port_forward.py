"""Port-forward to a VM pod: a TCP connection to the guest's address.

The guest owns the pod's ports. Inside the pod netns nothing listens (the tap's redirects take
every frame past the netns's own IP stack), so the connection goes to the pod IP from the
daemon's side of the CNI network, which routes to it as to any pod.
"""

from __future__ import annotations

import asyncio
import socket

from crivm.errors import FailedPrecondition, Unavailable
from crivm.runtime.store import PodRecord

CONNECT_TIMEOUT_S = 10.0
# A service in a VM comes up seconds after its container "started" (much later than in a runc
# container, and more so under TCG), and clients such as crictl give up on the first refused
# stream. So a refused connection is retried for this long before it counts.
REFUSED_RETRY_S = 15.0
REFUSED_BACKOFF_S = 0.25


async def _connect_once(address: tuple[str, int], family: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(pod: PodRecord, port: int) -> socket.socket:
    ips = [str(ip) for ip in pod.extra.get("ips", ())]
    if not ips:
        raise FailedPrecondition(f"VM pod {pod.id} has no pod IP to forward port {port} to")
    family = socket.AF_INET6 if ":" in ips[0] else socket.AF_INET
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REFUSED_RETRY_S
    while True:
        try:
            return await _connect_once((ips[0], port), family)
        except ConnectionRefusedError as exc:
            if loop.time() >= deadline:
                raise Unavailable(f"port {port} of VM pod {pod.id} at {ips[0]} refuses "
                                  "connections") from exc
            await asyncio.sleep(REFUSED_BACKOFF_S)
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to port {port} of VM pod {pod.id} at {ips[0]}: "
                              f"{exc}") from exc

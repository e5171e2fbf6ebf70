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


async def connect(pod: PodRecord, port: int) -> socket.socket:
    ips = [str(ip) for ip in pod.extra.get("ips", ())]
    if not ips:
        raise FailedPrecondition(f"VM pod {pod.id} has no pod IP to forward port {port} to")
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in ips[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ips[0], port)), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise Unavailable(f"cannot connect to port {port} of VM pod {pod.id} at {ips[0]}: "
                          f"{exc}") from exc
    return sock

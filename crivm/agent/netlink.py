"""A small rtnetlink client over the stdlib socket module, for the guest.

The guest has no pyroute2 and should not depend on an `ip` binary's output format, so the agent
speaks rtnetlink itself. Message layouts are declared once as structs and attribute numbers;
the socket code only moves bytes. The calls are synchronous (the kernel answers at once); the
agent runs them in a worker thread.

Layouts (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/neighbour.h)::

    nlmsghdr   len u32, type u16, flags u16, seq u32, pid u32
    ifinfomsg  family u8, pad u8, type u16, index i32, flags u32, change u32
    ifaddrmsg  family u8, prefixlen u8, flags u8, scope u8, index u32
    rtmsg      family u8, dst_len u8, src_len u8, tos u8, table u8, protocol u8, scope u8,
               type u8, flags u32
    ndmsg      family u8, pad u8, pad u16, ifindex i32, state u16, flags u8, type u8
    rtattr     len u16, type u16, value, padded to 4 bytes
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")
RTATTR = struct.Struct("=HH")
NLMSGERR = struct.Struct("=i")

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_NEWNEIGH = 28

NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7
NDA_DST, NDA_LLADDR = 1, 2

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
NUD_PERMANENT = 0x80


class NetlinkError(OSError):
    """The kernel refused a request; errno is the kernel's."""


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    mac: str
    mtu: int
    up: bool


def attr(kind: int, value: bytes) -> bytes:
    length = RTATTR.size + len(value)
    return RTATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            break
        attrs[kind & 0x3FFF] = data[offset + RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return attrs


def mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes(int(part, 16) for part in mac.split(":"))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Netlink:
    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def links(self) -> list[Link]:
        links = []
        request = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        for body in self._dump(RTM_GETLINK, request):
            _, _, index, flags, _ = IFINFOMSG.unpack_from(body)
            attrs = parse_attrs(body[IFINFOMSG.size :])
            links.append(
                Link(
                    index=index,
                    name=attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                    mac=mac_text(attrs.get(IFLA_ADDRESS, b"")),
                    mtu=struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
                    up=bool(flags & IFF_UP),
                )
            )
        return links

    def set_link(self, index: int, *, up: bool | None = None, name: str = "", mtu: int = 0,
                 mac: str = "") -> None:
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        attrs = b""
        if name:
            attrs += attr(IFLA_IFNAME, name.encode() + b"\0")
        if mac:
            attrs += attr(IFLA_ADDRESS, mac_bytes(mac))
        if mtu:
            attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs
        self._request(RTM_NEWLINK, 0, body)

    def add_address(self, index: int, address: str, prefix_len: int) -> None:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        body = IFADDRMSG.pack(family, prefix_len, 0, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, ip.packed) + attr(IFA_ADDRESS, ip.packed)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)

    def add_route(self, destination: str, gateway: str, index: int, source: str = "") -> None:
        """destination is a CIDR, or "" for the default route."""
        gw = ipaddress.ip_address(gateway) if gateway else None
        if destination:
            net = ipaddress.ip_network(destination, strict=False)
        else:
            net = ipaddress.ip_network("::/0" if gw and gw.version == 6 else "0.0.0.0/0")
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        scope = RT_SCOPE_UNIVERSE if gw else RT_SCOPE_LINK
        body = RTMSG.pack(
            family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0
        )
        if net.prefixlen:
            body += attr(RTA_DST, net.network_address.packed)
        if gw is not None:
            body += attr(RTA_GATEWAY, gw.packed)
        if index:
            body += attr(RTA_OIF, struct.pack("=i", index))
        if source:
            body += attr(RTA_PREFSRC, ipaddress.ip_address(source).packed)
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)

    def add_neighbor(self, index: int, address: str, mac: str) -> None:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        body = NDMSG.pack(family, index, NUD_PERMANENT, 0, 0)
        body += attr(NDA_DST, ip.packed) + attr(NDA_LLADDR, mac_bytes(mac))
        self._request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)

    def _send(self, msg_type: int, flags: int, body: bytes) -> int:
        self._seq += 1
        header = NLMSGHDR.pack(
            NLMSGHDR.size + len(body), msg_type, flags | NLM_F_REQUEST, self._seq, 0
        )
        self._sock.sendto(header + body, (0, 0))
        return self._seq

    def _request(self, msg_type: int, flags: int, body: bytes) -> None:
        seq = self._send(msg_type, flags | NLM_F_ACK, body)
        for _ in self._replies(seq):
            pass

    def _dump(self, msg_type: int, body: bytes) -> Iterator[bytes]:
        seq = self._send(msg_type, NLM_F_DUMP, body)
        yield from self._replies(seq)

    def _replies(self, seq: int) -> Iterator[bytes]:
        """Message bodies answering `seq`, until the ack, the end of a dump, or an error."""
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, msg_type, flags, msg_seq, _ = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, "netlink: truncated message")
                body = data[offset + NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    (code,) = NLMSGERR.unpack_from(body)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return
                if msg_type == NLMSG_DONE:
                    return
                yield body
                if not flags & NLM_F_MULTI:
                    return

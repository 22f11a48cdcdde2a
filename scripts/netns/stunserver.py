"""Minimal STUN server with CHANGE-REQUEST (RFC 5389 binding + RFC 5780 behaviour tests).

Why: miniupnpd refuses to forward ports when its WAN address is in a
reserved range (all our documentation ranges are), unless a STUN check
shows it sits behind an unrestricted 1:1 NAT. Running this on two public
addresses of the netns "internet" lets miniupnpd's own check pass honestly:
the UPnP router's WAN address *is* the address the internet sees.

    stunserver.py IP1 IP2 [PORT1 PORT2]     answers on all four (ip, port) pairs
"""

from __future__ import annotations

import select
import socket
import struct
import sys

MAGIC = 0x2112A442
BINDING_REQUEST, BINDING_RESPONSE = 0x0001, 0x0101
MAPPED, XOR_MAPPED, CHANGE_REQUEST, OTHER_ADDRESS = 0x0001, 0x0020, 0x0003, 0x802C


def _addr_attr(kind: int, ip: str, port: int, xor: bool) -> bytes:
    raw_ip = socket.inet_aton(ip)
    if xor:
        port ^= MAGIC >> 16
        raw_ip = struct.pack("!I", struct.unpack("!I", raw_ip)[0] ^ MAGIC)
    value = struct.pack("!BBH", 0, 1, port) + raw_ip
    return struct.pack("!HH", kind, len(value)) + value


def answer(data: bytes, peer: tuple[str, int], other: tuple[str, int]) -> tuple[bytes, int] | None:
    """Return (response, change flags) for a binding request, else None."""
    if len(data) < 20 or len(data) > 1024:
        return None
    mtype, length, cookie = struct.unpack("!HHI", data[:8])
    if mtype != BINDING_REQUEST or 20 + length > len(data):
        return None
    tid = data[8:20]
    flags = 0
    pos = 20
    while pos + 4 <= 20 + length:
        atype, alen = struct.unpack("!HH", data[pos : pos + 4])
        if atype == CHANGE_REQUEST and alen == 4:
            flags = struct.unpack("!I", data[pos + 4 : pos + 8])[0]
        pos += 4 + alen + (-alen % 4)
    attrs = _addr_attr(MAPPED, peer[0], peer[1], False)
    if cookie == MAGIC:
        attrs += _addr_attr(XOR_MAPPED, peer[0], peer[1], True)
    attrs += _addr_attr(OTHER_ADDRESS, other[0], other[1], False)
    return struct.pack("!HHI", BINDING_RESPONSE, len(attrs), cookie) + tid + attrs, flags


def serve(ip1: str, ip2: str, p1: int = 3478, p2: int = 3479) -> None:
    socks: dict[tuple[str, int], socket.socket] = {}
    for ip in (ip1, ip2):
        for port in (p1, p2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, port))
            socks[(ip, port)] = s
    by_fd = {s.fileno(): (addr, s) for addr, s in socks.items()}
    while True:
        ready, _, _ = select.select(list(by_fd), [], [])
        for fd in ready:
            (ip, port), s = by_fd[fd]
            data, peer = s.recvfrom(2048)
            other = (ip2 if ip == ip1 else ip1, p2 if port == p1 else p1)
            res = answer(data, peer, other)
            if res is None:
                continue
            resp, flags = res
            out_ip = (ip2 if ip == ip1 else ip1) if flags & 0x4 else ip
            out_port = (p2 if port == p1 else p1) if flags & 0x2 else port
            socks[(out_ip, out_port)].sendto(resp, peer)


if __name__ == "__main__":
    a = sys.argv[1:]
    serve(a[0], a[1], *(int(x) for x in a[2:4]))

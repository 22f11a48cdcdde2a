"""Small helpers to classify py-libp2p connections and streams."""

from __future__ import annotations

import ipaddress
from typing import Any

import multiaddr
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID


def is_circuit_addr(addr: multiaddr.Multiaddr) -> bool:
    return any(p.name == "p2p-circuit" for p in addr.protocols())


def is_relayed(conn: INetConn) -> bool:
    """True for connections carried over a circuit relay."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any(is_circuit_addr(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def conns_to(host: IHost, peer: ID) -> list[INetConn]:
    conns: Any = host.get_network().connections.get(peer, [])
    if not isinstance(conns, list):
        conns = [conns]
    return [c for c in conns if not getattr(c, "is_closed", False)]


def direct_conn(host: IHost, peer: ID) -> INetConn | None:
    for c in conns_to(host, peer):
        if not is_relayed(c):
            return c
    return None


def relayed_conn(host: IHost, peer: ID) -> INetConn | None:
    for c in conns_to(host, peer):
        if is_relayed(c):
            return c
    return None


def conn_of_stream(host: IHost, stream: INetStream) -> INetConn | None:
    muxed = stream.muxed_conn
    for c in conns_to(host, muxed.peer_id):
        if getattr(c, "muxed_conn", None) is muxed:
            return c
    return None


def tcp_endpoint(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    """(ip, port) of a /ip4|ip6/.../tcp/... address, else None."""
    names = [p.name for p in addr.protocols()]
    if "tcp" not in names or "p2p-circuit" in names:
        return None
    for fam in ("ip4", "ip6"):
        if fam in names:
            return addr.value_for_protocol(fam), int(addr.value_for_protocol("tcp"))
    return None


def is_public_ip(ip: str) -> bool:
    """Globally routable, or in the documentation ranges our netns "internet" uses.

    Test topologies play the internet with 192.0.2.0/24, 198.51.100.0/24 and
    203.0.113.0/24, so those count as public here; loopback, link-local,
    RFC 1918, CGNAT (100.64.0.0/10) and unspecified addresses do not.
    """
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if a.version == 4 and any(a in ipaddress.ip_network(n) for n in _DOC_NETS):
        return True
    return a.is_global


_DOC_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")

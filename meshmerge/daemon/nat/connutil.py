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


def public_addrs(host: IHost, limit: int) -> list[multiaddr.Multiaddr]:
    """Our publicly dialable TCP candidates: public listen addresses, observed
    addresses, and each observed IP with our listen port (NATs that keep the
    source port map the listen port to itself)."""
    listen_ports = sorted({ep[1] for a in host.get_transport_addrs() if (ep := tcp_endpoint(a)) is not None})
    candidates: list[tuple[str, int]] = []
    for a in host.get_transport_addrs():
        ep = tcp_endpoint(a)
        if ep is not None and is_public_ip(ep[0]):
            candidates.append(ep)
    manager = getattr(host, "_observed_addr_manager", None)
    observed: list[multiaddr.Multiaddr] = []
    if manager is not None:
        try:
            observed = list(manager.addrs(min_observers=1))
        except Exception:
            observed = []
    for a in observed:
        ep = tcp_endpoint(a)
        if ep is None or not is_public_ip(ep[0]):
            continue
        candidates.extend((ep[0], p) for p in listen_ports)
        candidates.append(ep)
    out: list[multiaddr.Multiaddr] = []
    seen: set[tuple[str, int]] = set()
    for ip, port in candidates:
        if (ip, port) in seen:
            continue
        seen.add((ip, port))
        fam = "ip6" if ":" in ip else "ip4"
        out.append(multiaddr.Multiaddr(f"/{fam}/{ip}/tcp/{port}"))
    return out[:limit]


_DOC_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")

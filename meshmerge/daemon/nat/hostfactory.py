"""Small libp2p hosts for the NAT services (AutoNAT dial-back) and the NAT tests.

Why: the NAT code and its tests need real hosts with two properties stock
``new_host`` does not give by default: Noise only (no plaintext/secio
fallback) and outbound TCP dials that leave from the *listen* port
(SO_REUSEPORT), as go-libp2p does. The latter makes the addresses other
peers observe equal to our listen port's NAT mapping, which AutoNAT,
identify and TCP hole punching depend on.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost, IRawConnection
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP

from meshmerge.daemon.transport import PipelinedMultiselectClient, upgrader

_PORT_BUSY = {errno.EADDRINUSE, errno.EADDRNOTAVAIL}


class ReusePortTCP(TCP):
    """TCP transport whose dials bind the listen address when one is set.

    Falls back to an ephemeral source port only when the 4-tuple is taken
    (a second connection to the same remote endpoint), never on a refused or
    timed-out dial, so failures are not paid twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.source: tuple[str, int] | None = None

    async def dial(self, maddr: multiaddr.Multiaddr) -> IRawConnection:
        names = {p.name for p in maddr.protocols()}
        if self.source is None or "ip4" not in names:
            return await super().dial(maddr)
        try:
            return await self.dial_with_source(maddr, self.source)
        except OpenConnectionError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in _PORT_BUSY:
                return await super().dial(maddr)
            raise


def key_pair(seed: bytes | None = None) -> KeyPair:
    """Ed25519 identity; deterministic from a 32-byte seed when given."""
    return create_new_key_pair(seed)


def make_host(kp: KeyPair | None = None, **kwargs: Any) -> IHost:
    """A host on the daemon's wire stack (our Noise and yamux) with a listen-port-reusing TCP transport.

    AutoNAT dial-backs leave from such hosts, so they speak exactly what the
    daemon's own host speaks.
    """
    kp = kp or key_pair()
    host = new_host(key_pair=kp, transports=[ReusePortTCP()], **kwargs)
    network = host.get_network()
    network.upgrader = upgrader(kp, kwargs.get("negotiate_timeout", 5))  # type: ignore[attr-defined]
    host.multiselect_client = PipelinedMultiselectClient()  # type: ignore[attr-defined]
    return host


def tcp_transport(host: IHost) -> ReusePortTCP | None:
    for t in host.get_network().transport_manager.get_transports():  # type: ignore[attr-defined]
        if isinstance(t, ReusePortTCP):
            return t
    return None


@asynccontextmanager
async def running_host(
    listen: Sequence[str], kp: KeyPair | None = None, **kwargs: Any
) -> AsyncIterator[IHost]:
    """Run a host listening on ``listen`` and bind its dials to the first IPv4 TCP listen address."""
    addrs = [multiaddr.Multiaddr(a) for a in listen]
    host = make_host(kp, listen_addrs=addrs, **kwargs)
    async with host.run(addrs):
        transport = tcp_transport(host)
        if transport is not None:
            for a in host.get_addrs():
                if {p.name for p in a.protocols()} >= {"ip4", "tcp"}:
                    transport.source = (a.value_for_protocol("ip4"), int(a.value_for_protocol("tcp")))
                    break
        yield host

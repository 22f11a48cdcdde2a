"""Dial a peer at whatever it advertises, relay circuit addresses included.

Why: our swarm (like stock py-libp2p's) skips ``/p2p-circuit`` addresses, so a
peer behind NAT whose advertised addresses are a private listen address plus
``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`` cannot be dialed from what
the DHT or identify returned. ``connect`` tries the direct addresses first and
the circuits after a short head start (at once when no direct address is
public), like go-libp2p's relay address ranking: for each circuit address it
connects to the relay named inside it and opens the relayed connection there.
The first connection to come up wins and the other attempts are cancelled.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from .connutil import conns_to, is_circuit_addr, is_public_ip, tcp_endpoint
from .relay import RelayClient, RelayError

log = logging.getLogger(__name__)


class CircuitDialError(Exception):
    """No address of the peer, direct or relayed, led to a connection; the message lists why."""


@dataclasses.dataclass(frozen=True)
class CircuitDialConfig:
    """relay_delay_s: head start of direct dials over relayed ones when a direct address is public.
    timeout_s: deadline of the whole attempt.
    max_circuits: circuit addresses tried per attempt (one per relay).
    """

    relay_delay_s: float = 0.5
    timeout_s: float = 15.0
    max_circuits: int = 4

    def validate(self) -> None:
        if not 0 <= self.relay_delay_s <= 10:
            raise ValueError("CircuitDialConfig.relay_delay_s must be in [0, 10] seconds")
        if not 0 < self.timeout_s <= 120:
            raise ValueError("CircuitDialConfig.timeout_s must be in (0, 120] seconds")
        if not 1 <= self.max_circuits <= 16:
            raise ValueError("CircuitDialConfig.max_circuits must be in [1, 16]")


def split_circuit(addr: multiaddr.Multiaddr) -> tuple[ID, multiaddr.Multiaddr | None] | None:
    """(relay id, relay transport address or None) of ``…/p2p/<relay>/p2p-circuit[/p2p/<peer>]``."""
    text = str(addr)
    head, sep, _ = text.partition("/p2p-circuit")
    if not sep or "/p2p/" not in head:
        return None
    transport, _, relay = head.rpartition("/p2p/")
    try:
        relay_id = ID.from_base58(relay)
        return relay_id, (multiaddr.Multiaddr(transport) if transport else None)
    except Exception:
        return None


async def connect(
    host: IHost, relays: RelayClient, info: PeerInfo, config: CircuitDialConfig | None = None
) -> INetConn:
    """Connect to ``info.peer_id`` over a direct or a relayed connection. Raises CircuitDialError."""
    config = config or CircuitDialConfig()
    config.validate()
    peer = info.peer_id
    live = conns_to(host, peer)
    if live:
        return live[0]
    direct = [a for a in info.addrs if not is_circuit_addr(a)]
    relay_addrs: dict[ID, list[multiaddr.Multiaddr]] = {}
    for a in info.addrs:
        parsed = split_circuit(a) if is_circuit_addr(a) else None
        if parsed is None or parsed[0] == peer:
            continue
        known = relay_addrs.setdefault(parsed[0], [])
        if parsed[1] is not None and parsed[1] not in known:
            known.append(parsed[1])
    circuits = list(relay_addrs.items())[: config.max_circuits]
    if not direct and not circuits:
        raise CircuitDialError(f"{peer}: no usable address among {len(info.addrs)}")
    public = any((ep := tcp_endpoint(a)) is not None and is_public_ip(ep[0]) for a in direct)
    delay = config.relay_delay_s if public else 0.0
    won: list[INetConn] = []
    errors: list[str] = []

    async def via_direct(cancel: trio.CancelScope) -> None:
        try:
            host.get_peerstore().add_addrs(peer, direct, 600)
            await host.connect(PeerInfo(peer, direct))
        except Exception as exc:
            errors.append(f"direct: {exc!r}")
            return
        live = conns_to(host, peer)
        if live:
            won.append(live[0])
            cancel.cancel()

    async def via_relay(relay: ID, addrs: list[multiaddr.Multiaddr], cancel: trio.CancelScope) -> None:
        await trio.sleep(delay)
        try:
            if not conns_to(host, relay):
                if not addrs:
                    raise RelayError(f"relay {relay} not connected and its address is unknown")
                await host.connect(PeerInfo(relay, addrs))
            conn = await relays.dial(peer, relay)
        except Exception as exc:
            errors.append(f"via {relay}: {exc!r}")
            return
        won.append(conn)
        cancel.cancel()

    with trio.move_on_after(config.timeout_s) as deadline:
        async with trio.open_nursery() as nursery:
            if direct:
                nursery.start_soon(via_direct, nursery.cancel_scope)
            for relay, addrs in circuits:
                nursery.start_soon(via_relay, relay, addrs, nursery.cancel_scope)
    if won:
        return won[0]
    if deadline.cancelled_caught:
        errors.append(f"deadline of {config.timeout_s} s")
    raise CircuitDialError(f"{peer}: no connection ({'; '.join(errors)})")


def circuit_addrs(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    return [a for a in addrs if is_circuit_addr(a)]

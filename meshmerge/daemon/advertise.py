"""Advertised addresses (listen/observed plus relay circuits) and dialing circuit addresses.

Why a subclass: py-libp2p 0.8.1's ``BasicHost.get_addrs`` makes every address
end in ``/p2p/<self>`` by cutting at the *first* ``/p2p/`` component, so a
circuit address ``/ip4/…/tcp/…/p2p/<relay>/p2p-circuit`` comes out as
``/ip4/…/tcp/…/p2p/<self>`` — the relay is lost and the address points at the
relay's socket with our id (tests/daemon/test_advertise.py shows it). Its
``addrs_factory`` hook runs before that step, so it cannot add circuit
addresses either. ``AdvertisingHost`` keeps the stock behaviour for ordinary
addresses and appends the addresses of registered providers intact.

Everything that publishes our addresses reads ``get_addrs()``: identify (and
identify push), the signed peer record (re-issued by py-libp2p whenever the
address set differs from the cached one) and our DHT's provider records and
FIND_NODE answers; so a provider's addresses appear everywhere at once. When a
provider's answer changes (a reservation is granted or ends), its owner calls
``addrs_changed()`` so connected peers learn it by identify push.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr.protocols import P_P2P

log = logging.getLogger("meshmerge.advertise")

AddrProvider = Callable[[], Iterable[multiaddr.Multiaddr]]
"""Returns addresses to advertise right now (with or without the trailing /p2p/<self>)."""

MAX_PROVIDED_ADDRS = 32
"""Cap on addresses taken from providers, so a misbehaving provider cannot bloat identify."""

PUSH_TIMEOUT_S = 10.0


CircuitDialer = Callable[[PeerInfo], Awaitable[object]]
"""Connects to a peer given addresses that include relay circuits (nat.circuit.connect)."""


class AdvertisingHost(BasicHost):
    """``BasicHost`` whose advertised addresses include those of registered providers, and
    which can reach peers known only by circuit addresses once a circuit dialer is set.

    Our swarm (like stock py-libp2p's) skips ``/p2p-circuit`` addresses. With
    ``set_circuit_dialer``, ``connect`` and ``new_stream`` to a peer we are not
    connected to go through that dialer whenever the peer's known addresses
    include a circuit, so sync, gossip and the DHT reach NATed peers found in
    the DHT without knowing about relays.
    """

    _addr_providers: list[AddrProvider]
    _circuit_dialer: CircuitDialer | None = None

    def add_addr_provider(self, provider: AddrProvider) -> None:
        if not hasattr(self, "_addr_providers"):
            self._addr_providers = []
        self._addr_providers.append(provider)

    def remove_addr_provider(self, provider: AddrProvider) -> None:
        providers = getattr(self, "_addr_providers", [])
        if provider in providers:
            providers.remove(provider)

    def provided_addrs(self) -> list[multiaddr.Multiaddr]:
        """Providers' addresses, each ending in ``/p2p/<self>``, deduplicated and capped."""
        me = multiaddr.Multiaddr(f"/p2p/{self.get_id()}")
        out: list[multiaddr.Multiaddr] = []
        seen: set[str] = set()
        for provider in list(getattr(self, "_addr_providers", [])):
            try:
                addrs = list(provider())
            except Exception as exc:  # a broken provider must not break identify
                log.warning("address provider %r failed: %r", provider, exc)
                continue
            for addr in addrs:
                full = with_peer_suffix(addr, me)
                if str(full) not in seen:
                    seen.add(str(full))
                    out.append(full)
        return out[:MAX_PROVIDED_ADDRS]

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        base = super().get_addrs()
        seen = {str(a) for a in base}
        return base + [a for a in self.provided_addrs() if str(a) not in seen]

    def set_circuit_dialer(self, dialer: CircuitDialer | None) -> None:
        self._circuit_dialer = dialer

    def _connected(self, peer: ID) -> bool:
        return any(not getattr(c, "is_closed", False) for c in self.get_network().get_connections(peer))

    async def _via_circuit(self, info: PeerInfo) -> None:
        """Let the circuit dialer connect when ``info`` names a circuit and we are not connected."""
        dialer = self._circuit_dialer
        if dialer is None or self._connected(info.peer_id):
            return
        if any(p.name == "p2p-circuit" for a in info.addrs for p in a.protocols()):
            await dialer(info)

    async def connect(self, peer_info: PeerInfo) -> None:
        await self._via_circuit(peer_info)
        if not self._connected(peer_info.peer_id):
            await super().connect(peer_info)

    async def new_stream(self, peer_id: ID, protocol_ids: Sequence[TProtocol]) -> INetStream:
        if self._circuit_dialer is not None and not self._connected(peer_id):
            try:
                known = list(self.get_peerstore().addrs(peer_id))
            except Exception:
                known = []
            await self._via_circuit(PeerInfo(peer_id, known))
        return await super().new_stream(peer_id, protocol_ids)

    async def addrs_changed(self) -> None:
        """Tell connected peers our new addresses (identify push), bounded in time."""
        with trio.move_on_after(PUSH_TIMEOUT_S):
            await self._push_identify_to_all_peers()


def with_peer_suffix(addr: multiaddr.Multiaddr, me: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """``addr`` ending in ``/p2p/<me>`` exactly once, keeping any ``/p2p/<relay>`` inside it."""
    last = [p.name for p in addr.protocols()][-1:]
    if last == ["p2p"]:
        addr = addr.decapsulate_code(P_P2P)
    return addr.encapsulate(me)


def strip_peer_suffix(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """``addr`` without a trailing ``/p2p/<id>`` (a ``/p2p/<relay>/p2p-circuit`` stays)."""
    last = [p.name for p in addr.protocols()][-1:]
    return addr.decapsulate_code(P_P2P) if last == ["p2p"] else addr


async def notify_addrs_changed(host: object) -> None:
    """``host.addrs_changed()`` if the host has it (stock hosts in tests do not)."""
    changed = getattr(host, "addrs_changed", None)
    if changed is not None:
        try:
            await changed()
        except Exception as exc:
            log.debug("identify push after address change failed: %r", exc)

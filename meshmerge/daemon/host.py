"""Build and run the libp2p host from a validated `HostConfig`.

Why not `libp2p.new_host()`: without `sec_opt` it offers Noise, TLS, secio *and*
`/plaintext/2.0.0`, so a plaintext dialer gets an unauthenticated, unencrypted
session; it also builds the stock `Swarm` (250 ms per dial, loose limits).
We assemble the same parts ourselves: TCP, Noise only, Yamux only, our
`MeshSwarm`, and py-libp2p's `BasicHost` (as `AdvertisingHost`, which adds relay circuit
addresses to what it advertises) for identify (+push, with signed peer
records) and ping. mDNS stays off unless the config enables it. Noise, yamux
and the multistream-select client are our own (`meshmerge.daemon.transport`):
py-libp2p's per-frame locks and awaits cost most of a DHT request's CPU.

Use::

    async with running_host(config, identity) as host:
        ...  # host.get_addrs(), host.connect(...), host.new_stream(...)
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore
from libp2p.transport.tcp.tcp import TCP

from .advertise import AdvertisingHost
from .identity import Identity
from .limits import ConnectionLimits
from .swarm import MeshSwarm
from .transport import PipelinedMultiselectClient
from .transport import upgrader as transport_upgrader

log = logging.getLogger("meshmerge.host")

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the rule."""


def parse_listen_addr(text: str, field_name: str = "listen_addrs") -> multiaddr.Multiaddr:
    """Parse and check one listen address: explicit IP, TCP, never a wildcard."""
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:
        raise ConfigError(f"{field_name}: {text!r} is not a valid multiaddr ({exc})") from exc
    names = [p.name for p in addr.protocols()]
    if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise ConfigError(f"{field_name}: {text!r} must be /ip4/<addr>/tcp/<port> or /ip6/<addr>/tcp/<port>")
    ip = ipaddress.ip_address(addr.value_for_protocol(names[0]))
    if ip.is_unspecified:
        raise ConfigError(
            f"{field_name}: {text!r} is a wildcard address; list each interface address explicitly"
        )
    return addr


@dataclass(frozen=True)
class HostConfig:
    """Everything that shapes the host. `validate()` names the field and the rule."""

    listen_addrs: tuple[str, ...] = DEFAULT_LISTEN
    """Where to listen. Loopback by default; deploy configs list public addresses explicitly."""
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    dial_stagger: float = 0.25
    """Seconds before trying a peer's next address while the previous dial is still pending."""
    dial_timeout: float = 10.0
    """Seconds for one address's TCP connect + Noise + Yamux."""
    negotiate_timeout: int = 5
    """Seconds for multistream-select on a new stream."""
    handshake_timeout: float = 10.0
    """Seconds for a new connection's security + muxer upgrade, either direction; a
    silent inbound connection is dropped after this (it holds a pending slot meanwhile)."""
    enable_mdns: bool = False
    announce_addrs: tuple[str, ...] = ()
    """Extra addresses to tell peers (identify, signed peer record, DHT), e.g. the public
    address of a port forward the node cannot observe itself."""

    def validate(self) -> None:
        if not self.listen_addrs:
            raise ConfigError("listen_addrs: at least one address is required")
        for text in self.listen_addrs:
            parse_listen_addr(text)
        for text in self.announce_addrs:
            parse_listen_addr(text, "announce")
        try:
            self.limits.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if not 0 < self.dial_stagger <= 5:
            raise ConfigError(f"dial_stagger: must be in (0, 5] seconds, got {self.dial_stagger!r}")
        if not 0 < self.dial_timeout <= 120:
            raise ConfigError(f"dial_timeout: must be in (0, 120] seconds, got {self.dial_timeout!r}")
        if not 0 < self.handshake_timeout <= 120:
            raise ConfigError(
                f"handshake_timeout: must be in (0, 120] seconds, got {self.handshake_timeout!r}"
            )
        if not 1 <= self.negotiate_timeout <= 60:
            raise ConfigError(
                f"negotiate_timeout: must be in [1, 60] seconds, got {self.negotiate_timeout!r}"
            )


def build_host(config: HostConfig, identity: Identity) -> AdvertisingHost:
    """Assemble (but do not start) a host: TCP, Noise only, Yamux only, our swarm."""
    config.validate()
    key_pair = identity.key_pair()
    peer_id = identity.peer_id
    upgrader = transport_upgrader(key_pair, config.negotiate_timeout)
    peerstore = PeerStore()
    peerstore.add_key_pair(peer_id, key_pair)
    lim = config.limits
    conn_config = ConnectionConfig(
        max_connections=lim.max_connections,
        # Our limiter enforces the caps; stock trimming only starts at the cap itself,
        # and a low watermark of 0 keeps the stock auto-connector from dialing every
        # peer in the peerstore (the DHT decides whom to talk to).
        min_connections=0,
        low_watermark=0,
        high_watermark=lim.max_connections,
        max_connections_per_peer=lim.max_connections_per_peer,
        dial_timeout=config.dial_timeout,
        inbound_upgrade_timeout=config.handshake_timeout,
        outbound_upgrade_timeout=config.handshake_timeout,
    )
    swarm = MeshSwarm(
        peer_id,
        peerstore,
        upgrader,
        transports=[TCP()],
        connection_config=conn_config,
        retry_config=RetryConfig(max_retries=0),
        limits=lim,
        dial_stagger=config.dial_stagger,
    )
    host = AdvertisingHost(
        network=swarm, enable_mDNS=config.enable_mdns, negotiate_timeout=config.negotiate_timeout
    )
    host.multiselect_client = PipelinedMultiselectClient()
    swarm.set_stream_handler(swarm.wrap_stream_handler(swarm.common_stream_handler))
    return host


@asynccontextmanager
async def running_host(config: HostConfig, identity: Identity) -> AsyncIterator[AdvertisingHost]:
    """Start the host listening on the configured addresses; stop it on exit."""
    host = build_host(config, identity)
    addrs = [parse_listen_addr(a) for a in config.listen_addrs]
    if config.announce_addrs:
        announced = [parse_listen_addr(a, "announce") for a in config.announce_addrs]
        host.add_addr_provider(lambda: announced)
    async with host.run(addrs):
        log.info("host %s listening on %s", host.get_id(), ", ".join(str(a) for a in host.get_addrs()))
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True):
                await host.close()


def peer_info(addr: str | multiaddr.Multiaddr) -> PeerInfo:
    """`PeerInfo` from a full `/ip4/.../tcp/.../p2p/<id>` address, with a clear error."""
    try:
        ma = addr if isinstance(addr, multiaddr.Multiaddr) else multiaddr.Multiaddr(addr)
        return info_from_p2p_addr(ma)
    except Exception as exc:
        raise ConfigError(
            f"peer address {str(addr)!r} is not a valid /…/p2p/<peer-id> multiaddr ({exc})"
        ) from exc

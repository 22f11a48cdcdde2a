"""A *stock* py-libp2p 0.8.1 host, as a new user would build it, for baselines.

Only one deviation from the defaults, and a required one: `sec_opt` offers
Noise alone (the stock default also accepts plaintext and secio). Everything
else, including the swarm's dial delay, is left as shipped, so that tests and
benchmarks show where meshmerge's own host has to do better.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import libp2p
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.utils.varint import read_length_prefixed_protobuf
from multiaddr import Multiaddr


def new_noise_only_host() -> IHost:
    """`libp2p.new_host` with Noise as the only security protocol, all else default."""
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    return libp2p.new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL: noise})


@dataclass
class StockPyHost:
    host: IHost

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    @property
    def addrs(self) -> list[Multiaddr]:
        """Listen addresses without the /p2p suffix."""
        return [Multiaddr(str(a).split("/p2p/")[0]) for a in self.host.get_addrs()]

    @property
    def p2p_addrs(self) -> list[str]:
        return [f"{a}/p2p/{self.peer_id.to_base58()}" for a in self.addrs]

    async def connect(self, peer_id: ID, addrs: Sequence[Multiaddr | str]) -> float:
        """Dial; returns the seconds `host.connect` took."""
        t0 = time.perf_counter()
        await self.host.connect(PeerInfo(peer_id, [Multiaddr(str(a)) for a in addrs]))
        return time.perf_counter() - t0

    async def ping(self, peer_id: ID, count: int = 1) -> list[float]:
        """Round-trip times in seconds over one ping stream (timed here, not py-libp2p's ms ints)."""
        stream = await self.host.new_stream(peer_id, [PING_PROTOCOL])
        rtts = []
        try:
            for _ in range(count):
                t0 = time.perf_counter()
                await perform_ping_roundtrip(stream)
                rtts.append(time.perf_counter() - t0)
        finally:
            await stream.close()
        return rtts

    async def identify_remote(self, peer_id: ID, timeout: float = 10.0) -> Identify:
        """Ask `peer_id` for its Identify message over a fresh /ipfs/id/1.0.0 stream."""
        with trio.fail_after(timeout):
            stream = await self.host.new_stream(peer_id, [IDENTIFY_PROTOCOL])
            try:
                raw = await read_length_prefixed_protobuf(stream, use_varint_format=True)
            finally:
                await stream.close()
        msg = Identify()
        msg.ParseFromString(raw)
        return msg


@asynccontextmanager
async def start_stock_py_host(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[StockPyHost]:
    """A stock py-libp2p host listening on TCP `host:port` for the block."""
    h = new_noise_only_host()
    family = "ip6" if ":" in host else "ip4"
    async with h.run(listen_addrs=[Multiaddr(f"/{family}/{host}/tcp/{port}")]):
        yield StockPyHost(h)

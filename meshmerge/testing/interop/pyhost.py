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
from libp2p.abc import IHost, ISubscriptionAPI
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12 as GOSSIPSUB_V12
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service.context import background_trio_service
from libp2p.utils.varint import read_length_prefixed_protobuf
from multiaddr import Multiaddr

from meshmerge.testing.interop.common import PubsubMessage


def new_noise_only_host() -> IHost:
    """`libp2p.new_host` with Noise as the only security protocol, all else default."""
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    return libp2p.new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL: noise})


@dataclass
class StockPyHost:
    host: IHost
    pubsub: Pubsub | None = None

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

    async def identified_protocols(self, peer_id: ID, timeout: float = 10.0) -> list[str]:
        """Protocols py-libp2p's own identify (run on connect) stored for `peer_id`; waits for it."""
        with trio.fail_after(timeout):
            while True:
                try:
                    protocols = list(self.host.get_peerstore().get_protocols(peer_id))
                except PeerStoreError:  # no data on the peer yet
                    protocols = []
                if protocols:
                    return protocols
                await trio.sleep(0.02)

    async def identify_remote(self, peer_id: ID, timeout: float = 10.0) -> Identify:
        """Ask `peer_id` for its Identify message over a fresh /ipfs/id/1.0.0 stream.

        Waits for py-libp2p's automatic identify first: js-libp2p allows one
        inbound identify stream per connection and resets a second, concurrent one.
        """
        with trio.fail_after(timeout):
            await self.identified_protocols(peer_id, timeout)
            stream = await self.host.new_stream(peer_id, [IDENTIFY_PROTOCOL])
            try:
                raw = await read_length_prefixed_protobuf(stream, use_varint_format=True)
            finally:
                await stream.close()
        msg = Identify()
        msg.ParseFromString(raw)
        return msg

    async def disconnect(self, peer_id: ID) -> None:
        await self.host.disconnect(peer_id)

    def topic_peers(self, topic: str) -> set[ID]:
        """Peers py-libp2p's pubsub knows to be subscribed to `topic`."""
        assert self.pubsub is not None, "start_stock_py_host(gossipsub=True) to use pubsub"
        return set(self.pubsub.peer_topics.get(topic, ()))

    async def publish(self, topic: str, data: bytes) -> None:
        assert self.pubsub is not None, "start_stock_py_host(gossipsub=True) to use pubsub"
        await self.pubsub.publish(topic, data)

    async def subscribe(self, topic: str) -> StockPySubscription:
        assert self.pubsub is not None, "start_stock_py_host(gossipsub=True) to use pubsub"
        return StockPySubscription(topic, await self.pubsub.subscribe(topic))


@dataclass
class StockPySubscription:
    topic: str
    api: ISubscriptionAPI

    async def receive(self) -> PubsubMessage:
        msg = await self.api.get()
        return PubsubMessage(
            topic=self.topic,
            data=msg.data,
            from_peer=ID(msg.from_id) if msg.from_id else None,
            seqno=msg.seqno,
            received_at=time.monotonic(),
        )


def new_stock_gossipsub() -> GossipSub:
    """py-libp2p's GossipSub with only the required arguments (D=6, Dlo=4, Dhi=12), rest default.

    The defaults include a 120 s heartbeat and a 10 msg/s per-topic limit.
    """
    return GossipSub(
        protocols=[GOSSIPSUB_V12, GOSSIPSUB_V11, GOSSIPSUB_V10], degree=6, degree_low=4, degree_high=12
    )


@asynccontextmanager
async def start_stock_py_host(
    host: str = "127.0.0.1", port: int = 0, *, gossipsub: bool = False
) -> AsyncIterator[StockPyHost]:
    """A stock py-libp2p host listening on TCP `host:port` for the block, with stock gossipsub if asked."""
    h = new_noise_only_host()
    family = "ip6" if ":" in host else "ip4"
    async with h.run(listen_addrs=[Multiaddr(f"/{family}/{host}/tcp/{port}")]):
        if not gossipsub:
            yield StockPyHost(h)
            return
        router = new_stock_gossipsub()
        pubsub = Pubsub(h, router)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            yield StockPyHost(h, pubsub)

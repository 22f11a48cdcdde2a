"""Peer exchange with signed peer records, on real py-libp2p hosts over loopback."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as HostPeerInfo
from libp2p.peer.peerstore import create_signed_peer_record
from multiaddr import Multiaddr

from meshmerge.daemon.config import ConfigError, GossipSection
from meshmerge.daemon.gossip.bootstrap import daemon_gossip_config
from meshmerge.daemon.gossip.driver import GossipConfig
from meshmerge.daemon.gossip.params import GossipSubParams
from meshmerge.daemon.gossip.peer_record import PeerRecordError, open_px_record
from meshmerge.daemon.gossip.router import MESHSUB_11
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.proto.gossipsub import (
    RPC,
    ControlMessage,
    ControlPrune,
    PeerInfo,
    SubOpts,
    encode_frame,
)
from tests.daemon.gossip.netkit import GNode, gossip_nodes, mesh_ready, wait_for
from tests.daemon.swarmkit import run

TOPIC = "/meshmerge/1/set/px"


def _record(ident: Identity, host: BasicHost, claimed: ID | None = None) -> bytes:
    """A signed peer record of ``claimed`` (default: the identity's own peer) with the host's addresses."""
    env = create_signed_peer_record(
        claimed or ident.peer_id, list(host.get_transport_addrs()), ident.key_pair().private_key
    )
    return env.marshal_envelope()


def _knows(host: BasicHost, other: BasicHost | ID) -> bool:
    pid = other if isinstance(other, ID) else other.get_id()
    try:
        return bool(host.get_peerstore().addrs(pid))
    except Exception:  # PeerStoreError: never heard of it
        return False


def _connected(host: BasicHost, other: BasicHost) -> bool:
    return bool(host.get_network().get_connections(other.get_id()))


async def _raw_pubsub_stream(x: BasicHost, a: GNode) -> INetStream:
    """X (a bare host) becomes a pubsub peer of A on the topic; returns X's stream to A."""

    async def sink(stream: INetStream) -> None:  # A's outbound stream to X: read and discard
        with trio.move_on_after(60):
            while await stream.read(65536):
                pass

    x.set_stream_handler(TProtocol(MESHSUB_11), sink)
    await x.connect(HostPeerInfo(a.host.get_id(), list(a.host.get_transport_addrs())))
    await wait_for(lambda: x.get_id().to_bytes() in a.service.router.peers, what="A added X")
    stream = await x.new_stream(a.host.get_id(), [TProtocol(MESHSUB_11)])
    await stream.write(encode_frame(RPC(subscriptions=[SubOpts(True, TOPIC)])))
    return stream


def _prune_frame(entries: list[PeerInfo]) -> bytes:
    prune = ControlPrune(topic=TOPIC, peers=entries, backoff=60)
    return encode_frame(RPC(control=ControlMessage(prune=[prune])))


def test_open_px_record_checks_signature_signer_and_named_peer() -> None:
    async def body() -> None:
        a, b = Identity.generate(), Identity.generate()
        async with running_host(HostConfig(), a) as ha:
            good = _record(a, ha)
            rec = open_px_record(good, a.peer_id.to_bytes())
            assert rec.peer_id == a.peer_id and rec.addrs == tuple(ha.get_transport_addrs())
            with pytest.raises(PeerRecordError, match="names"):
                open_px_record(good, b.peer_id.to_bytes())
            with pytest.raises(PeerRecordError, match="signed by"):
                open_px_record(_record(b, ha, claimed=a.peer_id), a.peer_id.to_bytes())
            tampered = bytearray(good)
            tampered[-1] ^= 1
            with pytest.raises(PeerRecordError, match="signature"):
                open_px_record(bytes(tampered), a.peer_id.to_bytes())
            for junk in (b"", b"\x00" * 40, b"\xff" * 100, bytes(5000)):
                with pytest.raises(PeerRecordError):
                    open_px_record(junk, a.peer_id.to_bytes())

    run(body, timeout=30)


def test_pruned_node_learns_and_dials_a_px_peer_it_did_not_know() -> None:
    """B prunes A (B leaves the topic) with PX naming C; A had never heard of C."""
    px = GossipConfig(params=GossipSubParams(do_px=True))

    async def body() -> None:
        async with gossip_nodes(3, configs=[GossipConfig(), px, GossipConfig()]) as (a, b, c):
            for n in (a, b, c):
                n.join(TOPIC)
            await a.host.connect(b.info)
            await c.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, c], TOPIC, 1), what="a-b and c-b meshes")
            # B learnt C's signed record through identify; that is what it will hand out
            await wait_for(
                lambda: b.host.get_peerstore().get_peer_record(c.host.get_id()) is not None,
                what="B has C's signed record",
            )
            assert not _connected(a.host, c.host)
            assert not _knows(a.host, c.host)

            b.service.unsubscribe(TOPIC)
            await wait_for(lambda: c.pid in a.service.router.peers, what="A dialled C from PX")
            assert a.service.stats.px_records >= 1 and a.service.stats.px_invalid == 0
            assert a.service.stats.dials >= 1
            # the new link carries gossip: B no longer relays the topic
            await wait_for(lambda: mesh_ready([a, c], TOPIC, 1) and c.pid in a.service.router.mesh[TOPIC])
            await c.service.publish(TOPIC, b"via px")
            await wait_for(lambda: (c.pid, b"via px") in a.received[TOPIC], what="delivery over the PX link")

    run(body, timeout=90)


def test_forged_and_unsigned_px_entries_are_ignored_valid_ones_dialled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raw peer X prunes A with hand-made PX entries; only the honestly signed one is dialled."""
    ix, ic, id_, ig, ih, ie, iff = (Identity.generate() for _ in range(7))

    async def body() -> None:
        async with (
            gossip_nodes(1) as (a,),
            running_host(HostConfig(), ix) as x,
            running_host(HostConfig(), ic) as c,
            running_host(HostConfig(), id_) as d,
            running_host(HostConfig(), ie) as e,
            running_host(HostConfig(), iff) as f,
        ):
            a.join(TOPIC)
            stream = await _raw_pubsub_stream(x, a)

            tampered = bytearray(_record(ig, c))
            tampered[-1] ^= 1
            entries = [  # one entry per peer id: the router keeps the first entry for a peer
                PeerInfo(ic.peer_id.to_bytes(), _record(ix, c, claimed=ic.peer_id)),  # signed by X, not C
                PeerInfo(id_.peer_id.to_bytes(), _record(ic, c)),  # C's genuine record under D's name
                PeerInfo(ig.peer_id.to_bytes(), bytes(tampered)),  # bad signature
                PeerInfo(ih.peer_id.to_bytes(), b"\x0a\x03junk"),  # not an envelope
                PeerInfo(iff.peer_id.to_bytes(), None),  # unsigned, address unknown to A
                PeerInfo(ie.peer_id.to_bytes(), _record(ie, e)),  # genuine
            ]
            with caplog.at_level(logging.WARNING, logger="meshmerge.gossip"):
                await stream.write(_prune_frame(entries))
                await wait_for(lambda: _connected(a.host, e), what="A dialled the honestly signed E")
                await trio.sleep(1.0)
            stats = a.service.stats
            assert (stats.px_records, stats.px_invalid, stats.px_unsigned) == (1, 4, 1)
            for other in (c, d, f):
                assert not _connected(a.host, other)
            for ident in (ic, id_, ig, ih, iff):
                assert not _knows(a.host, ident.peer_id)
            ignored = [r.getMessage() for r in caplog.records if "ignoring PX record" in r.getMessage()]
            assert len(ignored) == 4, ignored
            for reason in ("signed by", "names", "signature does not verify", "not a signed envelope"):
                assert any(reason in m for m in ignored), (reason, ignored)
            assert all(ix.peer_id.to_base58() in m for m in ignored)  # the log names the sender
            assert ix.peer_id.to_bytes() in a.service.router.peers  # no crash, X is still served

    run(body, timeout=60)


def test_px_dials_are_bounded_by_concurrency_and_queue() -> None:
    """Ten genuine records for peers that are not listening: 1 dial at a time, 2 may wait, 7 dropped."""
    config = GossipConfig(max_concurrent_dials=1, max_pending_dials=2)
    ids = [Identity.generate() for _ in range(10)]

    async def body() -> None:
        async with gossip_nodes(1, config) as (a,), running_host(HostConfig(), Identity.generate()) as x:
            a.join(TOPIC)
            stream = await _raw_pubsub_stream(x, a)
            with socket.socket() as probe:  # a loopback port nobody listens on
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            dead = Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
            entries = [
                PeerInfo(
                    i.peer_id.to_bytes(),
                    create_signed_peer_record(i.peer_id, [dead], i.key_pair().private_key).marshal_envelope(),
                )
                for i in ids
            ]
            await stream.write(_prune_frame(entries))
            stats = a.service.stats
            await wait_for(lambda: stats.px_records == 10 and not a.service._dialing, what="PX handled")
            await trio.sleep(0.5)
            assert not a.service._dialing and not a.service._dial_queue
            assert (stats.dials, stats.dials_skipped) == (3, 7)
            assert x.get_id().to_bytes() in a.service.router.peers  # failed dials cost X nothing here

    run(body, timeout=60)


def test_records_we_hand_out_are_ours_from_identify_and_never_oversized() -> None:
    async def body() -> None:
        async with gossip_nodes(2) as (a, b):
            await a.host.connect(b.info)
            bid = b.host.get_id()
            ps = a.host.get_peerstore()
            await wait_for(lambda: ps.get_peer_record(bid) is not None, what="B's record via identify")
            rec = a.service._signed_record(b.pid)
            assert rec is not None and open_px_record(rec, b.pid).peer_id == bid
            own = a.service._signed_record(a.pid)  # issued at start, so identify always carries it
            assert own is not None and open_px_record(own, a.pid).peer_id == a.host.get_id()
            big = Identity.generate()
            addrs = [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}") for port in range(1000, 1400)]
            env = create_signed_peer_record(big.peer_id, addrs, big.key_pair().private_key)
            assert len(env.marshal_envelope()) > 4096
            assert ps.consume_peer_record(env, 60)
            assert a.service._signed_record(big.peer_id.to_bytes()) is None

    run(body, timeout=60)


def test_daemon_bootstrapper_hands_out_px_that_its_clients_accept_and_dial() -> None:
    """The daemon's [gossip] roles on real hosts: B runs as a bootstrapper (no mesh, PRUNE +
    PX to every GRAFT); A is configured with B as its bootstrap peer, so B's P5 puts it above
    A's accept-PX threshold. A meets only B, grafts it, is pruned with PX naming C, and dials C.
    C runs the daemon's config without bootstrap peers, so it takes PX from nobody: otherwise
    B's PRUNE to C could name A and C dial A first, and A would never need the PX."""
    boot_cfg = daemon_gossip_config(GossipSection(bootstrapper=True))

    async def body() -> None:
        async with gossip_nodes(2, configs=[boot_cfg, daemon_gossip_config(GossipSection())]) as (b, c):
            b_addr = f"{b.host.get_transport_addrs()[0]}/p2p/{b.host.get_id().to_base58()}"
            client_cfg = daemon_gossip_config(GossipSection(), [b_addr])
            async with gossip_nodes(1, configs=[client_cfg]) as (a,):
                for n in (b, c):
                    n.join(TOPIC)
                await c.host.connect(b.info)
                await wait_for(
                    lambda: b.host.get_peerstore().get_peer_record(c.host.get_id()) is not None,
                    what="B has C's signed record",
                )
                a.join(TOPIC)
                await a.host.connect(b.info)
                await wait_for(lambda: b.pid in a.service.router.peers, what="A added B")
                assert a.service.router.peer_score(b.pid) >= client_cfg.thresholds.accept_px_threshold
                await wait_for(lambda: c.pid in a.service.router.peers, what="A dialled C from B's PX")
                assert a.service.stats.px_records >= 1 and a.service.stats.px_invalid == 0
                await wait_for(lambda: c.pid in a.service.router.mesh[TOPIC], what="A-C mesh")
                assert b.service.router.mesh[TOPIC] == set()  # the bootstrapper never meshes
                assert a.service.router.peer_score(c.pid) < client_cfg.thresholds.accept_px_threshold
                await c.service.publish(TOPIC, b"after px")
                await wait_for(
                    lambda: (c.pid, b"after px") in a.received[TOPIC], what="delivery over the PX link"
                )

    run(body, timeout=90)


def test_daemon_gossip_config_rules() -> None:
    with pytest.raises(ConfigError, match="bootstrap_score .* must exceed accept_px_threshold"):
        daemon_gossip_config(GossipSection(bootstrap_score=10.0, accept_px_threshold=50.0))
    with pytest.raises(ConfigError, match="accept_px_threshold must be a positive finite"):
        daemon_gossip_config(GossipSection(accept_px_threshold=float("nan")))
    with pytest.raises(ConfigError, match=r"\[network\] bootstrap: .*not a valid"):
        daemon_gossip_config(GossipSection(), ["/ip4/127.0.0.1/tcp/4001"])
    plain = daemon_gossip_config(GossipSection())
    assert plain.score is None and plain.thresholds.accept_px_threshold == 50.0  # PX from nobody
    assert daemon_gossip_config(GossipSection(bootstrapper=True)).params.is_bootstrapper

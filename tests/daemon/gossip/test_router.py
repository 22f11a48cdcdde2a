"""Router rules driven directly (sans-I/O): every frame it emits is decoded with the codec."""

from __future__ import annotations

import random

import pytest

from meshmerge.daemon.gossip.params import GossipSubParams, PeerScoreThresholds, derive_score_params
from meshmerge.daemon.gossip.router import FLOODSUB, MESHSUB_10, MESHSUB_11, MESHSUB_12, GossipSubRouter
from meshmerge.proto.gossipsub import (
    RPC,
    ControlGraft,
    ControlMessage,
    ControlPrune,
    FrameDecoder,
    Message,
    PeerInfo,
    SubOpts,
)
from meshmerge.proto.gossipsub_sign import Ed25519Identity, sign_message

T = "t"


def pid(i: int) -> bytes:
    return Ed25519Identity(bytes([i]) * 32).peer_id


def drain(r: GossipSubRouter) -> dict[bytes, list[RPC]]:
    out: dict[bytes, list[RPC]] = {}
    for peer in r.peers_with_output():
        dec = FrameDecoder()
        while (frame := r.pop_frame(peer)) is not None:
            out.setdefault(peer, []).extend(dec.feed(frame))
    return out


def router(**kw: object) -> GossipSubRouter:
    return GossipSubRouter(Ed25519Identity(bytes(32)), rng=random.Random(0), **kw)  # type: ignore[arg-type]


def join(r: GossipSubRouter, peers: list[bytes], proto: str = MESHSUB_12, outbound: bool = True) -> None:
    for i, p in enumerate(peers):
        r.add_peer(p, proto, outbound, f"100.64.0.{i + 1}", 0.0)
        r.on_rpc(p, RPC(subscriptions=[SubOpts(True, T)]), 0.0)


def test_add_peer_announces_subscriptions_and_rejects_unknown_protocols() -> None:
    r = router()
    r.subscribe(T, 0.0)
    r.add_peer(pid(1), MESHSUB_11, True, "100.64.0.1", 0.0)
    assert drain(r)[pid(1)][0].subscriptions == [SubOpts(True, T)]
    with pytest.raises(ValueError, match="protocol"):
        r.add_peer(pid(2), "/meshsub/9.9.9", True, "100.64.0.2", 0.0)


def test_subscribe_grafts_d_peers_and_heartbeat_keeps_degree() -> None:
    r = router()
    peers = [pid(i) for i in range(1, 21)]
    join(r, peers)
    r.subscribe(T, 0.0)
    assert len(r.mesh[T]) == 6
    grafted = [p for p, rpcs in drain(r).items() if any(x.control and x.control.graft for x in rpcs)]
    assert set(grafted) == r.mesh[T]
    for p in peers:  # everyone grafts us: we accept up to Dhi, then refuse inbound peers
        r.on_rpc(p, RPC(control=ControlMessage(graft=[ControlGraft(T)])), 0.5)
    assert len(r.mesh[T]) == 20  # all our peers are outbound here, so Dhi does not refuse them
    r.on_heartbeat(1.0)
    assert len(r.mesh[T]) == 6  # oversubscribed: pruned back to D


def test_graft_from_inbound_peer_refused_when_mesh_full_with_backoff() -> None:
    r = router()
    join(r, [pid(i) for i in range(1, 13)], outbound=False)
    r.subscribe(T, 0.0)
    for i in range(1, 13):
        r.on_rpc(pid(i), RPC(control=ControlMessage(graft=[ControlGraft(T)])), 0.1)
    extra = pid(50)
    join(r, [extra], outbound=False)
    drain(r)
    r.on_rpc(extra, RPC(control=ControlMessage(graft=[ControlGraft(T)])), 0.2)
    prunes = [pr for x in drain(r)[extra] if x.control for pr in x.control.prune]
    assert prunes and prunes[0].backoff == 60
    assert extra not in r.mesh[T] and r.backoff[T][extra] == pytest.approx(60.2)


def test_prune_backoff_is_clamped_and_v10_prunes_carry_no_backoff() -> None:
    r = router(params=GossipSubParams(max_backoff=600.0))
    join(r, [pid(1)])
    r.subscribe(T, 0.0)
    r.on_rpc(pid(1), RPC(control=ControlMessage(prune=[ControlPrune(T, [], 2**64 - 1)])), 1.0)
    assert r.backoff[T][pid(1)] == pytest.approx(601.0)
    old = router()
    join(old, [pid(2)], proto=MESHSUB_10)
    old.subscribe(T, 0.0)
    old.unsubscribe(T, 1.0)
    prunes = [pr for x in drain(old)[pid(2)] if x.control for pr in x.control.prune]
    assert prunes == [ControlPrune(T, [], None)]


def test_unsubscribe_prunes_with_unsubscribe_backoff() -> None:
    r = router()
    join(r, [pid(i) for i in range(1, 4)])
    r.subscribe(T, 0.0)
    drain(r)
    r.unsubscribe(T, 5.0)
    out = drain(r)
    for p in (pid(1), pid(2), pid(3)):
        assert SubOpts(False, T) in out[p][0].subscriptions
        assert out[p][0].control is not None and out[p][0].control.prune[0].backoff == 10


def test_px_accepted_only_from_peers_above_accept_px_threshold() -> None:
    good, bad = pid(1), pid(2)
    sp, _ = derive_score_params({T: 1.0}, app_specific_score=lambda p: 500.0 if p == good else 0.0)
    th = PeerScoreThresholds(-10, -20, -30, accept_px_threshold=100.0)
    r = router(score_params=sp, thresholds=th)
    join(r, [good, bad])
    r.subscribe(T, 0.0)
    offered = [PeerInfo(pid(i)) for i in range(10, 40)]
    r.on_rpc(bad, RPC(control=ControlMessage(prune=[ControlPrune(T, offered, 60)])), 1.0)
    assert r.take_px() == []
    r.on_rpc(good, RPC(control=ControlMessage(prune=[ControlPrune(T, offered, 60)])), 1.0)
    px = r.take_px()
    assert 0 < len(px) <= r.params.max_px_connect and {src for src, _ in px} == {good}
    assert {pi.peer_id for _, pi in px} <= {p.peer_id for p in offered}
    assert r.take_connects() == []  # PX candidates are not dialled blindly; the driver checks records


def test_px_entries_carry_signed_records_from_the_lookup_hook() -> None:
    records = {pid(2): b"record-of-2"}
    r = router(params=GossipSubParams(do_px=True), peer_record=records.get)
    join(r, [pid(i) for i in range(1, 4)])
    r.subscribe(T, 0.0)
    drain(r)
    r.unsubscribe(T, 1.0)
    prune = next(pr for x in drain(r)[pid(1)] if x.control for pr in x.control.prune)
    got = {pi.peer_id: pi.signed_peer_record for pi in prune.peers}
    assert got == {pid(2): b"record-of-2", pid(3): None}


def test_px_offered_only_when_enabled_and_only_to_v11_peers() -> None:
    r = router(params=GossipSubParams(do_px=True))
    join(r, [pid(i) for i in range(1, 8)])
    r.subscribe(T, 0.0)
    drain(r)
    victim = next(iter(r.mesh[T]))
    r._prune(victim, T, 1.0)
    r._flush()
    prune = next(pr for x in drain(r)[victim] if x.control for pr in x.control.prune)
    assert prune.peers and victim not in {p.peer_id for p in prune.peers}


def test_direct_peers_always_get_messages_and_never_join_the_mesh() -> None:
    d = pid(9)
    r = router(direct_peers=[d])
    join(r, [d, *[pid(i) for i in range(1, 8)]])
    r.subscribe(T, 0.0)
    assert d not in r.mesh[T]
    drain(r)
    r.on_rpc(d, RPC(control=ControlMessage(graft=[ControlGraft(T)])), 1.0)
    assert d not in r.mesh[T]
    assert any(x.control and x.control.prune for x in drain(r)[d])
    author = Ed25519Identity(bytes([77]) * 32)
    msg = sign_message(author, Message(data=b"x", seqno=(1).to_bytes(8, "big"), topic=T))
    sender = next(iter(r.mesh[T]))
    r.on_rpc(sender, RPC(publish=[msg]), 2.0)
    assert any(x.publish for x in drain(r)[d])


def test_fanout_when_publishing_to_an_unsubscribed_topic_and_expiry() -> None:
    r = router(params=GossipSubParams(flood_publish=False))
    join(r, [pid(i) for i in range(1, 20)])
    r.publish(T, b"hello", 1.0)
    assert len(r.fanout[T]) == 6
    receivers = [p for p, rpcs in drain(r).items() if any(x.publish for x in rpcs)]
    assert set(receivers) == r.fanout[T]
    r.on_heartbeat(30.0)
    assert T in r.fanout
    r.on_heartbeat(62.0)
    assert T not in r.fanout


def test_flood_publish_respects_publish_threshold() -> None:
    low = pid(1)
    sp, _ = derive_score_params({T: 1.0}, app_specific_score=lambda p: -50.0 if p == low else 0.0)
    th = PeerScoreThresholds(-10, -20, -30)
    r = router(score_params=sp, thresholds=th)
    join(r, [pid(i) for i in range(1, 15)])
    r.subscribe(T, 0.0)
    drain(r)
    r.publish(T, b"own", 1.0)
    receivers = {p for p, rpcs in drain(r).items() if any(x.publish for x in rpcs)}
    assert receivers == {pid(i) for i in range(2, 15)}  # flood to all but the low scorer


def test_no_gossip_to_or_from_peers_below_gossip_threshold() -> None:
    low = pid(1)
    sp, _ = derive_score_params({T: 1.0}, app_specific_score=lambda p: -15.0 if p == low else 0.0)
    th = PeerScoreThresholds(-10, -20, -30)
    r = router(score_params=sp, thresholds=th)
    join(r, [pid(i) for i in range(1, 30)])
    r.subscribe(T, 0.0)
    r.publish(T, b"m", 0.5)
    drain(r)
    r.on_heartbeat(1.0)
    out = drain(r)
    ihave_to = {p for p, rpcs in out.items() if any(x.control and x.control.ihave for x in rpcs)}
    assert ihave_to and low not in ihave_to
    r.on_rpc(low, RPC(control=ControlMessage(iwant=[])), 1.1)
    before = r.stats.ihave_ignored
    from meshmerge.proto.gossipsub import ControlIHave

    r.on_rpc(low, RPC(control=ControlMessage(ihave=[ControlIHave(T, [b"a" * 10])])), 1.2)
    assert r.stats.ihave_ignored == before + 1


def test_floodsub_peers_receive_messages_but_no_control() -> None:
    r = router()
    join(r, [pid(1)], proto=FLOODSUB)
    join(r, [pid(i) for i in range(2, 9)])
    r.subscribe(T, 0.0)
    assert pid(1) not in r.mesh[T]
    drain(r)
    author = Ed25519Identity(bytes([77]) * 32)
    msg = sign_message(author, Message(data=b"x", seqno=(1).to_bytes(8, "big"), topic=T))
    r.on_rpc(pid(2), RPC(publish=[msg]), 1.0)
    out = drain(r)
    assert any(x.publish for x in out[pid(1)])
    r.on_heartbeat(2.0)
    assert all(not x.control for x in drain(r).get(pid(1), []))


def test_remove_peer_forgets_it_everywhere() -> None:
    r = router()
    join(r, [pid(i) for i in range(1, 8)])
    r.subscribe(T, 0.0)
    gone = next(iter(r.mesh[T]))
    r.remove_peer(gone, 1.0)
    assert gone not in r.mesh[T] and gone not in r.topics[T] and gone not in r.peers
    r.on_rpc(gone, RPC(subscriptions=[SubOpts(True, T)]), 1.0)  # late RPC from a gone peer: ignored
    assert gone not in r.topics[T]


@pytest.mark.parametrize("seed", range(5))
def test_pruning_an_oversubscribed_mesh_keeps_dout_outbound_peers(seed: int) -> None:
    r = GossipSubRouter(Ed25519Identity(bytes(32)), rng=random.Random(seed))
    inbound = [pid(i) for i in range(1, 19)]
    outbound = [pid(50), pid(51)]
    join(r, inbound, outbound=False)
    join(r, outbound, outbound=True)
    r.subscribe(T, 0.0)
    for p in inbound + outbound:
        r.on_rpc(p, RPC(control=ControlMessage(graft=[ControlGraft(T)])), 0.5)
    assert len(r.mesh[T]) > r.params.d_hi
    r.on_heartbeat(1.0)
    assert len(r.mesh[T]) == r.params.d
    assert set(outbound) <= r.mesh[T]

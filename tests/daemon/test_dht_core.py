"""Sans-I/O DHT pieces: records, routing table diversity, lookup, bounded stores."""

from __future__ import annotations

import hashlib

import pytest

from meshmerge.daemon.dht import (
    MeshmergeRecordValidator,
    NamespacedValidator,
    PublicKeyValidator,
    RecordRejected,
    SignedRecord,
    meshmerge_key,
    pk_key,
)
from meshmerge.daemon.dht.keys import kad_id, provider_key
from meshmerge.daemon.dht.lookup import Lookup
from meshmerge.daemon.dht.routing import RoutingTable
from meshmerge.daemon.dht.service import DHTConfig
from meshmerge.daemon.dht.store import ProviderStore, StoreFull, ValueStore
from meshmerge.daemon.identity import Identity


def validator() -> NamespacedValidator:
    return NamespacedValidator(
        {b"meshmerge": MeshmergeRecordValidator()}, max_key_bytes=256, max_value_bytes=1024
    )


def test_signed_record_roundtrip_and_rejections() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    key = meshmerge_key(alice.public_key, b"set/llama-lora")
    good = SignedRecord.create(key, 7, b"payload", alice.sign)
    v = validator()
    v.validate(key, good)
    assert SignedRecord.parse(good).seq == 7
    forged = SignedRecord.create(key, 8, b"evil", mallory.sign)
    with pytest.raises(RecordRejected, match="signature"):
        v.validate(key, forged)
    with pytest.raises(RecordRejected, match="max_value_bytes=1024"):
        v.validate(key, SignedRecord.create(key, 1, b"x" * 2000, alice.sign))
    with pytest.raises(RecordRejected, match="max_key_bytes=256"):
        v.validate(b"/meshmerge/" + b"a" * 300, good)
    with pytest.raises(RecordRejected, match="no validator"):
        v.validate(b"/other/thing", good)
    with pytest.raises(RecordRejected, match="must start with"):
        v.validate(b"plain-key", good)
    with pytest.raises(RecordRejected, match="bad magic"):
        v.validate(key, b"garbage")
    with pytest.raises(RecordRejected, match="64 lowercase hex"):
        v.validate(b"/meshmerge/zz/name", good)
    other_key = meshmerge_key(alice.public_key, b"set/other")
    with pytest.raises(RecordRejected, match="signature"):
        v.validate(other_key, good)  # a signature binds the key too


def test_selector_prefers_highest_seq_deterministically() -> None:
    alice = Identity.generate()
    key = meshmerge_key(alice.public_key, b"n")
    vals = [SignedRecord.create(key, s, b"p%d" % s, alice.sign) for s in (3, 9, 1)]
    v = validator()
    assert v.select(key, vals) == 1
    assert v.select(key, list(reversed(vals))) == 1


def test_public_key_records_are_self_certifying() -> None:
    v = PublicKeyValidator()
    alice, bob = Identity.generate(), Identity.generate()
    key = pk_key(alice.peer_id)
    value = alice.key_pair().public_key.serialize()
    v.validate(key, value)
    with pytest.raises(RecordRejected, match="does not hash"):
        v.validate(key, bob.key_pair().public_key.serialize())
    for junk in (b"", b"\x08\x01", b"\xff" * 40, value[:-1]):
        with pytest.raises(RecordRejected):
            v.validate(key, junk)
    with pytest.raises(RecordRejected, match="/pk/"):
        v.validate(b"/pk/", value)
    assert v.select(key, [b"junk", value]) == 1
    # dispatch by namespace, with the size limits
    nv = NamespacedValidator({b"pk": v}, max_key_bytes=128, max_value_bytes=64)
    nv.validate(key, value)
    with pytest.raises(RecordRejected, match="max_value_bytes"):
        nv.validate(key, value + b"\x00" * 64)


def test_routing_table_ip_group_diversity() -> None:
    me = Identity.generate().peer_id.to_bytes()
    # the per-bucket cap: peers that share a bucket (same common prefix length with us)
    bucket_cap = RoutingTable(
        me, k=20, max_per_group_per_bucket=2, max_per_group_table=99, exempt_loopback=False
    )
    same: list[bytes] = []
    while len(same) < 4:
        p = Identity.generate().peer_id.to_bytes()
        if (kad_id(p) ^ kad_id(me)).bit_length() == 256:  # bucket 0
            same.append(p)
    assert [bucket_cap.add(p, [f"192.0.2.{i + 1}"], 0.0) for i, p in enumerate(same)] == [
        True,
        True,
        False,
        False,
    ]
    # the per-table cap
    table = RoutingTable(me, k=20, max_per_group_per_bucket=20, max_per_group_table=3, exempt_loopback=False)
    peers = [Identity.generate().peer_id.to_bytes() for _ in range(10)]
    added = [table.add(p, [f"192.0.2.{i + 1}"], now=0.0) for i, p in enumerate(peers)]
    assert sum(added) == 3  # one /24 gets at most 3 slots in the whole table
    assert table.rejected_diversity == 7
    other = Identity.generate().peer_id.to_bytes()
    assert table.add(other, ["198.51.100.7"], now=0.0)  # a different group is welcome
    v6 = [Identity.generate().peer_id.to_bytes() for _ in range(5)]
    assert sum(table.add(p, [f"2001:db8:1:{i:x}::1"], now=0.0) for i, p in enumerate(v6)) == 3  # same /48
    loop = RoutingTable(me, exempt_loopback=True, max_per_group_table=1)
    assert all(loop.add(p, ["127.0.0.1"], now=0.0) for p in peers)


def test_routing_table_keeps_old_peers_until_they_fail() -> None:
    me = Identity.generate().peer_id.to_bytes()
    table = RoutingTable(me, k=1, exempt_loopback=True)
    # find two peers in the same bucket
    first = Identity.generate().peer_id.to_bytes()
    while True:
        second = Identity.generate().peer_id.to_bytes()
        if (kad_id(second) ^ kad_id(me)).bit_length() == (kad_id(first) ^ kad_id(me)).bit_length():
            break
    assert table.add(first, [], 0.0)
    assert not table.add(second, [], 1.0)
    table.failed(first, max_failures=3)
    assert table.add(second, [], 2.0) and second in table and first not in table


def test_lookup_converges_and_is_bounded() -> None:
    me = b"self"
    universe = [hashlib.sha256(b"%d" % i).digest() for i in range(200)]
    target = kad_id(b"target")
    by_dist = sorted(universe, key=lambda p: kad_id(p) ^ target)

    lk = Lookup(target, universe[:3], self_peer=me, k=5, alpha=3)
    while not lk.done:
        for p in lk.next_to_query():
            # every peer returns the 8 peers closest to the target it knows of: all of them
            lk.on_success(p, by_dist[:8])
    assert lk.closest(5) == by_dist[:5]

    # peers that always point to fresh strangers cannot make a lookup run forever
    stranger = iter(hashlib.sha256(b"s%d" % i).digest() for i in range(10**6))
    lk = Lookup(target, universe[:3], self_peer=me, k=5, alpha=3, max_queries=30)
    while not lk.done:
        for p in lk.next_to_query():
            lk.on_success(p, [next(stranger) for _ in range(20)])
    assert lk.queries <= 30
    assert len(lk.state) <= lk.max_candidates

    lk = Lookup(target, universe[:3], self_peer=me)
    for p in lk.next_to_query():
        lk.on_failure(p)
    assert lk.done and lk.closest() == []


def test_stores_are_bounded_and_expire() -> None:
    vs = ValueStore(max_records=2, max_bytes=100, ttl=10)
    vs.put(b"a", b"1", 0)
    vs.put(b"b", b"2", 0)
    with pytest.raises(StoreFull, match="max_records=2"):
        vs.put(b"c", b"3", 0)
    vs.put(b"a", b"11", 0)  # replacing is fine
    assert vs.get(b"a", 5) == b"11"
    assert vs.get(b"a", 11) is None
    vs.put(b"c", b"3", 11)
    with pytest.raises(StoreFull, match="max_bytes=100"):
        vs.put(b"c", b"x" * 200, 11)

    ps = ProviderStore(max_keys=1, max_per_key=2, ttl=10)
    ps.add(b"k", b"p1", [], 0)
    ps.add(b"k", b"p2", [], 0)
    with pytest.raises(StoreFull, match="max_per_key=2"):
        ps.add(b"k", b"p3", [], 0)
    with pytest.raises(StoreFull, match="max_keys=1"):
        ps.add(b"k2", b"p1", [], 0)
    assert [p.peer for p in ps.get(b"k", 1)] == [b"p1", b"p2"]
    assert ps.get(b"k", 20) == []


def test_provider_key_from_cid() -> None:
    digest = hashlib.sha256(b"blob").digest()
    mh = bytes([0x12, 0x20]) + digest
    assert provider_key(bytes([0x01, 0x71]) + mh) == mh  # CIDv1 dag-cbor
    assert provider_key(mh) == mh
    with pytest.raises(ValueError, match="malformed multihash"):
        provider_key(bytes([0x12, 0x20]) + b"short")


def test_dht_config_validation() -> None:
    DHTConfig().validate()
    with pytest.raises(ValueError, match=r"dht\.k: must be an integer"):
        DHTConfig(k=0).validate()
    with pytest.raises(ValueError, match=r"dht\.max_inbound_requests"):
        DHTConfig(max_inbound_requests=10**9).validate()
    with pytest.raises(ValueError, match=r"dht\.request_timeout"):
        DHTConfig(request_timeout=float("nan")).validate()
    with pytest.raises(ValueError, match=r"dht\.max_message_bytes: must exceed"):
        DHTConfig(max_message_bytes=4096, max_value_bytes=8192).validate()


def test_parse_peers_drops_malformed_entries_and_caps_counts() -> None:
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from multiaddr import Multiaddr

    from meshmerge.daemon.dht.wire import MAX_ADDRS_PER_PEER, MAX_PEERS_PER_MESSAGE, parse_peers

    good = Identity.generate().peer_id.to_bytes()
    msg = Message(type=Message.FIND_NODE)
    entry = msg.closerPeers.add()
    entry.id = good
    entry.addrs.extend([b"\xff\xfe garbage", Multiaddr("/ip4/127.0.0.1/tcp/4001").to_bytes(), b"\x04" * 400])
    entry.addrs.extend([Multiaddr(f"/ip4/127.0.0.1/tcp/{5000 + i}").to_bytes() for i in range(40)])
    bad = msg.closerPeers.add()
    bad.id = b""
    for _ in range(100):
        msg.closerPeers.add().id = Identity.generate().peer_id.to_bytes()
    parsed = parse_peers(msg.closerPeers)
    assert parsed[0].peer == good
    assert str(parsed[0].addrs[0]) == "/ip4/127.0.0.1/tcp/4001"
    assert len(parsed[0].addrs) <= MAX_ADDRS_PER_PEER
    assert all(p.peer for p in parsed)
    assert len(parsed) <= MAX_PEERS_PER_MESSAGE

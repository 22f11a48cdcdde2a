"""MergeState behaviour, including regressions for what crdt-merge 0.11.0 gets wrong."""

import dataclasses
import hashlib

import numpy as np
import pytest

from meshmerge.crdt import (
    Incomplete,
    MergeState,
    SchemaMismatch,
    TensorMismatch,
    digest_of_tensors,
    verify_tensors,
)
from meshmerge.crdt.signing import DOMAIN_HEADER
from meshmerge.proto.cbor import encode
from meshmerge.proto.messages import (
    ContributionHeader,
    SignedHeader,
    StateMessage,
    TensorEntry,
    loads_state,
)
from tests.crdt.factories import SHAPES, schema, signer, state, tensors


def exchange(a: MergeState, b: MergeState) -> None:
    """Full-state anti-entropy in both directions, through the wire format."""
    b.apply(loads_state(encode(a.full_state().to_obj())))
    a.apply(loads_state(encode(b.full_state().to_obj())))


def lookup(blobs: dict[bytes, dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    return blobs.get


def test_contribute_sign_verify_and_merge_linear() -> None:
    s = state()
    blobs = {}
    for k in range(3):
        sh = s.contribute(signer(k), tensors(k), weight=k + 1)
        blobs[sh.id] = tensors(k)
    merged = s.merged(lookup(blobs))
    w = np.array([1, 2, 3], dtype=np.float64) / 6
    order = [s.header(cid).author for cid in s.live_ids()]
    ks = [next(k for k in range(3) if signer(k).peer_id == a) for a in order]
    for name in SHAPES:
        acc = np.zeros(SHAPES[name])
        for k in ks:
            acc = acc + w[k] * tensors(k)[name].astype(np.float64)
        assert np.array_equal(merged[name], acc.astype(np.float32))


def test_dots_are_unique_across_replicas_and_a_removal_only_hits_its_own_dot() -> None:
    # crdt-merge tags with a per-process counter from 0, so a tombstone from one peer
    # deletes another peer's element. Our dot is (author peer id, seq), inside the signature.
    a, b = state(), state()
    ha = a.contribute(signer(1), tensors(1))
    hb = b.contribute(signer(2), tensors(2))
    assert ha.header.seq == hb.header.seq == 0
    assert ha.header.dot != hb.header.dot
    a.remove(signer(1), ha.id)
    exchange(a, b)
    assert a.live_ids() == b.live_ids() == [hb.id]


def test_removes_survive_the_wire() -> None:
    # crdt-merge loses a remove after its JSON round trip. Ours is a signed record.
    a = state()
    h = a.contribute(signer(1), tensors(1))
    a.remove(signer(1), h.id)
    fresh = state()
    fresh.apply(loads_state(encode(a.full_state().to_obj())))
    assert fresh.live_ids() == []
    # Applying the add again later (a stale peer re-gossips it) does not resurrect it.
    fresh.apply(StateMessage(a.set_id, adds=(h,)))
    assert fresh.live_ids() == []


def test_only_the_author_can_remove() -> None:
    a = state()
    h = a.contribute(signer(1), tensors(1))
    with pytest.raises(ValueError, match="only the author"):
        a.remove(signer(2), h.id)
    forged = state()
    forged.apply(a.full_state())
    removal = forged.remove(signer(1), h.id)
    evil = type(removal)(removal.target, signer(2).peer_id, removal.dots, removal.signature)
    report = a.apply(StateMessage(a.set_id, removals=(evil,)))
    assert report.rejected == ["removal names dots of another author"]
    assert a.live_ids() == [h.id]


def test_equivocation_convicts_exactly_the_author_everywhere() -> None:
    a, b = state(), state()
    honest = a.contribute(signer(2), tensors(2))
    h1 = a.contribute(signer(1), tensors(1), seq=5)
    h2 = b.contribute(signer(1), tensors(3), seq=5)  # same author, same seq, other content
    b.contribute(signer(1), tensors(4), seq=6)
    exchange(a, b)
    assert a.orset.convicted() == b.orset.convicted() == {signer(1).peer_id}
    assert a.live_ids() == b.live_ids() == [honest.id]
    assert a.root() == b.root()
    # The evidence alone convicts on a third replica that never saw both headers.
    c = state()
    c.apply(StateMessage(a.set_id, adds=(h1,)))
    proofs = tuple(a.orset.evidence.values())
    c.apply(StateMessage(a.set_id, evidence=proofs))
    assert c.live_ids() == []
    assert h2.id not in c.orset.adds


def test_tampered_header_or_tensor_is_detected() -> None:
    s = state()
    h = s.contribute(signer(1), tensors(1), weight=2)
    hdr = h.header
    for field, value in (("weight", 3), ("seq", 1), ("kind", "delta")):
        tampered = SignedHeader(dataclasses.replace(hdr, **{field: value}), h.signature)
        fresh = state()
        report = fresh.apply(StateMessage(s.set_id, adds=(tampered,)))
        assert report.rejected and "bad signature" in report.rejected[0], field
        assert fresh.live_ids() == []
    bad = tensors(1)
    bad["layer.0.bias"] = bad["layer.0.bias"].copy()
    bad["layer.0.bias"].view(np.uint32)[0] ^= 1
    with pytest.raises(TensorMismatch, match="layer.0.bias.*sha-256"):
        verify_tensors(hdr, bad)
    verify_tensors(hdr, tensors(1))


def test_schema_mismatch_is_rejected_with_a_reason() -> None:
    s = state()
    wrong = tensors(1)
    wrong["layer.0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(SchemaMismatch, match=r"layer\.0\.bias.*F32\[5\].*F32\[4\]"):
        s.contribute(signer(1), wrong)
    missing = tensors(1)
    del missing["layer.1.weight"]
    with pytest.raises(SchemaMismatch, match="missing.*layer.1.weight"):
        s.contribute(signer(1), missing)
    other = MergeState(schema("test/other"))
    h = other.contribute(signer(1), tensors(1))
    report = s.apply(StateMessage(s.set_id, adds=(h,)))
    assert "another merge set" in report.rejected[0]


def test_everything_that_shapes_the_bytes_is_replicated() -> None:
    # crdt-merge keeps seed and base outside the state: X.merge(Y) and Y.merge(X)
    # compare equal but resolve to different bytes. Here the strategy, its params and
    # the base are in the schema (whose hash is the set id) and the seed is the root.
    a = MergeState(schema(strategy="linear", params={"normalize": False}))
    b = MergeState(schema(strategy="linear", params={"normalize": False}))
    blobs = {}
    for k in range(4):
        target = a if k % 2 else b
        h = target.contribute(signer(k), tensors(k), weight=k + 1)
        blobs[h.id] = tensors(k)
    exchange(a, b)
    ma, mb = a.merged(blobs.get), b.merged(blobs.get)
    assert digest_of_tensors(ma) == digest_of_tensors(mb)
    # normalize=False from the schema took effect: the plain weighted sum
    ref = sum((k + 1) * tensors(k)["layer.0.bias"].astype(np.float64) for k in range(4))
    assert np.array_equal(ma["layer.0.bias"], np.asarray(ref, dtype=np.float32))
    assert schema(params={"normalize": False}).id != schema().id
    assert schema(kind="delta").id != schema().id


def test_merge_needs_every_live_contribution() -> None:
    s = state()
    h1 = s.contribute(signer(1), tensors(1))
    s.contribute(signer(2), tensors(2))
    with pytest.raises(Incomplete) as info:
        s.merged({h1.id: tensors(1)}.get)
    assert len(info.value.missing) == 1


def test_bf16_and_f16_merge() -> None:
    for dtype, np_dtype in (("F16", np.float16), ("BF16", np.uint16)):
        s = MergeState(schema(dtype=dtype))
        blobs = {}
        for k in range(2):
            t = {
                n: (a.astype(np.float16) if dtype == "F16" else (a.view(np.uint32) >> 16).astype(np.uint16))
                for n, a in tensors(k).items()
            }
            h = s.contribute(signer(k), t)
            blobs[h.id] = t
        merged = s.merged(blobs.get)
        assert all(v.dtype == np_dtype for v in merged.values())


def test_join_work_does_not_grow_with_state_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # crdt-merge re-sorts the whole state on every merge. Count the hashing and the
    # comparisons one add costs at two state sizes: they must not grow with n.
    import meshmerge.crdt.merkle as merkle_mod

    calls = {"n": 0}
    real_leaf = merkle_mod.leaf_hash

    def counting_leaf(item: bytes) -> bytes:
        calls["n"] += 1
        return real_leaf(item)

    monkeypatch.setattr(merkle_mod, "leaf_hash", counting_leaf)
    costs = []
    for n in (10, 2000):
        s = state()
        sig = signer(99)
        s.orset.root()
        for i in range(n):
            s.orset.add(_fake_signed(s, sig, i))
        s.root()
        calls["n"] = 0
        s.orset.add(_fake_signed(s, sig, n))
        costs.append(calls["n"])
    assert costs == [1, 1]


def _fake_signed(s: MergeState, sig, seq: int) -> SignedHeader:  # type: ignore[no-untyped-def]
    entries = tuple(
        TensorEntry(t.name, t.dtype, t.shape, 4 * int(np.prod(t.shape)), hashlib.sha256(b"%d" % seq).digest())
        for t in s.schema.tensors
    )
    header = ContributionHeader(s.set_id, sig.peer_id, seq, 1, "weights", entries)
    return SignedHeader(header, sig.sign(DOMAIN_HEADER, header.encoded))


def test_trusted_replay_skips_only_signature_checks() -> None:
    s = state()
    good = s.contribute(signer(1), tensors(1))
    forged = SignedHeader(good.header, bytes(64))
    fresh = state()
    assert fresh.apply(StateMessage(s.set_id, adds=(forged,))).rejected  # untrusted: refused
    replay = state()
    assert not replay.apply(StateMessage(s.set_id, adds=(forged,)), trusted=True).rejected
    other = MergeState(schema("test/other"))
    wrong_set = other.contribute(signer(1), tensors(1))
    assert replay.apply(
        StateMessage(s.set_id, adds=(wrong_set,)), trusted=True
    ).rejected  # schema still checked

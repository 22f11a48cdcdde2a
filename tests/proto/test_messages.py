import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.proto import cid
from meshmerge.proto.cbor import CodecError, decode, encode
from meshmerge.proto.messages import (
    ITEMSIZE,
    SetSchema,
    SignedHeader,
    StateMessage,
    loads_header,
    loads_state,
)
from meshmerge.proto.peerid import from_base58, to_base58
from tests.crdt.factories import schema, signer, state, tensors


def signed_header() -> SignedHeader:
    return state().contribute(signer(1), tensors(1), weight=3, meta={"step": 7})


def test_header_roundtrip_and_id_recomputed() -> None:
    sh = signed_header()
    again = loads_header(encode(sh.to_obj()))
    assert again == sh
    assert again.id == sh.id == cid.cid_of(sh.header.encoded)
    assert cid.from_text(cid.to_text(sh.id)) == sh.id


def test_peer_id_text_form_roundtrips() -> None:
    pid = signer(1).peer_id
    text = to_base58(pid)
    assert text.startswith("12D3KooW")
    assert from_base58(text) == pid


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("h", "seq"), 1.0, r"\$\.h\.seq: expected an unsigned integer, got float"),
        (("h", "weight"), 0, r"\$\.h\.weight: 0 outside"),
        (("h", "seq"), True, r"\$\.h\.seq: expected an unsigned integer, got bool"),
        (("h", "kind"), "gradients", r"\$\.h\.kind: unknown kind"),
        (("h", "v"), 2, r"\$\.h\.v: unsupported format version"),
        (("h", "author"), b"short", r"\$\.h\.author: expected an Ed25519 peer id"),
        (("h", "set"), b"\x00" * 36, r"\$\.h\.set: expected a dag-cbor"),
        (("h", "extra"), 1, r"\$\.h\.extra: unknown field"),
        (("s",), b"\x00" * 10, r"\$\.s: expected 64 bytes"),
    ],
)
def test_field_errors_name_the_field(path: tuple[str, ...], value: object, fragment: str) -> None:
    obj = signed_header().to_obj()
    if path[0] == "h":
        header = decode(obj["h"])
        header[path[1]] = value
        obj["h"] = encode(header)
    else:
        obj[path[0]] = value
    with pytest.raises(CodecError, match=fragment):
        loads_header(encode(obj))


def with_header(mutate) -> bytes:  # type: ignore[no-untyped-def]
    obj = signed_header().to_obj()
    header = decode(obj["h"])
    mutate(header)
    obj["h"] = encode(header)
    return encode(obj)


def test_manifest_checks() -> None:
    def grow(h: dict) -> None:
        h["tensors"][0]["size"] += 4

    def shape(h: dict) -> None:
        h["tensors"][1]["shape"] = [1.5]

    with pytest.raises(CodecError, match=r"\$\.h\.tensors\[0\]\.size: .* do not match"):
        loads_header(with_header(grow))
    with pytest.raises(CodecError, match="unique and sorted"):
        loads_header(with_header(lambda h: h["tensors"].reverse()))
    with pytest.raises(CodecError, match=r"shape\[0\]: expected an unsigned integer, got float"):
        loads_header(with_header(shape))


def test_embedded_header_must_itself_be_canonical() -> None:
    obj = signed_header().to_obj()
    obj["h"] = obj["h"] + b"\x00"
    with pytest.raises(CodecError, match=r"\$\.h@\d+: 1 trailing bytes"):
        loads_header(encode(obj))


def test_state_message_roundtrip_and_schema_binding() -> None:
    st_ = state()
    st_.contribute(signer(1), tensors(1))
    sh = st_.contribute(signer(2), tensors(2))
    st_.remove(signer(2), sh.id)
    msg = st_.full_state()
    again = loads_state(encode(msg.to_obj()))
    assert again == msg
    obj = msg.to_obj()
    obj["schema"]["name"] = "test/other"
    with pytest.raises(CodecError, match="schema does not hash to the set id"):
        loads_state(encode(obj))


def test_schema_roundtrip() -> None:
    s = schema(strategy="linear", params={"normalize": True})
    assert SetSchema.from_obj(decode(s.encoded)) == s
    assert s.id == cid.cid_of(s.encoded)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_state_messages_only_raise_codec_error(data: st.DataObject) -> None:
    st_ = state()
    st_.contribute(signer(1), tensors(1))
    raw = bytearray(encode(st_.full_state().to_obj()))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        msg = loads_state(bytes(raw))
    except CodecError:
        return
    assert isinstance(msg, StateMessage)


entry_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2**41),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(min_size=31, max_size=33),
    st.lists(st.integers(-1, 5), max_size=9),
    st.sampled_from(["F32", "BF16", "I8", "layer.w", "x y", 48, [3, 4]]),
)
VALID_ENTRY = {"name": "layer.w", "dtype": "F32", "shape": [3, 4], "size": 48, "sha256": bytes(32)}


@settings(max_examples=1000, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["name", "dtype", "shape", "size", "sha256", "other"]), entry_values, max_size=2
    ),
    st.sets(st.sampled_from(["name", "dtype", "shape", "size", "sha256"]), max_size=1),
    st.booleans(),
)
def test_fast_manifest_path_accepts_only_what_the_checked_path_accepts(
    changes: dict, dropped: set, with_digest: bool
) -> None:
    from meshmerge.proto import messages as m

    obj = {k: v for k, v in {**VALID_ENTRY, **changes}.items() if k not in dropped}
    if not with_digest:
        obj = {k: v for k, v in obj.items() if k not in ("size", "sha256") or k in changes}
    fast = m._fast_entries([obj], with_digest)
    try:
        checked = m.TensorEntry.from_obj(obj, "$", with_digest)
    except CodecError:
        checked = None
    assert fast == (None if checked is None else (checked,))


big_dims = st.one_of(
    st.integers(-(2**64), 2**65), st.sampled_from([0, 1, 2**20, 2**40, 2**40 + 1, 2**63, 2**64 - 1])
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(big_dims, max_size=9),
    st.one_of(st.integers(-1, 2**65), st.sampled_from([0, 2**63, 2**64 - 1, 2**64])),
    st.sampled_from(sorted(ITEMSIZE)),
)
def test_fast_manifest_path_agrees_on_extreme_shapes_and_sizes(shape: list, size: int, dtype: str) -> None:
    from meshmerge.proto import messages as m

    numel = math.prod(d for d in shape) if shape else 1
    for size_ in (size, numel * ITEMSIZE[dtype]):
        obj = {"name": "w", "dtype": dtype, "shape": shape, "size": size_, "sha256": bytes(32)}
        try:
            checked: tuple | None = (m.TensorEntry.from_obj(obj, "$", True),)
        except CodecError:
            checked = None
        assert m._fast_entries([obj], True) == checked


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x80), min_size=0, max_size=4),
        max_size=5,
    )
)
def test_fast_manifest_path_agrees_on_names_and_order(names: list[str]) -> None:
    from meshmerge.proto import messages as m

    raw = [{"name": n, "dtype": "F32", "shape": [], "size": 4, "sha256": bytes(32)} for n in names]
    try:
        checked: tuple | None = tuple(m.TensorEntry.from_obj(t, "$", True) for t in raw)
        if any(a.name >= b.name for a, b in itertools.pairwise(checked)):
            checked = None
    except CodecError:
        checked = None
    assert m._fast_entries(raw, True) == checked

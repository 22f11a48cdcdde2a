"""Typed, versioned messages of the replicated merge state.

Each class converts to a plain CBOR value (``to_obj``) and back
(``from_obj``); ``from_obj`` checks every field's type and bounds and raises
:class:`CodecError` naming the field, so nothing downstream sees a float
where an integer belongs or an unbounded list. Ids are always recomputed from
the canonical bytes, never read from the wire.

Messages carry signatures as opaque bytes; verifying them is the crdt layer's
job (it owns the keys and the domain separation).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final, TypeVar

import meshmerge.cext.manifest as _cmanifest
from meshmerge.proto.cbor import DEFAULT_LIMITS, CodecError, Limits, decode, encode
from meshmerge.proto.cid import CID_LEN, PREFIX, cid_of
from meshmerge.proto.peerid import ED25519_PEER_ID_PREFIX, PEER_ID_LEN

FORMAT_VERSION: Final = 1
KINDS: Final = ("delta", "lora", "weights")
ITEMSIZE: Final = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MAX_TENSORS: Final = 65_536
MAX_DIMS: Final = 8
MAX_DIM: Final = 1 << 40
MAX_META_ENTRIES: Final = 32
MAX_META_VALUE: Final = 1024
MAX_PARAMS_ENTRIES: Final = 64
MAX_DOTS: Final = 64
MAX_OPS: Final = 100_000
SIGNATURE_LEN: Final = 64
MAX_EMBEDDED: Final = 4 * 1024 * 1024
T = TypeVar("T")
_SET_NAME = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}")
MAX_TENSOR_NAME: Final = 512
_TENSOR_NAME = re.compile(r"[\x21-\x7e]{1,512}")


class _Fields:
    """Reads typed fields out of a decoded map, naming the field on error."""

    __slots__ = ("obj", "path")

    def __init__(self, obj: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        if not isinstance(obj, dict):
            raise CodecError(path, f"expected a map, got {type(obj).__name__}")
        for key in obj:
            if key not in required and key not in optional:
                raise CodecError(f"{path}.{key}", "unknown field")
        for key in required:
            if key not in obj:
                raise CodecError(f"{path}.{key}", "missing field")
        self.obj = obj
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return key in self.obj

    def uint(self, key: str, maximum: int = 2**64 - 1, minimum: int = 0) -> int:
        return _uint(self.obj[key], self.at(key), maximum, minimum)

    def text(self, key: str, pattern: re.Pattern[str] | None = None, max_len: int = 1024) -> str:
        value = self.obj[key]
        if not isinstance(value, str):
            raise CodecError(self.at(key), f"expected a text string, got {type(value).__name__}")
        if len(value) > max_len or (pattern is not None and not pattern.fullmatch(value)):
            raise CodecError(self.at(key), f"invalid value {value[:64]!r}")
        return value

    def bytes_(self, key: str, length: int) -> bytes:
        value = self.obj[key]
        if not isinstance(value, bytes):
            raise CodecError(self.at(key), f"expected a byte string, got {type(value).__name__}")
        if len(value) != length:
            raise CodecError(self.at(key), f"expected {length} bytes, got {len(value)}")
        return value

    def blob(self, key: str, max_len: int = MAX_EMBEDDED) -> bytes:
        value = self.obj[key]
        if not isinstance(value, bytes):
            raise CodecError(
                self.at(key), f"expected an embedded message (byte string), got {type(value).__name__}"
            )
        if len(value) > max_len:
            raise CodecError(self.at(key), f"{len(value)} bytes exceed the limit of {max_len}")
        return value

    def list_(self, key: str, max_len: int) -> list[Any]:
        value = self.obj[key]
        if not isinstance(value, list):
            raise CodecError(self.at(key), f"expected an array, got {type(value).__name__}")
        if len(value) > max_len:
            raise CodecError(self.at(key), f"{len(value)} entries exceed the limit of {max_len}")
        return value

    def version(self) -> None:
        if self.uint("v", maximum=2**16) != FORMAT_VERSION:
            raise CodecError(self.at("v"), f"unsupported format version (this node speaks {FORMAT_VERSION})")


def _nested(raw: bytes, path: str) -> Any:
    """Decode an embedded signed payload, reporting errors under its field."""
    try:
        return decode(raw)
    except CodecError as exc:
        raise CodecError(f"{path}{exc.field.removeprefix('$')}", exc.reason) from None


def _uint(value: Any, path: str, maximum: int = 2**64 - 1, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(path, f"expected an unsigned integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise CodecError(path, f"{value} outside [{minimum}, {maximum}]")
    return value


def _peer_id(value: Any, path: str) -> bytes:
    ok = isinstance(value, bytes) and len(value) == PEER_ID_LEN and value.startswith(ED25519_PEER_ID_PREFIX)
    if not ok:
        raise CodecError(path, "expected an Ed25519 peer id (38 bytes)")
    return bytes(value)


def _cid(value: Any, path: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != CID_LEN or not value.startswith(PREFIX):
        raise CodecError(path, "expected a dag-cbor sha2-256 CIDv1 (36 bytes)")
    return value


def _small_map(value: Any, path: str, max_entries: int, allow_float: bool) -> dict[str, Any]:
    """A flat map of text keys to scalars (and, for params, lists of scalars)."""
    if not isinstance(value, dict):
        raise CodecError(path, f"expected a map, got {type(value).__name__}")
    if len(value) > max_entries:
        raise CodecError(path, f"{len(value)} entries exceed the limit of {max_entries}")
    scalars: tuple[type, ...] = (int, str, bytes, bool, float) if allow_float else (int, str, bytes, bool)
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise CodecError(path, f"key {key!r} must be a text string of 1..64 characters")
        items = item if isinstance(item, list) and allow_float else [item]
        for scalar in items:
            if scalar is not None and not isinstance(scalar, scalars):
                raise CodecError(f"{path}.{key}", f"type {type(scalar).__name__} not allowed here")
            if isinstance(scalar, (str, bytes)) and len(scalar) > MAX_META_VALUE:
                raise CodecError(f"{path}.{key}", f"value longer than {MAX_META_VALUE}")
        if isinstance(item, list) and len(item) > MAX_META_VALUE:
            raise CodecError(f"{path}.{key}", f"list longer than {MAX_META_VALUE}")
    return value


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a manifest. ``size`` and ``sha256`` are absent in a schema."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int = 0
    sha256: bytes = b""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_obj(self, with_digest: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if with_digest:
            obj["size"] = self.size
            obj["sha256"] = self.sha256
        return obj

    @classmethod
    def from_obj(cls, obj: Any, path: str, with_digest: bool = True) -> TensorEntry:
        """The checked path: every rule, and an error naming the failing field."""
        keys = ("name", "dtype", "shape", "size", "sha256") if with_digest else ("name", "dtype", "shape")
        f = _Fields(obj, path, keys)
        name = f.text("name", _TENSOR_NAME, MAX_TENSOR_NAME)
        dtype = f.text("dtype")
        if dtype not in ITEMSIZE:
            raise CodecError(f.at("dtype"), f"unsupported dtype {dtype!r}; use one of {sorted(ITEMSIZE)}")
        dims = f.list_("shape", MAX_DIMS)
        shape = tuple(_uint(d, f"{f.at('shape')}[{i}]", MAX_DIM) for i, d in enumerate(dims))
        entry = cls(name, dtype, shape)
        if not with_digest:
            return entry
        size = f.uint("size")
        if size != entry.numel * ITEMSIZE[dtype]:
            raise CodecError(f.at("size"), f"{size} bytes do not match {dtype} shape {list(shape)}")
        return cls(name, dtype, shape, size, f.bytes_("sha256", 32))


def _fast_entries(raw: list[Any], with_digest: bool) -> tuple[TensorEntry, ...] | None:
    """The entries when all pass the rules of the checked path, else None (Cython; see cext/manifest.pyx)."""
    return _cmanifest.entries(raw, with_digest, ITEMSIZE, TensorEntry, MAX_DIMS, MAX_DIM, MAX_TENSOR_NAME)


def _manifest(f: _Fields, key: str, with_digest: bool) -> tuple[TensorEntry, ...]:
    raw = f.list_(key, MAX_TENSORS)
    if not raw:
        raise CodecError(f.at(key), "a manifest lists at least one tensor")
    fast = _fast_entries(raw, with_digest)
    if fast is not None:
        return fast
    # Something is wrong: the checked path finds it and names the field.
    entries = tuple(TensorEntry.from_obj(t, f"{f.at(key)}[{i}]", with_digest) for i, t in enumerate(raw))
    names = [e.name for e in entries]
    if any(a >= b for a, b in itertools.pairwise(names)):
        raise CodecError(f.at(key), "tensor names must be unique and sorted")
    return entries


@dataclass(frozen=True)
class BaseModel:
    """The base model deltas are taken against: a name and its tensors' digests."""

    name: str
    tensors: tuple[TensorEntry, ...]

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "tensors": [t.to_obj() for t in self.tensors]}

    @classmethod
    def from_obj(cls, obj: Any, path: str) -> BaseModel:
        f = _Fields(obj, path, ("name", "tensors"))
        return cls(f.text("name", max_len=256), _manifest(f, "tensors", True))


@dataclass(frozen=True)
class SetSchema:
    """The record that defines a merge set; its CID is the set id.

    Contributions name the set by this id, so the schema (tensor layout,
    kind, default strategy and parameters, base model) is fixed by content
    and two replicas can never disagree on it.
    """

    name: str
    kind: str
    tensors: tuple[TensorEntry, ...]
    strategy: str = "linear"
    params: Mapping[str, Any] = field(default_factory=dict)
    base: BaseModel | None = None

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "tensors": [t.to_obj(with_digest=False) for t in self.tensors],
            "strategy": self.strategy,
            "params": dict(self.params),
        }
        if self.base is not None:
            obj["base"] = self.base.to_obj()
        return obj

    @classmethod
    def from_obj(cls, obj: Any, path: str = "$") -> SetSchema:
        f = _Fields(obj, path, ("v", "name", "kind", "tensors", "strategy", "params"), ("base",))
        f.version()
        kind = f.text("kind")
        if kind not in KINDS:
            raise CodecError(f.at("kind"), f"unknown kind {kind!r}; use one of {list(KINDS)}")
        base = BaseModel.from_obj(obj["base"], f.at("base")) if f.has("base") else None
        return cls(
            name=f.text("name", _SET_NAME, 128),
            kind=kind,
            tensors=_manifest(f, "tensors", False),
            strategy=f.text("strategy", re.compile(r"[a-z0-9_]{1,64}"), 64),
            params=_small_map(obj["params"], f.at("params"), MAX_PARAMS_ENTRIES, allow_float=True),
            base=base,
        )

    @cached_property
    def encoded(self) -> bytes:
        return encode(self.to_obj())

    @cached_property
    def id(self) -> bytes:
        return cid_of(self.encoded)


@dataclass(frozen=True)
class ContributionHeader:
    """What an author signs about one contribution (see DESIGN.md, data model).

    ``(author, seq)`` is the contribution's dot: unique per author, so two
    different headers with the same pair are equivocation.
    """

    set_id: bytes
    author: bytes
    seq: int
    weight: int
    kind: str
    tensors: tuple[TensorEntry, ...]
    base: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "set": self.set_id,
            "author": self.author,
            "seq": self.seq,
            "weight": self.weight,
            "kind": self.kind,
            "tensors": [t.to_obj() for t in self.tensors],
            "meta": dict(self.meta),
        }
        if self.base is not None:
            obj["base"] = self.base
        return obj

    @classmethod
    def from_obj(cls, obj: Any, path: str = "$") -> ContributionHeader:
        f = _Fields(obj, path, ("v", "set", "author", "seq", "weight", "kind", "tensors", "meta"), ("base",))
        f.version()
        kind = f.text("kind")
        if kind not in KINDS:
            raise CodecError(f.at("kind"), f"unknown kind {kind!r}; use one of {list(KINDS)}")
        return cls(
            set_id=_cid(obj["set"], f.at("set")),
            author=_peer_id(obj["author"], f.at("author")),
            seq=f.uint("seq"),
            weight=f.uint("weight", maximum=2**53, minimum=1),
            kind=kind,
            tensors=_manifest(f, "tensors", True),
            base=f.text("base", max_len=256) if f.has("base") else None,
            meta=_small_map(obj["meta"], f.at("meta"), MAX_META_ENTRIES, allow_float=False),
        )

    @cached_property
    def encoded(self) -> bytes:
        return encode(self.to_obj())

    @cached_property
    def id(self) -> bytes:
        """The contribution id: CIDv1 of the canonical header."""
        return cid_of(self.encoded)

    @property
    def dot(self) -> tuple[bytes, int]:
        return (self.author, self.seq)


@dataclass(frozen=True)
class SignedHeader:
    """A header and the author's signature over its canonical bytes.

    On the wire the header travels as an embedded byte string (as in
    COSE_Sign1), so the receiver checks the signature over exactly the bytes
    it received and hashes those same bytes into the id: nothing is
    re-encoded on the way in.
    """

    header: ContributionHeader
    signature: bytes

    @property
    def id(self) -> bytes:
        return self.header.id

    def to_obj(self) -> dict[str, Any]:
        return {"h": self.header.encoded, "s": self.signature}

    @classmethod
    def from_obj(cls, obj: Any, path: str = "$") -> SignedHeader:
        f = _Fields(obj, path, ("h", "s"))
        raw = f.blob("h")
        header = ContributionHeader.from_obj(_nested(raw, f.at("h")), f.at("h"))
        header.__dict__["encoded"] = raw  # proven canonical, so identical to a re-encode
        return cls(header, f.bytes_("s", SIGNATURE_LEN))


@dataclass(frozen=True)
class Removal:
    """The author's signed retraction of the dots it observed for one contribution."""

    target: bytes
    author: bytes
    dots: tuple[tuple[bytes, int], ...]
    signature: bytes = b""

    def unsigned_obj(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "target": self.target,
            "author": self.author,
            "dots": [[r, c] for r, c in self.dots],
        }

    def to_obj(self) -> dict[str, Any]:
        return {"r": self.encoded_unsigned, "s": self.signature}

    @classmethod
    def from_obj(cls, obj: Any, path: str = "$") -> Removal:
        outer = _Fields(obj, path, ("r", "s"))
        raw = outer.blob("r")
        inner = _nested(raw, outer.at("r"))
        f = _Fields(inner, outer.at("r"), ("v", "target", "author", "dots"))
        f.version()
        dots = []
        raw_dots = f.list_("dots", MAX_DOTS)
        if not raw_dots:
            raise CodecError(f.at("dots"), "a removal names at least one dot")
        for i, d in enumerate(raw_dots):
            p = f"{f.at('dots')}[{i}]"
            if not isinstance(d, list) or len(d) != 2:
                raise CodecError(p, "a dot is [replica peer id, counter]")
            dots.append((_peer_id(d[0], p + "[0]"), _uint(d[1], p + "[1]")))
        if dots != sorted(set(dots)):
            raise CodecError(f.at("dots"), "dots must be unique and sorted")
        removal = cls(
            target=_cid(inner["target"], f.at("target")),
            author=_peer_id(inner["author"], f.at("author")),
            dots=tuple(dots),
            signature=outer.bytes_("s", SIGNATURE_LEN),
        )
        removal.__dict__["encoded_unsigned"] = raw
        return removal

    @cached_property
    def encoded_unsigned(self) -> bytes:
        return encode(self.unsigned_obj())

    @cached_property
    def key(self) -> bytes:
        """Identity of this removal in the grow-only set of removals."""
        return cid_of(encode(self.to_obj()))


@dataclass(frozen=True)
class Equivocation:
    """Proof that ``author`` signed two different headers with the same seq.

    Anyone can check it from the two signed headers alone. ``first`` has the
    smaller id, so the same proof always has the same bytes.
    """

    first: SignedHeader
    second: SignedHeader

    @classmethod
    def of(cls, a: SignedHeader, b: SignedHeader) -> Equivocation:
        return cls(a, b) if a.id < b.id else cls(b, a)

    @property
    def author(self) -> bytes:
        return self.first.header.author

    def to_obj(self) -> dict[str, Any]:
        return {"v": FORMAT_VERSION, "t": "equivocation", "a": self.first.to_obj(), "b": self.second.to_obj()}

    @classmethod
    def from_obj(cls, obj: Any, path: str = "$") -> Equivocation:
        f = _Fields(obj, path, ("v", "t", "a", "b"))
        f.version()
        if f.text("t") != "equivocation":
            raise CodecError(f.at("t"), "unknown evidence type")
        a = SignedHeader.from_obj(obj["a"], f.at("a"))
        b = SignedHeader.from_obj(obj["b"], f.at("b"))
        if not a.id < b.id:
            raise CodecError(path, "evidence headers must be distinct and ordered by id")
        if a.header.dot != b.header.dot:
            raise CodecError(path, "evidence headers do not share author and seq")
        return cls(a, b)

    @cached_property
    def key(self) -> bytes:
        return cid_of(encode(self.to_obj()))


@dataclass(frozen=True)
class StateMessage:
    """A delta (some operations) or a full state of one merge set.

    Both have the same shape because every part of the state is a grow-only
    set and joining is set union: a full state is just the largest delta.
    ``schema`` travels with full states so a new replica can join from one.
    """

    set_id: bytes
    adds: tuple[SignedHeader, ...] = ()
    removals: tuple[Removal, ...] = ()
    evidence: tuple[Equivocation, ...] = ()
    schema: SetSchema | None = None
    full: bool = False

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "t": "state" if self.full else "delta",
            "set": self.set_id,
            "adds": [a.to_obj() for a in self.adds],
            "removals": [r.to_obj() for r in self.removals],
            "evidence": [e.to_obj() for e in self.evidence],
        }
        if self.schema is not None:
            obj["schema"] = self.schema.to_obj()
        return obj

    @classmethod
    def from_obj(cls, obj: Any, path: str = "$") -> StateMessage:
        f = _Fields(obj, path, ("v", "t", "set", "adds", "removals", "evidence"), ("schema",))
        f.version()
        kind = f.text("t")
        if kind not in ("state", "delta"):
            raise CodecError(f.at("t"), f"unknown state message type {kind!r}")
        schema = SetSchema.from_obj(obj["schema"], f.at("schema")) if f.has("schema") else None
        set_id = _cid(obj["set"], f.at("set"))
        if schema is not None and schema.id != set_id:
            raise CodecError(f.at("schema"), "schema does not hash to the set id")
        return cls(
            set_id=set_id,
            adds=_each(f, "adds", SignedHeader.from_obj),
            removals=_each(f, "removals", Removal.from_obj),
            evidence=_each(f, "evidence", Equivocation.from_obj),
            schema=schema,
            full=kind == "state",
        )


def _each(f: _Fields, key: str, parse: Callable[[Any, str], T]) -> tuple[T, ...]:
    return tuple(parse(item, f"{f.at(key)}[{i}]") for i, item in enumerate(f.list_(key, MAX_OPS)))


def dumps(message: StateMessage | SignedHeader | SetSchema | Removal | Equivocation) -> bytes:
    return encode(message.to_obj())


def loads_state(data: bytes, limits: Limits = DEFAULT_LIMITS) -> StateMessage:
    return StateMessage.from_obj(decode(data, limits))


def loads_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SignedHeader:
    return SignedHeader.from_obj(decode(data, limits))


def loads_schema(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SetSchema:
    return SetSchema.from_obj(decode(data, limits))

"""Signed peer records carried in GossipSub peer exchange (PX).

A PRUNE may list other peers the pruned node could connect to instead. Only a
*signed* peer record (RFC 0003: an ``Envelope`` in the ``libp2p-peer-record``
domain with payload type ``0x0301``, i.e. ``/libp2p/routing-state-record``)
makes such an entry worth dialling: the addresses are then vouched for by the
listed peer itself, not by the peer that pruned us, which could otherwise point
us (and every node it prunes) at any address it likes.

:func:`open_px_record` checks a record exactly as go-libp2p-pubsub and
go-libp2p's certified address book do together: the envelope parses, its
signature verifies in the peer-record domain, the payload is a peer record,
the signing key *is* the record's peer id, and that peer id is the one the PX
entry names. Parsing and signature checks are py-libp2p's (``libp2p.peer``);
this module adds the identity checks and bounds, and turns every failure into
one typed error whose message says what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import multiaddr
from libp2p.peer.envelope import Envelope, unmarshal_envelope
from libp2p.peer.id import ID
from libp2p.peer.peer_record import (
    PEER_RECORD_ENVELOPE_DOMAIN,
    PEER_RECORD_ENVELOPE_PAYLOAD_TYPE,
)

__all__ = ["MAX_RECORD_ADDRS", "MAX_RECORD_BYTES", "PeerRecordError", "PxRecord", "open_px_record"]

MAX_RECORD_BYTES = 4096
"""Same bound as the RPC codec's ``max_peer_record_len``; checked again so this module stands alone."""
MAX_RECORD_ADDRS = 32
"""A record listing more addresses than this is refused rather than trimmed (a real host has a few)."""


class PeerRecordError(ValueError):
    """A PX signed peer record is unusable; the message says why."""


@dataclass(frozen=True)
class PxRecord:
    """A verified record: the peer it names, the addresses it signed, and the envelope to store."""

    peer_id: ID
    addrs: tuple[multiaddr.Multiaddr, ...]
    seq: int
    envelope: Envelope


def open_px_record(data: bytes, expected_peer: bytes) -> PxRecord:
    """Verify ``data`` as the signed peer record of ``expected_peer``; raise :class:`PeerRecordError`."""
    if len(data) > MAX_RECORD_BYTES:
        raise PeerRecordError(f"record is {len(data)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        env = unmarshal_envelope(data)
    except Exception as exc:
        raise PeerRecordError(f"not a signed envelope ({exc.__class__.__name__}: {exc})") from exc
    if env.payload_type != PEER_RECORD_ENVELOPE_PAYLOAD_TYPE:
        raise PeerRecordError(f"payload type {env.payload_type.hex()} is not a peer record (0301)")
    try:
        env.validate(PEER_RECORD_ENVELOPE_DOMAIN)
    except Exception as exc:
        raise PeerRecordError("envelope signature does not verify") from exc
    try:
        rec = env.record()
        record_peer = rec.peer_id
        addrs = tuple(rec.addrs)
    except Exception as exc:
        raise PeerRecordError(f"payload is not a peer record ({exc.__class__.__name__}: {exc})") from exc
    try:
        signer = ID.from_pubkey(env.public_key)
    except Exception as exc:
        raise PeerRecordError(f"signing key has no peer id ({exc})") from exc
    if signer != record_peer:
        raise PeerRecordError(f"record for {record_peer} is signed by {signer}, not by that peer")
    if record_peer.to_bytes() != expected_peer:
        raise PeerRecordError(f"record is for {record_peer}, but the PX entry names {_b58(expected_peer)}")
    if len(addrs) > MAX_RECORD_ADDRS:
        raise PeerRecordError(f"record lists {len(addrs)} addresses, limit {MAX_RECORD_ADDRS}")
    return PxRecord(record_peer, addrs, int(rec.seq), env)


def _b58(peer: bytes) -> str:
    try:
        return ID(peer).to_base58()
    except Exception:
        return peer.hex()

"""Kademlia DHT on the `/ipfs/kad/1.0.0` wire protocol: sans-I/O core + trio driver.

Why our own rather than wrapping py-libp2p 0.8.1's `KadDHT`: its shortfalls sit in
the 600-line inbound handler and the query code (keys are `str`; `get_value`
returns the local copy without a lookup; a normal stream close is logged as a
WARNING and answered with a reset; validation is off by default; no routing-table
diversity; inbound capped at a fixed 12). Fixing them means rewriting those
parts anyway, so we keep the protobuf wire format (its generated `kademlia_pb2`)
and write the rules as small state machines (`routing`, `lookup`, `store`,
`records`) that tests drive without sockets, plus one trio driver (`service`).
"""

from . import persist
from .records import (
    MeshmergeRecordValidator,
    NamespacedValidator,
    PublicKeyValidator,
    RecordRejected,
    SignedRecord,
    Validator,
    meshmerge_key,
    pk_key,
)
from .service import DHTConfig, DHTError, DHTMode, KademliaDHT, running_dht

__all__ = [
    "DHTConfig",
    "DHTError",
    "DHTMode",
    "KademliaDHT",
    "MeshmergeRecordValidator",
    "NamespacedValidator",
    "PublicKeyValidator",
    "RecordRejected",
    "SignedRecord",
    "Validator",
    "meshmerge_key",
    "persist",
    "pk_key",
    "running_dht",
]

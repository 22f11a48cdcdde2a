"""Durable storage of a meshmerge node: merge sets, op logs, snapshots, blobs, seqs.

Synchronous and thread-safe; the daemon calls it from worker threads
(``trio.to_thread.run_sync``). See :mod:`meshmerge.daemon.store.core` for the
theory of operation and :mod:`meshmerge.daemon.store.records` for the on-disk
record format.
"""

from meshmerge.daemon.store.blobs import BlobUsage, BlobWriter, CollectionMark, CollectionReport
from meshmerge.daemon.store.core import Store, StoreCounters
from meshmerge.daemon.store.errors import BlobRejected, CorruptRecord, QuotaExceeded, StoreError, StoreLocked
from meshmerge.daemon.store.limits import StoreLimits

__all__ = [
    "BlobRejected",
    "BlobUsage",
    "BlobWriter",
    "CollectionMark",
    "CollectionReport",
    "CorruptRecord",
    "QuotaExceeded",
    "Store",
    "StoreCounters",
    "StoreError",
    "StoreLimits",
    "StoreLocked",
]

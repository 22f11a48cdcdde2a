"""Named bounds on everything the store keeps (DESIGN principle 3)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from meshmerge.proto.cbor import DEFAULT_LIMITS
from meshmerge.proto.messages import MAX_EMBEDDED

#: Smallest record limit that still fits any single valid operation: an
#: equivocation proof carries two embedded headers of up to MAX_EMBEDDED each.
MIN_RECORD_BYTES = 2 * MAX_EMBEDDED + 64 * 1024


@dataclass(frozen=True)
class StoreLimits:
    """Size and count limits of one store. :meth:`validate` names any bad field.

    Record and blob limits bound what a single call can make the store
    allocate; the op-log limit bounds replay time (``maybe_snapshot`` folds
    the log into a snapshot once it grows past it).
    """

    #: Largest safetensors blob accepted, in bytes (whole file, header included).
    max_blob_bytes: int = 16 * 1024**3
    #: Largest payload of one op-log/snapshot record, in bytes. Also the CBOR
    #: decode limit on replay; bigger messages are split into several records.
    max_record_bytes: int = DEFAULT_LIMITS.max_message_bytes
    #: Most operations (adds + removals + evidence) written into one record.
    max_ops_per_record: int = 10_000
    #: ``maybe_snapshot`` snapshots a set once its op log is larger than this.
    max_oplog_bytes_before_snapshot: int = 64 * 1024**2
    #: Most merge sets in one store.
    max_sets: int = 4096
    #: Most local authors whose sequence numbers one set tracks (a node has
    #: one identity; a few more allow key rotation).
    max_seq_authors: int = 64
    #: Most concurrently open resumable blob writers.
    max_blob_writers: int = 256
    #: Room allowed for the safetensors JSON header per tensor, on top of
    #: ``max_blob_header_base``; bounds a blob's size before it is read.
    max_blob_header_per_tensor: int = 1024
    max_blob_header_base: int = 64 * 1024
    #: Most bytes all published blobs together may take, counting the full
    #: size of blobs being written; None for no quota. A blob that would go
    #: over is refused (QuotaExceeded) before a byte of it is written.
    blob_quota_bytes: int | None = None

    def validate(self) -> StoreLimits:
        """Return self, or raise ValueError naming the field and the rule."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "blob_quota_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StoreLimits.{f.name} must be a positive integer, got {value!r}")
        if self.max_record_bytes > 2**32 - 1:
            raise ValueError(
                f"StoreLimits.max_record_bytes must fit the u32 record length (<= {2**32 - 1}), "
                f"got {self.max_record_bytes}"
            )
        if self.max_record_bytes < MIN_RECORD_BYTES:
            raise ValueError(
                f"StoreLimits.max_record_bytes must be at least {MIN_RECORD_BYTES} so any single "
                f"operation fits one record, got {self.max_record_bytes}"
            )
        return self

"""Errors raised by the store. Every message says what failed and where."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class StoreLocked(StoreError):
    """Another process (or another Store in this one) holds the data directory."""

    def __init__(self, data_dir: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "an unknown process"
        super().__init__(f"data directory {data_dir} is locked by {holder}; is another daemon running?")
        self.pid = pid


class CorruptRecord(StoreError):
    """A record or file header failed its checksum or framing rules.

    Internal: the store handles it (drops a torn tail, skips a damaged
    region, logs it) and callers of :class:`~meshmerge.daemon.store.Store`
    never see it, but the record codec raises it for its own callers.
    """


class BlobRejected(StoreError):
    """Tensor bytes do not match their contribution header (or break a limit).

    Raised before anything becomes visible, so a rejected blob leaves no
    trace in the store. For data from the network this is the sender's fault.
    """


class QuotaExceeded(StoreError):
    """Storing a blob would take the store past ``StoreLimits.blob_quota_bytes``.

    Not the sender's fault (unlike :class:`BlobRejected`): the node is full.
    Nothing was written; collecting garbage or raising the quota helps.
    """

    def __init__(self, what: str, need: int, used: int, reserved: int, quota: int) -> None:
        super().__init__(
            f"{what}: needs {need} bytes but blobs use {used} of the {quota}-byte quota "
            f"({reserved} more reserved by writes in progress); run `meshmerge gc` or raise "
            "[store] blob_quota_bytes"
        )
        self.need = need
        self.used = used
        self.reserved = reserved
        self.quota = quota

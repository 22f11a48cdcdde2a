"""Identity file: persistence, permissions, corruption, and the shared signing API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PublicKey

from meshmerge.daemon.identity import FILE_NAME, Identity, IdentityError, load, load_or_create, verify


def test_created_once_then_reloaded_with_mode_0600(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    path = tmp_path / FILE_NAME
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = load_or_create(tmp_path)
    assert again.seed == first.seed and again.peer_id == first.peer_id
    assert not [p for p in tmp_path.iterdir() if p.name != FILE_NAME]  # no temp file left


def test_same_key_for_libp2p_and_raw_signing(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path)
    sig = ident.sign(b"contribution header")
    assert len(ident.seed) == 32 and len(ident.public_key) == 32 and len(sig) == 64
    assert verify(ident.public_key, b"contribution header", sig)
    assert not verify(ident.public_key, b"tampered", sig)
    kp = ident.key_pair()
    assert kp.public_key.to_bytes() == ident.public_key
    assert Ed25519PublicKey.from_bytes(ident.public_key).verify(b"x", kp.private_key.sign(b"x"))
    assert "seed" not in repr(ident) and ident.seed.hex() not in repr(ident)


def test_wrong_permissions_are_refused_not_fixed(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    path = tmp_path / FILE_NAME
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="must be 0600"):
        load_or_create(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:40], "must be 68 bytes"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:], "does not match"),
    ],
)
def test_corrupt_file_is_a_clear_error_and_never_replaced(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    load_or_create(tmp_path)
    path = tmp_path / FILE_NAME
    bad = mutate(path.read_bytes())
    path.write_bytes(bad)
    with pytest.raises(IdentityError, match=message):
        load_or_create(tmp_path)
    assert path.read_bytes() == bad


def test_seed_length_checked() -> None:
    with pytest.raises(IdentityError):
        Identity(b"short")
    with pytest.raises(FileNotFoundError):
        load(Path("/nonexistent/identity.key"))

"""The node's Ed25519 identity, persisted in the data directory.

One key serves two purposes: it is the libp2p host key (peer id, Noise
handshake, signed peer records) and the key that signs contributions, so a
contribution's author *is* a peer id. The file holds the raw 32-byte seed; we
never hand the libp2p key object to crdt code, only `seed` / `sign` / `public_key`.

File format (68 bytes): magic ``MMK1`` | 32-byte seed | 32-byte public key.
The stored public key lets a load detect a corrupt or truncated file instead of
silently becoming a different peer.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

MAGIC = b"MMK1"
FILE_NAME = "identity.key"
FILE_SIZE = len(MAGIC) + 32 + 32
SEED_SIZE = 32


class IdentityError(Exception):
    """The identity file is missing, unreadable, corrupt or too widely readable."""


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key usable both as a libp2p host key and as a raw signer."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise IdentityError(f"identity seed must be {SEED_SIZE} bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(SigningKey.generate()))

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return bytes(self.signing_key.verify_key)

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature (pure Ed25519, no prehash)."""
        return self.signing_key.sign(message).signature

    def key_pair(self) -> KeyPair:
        private = Ed25519PrivateKey(self.signing_key)
        return KeyPair(private, private.get_public_key())

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(Ed25519PublicKey(self.signing_key.verify_key))

    def __repr__(self) -> str:  # never print the seed
        return f"Identity(peer_id={self.peer_id})"


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Check a detached Ed25519 signature made by `Identity.sign`."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except BadSignatureError:
        return False
    return True


def _encode(identity: Identity) -> bytes:
    return MAGIC + identity.seed + identity.public_key


def _decode(path: Path, data: bytes) -> Identity:
    if len(data) != FILE_SIZE:
        raise IdentityError(f"{path}: identity file must be {FILE_SIZE} bytes, found {len(data)} (corrupt?)")
    if data[:4] != MAGIC:
        raise IdentityError(f"{path}: not a meshmerge identity file (bad magic {data[:4]!r})")
    identity = Identity(data[4:36])
    if identity.public_key != data[36:]:
        raise IdentityError(f"{path}: stored public key does not match the seed (corrupt file)")
    return identity


def _check_permissions(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"{path}: identity must be a regular file")
    if st.st_mode & 0o077:
        raise IdentityError(
            f"{path}: identity file mode is {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
            f"(run: chmod 600 {path})"
        )
    if st.st_uid != os.geteuid():
        raise IdentityError(f"{path}: identity file is owned by uid {st.st_uid}, not by us ({os.geteuid()})")


def save(identity: Identity, path: Path) -> None:
    """Write atomically: temp file (0600) in the same dir, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left over from a crash of an earlier process with our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, _encode(identity))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> Identity:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open identity file: {exc.strerror}") from exc
    try:
        _check_permissions(path, os.fstat(fd))
        data = os.read(fd, FILE_SIZE + 1)
    finally:
        os.close(fd)
    return _decode(path, data)


def load_or_create(data_dir: Path) -> Identity:
    """Load `<data_dir>/identity.key`, creating a fresh key only if the file does not exist.

    A file that exists but is bad is an error, never silently replaced: replacing
    it would change our peer id and orphan every contribution we signed.
    """
    path = data_dir / FILE_NAME
    try:
        return load(path)
    except FileNotFoundError:
        identity = Identity.generate()
        save(identity, path)
        return identity

"""libp2p `/noise` secure channel on trio, built on the sans-I/O `noise_state`.

Why our own: py-libp2p 0.8.1's Noise reads every frame with two awaited,
lock-guarded reads (length, then body), logs each frame with an f-string, and
encrypts through the pure-Python `noiseprotocol` wrapper. Ours reads whatever the
socket has, decrypts every whole frame in it in one pass (one AEAD call per
frame), and writes a burst of data as consecutive frames in ONE socket send.

Wire format (libp2p noise spec): every handshake and transport message is a
2-byte big-endian length followed by the Noise message. The handshake payload
(messages 2 and 3) is the `NoiseHandshakePayload` protobuf: ``identity_key``
(field 1, the libp2p public key protobuf) and ``identity_sig`` (field 2, the
identity key's signature over ``"noise-libp2p-static-key:" || static X25519 key``);
other fields (extensions) are skipped on read and not sent.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from libp2p.abc import IRawConnection, ISecureConn, ISecureTransport
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.peer.id import ID
from libp2p.security.base_session import BaseSession
from libp2p.security.exceptions import HandshakeFailure

from meshmerge.proto.varint import VarintError, encode_uvarint, read_uvarint

from .noise_state import MAX_MESSAGE, MAX_PLAINTEXT, CipherState, Handshake, NoiseError, public_bytes

log = logging.getLogger("meshmerge.transport")

PROTOCOL_ID = TProtocol("/noise")
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
RECV_SIZE = 256 * 1024
"""Bytes asked of the socket per receive: several full Noise frames at once."""
_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class NoiseProtocolError(HandshakeFailure):
    """The peer sent something the Noise channel cannot accept; the message says what."""


def _socket_stream(raw: Any) -> trio.SocketStream | None:
    """The trio socket under py-libp2p's TCP `RawConnection`, to skip its locks."""
    inner = getattr(getattr(raw, "stream", None), "stream", None)
    return inner if isinstance(inner, trio.SocketStream) else None


class _Wire:
    """Byte-stream side of the channel: a receive buffer and raw send/receive."""

    __slots__ = ("buf", "raw", "sock")

    def __init__(self, raw: IRawConnection) -> None:
        self.raw = raw
        self.sock = _socket_stream(raw)
        self.buf = bytearray()

    async def receive(self) -> bytes:
        """Some bytes from the peer; b"" at end of stream or on a closed socket."""
        if self.sock is not None:
            try:
                return await self.sock.receive_some(RECV_SIZE)
            except _CLOSED:
                return b""
        try:
            return await self.raw.read(RECV_SIZE)
        except ConnectionClosedError:
            return b""

    async def send(self, data: bytes) -> None:
        if self.sock is not None:
            try:
                await self.sock.send_all(data)
            except _CLOSED as exc:
                raise ConnectionClosedError(f"connection closed while sending: {exc!r}") from exc
            return
        await self.raw.write(data)

    async def read_frame(self) -> bytes:
        """One length-prefixed message (handshake phase)."""
        while True:
            buf = self.buf
            if len(buf) >= 2:
                n = (buf[0] << 8) | buf[1]
                if len(buf) >= 2 + n:
                    msg = bytes(buf[2 : 2 + n])
                    del buf[: 2 + n]
                    return msg
            data = await self.receive()
            if not data:
                raise NoiseProtocolError("connection closed during the Noise handshake")
            buf += data


def encode_payload(identity_key: bytes, signature: bytes) -> bytes:
    return _field(1, identity_key) + _field(2, signature)


def _field(number: int, value: bytes) -> bytes:
    return bytes([number << 3 | 2]) + encode_uvarint(len(value)) + value


def decode_payload(data: bytes) -> tuple[bytes, bytes]:
    """(identity_key, identity_sig) from a `NoiseHandshakePayload`; NoiseProtocolError if malformed."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(data)

    def varint() -> int:
        nonlocal pos
        try:
            value, pos = read_uvarint(data, pos, end)
        except VarintError as exc:
            raise NoiseProtocolError(f"handshake payload: {exc}") from None
        return value

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            n = varint()
            if n > end - pos:
                raise NoiseProtocolError("handshake payload: field longer than the payload")
            if number in (1, 2):
                fields[number] = bytes(data[pos : pos + n])
            pos += n
        else:
            raise NoiseProtocolError(f"handshake payload: unsupported protobuf wire type {wire}")
        if pos > end:
            raise NoiseProtocolError("handshake payload: truncated field")
    if 1 not in fields or 2 not in fields:
        raise NoiseProtocolError("handshake payload: identity_key or identity_sig missing")
    return fields[1], fields[2]


def _verify_payload(payload: bytes, remote_static: bytes) -> tuple[PublicKey, ID]:
    key_bytes, sig = decode_payload(payload)
    try:
        pubkey = deserialize_public_key(key_bytes)
    except Exception as exc:
        raise NoiseProtocolError(f"handshake payload: unreadable identity key ({exc!r})") from exc
    try:
        ok = pubkey.verify(SIGNATURE_PREFIX + remote_static, sig)
    except Exception:
        ok = False
    if not ok:
        raise NoiseProtocolError("handshake payload: identity signature over the static key is invalid")
    return pubkey, ID.from_pubkey(pubkey)


class NoiseSession(BaseSession):
    """An established Noise channel: `read`/`write` plaintext; frames are internal."""

    def __init__(
        self,
        *,
        wire: _Wire,
        send: CipherState,
        recv: CipherState,
        local: KeyPair,
        remote_peer: ID,
        remote_key: PublicKey,
        is_initiator: bool,
    ) -> None:
        super().__init__(
            local_peer=ID.from_pubkey(local.public_key),
            local_private_key=local.private_key,
            remote_peer=remote_peer,
            remote_permanent_pubkey=remote_key,
            is_initiator=is_initiator,
        )
        self._wire = wire
        self._send = send
        self._recv = recv
        self._plain = bytearray()
        self._writing = False
        self._write_lot = trio.lowlevel.ParkingLot()
        self._read_lock = trio.Lock()
        self._failed: NoiseError | None = None

    # --- plaintext in ----------------------------------------------------------------------
    def _open_frames(self) -> bytes:
        """Decrypt every whole frame in the receive buffer."""
        buf = self._wire.buf
        pos, end = 0, len(buf)
        parts = []
        decrypt = self._recv.decrypt
        try:
            while end - pos >= 2:
                n = (buf[pos] << 8) | buf[pos + 1]
                if end - pos - 2 < n:
                    break
                parts.append(decrypt(b"", bytes(buf[pos + 2 : pos + 2 + n])))
                pos += 2 + n
        except NoiseError as exc:
            self._failed = exc
            raise
        finally:
            if pos:
                del buf[:pos]
        return b"".join(parts) if len(parts) != 1 else parts[0]

    async def read_available(self) -> bytes:
        """All plaintext that whole frames deliver next (at least one byte); b"" at EOF.

        Raises `NoiseError` if a frame fails authentication (the session is then dead).
        """
        if self._failed is not None:
            raise self._failed
        if self._plain:
            out = bytes(self._plain)
            self._plain.clear()
            return out
        wire = self._wire
        while True:
            out = self._open_frames()
            if out:
                return out
            data = await wire.receive()
            if not data:
                if wire.buf:
                    log.debug("noise: connection ended inside a frame (%d bytes buffered)", len(wire.buf))
                return b""
            wire.buf += data

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        async with self._read_lock:
            if not self._plain:
                data = await self.read_available()
                if not data:
                    raise ConnectionClosedError("Noise connection closed")
                self._plain += data
            if n is None or n < 0 or n >= len(self._plain):
                out = bytes(self._plain)
                self._plain.clear()
                return out
            out = bytes(self._plain[:n])
            del self._plain[:n]
            return out

    # --- plaintext out ---------------------------------------------------------------------
    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """Length-prefixed frames for `data`, each as large as Noise allows."""
        encrypt = self._send.encrypt
        if len(data) <= MAX_PLAINTEXT:
            ct = encrypt(b"", data)
            return len(ct).to_bytes(2, "big") + ct
        view = memoryview(data)
        parts = []
        for start in range(0, len(data), MAX_PLAINTEXT):
            ct = encrypt(b"", view[start : start + MAX_PLAINTEXT])
            parts.append(len(ct).to_bytes(2, "big"))
            parts.append(ct)
        return b"".join(parts)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        # One write at a time, so nonces reach the wire in order. A flag and a parking lot
        # rather than trio.Lock: the lock's owner tracking costs more than a small Noise frame,
        # and the writer is almost always alone (yamux has one writer task).
        while self._writing:
            await self._write_lot.park()
        self._writing = True
        try:
            await self._wire.send(self.seal(data))
        finally:
            self._writing = False
            if self._write_lot:
                self._write_lot.unpark()

    async def close(self) -> None:
        await self._wire.raw.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._wire.raw.get_remote_address()

    def get_transport_addresses(self) -> Any:
        return self._wire.raw.get_transport_addresses()

    def get_connection_type(self) -> Any:
        return self._wire.raw.get_connection_type()


class NoiseTransport(ISecureTransport):
    """`sec_opt` entry for `/noise`: XX handshake with the libp2p identity payload."""

    def __init__(self, key_pair: KeyPair, static_key: X25519PrivateKey | None = None) -> None:
        self.key_pair = key_pair
        self.local_peer = ID.from_pubkey(key_pair.public_key)
        self.static = static_key or X25519PrivateKey.generate()
        static_pub = public_bytes(self.static)
        self._payload = encode_payload(
            key_pair.public_key.serialize(), key_pair.private_key.sign(SIGNATURE_PREFIX + static_pub)
        )

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._handshake(conn, initiator=False, expected=None)

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._handshake(conn, initiator=True, expected=peer_id)

    async def _handshake(self, conn: IRawConnection, *, initiator: bool, expected: ID | None) -> NoiseSession:
        wire = _Wire(conn)
        hs = Handshake(initiator, self.static)
        try:
            if initiator:
                await wire.send(_frame(hs.write_message(b"")))
                payload = hs.read_message(await wire.read_frame())
                assert hs.rs is not None
                remote_key, remote_peer = _verify_payload(payload, hs.rs)
                if expected is not None and remote_peer != expected:
                    raise NoiseProtocolError(f"peer id mismatch: dialed {expected}, got {remote_peer}")
                await wire.send(_frame(hs.write_message(self._payload)))
            else:
                hs.read_message(await wire.read_frame())
                await wire.send(_frame(hs.write_message(self._payload)))
                payload = hs.read_message(await wire.read_frame())
                assert hs.rs is not None
                remote_key, remote_peer = _verify_payload(payload, hs.rs)
        except NoiseError as exc:
            raise NoiseProtocolError(f"noise handshake failed: {exc}") from exc
        except ConnectionClosedError as exc:
            raise NoiseProtocolError(f"connection closed during the Noise handshake: {exc}") from exc
        send, recv = hs.split()
        return NoiseSession(
            wire=wire,
            send=send,
            recv=recv,
            local=self.key_pair,
            remote_peer=remote_peer,
            remote_key=remote_key,
            is_initiator=initiator,
        )


def _frame(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE:
        raise NoiseError(f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE}")
    return len(message).to_bytes(2, "big") + message

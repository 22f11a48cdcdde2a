"""A go-libp2p peer for interop tests: the `p2pd` daemon driven over its control socket.

Theory of operation: p2pd listens on a unix socket. Each request uses a fresh
connection: we write one length-prefixed `Request`, read one `Response`, and
for most requests close. Three requests keep the connection:

- STREAM_OPEN: after the OK the connection *is* the libp2p stream.
- DHT queries that yield many answers: the OK carries DHTResponse BEGIN, then
  bare length-prefixed DHTResponse VALUE messages follow until END.
- PUBSUB SUBSCRIBE: after the OK, length-prefixed PubsubMessages arrive until
  we close the connection, which also unsubscribes.

Inbound streams for a STREAM_HANDLER arrive as connections *from* the daemon to
a unix socket we listen on, each starting with a length-prefixed StreamInfo.

The control protocol cannot report what identify learned about a remote, nor
ping; `identify_remote` and `ping` open `/ipfs/id/1.0.0` and `/ipfs/ping/1.0.0`
through STREAM_OPEN and speak those protocols themselves.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError, Message
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from meshmerge.proto.varint import encode_uvarint
from meshmerge.testing.interop import p2pd_control_pb2 as pb
from meshmerge.testing.interop.common import PeerInfo, PubsubMessage
from meshmerge.testing.interop.framing import BufferedStream, FramingError
from meshmerge.testing.interop.process import ManagedProcess, PeerProcessError
from meshmerge.testing.interop.tools import InteropTools, locate_tools

IDENTIFY_PROTOCOL = "/ipfs/id/1.0.0"
PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_SIZE = 32
_P_UNIX = 0x0190  # multicodec of /unix
_Msg = TypeVar("_Msg", bound=Message)

DEFAULT_FLAGS = (
    "-dhtServer",
    "-pubsub",
    "-pubsubRouter=gossipsub",
    "-natPortMap=false",
    "-autoRelay=false",
    "-autonat=false",
    "-b=false",
    "-tls=false",  # Noise only: meshmerge offers Noise, never plaintext/secio
)


GO_MESH_SETTLE = 1.5
"""Seconds to wait after subscriptions are exchanged before a *subscribed* p2pd
publishes: it sends only to its mesh (flood publishing did not reach a known
topic peer in our runs), and the mesh is built on its 1 s heartbeat. Publishing
earlier lost all 10 of 10 messages in about 1 run of 4."""


class DaemonError(RuntimeError):
    """p2pd answered a request with ERROR (message included) or broke the protocol."""


@dataclass(frozen=True)
class StreamInfo:
    peer_id: ID
    addr: Multiaddr
    protocol: str


StreamHandler = Callable[[StreamInfo, BufferedStream], Awaitable[None]]


def _peer_info(info: pb.PeerInfo) -> PeerInfo:
    return PeerInfo(ID(info.id), tuple(Multiaddr(a) for a in info.addrs))


def unix_multiaddr_bytes(path: Path) -> bytes:
    """Binary `/unix<path>` as go-multiaddr expects it: the value keeps its leading slash.

    py-multiaddr 0.2 drops that slash, which makes p2pd dial a relative path.
    """
    value = str(path).encode()
    return encode_uvarint(_P_UNIX) + encode_uvarint(len(value)) + value


def _parse(cls: type[_Msg], raw: bytes, what: str) -> _Msg:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise DaemonError(f"p2pd sent an undecodable {cls.__name__} for {what}: {exc}") from exc


def _check(resp: pb.Response, what: str) -> pb.Response:
    if resp.type != pb.Response.OK:
        raise DaemonError(f"p2pd refused {what}: {resp.error.msg or '<no message>'}")
    return resp


class Subscription:
    """A live PUBSUB SUBSCRIBE connection; iterate it to receive messages."""

    def __init__(self, topic: str, conn: BufferedStream) -> None:
        self.topic = topic
        self._conn = conn

    async def receive(self) -> PubsubMessage:
        """The next message; raises DaemonError if the daemon closes the subscription."""
        raw = await self._conn.read_frame()
        if raw is None:
            raise DaemonError(f"p2pd closed the subscription to {self.topic!r}")
        msg = _parse(pb.PubsubMessage, raw, f"subscription {self.topic!r}")
        return PubsubMessage(
            topic=msg.topics[0] if msg.topics else self.topic,
            data=msg.data,
            from_peer=ID(getattr(msg, "from")) if msg.HasField("from") else None,
            seqno=msg.seqno,
            received_at=time.monotonic(),
        )

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> PubsubMessage:
        return await self.receive()


class GoPeer:
    """Handle for one running p2pd. Create with `start_go_peer()`."""

    def __init__(self, process: ManagedProcess, control_path: Path, workdir: Path, nursery: trio.Nursery):
        self.process = process
        self.control_path = control_path
        self.workdir = workdir
        self._nursery = nursery
        self.peer_id: ID = ID(b"")
        self.addrs: tuple[Multiaddr, ...] = ()
        self._handler_seq = 0

    # --- plumbing -----------------------------------------------------------
    async def _open(self) -> BufferedStream:
        return BufferedStream(await trio.open_unix_socket(str(self.control_path)))

    async def _request(self, conn: BufferedStream, req: pb.Request, what: str) -> pb.Response:
        await conn.send_frame(req.SerializeToString())
        try:
            raw = await conn.read_frame()
        except FramingError as exc:
            raise DaemonError(f"p2pd broke the control protocol answering {what}: {exc}") from exc
        if raw is None:
            raise DaemonError(f"p2pd closed the control connection without answering {what}")
        return _check(_parse(pb.Response, raw, what), what)

    async def _call(self, req: pb.Request, what: str) -> pb.Response:
        conn = await self._open()
        try:
            return await self._request(conn, req, what)
        finally:
            await conn.aclose()

    @property
    def p2p_addrs(self) -> list[str]:
        """Listen addresses with `/p2p/<id>` appended, as strings for dialing."""
        return [f"{a}/p2p/{self.peer_id.to_base58()}" for a in self.addrs]

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    # --- host ---------------------------------------------------------------
    async def identify(self) -> PeerInfo:
        resp = await self._call(pb.Request(type=pb.Request.IDENTIFY), "IDENTIFY")
        return PeerInfo(ID(resp.identify.id), tuple(Multiaddr(a) for a in resp.identify.addrs))

    async def connect(self, peer_id: ID, addrs: Sequence[Multiaddr | str], timeout: int = 10) -> None:
        req = pb.Request(
            type=pb.Request.CONNECT,
            connect=pb.ConnectRequest(
                peer=peer_id.to_bytes(),
                addrs=[Multiaddr(str(a)).to_bytes() for a in addrs],
                timeout=timeout,
            ),
        )
        await self._call(req, f"CONNECT to {peer_id}")

    async def disconnect(self, peer_id: ID) -> None:
        req = pb.Request(type=pb.Request.DISCONNECT, disconnect=pb.DisconnectRequest(peer=peer_id.to_bytes()))
        await self._call(req, f"DISCONNECT {peer_id}")

    async def list_peers(self) -> list[PeerInfo]:
        resp = await self._call(pb.Request(type=pb.Request.LIST_PEERS), "LIST_PEERS")
        return [_peer_info(p) for p in resp.peers]

    async def open_stream(
        self, peer_id: ID, protocols: Sequence[str], timeout: int = 10
    ) -> tuple[StreamInfo, BufferedStream]:
        """A libp2p stream to `peer_id`; the caller owns (and must close) it."""
        conn = await self._open()
        try:
            req = pb.Request(
                type=pb.Request.STREAM_OPEN,
                stream_open=pb.StreamOpenRequest(
                    peer=peer_id.to_bytes(), protocols=list(protocols), timeout=timeout
                ),
            )
            resp = await self._request(conn, req, f"STREAM_OPEN {list(protocols)} to {peer_id}")
        except BaseException:
            await conn.aclose()
            raise
        si = resp.stream_info
        return StreamInfo(ID(si.peer), Multiaddr(si.addr), si.protocol), conn

    async def set_stream_handler(self, protocols: Sequence[str], handler: StreamHandler) -> None:
        """Serve inbound streams for `protocols` with `handler` until the peer stops.

        Each inbound stream runs `handler(info, stream)` in the peer's nursery;
        the stream is closed when the handler returns.
        """
        self._handler_seq += 1
        path = self.workdir / f"h{self._handler_seq}.sock"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(64)
        listener = trio.SocketListener(sock)

        async def serve_one(stream: trio.SocketStream) -> None:
            conn = BufferedStream(stream)
            try:
                raw = await conn.read_frame()
                if raw is None:
                    return
                si = _parse(pb.StreamInfo, raw, "an inbound stream")
                await handler(StreamInfo(ID(si.peer), Multiaddr(si.addr), si.protocol), conn)
            finally:
                await conn.aclose()

        self._nursery.start_soon(trio.serve_listeners, serve_one, [listener])
        req = pb.Request(
            type=pb.Request.STREAM_HANDLER,
            stream_handler=pb.StreamHandlerRequest(
                addr=unix_multiaddr_bytes(path), protocols=list(protocols), balanced=False
            ),
        )
        await self._call(req, f"STREAM_HANDLER {list(protocols)}")

    async def ping(self, peer_id: ID, count: int = 1, timeout: float = 10.0) -> list[float]:
        """Round-trip times in seconds of `count` pings over one /ipfs/ping/1.0.0 stream."""
        rtts: list[float] = []
        with trio.fail_after(timeout):
            _, stream = await self.open_stream(peer_id, [PING_PROTOCOL])
            try:
                for _ in range(count):
                    payload = os.urandom(PING_SIZE)
                    t0 = time.perf_counter()
                    await stream.send_all(payload)
                    echo = await stream.read_exactly(PING_SIZE)
                    rtts.append(time.perf_counter() - t0)
                    if echo != payload:
                        raise DaemonError(f"ping to {peer_id}: echo differs from payload")
            finally:
                await stream.aclose()
        return rtts

    async def identify_remote(self, peer_id: ID, timeout: float = 10.0) -> Identify:
        """The Identify message `peer_id` sends when asked over /ipfs/id/1.0.0."""
        with trio.fail_after(timeout):
            _, stream = await self.open_stream(peer_id, [IDENTIFY_PROTOCOL])
            try:
                raw = await stream.read_frame(max_size=64 * 1024)
            finally:
                await stream.aclose()
        if raw is None:
            raise DaemonError(f"{peer_id} closed the identify stream without a message")
        return _parse(Identify, raw, f"identify from {peer_id}")

    # --- DHT ----------------------------------------------------------------
    def _dht(self, kind: int, **fields: object) -> pb.Request:
        return pb.Request(type=pb.Request.DHT, dht=pb.DHTRequest(type=kind, **fields))  # type: ignore[arg-type]

    async def _dht_stream(self, req: pb.Request, what: str) -> list[pb.DHTResponse]:
        conn = await self._open()
        try:
            resp = await self._request(conn, req, what)
            if resp.dht.type != pb.DHTResponse.BEGIN:
                return [resp.dht]
            out: list[pb.DHTResponse] = []
            while True:
                raw = await conn.read_frame()
                if raw is None:
                    raise DaemonError(f"p2pd closed the {what} answer stream before END")
                item = _parse(pb.DHTResponse, raw, what)
                if item.type == pb.DHTResponse.END:
                    return out
                out.append(item)
        finally:
            await conn.aclose()

    async def dht_put_value(self, key: bytes, value: bytes, timeout: int = 30) -> None:
        """Note: go's DHT accepts only `/pk/` and `/ipns/` keys (no custom validators)."""
        await self._call(
            self._dht(pb.DHTRequest.PUT_VALUE, key=key, value=value, timeout=timeout), "DHT PUT_VALUE"
        )

    async def dht_get_value(self, key: bytes, timeout: int = 30) -> bytes:
        resp = await self._call(self._dht(pb.DHTRequest.GET_VALUE, key=key, timeout=timeout), "DHT GET_VALUE")
        return resp.dht.value

    async def dht_provide(self, cid: bytes, timeout: int = 30) -> None:
        await self._call(self._dht(pb.DHTRequest.PROVIDE, cid=cid, timeout=timeout), "DHT PROVIDE")

    async def dht_find_providers(self, cid: bytes, count: int = 20, timeout: int = 30) -> list[PeerInfo]:
        req = self._dht(pb.DHTRequest.FIND_PROVIDERS, cid=cid, count=count, timeout=timeout)
        return [_peer_info(r.peer) for r in await self._dht_stream(req, "DHT FIND_PROVIDERS") if r.peer.id]

    async def dht_find_peer(self, peer_id: ID, timeout: int = 30) -> PeerInfo:
        req = self._dht(pb.DHTRequest.FIND_PEER, peer=peer_id.to_bytes(), timeout=timeout)
        resp = await self._call(req, f"DHT FIND_PEER {peer_id}")
        return _peer_info(resp.dht.peer)

    async def dht_get_closest_peers(self, key: bytes, timeout: int = 30) -> list[ID]:
        req = self._dht(pb.DHTRequest.GET_CLOSEST_PEERS, key=key, timeout=timeout)
        return [ID(r.value) for r in await self._dht_stream(req, "DHT GET_CLOSEST_PEERS")]

    # --- pubsub -------------------------------------------------------------
    async def pubsub_publish(self, topic: str, data: bytes) -> None:
        req = pb.Request(
            type=pb.Request.PUBSUB,
            pubsub=pb.PubsubRequest(type=pb.PubsubRequest.PUBLISH, topic=topic, data=data),
        )
        await self._call(req, f"PUBSUB PUBLISH {topic!r}")

    async def pubsub_get_topics(self) -> list[str]:
        req = pb.Request(type=pb.Request.PUBSUB, pubsub=pb.PubsubRequest(type=pb.PubsubRequest.GET_TOPICS))
        return list((await self._call(req, "PUBSUB GET_TOPICS")).pubsub.topics)

    async def pubsub_list_peers(self, topic: str) -> list[ID]:
        """Peers the go router knows to be subscribed to `topic`."""
        req = pb.Request(
            type=pb.Request.PUBSUB, pubsub=pb.PubsubRequest(type=pb.PubsubRequest.LIST_PEERS, topic=topic)
        )
        return [ID(p) for p in (await self._call(req, f"PUBSUB LIST_PEERS {topic!r}")).pubsub.peer_ids]

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        """Subscribed while the block runs; closing the connection unsubscribes."""
        conn = await self._open()
        try:
            req = pb.Request(
                type=pb.Request.PUBSUB, pubsub=pb.PubsubRequest(type=pb.PubsubRequest.SUBSCRIBE, topic=topic)
            )
            await self._request(conn, req, f"PUBSUB SUBSCRIBE {topic!r}")
            yield Subscription(topic, conn)
        finally:
            await conn.aclose()


async def provide_when_routable(peer: GoPeer, cid: bytes, timeout: float = 10.0) -> None:
    """PROVIDE, retried while go's routing table is still empty after a fresh connection.

    p2pd answers "failed to find any peer in table" until identify has told it
    that the remote speaks kad, a few ms to a second after CONNECT.
    """
    deadline = trio.current_time() + timeout
    while True:
        try:
            await peer.dht_provide(cid)
            return
        except DaemonError as exc:
            if "failed to find any peer" not in str(exc) or trio.current_time() > deadline:
                raise
        await trio.sleep(0.05)


async def _wait_ready(peer: GoPeer, deadline: float) -> None:
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if peer.process.returncode() is not None:
            raise PeerProcessError(f"p2pd died during startup: {peer.process.describe()}")
        if peer.control_path.exists():
            try:
                info = await peer.identify()
            except (OSError, DaemonError, FramingError) as exc:
                last_error = exc
            else:
                if info.addrs:
                    peer.peer_id, peer.addrs = info.peer_id, info.addrs
                    return
        await trio.sleep(0.02)
    raise PeerProcessError(f"p2pd not ready in time (last error: {last_error}): {peer.process.describe()}")


@asynccontextmanager
async def start_go_peer(
    tools: InteropTools | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_flags: Sequence[str] = (),
    startup_timeout: float = 15.0,
) -> AsyncIterator[GoPeer]:
    """Run a go-libp2p daemon listening on `host:port` (TCP, Noise, yamux) for the block.

    The daemon and every handler task stop when the block exits; if the block
    raises, the daemon's log tail is attached to the exception as a note.
    """
    tools = tools or locate_tools()
    workdir = Path(tempfile.mkdtemp(prefix="mm-go-", dir="/tmp"))  # short: unix socket paths max 107 bytes
    control = workdir / "p2pd.sock"
    family = "ip6" if ":" in host else "ip4"
    argv = [
        str(tools.p2pd),
        f"-listen=/unix{control}",
        f"-hostAddrs=/{family}/{host}/tcp/{port}",
        *DEFAULT_FLAGS,
        *extra_flags,
    ]
    proc = ManagedProcess(argv, workdir / "p2pd.log")
    try:
        async with trio.open_nursery() as nursery:
            peer = GoPeer(proc, control, workdir, nursery)
            try:
                await _wait_ready(peer, time.monotonic() + startup_timeout)
                yield peer
            except BaseException as exc:
                exc.add_note(f"go peer: {proc.describe()}")
                raise
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

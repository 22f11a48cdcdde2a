"""A js-libp2p peer for interop tests: `tests/interop/js/peer.mjs` under Node 22.

Theory of operation: the node process speaks JSON lines. We write requests
`{"id", "op", ...}` to its stdin; one reader task parses stdout and either
completes the waiting request with the same id or, for `{"event": "message"}`,
queues the gossip message for its topic. Queues are bounded; overflow is
counted (`dropped_messages`), never blocks the reader. Stopping closes stdin,
which makes the node stop itself; SIGTERM/SIGKILL follow if it lingers.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from meshmerge.testing.interop.common import PeerInfo, PubsubMessage
from meshmerge.testing.interop.process import ManagedProcess, PeerProcessError, pipe_streams
from meshmerge.testing.interop.tools import InteropTools, locate_tools

MAX_LINE = 8 * 1024 * 1024
TOPIC_QUEUE = 100_000


class JsPeerError(RuntimeError):
    """The js peer answered a request with an error (its message included)."""


@dataclass(frozen=True)
class RemoteIdentify:
    """What js-libp2p's identify recorded about a remote peer."""

    protocols: tuple[str, ...]
    agent_version: str | None
    addrs: tuple[str, ...]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _strip_p2p(addr: str) -> Multiaddr:
    return Multiaddr(addr.split("/p2p/")[0])


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] = {}


class JsSubscription:
    """Messages the js peer received on one topic, in arrival order."""

    def __init__(self, topic: str, receive: trio.MemoryReceiveChannel[PubsubMessage]) -> None:
        self.topic = topic
        self._receive = receive

    async def receive(self) -> PubsubMessage:
        return await self._receive.receive()

    def __aiter__(self) -> JsSubscription:
        return self

    async def __anext__(self) -> PubsubMessage:
        return await self._receive.receive()


class JsPeer:
    """Handle for one running js-libp2p node. Create with `start_js_peer()`."""

    def __init__(self, process: ManagedProcess, send: trio.abc.SendStream) -> None:
        self.process = process
        self._send = send
        self._send_lock = trio.Lock()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._topics: dict[str, tuple[trio.MemorySendChannel[PubsubMessage], JsSubscription]] = {}
        self.dropped_messages = 0
        self.peer_id: ID = ID(b"")
        self.addrs: tuple[Multiaddr, ...] = ()
        self.protocols: tuple[str, ...] = ()
        self.ready = trio.Event()
        self.closed_reason: str | None = None

    # --- plumbing -----------------------------------------------------------
    def _on_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return  # not ours (a library printed to stdout); the log has stderr
        if not isinstance(msg, dict):
            return
        event = msg.get("event")
        if event == "message":
            self._on_message(msg)
        elif event == "ready":
            self.peer_id = ID.from_base58(msg["peerId"])
            self.addrs = tuple(_strip_p2p(a) for a in msg["addrs"])
            self.protocols = tuple(msg["protocols"])
            self.ready.set()
        elif isinstance(msg.get("id"), int) and msg["id"] in self._pending:
            pending = self._pending.pop(msg["id"])
            pending.reply = msg
            pending.done.set()

    def _on_message(self, msg: dict[str, Any]) -> None:
        topic = msg["topic"]
        entry = self._topics.get(topic)
        if entry is None:
            return
        seqno = msg.get("seqno")
        parsed = PubsubMessage(
            topic=topic,
            data=_unb64(msg["data"]),
            from_peer=ID.from_base58(msg["from"]) if msg.get("from") else None,
            seqno=bytes.fromhex(seqno.rjust(max(16, len(seqno) + len(seqno) % 2), "0")) if seqno else b"",
            received_at=int(msg["monoNs"]) / 1e9,
        )
        try:
            entry[0].send_nowait(parsed)
        except trio.WouldBlock:
            self.dropped_messages += 1

    async def _reader(self, receive: trio.abc.ReceiveStream) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = await receive.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    self._on_line(line)
                if len(buf) > MAX_LINE:
                    raise PeerProcessError(f"js peer wrote a line over {MAX_LINE} bytes")
        finally:
            self.closed_reason = "js peer closed its stdout"
            self.ready.set()  # wakes a startup wait; closed_reason tells it apart
            for pending in self._pending.values():
                pending.done.set()
            self._pending.clear()
            for send, _ in self._topics.values():
                send.close()

    async def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        """Send one request and return its result; JsPeerError if the peer reports failure."""
        if self.closed_reason is not None:
            raise PeerProcessError(f"{self.closed_reason}: {self.process.describe()}")
        self._next_id += 1
        rid = self._next_id
        pending = self._pending[rid] = _Pending()
        line = json.dumps({"id": rid, "op": op, **args}).encode() + b"\n"
        async with self._send_lock:
            await self._send.send_all(line)
        with trio.fail_after(timeout):
            await pending.done.wait()
        reply = pending.reply
        if not reply:
            raise PeerProcessError(f"js peer stopped before answering {op}: {self.process.describe()}")
        if not reply.get("ok"):
            raise JsPeerError(f"js peer failed {op}: {reply.get('error')}")
        return reply.get("result")

    async def _call_within(self, op: str, timeout: float, **args: Any) -> Any:
        """`call` with the deadline passed to js too (timeoutMs), plus 5 s slack for the reply."""
        return await self.call(op, timeout=timeout + 5, timeoutMs=int(timeout * 1000), **args)

    @property
    def p2p_addrs(self) -> list[str]:
        return [f"{a}/p2p/{self.peer_id.to_base58()}" for a in self.addrs]

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    # --- host ---------------------------------------------------------------
    async def dial(self, addr: str | Multiaddr, timeout: float = 15.0) -> float:
        """Dial a full multiaddr (with /p2p/<id>); returns the js-measured dial time in seconds."""
        res = await self._call_within("dial", timeout, addr=str(addr))
        return float(res["ms"]) / 1000

    async def hang_up(self, peer_id: ID) -> None:
        await self.call("hangUp", peer=peer_id.to_base58())

    async def connections(self) -> list[dict[str, str]]:
        return list(await self.call("connections"))

    async def connected_peers(self) -> set[ID]:
        return {ID.from_base58(c["peer"]) for c in await self.connections()}

    async def ping(self, peer_id: ID, count: int = 1, timeout: float = 10.0) -> list[float]:
        """Round-trip times in seconds, each a js `ping()` call (one stream per ping)."""
        res = await self._call_within("ping", timeout * count, peer=peer_id.to_base58(), count=count)
        return [float(ms) / 1000 for ms in res]

    async def identify_remote(self, peer_id: ID, timeout: float = 10.0) -> RemoteIdentify:
        """What identify told js about `peer_id` (waits until identify has run)."""
        res = await self._call_within("peerInfo", timeout, peer=peer_id.to_base58())
        return RemoteIdentify(tuple(res["protocols"]), res["agentVersion"], tuple(res["addrs"]))

    # --- DHT ----------------------------------------------------------------
    async def dht_put(self, key: bytes, value: bytes, timeout: float = 30.0) -> None:
        await self._call_within("dhtPut", timeout, key=_b64(key), value=_b64(value))

    async def dht_get(self, key: bytes, timeout: float = 30.0) -> bytes:
        """The selected record value; retried inside js until `timeout`."""
        res = await self._call_within("dhtGet", timeout, key=_b64(key))
        return _unb64(res)

    async def dht_provide(self, cid: bytes, timeout: float = 30.0) -> None:
        await self._call_within("dhtProvide", timeout, cid=_b64(cid))

    async def dht_find_providers(self, cid: bytes, count: int = 20, timeout: float = 30.0) -> list[PeerInfo]:
        res = await self._call_within("dhtFindProviders", timeout, cid=_b64(cid), count=count)
        return [PeerInfo(ID.from_base58(p["peer"]), tuple(_strip_p2p(a) for a in p["addrs"])) for p in res]

    async def dht_find_peer(self, peer_id: ID, timeout: float = 30.0) -> PeerInfo:
        res = await self._call_within("dhtFindPeer", timeout, peer=peer_id.to_base58())
        return PeerInfo(ID.from_base58(res["peer"]), tuple(_strip_p2p(a) for a in res["addrs"]))

    async def dht_closest_peers(self, key: bytes, timeout: float = 30.0) -> list[PeerInfo]:
        """Peers a js GET_CLOSEST_PEERS query ends with (its FINAL_PEER events)."""
        res = await self._call_within("dhtClosestPeers", timeout, key=_b64(key))
        return [PeerInfo(ID.from_base58(p["peer"]), tuple(_strip_p2p(a) for a in p["addrs"])) for p in res]

    async def dht_routing_table_size(self) -> int:
        return int((await self.call("routingTable"))["size"])

    # --- pubsub -------------------------------------------------------------
    async def subscribe(self, topic: str) -> JsSubscription:
        """Subscribe (idempotent) and return the topic's message queue."""
        if topic not in self._topics:
            send, receive = trio.open_memory_channel[PubsubMessage](TOPIC_QUEUE)
            self._topics[topic] = (send, JsSubscription(topic, receive))
        await self.call("subscribe", topic=topic)
        return self._topics[topic][1]

    async def unsubscribe(self, topic: str) -> None:
        await self.call("unsubscribe", topic=topic)

    async def publish(self, topic: str, data: bytes) -> list[ID]:
        """Publish; returns the peers js sent it to."""
        res = await self.call("publish", topic=topic, data=_b64(data))
        return [ID.from_base58(p) for p in res["recipients"]]

    async def topic_peers(self, topic: str) -> list[ID]:
        return [ID.from_base58(p) for p in await self.call("topicPeers", topic=topic)]

    async def mesh_peers(self, topic: str) -> list[ID]:
        return [ID.from_base58(p) for p in await self.call("meshPeers", topic=topic)]

    async def score(self, peer_id: ID) -> float:
        """js gossipsub's current score for `peer_id`."""
        return float(await self.call("score", peer=peer_id.to_base58()))

    async def score_stats(self) -> dict[str, Any]:
        """js gossipsub's per-peer score components (`dumpPeerScoreStats`), keyed by peer id text."""
        return dict(await self.call("scoreStats"))


@asynccontextmanager
async def start_js_peer(
    tools: InteropTools | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    dht: bool = True,
    gossipsub: dict[str, Any] | None = None,
    extra_listen: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> AsyncIterator[JsPeer]:
    """Run a js-libp2p node (TCP, Noise, yamux, identify, ping, kad-dht, gossipsub) for the block.

    `gossipsub` options are passed to js `gossipsub()` over the harness defaults
    (emitSelf false, allowPublishToZeroTopicPeers true). If the block raises,
    the node's log tail is attached to the exception as a note.
    """
    tools = tools or locate_tools()
    tools.sync_js_peer_script()
    tools.check()
    workdir = Path(tempfile.mkdtemp(prefix="mm-js-", dir="/tmp"))
    family = "ip6" if ":" in host else "ip4"
    config = {
        "listen": [f"/{family}/{host}/tcp/{port}", *extra_listen],
        "dht": dht,
        "gossipsub": gossipsub or {},
    }
    argv = [str(tools.node), str(tools.js_peer_script), json.dumps(config)]
    proc = ManagedProcess(argv, workdir / "js-peer.log", pipes=True, cwd=tools.js_dir)
    send, receive = pipe_streams(proc)
    try:
        async with trio.open_nursery() as nursery:
            peer = JsPeer(proc, send)
            nursery.start_soon(peer._reader, receive)
            try:
                with trio.move_on_after(startup_timeout):
                    await peer.ready.wait()
                if not peer.ready.is_set() or peer.closed_reason is not None:
                    raise PeerProcessError(f"js peer not ready within {startup_timeout} s: {proc.describe()}")
                yield peer
            except BaseException as exc:
                exc.add_note(f"js peer: {proc.describe()}")
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await send.aclose()  # EOF on stdin: the node stops itself
                    with trio.move_on_after(5):
                        while proc.returncode() is None:
                            await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
    finally:
        await proc.stop()
        with trio.CancelScope(shield=True):
            await receive.aclose()
        shutil.rmtree(workdir, ignore_errors=True)

"""Trio driver that runs the sans-I/O :class:`GossipSubRouter` over py-libp2p streams.

Theory of operation
-------------------
The router decides everything; this module only moves bytes and time.

* **Streams.** As the spec says, each peer gets one long-lived *outbound*
  stream that we write to, and we read whatever *inbound* stream the peer
  opened to us (a newer inbound stream replaces an older one, as in
  go-libp2p-pubsub). We also read from our outbound stream, on which the remote
  never writes, to notice at once when the remote closes or resets it; a
  connection whose stream keeps dying is retried ``stream_retry_limit`` times,
  then left alone until it reconnects. Inbound frames go through the codec's
  :class:`FrameDecoder`, which refuses a frame larger than the configured
  bound before buffering it; a peer that sends an undecodable frame gets a
  behaviour penalty and is disconnected.
* **Peers.** A connection notification (or the periodic reconcile against the
  host's connection table, which catches notifications we missed) starts one
  peer task in the service nursery. It negotiates ``/meshsub/1.2.0``,
  ``/meshsub/1.1.0``, ``/meshsub/1.0.0`` or ``/floodsub/1.0.0``, registers the
  peer with the router under that protocol, then writes the router's queued
  frames (coalesced) until the stream or connection dies. A write that takes
  longer than ``write_timeout`` drops the peer; so does a router queue overflow
  (the router reports it through ``take_disconnects``).
* **Dials.** Peers the router asks for (PX, direct peers) are dialled at most
  ``max_concurrent_dials`` at a time; up to ``max_pending_dials`` more wait for
  a free slot, the rest are dropped. Direct peers come with addresses from
  ``GossipConfig.direct_peers`` and are dialled at start.
* **Peer exchange.** The router accepts PX only from peers at or above the
  accept-PX threshold and hands over at most ``max_px_connect`` entries. An
  entry's signed peer record is checked (:mod:`.peer_record`: signature, key =
  record's peer id = the entry's peer id); a bad one is logged and ignored, a
  good one goes into the peerstore's certified address book for
  ``px_addr_ttl`` seconds and the peer is dialled. An entry without a record is
  dialled only if the peerstore already knows an address, as in
  go-libp2p-pubsub. The PX entries *we* send carry the records identify
  brought us (and our own, issued at start, goes out with identify).
* **Validation.** A topic's validator may be a plain function or an async one.
  A plain one runs inline, inside the router's message handling, so an accepted
  message is forwarded in the same step that read it (no task switch); the
  peer's reader task then awaits the handler for it. An async validator's messages are
  parked by the router for an asynchronous verdict:
  ``max_validation_concurrency`` worker tasks run the validator and report the
  verdict back, then hand accepted messages to the topic's handler. The router
  bounds pending validations per peer and in total, so the channel between them
  never overflows. Either way REJECT costs the forwarder P4.
* **Writes.** When a peer's writer task is idle and the stream is meshmerge's
  yamux stream, :meth:`_pump` writes the peer's queued frames straight into the
  stream's send buffer (``write_nowait``), saving a task switch per message per
  peer; frames stay in router-queue order because the direct path runs only
  while the writer holds nothing. When the stream cannot take them at once (send
  window, connection output above its high-water mark), the writer task is woken
  and writes them with the usual timeout. Reads and writes go to the muxed
  stream under py-libp2p's ``NetStream`` (which takes an async lock per call).
* **Reads.** On meshmerge's yamux the inbound stream pushes its data
  (``set_receiver``): frames are decoded and routed inside the session's reader
  task as they arrive, and the peer's reader task wakes only to run handlers.
  While ``max_pending_validations`` deliveries wait for handlers it stops taking
  the peer's data, so the peer waits on its yamux window instead of a queue
  growing. Other muxers are read with ``read()`` in the reader task.
* **Time.** ``now`` is ``time.monotonic()``; the heartbeat runs every
  ``params.heartbeat_interval``.

After every event the driver *pumps* the router: wakes writers of peers with
queued frames, schedules disconnects and (bounded) dials, and queues
validations. Every task lives in the nursery of :meth:`GossipService.run`,
except the readers, which py-libp2p runs inside its stream-handler tasks; we
track their cancel scopes and cancel them on shutdown.

Publishing with no topic peers sends the message nowhere, as in
go-libp2p-pubsub: flood publishing targets the peers known at publish time, and
peers that arrive later join the mesh, while IHAVE gossip goes only to non-mesh
peers. Nothing replays it; meshmerge's anti-entropy repairs such gaps.

The handler and validator receive the message *author* (the signed ``from``
field, guaranteed by StrictSign), not the forwarding peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import ipaddress
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC

from meshmerge.daemon.gossip.params import (
    GossipSubParams,
    ParamsError,
    PeerScoreParams,
    PeerScoreThresholds,
)
from meshmerge.daemon.gossip.peer_record import MAX_RECORD_BYTES, PeerRecordError, open_px_record
from meshmerge.daemon.gossip.router import (
    FLOODSUB,
    MESHSUB_10,
    MESHSUB_11,
    MESHSUB_12,
    Delivery,
    GossipSubRouter,
    PendingValidation,
    Validation,
)
from meshmerge.daemon.identity import Identity
from meshmerge.proto.gossipsub import CodecLimits, FrameDecoder, GossipCodecError, Message, PeerInfo
from meshmerge.proto.gossipsub_sign import Ed25519Identity

__all__ = [
    "GossipConfig",
    "GossipService",
    "Handler",
    "SyncValidator",
    "Validation",
    "Validator",
]

log = logging.getLogger("meshmerge.gossip")

Validator = Callable[[bytes, bytes], Awaitable[Validation]]
"""``(author_peer_id_bytes, data) -> verdict``; REJECT penalises the forwarder (P4)."""
SyncValidator = Callable[[bytes, bytes], Validation]
"""The same without awaiting: runs inline while the message is handled (see the module docstring)."""
Handler = Callable[[bytes, bytes], Awaitable[None]]
"""``(author_peer_id_bytes, data)``, called once per accepted message."""

STABLE_SESSION_HEARTBEATS = 10

OUR_PROTOCOLS: tuple[str, ...] = (MESHSUB_12, MESHSUB_11, MESHSUB_10, FLOODSUB)
"""Offered in preference order when we open a stream; all four are accepted inbound."""

# Exceptions that mean "this stream or connection is gone": expected, logged at debug. Anything
# else py-libp2p raises from a stream or dial is logged at info and handled the same way: one
# peer's broken stream must never take the service down.
_STREAM_GONE = (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError)


def _level(exc: Exception) -> int:
    return logging.DEBUG if isinstance(exc, _STREAM_GONE) else logging.INFO


@dataclass(frozen=True)
class GossipConfig:
    """Everything that shapes the gossip service; :meth:`validate` names the field and the rule."""

    params: GossipSubParams = field(default_factory=GossipSubParams)
    score: PeerScoreParams | None = None
    """Peer scoring (None: no scoring, every peer scores 0). Use ``derive_score_params``."""
    thresholds: PeerScoreThresholds = field(default_factory=PeerScoreThresholds)
    max_validation_concurrency: int = 16
    """Validator calls running at once (the router bounds how many wait)."""
    direct_peers: tuple[str, ...] = ()
    """Full ``/ip4/.../tcp/.../p2p/<id>`` addresses of peers we always forward to and redial."""
    open_stream_timeout: float = 10.0
    """Seconds to open and negotiate the outbound pubsub stream to a peer."""
    write_timeout: float = 10.0
    """A single write blocked longer than this drops the peer (it is not reading)."""
    max_write_batch_bytes: int = 256 * 1024
    """Queued frames are coalesced into writes of at most this many bytes (one frame may exceed it)."""
    read_chunk_bytes: int = 64 * 1024
    max_concurrent_dials: int = 4
    """Dials for PX / direct peers running at once; further requests wait in a bounded queue."""
    max_pending_dials: int = 32
    """Dial requests waiting for a free slot; more are dropped (PX offers more than we need)."""
    px_addr_ttl: float = 120.0
    """Seconds the addresses of a signed PX record stay in the peerstore (go: TempAddrTTL)."""
    dial_timeout: float = 10.0
    publish_wait_timeout: float = 5.0
    """publish() waits up to this long while some peer's queue is more than half full."""
    stream_retry_limit: int = 3
    """Consecutive failures to (re)open the outbound stream to a connected peer before giving up."""
    shutdown_timeout: float = 2.0
    """Seconds run() waits on cancellation for inbound-stream readers to finish."""
    reconcile_interval_ticks: int = 5
    """Every this many heartbeats, start peer tasks for connections whose notification we missed."""

    def validate(self) -> None:
        self.params.validate()
        if self.score is not None:
            self.score.validate()
        self.thresholds.validate()
        positive_ints = (
            "max_validation_concurrency",
            "max_write_batch_bytes",
            "read_chunk_bytes",
            "max_concurrent_dials",
            "max_pending_dials",
            "stream_retry_limit",
            "reconcile_interval_ticks",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParamsError(f"GossipConfig.{name}: must be a positive integer, got {value!r}")
        for name in (
            "open_stream_timeout",
            "write_timeout",
            "dial_timeout",
            "publish_wait_timeout",
            "shutdown_timeout",
            "px_addr_ttl",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 600:
                raise ParamsError(f"GossipConfig.{name}: must be in (0, 600] seconds, got {value!r}")
        if self.max_validation_concurrency > self.params.max_pending_validations:
            raise ParamsError(
                "GossipConfig.max_validation_concurrency: must not exceed "
                "params.max_pending_validations (workers beyond it would never have work)"
            )
        for addr in self.direct_peers:
            _direct_peer(addr)


def _direct_peer(addr: str) -> tuple[ID, multiaddr.Multiaddr]:
    try:
        ma = multiaddr.Multiaddr(addr)
        pid = ID.from_base58(ma.value_for_protocol("p2p"))
        transport = ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{pid.to_base58()}"))
    except Exception as exc:
        raise ParamsError(
            f"GossipConfig.direct_peers: {addr!r} is not a /.../p2p/<peer-id> multiaddr ({exc})"
        ) from exc
    return pid, transport


def _b58(peer: bytes) -> str:
    try:
        return ID(peer).to_base58()
    except Exception:
        return peer.hex()


def _no_app_score(peer: bytes) -> float:
    return 0.0


def _conn_ip(conn: INetConn) -> str | None:
    """Remote IP of a connection (for P6 IP colocation), if the transport reveals one."""
    getter = getattr(conn, "get_transport_addresses", None)
    if getter is None:
        return None
    try:
        addrs = getter()
    except Exception:
        return None
    for ma in addrs:
        for proto in ("ip4", "ip6"):
            try:
                return str(ipaddress.ip_address(ma.value_for_protocol(proto)))
            except Exception:
                continue
    return None


def _conn_outbound(conn: INetConn) -> bool:
    direction = getattr(conn, "direction", None)
    return getattr(direction, "name", str(direction)).upper() == "OUTBOUND"


@dataclass
class _Topic:
    validator: Validator | SyncValidator
    handler: Handler
    inline: bool
    """The validator is a plain function: call it inline, not in a worker."""


def _is_async(fn: object) -> bool:
    # an object whose __call__ is async counts too (iscoroutinefunction looks at functions only)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


@dataclass
class _PeerState:
    """Driver-side state of one peer task."""

    peer: ID
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ready: trio.Event = field(default_factory=trio.Event)
    wake: trio.Event = field(default_factory=trio.Event)
    protocol: str | None = None
    ip: str | None = None
    direct: Any = None
    """The muxed stream, when it offers ``write_nowait`` (meshmerge's yamux)."""
    idle: bool = False
    """The writer task holds no frames and waits for ``wake``: direct writes are safe."""
    gone: trio.Event = field(default_factory=trio.Event)
    """Set once the peer task has removed the peer from the router and reset its stream."""


class _Notifee(INotifee):
    """Forwards connection events into the service without blocking the swarm."""

    def __init__(self, service: GossipService) -> None:
        self._service = service

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._service._notify_peer(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._service._notify_peer(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


@dataclass
class DriverStats:
    """Driver-side counters (the router keeps its own in ``router.stats``)."""

    peers_added: int = 0
    peers_removed: int = 0
    bad_frames: int = 0
    slow_writes: int = 0
    disconnects: int = 0
    dials: int = 0
    dials_skipped: int = 0
    px_records: int = 0
    """PX entries whose signed peer record verified."""
    px_invalid: int = 0
    """PX entries with a record that did not verify (ignored, logged)."""
    px_unsigned: int = 0
    """PX entries without a record for a peer of unknown address (ignored)."""
    validator_errors: int = 0
    handler_errors: int = 0
    delivered: int = 0
    read_pauses: int = 0
    """Times a push-mode reader stopped taking a peer's data because handlers fell behind."""


class GossipService:
    """GossipSub on a py-libp2p host, driven from one trio nursery (see the module docstring)."""

    def __init__(self, host: BasicHost, identity: Identity, config: GossipConfig | None = None) -> None:
        config = config or GossipConfig()
        config.validate()
        self.host = host
        self.config = config
        self._app_scores: dict[bytes, float] = {}
        self._base_app_score: Callable[[bytes], float] = _no_app_score
        score = config.score
        if score is not None:
            self._base_app_score = score.app_specific_score
            score = dataclasses.replace(score, app_specific_score=self._app_score)
        self._direct = [_direct_peer(a) for a in config.direct_peers]
        self.router = GossipSubRouter(
            Ed25519Identity(identity.seed),
            params=config.params,
            score_params=score,
            thresholds=config.thresholds,
            validator=self._router_validator,
            direct_peers=[pid.to_bytes() for pid, _ in self._direct],
            rng=random.Random(),
            now=time.monotonic(),
            peer_record=self._signed_record,
        )
        if self.router.peer_id != host.get_id().to_bytes():
            raise ValueError("GossipService: identity does not match the host's peer id")
        self.stats = DriverStats()
        self._topics: dict[str, _Topic] = {}
        self._peers: dict[ID, _PeerState] = {}
        self._by_bytes: dict[bytes, _PeerState] = {}  # the same, keyed as the router names peers
        self._failures: dict[ID, int] = {}
        self._not_pubsub: set[ID] = set()
        self._readers: dict[ID, trio.CancelScope] = {}
        self._dialing: set[ID] = set()
        self._dial_queue: deque[ID] = deque()
        self._dropping: dict[ID, bool] = {}  # peer -> asked to drop again while closing
        self._nursery: trio.Nursery | None = None
        self._notify_send, self._notify_recv = trio.open_memory_channel[ID](1024)
        self._val_send, self._val_recv = trio.open_memory_channel[PendingValidation](
            config.params.max_pending_validations + 1
        )
        self._drained = trio.lowlevel.ParkingLot()
        limit = config.params.max_message_size + 64 * 1024
        self._codec_limits = CodecLimits(max_rpc_size=limit)
        self._notifee = _Notifee(self)

    # ================================================================== public API

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started()`` once the stream handlers are registered."""
        if self._nursery is not None:
            raise RuntimeError("GossipService.run() is already running")
        network = self.host.get_network()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for proto in OUR_PROTOCOLS:
                    self.host.set_stream_handler(TProtocol(proto), self._handle_stream)
                network.register_notifee(self._notifee)
                for pid, addr in self._direct:
                    self.host.get_peerstore().add_addrs(pid, [addr], 3600 * 24 * 365)
                with contextlib.suppress(Exception):  # identify issues it too; PX needs it from the start
                    env_to_send_in_RPC(self.host)
                nursery.start_soon(self._peer_manager)
                nursery.start_soon(self._heartbeat)
                for _ in range(self.config.max_validation_concurrency):
                    nursery.start_soon(self._validation_worker)
                self._reconcile()
                for pid, _ in self._direct:
                    self._dial(pid)
                log.info("gossip: serving %s on %s", ", ".join(OUR_PROTOCOLS), self.host.get_id().to_base58())
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with contextlib.suppress(Exception):
                network.remove_notifee(self._notifee)
            for proto in OUR_PROTOCOLS:
                with contextlib.suppress(Exception):
                    self.host.remove_stream_handler(TProtocol(proto))
            for scope in list(self._readers.values()):
                scope.cancel()
            # readers run in py-libp2p's handler tasks: wait (bounded) until they have left
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.shutdown_timeout):
                while self._readers:
                    await trio.sleep(0.01)
            log.info("gossip: stopped")

    def subscribe(self, topic: str, validator: Validator | SyncValidator, handler: Handler) -> None:
        """Join ``topic``; messages are validated by ``validator`` then given to ``handler``.

        A plain (non-async) validator runs inline and is the fast path; use an async one
        only if validating needs to await something.
        """
        self._topics[topic] = _Topic(validator, handler, not _is_async(validator))
        self.router.subscribe(topic, time.monotonic())
        self._pump()

    def unsubscribe(self, topic: str) -> None:
        self._topics.pop(topic, None)
        self.router.unsubscribe(topic, time.monotonic())
        self._pump()

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign (StrictSign) and send ``data`` on ``topic``.

        Waits (up to ``publish_wait_timeout``) while some peer's outgoing queue is more
        than half full, so a burst of publishes slows down instead of overflowing the
        queue of a peer that is merely a little behind.
        """
        with trio.move_on_after(self.config.publish_wait_timeout):
            while self._queue_pressure():
                await self._drained.park()
        self.router.publish(topic, data, time.monotonic())
        self._pump()
        await trio.lowlevel.checkpoint()

    def set_app_score(self, peer: bytes, value: float) -> None:
        """Application-specific score (P5) for ``peer``, e.g. from the reputation layer.

        Added to ``config.score.app_specific_score(peer)`` if the config supplies one; weighted by
        ``app_specific_weight`` (0 in a default PeerScoreParams, so set it to make P5 count).
        """
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"app score must be finite, got {value!r}")
        if value == 0.0:
            self._app_scores.pop(peer, None)
        else:
            self._app_scores[peer] = float(value)
        if self.router.score is not None:
            self.router.score.invalidate(peer)

    def peers(self) -> list[dict[str, str | int | float | bool]]:
        r = self.router
        out: list[dict[str, str | int | float | bool]] = []
        for pb, st in r.peers.items():
            mesh = sorted(t for t, m in r.mesh.items() if pb in m)
            out.append(
                {
                    "peer_id": ID(pb).to_base58(),
                    "protocol": st.protocol,
                    "outbound": st.outbound,
                    "ip": ",".join(st.ips),
                    "topics": ",".join(sorted(st.topics)),
                    "mesh": ",".join(mesh),
                    "direct": pb in r.direct,
                    "score": r.peer_score(pb),
                    "queued_bytes": r.queued_bytes(pb),
                }
            )
        return out

    def scores(self) -> list[dict[str, str | int | float | bool]]:
        r = self.router
        sc = r.score
        out: list[dict[str, str | int | float | bool]] = []
        for pb in r.peers:
            row: dict[str, str | int | float | bool] = {
                "peer_id": ID(pb).to_base58(),
                "score": r.peer_score(pb),
                "app_score": self._app_scores.get(pb, 0.0),
                "behaviour_penalty": sc.behaviour_penalty(pb) if sc is not None else 0.0,
                "graylisted": r.peer_score(pb) < r.thresholds.graylist_threshold,
            }
            if sc is not None:
                for topic in sorted(self._topics):
                    for name, value in sc.topic_counters(pb, topic).items():
                        row[f"{topic}:{name}"] = value
            out.append(row)
        return out

    def topics(self) -> list[dict[str, str | int | float | bool]]:
        r = self.router
        names = set(r.subscriptions) | set(r.fanout) | set(r.topics)
        return [
            {
                "topic": t,
                "subscribed": t in r.subscriptions,
                "peers": len(r.topics.get(t, ())),
                "mesh": len(r.mesh.get(t, ())),
                "fanout": len(r.fanout.get(t, ())),
            }
            for t in sorted(names)
        ]

    # ================================================================== router glue

    def _signed_record(self, peer: bytes) -> bytes | None:
        """Marshalled signed peer record of ``peer`` (ours included) for the PX entries we send."""
        try:
            pid = ID(peer)
            ps = self.host.get_peerstore()
            env = ps.get_local_record() if pid == self.host.get_id() else ps.get_peer_record(pid)
            data = env.marshal_envelope() if env is not None else None
            # a record beyond the codec's bound would make the receiver refuse the whole RPC
            return data if data is not None and len(data) <= MAX_RECORD_BYTES else None
        except Exception as exc:
            log.debug("gossip: no signed record for %s: %r", peer.hex(), exc)
            return None

    def _app_score(self, peer: bytes) -> float:
        return self._base_app_score(peer) + self._app_scores.get(peer, 0.0)

    def _router_validator(self, topic: str, msg: Message, peer: bytes) -> Validation | None:
        # None parks the message for an asynchronous verdict from a worker.
        t = self._topics.get(topic)
        if t is None:
            return Validation.IGNORE
        if not t.inline:
            return None
        try:
            verdict = t.validator(msg.from_peer or b"", msg.data or b"")
            if not isinstance(verdict, Validation):
                if inspect.iscoroutine(verdict):
                    verdict.close()
                raise TypeError(f"validator returned {verdict!r}, not a Validation")
        except Exception:
            self.stats.validator_errors += 1
            log.exception("gossip: validator for %r raised; ignoring the message", topic)
            return Validation.IGNORE
        return verdict

    def _queue_pressure(self) -> bool:
        p = self.config.params
        r = self.router
        for pb, st in r.peers.items():
            if (
                r.queued_bytes(pb) * 2 > p.max_peer_queue_bytes
                or len(st.queue) * 2 > p.max_peer_queue_messages
            ):
                return True
        return False

    def _pump(self) -> None:
        """Carry out what the router asked for after an event. Never blocks."""
        r = self.router
        for pb in r.peers_with_output():
            st = self._by_bytes.get(pb)
            if st is not None and not (st.idle and self._write_now(st, pb)):
                st.wake.set()
        for pb in r.take_disconnects():
            self._drop(ID(pb), "router: outgoing queue overflow (slow peer)")
        for pb in r.take_connects():
            self._dial(ID(pb))
        for src, pi in r.take_px():
            self._px_offer(src, pi)
        for pv in r.take_validations():
            try:
                self._val_send.send_nowait(pv)
            except trio.WouldBlock:
                r.report_validation(pv.mid, Validation.IGNORE, time.monotonic())

    def _write_now(self, st: _PeerState, pb: bytes) -> bool:
        """Hand the peer's queued frames to its stream without waiting; False: the writer must."""
        stream = st.direct
        r = self.router
        if stream is None or r.queued_bytes(pb) > self.config.max_write_batch_bytes:
            return False
        if not stream.can_write_nowait(r.queued_bytes(pb)):
            return False
        batch = []
        while (frame := r.pop_frame(pb)) is not None:
            batch.append(frame)
        if not batch:
            return True
        stream.write_nowait(b"".join(batch) if len(batch) > 1 else batch[0])
        if self._drained:
            self._drained.unpark_all()
        return True

    def _notify_peer(self, peer: ID) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._notify_send.send_nowait(peer)

    # ================================================================== tasks

    async def _peer_manager(self) -> None:
        async for peer in self._notify_recv:
            self._sync_peer(peer)

    def _connected(self, peer: ID) -> bool:
        try:
            return bool(self.host.get_network().get_connections(peer))
        except Exception:
            return False

    def _sync_peer(self, peer: ID) -> None:
        """Start a peer task for a connected peer, or stop it for a gone one."""
        if peer == self.host.get_id():
            return
        st = self._peers.get(peer)
        if self._connected(peer):
            if st is None and peer not in self._not_pubsub:
                self._start_peer(peer)
        else:
            self._not_pubsub.discard(peer)
            self._failures.pop(peer, None)
            if st is not None:
                st.scope.cancel()
            reader = self._readers.get(peer)
            if reader is not None:
                reader.cancel()

    def _start_peer(self, peer: ID) -> _PeerState:
        st = self._peers.get(peer)
        if st is None:
            st = self._peers[peer] = _PeerState(peer)
            self._by_bytes[peer.to_bytes()] = st
            if self._nursery is not None:
                self._nursery.start_soon(self._peer_task, st)
        return st

    def _reconcile(self) -> None:
        try:
            live = list(self.host.get_network().get_connections_map())
        except Exception:
            return
        for peer in live:
            self._sync_peer(peer)
        for peer in [p for p in self._peers if p not in live]:
            self._sync_peer(peer)

    async def _heartbeat(self) -> None:
        interval = self.config.params.heartbeat_interval
        deadline = trio.current_time()
        while True:
            deadline += interval
            await trio.sleep_until(deadline)
            now_trio = trio.current_time()
            if now_trio > deadline + interval:  # we fell behind (overloaded); do not burst
                deadline = now_trio
            self.router.on_heartbeat(time.monotonic())
            self._pump()
            if self.router.heartbeat_ticks % self.config.reconcile_interval_ticks == 0:
                self._reconcile()

    async def _peer_task(self, st: _PeerState) -> None:
        peer = st.peer
        pb = peer.to_bytes()
        added = False
        joined = 0.0
        stream: INetStream | None = None
        try:
            with st.scope:
                with trio.move_on_after(self.config.open_stream_timeout) as cs:
                    try:
                        stream = await self.host.new_stream(peer, [TProtocol(p) for p in OUR_PROTOCOLS])
                    except Exception as exc:
                        if self._connected(peer):
                            log.log(_level(exc), "gossip: %s does not speak pubsub (%r)", peer, exc)
                            self._not_pubsub.add(peer)
                        return
                if cs.cancelled_caught or stream is None:
                    log.info("gossip: opening a pubsub stream to %s timed out", peer)
                    return
                proto = str(stream.get_protocol())
                if proto not in OUR_PROTOCOLS:  # py-libp2p did not record what it negotiated
                    log.info("gossip: stream to %s negotiated %r; not a pubsub stream", peer, proto)
                    return
                swarm_conns = self.host.get_network().get_connections(peer)
                ip = _conn_ip(swarm_conns[0]) if swarm_conns else None
                outbound = _conn_outbound(swarm_conns[0]) if swarm_conns else False
                st.protocol, st.ip = proto, ip
                muxed = getattr(stream, "muxed_stream", stream)
                if callable(getattr(muxed, "write_nowait", None)):
                    st.direct = muxed
                self.router.add_peer(pb, proto, outbound, ip or (), time.monotonic())
                added = True
                joined = time.monotonic()
                self.stats.peers_added += 1
                st.ready.set()
                self._pump()
                log.info(
                    "gossip: peer %s joined (%s, %s)", peer, proto, "outbound" if outbound else "inbound"
                )
                async with trio.open_nursery() as session:
                    session.start_soon(self._watch_outbound, st, stream, session.cancel_scope)
                    await self._write_loop(st, stream)
                    session.cancel_scope.cancel()
        finally:
            if added:
                self.router.remove_peer(pb, time.monotonic())
                self.stats.peers_removed += 1
                log.info("gossip: peer %s left", peer)
            st.direct = None
            if self._peers.get(peer) is st:
                del self._peers[peer]
            if self._by_bytes.get(pb) is st:
                del self._by_bytes[pb]
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
                    await stream.reset()
            self._drained.unpark_all()
            st.gone.set()
        # the connection may have outlived the stream: retry a bounded number of times
        if self._nursery is not None and self._connected(peer) and peer not in self._not_pubsub:
            # a session shorter than STABLE_SESSION_HEARTBEATS counts as a failure, so a remote that
            # resets every stream we open is not re-dialled (and logged) every heartbeat forever
            stable = self.config.params.heartbeat_interval * STABLE_SESSION_HEARTBEATS
            lasted = added and time.monotonic() - joined >= stable
            fails = 0 if lasted else self._failures.get(peer, 0) + 1
            self._failures[peer] = fails
            if fails <= self.config.stream_retry_limit:
                await trio.sleep(self.config.params.heartbeat_interval)
                if self._nursery is not None and self._connected(peer):
                    self._sync_peer(peer)
            else:
                log.info("gossip: giving up on a pubsub stream to %s after %d failures", peer, fails)
                self._not_pubsub.add(peer)  # until it reconnects or opens a pubsub stream to us

    async def _watch_outbound(self, st: _PeerState, stream: INetStream, session: trio.CancelScope) -> None:
        """End the session when the remote closes or resets our outbound stream.

        The remote never writes on it, so any read result (EOF, reset, data) means it is gone;
        without this an idle writer would only notice at its next write.
        """
        try:
            data = await stream.read(1)
            log.debug("gossip: %s %s our outbound stream", st.peer, "wrote on" if data else "closed")
        except Exception as exc:
            log.log(_level(exc), "gossip: outbound stream to %s ended: %r", st.peer, exc)
        session.cancel()

    async def _write_loop(self, st: _PeerState, stream: INetStream) -> None:
        r = self.router
        pb = st.peer.to_bytes()
        cap = self.config.max_write_batch_bytes
        out = getattr(stream, "muxed_stream", stream)  # skip NetStream's per-call lock
        while True:
            st.wake = trio.Event()
            batch: list[bytes] = []
            size = 0
            while size < cap:
                frame = r.pop_frame(pb)
                if frame is None:
                    break
                batch.append(frame)
                size += len(frame)
            if not batch:
                if pb not in r.peers:
                    return
                st.idle = True
                try:
                    await st.wake.wait()
                finally:
                    st.idle = False
                continue
            with trio.move_on_after(self.config.write_timeout) as cs:
                try:
                    await out.write(b"".join(batch) if len(batch) > 1 else batch[0])
                except Exception as exc:
                    log.log(_level(exc), "gossip: writing to %s failed: %r", st.peer, exc)
                    return
            if cs.cancelled_caught:
                self.stats.slow_writes += 1
                self._drop(st.peer, f"write blocked for {self.config.write_timeout:g}s (slow peer)")
                return
            self._drained.unpark_all()

    async def _handle_stream(self, stream: INetStream) -> None:
        """Inbound stream handler: read frames from the peer until EOF, reset or shutdown."""
        peer = stream.muxed_conn.peer_id
        if self._nursery is None:
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        old = self._readers.get(peer)
        if old is not None:
            log.debug("gossip: new inbound stream from %s replaces the old one", peer)
            old.cancel()
        scope = trio.CancelScope()
        self._readers[peer] = scope
        try:
            with scope:
                self._not_pubsub.discard(peer)
                st = self._start_peer(peer)
                with trio.move_on_after(self.config.open_stream_timeout):
                    await st.ready.wait()
                if not st.ready.is_set():
                    log.info("gossip: no outbound stream to %s came up; ignoring its inbound stream", peer)
                    return
                await self._read_loop(peer, stream)
        finally:
            if self._readers.get(peer) is scope:
                del self._readers[peer]
            with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.reset()

    async def _read_loop(self, peer: ID, stream: INetStream) -> None:
        pb = peer.to_bytes()
        decoder = FrameDecoder(self._codec_limits)
        src = getattr(stream, "muxed_stream", stream)  # skip NetStream's per-call lock
        if callable(getattr(src, "set_receiver", None)):
            await self._push_read_loop(peer, pb, decoder, src)
            return
        chunk = self.config.read_chunk_bytes
        r = self.router
        while True:
            try:
                data = await src.read(chunk)
            except Exception as exc:
                log.log(_level(exc), "gossip: inbound stream from %s ended: %r", peer, exc)
                return
            if not data:
                log.debug("gossip: inbound stream from %s closed", peer)
                return
            if not self._on_data(peer, pb, decoder, data):
                return
            deliveries = r.take_deliveries()  # accepted inline by plain validators
            if deliveries:
                await self._deliver(deliveries)

    async def _push_read_loop(self, peer: ID, pb: bytes, decoder: FrameDecoder, src: Any) -> None:
        """Read loop for a stream that pushes its data (meshmerge's yamux, ``set_receiver``).

        Frames are decoded and handled inside the session's reader task as they arrive;
        this task only runs handlers for messages accepted inline. It detaches the
        receiver while more than ``max_pending_validations`` deliveries wait, so a slow
        handler makes the peer wait (yamux window) instead of growing a queue.
        """
        r = self.router
        limit = self.config.params.max_pending_validations
        pending: list[Delivery] = []
        ended = detached = False
        wake = trio.Event()

        def on_data(data: bytes) -> None:
            nonlocal ended, detached
            if ended:
                return
            try:
                ok = bool(data) and self._on_data(peer, pb, decoder, data)
            except BaseException:
                ok = False  # a bug below: end this stream (yamux logs it and resets the stream)
                raise
            finally:
                if not ok:
                    ended = True
                    wake.set()
            deliveries = r.take_deliveries()
            if deliveries:
                pending.extend(deliveries)
                if len(pending) >= limit:
                    detached = True
                    self.stats.read_pauses += 1
                    src.set_receiver(None)
                wake.set()

        src.set_receiver(on_data)
        try:
            while True:
                if pending:
                    batch = pending[:]
                    pending.clear()
                    await self._deliver(batch)
                    if detached and not ended:
                        detached = False
                        src.set_receiver(on_data)  # hands over what buffered meanwhile
                    continue
                if ended:
                    log.debug("gossip: inbound stream from %s ended", peer)
                    return
                wake = trio.Event()
                await wake.wait()
        finally:
            src.set_receiver(None)

    def _on_data(self, peer: ID, pb: bytes, decoder: FrameDecoder, data: bytes) -> bool:
        """Decode and handle the frames in ``data``; False (peer dropped) on a malformed frame."""
        r = self.router
        try:
            rpcs = decoder.feed(data)
        except GossipCodecError as exc:
            self.stats.bad_frames += 1
            if r.score is not None and pb in r.peers:
                r.score.add_penalty(pb, 1)
            self._drop(peer, f"malformed frame: {exc}")
            return False
        now = time.monotonic()
        for rpc in rpcs:
            r.on_rpc(pb, rpc, now)
        self._pump()
        return True

    async def _validation_worker(self) -> None:
        r = self.router
        async for pv in self._val_recv:
            topic = self._topics.get(pv.topic)
            author = pv.message.from_peer or b""
            data = pv.message.data or b""
            verdict = Validation.IGNORE
            if topic is not None:
                try:
                    result = topic.validator(author, data)
                    verdict = await result if inspect.isawaitable(result) else result
                    if not isinstance(verdict, Validation):
                        raise TypeError(f"validator returned {verdict!r}, not a Validation")
                except Exception:
                    self.stats.validator_errors += 1
                    log.exception("gossip: validator for %r raised; ignoring the message", pv.topic)
                    verdict = Validation.IGNORE
            r.report_validation(pv.mid, verdict, time.monotonic())
            deliveries = r.take_deliveries()
            self._pump()
            await self._deliver(deliveries)

    async def _deliver(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            t = self._topics.get(d.topic)
            if t is None:
                continue
            self.stats.delivered += 1
            try:
                await t.handler(d.author, d.data)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("gossip: handler for %r raised", d.topic)

    # ================================================================== connections

    def _drop(self, peer: ID, reason: str) -> None:
        if self._nursery is None:
            return
        self.stats.disconnects += 1
        if peer in self._dropping:
            log.debug("gossip: dropping %s again: %s", peer, reason)
            self._dropping[peer] = True  # closing already; close again whatever appeared meanwhile
            return
        log.info("gossip: dropping %s: %s", peer, reason)
        self._dropping[peer] = False
        self._nursery.start_soon(self._close_peer, peer)

    async def _close_peer(self, peer: ID) -> None:
        """Close the peer's connections one by one.

        Not ``swarm.close_peer``: it finishes by dropping the peer's whole entry from the
        connection map, so a connection the peer opened meanwhile is forgotten, not closed.
        """
        try:
            while True:
                st = self._peers.get(peer)
                if st is not None:
                    st.scope.cancel()
                    # the router forgets the peer before its connections go (bounded: the task's
                    # clean-up is)
                    with trio.move_on_after(2.0):
                        await st.gone.wait()
                reader = self._readers.get(peer)
                if reader is not None:
                    reader.cancel()
                with trio.move_on_after(5.0):
                    for conn in list(self.host.get_network().get_connections(peer)):
                        try:
                            await conn.close()
                        except Exception as exc:
                            log.log(_level(exc), "gossip: closing %s: %r", peer, exc)
                if not self._dropping.get(peer):
                    return
                self._dropping[peer] = False
        finally:
            self._dropping.pop(peer, None)

    def _px_offer(self, source: bytes, pi: PeerInfo) -> None:
        """Check one PX entry the router accepted from ``source`` and dial it if it is usable."""
        try:
            peer = ID(pi.peer_id or b"")
        except Exception:
            return
        if peer == self.host.get_id() or peer in self._dialing or self._connected(peer):
            return
        ps = self.host.get_peerstore()
        if pi.signed_peer_record:
            try:
                rec = open_px_record(pi.signed_peer_record, peer.to_bytes())
            except PeerRecordError as exc:
                self.stats.px_invalid += 1
                log.warning("gossip: ignoring PX record for %s from %s: %s", peer, _b58(source), exc)
                return
            self.stats.px_records += 1
            try:
                ps.consume_peer_record(rec.envelope, int(self.config.px_addr_ttl))
            except Exception as exc:
                log.info("gossip: peerstore refused the PX record of %s: %r", peer, exc)
                return
            log.debug("gossip: PX from %s: %s at %s", _b58(source), peer, [str(a) for a in rec.addrs])
        elif not self._known_addrs(peer):
            self.stats.px_unsigned += 1
            log.debug("gossip: PX entry %s from %s has no record and no known address", peer, _b58(source))
            return
        self._dial(peer)

    def _known_addrs(self, peer: ID) -> bool:
        try:
            return bool(self.host.get_peerstore().addrs(peer))
        except Exception:  # py-libp2p raises PeerStoreError for a peer it never heard of
            return False

    def _dial(self, peer: ID) -> None:
        if self._nursery is None or peer == self.host.get_id() or peer in self._dialing:
            return
        if self._connected(peer):
            self._sync_peer(peer)
            return
        if not self._known_addrs(peer):
            self.stats.dials_skipped += 1
            log.debug("gossip: no known address for %s; not dialing", peer)
            return
        if len(self._dialing) >= self.config.max_concurrent_dials:
            if peer in self._dial_queue:
                return
            if len(self._dial_queue) >= self.config.max_pending_dials:
                self.stats.dials_skipped += 1
                log.debug("gossip: dial to %s dropped (%d dials waiting)", peer, len(self._dial_queue))
                return
            self._dial_queue.append(peer)
            return
        self._dialing.add(peer)
        self.stats.dials += 1
        self._nursery.start_soon(self._dial_task, peer)

    async def _dial_task(self, peer: ID) -> None:
        try:
            with trio.move_on_after(self.config.dial_timeout):
                await self.host.get_network().dial_peer(peer)
                self._sync_peer(peer)
        except Exception as exc:
            log.info("gossip: dialing %s failed: %r", peer, exc)
        finally:
            self._dialing.discard(peer)
            while self._dial_queue and len(self._dialing) < self.config.max_concurrent_dials:
                self._dial(self._dial_queue.popleft())

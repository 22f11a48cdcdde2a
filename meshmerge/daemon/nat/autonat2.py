"""AutoNAT v2 (``/libp2p/autonat/2/dial-request``, ``/libp2p/autonat/2/dial-back``): trio drivers.

The rules (which address, what padding, how verdicts combine) are in
``autonat2_core``; the messages in ``autonat2_wire``. Here: the server dials
back from its own throwaway identity and an ephemeral port (spec: "SHOULD NOT
reuse their listening port", so a dial-back cannot punch a hole by accident),
and the client answers dial-backs on its host, checking the nonce.

Next to v1 (``autonat.py``) rather than replacing it: v1 answers "is this
node reachable at all" and go/js peers still run it; v2 answers it per
address and lets a server verify addresses on an IP other than the one the
request came from, which v1 must refuse.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from . import autonat2_wire as wire
from .autonat import Reachability, peers_speaking
from .autonat2_core import AddressReachability, AutoNATv2Config, NonceBook, Refusal, ServerPolicy
from .connutil import conn_of_stream, is_relayed, public_addrs
from .hostfactory import key_pair, make_host

DIAL_REQUEST = TProtocol("/libp2p/autonat/2/dial-request")
DIAL_BACK = TProtocol("/libp2p/autonat/2/dial-back")
MAX_MSG_BYTES = 8192
"""Largest message on either stream (a DialRequest of 64 addresses, or one 4 KiB data chunk)."""
MIN_DATA_CHUNK = 512
"""Dial data must come in chunks averaging at least this many bytes (ours are 4096)."""

log = logging.getLogger(__name__)

__all__ = [
    "DIAL_BACK",
    "DIAL_REQUEST",
    "AutoNATv2Client",
    "AutoNATv2Config",
    "AutoNATv2Error",
    "AutoNATv2Server",
    "CheckResult",
]


class AutoNATv2Error(Exception):
    """A check produced no verdict (refusal, protocol error, timeout, unverifiable claim)."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One server's answer: which of our addresses it dialed and whether that worked.

    reachable: True (dial-back with our nonce arrived), False (server could not connect),
    None (connected but the nonce exchange failed: inconclusive).
    data_bytes: padding the server asked for (non-zero when the address's IP was not ours).
    """

    server: ID
    addr: multiaddr.Multiaddr
    reachable: bool | None
    data_bytes: int


async def _send(stream: INetStream, payload: bytes) -> None:
    await stream.write(encode_varint_prefixed(payload))


async def _recv(stream: INetStream) -> bytes:
    return bytes(await read_varint_prefixed_bytes_limited(stream, MAX_MSG_BYTES))


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(Exception):
        await stream.reset()


async def _close(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(Exception):
        await stream.close()


class AutoNATv2Server:
    """Answers dial requests: one address per request, dialed from a throwaway identity."""

    def __init__(self, host: IHost, config: AutoNATv2Config | None = None) -> None:
        self.host = host
        self.config = config or AutoNATv2Config()
        self.policy = ServerPolicy(self.config)
        self._dialer: IHost | None = None
        self.stats = {"served": 0, "rejected": 0, "refused": 0, "data_requested": 0, "bad": 0}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AutoNATv2Server]:
        self._dialer = make_host(key_pair())
        async with self._dialer.run([]):
            self.host.set_stream_handler(DIAL_REQUEST, self._handle)
            try:
                yield self
            finally:
                self.host.remove_stream_handler(DIAL_REQUEST)

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(self.config.request_timeout_s + self.config.dial_timeout_s):
                req = wire.decode(await _recv(stream))
                if not isinstance(req, wire.DialRequest):
                    raise wire.WireError("expected DialRequest")
                resp = await self._answer(stream, peer, req)
                await _send(stream, wire.encode(resp))
            await _close(stream)
        except (wire.WireError, ValueError) as exc:
            self.stats["bad"] += 1
            log.debug("autonat2: bad request from %s: %s", peer, exc)
            await _reset(stream)
        except Exception as exc:  # timeouts, resets: never let a peer crash the handler
            log.debug("autonat2: request from %s ended: %r", peer, exc)
            await _reset(stream)

    async def _answer(self, stream: INetStream, peer: ID, req: wire.DialRequest) -> wire.DialResponse:
        conn = conn_of_stream(self.host, stream)
        observed = stream.get_remote_address()
        if conn is None or is_relayed(conn) or not observed:
            self.stats["rejected"] += 1
            return wire.DialResponse(wire.ResponseStatus.E_REQUEST_REJECTED)
        if not self.policy.admit(peer.to_bytes(), trio.current_time()):
            self.stats["rejected"] += 1
            return wire.DialResponse(wire.ResponseStatus.E_REQUEST_REJECTED)
        try:
            plan = self.policy.plan(req.addrs, observed[0])
            if isinstance(plan, Refusal):
                self.stats["refused"] += 1
                return wire.DialResponse(wire.ResponseStatus.E_DIAL_REFUSED)
            if plan.data_bytes:
                self.stats["data_requested"] += 1
                await self._collect_data(stream, plan.idx, plan.data_bytes)
            self.stats["served"] += 1
            status = await self._dial_back(peer, plan.addr, req.nonce)
            return wire.DialResponse(wire.ResponseStatus.OK, plan.idx, status)
        finally:
            self.policy.done()

    async def _collect_data(self, stream: INetStream, idx: int, num_bytes: int) -> None:
        """Ask for ``num_bytes`` of padding and read it (raises if the client sends anything else)."""
        await _send(stream, wire.encode(wire.DialDataRequest(idx, num_bytes)))
        got = messages = 0
        max_messages = num_bytes // MIN_DATA_CHUNK + 1  # a flood of empty chunks is no payment
        while got < num_bytes:
            msg = wire.decode(await _recv(stream))
            if not isinstance(msg, wire.DialDataResponse):
                raise wire.WireError("expected DialDataResponse")
            messages += 1
            if messages > max_messages:
                raise wire.WireError(f"dial data in chunks below {MIN_DATA_CHUNK} bytes")
            got += len(msg.data)

    async def _dial_back(self, peer: ID, addr: multiaddr.Multiaddr, nonce: int) -> wire.DialStatus:
        assert self._dialer is not None
        network = self._dialer.get_network()
        # a deadline before the connection means unreachable, after it: nonce not delivered
        status = wire.DialStatus.E_DIAL_ERROR
        try:
            with trio.move_on_after(self.config.dial_timeout_s):
                try:
                    await network.dial_addr(addr, peer)
                except Exception as exc:
                    log.debug("autonat2: dial-back to %s at %s failed: %r", peer, addr, exc)
                    return wire.DialStatus.E_DIAL_ERROR
                status = wire.DialStatus.E_DIAL_BACK_ERROR
                stream = await self._dialer.new_stream(peer, [DIAL_BACK])
                try:
                    await _send(stream, wire.encode_dial_back(wire.DialBack(nonce)))
                    wire.decode_dial_back_response(await _recv(stream))
                finally:
                    await _close(stream)
                status = wire.DialStatus.OK
            return status
        except Exception as exc:
            log.debug("autonat2: nonce to %s at %s not delivered: %r", peer, addr, exc)
            return wire.DialStatus.E_DIAL_BACK_ERROR
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await network.close_peer(peer)


class AutoNATv2Client:
    """Asks servers to test our addresses one at a time and keeps per-address verdicts."""

    def __init__(self, host: IHost, config: AutoNATv2Config | None = None) -> None:
        self.host = host
        self.config = config or AutoNATv2Config()
        self.config.validate()
        self.nonces = NonceBook()
        self.tracker = AddressReachability(
            self.config.threshold, self.config.result_ttl_s, self.config.max_tracked_addrs
        )
        self.unknown_nonces = 0
        host.set_stream_handler(DIAL_BACK, self._on_dial_back)

    async def _on_dial_back(self, stream: INetStream) -> None:
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                msg = wire.decode_dial_back(await _recv(stream))
                local = ""
                with suppress(Exception):
                    local = str(stream.muxed_conn.get_transport_addresses()[0])
                if not self.nonces.dial_back(msg.nonce, local):
                    self.unknown_nonces += 1
                    await _reset(stream)
                    return
                await _send(stream, wire.encode_dial_back(wire.DialBackResponse()))
            await _close(stream)
        except Exception as exc:
            log.debug("autonat2: bad dial-back: %r", exc)
            await _reset(stream)

    def status(self) -> dict[str, Reachability]:
        return self.tracker.status(trio.current_time())

    async def check(self, server: ID, addrs: Sequence[multiaddr.Multiaddr]) -> CheckResult:
        """Ask ``server`` to test ``addrs`` (first = most wanted) and record its verdict."""
        if not addrs:
            raise AutoNATv2Error("no addresses to check")
        raw = tuple(a.to_bytes() for a in addrs[: wire.MAX_ADDRS])
        nonce = secrets.randbits(64)
        try:
            pending = self.nonces.open(nonce, raw)
        except OverflowError as exc:
            raise AutoNATv2Error(str(exc)) from exc
        data_bytes = 0
        try:
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    stream = await self.host.new_stream(server, [DIAL_REQUEST])
                    try:
                        await _send(stream, wire.encode(wire.DialRequest(raw, nonce)))
                        while True:
                            msg = wire.decode(await _recv(stream))
                            if isinstance(msg, wire.DialResponse):
                                break
                            if not isinstance(msg, wire.DialDataRequest):
                                raise AutoNATv2Error(f"unexpected {type(msg).__name__} from {server}")
                            data_bytes = await self._pay(stream, server, msg, len(raw))
                    except BaseException:
                        await _reset(stream)
                        raise
                    await _close(stream)
            except trio.TooSlowError as exc:
                raise AutoNATv2Error(f"check via {server} timed out") from exc
            except AutoNATv2Error:
                raise
            except Exception as exc:
                raise AutoNATv2Error(f"check via {server} failed: {exc!r}") from exc
            verdict = self._verdict(server, msg, len(raw), pending.dialed_back_on is not None)
        finally:
            self.nonces.close(nonce)
        addr = addrs[msg.addr_idx]
        if verdict is not None:
            self.tracker.record(str(addr), server.to_bytes(), verdict, trio.current_time())
        return CheckResult(server, addr, verdict, data_bytes)

    async def _pay(self, stream: INetStream, server: ID, req: wire.DialDataRequest, n_addrs: int) -> int:
        """Send the requested padding if it is within our budget; else abort (spec: reset)."""
        if req.addr_idx >= n_addrs:
            raise AutoNATv2Error(f"{server} asked for dial data for address #{req.addr_idx} of {n_addrs}")
        if req.num_bytes > self.config.max_dial_data_bytes:
            raise AutoNATv2Error(
                f"{server} asked for {req.num_bytes} bytes of dial data "
                f"(max_dial_data_bytes={self.config.max_dial_data_bytes})"
            )
        chunk = wire.encode(wire.DialDataResponse(bytes(wire.MAX_DATA_CHUNK)))
        frame = encode_varint_prefixed(chunk)
        sent = 0
        while sent < req.num_bytes:
            await stream.write(frame)
            sent += wire.MAX_DATA_CHUNK
        return int(req.num_bytes)

    @staticmethod
    def _verdict(server: ID, resp: wire.DialResponse, n_addrs: int, dialed_back: bool) -> bool | None:
        if resp.status != wire.ResponseStatus.OK:
            try:
                name = wire.ResponseStatus(resp.status).name
            except ValueError:
                name = f"status {resp.status}"
            raise AutoNATv2Error(f"{server} answered {name}")
        if resp.addr_idx >= n_addrs:
            raise AutoNATv2Error(f"{server} names address #{resp.addr_idx} of {n_addrs}")
        if resp.dial_status == wire.DialStatus.OK:
            if not dialed_back:
                raise AutoNATv2Error(f"{server} claims a dial-back that never arrived with our nonce")
            return True
        if resp.dial_status == wire.DialStatus.E_DIAL_ERROR:
            return False
        if resp.dial_status == wire.DialStatus.E_DIAL_BACK_ERROR:
            return None
        raise AutoNATv2Error(f"{server} sent unknown dial status {resp.dial_status}")

    async def check_each(
        self, servers: Sequence[ID], addrs: Sequence[multiaddr.Multiaddr]
    ) -> dict[str, Reachability]:
        """Test every address with every server (one address per request), concurrently per server."""
        errors: list[str] = []

        async def one_server(server: ID) -> None:
            for addr in addrs:
                try:
                    await self.check(server, [addr])
                except AutoNATv2Error as exc:
                    errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            for s in servers:
                nursery.start_soon(one_server, s)
        for e in errors:
            log.debug("autonat2: %s", e)
        now = trio.current_time()
        return {str(a): self.tracker.evaluate(str(a), now) for a in addrs}

    def candidate_servers(self) -> list[ID]:
        """Connected peers that announced the v2 dial-request protocol."""
        return peers_speaking(self.host, DIAL_REQUEST)

    async def run(self) -> None:
        """Check our public address candidates with connected servers, forever."""
        while True:
            servers = self.candidate_servers()[: 2 * self.config.threshold]
            candidates = public_addrs(self.host, 8)
            verdicts: dict[str, Reachability] = {}
            if servers and candidates:
                verdicts = await self.check_each(servers, candidates)
            unknown = not verdicts or Reachability.UNKNOWN in verdicts.values()
            await trio.sleep(
                self.config.unknown_probe_interval_s if unknown else self.config.probe_interval_s
            )

"""Relay circuit addresses are advertised while a reservation is held (loopback).

identify (+push), the signed peer record, DHT provider records and find-peer
answers carry ``/…/p2p/<relay>/p2p-circuit/p2p/<us>`` once a reservation is
granted and drop it when the reservation ends; a third peer dials the circuit
address it found without being told the relay. The same through real NAT is in
test_nat_netns.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import env_to_send_in_RPC

from meshmerge.daemon.advertise import strip_peer_suffix, with_peer_suffix
from meshmerge.daemon.dht import DHTConfig, DHTMode
from meshmerge.daemon.dht.service import running_dht
from meshmerge.daemon.host import HostConfig
from meshmerge.daemon.host import running_host as daemon_host
from meshmerge.daemon.identity import Identity
from meshmerge.daemon.nat.circuit import CircuitDialConfig, CircuitDialError, connect, split_circuit
from meshmerge.daemon.nat.connutil import is_circuit_addr, is_relayed
from meshmerge.daemon.nat.hostfactory import key_pair, make_host, running_host
from meshmerge.daemon.nat.relay import RelayClient, RelayService, RelayServiceConfig

LOOP = ["/ip4/127.0.0.1/tcp/0"]
ECHO = TProtocol("/meshmerge/test/echo/1")
RELAY_ID = "12D3KooWQ4b1dW5sVCLqkS1Nq7mN6E9mF9mGx8n2q4mD5g3p5Qjw"


def _circuits(addrs: list[multiaddr.Multiaddr]) -> list[str]:
    return [str(a) for a in addrs if is_circuit_addr(a)]


async def _until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def _echo(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        await stream.close()


def test_stock_basic_host_mangles_circuit_addresses() -> None:
    """Shortfall of py-libp2p 0.8.1: get_addrs cuts a circuit address at the relay's /p2p/."""
    circuit = multiaddr.Multiaddr(f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit")
    host = make_host(key_pair(), addrs_factory=lambda cands: [*cands, circuit])
    me = host.get_id()
    out = [str(a) for a in host.get_addrs()]
    assert f"/ip4/203.0.113.10/tcp/4001/p2p/{me}" in out  # the relay's socket, with OUR id
    assert not any("p2p-circuit" in a for a in out)


def test_peer_suffix_helpers_keep_the_relay() -> None:
    me = multiaddr.Multiaddr("/p2p/12D3KooWLeLpT6JYBmMgsJjVkj8rWy9zX6dWWpGxuCeJu8KdHH3t")
    c = multiaddr.Multiaddr(f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit")
    full = with_peer_suffix(c, me)
    assert str(full) == f"{c}{me}"
    assert with_peer_suffix(full, me) == full
    assert strip_peer_suffix(full) == c and strip_peer_suffix(c) == c
    relay, transport = split_circuit(full) or (None, None)
    assert relay == ID.from_base58(RELAY_ID) and str(transport) == "/ip4/203.0.113.10/tcp/4001"
    assert split_circuit(multiaddr.Multiaddr("/ip4/203.0.113.10/tcp/4001")) is None


def test_circuit_dial_config_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="relay_delay_s"):
        CircuitDialConfig(relay_delay_s=-1).validate()
    with pytest.raises(ValueError, match="max_circuits"):
        CircuitDialConfig(max_circuits=0).validate()


def _cid(data: bytes) -> bytes:
    return bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()


async def _body_advertise_find_and_dial() -> None:
    hop = RelayServiceConfig()
    cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",))
    async with (
        running_host(LOOP) as relay,
        daemon_host(cfg, Identity.generate()) as target,
        daemon_host(cfg, Identity.generate()) as finder,
    ):
        r_svc, t_svc, f_svc = RelayService(relay, hop), RelayService(target), RelayService(finder)
        target.set_stream_handler(ECHO, _echo)
        async with (
            r_svc.running(),
            t_svc.running(),
            f_svc.running(),
            running_dht(relay, DHTConfig(mode=DHTMode.SERVER)),
            running_dht(target, DHTConfig(mode=DHTMode.CLIENT)) as target_dht,
            running_dht(finder, DHTConfig(mode=DHTMode.CLIENT)) as finder_dht,
            trio.open_nursery() as nursery,
        ):
            relay_info = info_from_p2p_addr(relay.get_addrs()[0])
            await target.connect(relay_info)
            await target_dht.bootstrap([relay_info])
            rid, tid = relay.get_id(), target.get_id()
            assert _circuits(target.get_addrs()) == []

            client = RelayClient(target, t_svc)
            scope = trio.CancelScope()

            async def hold(*, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
                with scope:
                    await client.keep_reservation(rid, task_status=task_status)

            await nursery.start(hold)
            expected = f"/p2p/{rid}/p2p-circuit/p2p/{tid}"
            adv = _circuits(target.get_addrs())
            assert adv and all(a.endswith(expected) for a in adv), adv
            # the signed peer record carries it too
            _env, record = consume_envelope(env_to_send_in_RPC(target)[0], "libp2p-peer-record")
            assert any("p2p-circuit" in str(a) for a in record.addrs)
            # identify push told the relay
            await _until(lambda: bool(_circuits(relay.get_peerstore().addrs(tid))))

            # a provider record from the NATed peer names its circuit address
            cid = _cid(b"blob")
            assert await target_dht.provide(cid) >= 1

            # a third peer finds the target by DHT find-peer via the relay, and dials the circuit
            await finder.connect(relay_info)
            await finder_dht.bootstrap([relay_info])
            found = await finder_dht.find_peer(tid)
            assert found is not None and _circuits(found.addrs), found
            providers = await finder_dht.find_providers(cid)
            assert any(p.peer_id == tid and _circuits(p.addrs) for p in providers), providers
            await finder.disconnect(rid)  # "not told the relay": the circuit address names it
            only_circuit = PeerInfo(tid, [a for a in found.addrs if is_circuit_addr(a)])
            conn = await connect(finder, RelayClient(finder, f_svc), only_circuit)
            assert is_relayed(conn)
            s = await finder.new_stream(tid, [ECHO])
            await s.write(b"found by find-peer")
            with trio.fail_after(5):
                assert await s.read(100) == b"found by find-peer"
            await s.close()

            # the reservation ends: the address is withdrawn and the relay is told
            scope.cancel()
            await _until(lambda: not _circuits(target.get_addrs()))
            await _until(lambda: not _circuits(relay.get_peerstore().addrs(tid)))
            _env, record = consume_envelope(env_to_send_in_RPC(target)[0], "libp2p-peer-record")
            assert not any("p2p-circuit" in str(a) for a in record.addrs)
            nursery.cancel_scope.cancel()


def test_reservation_is_advertised_found_by_dht_and_dialed_then_withdrawn() -> None:
    trio.run(_body_advertise_find_and_dial)


async def _body_no_address() -> None:
    async with running_host(LOOP) as host:
        svc = RelayService(host)
        other = ID.from_pubkey(key_pair().public_key)
        with pytest.raises(CircuitDialError, match="no usable address"):
            await connect(host, RelayClient(host, svc), PeerInfo(other, []))
        bad = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{RELAY_ID}/p2p-circuit/p2p/{other}")
        with pytest.raises(CircuitDialError, match=f"via {RELAY_ID}"):
            await connect(
                host, RelayClient(host, svc), PeerInfo(other, [bad]), CircuitDialConfig(timeout_s=5)
            )


def test_circuit_dial_fails_cleanly() -> None:
    trio.run(_body_no_address)


def test_address_providers_are_capped_and_a_broken_one_is_skipped() -> None:
    from meshmerge.daemon.advertise import MAX_PROVIDED_ADDRS
    from meshmerge.daemon.host import build_host

    host = build_host(HostConfig(), Identity.generate())
    me = str(host.get_id())
    circuit = multiaddr.Multiaddr(f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY_ID}/p2p-circuit")

    def broken() -> list[multiaddr.Multiaddr]:
        raise RuntimeError("boom")

    def many() -> list[multiaddr.Multiaddr]:
        return [multiaddr.Multiaddr(f"/ip4/203.0.113.{i}/tcp/1") for i in range(100)]

    host.add_addr_provider(broken)
    host.add_addr_provider(lambda: [circuit])
    host.add_addr_provider(many)
    out = [str(a) for a in host.get_addrs()]
    assert out[0] == f"{circuit}/p2p/{me}"
    assert len(out) == MAX_PROVIDED_ADDRS
    host.remove_addr_provider(many)
    assert [str(a) for a in host.get_addrs()] == [f"{circuit}/p2p/{me}"]


async def _body_host_dials_circuits() -> None:
    cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",))
    async with (
        running_host(LOOP) as relay,
        daemon_host(cfg, Identity.generate()) as target,
        daemon_host(cfg, Identity.generate()) as other,
    ):
        r_svc, t_svc, o_svc = (
            RelayService(relay, RelayServiceConfig()),
            RelayService(target),
            RelayService(other),
        )
        target.set_stream_handler(ECHO, _echo)
        async with r_svc.running(), t_svc.running(), o_svc.running(), trio.open_nursery() as nursery:
            relay_info = info_from_p2p_addr(relay.get_addrs()[0])
            await target.connect(relay_info)
            await nursery.start(RelayClient(target, t_svc).keep_reservation, relay.get_id())
            tid = target.get_id()
            circuit = [a for a in target.get_addrs() if is_circuit_addr(a)]
            assert circuit
            other.get_peerstore().add_addrs(tid, circuit, 600)  # all it knows: the circuit address
            with pytest.raises(Exception):  # noqa: B017 - our swarm alone cannot dial circuits
                with trio.fail_after(10):
                    await other.new_stream(tid, [ECHO])
            relays = RelayClient(other, o_svc)
            other.set_circuit_dialer(lambda info: connect(other, relays, info))
            with trio.fail_after(15):
                s = await other.new_stream(tid, [ECHO])  # dials the relay named in the address
            await s.write(b"via the circuit")
            with trio.fail_after(5):
                assert await s.read(100) == b"via the circuit"
            await s.close()
            conns = other.get_network().get_connections(tid)
            assert conns and all(is_relayed(c) for c in conns)
            await other.disconnect(tid)
            with trio.fail_after(15):
                await other.connect(PeerInfo(tid, circuit))
            assert other.get_network().get_connections(tid)
            nursery.cancel_scope.cancel()


def test_host_with_a_circuit_dialer_reaches_a_peer_known_only_by_its_circuit_address() -> None:
    trio.run(_body_host_dials_circuits)

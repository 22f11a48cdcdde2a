"""Circuit relay v2 on loopback: reservations, refresh, relayed dial, limits, relay id tag."""

from __future__ import annotations

import time

import pytest
import trio
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.tools.anyio_service import background_trio_service

from meshmerge.daemon.nat.connutil import conns_to, is_relayed
from meshmerge.daemon.nat.hostfactory import running_host
from meshmerge.daemon.nat.relay import (
    RelayClient,
    RelayClientConfig,
    RelayError,
    RelayService,
    RelayServiceConfig,
)

LOOP = ["/ip4/127.0.0.1/tcp/0"]
ECHO = TProtocol("/meshmerge/test/echo/1")


async def _echo(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        await stream.close()


async def _connect(a, b) -> None:  # type: ignore[no-untyped-def]
    await a.connect(info_from_p2p_addr(b.get_addrs()[0]))


def test_config_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="circuit_bytes"):
        RelayServiceConfig(circuit_bytes=1 << 40).validate()
    with pytest.raises(ValueError, match="refresh_fraction"):
        RelayClientConfig(refresh_fraction=1.5).validate()
    # our defaults are small, unlike stock's 1 h / 1 GiB per circuit
    cfg = RelayServiceConfig()
    assert cfg.circuit_duration_s <= 120 and cfg.circuit_bytes <= 128 * 1024


async def _body_reserve_refresh_and_relayed_dial() -> None:
    hop = RelayServiceConfig(reservation_ttl_s=3)
    async with running_host(LOOP) as relay, running_host(LOOP) as target, running_host(LOOP) as dialer:
        r_svc, t_svc, d_svc = RelayService(relay, hop), RelayService(target), RelayService(dialer)
        inbound: list[tuple[object, bool]] = []
        t_svc.add_listener(lambda c, i: inbound.append((c, i)))
        target.set_stream_handler(ECHO, _echo)
        async with r_svc.running(), t_svc.running(), d_svc.running(), trio.open_nursery() as nursery:
            await _connect(target, relay)
            await _connect(dialer, relay)
            client = RelayClient(target, t_svc, RelayClientConfig(min_refresh_s=0.5))
            info = await nursery.start(client.keep_reservation, relay.get_id())
            assert info.expire > time.time()
            assert any(str(relay.get_id()) in str(a) for a in client.circuit_addrs())
            with trio.fail_after(10):
                while client.refreshes < 2:  # ttl 3 s: refreshed at 75 % of the lifetime, twice
                    await trio.sleep(0.1)
            assert client.reservations[relay.get_id()].expire > time.time()

            conn = await RelayClient(dialer, d_svc).dial(target.get_id(), relay.get_id())
            assert is_relayed(conn)
            s = await dialer.new_stream(target.get_id(), [ECHO])
            await s.write(b"through the relay")
            with trio.fail_after(5):
                assert await s.read(100) == b"through the relay"
            await s.close()
            # the target learned of the relayed connection at once, tagged with the RELAY's id
            assert inbound and inbound[0][1] is True
            tconns = [c for c in conns_to(target, dialer.get_id()) if is_relayed(c)]
            assert tconns
            addrs = [str(a) for a in tconns[0].get_transport_addresses()]
            assert addrs == [f"/p2p/{relay.get_id()}/p2p-circuit/p2p/{dialer.get_id()}"]
            nursery.cancel_scope.cancel()


async def _body_stock_listener_tags_its_own_id_as_relay() -> None:
    async with running_host(LOOP) as relay, running_host(LOOP) as target, running_host(LOOP) as dialer:
        r_svc, d_svc = RelayService(relay, RelayServiceConfig()), RelayService(dialer)
        stock = CircuitV2Protocol(target, allow_hop=False)
        async with r_svc.running(), d_svc.running(), background_trio_service(stock):
            await _connect(target, relay)
            await _connect(dialer, relay)
            await RelayClient(target, RelayService(target)).reserve(relay.get_id())
            await RelayClient(dialer, d_svc).dial(target.get_id(), relay.get_id())
            with trio.fail_after(5):
                while not [
                    c
                    for c in conns_to(target, dialer.get_id())
                    if c.get_connection_type() == ConnectionType.RELAYED
                ]:
                    await trio.sleep(0.05)
            c = conns_to(target, dialer.get_id())[0]
            assert [str(a) for a in c.get_transport_addresses()] == [
                f"/p2p/{target.get_id()}/p2p-circuit/p2p/{dialer.get_id()}"  # wrong: target's own id
            ]


async def _body_circuit_byte_limit_cuts_the_circuit() -> None:
    hop = RelayServiceConfig(circuit_bytes=16 * 1024)
    async with running_host(LOOP) as relay, running_host(LOOP) as target, running_host(LOOP) as dialer:
        r_svc, t_svc, d_svc = RelayService(relay, hop), RelayService(target), RelayService(dialer)
        target.set_stream_handler(ECHO, _echo)
        async with r_svc.running(), t_svc.running(), d_svc.running():
            await _connect(target, relay)
            await _connect(dialer, relay)
            await RelayClient(target, t_svc).reserve(relay.get_id())
            await RelayClient(dialer, d_svc).dial(target.get_id(), relay.get_id())
            s = await dialer.new_stream(target.get_id(), [ECHO])
            echoed = 0
            with trio.move_on_after(10):
                try:
                    for _ in range(64):
                        await s.write(b"x" * 4096)
                        echoed += len(await s.read(4096))
                except Exception:
                    pass
            assert echoed < 64 * 4096, "circuit was not cut at the byte limit"
            assert echoed <= 2 * hop.circuit_bytes


async def _body_reserve_at_non_relay_fails_cleanly() -> None:
    async with running_host(LOOP) as plain, running_host(LOOP) as target:
        t_svc = RelayService(target)
        async with t_svc.running():
            await _connect(target, plain)
            with pytest.raises(RelayError):
                cfg = RelayClientConfig(request_timeout_s=3)
                await RelayClient(target, t_svc, cfg).reserve(plain.get_id())


def test_reserve_refresh_and_relayed_dial() -> None:
    trio.run(_body_reserve_refresh_and_relayed_dial)


def test_stock_listener_tags_its_own_id_as_relay() -> None:
    trio.run(_body_stock_listener_tags_its_own_id_as_relay)


def test_circuit_byte_limit_cuts_the_circuit() -> None:
    trio.run(_body_circuit_byte_limit_cuts_the_circuit)


def test_reserve_at_non_relay_fails_cleanly() -> None:
    trio.run(_body_reserve_at_non_relay_fails_cleanly)


async def _body_circuit_duration_limit_cuts_the_circuit() -> None:
    hop = RelayServiceConfig(circuit_duration_s=1)
    async with running_host(LOOP) as relay, running_host(LOOP) as target, running_host(LOOP) as dialer:
        r_svc, t_svc, d_svc = RelayService(relay, hop), RelayService(target), RelayService(dialer)
        target.set_stream_handler(ECHO, _echo)
        async with r_svc.running(), t_svc.running(), d_svc.running():
            await _connect(target, relay)
            await _connect(dialer, relay)
            await RelayClient(target, t_svc).reserve(relay.get_id())
            await RelayClient(dialer, d_svc).dial(target.get_id(), relay.get_id())
            s = await dialer.new_stream(target.get_id(), [ECHO])
            t0 = trio.current_time()
            cut_after = None
            with trio.move_on_after(8):
                try:
                    while True:
                        await s.write(b"tick")
                        with trio.fail_after(2):
                            assert await s.read(100) == b"tick"
                        await trio.sleep(0.2)
                except Exception:
                    cut_after = trio.current_time() - t0
            assert cut_after is not None, "circuit outlived its duration limit"
            assert cut_after < 1 + 3  # limit plus slack for the relay noticing


def test_circuit_duration_limit_cuts_the_circuit() -> None:
    trio.run(_body_circuit_duration_limit_cuts_the_circuit)

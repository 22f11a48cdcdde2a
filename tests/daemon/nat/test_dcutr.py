"""DCUtR without NAT: address filtering, config rules, and the trigger/fallback path on loopback.

The hole punch itself needs real NATs: see test_nat_netns.py.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from meshmerge.daemon.nat.connutil import is_public_ip, relayed_conn
from meshmerge.daemon.nat.dcutr import DCUtRConfig, DCUtRService, _decode_addrs
from meshmerge.daemon.nat.hostfactory import running_host
from meshmerge.daemon.nat.relay import RelayClient, RelayService, RelayServiceConfig

LOOP = ["/ip4/127.0.0.1/tcp/0"]


def test_only_public_tcp_addresses_are_used() -> None:
    raw = [
        multiaddr.Multiaddr(a).to_bytes()
        for a in [
            "/ip4/203.0.113.7/tcp/4001",
            "/ip4/203.0.113.7/tcp/4001",  # duplicate
            "/ip4/100.64.3.2/tcp/4001",  # carrier-grade NAT inside
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/198.51.100.9/udp/4001/quic-v1",
            "/ip4/192.0.2.1/tcp/1/p2p-circuit",
        ]
    ] + [b"\xff\x00garbage"]
    got = [str(a) for a in _decode_addrs(raw, limit=8)]
    assert got == ["/ip4/203.0.113.7/tcp/4001"]
    assert not is_public_ip("100.64.0.1") and is_public_ip("198.51.100.1") and not is_public_ip("nonsense")


def test_config_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="attempt_deadline_s"):
        DCUtRConfig(attempt_deadline_s=600).validate()
    with pytest.raises(ValueError, match="max_attempts"):
        DCUtRConfig(max_attempts=0).validate()


async def _body_relayed_connection_triggers_punch_and_falls_back() -> None:
    cfg = DCUtRConfig(attempt_deadline_s=2, max_attempts=2)
    async with running_host(LOOP) as relay, running_host(LOOP) as a, running_host(LOOP) as b:
        r_svc, a_svc, b_svc = RelayService(relay, RelayServiceConfig()), RelayService(a), RelayService(b)
        a_punch, b_punch = DCUtRService(a, a_svc, cfg), DCUtRService(b, b_svc, cfg)
        async with r_svc.running(), a_svc.running(), b_svc.running(), trio.open_nursery() as nursery:
            await nursery.start(a_punch.run)
            await nursery.start(b_punch.run)
            for h in (a, b):
                await h.connect(info_from_p2p_addr(relay.get_addrs()[0]))
            await RelayClient(a, a_svc).reserve(relay.get_id())
            t0 = trio.current_time()
            await RelayClient(b, b_svc).dial(a.get_id(), relay.get_id())
            with trio.fail_after(2 * cfg.attempt_deadline_s + 2):
                while (r := a_punch.records.get(b.get_id())) is None or r.outcome == "pending":
                    await trio.sleep(0.01)
            rec = a_punch.records[b.get_id()]
            # loopback addresses are not public: nothing to punch, clean fallback, no hang
            assert rec.outcome == "failed" and rec.attempts == 2 and "public" in rec.error
            assert trio.current_time() - t0 < 2 * cfg.attempt_deadline_s + 2
            assert relayed_conn(a, b.get_id()) is not None
            nursery.cancel_scope.cancel()


def test_relayed_connection_triggers_punch_and_falls_back() -> None:
    trio.run(_body_relayed_connection_triggers_punch_and_falls_back)

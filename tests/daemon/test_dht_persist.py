"""DHT records survive a restart: the snapshot format, its defences, and real restarts on loopback."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

from meshmerge.daemon.dht import DHTConfig, DHTMode, SignedRecord, meshmerge_key, persist, running_dht
from meshmerge.daemon.dht.keys import provider_key
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity

from .swarmkit import run

NOW = 1_790_000_000.0
PEER = bytes.fromhex("00240801122008d8e5bf6a2a9f02ad4c6a8b1ba1a3cd2a8b4e4f2bdc3a8e1c3f0d4b7a6e5c4b3a")


def _snap() -> persist.Snapshot:
    return persist.Snapshot(
        values=[(b"/meshmerge/k1", b"v1", 100.0), (b"/meshmerge/k2", b"v2", 5.0)],
        providers=[(b"\x12\x20" + bytes(32), PEER, [bytes.fromhex("047f000001060fa1")], 50.0)],
    )


def test_snapshot_round_trip_keeps_remaining_lifetimes() -> None:
    data, left_out = persist.encode(_snap(), NOW, 1 << 20)
    assert left_out == 0 and data.startswith(persist.MAGIC)
    back = persist.decode(data, NOW + 10, 1 << 20)  # down for 10 s
    assert [(k, v) for k, v, _ in back.values] == [(b"/meshmerge/k1", b"v1")]
    assert back.dropped_expired == 1  # k2 had 5 s left: expired while down
    assert back.values[0][2] == pytest.approx(90.0, abs=0.01)
    assert len(back.providers) == 1 and back.providers[0][3] == pytest.approx(40.0, abs=0.01)
    assert back.providers[0][2] == [bytes.fromhex("047f000001060fa1")]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:-3], "checksum"),
        (lambda d: d[:20], "truncated"),
        (lambda d: b"XXXXXXXX" + d[8:], "bad magic"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: d + bytes(2048), "more than persist_max_bytes"),
    ],
)
def test_corrupt_snapshots_are_refused_with_a_reason(mangle, reason: str) -> None:  # type: ignore[no-untyped-def]
    data, _ = persist.encode(_snap(), NOW, 1 << 20)
    with pytest.raises(persist.SnapshotError, match=reason):
        persist.decode(mangle(data), NOW, len(data) + 1024)


def test_well_framed_garbage_body_is_refused_and_bad_entries_skipped() -> None:
    body = b"\xff\x00garbage"
    framed = persist.MAGIC + hashlib.sha256(body).digest() + body
    with pytest.raises(persist.SnapshotError, match="does not decode"):
        persist.decode(framed, NOW, 1 << 20)
    from meshmerge.proto import cbor

    body = cbor.encode(
        {"saved": 0, "values": [[b"k", b"v", int((NOW + 60) * 1000)], ["x"], 7], "providers": [[1, 2, 3, 4]]}
    )
    framed = persist.MAGIC + hashlib.sha256(body).digest() + body
    snap = persist.decode(framed, NOW, 1 << 20)
    assert len(snap.values) == 1 and snap.dropped_invalid == 3


def test_encode_stays_within_max_bytes() -> None:
    big = persist.Snapshot(values=[(b"/meshmerge/%d" % i, bytes(1000), 60.0) for i in range(100)])
    data, left_out = persist.encode(big, NOW, 20_000)
    assert len(data) <= 20_000 and left_out > 0
    assert len(persist.decode(data, NOW, 20_000).values) == 100 - left_out


def test_read_logs_and_returns_none_for_a_corrupt_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "records"
    assert persist.read(path, NOW, 1 << 20) is None  # no file: nothing to say
    path.write_bytes(b"not a snapshot at all, just junk that is long enough to have a header")
    with caplog.at_level(logging.ERROR, logger="meshmerge.dht.persist"):
        assert persist.read(path, NOW, 1 << 20) is None
    assert "not loaded, starting empty" in caplog.text and "bad magic" in caplog.text


def _cid(data: bytes) -> bytes:
    return bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()


LOOP = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",))


def _info(host) -> PeerInfo:  # type: ignore[no-untyped-def]
    return PeerInfo(host.get_id(), list(host.get_transport_addrs()))


def test_values_and_providers_survive_a_restart_of_the_holder(tmp_path: Path) -> None:
    """W stores a signed value and a provider record on server S and leaves; S restarts (new
    host, new DHT, same identity and data dir); a fresh reader R still finds both at S."""
    path = tmp_path / "dht" / "records"
    s_ident, w_ident = Identity.generate(), Identity.generate()
    key = meshmerge_key(w_ident.public_key, b"round/1")
    value = SignedRecord.create(key, 1, b"merged-root", w_ident.sign)
    cid = _cid(b"tensor bytes")
    server_cfg = DHTConfig(mode=DHTMode.SERVER, persist_path=path)

    async def first_life() -> None:
        async with running_host(LOOP, s_ident) as s_host, running_dht(s_host, server_cfg) as s_dht:
            async with (
                running_host(LOOP, w_ident) as w_host,
                running_dht(w_host, DHTConfig(mode=DHTMode.CLIENT)) as w_dht,
            ):
                await w_dht.bootstrap([_info(s_host)])
                assert await w_dht.put_value(key, value) >= 1
                assert await w_dht.provide(cid) >= 1
            assert s_dht.values.get(key, trio.current_time()) == value
        assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"

    async def second_life() -> None:
        async with running_host(LOOP, s_ident) as s_host, running_dht(s_host, server_cfg) as s_dht:
            assert len(s_dht.values) == 1 and len(s_dht.providers) == 1
            async with (
                running_host(LOOP, Identity.generate()) as r_host,
                running_dht(r_host, DHTConfig(mode=DHTMode.CLIENT)) as r_dht,
            ):
                await r_dht.bootstrap([_info(s_host)])
                assert await r_dht.get_value(key) == value
                found = await r_dht.find_providers(cid)
                assert [p.peer_id for p in found] == [w_ident.peer_id]

    run(first_life)
    run(second_life)


def test_expiry_counts_the_time_spent_down(tmp_path: Path) -> None:
    path = tmp_path / "records"
    ident, writer = Identity.generate(), Identity.generate()
    key = meshmerge_key(writer.public_key, b"short-lived")
    value = SignedRecord.create(key, 1, b"x", writer.sign)
    cfg = DHTConfig(mode=DHTMode.SERVER, persist_path=path, record_ttl=1.5)

    async def first() -> None:
        async with running_host(LOOP, ident) as host, running_dht(host, cfg) as dht:
            now = trio.current_time()
            dht._store_value(key, value, now)
            dht.providers.add(provider_key(_cid(b"p")), writer.peer_id.to_bytes(), [], now)
            dht._dirty = True

    async def second() -> None:
        async with running_host(LOOP, ident) as host, running_dht(host, cfg) as dht:
            # the value (1.5 s) expired while the node was down; the provider (48 h) did not
            assert len(dht.values) == 0 and len(dht.providers) == 1

    run(first)
    snap = persist.read(path, time.time(), cfg.persist_max_bytes)
    assert snap is not None and len(snap.values) == 1 and len(snap.providers) == 1
    time.sleep(2.0)
    run(second)


def test_corrupt_file_means_an_empty_start_with_a_clear_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "records"
    good, _ = persist.encode(_snap(), time.time(), 1 << 20)
    path.write_bytes(good[: len(good) // 2])  # torn write
    (tmp_path / ".records.abc.tmp").write_bytes(b"leftover")  # crash mid-save

    async def life() -> None:
        async with (
            running_host(LOOP, Identity.generate()) as host,
            running_dht(host, DHTConfig(mode=DHTMode.SERVER, persist_path=path)) as dht,
        ):
            assert len(dht.values) == 0 and len(dht.providers) == 0
            assert await dht.provide(_cid(b"after")) == 0  # alone: stored locally only

    with caplog.at_level(logging.ERROR, logger="meshmerge.dht.persist"):
        run(life)
    assert "not loaded, starting empty" in caplog.text and "checksum" in caplog.text
    assert not (tmp_path / ".records.abc.tmp").exists()
    snap = persist.read(path, time.time(), 1 << 20)  # rewritten at shutdown, now valid
    assert snap is not None and len(snap.providers) == 1


def test_tampered_value_is_refused_on_load(tmp_path: Path) -> None:
    """A snapshot is re-validated: a value whose signature does not match is not restored."""
    path = tmp_path / "records"
    writer = Identity.generate()
    key = meshmerge_key(writer.public_key, b"k")
    good = SignedRecord.create(key, 1, b"honest", writer.sign)
    forged = good.replace(b"honest", b"forged")
    data, _ = persist.encode(
        persist.Snapshot(values=[(key, good, 60.0), (meshmerge_key(writer.public_key, b"k2"), forged, 60.0)]),
        time.time(),
        1 << 20,
    )
    path.write_bytes(data)

    async def life() -> None:
        async with (
            running_host(LOOP, Identity.generate()) as host,
            running_dht(host, DHTConfig(mode=DHTMode.SERVER, persist_path=path)) as dht,
        ):
            assert len(dht.values) == 1 and dht.values.get(key, trio.current_time()) == good

    run(life)


def test_daemon_restart_keeps_the_provider_records_it_held(tmp_path: Path) -> None:
    """Two real daemons: B fetches A's tensors and provides them (stored at A); A is stopped
    and started again from its data dir and still holds the provider records."""
    from .test_network_sync import SCHEMA, complete, loopback_addr, model, start, wait_for

    held: dict[str, int] = {}

    async def first() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a")
            b = await start(nursery, tmp_path / "b", (loopback_addr(a),))
            await a.create_set(SCHEMA)
            await a.contribute(SCHEMA.name, model(1), weight=1, meta={})
            await wait_for(lambda: complete(b) == 1, 60, "B to fetch A's tensors")
            await wait_for(lambda: a.status()["dht_provider_keys"] >= 1, 30, "B's provider record at A")
            held["keys"] = a.status()["dht_provider_keys"]
            nursery.cancel_scope.cancel()

    async def second() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a")
            assert a.status()["dht_provider_keys"] == held["keys"]
            nursery.cancel_scope.cancel()

    run(first)
    assert (tmp_path / "a" / "data" / "dht" / "records").exists()
    run(second)

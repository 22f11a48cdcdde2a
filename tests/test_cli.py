"""The `meshmerge` command against a real daemon process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshmerge.cli import main
from meshmerge.client import Client, DaemonUnavailable
from meshmerge.crdt import tensorfile


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "node"
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshmerge.cli", "daemon", "--dev", str(home)], stdout=log, stderr=log
    )
    sock = home / "rpc.sock"
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(sock, timeout=5) as c:
                if "listen" in c.status():
                    break
        except (DaemonUnavailable, OSError):
            pass
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.2)
    yield sock
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "daemon.log").read_text()
    assert not sock.exists(), "the daemon removes its socket on shutdown"
    log.close()


def cli(sock: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--socket", str(sock), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_round_trip(daemon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    f = tmp_path / "model.safetensors"
    f.write_bytes(tensorfile.dumps({"w": rng.standard_normal((4, 4)).astype(np.float32)}, {"w": "F32"}))

    code, out, _ = cli(daemon, "--json", "status", capsys=capsys)
    assert code == 0 and json.loads(out)["peer_id"].startswith("12D3KooW")
    code, out, _ = cli(daemon, "sets", "create", "cli/test", "--like", str(f), capsys=capsys)
    assert code == 0 and "bafyrei" in out
    code, out, _ = cli(
        daemon, "--json", "contribute", "cli/test", str(f), "--weight", "5", "--meta", "step=3", capsys=capsys
    )
    assert code == 0
    cid = json.loads(out)["id"]
    code, out, _ = cli(daemon, "contributions", "cli/test", capsys=capsys)
    assert code == 0 and out.splitlines()[0].split()[:4] == ["ID", "AUTHOR", "SEQ", "WEIGHT"]
    code, out, _ = cli(
        daemon, "--json", "merge", "cli/test", "-o", str(tmp_path / "merged.safetensors"), capsys=capsys
    )
    assert code == 0 and json.loads(out)["contributions"] == 1
    merged, _ = tensorfile.loads((tmp_path / "merged.safetensors").read_bytes())
    original, _ = tensorfile.loads(f.read_bytes())
    assert np.array_equal(merged["w"], original["w"])
    code, out, _ = cli(daemon, "sets", capsys=capsys)
    assert code == 0 and "cli/test" in out
    for view in ("peers", "scores", "topics", "dht", "id", "blocklist"):
        code, out, err = cli(daemon, view, capsys=capsys)
        assert code == 0, (view, err)
    code, _, err = cli(daemon, "remove", "cli/test", cid, capsys=capsys)
    assert code == 0, err
    code, out, err = cli(daemon, "--json", "gc", capsys=capsys)
    assert code == 0 and json.loads(out)["blobs_removed"] == 1, err
    code, out, _ = cli(daemon, "status", capsys=capsys)
    assert code == 0 and any(line.split()[:2] == ["blob_bytes", "0"] for line in out.splitlines()), out
    code, out, err = cli(daemon, "--json", "sets", "leave", "cli/test", capsys=capsys)
    assert code == 0 and json.loads(out)["name"] == "cli/test", err
    code, _, err = cli(daemon, "contributions", "cli/test", capsys=capsys)
    assert code == 1 and "unknown_set" in err
    code, out, err = cli(daemon, "--json", "sets", "rejoin", "cli/test", capsys=capsys)
    assert code == 0 and json.loads(out)["id"].startswith("bafyrei"), err
    code, _, err = cli(daemon, "sets", "rejoin", "cli/test", capsys=capsys)
    assert code == 1 and "no left merge set(s) match" in err


def test_cli_errors(daemon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(daemon, "contributions", "no/such/set", capsys=capsys)
    assert code == 1 and "unknown_set" in err
    code, _, err = cli(tmp_path / "absent.sock", "status", capsys=capsys)
    assert code == 2 and "no meshmerge daemon" in err
    code, _, err = cli(daemon, "--json", "merge", "no/such/set", capsys=capsys)
    assert code == 1 and "unknown_set" in err

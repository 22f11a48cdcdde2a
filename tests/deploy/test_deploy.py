import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshmerge.daemon.config import Config, ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check the unit (Debian package: systemd)"
    entry = Path(sys.executable).parent / "meshmerge"
    assert entry.exists(), "the meshmerge console script is installed in the venv"
    unit = (DEPLOY / "meshmerge.service").read_text().replace("/opt/meshmerge/venv/bin/meshmerge", str(entry))
    (tmp_path / "meshmerge.service").write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "meshmerge.service")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "StateDirectory=meshmerge" in unit


def test_shipped_config_parses_and_validates() -> None:
    config = Config.load(DEPLOY / "config.toml")
    assert config.rpc.socket == Path("/run/meshmerge/rpc.sock")
    assert config.node.data_dir == Path("/var/lib/meshmerge")
    assert config.metrics.address == "127.0.0.1"
    assert config.store.blob_quota_bytes == 0 and config.store.gc_interval == 600.0
    assert not config.gossip.bootstrapper
    assert config.gossip.bootstrap_score > config.gossip.accept_px_threshold > 0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[node]\ndata_dri = '/x'\n", r"\[node\] unknown key\(s\) \['data_dri'\]"),
        ("[nodes]\n", r"unknown section\(s\) \['nodes'\]"),
        ("[rpc]\nmax_connections = 0\n", r"\[rpc\] max_connections must be a positive number"),
        ("[rpc]\nmax_connections = 1.5\n", r"\[rpc\] max_connections must be an integer"),
        ("[network]\nlisten = '/ip4/1.2.3.4'\n", r"\[network\] listen must be a list of strings"),
        ("[network]\nlisten = ['127.0.0.1:4001']\n", "is not a multiaddr"),
        ("[metrics]\nenabled = 'yes'\n", r"\[metrics\] enabled must be true or false"),
        (
            "[store]\nblob_quota_bytes = -1\n",
            r"\[store\] blob_quota_bytes must be 0 \(no quota\) or a positive",
        ),
        ("[store]\nblob_quota = 5\n", r"\[store\] unknown key\(s\) \['blob_quota'\]"),
        ("[store]\ngc_interval = 0\n", r"\[store\] gc_interval must be a positive number"),
        ("[sync\n", "not valid TOML"),
        (
            "[gossip]\nbootstrap_score = 10.0\n",
            r"\[gossip\] bootstrap_score \(10.0\) must exceed accept_px_threshold",
        ),
        ("[gossip]\nbootstrapper = 1\n", r"\[gossip\] bootstrapper must be true or false"),
        ("[gossip]\naccept_px_threshold = 0\n", r"\[gossip\] accept_px_threshold must be a positive finite"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        Config.load(path)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml")

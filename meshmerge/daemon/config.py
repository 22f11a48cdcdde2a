"""Daemon configuration: a TOML file read with tomllib into validated dataclasses.

Every limit the daemon enforces is a named value here, with a default that is
safe on an edge device. Unknown keys are errors (a typo must not silently fall
back to a default), and every error names the key and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def _positive(section: str, name: str, value: int | float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"[{section}] {name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class NodeSection:
    """Where the node keeps its state."""

    data_dir: Path = Path("/var/lib/meshmerge")
    log_level: str = "info"

    def validate(self) -> None:
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"[node] log_level must be debug, info, warning or error, got {self.log_level!r}"
            )


@dataclass(frozen=True)
class RpcSection:
    """The local socket trainers talk to."""

    socket: Path = Path("/run/meshmerge/rpc.sock")
    socket_mode: int = 0o660
    max_frame_bytes: int = 64 * 1024 * 1024
    max_connections: int = 64

    def validate(self) -> None:
        for name in ("max_frame_bytes", "max_connections"):
            _positive("rpc", name, getattr(self, name))
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(
                f"[rpc] socket_mode must be a permission mode like 0o660, got {self.socket_mode!r}"
            )


@dataclass(frozen=True)
class NetworkSection:
    """libp2p: what to listen on and whom to meet first."""

    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    enable_relay_client: bool = True
    enable_relay_service: bool = False
    enable_upnp: bool = False
    enable_mdns: bool = False
    max_connections: int = 256
    max_connections_per_ip: int = 8
    dht_mode: str = "server"

    def validate(self) -> None:
        if self.dht_mode not in ("auto", "server", "client"):
            raise ConfigError(f"[network] dht_mode must be auto, server or client, got {self.dht_mode!r}")
        for addr in (*self.listen, *self.bootstrap, *self.announce):
            if not isinstance(addr, str) or not addr.startswith("/"):
                raise ConfigError(f"[network] {addr!r} is not a multiaddr (it must start with '/')")
        _positive("network", "max_connections", self.max_connections)
        _positive("network", "max_connections_per_ip", self.max_connections_per_ip)


@dataclass(frozen=True)
class GossipSection:
    """GossipSub roles and peer exchange (spec v1.1, "Recommendations for Network Operators").

    PX lets the pruning peer choose whom we dial next, so it is accepted only from peers
    scoring at least ``accept_px_threshold``; the ``[network] bootstrap`` peers get an
    application score (P5) of ``bootstrap_score`` for this, nobody else gets any, so PX is
    accepted from the bootstrap peers only. ``bootstrapper = true`` runs this node as such an
    entry point: no mesh (D = D_lo = D_hi = D_out = 0), every GRAFT answered with PRUNE + PX.
    """

    bootstrapper: bool = False
    bootstrap_score: float = 100.0
    accept_px_threshold: float = 50.0

    def validate(self) -> None:
        for name in ("bootstrap_score", "accept_px_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"[gossip] {name} must be a positive finite number, got {v!r}")
        t = self.accept_px_threshold
        if not self.bootstrap_score > t:
            raise ConfigError(
                f"[gossip] bootstrap_score ({self.bootstrap_score!r}) must exceed accept_px_threshold "
                f"({t!r}), otherwise PX from the bootstrap peers is refused"
            )


@dataclass(frozen=True)
class SyncSection:
    """Gossip announcements, blob fetches and anti-entropy."""

    anti_entropy_interval: float = 10.0
    max_concurrent_fetches: int = 4
    fetch_chunk_bytes: int = 1024 * 1024
    fetch_timeout: float = 60.0
    max_blob_bytes: int = 2 * 1024 * 1024 * 1024

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _positive("sync", f.name, getattr(self, f.name))


@dataclass(frozen=True)
class StoreSection:
    """Disk use of tensor blobs: a quota and how often unreferenced blobs are collected."""

    #: Most bytes all stored tensor blobs may take; 0 = no quota. New blobs that would
    #: not fit are refused (an RPC error to a trainer, a WARNING for a fetch from a peer).
    blob_quota_bytes: int = 0
    #: Seconds between collections of blobs no live contribution references (also run on start).
    gc_interval: float = 600.0

    def validate(self) -> None:
        q = self.blob_quota_bytes
        if isinstance(q, bool) or not isinstance(q, int) or q < 0:
            raise ConfigError(
                f"[store] blob_quota_bytes must be 0 (no quota) or a positive integer, got {q!r}"
            )
        _positive("store", "gc_interval", self.gc_interval)


@dataclass(frozen=True)
class MetricsSection:
    """Prometheus exposition; loopback only unless deliberately changed."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9464
    #: seconds between copies of the node's status into the exporter
    refresh_interval: float = 5.0

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"[metrics] port must be 1..65535, got {self.port!r}")
        if not 0.1 <= self.refresh_interval <= 3600:
            raise ConfigError(
                f"[metrics] refresh_interval must be in [0.1, 3600] seconds, got {self.refresh_interval!r}"
            )


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    rpc: RpcSection = field(default_factory=RpcSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    sync: SyncSection = field(default_factory=SyncSection)
    store: StoreSection = field(default_factory=StoreSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> Config:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; valid: {sorted(sections)}")
        built = {}
        for name, f in sections.items():
            section_type = f.default_factory
            built[name] = _section(name, section_type, raw.get(name, {}))
        return cls(**built).validate()

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_mapping(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_overrides(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections).validate()


def _section(name: str, section_type: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"[{name}] unknown key(s) {unknown}; valid: {sorted(fields)}")
    values = {}
    for key, value in raw.items():
        default = getattr(section_type(), key)
        values[key] = _coerce(name, key, default, value)
    return section_type(**values)


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    where = f"[{section}] {key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a path string")
        return Path(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover - every field type is handled above


def dev_config(base_dir: Path, *, listen_port: int = 0, bootstrap: tuple[str, ...] = ()) -> Config:
    """A loopback-only config rooted in base_dir (tests, the demo, `meshmerge daemon --dev`)."""
    return Config(
        node=NodeSection(data_dir=base_dir / "data", log_level="info"),
        rpc=RpcSection(socket=base_dir / "rpc.sock"),
        network=NetworkSection(listen=(f"/ip4/127.0.0.1/tcp/{listen_port}",), bootstrap=bootstrap),
        metrics=MetricsSection(enabled=False),
    ).validate()

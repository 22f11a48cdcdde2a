"""GossipConfig for the daemon: bootstrap roles and whose peer exchange is accepted.

Why a module of its own: the daemon's TOML config knows bootstrap *addresses* and a
role, the gossip driver knows score parameters and thresholds; this is the one place
that turns the former into the latter (spec v1.1, "Recommendations for Network
Operators": bootstrappers run without a mesh and with PX; the application gives them a
high P5 and sets the accept-PX threshold so that only they reach it).

Topic scoring stays off in the daemon (its topics, one per contribution set, appear at
run time and carry no known rate to derive P1-P4 from), so every other peer scores 0:
below the threshold, so PX from anyone but a bootstrap peer is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshmerge.daemon.config import ConfigError, GossipSection
from meshmerge.daemon.gossip.driver import GossipConfig
from meshmerge.daemon.gossip.params import (
    GossipSubParams,
    PeerScoreParams,
    PeerScoreThresholds,
    bootstrap_app_score,
)
from meshmerge.daemon.host import peer_info

__all__ = ["daemon_gossip_config"]


def daemon_gossip_config(section: GossipSection, bootstrap_addrs: Iterable[str] = ()) -> GossipConfig:
    """The daemon's :class:`GossipConfig`: P5 ``section.bootstrap_score`` for the peers in
    ``bootstrap_addrs`` (full ``/.../p2p/<id>`` multiaddrs; a bad one raises ConfigError),
    accept-PX at ``section.accept_px_threshold``, and the bootstrapper role if asked."""
    section.validate()
    boot: list[bytes] = []
    for addr in bootstrap_addrs:
        try:
            boot.append(peer_info(addr).peer_id.to_bytes())
        except ValueError as exc:
            raise ConfigError(f"[network] bootstrap: {exc}") from exc
    params = GossipSubParams.bootstrapper() if section.bootstrapper else GossipSubParams()
    thresholds = PeerScoreThresholds(accept_px_threshold=section.accept_px_threshold)
    score = None
    if boot:
        score = PeerScoreParams(
            app_specific_score=bootstrap_app_score(boot, section.bootstrap_score),
            app_specific_weight=1.0,
        )
    return GossipConfig(params=params, score=score, thresholds=thresholds)

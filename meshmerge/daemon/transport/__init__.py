"""Our secure channel (`/noise`) and stream muxer (`/yamux/1.0.0`) for py-libp2p hosts.

`noise_state` and `yamux_state` are the sans-I/O protocol cores; `noise` and
`yamux` drive them from trio and plug into py-libp2p's upgrader (`upgrader()`).
"""

from __future__ import annotations

from libp2p.crypto.keys import KeyPair
from libp2p.transport.upgrader import TransportUpgrader

from .multiselect import PipelinedMultiselectClient
from .noise import PROTOCOL_ID as NOISE_PROTOCOL_ID
from .noise import NoiseSession, NoiseTransport
from .yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from .yamux import YamuxConn, YamuxMultistream, YamuxStream

__all__ = [
    "NOISE_PROTOCOL_ID",
    "YAMUX_PROTOCOL_ID",
    "NoiseSession",
    "NoiseTransport",
    "PipelinedMultiselectClient",
    "YamuxConn",
    "YamuxStream",
    "upgrader",
]


def upgrader(key_pair: KeyPair, negotiate_timeout: int = 5) -> TransportUpgrader:
    """A `TransportUpgrader` offering only our Noise and our yamux, negotiated in one round trip each."""
    up = TransportUpgrader(
        secure_transports_by_protocol={NOISE_PROTOCOL_ID: NoiseTransport(key_pair)},
        muxer_transports_by_protocol={YAMUX_PROTOCOL_ID: YamuxConn},
        negotiate_timeout=negotiate_timeout,
    )
    up.muxer_multistream = YamuxMultistream({YAMUX_PROTOCOL_ID: YamuxConn}, negotiate_timeout)
    for selector in (up.security_multistream._selector, up.muxer_multistream._selector):
        selector.multiselect_client = PipelinedMultiselectClient()
    return up

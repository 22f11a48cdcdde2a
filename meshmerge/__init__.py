"""meshmerge: peer-to-peer backbone for decentralized model training."""

__version__ = "0.1.0"

"""NAT traversal: AutoNAT, circuit relay v2, DCUtR hole punching, UPnP port mapping.

Each protocol is its own service with its own config dataclass; the host
layer composes them. Everything here runs under trio nurseries owned by the
caller.
"""

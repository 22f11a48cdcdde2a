"""Shared pytest configuration.

Tests marked ``root`` need root (network namespaces, nftables). They are
skipped with a reason when not root; CI runs as root, so they run there.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from meshmerge.testing.interop.tools import InteropSetupError, InteropTools, ensure_tools

# Speed is measured by benchmarks, not tests: hypothesis' per-example deadline
# (200 ms) only turned CPU starvation on a loaded machine into failures.
settings.register_profile("meshmerge", deadline=None)
settings.load_profile("meshmerge")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip_root = pytest.mark.skip(reason="needs root (network namespaces); CI runs it as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip_root)


@pytest.fixture(scope="session")
def interop_tools() -> InteropTools:
    """go/js peers installed by scripts/interop/setup; FAILS (never skips) if setup fails."""
    try:
        return ensure_tools()
    except InteropSetupError as exc:
        pytest.fail(f"interop setup failed: {exc}", pytrace=False)

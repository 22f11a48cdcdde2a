"""GC tuning for long-lived node processes and the pause recorder."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from meshmerge.daemon.gctune import GcParams, GcPauses, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.parametrize("name", ["threshold0", "threshold1", "threshold2"])
@pytest.mark.parametrize("bad", [0, -5, 10_000_001, 1.5, True])
def test_params_validate_names_the_field(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"GcParams.{name}"):
        GcParams(**{name: bad}).validate()  # type: ignore[arg-type]


def test_tune_gc_sets_thresholds_and_freezes_start_up_objects(restore_gc: None) -> None:
    tune_gc(GcParams(threshold0=12_345, threshold1=7, threshold2=9, freeze=False))
    assert gc.get_threshold() == (12_345, 7, 9)
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_threshold() == (GcParams().threshold0, GcParams().threshold1, GcParams().threshold2)
    assert gc.get_freeze_count() > 1000  # the modules and objects this process built so far


def test_pauses_are_recorded_per_generation() -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # idempotent
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.remove()
    assert pauses.counts[0] >= 1 and pauses.counts[2] >= 1
    assert pauses.total_s[2] > 0 and pauses.max_s[2] <= pauses.total_s[2]
    summary = pauses.summary()
    assert set(summary) == {"count", "total_ms", "max_ms"} and all(len(v) == 3 for v in summary.values())
    before = list(pauses.counts)
    gc.collect(0)
    assert pauses.counts == before  # removed: no longer counting
    pauses.reset()
    assert pauses.counts == [0, 0, 0] and pauses.max_s == [0.0, 0.0, 0.0]

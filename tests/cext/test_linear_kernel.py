import numpy as np
import pytest

from meshmerge.cext import weighted_sum_f32


def test_weighted_sum_matches_float64_reference() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    w = rng.random(5)
    out = np.empty(1000, np.float32)
    weighted_sum_f32(xs, w, out)
    ref = np.zeros(1000)
    for k in range(5):
        ref = ref + w[k] * xs[k].astype(np.float64)
    assert np.array_equal(out, ref.astype(np.float32))


def test_weighted_sum_rejects_length_mismatch() -> None:
    out = np.empty(3, np.float32)
    with pytest.raises(ValueError, match="input 1 has 2 elements"):
        weighted_sum_f32([np.ones(3, np.float32), np.ones(2, np.float32)], np.ones(2), out)

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


def _f64_reference(xs: list[np.ndarray], w: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    acc = np.zeros(xs[0].size)
    for k, x in enumerate(xs):
        v = x.astype(np.float64) if base is None else x.astype(np.float64) - base.astype(np.float64)
        acc = acc + w[k] * v
    return acc


@pytest.mark.parametrize("nk", [3, 6])
def test_streaming_stores_write_the_same_bytes_at_any_offset_and_thread_count(nk: int) -> None:
    """Calls over >= 2**20 elements write through non-temporal stores; bytes must not change."""
    from meshmerge.cext import task_sum_f32, using_threads

    n = (1 << 20) + 37
    rng = np.random.default_rng(nk)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(nk)]
    base = rng.standard_normal(n).astype(np.float32)
    w = rng.random(nk) + 0.25
    want = _f64_reference(xs, w).astype(np.float32)
    lam, inv_den = 0.7, 1 / 3.5
    want_task = (base.astype(np.float64) + lam * (_f64_reference(xs, w, base) * inv_den)).astype(np.float32)
    want_delta = (0.0 + lam * (_f64_reference(xs, w) * inv_den)).astype(np.float32)
    for threads in (1, 2, 3):
        with using_threads(threads, grain=5000):
            for skip in (0, 1, 3):  # output start 4, 8 and 16 bytes off a 16-byte boundary
                storage = np.full(n + skip, -1.0, np.float32)
                out = storage[skip:]
                assert weighted_sum_f32(xs, w, out) == -1
                assert out.tobytes() == want.tobytes()
                assert np.all(storage[:skip] == -1.0)
                assert task_sum_f32(xs, base, w, lam, inv_den, out) == -1
                assert out.tobytes() == want_task.tobytes()
                assert task_sum_f32(xs, None, w, lam, inv_den, out) == -1
                assert out.tobytes() == want_delta.tobytes()


def test_delta_task_sum_keeps_the_sign_of_zero_rounding() -> None:
    """Without a base the kernel still computes ``0.0 + lam * s`` (so -0.0 becomes +0.0)."""
    from meshmerge.cext import task_sum_f32

    xs = [np.array([-0.0, 1.0, -1.0], np.float32), np.array([-0.0, -1.0, 1.0], np.float32)]
    out = np.empty(3, np.float32)
    assert task_sum_f32(xs, None, np.ones(2), 1.0, 1.0, out) == -1
    assert out.tobytes() == np.zeros(3, np.float32).tobytes()


def test_nonfinite_input_is_named_in_a_streamed_call() -> None:
    n = (1 << 20) + 5
    xs = [np.ones(n, np.float32) for _ in range(5)]
    xs[3][n - 2] = np.nan
    xs[4][12345] = -np.inf
    assert weighted_sum_f32(xs, np.ones(5), np.empty(n, np.float32)) == 3

"""The register-tiled float64 ``matmul``/``gram`` against the plain sequential loop, byte for byte.

The reference does the same operations in the same order (``out = out + a[:, t]
* b[t]``, t ascending, no FMA), so any difference in tiling, packing, t-blocks,
thread split or instruction set that changed the arithmetic would show up as a
byte difference. The golden digests were computed with the previous row-loop
implementation (``eigen.matmul`` before this kernel replaced it).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from meshmerge.cext import gram_rows, matmul, using_threads
from tests.crdt.strategies.helpers import det_values

ISAS = [None, "avx2", "generic"]


def reference_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0], b.shape[1]))
    for t in range(a.shape[1]):
        out = out + a[:, t, None] * b[t]
    return out


# odd shapes, one tile, partial tiles in both directions, and q > 512 (accumulators are
# stored and reloaded between t-blocks)
SHAPES = [(1, 1, 1), (5, 7, 3), (7, 13, 5), (6, 40, 32), (37, 64, 51), (33, 1000, 65), (130, 17, 9),
          (13, 1100, 40), (97, 64, 70)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_same_bytes_as_the_sequential_loop(shape: tuple[int, int, int]) -> None:
    p, q, s = shape
    rng = np.random.default_rng(p * 1000 + q * 10 + s)
    a, b = rng.standard_normal((p, q)), rng.standard_normal((q, s))
    ref = reference_matmul(a, b).tobytes()
    for isa in ISAS:
        for threads in (1, 2, 3):
            with using_threads(threads, grain=8):
                assert matmul(a, b, isa=isa).tobytes() == ref, (isa, threads)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (40, 90), (70, 600), (33, 1000)])
def test_gram_equals_matmul_with_the_transpose(shape: tuple[int, int]) -> None:
    b = np.random.default_rng(shape[0] * shape[1]).standard_normal(shape)
    ref = reference_matmul(b, np.ascontiguousarray(b.T)).tobytes()
    for isa in ISAS:
        for threads in (1, 2):
            with using_threads(threads, grain=8):
                g = gram_rows(b, isa=isa)
                assert g.tobytes() == ref, (isa, threads)
                assert matmul(b, b.T, isa=isa).tobytes() == ref
    assert np.array_equal(g, g.T)


def test_strided_views_need_no_copy_and_give_the_same_bytes() -> None:
    rng = np.random.default_rng(5)
    big_a, big_b = rng.standard_normal((50, 80)), rng.standard_normal((90, 60))
    a = big_a[::2, 1::3]  # 25 x 27, both strides non-unit
    b = big_b[:54:2].T.T[:27, ::-1]  # reversed columns: a negative stride
    ref = reference_matmul(np.ascontiguousarray(a), np.ascontiguousarray(b)).tobytes()
    for isa in ISAS:
        assert matmul(a, b, isa=isa).tobytes() == ref
        assert matmul(np.asfortranarray(a), np.asfortranarray(b), isa=isa).tobytes() == ref
    assert gram_rows(a).tobytes() == reference_matmul(np.ascontiguousarray(a), np.ascontiguousarray(a).T).tobytes()


def test_signed_zeros_and_zero_matrices() -> None:
    a = np.array([[-0.0, 1.0, -0.0], [0.0, -0.0, 2.0]])
    b = np.array([[-0.0, 3.0], [-0.0, -0.0], [5.0, -0.0]])
    for isa in ISAS:
        out = matmul(a, b, isa=isa)
        assert out.tobytes() == reference_matmul(a, b).tobytes()
        # sums start at +0.0, so an all-zero sum is +0.0 even when every product is -0.0
        z = matmul(-np.zeros((3, 4)), np.ones((4, 5)), isa=isa)
        assert z.tobytes() == np.zeros((3, 5)).tobytes()
    assert matmul(np.zeros((3, 0)), np.zeros((0, 2))).tobytes() == np.zeros((3, 2)).tobytes()
    assert matmul(np.zeros((0, 4)), np.zeros((4, 2))).shape == (0, 2)
    assert gram_rows(np.zeros((0, 4))).shape == (0, 0)


def test_read_only_and_broadcast_inputs() -> None:
    a = np.random.default_rng(2).standard_normal((9, 20))
    a.setflags(write=False)
    row = np.broadcast_to(np.arange(20.0), (5, 20))  # zero row stride, read-only
    for isa in ISAS:
        assert matmul(a, a.T, isa=isa).tobytes() == reference_matmul(a, np.ascontiguousarray(a.T)).tobytes()
        assert gram_rows(row, isa=isa).tobytes() == reference_matmul(np.array(row), np.array(row).T).tobytes()


def test_other_dtypes_are_widened() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(8, dtype=np.int64).reshape(4, 2)
    assert matmul(a, b).tobytes() == reference_matmul(a.astype(np.float64), b.astype(np.float64)).tobytes()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="do not chain"):
        matmul(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        matmul(np.zeros(3), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="2-D"):
        gram_rows(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="isa"):
        matmul(np.zeros((2, 2)), np.zeros((2, 2)), isa="sse9")


def test_golden_bytes_of_the_previous_implementation() -> None:
    a = det_values("gemm/golden/a", 70 * 600).astype(np.float64).reshape(70, 600)
    b = det_values("gemm/golden/b", 600 * 45).astype(np.float64).reshape(600, 45)
    for threads in (1, 2):
        with using_threads(threads, grain=8):
            assert hashlib.sha256(matmul(a, b).tobytes()).hexdigest() == GOLDEN_MATMUL
            assert hashlib.sha256(gram_rows(a).tobytes()).hexdigest() == GOLDEN_GRAM


GOLDEN_MATMUL = "f6fc2130fcae197fa6c7a89bcea763f6eea45c92254695745fac448982d85841"
GOLDEN_GRAM = "d7dc74cfc13d129e46681d7cd6a55d02feced86d94da5a52441de774f06cbcc8"

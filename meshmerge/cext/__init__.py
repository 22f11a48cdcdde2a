"""Cython merge kernels.

Every kernel is deterministic: fixed reduction order, no FMA contraction, no
fast-math (see setup.py), so replicas produce identical bytes.
"""

from meshmerge.cext.convert import bf16_to_f32, f32_to_bf16, has_nonfinite
from meshmerge.cext.gram import gram_accumulate, gram_finalize
from meshmerge.cext.linear import weighted_sum_f32, weighted_sum_f64
from meshmerge.cext.prng import drop_lanes, drop_threshold, random_u64, stream_key, uniform_f64
from meshmerge.cext.robust import sorted_reduce
from meshmerge.cext.sparse import mag_hist_hi, mag_hist_lo, sparse_merge

__all__ = [
    "bf16_to_f32",
    "drop_lanes",
    "drop_threshold",
    "f32_to_bf16",
    "gram_accumulate",
    "gram_finalize",
    "has_nonfinite",
    "mag_hist_hi",
    "mag_hist_lo",
    "random_u64",
    "sorted_reduce",
    "sparse_merge",
    "stream_key",
    "uniform_f64",
    "weighted_sum_f32",
    "weighted_sum_f64",
]

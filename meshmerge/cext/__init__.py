"""Cython merge kernels.

Every kernel is deterministic: fixed reduction order, no FMA contraction, no
fast-math (see setup.py), so replicas produce identical bytes. Threads
(OpenMP, :mod:`meshmerge.cext.threads`) work on disjoint element ranges.
"""

import os

# Idle OpenMP threads sleep instead of spinning: on a shared, loaded machine a
# spinning thread burns the time slice the thread it waits for needs. Must be
# set before the first kernel module loads the OpenMP runtime; a value the
# user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from meshmerge.cext.convert import bf16_to_f32, f32_to_bf16, has_nonfinite
from meshmerge.cext.datafree import (
    LOG_SPAN,
    abs_log_spans,
    det_log,
    keep_base_at_most,
    mean_abs,
    regmean_average,
)
from meshmerge.cext.eigen import eigh, eigh_top
from meshmerge.cext.elemwise import (
    della_merge,
    emr_elect,
    fisher_average,
    kth_smallest_nonnegative,
    moment_lanes,
    safe_freeze,
    safe_moments,
)
from meshmerge.cext.gemm import gram_rows, matmul
from meshmerge.cext.gram import GRAM_SPAN, gram_accumulate, gram_finalize
from meshmerge.cext.linear import task_sum_f32, weighted_sum_f32, weighted_sum_f64
from meshmerge.cext.overlap import overlap_counts, overlap_merge
from meshmerge.cext.prng import drop_lanes, drop_threshold, random_u64, stream_key, uniform_f64
from meshmerge.cext.robust import sorted_reduce
from meshmerge.cext.selective import (
    EXACT_LIMBS,
    exact_round,
    led_select,
    nearswap_merge,
    sce_combine,
    sce_energy,
    sce_variance,
)
from meshmerge.cext.sparse import mag_range, mag_select, sparse_merge
from meshmerge.cext.threads import get_threads, set_threads, using_threads

__all__ = [
    "EXACT_LIMBS",
    "GRAM_SPAN",
    "LOG_SPAN",
    "abs_log_spans",
    "bf16_to_f32",
    "della_merge",
    "det_log",
    "drop_lanes",
    "drop_threshold",
    "eigh",
    "eigh_top",
    "emr_elect",
    "exact_round",
    "f32_to_bf16",
    "fisher_average",
    "get_threads",
    "gram_accumulate",
    "gram_finalize",
    "gram_rows",
    "has_nonfinite",
    "keep_base_at_most",
    "kth_smallest_nonnegative",
    "led_select",
    "mag_range",
    "mag_select",
    "matmul",
    "mean_abs",
    "moment_lanes",
    "nearswap_merge",
    "overlap_counts",
    "overlap_merge",
    "random_u64",
    "regmean_average",
    "safe_freeze",
    "safe_moments",
    "sce_combine",
    "sce_energy",
    "sce_variance",
    "set_threads",
    "sorted_reduce",
    "sparse_merge",
    "stream_key",
    "task_sum_f32",
    "uniform_f64",
    "using_threads",
    "weighted_sum_f32",
    "weighted_sum_f64",
]

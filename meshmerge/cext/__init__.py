"""Cython merge kernels.

Every kernel is deterministic: fixed reduction order, no FMA contraction, no
fast-math (see setup.py), so replicas produce identical bytes.
"""

from meshmerge.cext.linear import weighted_sum_f32, weighted_sum_f64

__all__ = ["weighted_sum_f32", "weighted_sum_f64"]

"""The runnable strategies and the parameters the property/golden tests use."""

from __future__ import annotations

from typing import Any

# name -> params for "typical" runs
RUNNABLE: dict[str, dict[str, Any]] = {
    "linear": {},
    "weight_average": {},
    "task_arithmetic": {"scaling": 0.8},
    "negative_merge": {"scaling": 0.5},
    "ties": {"density": 0.3},
    "dare": {"density": 0.4},
    "dare_linear": {"density": 0.4},
    "dare_ties": {"density": 0.4},
    "breadcrumbs": {"density": 0.7, "gamma": 0.05},
    "model_breadcrumbs": {"density": 0.7, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.7, "gamma": 0.05},
    "slerp": {},
    "karcher": {},
    "multislerp": {},
    "model_stock": {},
    "median": {},
    "coordinate_median": {},
    "trimmed_mean": {"trim": 0.2},
    "krum": {},
    "multi_krum": {},
    "geometric_median": {},
    "centered_clipping": {},
    "foolsgold": {},
    "emr": {},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": 0.5, "epsilon": 0.2},
    "evolutionary_merge": {"generations": 10},
    "genetic_merge": {"generations": 10},
    "led_merge": {},
    "safe_merge": {"fraction": 0.2},
    "weight_scope_alignment": {},
    "sce": {"select_topk": 0.5},
    "nuslerp": {},
    "star": {"rank_fraction": 0.5},
    "adarank": {"energy": 0.8},
    "svd_knot_tying": {"density": 0.5},
    "dual_projection": {"stability": 0.5, "rank_fraction": 0.4},
}

# name -> params under which N identical contributions must give the contribution back
IDENTITY: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"normalize": True},
    "ties": {"density": 1.0},
    "dare": {"density": 1.0},
    "dare_ties": {"density": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.0},
    "slerp": {},
    "karcher": {},
    "multislerp": {},
    "model_stock": {},
    "median": {},
    "trimmed_mean": {"trim": 0.2},
    "krum": {},
    "multi_krum": {},
    "geometric_median": {},
    "centered_clipping": {},
    "emr": {},
    "evolutionary_merge": {},
    "genetic_merge": {},
    "led_merge": {},
    "safe_merge": {},
    "weight_scope_alignment": {},
    "sce": {"select_topk": 0.5},
    "nuslerp": {},
}

# Symmetric strategies whose float64 accumulation is exact on quantised inputs with equal
# weights, so any arrival order must give identical bytes.
PERMUTATION: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.3},
    "breadcrumbs": {"density": 0.7, "gamma": 0.05, "normalize": False},
    "breadcrumbs_ties": {"density": 0.7, "gamma": 0.05},
    "median": {},
    "trimmed_mean": {"trim": 0.25},
    "krum": {},
    "multi_krum": {},
}

"""Build the Cython merge kernels.

Determinism is the contract for every kernel: no FMA contraction and no
fast-math, so the same inputs give the same bytes on every replica.

OpenMP (``-fopenmp``) splits elements over threads; each element's reduction
order does not change, so neither do the bytes. ``MESHMERGE_NO_OPENMP=1``
builds single-threaded kernels (same results).
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DETERMINISTIC_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-unsafe-math-optimizations"]
OPENMP = [] if os.environ.get("MESHMERGE_NO_OPENMP") == "1" else ["-fopenmp"]

extensions = [
    Extension(
        f"meshmerge.cext.{pyx.stem}",
        [str(pyx)],
        include_dirs=[numpy.get_include(), "meshmerge/cext"],
        extra_compile_args=DETERMINISTIC_CFLAGS + OPENMP,
        extra_link_args=OPENMP,
        depends=["meshmerge/cext/mm_par.h", "meshmerge/cext/mm_detmath.h", "meshmerge/cext/mm_gemm_kernel.h"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for pyx in sorted(Path("meshmerge/cext").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)

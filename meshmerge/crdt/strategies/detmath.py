"""Deterministic scalar math for per-tensor coefficients (angles, logs).

libm's ``acos``/``sin``/``log`` are not correctly rounded and differ between
platforms by an ulp, which would change merged bytes between replicas. These
versions use only IEEE-754 double ``+ - * /`` and ``sqrt`` (all correctly
rounded, and CPython never contracts them into FMAs) in a fixed order, so
every replica gets the same bits. Accuracy is a few ulp, plenty for merge
coefficients. They are called once per tensor (or per iteration of an
N-dimensional solve), never per element.
"""

from __future__ import annotations

import math

PI = 3.141592653589793
HALF_PI = 1.5707963267948966
TWO_PI = 6.283185307179586
LN2 = 0.6931471805599453


def atan(x: float) -> float:
    """Arctangent via two argument halvings and a 14-term Taylor series."""
    if x != x:
        return x
    if x < 0.0:
        return -atan(-x)
    if x > 1.0:
        return HALF_PI - atan(1.0 / x)
    for _ in range(2):
        x = x / (1.0 + math.sqrt(1.0 + x * x))
    x2 = x * x
    term = x
    total = 0.0
    for n in range(14):
        total += term / (2 * n + 1) if n % 2 == 0 else -(term / (2 * n + 1))
        term *= x2
    return 4.0 * total


def acos(c: float) -> float:
    """Arccosine on [-1, 1] (inputs outside are clamped)."""
    c = min(1.0, max(-1.0, c))
    if c == -1.0:
        return PI
    return 2.0 * atan(math.sqrt((1.0 - c) / (1.0 + c)))


def sin(x: float) -> float:
    """Sine via reduction to [-pi/2, pi/2] and a 15-term Taylor series."""
    x = x - TWO_PI * round(x / TWO_PI)
    if x > HALF_PI:
        x = PI - x
    elif x < -HALF_PI:
        x = -PI - x
    x2 = x * x
    term = x
    total = 0.0
    for n in range(15):
        total += term
        term = -term * x2 / ((2 * n + 2) * (2 * n + 3))
    return total


def cos(x: float) -> float:
    return sin(HALF_PI - x)


def log(x: float) -> float:
    """Natural log for x > 0 via frexp (exact) and a 16-term atanh series."""
    if not x > 0.0:
        raise ValueError("log needs x > 0")
    m, e = math.frexp(x)
    if m < 0.7071067811865476:
        m *= 2.0
        e -= 1
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    term = s
    total = 0.0
    for n in range(16):
        total += term / (2 * n + 1)
        term *= s2
    return e * LN2 + 2.0 * total


def fsum(values: list[float]) -> float:
    """Correctly rounded sum (order-independent)."""
    return math.fsum(values)

/* Deterministic exp and log for the kernels: IEEE + - * / and exact power-of-two
   scaling only (no libm), so every CPU and compiler build gives the same bits
   (with -ffp-contract=off). Accuracy: a few ulp of the true values. */
#ifndef MM_DETMATH_H
#define MM_DETMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Natural log of a normal, finite a > 0, plus e0 * ln 2, with IEEE operations only
   (frexp-free, by the bits): mantissa in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
   s = (m - 1) / (m + 1), by 9 series terms. Branch-free, so span loops vectorise. */
static inline double mm_log_normal(double a, int e0)
{
    uint64_t u;
    memcpy(&u, &a, 8);
    uint64_t frac = u & 0x000FFFFFFFFFFFFFULL;
    /* mantissa 1.frac > sqrt(2) (0x6A09E667F3BCD is sqrt(2)'s fraction): halve it, exactly,
       by giving it exponent -1; arithmetic, not ?:, so the loop has no branch to vectorise around */
    int up = frac > 0x6A09E667F3BCDULL;
    int e = (int)((u >> 52) & 0x7FF) - 1023 + e0 + up;
    u = frac | (0x3FF0000000000000ULL - ((uint64_t)up << 52));
    double m;
    memcpy(&m, &u, 8);
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    double p = 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    return (double)e * 0.6931471805599453 + 2.0 * (s * p);
}

/* Natural log of any finite a > 0: subnormals are scaled by 2^64 first (exact). */
static inline double mm_det_log(double a)
{
    return a < 2.2250738585072014e-308 ? mm_log_normal(a * 18446744073709551616.0, -64)
                                        : mm_log_normal(a, 0);
}


#define MM_LN2_HI 6.93147180369123816490e-01  /* ln 2 with 21 trailing zero bits */
#define MM_LN2_LO 1.90821492927058770002e-10  /* ln 2 - MM_LN2_HI */
#define MM_INV_LN2 1.44269504088896338700e+00

/* 2^k as a double for -1022 <= k <= 1023 (exact: built from its bits). */
static inline double mm_pow2(int k)
{
    uint64_t bits = (uint64_t)(k + 1023) << 52;
    double d;
    memcpy(&d, &bits, 8);
    return d;
}

/* e^x for x <= 0: x = k ln2 + r with |r| <= ln2/2 (Cody-Waite, two-part ln 2),
   e^r by its Taylor series to r^14/14! (Horner), times 2^k in at most two exact
   power-of-two scalings (the second rounds once, in the subnormal range). */
static inline double mm_exp_nonpos(double x)
{
    if (x != x) return x;
    if (x < -746.0) return 0.0;
    double kd = floor(x * MM_INV_LN2 + 0.5);
    int k = (int)kd;
    double r = (x - kd * MM_LN2_HI) - kd * MM_LN2_LO;
    double p = 1.0 / 87178291200.0;            /* 1/14! */
    p = p * r + 1.0 / 6227020800.0;            /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    if (k >= -1022) return p * mm_pow2(k);
    return (p * mm_pow2(k + 1022)) * mm_pow2(-1022);
}


#endif

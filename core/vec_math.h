/* vec_math.h — exp, expm1, tanh and erf in float for the CPU's elementwise loops, written in plain
 * arithmetic and selects (no branches, no libm calls) so that GCC vectorizes a loop over them;
 * glibc's expf / tanhf / erff are scalar calls, which left Tanh 20x and SiLU 7x slower than
 * PyTorch's vectorized ones (bench/layer_bench.lua).
 * Accuracy (against double precision over the float range, tests/c/test_vec_math.c): exp within
 * 1 ulp, expm1 within 2, tanh within 3 (of the result), erf within 4e-7 absolute (A&S's 1.5e-7
 * plus float rounding; PyTorch's vectorized erf uses the same formula).
 * Special values as libm: NaN in, NaN out; exp(+inf) = inf, exp(-inf) = 0, tanh(+-inf) = +-1,
 * erf(+-inf) = +-1; results below FLT_MIN (exp(x) for x < -87.3) are flushed to 0.
 * Range reduction and polynomials: the classic Cephes ones (exp: x = n ln2 + r, |r| <= ln2 / 2,
 * ln2 split in two for exactness; erf: Abramowitz & Stegun 7.1.26 with exp(-x^2)). */
#ifndef NR_VEC_MATH_H
#define NR_VEC_MATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float nr_vm_bits_to_float(uint32_t u)
{
   float f;
   memcpy(&f, &u, sizeof f);
   return f;
}

/* exp(x) for finite x in [-87.3, 88.7] (the caller selects the special cases): 2^n exp(r). */
static inline float nr_vm_exp_core(float x)
{
   /* n = round(x / ln2) by the 1.5 * 2^23 trick (plain adds: vectorizes without SSE4.1's round) */
   const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
   const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
   float p = 1.9875691500e-4f;
   p = p * r + 1.3981999507e-3f;
   p = p * r + 8.3334519073e-3f;
   p = p * r + 4.1665795894e-2f;
   p = p * r + 1.6666665459e-1f;
   p = p * r + 5.0000001201e-1f;
   const float er = r + r * r * p + 1.0f;
   /* 2^n in two factors: n runs from -126 to 128, past a float exponent's range at both ends */
   const int32_t n1 = (int32_t)n / 2, n2 = (int32_t)n - n1;
   return er * nr_vm_bits_to_float((uint32_t)(n1 + 127) << 23) * nr_vm_bits_to_float((uint32_t)(n2 + 127) << 23);
}

static inline float nr_vexpf(float x)
{
   /* clamped, and a NaN as 0 (converting a NaN to an integer is undefined): selected below */
   const float xn = x != x ? 0.0f : x, lo = xn < -87.33f ? -87.33f : xn, xc = lo > 88.72f ? 88.72f : lo;
   const float e = nr_vm_exp_core(xc);
   float out = x > 88.72f ? INFINITY : (x < -87.33f ? 0.0f : e);
   return x != x ? x : out;
}

/* exp(x) - 1 with a small x's relative accuracy: its Taylor polynomial for |x| < 0.7 (terms to
 * x^10 / 10!: the rest below 1e-9 relative), exp(x) - 1 beyond (cancelling at most one bit). */
static inline float nr_vexpm1f(float x)
{
   float t = 1.0f / 3628800.0f;
   t = t * x + 1.0f / 362880.0f;
   t = t * x + 1.0f / 40320.0f;
   t = t * x + 1.0f / 5040.0f;
   t = t * x + 1.0f / 720.0f;
   t = t * x + 1.0f / 120.0f;
   t = t * x + 1.0f / 24.0f;
   t = t * x + 1.0f / 6.0f;
   t = t * x + 0.5f;
   const float small = x + x * x * t;
   const float big = nr_vexpf(x) - 1.0f;
   const float out = fabsf(x) < 0.7f ? small : big;
   return x != x ? x : out;
}

/* tanh(x) = expm1(2x) / (expm1(2x) + 2), on |x| with the sign put back (odd); 1 past |x| = 9. */
static inline float nr_vtanhf(float x)
{
   const float ax = fabsf(x), a = ax > 9.0f ? 9.0f : ax;
   const float e = nr_vexpm1f(2.0f * a);
   const float t = e / (e + 2.0f);
   const float out = copysignf(t, x);
   return x != x ? x : out;
}

/* erf(x): its Taylor series for |x| < 0.5 (next term below 2e-8), else 1 - (a1 k + ... + a5 k^5)
 * exp(-x^2), k = 1 / (1 + p |x|) (A&S 7.1.26); odd. */
static inline float nr_verff(float x)
{
   const float ax = fabsf(x), a = ax > 10.0f ? 10.0f : ax, a2 = a * a;
   float t = -1.0f / 1320.0f;
   t = t * a2 + 1.0f / 216.0f;
   t = t * a2 - 1.0f / 42.0f;
   t = t * a2 + 1.0f / 10.0f;
   t = t * a2 - 1.0f / 3.0f;
   const float small = 1.12837916709551257f * (a + a * a2 * t);
   const float k = 1.0f / (1.0f + 0.3275911f * a);
   float p = 1.061405429f;
   p = p * k - 1.453152027f;
   p = p * k + 1.421413741f;
   p = p * k - 0.284496736f;
   p = p * k + 0.254829592f;
   const float big = 1.0f - p * k * nr_vexpf(-a2);
   const float out = copysignf(a < 0.5f ? small : big, x);
   return x != x ? x : out;
}
#endif

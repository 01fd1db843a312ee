/* nr_place.h — the plan of nr_surgery_place (core/nr.h, section nr), shared by its CPU entry
 * point (core/nr_ops.c) and its CUDA twin (core/cuda/nr_surgery.cu).
 *
 * What it is: the argument checks and the inverse index maps, built on the host from the CPU
 * int64 index tensors; both kernels then write every element of dst from these maps alone.
 * What it is not: a public API (Lua calls nr_surgery_place).
 * Invariants: dst is viewed as (d0, d1, inner) — d1 = 1 when dim 1 is not remapped; inv holds
 * four maps, -1 = none: inv[0, d0) source row of a for each dst row, inv[d0, 2 d0) row of b,
 * inv[2 d0, 2 d0 + d1) source column of a, inv[2 d0 + d1, 2 d0 + 2 d1) column of b. Every
 * destination appears at most once and the two blocks never overlap (checked).
 */
#ifndef NR_PLACE_H
#define NR_PLACE_H

#include "../nr.h"

#include <math.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nr_place_plan {
   int64_t d0, d1, inner; /* dst viewed as (d0, d1, inner) */
   int64_t a_s1, b_l1;    /* a's and b's size along the remapped dim 1 (1 when not remapped) */
   int b_random;          /* 1: the b block is drawn N(0, b_std^2) (b == NULL, b_rows given) */
   int64_t *inv;          /* 2 * d0 + 2 * d1 entries (malloc), see above */
} nr_place_plan;

#ifdef __CUDACC__
#define NR_PLACE_HD __host__ __device__ static inline
#else
#define NR_PLACE_HD static inline
#endif

/* Elements 2q and 2q + 1 (row-major indices inside the b block) of a random block: N(0, 1) by
 * Box-Muller (cosine, sine) on the SplitMix64 output for (seed, q), with 24-bit uniforms. A
 * function of (seed, index) only, so the values do not depend on threads or chunking; between the
 * CPU and a GPU they agree to a few ulps (each side's own logf / sinf / cosf). */
NR_PLACE_HD void nr_place_normal2(uint64_t seed, int64_t q, float *z0, float *z1)
{
   uint64_t z = seed + ((uint64_t)q + 1) * 0x9e3779b97f4a7c15ull;
   z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
   z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
   z ^= z >> 31;
   float u1 = ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
   float u2 = (float)((z >> 16) & 0xffffffu) * (1.0f / 16777216.0f);
   float r = sqrtf(-2.0f * logf(u1)), t = 6.2831853071795864f * u2;
   *z0 = r * cosf(t);
   *z1 = r * sinf(t);
}

/* Element e alone. */
NR_PLACE_HD float nr_place_normal(uint64_t seed, int64_t e)
{
   float z0, z1;
   nr_place_normal2(seed, e >> 1, &z0, &z1);
   return (e & 1) ? z1 : z0;
}

/* Checks every argument of nr_surgery_place except dst's device (the caller checks it; a and
 * b must be on dst's device, the index tensors on the CPU) and builds the maps. On failure the
 * error is set (naming func) and nothing is left allocated. */
nr_status nr_place_plan_build(const char *func, nr_place_plan *p, const nr_tensor *dst, const nr_tensor *a,
                              const nr_tensor *ar, const nr_tensor *ac, const nr_tensor *b, const nr_tensor *br,
                              const nr_tensor *bc, float b_std);
void nr_place_plan_free(nr_place_plan *p);

#ifdef __cplusplus
}
#endif
#endif

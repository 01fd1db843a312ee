/* gemm.c — nr_sgemm, the one matrix product every CPU kernel calls (core/internal.h).
 *
 * How: one thread pool. OpenBLAS is kept single-threaded (its pthread workers spin for a long
 * while after each call and fought OpenMP's workers for the two cores: a 0.4 ms product took
 * 4 ms right after an OpenMP loop); a product large enough to share is split here over OpenMP
 * threads, each computing its own block of C. Narrow products (C at most 64 columns, a multiple
 * of 8: the 1x1 convolutions on 8x8 / 4x4 maps, per image) run on an own register-tiled kernel
 * that reads A and B in place; OpenBLAS packs both operands first, which costs as much as the
 * product at these sizes (own kernel 1.2-1.9x faster there, equal from 128 columns on: measured
 * in bench/README.md). Everything else is OpenBLAS.
 * Invariants: a product's kernel is chosen from its whole shape before any split; in the own
 * kernel every element of C is a sum over k in the same order whichever block computes it, so
 * its results do not depend on the thread count (OpenBLAS's blocks may round differently, as its
 * own threading did; the conv kernels call nr_sgemm per sample inside their own parallel loops,
 * where nothing is split).
 */
#include "internal.h"

#include <cblas.h>
#include <omp.h>

/* Products under this many flops run on one thread (a fork/join costs a few microseconds). */
#define SGEMM_PARALLEL_FLOPS 4e6

/* OpenBLAS never threads (nr_sgemm splits instead); set once when the library loads, after
 * OpenBLAS's own initialisation (a dependency's constructors run first). */
__attribute__((constructor)) static void sgemm_single_threaded_blas(void) { openblas_set_num_threads(1); }

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* 8 floats, unaligned access allowed */

/* One MR x (8*NV) tile of C: acc = sum_k A[i, k] * B[k, :]; then C = alpha*acc + beta*C.
 * A[i, k] is at a[i*sa + k*sk] (sa, sk: A's row and column strides, so A or A^T alike). */
static inline __attribute__((always_inline)) void narrow_tile(const int MR, const int NV, const float *a, int64_t sa,
                                                                int64_t sk, const float *b, int64_t ldb, float *c,
                                                                int64_t ldc, int64_t k, float alpha, float beta)
{
   v8 acc[6][2];
   for (int i = 0; i < MR; i++)
      for (int v = 0; v < NV; v++) acc[i][v] = (v8){0};
   for (int64_t p = 0; p < k; p++) {
      const float *bp = b + p * ldb, *ap = a + p * sk;
      v8 x[2];
      for (int v = 0; v < NV; v++) x[v] = *(const v8 *)(bp + 8 * v);
      for (int i = 0; i < MR; i++) {
         const float w = ap[i * sa];
         for (int v = 0; v < NV; v++) acc[i][v] += w * x[v];
      }
   }
   for (int i = 0; i < MR; i++)
      for (int v = 0; v < NV; v++) {
         v8 *o = (v8 *)(c + i * ldc + 8 * v);
         *o = beta == 0.0f ? alpha * acc[i][v] : alpha * acc[i][v] + beta * *o;
      }
}

/* C (m x n, n a multiple of 8) = alpha * op(A) B + beta * C with register tiles of 6 x 16. */
NR_SIMD_CLONES
static void sgemm_narrow(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                         const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
   const int64_t sa = ta ? 1 : lda, sk = ta ? lda : 1;
   for (int64_t j = 0; j < n; j += 16) {
      const bool two = j + 16 <= n;
      int64_t i = 0;
      for (; i + 6 <= m; i += 6) {
         if (two) narrow_tile(6, 2, a + i * sa, sa, sk, b + j, ldb, c + i * ldc + j, ldc, k, alpha, beta);
         else narrow_tile(6, 1, a + i * sa, sa, sk, b + j, ldb, c + i * ldc + j, ldc, k, alpha, beta);
      }
      for (; i < m; i++) {
         if (two) narrow_tile(1, 2, a + i * sa, sa, sk, b + j, ldb, c + i * ldc + j, ldc, k, alpha, beta);
         else narrow_tile(1, 1, a + i * sa, sa, sk, b + j, ldb, c + i * ldc + j, ldc, k, alpha, beta);
      }
   }
}

static void sgemm_block(bool narrow, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                        int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
   if (m <= 0 || n <= 0) return;
   if (narrow)
      sgemm_narrow(ta, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
   else
      cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)m, (int)n,
                  (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

void nr_sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
              const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
   const bool narrow = !tb && n <= NR_SGEMM_NARROW_COLS && n % 8 == 0 && k > 0;
   int t = omp_in_parallel() ? 1 : nr_threads();
   if (t > 1 && 2.0 * (double)m * (double)n * (double)k < SGEMM_PARALLEL_FLOPS) t = 1;
   /* split the wider side of C into t blocks, columns in multiples of 16, rows of 8 */
   const bool by_cols = n >= m;
   const int64_t side = by_cols ? n : m, unit = by_cols ? 16 : 8;
   int64_t blk = (side + t - 1) / t;
   blk = (blk + unit - 1) / unit * unit;
   if (t > 1 && blk >= side) t = 1;
   if (t == 1) {
      sgemm_block(narrow, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
   }
#pragma omp parallel num_threads(t)
   {
      const int64_t i0 = omp_get_thread_num() * blk, i1 = i0 + blk < side ? i0 + blk : side;
      if (i0 < side) {
         if (by_cols) /* C[:, i0:i1] = op(A) op(B)[:, i0:i1] */
            sgemm_block(narrow, ta, tb, m, i1 - i0, k, alpha, a, lda, tb ? b + i0 * ldb : b + i0, ldb, beta, c + i0,
                        ldc);
         else /* C[i0:i1, :] = op(A)[i0:i1, :] op(B) */
            sgemm_block(narrow, ta, tb, i1 - i0, n, k, alpha, ta ? a + i0 : a + i0 * lda, lda, b, ldb, beta,
                        c + i0 * ldc, ldc);
      }
   }
}

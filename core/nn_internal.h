/* nn_internal.h — helpers shared by the layer kernels (core/nn_*.c); not part of the FFI contract.
 *
 * What it is: argument checks that every layer kernel applies (dtype, ndim, shape, contiguity,
 * same device as a reference tensor) and a grow-only per-thread scratch cache (im2col columns,
 * per-thread gradient accumulators).
 * Invariants: scratch buffers belong to the calling thread, live until the process ends, only
 * grow, and are not counted in nr_memory_* (they are not tensor storage); a kernel may hold at
 * most NN_SCRATCH_SLOTS of them at once (one per slot).
 */
#ifndef NR_NN_INTERNAL_H
#define NR_NN_INTERNAL_H

#include "internal.h"

/* Checks a tensor argument: dtype, ndim and shape (entries < 0: any) as nr_check_tensor, plus
 * contiguity and, when ref != NULL, the same device as ref. */
nr_status nn_check(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                   int32_t ndim, const int64_t *shape, const nr_tensor *ref);
#define NN_CHECK(name, t, dtype, ndim, shape, ref)                                               \
   NR_TRY(nn_check(__func__, name, t, dtype, ndim, shape, ref))

/* Checks that a and b have the same shape (names used in the message). */
nr_status nn_check_same_shape(const char *func, const char *an, const nr_tensor *a, const char *bn,
                              const nr_tensor *b);

enum { NN_SCRATCH_SLOTS = 3 };
/* A float buffer of at least n elements for this thread in the given slot (0..2); NULL when the
 * allocation fails (the caller reports NR_E_OOM). Contents are unspecified. */
float *nn_scratch(int slot, size_t n);

/* Output size of a convolution/pool along one axis; <= 0 when the geometry is impossible. */
static inline int64_t nn_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil)
{
   int64_t span = dil * (k - 1) + 1;
   if (in + 2 * pad < span) return 0;
   return (in + 2 * pad - span) / stride + 1;
}

/* Sum of dy over (N, ·, rest) per channel of dim 1 into db with the acc/scale rule (nn_common.c). */
void nn_bias_grad(const float *dy, float *db, int64_t n, int64_t f, int64_t rest, float scale,
                  float acc);

#endif

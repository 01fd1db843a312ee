/* nn_common.c — shared pieces of the layer kernels: argument checks, the per-thread scratch
 * cache, and the bias kernels (nr_bias_add, nr_bias_backward) used by Linear and Conv2d.
 * Invariants: scratch is grow-only and thread-local (see nn_internal.h); bias kernels are exact
 * per element (adds) or reduce in double per channel, parallel over channels. */
#include "nn_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static nr_status same_device(const char *func, const char *name, const nr_tensor *t, const nr_tensor *ref)
{
   if (ref->device == t->device && ref->device_index == t->device_index) return NR_OK;
   char a[128], b[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: on a different device (%s) from the input (%s)", name,
                     nr_tensor_describe(t, a, sizeof a), nr_tensor_describe(ref, b, sizeof b));
}

/* One of a, b is NHWC and the other cannot be read as NHWC (a strictly NCHW 4-d tensor). */
static bool layouts_conflict(const nr_tensor *a, const nr_tensor *b)
{
   if (a->ndim != 4 || b->ndim != 4) return false;
   return (nr_is_nhwc(a) && !nr_tensor_is_channels_last(b)) || (nr_is_nhwc(b) && !nr_tensor_is_channels_last(a));
}

static nr_status layout_conflict_error(const char *func, const char *name, const nr_tensor *t, const nr_tensor *ref)
{
   char a[128], b[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                     "%s (%s) and the input (%s) differ in memory format: the activations of one call are all "
                     "contiguous or all channels-last",
                     name, nr_tensor_describe(t, a, sizeof a), nr_tensor_describe(ref, b, sizeof b));
}

/* An activation is contiguous, or on CUDA a 4-d channels-last view. */
static nr_status act_layout_check(const char *func, const char *name, const nr_tensor *t)
{
   if (!nr_is_nhwc(t)) return nr_check_contiguous(func, name, t);
   if (t->device == NR_CUDA) return NR_OK;
   char a[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                     "%s: channels-last activations compute on CUDA only; this one is on the CPU (%s): call "
                     ":contiguous() first (the nn layers do)",
                     name, nr_tensor_describe(t, a, sizeof a));
}

nr_status nn_check(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                   int32_t ndim, const int64_t *shape, const nr_tensor *ref)
{
   NR_TRY(nr_check_tensor(func, name, t, dtype, -1, ndim, shape));
   if (dtype != NR_DTYPE_ACT) NR_TRY(nr_check_contiguous(func, name, t));
   else {
      NR_TRY(act_layout_check(func, name, t));
      if (ref) NR_TRY(nr_check_same_dtype(func, "the input", ref, name, t));
      if (ref && layouts_conflict(t, ref)) return layout_conflict_error(func, name, t, ref);
   }
   return ref ? same_device(func, name, t, ref) : NR_OK;
}

nr_status nn_check_companion(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                             const nr_tensor *ref)
{
   NR_TRY(nr_check_tensor(func, name, t, dtype, -1, ref->ndim, ref->shape));
   NR_TRY(same_device(func, name, t, ref));
   if (nr_is_nhwc(ref) ? !nr_tensor_is_channels_last(t) : !nr_tensor_is_contiguous(t)) {
      if (!nr_is_nhwc(ref) && !nr_is_nhwc(t)) return nr_check_contiguous(func, name, t);
      return layout_conflict_error(func, name, t, ref);
   }
   return NR_OK;
}

nr_status nn_check_same_shape(const char *func, const char *an, const nr_tensor *a, const char *bn,
                              const nr_tensor *b)
{
   bool same = a->ndim == b->ndim;
   for (int d = 0; same && d < a->ndim; d++) same = a->shape[d] == b->shape[d];
   if (same) return NR_OK;
   char da[128], db[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "shape mismatch: %s %s vs %s %s", an,
                     nr_tensor_describe(a, da, sizeof da), bn, nr_tensor_describe(b, db, sizeof db));
}

static _Thread_local float *g_scratch[NN_SCRATCH_SLOTS];
static _Thread_local size_t g_scratch_n[NN_SCRATCH_SLOTS];

float *nn_scratch(int slot, size_t n)
{
   if (slot < 0 || slot >= NN_SCRATCH_SLOTS) return NULL;
   if (n == 0) n = 1;
   if (g_scratch_n[slot] >= n) return g_scratch[slot];
   size_t bytes = ((n * sizeof(float)) + 63) / 64 * 64;
   float *p = aligned_alloc(64, bytes);
   if (!p) return NULL;
   free(g_scratch[slot]);
   g_scratch[slot] = p;
   g_scratch_n[slot] = bytes / sizeof(float);
   return p;
}

void nn_bias_grad(const float *dy, float *db, int64_t n, int64_t f, int64_t rest, float scale,
                  float acc)
{
#pragma omp parallel for if (nr_parallel_worth(f, n * rest))
   for (int64_t c = 0; c < f; c++) {
      double s = 0;
      for (int64_t i = 0; i < n; i++) {
         const float *p = dy + (i * f + c) * rest;
         float part = 0;
#pragma omp simd reduction(+ : part)
         for (int64_t r = 0; r < rest; r++) part += p[r];
         s += part;
      }
      db[c] = (acc == 0 ? 0.0f : acc * db[c]) + (float)(scale * s);
   }
}

/* y (N, F, ...) += b (F) per dim-1 channel. */
nr_status nr_bias_add(nr_tensor *y, const nr_tensor *b)
{
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, -1, NULL);
   if (y->ndim < 2) return NR_FAIL(NR_E_ARG, "y: expected at least 2 dimensions (N, F, ...), got %d", y->ndim);
   NN_CHECK("y", y, NR_DTYPE_ACT, -1, NULL, NULL);
   int64_t fs[1] = {y->shape[1]};
   NN_CHECK("b", b, NR_F32, 1, fs, y);
   NR_ON_CUDA(y, nr_cuda_bias_add(y, b));
   int64_t n = y->shape[0], f = y->shape[1], rest = nr_tensor_numel(y) / (n * f > 0 ? n * f : 1);
   float *py = y->data;
   const float *pb = b->data;
#pragma omp parallel for collapse(2) if (nr_parallel_worth(n * f, rest))
   for (int64_t i = 0; i < n; i++)
      for (int64_t c = 0; c < f; c++) {
         float *p = py + (i * f + c) * rest, v = pb[c];
         for (int64_t r = 0; r < rest; r++) p[r] += v;
      }
   return NR_OK;
}

nr_status nr_bias_backward(const nr_tensor *dy, nr_tensor *db, float scale, float acc)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, -1, NULL);
   if (dy->ndim < 2) return NR_FAIL(NR_E_ARG, "dy: expected at least 2 dimensions (N, F, ...), got %d", dy->ndim);
   NN_CHECK("dy", dy, NR_DTYPE_ACT, -1, NULL, NULL);
   int64_t fs[1] = {dy->shape[1]};
   NN_CHECK("db", db, NR_F32, 1, fs, dy);
   NR_ON_CUDA(dy, nr_cuda_bias_backward(dy, db, scale, acc));
   int64_t n = dy->shape[0], f = dy->shape[1], nf = n * f;
   int64_t rest = nf > 0 ? nr_tensor_numel(dy) / nf : 0;
   nn_bias_grad(dy->data, db->data, n, f, rest, scale, acc);
   return NR_OK;
}

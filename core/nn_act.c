/* nn_act.c — activation kernels on the CPU: ReLU and Sigmoid (forward and backward from the
 * output), tanh, ReLU6, leaky ReLU, ELU, SiLU, GELU, Hardswish and Hardsigmoid (nr_activation_*,
 * formulas in nn_act_math.h), inverted dropout, and softmax /
 * log-softmax over the last dimension (nr_relu_*, nr_sigmoid_*, nr_dropout_*, nr_softmax_* in
 * core/nr.h).
 * Invariants: ReLU, Sigmoid, the nr_activation_* kinds and dropout are elementwise (every element depends only on the same
 * element of the inputs, so outputs may alias inputs); softmax works row by row, each row on one
 * thread, in a fixed order; results do not depend on the thread count; dropout draws its mask
 * from the global generator (nr_rng_bernoulli), sequentially, so seeds reproduce.
 */
#include "nn_internal.h"
#include "vec_math.h"
/* the activations' exp, expm1, tanh and erf: the vectorizable ones (vec_math.h) */
#define NR_AM_EXP nr_vexpf
#define NR_AM_EXPM1 nr_vexpm1f
#define NR_AM_TANH nr_vtanhf
#define NR_AM_ERF nr_verff
#include "nn_act_math.h"

#include <math.h>
#include <omp.h>

/* a and b: activations (f32, or bf16 on CUDA) of one dtype, shape and memory format on the
 * same device. */
static nr_status pair_check(const char *func, const char *an, const nr_tensor *a, const char *bn, const nr_tensor *b)
{
   NR_TRY(nn_check(func, an, a, NR_DTYPE_ACT, -1, NULL, NULL));
   NR_TRY(nn_check(func, bn, b, NR_DTYPE_ACT, -1, NULL, a));
   return nn_check_same_shape(func, an, a, bn, b);
}
/* The dropout mask (always f32): a per-element companion of the activation a. */
static nr_status mask_check(const char *func, const char *an, const nr_tensor *a, const nr_tensor *mask)
{
   NR_TRY(nn_check(func, an, a, NR_DTYPE_ACT, -1, NULL, NULL));
   return nn_check_companion(func, "mask", mask, NR_F32, a);
}

#define PAR_FOR(n) _Pragma("omp parallel for simd if (n > 65536)") for (int64_t i = 0; i < (n); i++)

/* Runs CALL(lo, hi) on one span of [0, n) per thread (threads past 64 Ki elements), the spans cut
 * at multiples of 16 elements: for the loops kept in NR_SIMD_CLONES functions (a parallel region
 * is not cloned), the ones whose math vectorizes further with AVX2. */
#define PAR_SPANS(n, CALL)                                                            \
   _Pragma("omp parallel if ((n) > 65536)")                                            \
   {                                                                                   \
      const int64_t nt_ = omp_get_num_threads(), t_ = omp_get_thread_num();            \
      const int64_t lo = t_ == 0 ? 0 : ((n) * t_ / nt_) & ~(int64_t)15;               \
      const int64_t hi = t_ == nt_ - 1 ? (n) : ((n) * (t_ + 1) / nt_) & ~(int64_t)15;  \
      CALL;                                                                            \
   }

NR_SIMD_CLONES
static void sigmoid_span(const float *x, float *y, int64_t lo, int64_t hi)
{
#pragma omp simd
   for (int64_t i = lo; i < hi; i++) y[i] = nr_act_sigmoid(x[i]);
}

nr_status nr_relu_forward(const nr_tensor *x, nr_tensor *y)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, -1, NULL);
   NR_TRY(pair_check(__func__, "x", x, "y", y));
   NR_ON_CUDA(x, nr_cuda_relu_forward(x, y));
   const int64_t n = nr_tensor_numel(x);
   const float *px = x->data;
   float *py = y->data;
   PAR_FOR(n) py[i] = nn_relu(px[i]); /* NaN stays NaN (nn_internal.h) */
   return NR_OK;
}

nr_status nr_relu_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx)
{
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, -1, NULL);
   NR_TRY(pair_check(__func__, "y", y, "dy", dy));
   NR_TRY(pair_check(__func__, "y", y, "dx", dx));
   NR_ON_CUDA(y, nr_cuda_relu_backward(y, dy, dx));
   const int64_t n = nr_tensor_numel(y);
   const float *py = y->data, *pdy = dy->data;
   float *pdx = dx->data;
   /* both loads unconditional so the select compiles to a blend (a branch mispredicts on half of
    * the elements: 13x slower on random data). A NaN output (a NaN input) passes no gradient: the
    * mask is y > 0, as the fused BatchNorm2d + ReLU backward's (nn_norm.c, k_relu_b). */
   PAR_FOR(n) {
      const float d = pdy[i];
      pdx[i] = py[i] > 0.0f ? d : 0.0f;
   }
   return NR_OK;
}

nr_status nr_sigmoid_forward(const nr_tensor *x, nr_tensor *y)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, -1, NULL);
   NR_TRY(pair_check(__func__, "x", x, "y", y));
   NR_ON_CUDA(x, nr_cuda_sigmoid_forward(x, y));
   const int64_t n = nr_tensor_numel(x);
   const float *px = x->data;
   float *py = y->data;
   PAR_SPANS(n, sigmoid_span(px, py, lo, hi));
   return NR_OK;
}

nr_status nr_sigmoid_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx)
{
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, -1, NULL);
   NR_TRY(pair_check(__func__, "y", y, "dy", dy));
   NR_TRY(pair_check(__func__, "y", y, "dx", dx));
   NR_ON_CUDA(y, nr_cuda_sigmoid_backward(y, dy, dx));
   const int64_t n = nr_tensor_numel(y);
   const float *py = y->data, *pdy = dy->data;
   float *pdx = dx->data;
   PAR_FOR(n) pdx[i] = pdy[i] * py[i] * (1.0f - py[i]);
   return NR_OK;
}

nr_status nr_dropout_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *mask, float p)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, -1, NULL);
   NR_TRY(pair_check(__func__, "x", x, "y", y));
   NR_TRY(mask_check(__func__, "x", x, mask));
   if (!(p >= 0.0f && p < 1.0f)) return NR_FAIL(NR_E_ARG, "p must be in [0, 1), got %g", p);
   NR_ON_CUDA(x, nr_cuda_dropout_forward(x, y, mask, p));
   const int64_t n = nr_tensor_numel(x);
   if (p > 0.0f) NR_TRY_WRAP(nr_rng_bernoulli(mask, 1.0 - (double)p));
   const float keep = 1.0f / (1.0f - p);
   const float *px = x->data;
   float *py = y->data, *pm = mask->data;
   if (p == 0.0f) {
      PAR_FOR(n) { pm[i] = 1.0f; py[i] = px[i]; }
      return NR_OK;
   }
   PAR_FOR(n) {
      pm[i] *= keep;
      py[i] = px[i] * pm[i];
   }
   return NR_OK;
}

nr_status nr_dropout_backward(const nr_tensor *dy, const nr_tensor *mask, nr_tensor *dx)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, -1, NULL);
   NR_TRY(mask_check(__func__, "dy", dy, mask));
   NR_TRY(pair_check(__func__, "dy", dy, "dx", dx));
   NR_ON_CUDA(dy, nr_cuda_dropout_backward(dy, mask, dx));
   const int64_t n = nr_tensor_numel(dy);
   const float *pdy = dy->data, *pm = mask->data;
   float *pdx = dx->data;
   PAR_FOR(n) pdx[i] = pdy[i] * pm[i];
   return NR_OK;
}

/* ------------------------------------- tanh, ReLU6, leaky ReLU, ELU, SiLU, GELU, Hardswish, ... */

static nr_status kind_check(const char *func, int32_t kind, float alpha)
{
   if (kind < NR_ACT_TANH || kind > NR_ACT_HARDSIGMOID)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "kind must be one of NR_ACT_* (%d..%d), got %d",
                        (int)NR_ACT_TANH, (int)NR_ACT_HARDSIGMOID, (int)kind);
   if ((kind == NR_ACT_LEAKY_RELU || kind == NR_ACT_ELU) && !(alpha > -INFINITY && alpha < INFINITY))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s must be finite, got %g",
                        kind == NR_ACT_ELU ? "alpha" : "negative slope", (double)alpha);
   return NR_OK;
}

/* One loop per kind, the kind a constant in it, so each loop is the kind's formula alone. */
#define ACT_KINDS(X)                                                                               \
   X(NR_ACT_TANH) X(NR_ACT_RELU6) X(NR_ACT_LEAKY_RELU) X(NR_ACT_ELU) X(NR_ACT_SILU) X(NR_ACT_GELU)   \
   X(NR_ACT_GELU_TANH) X(NR_ACT_HARDSWISH) X(NR_ACT_HARDSIGMOID)

NR_SIMD_CLONES
static void act_forward_span(int32_t kind, const float *x, float *y, float alpha, int64_t lo, int64_t hi)
{
#define FWD(K)                                                                   \
   case K:                                                                       \
      _Pragma("omp simd") for (int64_t i = lo; i < hi; i++) y[i] = nr_act_forward(K, x[i], alpha); \
      break;
   switch (kind) { ACT_KINDS(FWD) }
#undef FWD
}

NR_SIMD_CLONES
static void act_backward_span(int32_t kind, const float *s, const float *dy, float *dx, float alpha, int64_t lo, int64_t hi)
{
#define BWD(K)                                                                                \
   case K:                                                                                    \
      _Pragma("omp simd") for (int64_t i = lo; i < hi; i++) dx[i] = nr_act_backward(K, s[i], dy[i], alpha); \
      break;
   switch (kind) { ACT_KINDS(BWD) }
#undef BWD
}

nr_status nr_activation_forward(const nr_tensor *x, nr_tensor *y, int32_t kind, float alpha)
{
   NR_TRY(kind_check(__func__, kind, alpha));
   NR_TRY(pair_check(__func__, "x", x, "y", y));
   NR_ON_CUDA(x, nr_cuda_activation_forward(x, y, kind, alpha));
   const int64_t n = nr_tensor_numel(x);
   const float *px = x->data;
   float *py = y->data;
   PAR_SPANS(n, act_forward_span(kind, px, py, alpha, lo, hi));
   return NR_OK;
}

nr_status nr_activation_backward(const nr_tensor *saved, const nr_tensor *dy, nr_tensor *dx, int32_t kind, float alpha)
{
   NR_TRY(kind_check(__func__, kind, alpha));
   NR_TRY(pair_check(__func__, "saved", saved, "dy", dy));
   NR_TRY(pair_check(__func__, "saved", saved, "dx", dx));
   NR_ON_CUDA(saved, nr_cuda_activation_backward(saved, dy, dx, kind, alpha));
   const int64_t n = nr_tensor_numel(saved);
   const float *ps = saved->data, *pdy = dy->data;
   float *pdx = dx->data;
   PAR_SPANS(n, act_backward_span(kind, ps, pdy, pdx, alpha, lo, hi));
   return NR_OK;
}

/* ---------------------------------------------------------------- softmax over the last dim */

/* x, y (or y, dy, dx): f32 activations of one shape, row-major contiguous, ndim >= 1. */
static nr_status rows_check(const char *func, const char *an, const nr_tensor *a, const char *bn, const nr_tensor *b)
{
   NR_TRY(pair_check(func, an, a, bn, b));
   if (a->ndim < 1) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: expected ndim >= 1, got a scalar", an);
   NR_TRY(nr_check_contiguous(func, an, a));
   return nr_check_contiguous(func, bn, b);
}

nr_status nr_softmax_forward(const nr_tensor *x, nr_tensor *y, int32_t log_softmax)
{
   NR_TRY(rows_check(__func__, "x", x, "y", y));
   NR_ON_CUDA(x, nr_cuda_softmax_forward(x, y, log_softmax));
   const int64_t k = x->shape[x->ndim - 1], rows = k > 0 ? nr_tensor_numel(x) / k : 0;
   const float *px = x->data;
   float *py = y->data;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * k > 32768)
   for (int64_t r = 0; r < rows; r++) {
      const float *xr = px + r * k;
      float *yr = py + r * k;
      float mx = -INFINITY;
      bool nan = false;
      for (int64_t j = 0; j < k; j++) {
         if (xr[j] != xr[j]) nan = true;
         else if (xr[j] > mx) mx = xr[j];
      }
      if (nan || mx == -INFINITY) { /* NaN in, or every logit -inf: NaN out (PyTorch) */
         for (int64_t j = 0; j < k; j++) yr[j] = NAN;
         continue;
      }
      double se = 0.0;
      for (int64_t j = 0; j < k; j++) se += exp((double)(xr[j] - mx));
      if (log_softmax) {
         const float lse = (float)log(se);
         for (int64_t j = 0; j < k; j++) yr[j] = (xr[j] - mx) - lse;
      } else {
         const double inv = 1.0 / se;
         for (int64_t j = 0; j < k; j++) yr[j] = (float)(exp((double)(xr[j] - mx)) * inv);
      }
   }
   return NR_OK;
}

nr_status nr_softmax_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx, int32_t log_softmax)
{
   NR_TRY(rows_check(__func__, "y", y, "dy", dy));
   NR_TRY(rows_check(__func__, "y", y, "dx", dx));
   NR_ON_CUDA(y, nr_cuda_softmax_backward(y, dy, dx, log_softmax));
   const int64_t k = y->shape[y->ndim - 1], rows = k > 0 ? nr_tensor_numel(y) / k : 0;
   const float *py = y->data, *pdy = dy->data;
   float *pdx = dx->data;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * k > 32768)
   for (int64_t r = 0; r < rows; r++) {
      const float *yr = py + r * k, *gr = pdy + r * k;
      float *dr = pdx + r * k;
      double s = 0.0;
      if (log_softmax) {
         for (int64_t j = 0; j < k; j++) s += gr[j];
         for (int64_t j = 0; j < k; j++) dr[j] = gr[j] - expf(yr[j]) * (float)s;
      } else {
         for (int64_t j = 0; j < k; j++) s += (double)gr[j] * yr[j];
         for (int64_t j = 0; j < k; j++) dr[j] = yr[j] * (gr[j] - (float)s);
      }
   }
   return NR_OK;
}

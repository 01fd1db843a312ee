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

#include <math.h>

/* Checks a tensor argument: dtype, ndim and shape (entries < 0: any) as nr_check_tensor, plus
 * contiguity and, when ref != NULL, the same device as ref. For dtype NR_DTYPE_ACT (an
 * activation) a 4-d CUDA tensor may instead be channels-last, and with ref the dtype and memory
 * format must agree with ref's: the activations of one call share both. */
nr_status nn_check(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                   int32_t ndim, const int64_t *shape, const nr_tensor *ref);
#define NN_CHECK(name, t, dtype, ndim, shape, ref)                                               \
   NR_TRY(nn_check(__func__, name, t, dtype, ndim, shape, ref))

/* Checks a per-element companion of the activation ref (a dropout mask, pooling indices): dtype,
 * ref's shape, device and memory format (contiguous, or channels-last when ref is). */
nr_status nn_check_companion(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                             const nr_tensor *ref);

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

/* Output size of a pool along one axis (no dilation); <= 0 when the geometry is impossible.
 * ceil_mode: the last window may run past the input (clipped), as PyTorch's ceil_mode, which
 * also drops a last window that would start beyond the input and its left padding. */
static inline int64_t nn_pool_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int32_t ceil_mode)
{
   const int64_t span = in + 2 * pad - k + (ceil_mode ? stride - 1 : 0); /* < 0: not one window */
   if (span < 0) return 0;
   int64_t n = span / stride + 1;
   if (ceil_mode && (n - 1) * stride >= in + pad) n--;
   return n;
}

/* The geometry of one convolution call (core/nn_conv.c fills it after checking the arguments):
 * input (n, cin, h, w), output (n, cout, ho, wo), kernel kh x kw, cg / og input / output channels
 * per group, k = cg*kh*kw, p = ho*wo; stride, padding, dilation, groups. */
typedef struct {
   int64_t n, cin, h, w, cout, kh, kw, ho, wo, cg, og, k, p;
   int64_t sh, sw, ph, pw, dh, dw, groups;
} conv_geom;

/* BatchNorm2d evaluation as y = (x - m) * a + b for channel c: the one expression both the BN
 * kernel and the conv epilogue use, so a folded BN gives the same bits as a separate one. */
static inline void nn_bn_eval_ab(const float *gamma, const float *beta, const float *rm, const float *rv,
                                 float eps, int64_t c, float *m, float *a, float *b)
{
   const float invstd = (float)(1.0 / sqrt((double)rv[c] + (double)eps));
   *m = rm[c];
   *a = invstd * (gamma ? gamma[c] : 1.0f);
   *b = beta ? beta[c] : 0.0f;
}

/* ReLU as PyTorch's (clamp_min(x, 0)): x when x > 0, 0 when x <= 0 (-0 included), and a NaN stays
 * NaN, so a diverging activation reaches the loss instead of vanishing. Written as a compare and
 * a mask (cmpleps + andnps), not as max(x, 0): x86 maxps returns its second operand when either
 * is NaN, which makes max(x, 0) give 0 for NaN. The CUDA kernels (k_relu_f, k_bn_affine) and
 * Tensor:relu (math.c, tensor_kernels.cu) use the same expression. */
static inline float nn_relu(float v) { return v <= 0.0f ? 0.0f : v; }

/* o = (p - m) * a + b over np planes of hw floats, stride apart (the planes of one channel), then
 * nn_relu when relu (the ReLU's own expression, so fused and separate forwards agree bit for
 * bit, NaN included). o may be p. When |m * a| <= 1 it runs as p * a + (b - m * a), one
 * multiply-add per element, within an ulp or two of max(|o|, 1); beyond, x and the mean share
 * digits that form would lose (a mean large against the spread), so the planes are centred
 * first. The choice is per channel, made once for its planes (per plane it cost a third of a
 * 4x4 plane's time), and the same wherever the BN runs (its own kernel or a conv's epilogue). */
/* Whether a channel's planes are centred first (the rule nn_affine_planes states). */
static inline int nn_affine_centred(float m, float a) { return !(fabsf(m * a) <= 1.0f); }

static inline void nn_affine_planes(const float *p, float *o, int64_t np, int64_t stride, int64_t hw, float m, float a,
                                    float b, int relu)
{
   const int64_t n = np * stride; /* planes k * stride .. k * stride + hw */
   if (!nn_affine_centred(m, a)) {
      const float b2 = b - m * a;
      if (relu) {
         for (int64_t k = 0; k < n; k += stride) {
#pragma omp simd
            for (int64_t i = k; i < k + hw; i++) o[i] = nn_relu(p[i] * a + b2);
         }
      } else {
         for (int64_t k = 0; k < n; k += stride) {
#pragma omp simd
            for (int64_t i = k; i < k + hw; i++) o[i] = p[i] * a + b2;
         }
      }
   } else if (relu) {
      for (int64_t k = 0; k < n; k += stride) {
#pragma omp simd
         for (int64_t i = k; i < k + hw; i++) o[i] = nn_relu((p[i] - m) * a + b);
      }
   } else {
      for (int64_t k = 0; k < n; k += stride) {
#pragma omp simd
         for (int64_t i = k; i < k + hw; i++) o[i] = (p[i] - m) * a + b;
      }
   }
}

/* nn_affine_planes on one plane. */
static inline void nn_affine_plane(const float *p, float *o, int64_t hw, float m, float a, float b, int relu)
{
   nn_affine_planes(p, o, 1, hw, hw, m, a, b, relu);
}

/* A BatchNorm2d in evaluation mode (and optionally the in-place ReLU after it) folded into the
 * layer before it: applied to each output plane right after it is computed, while in cache. */
typedef struct {
   const float *gamma, *beta, *rm, *rv;
   float eps;
   int relu;
} nn_epilogue;

static inline void nn_epilogue_plane(const nn_epilogue *e, int64_t c, float *y, int64_t hw)
{
   float m, a, b;
   nn_bn_eval_ab(e->gamma, e->beta, e->rm, e->rv, e->eps, c, &m, &a, &b);
   nn_affine_plane(y, y, hw, m, a, b, e->relu);
}

/* The epilogue on every plane of y (nc planes of hw floats, channel = plane % c), for paths that
 * cannot apply it per plane as they go. */
static inline void nn_epilogue_all(const nn_epilogue *e, float *y, int64_t nc, int64_t c, int64_t hw)
{
#pragma omp parallel for if (nr_parallel_worth(nc, hw))
   for (int64_t q = 0; q < nc; q++) nn_epilogue_plane(e, q % c, y + q * hw, hw);
}

/* Sum of dy over (N, ·, rest) per channel of dim 1 into db with the acc/scale rule (nn_common.c). */
void nn_bias_grad(const float *dy, float *db, int64_t n, int64_t f, int64_t rest, float scale,
                  float acc);

/* Depthwise convolution kernels (groups == cin == cout; core/nn_depthwise.c); arguments already
 * checked. The forward applies epi (NULL: none) to each output plane. */
nr_status nn_dw_forward(const float *x, float *y, const float *w, const float *b, const conv_geom *g,
                        const nn_epilogue *epi);
nr_status nn_dw_backward_data(const float *dy, float *dx, const float *w, const conv_geom *g);
nr_status nn_dw_backward_weight(const float *x, const float *dy, float *dw, const conv_geom *g, float scale,
                                float acc);

/* 3x3 stride-1 dense convolutions with >= 128 channels by Winograd F(2x2, 3x3)
 * (core/nn_winograd.c): the forward (epi as nn_dw_forward) and backward-data passes. */
bool nn_winograd_applies(const conv_geom *g);
nr_status nn_winograd_forward(const float *x, float *y, const float *w, const float *b, const conv_geom *g,
                              const nn_epilogue *epi);
nr_status nn_winograd_backward_data(const float *dy, float *dx, const float *w, const conv_geom *g);

#endif

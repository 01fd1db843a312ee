/* nn_pool.c — pooling on the CPU: max pooling with saved argmax indices, average pooling
 * (count_include_pad as PyTorch), both also adaptive (the output size given, PyTorch's windows),
 * and global average pooling (nr_*pool* in core/nr.h).
 * Invariants: each (n, c) plane is handled by one thread (parallel over N*C), so results do not
 * depend on the thread count; backward passes overwrite dx; max-pool indices are h * W + w
 * positions inside the input plane (PyTorch's convention), first maximum on ties; a NaN input
 * wins its window (propagates, as PyTorch).
 */
#include "nn_internal.h"
#include "nn_pool_window.h"

#include <math.h>
#include <string.h>

/* Geometry of one pooling call: nc = N*C planes of h x w in, ho x wo out; windowed pools use the
 * kernel, stride and padding, adaptive ones PyTorch's adaptive windows (nn_pool_window.h). */
typedef struct {
   int64_t nc, h, w, ho, wo, kh, kw, sh, sw, ph, pw;
   int adaptive;
} pool_geom;

typedef nr_pool_span pool_span;

static inline pool_span row_span(const pool_geom *g, int64_t oh)
{
   return nr_pool_span_at(oh, g->h, g->ho, g->kh, g->sh, g->ph, g->adaptive);
}
static inline pool_span col_span(const pool_geom *g, int64_t ow)
{
   return nr_pool_span_at(ow, g->w, g->wo, g->kw, g->sw, g->pw, g->adaptive);
}

static nr_status pool_setup(const char *func, const nr_tensor *x, const char *xname, const nr_tensor *y,
                            const char *yname, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
                            int32_t pw, int32_t ceil_mode, pool_geom *g)
{
   NR_TRY(nn_check(func, xname, x, NR_DTYPE_ACT, 4, NULL, NULL));
   if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || ph > kh / 2 || pw > kw / 2)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "bad geometry: kernel %dx%d (>= 1), stride %dx%d (>= 1), padding %dx%d (0..kernel/2)", kh, kw,
                        sh, sw, ph, pw);
   g->nc = x->shape[0] * x->shape[1], g->h = x->shape[2], g->w = x->shape[3];
   g->kh = kh, g->kw = kw, g->sh = sh, g->sw = sw, g->ph = ph, g->pw = pw, g->adaptive = 0;
   if (ceil_mode != 0 && ceil_mode != 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "ceil_mode must be 0 or 1, got %d", ceil_mode);
   g->ho = nn_pool_out_size(g->h, kh, sh, ph, ceil_mode);
   g->wo = nn_pool_out_size(g->w, kw, sw, pw, ceil_mode);
   if (g->ho < 1 || g->wo < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "input %lldx%lld is too small for kernel %dx%d with padding %dx%d",
                        (long long)g->h, (long long)g->w, kh, kw, ph, pw);
   int64_t ys[4] = {x->shape[0], x->shape[1], g->ho, g->wo};
   NR_TRY(nn_check(func, yname, y, NR_DTYPE_ACT, 4, ys, x));
   return NR_OK;
}

/* Adaptive pools: the output size is y's; both planes must be non-empty (PyTorch's rule). */
static nr_status adaptive_setup(const char *func, const nr_tensor *x, const char *xname, const nr_tensor *y,
                                const char *yname, pool_geom *g)
{
   NR_TRY(nn_check(func, xname, x, NR_DTYPE_ACT, 4, NULL, NULL));
   int64_t ys[4] = {x->shape[0], x->shape[1], -1, -1};
   NR_TRY(nn_check(func, yname, y, NR_DTYPE_ACT, 4, ys, x));
   g->nc = x->shape[0] * x->shape[1], g->h = x->shape[2], g->w = x->shape[3];
   g->ho = y->shape[2], g->wo = y->shape[3];
   if (g->h < 1 || g->w < 1 || g->ho < 1 || g->wo < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "%s plane %lldx%lld and %s plane %lldx%lld must both be non-empty",
                        xname, (long long)g->h, (long long)g->w, yname, (long long)g->ho, (long long)g->wo);
   /* a bound on the largest window's size (the work estimate of the parallel loops); no stride, no padding */
   g->kh = (g->h + g->ho - 1) / g->ho + 1, g->kw = (g->w + g->wo - 1) / g->wo + 1;
   g->sh = g->sw = 1, g->ph = g->pw = 0, g->adaptive = 1;
   return NR_OK;
}

/* Max over each window (every window holds at least one input element: padding <= kernel/2, the
 * ceil-mode rule that drops a last window starting past the input, adaptive windows never empty);
 * PyTorch's rule (take v when v > best or v is NaN), written without branches (masks instead of
 * ?: because compilers turn the selects back into branches, which mispredict on half of the
 * elements of random data). */
static void maxpool_run(const pool_geom *geom, const float *px, float *py, int64_t *pi)
{
   const pool_geom gl = *geom, *g = &gl; /* a private copy: the output stores cannot alias it */
#pragma omp parallel for if (nr_parallel_worth(g->nc, g->ho * g->wo * g->kh * g->kw))
   for (int64_t q = 0; q < g->nc; q++) {
      const float *xp = px + q * g->h * g->w;
      float *yp = py + q * g->ho * g->wo;
      int64_t *ip = pi + q * g->ho * g->wo;
      for (int64_t oh = 0; oh < g->ho; oh++) {
         const pool_span r = row_span(g, oh);
         for (int64_t ow = 0; ow < g->wo; ow++) {
            const pool_span c = col_span(g, ow);
            float best = -INFINITY;
            int64_t arg = r.lo * g->w + c.lo;
            for (int64_t ih = r.lo; ih < r.hi; ih++)
               for (int64_t iw = c.lo; iw < c.hi; iw++) {
                  const float v = xp[ih * g->w + iw];
                  const int64_t mask = -(int64_t)((v > best) | (v != v));
                  uint32_t vb, bb;
                  memcpy(&vb, &v, 4);
                  memcpy(&bb, &best, 4);
                  bb = (bb & ~(uint32_t)mask) | (vb & (uint32_t)mask);
                  memcpy(&best, &bb, 4);
                  arg = (arg & ~mask) | ((ih * g->w + iw) & mask);
               }
            yp[oh * g->wo + ow] = best;
            ip[oh * g->wo + ow] = arg;
         }
      }
   }
}

/* dx <- zero except at the argmax positions, where each window's dy is added in window order. */
static nr_status maxpool_scatter(const char *func, const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx)
{
   const int64_t nc = dy->shape[0] * dy->shape[1], po = dy->shape[2] * dy->shape[3], pin = dx->shape[2] * dx->shape[3];
   const float *pdy = dy->data;
   const int64_t *pi = indices->data;
   float *pdx = dx->data;
   int64_t bad = -1;
#pragma omp parallel for if (nr_parallel_worth(nc, po + pin))
   for (int64_t q = 0; q < nc; q++) {
      float *d = pdx + q * pin;
      memset(d, 0, sizeof(float) * pin);
      const float *g = pdy + q * po;
      const int64_t *ip = pi + q * po;
      for (int64_t i = 0; i < po; i++) {
         int64_t k = ip[i];
         if (k < 0 || k >= pin) {
#pragma omp atomic write
            bad = q * po + i;
            continue;
         }
         d[k] += g[i];
      }
   }
   if (bad >= 0)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "indices: element %lld is %lld, outside the input plane 0..%lld (indices not from the forward?)",
                        (long long)bad, (long long)pi[bad], (long long)pin - 1);
   return NR_OK;
}

nr_status nr_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices, int32_t kernel_h,
                               int32_t kernel_w, int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                               int32_t ceil_mode)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(pool_setup(__func__, x, "x", y, "y", kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, ceil_mode, &g));
   NR_TRY(nr_check_no_overlap(__func__, "y", y, "x", x)); /* y is written while x is read */
   NR_TRY(nn_check_companion(__func__, "indices", indices, NR_I64, y));
   NR_ON_CUDA(x, nr_cuda_maxpool2d_forward(x, y, indices, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                           ceil_mode));
   maxpool_run(&g, x->data, y->data, indices->data);
   return NR_OK;
}

nr_status nr_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx, int32_t kernel_h,
                                int32_t kernel_w, int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                int32_t ceil_mode)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dx", dx, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(pool_setup(__func__, dx, "dx", dy, "dy", kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, ceil_mode,
                     &g));
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "dy", dy)); /* dx is written while dy is read */
   NR_TRY(nn_check_companion(__func__, "indices", indices, NR_I64, dy));
   NR_ON_CUDA(dy, nr_cuda_maxpool2d_backward(dy, indices, dx, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                             ceil_mode));
   return maxpool_scatter(__func__, dy, indices, dx);
}

nr_status nr_adaptive_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(adaptive_setup(__func__, x, "x", y, "y", &g));
   NR_TRY(nr_check_no_overlap(__func__, "y", y, "x", x));
   NR_TRY(nn_check_companion(__func__, "indices", indices, NR_I64, y));
   NR_ON_CUDA(x, nr_cuda_adaptive_maxpool2d_forward(x, y, indices));
   maxpool_run(&g, x->data, y->data, indices->data);
   return NR_OK;
}

nr_status nr_adaptive_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dx", dx, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(adaptive_setup(__func__, dx, "dx", dy, "dy", &g));
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "dy", dy));
   NR_TRY(nn_check_companion(__func__, "indices", indices, NR_I64, dy));
   NR_ON_CUDA(dy, nr_cuda_adaptive_maxpool2d_backward(dy, indices, dx));
   return maxpool_scatter(__func__, dy, indices, dx);
}

static inline float avg_divisor(const pool_geom *g, pool_span r, pool_span c, int32_t include_pad)
{
   return nr_pool_avg_divisor(r, c, g->h, g->w, g->kh, g->kw, g->ph, g->pw, include_pad, g->adaptive);
}

static void avgpool_run(const pool_geom *geom, const float *px, float *py, int32_t include_pad)
{
   const pool_geom gl = *geom, *g = &gl; /* a private copy: the output stores cannot alias it */
#pragma omp parallel for if (nr_parallel_worth(g->nc, g->ho * g->wo * g->kh * g->kw))
   for (int64_t q = 0; q < g->nc; q++) {
      const float *xp = px + q * g->h * g->w;
      float *yp = py + q * g->ho * g->wo;
      for (int64_t oh = 0; oh < g->ho; oh++) {
         const pool_span r = row_span(g, oh);
         for (int64_t ow = 0; ow < g->wo; ow++) {
            const pool_span c = col_span(g, ow);
            float s = 0;
            for (int64_t ih = r.lo; ih < r.hi; ih++)
               for (int64_t iw = c.lo; iw < c.hi; iw++) s += xp[ih * g->w + iw];
            yp[oh * g->wo + ow] = s / avg_divisor(g, r, c, include_pad);
         }
      }
   }
}

/* dx <- the sum, over the windows covering each element, of dy / divisor (scattered in window
 * order, one thread per plane). */
static void avgpool_back_run(const pool_geom *geom, const float *pdy, float *pdx, int32_t include_pad)
{
   const pool_geom gl = *geom, *g = &gl; /* a private copy: the output stores cannot alias it */
#pragma omp parallel for if (nr_parallel_worth(g->nc, g->ho * g->wo * g->kh * g->kw))
   for (int64_t q = 0; q < g->nc; q++) {
      float *xp = pdx + q * g->h * g->w;
      const float *yp = pdy + q * g->ho * g->wo;
      memset(xp, 0, sizeof(float) * g->h * g->w);
      for (int64_t oh = 0; oh < g->ho; oh++) {
         const pool_span r = row_span(g, oh);
         for (int64_t ow = 0; ow < g->wo; ow++) {
            const pool_span c = col_span(g, ow);
            float v = yp[oh * g->wo + ow] / avg_divisor(g, r, c, include_pad);
            for (int64_t ih = r.lo; ih < r.hi; ih++)
               for (int64_t iw = c.lo; iw < c.hi; iw++) xp[ih * g->w + iw] += v;
         }
      }
   }
}

nr_status nr_avgpool2d_forward(const nr_tensor *x, nr_tensor *y, int32_t kernel_h, int32_t kernel_w, int32_t stride_h,
                               int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t count_include_pad,
                               int32_t ceil_mode)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(pool_setup(__func__, x, "x", y, "y", kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, ceil_mode, &g));
   NR_TRY(nr_check_no_overlap(__func__, "y", y, "x", x)); /* y is written while x is read */
   NR_ON_CUDA(x, nr_cuda_avgpool2d_forward(x, y, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                           count_include_pad, ceil_mode));
   avgpool_run(&g, x->data, y->data, count_include_pad);
   return NR_OK;
}

nr_status nr_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx, int32_t kernel_h, int32_t kernel_w,
                                int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                int32_t count_include_pad, int32_t ceil_mode)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dx", dx, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(pool_setup(__func__, dx, "dx", dy, "dy", kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, ceil_mode,
                     &g));
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "dy", dy)); /* dx is written while dy is read */
   NR_ON_CUDA(dy, nr_cuda_avgpool2d_backward(dy, dx, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                             count_include_pad, ceil_mode));
   avgpool_back_run(&g, dy->data, dx->data, count_include_pad);
   return NR_OK;
}

nr_status nr_adaptive_avgpool2d_forward(const nr_tensor *x, nr_tensor *y)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("y", y, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(adaptive_setup(__func__, x, "x", y, "y", &g));
   NR_TRY(nr_check_no_overlap(__func__, "y", y, "x", x));
   NR_ON_CUDA(x, nr_cuda_adaptive_avgpool2d_forward(x, y));
   avgpool_run(&g, x->data, y->data, 0);
   return NR_OK;
}

nr_status nr_adaptive_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dx", dx, NR_DTYPE_ACT, -1, 4, NULL);
   pool_geom g;
   NR_TRY(adaptive_setup(__func__, dx, "dx", dy, "dy", &g));
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "dy", dy));
   NR_ON_CUDA(dy, nr_cuda_adaptive_avgpool2d_backward(dy, dx));
   avgpool_back_run(&g, dy->data, dx->data, 0);
   return NR_OK;
}

nr_status nr_global_avgpool_forward(const nr_tensor *x, nr_tensor *y)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, 4, NULL);
   NN_CHECK("x", x, NR_DTYPE_ACT, 4, NULL, NULL);
   int64_t ys[2] = {x->shape[0], x->shape[1]};
   NN_CHECK("y", y, NR_DTYPE_ACT, 2, ys, x);
   NR_TRY(nr_check_no_overlap(__func__, "y", y, "x", x));
   NR_ON_CUDA(x, nr_cuda_global_avgpool_forward(x, y));
   const int64_t nc = ys[0] * ys[1], hw = x->shape[2] * x->shape[3];
   if (hw == 0 && nc > 0) return NR_FAIL(NR_E_ARG, "x: empty spatial size");
   const float *px = x->data;
   float *py = y->data;
#pragma omp parallel for if (nr_parallel_worth(nc, hw))
   for (int64_t q = 0; q < nc; q++) {
      const float *p = px + q * hw;
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < hw; i++) s += p[i];
      py[q] = s / (float)hw;
   }
   return NR_OK;
}

nr_status nr_global_avgpool_backward(const nr_tensor *dy, nr_tensor *dx)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 2, NULL);
   NR_CHECK_T("dx", dx, NR_DTYPE_ACT, -1, 4, NULL);
   NN_CHECK("dy", dy, NR_DTYPE_ACT, 2, NULL, NULL);
   int64_t xs[4] = {dy->shape[0], dy->shape[1], -1, -1};
   NN_CHECK("dx", dx, NR_DTYPE_ACT, 4, xs, dy);
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "dy", dy));
   NR_ON_CUDA(dy, nr_cuda_global_avgpool_backward(dy, dx));
   const int64_t nc = dy->shape[0] * dy->shape[1], hw = dx->shape[2] * dx->shape[3];
   const float *pdy = dy->data;
   float *pdx = dx->data;
#pragma omp parallel for if (nr_parallel_worth(nc, hw))
   for (int64_t q = 0; q < nc; q++) {
      float v = pdy[q] / (float)hw, *p = pdx + q * hw;
      for (int64_t i = 0; i < hw; i++) p[i] = v;
   }
   return NR_OK;
}

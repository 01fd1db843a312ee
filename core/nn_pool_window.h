/* nn_pool_window.h — the windows of pooling, shared by the CPU kernels (nn_pool.c) and their CUDA
 * twins (cuda/nn_kernels.cu), so both pool over the same elements and divide by the same counts.
 * Windowed pools (MaxPool2d, AvgPool2d): output position o starts at o * stride - padding and
 * spans the kernel, clipped to the input. Adaptive pools (PyTorch's AdaptiveMax/AvgPool2d): o of
 * no outputs covers inputs floor(o * n / no) .. ceil((o + 1) * n / no) - 1, never empty. */
#ifndef NR_NN_POOL_WINDOW_H
#define NR_NN_POOL_WINDOW_H
#include <stdint.h>

#ifdef __CUDACC__
#define NR_POOL_FN __host__ __device__ static inline
#else
#define NR_POOL_FN static inline
#endif

/* One output position's window along one side: its nominal start (padding counted, may be < 0)
 * and the input range [lo, hi) it covers. */
typedef struct {
   int64_t start, lo, hi;
} nr_pool_span;

/* Output o's window along a side of n inputs and no outputs (kernel k, stride s, padding p;
 * unused when adaptive). */
NR_POOL_FN nr_pool_span nr_pool_span_at(int64_t o, int64_t n, int64_t no, int64_t k, int64_t s, int64_t p,
                                        int adaptive)
{
   nr_pool_span r;
   if (adaptive) {
      r.start = r.lo = o * n / no;
      r.hi = ((o + 1) * n + no - 1) / no;
      return r;
   }
   r.start = o * s - p;
   r.lo = r.start < 0 ? 0 : r.start;
   r.hi = r.start + k > n ? n : r.start + k;
   return r;
}

/* Divisor of average pooling's window (r, c) over h x w inputs (kernel kh x kw, padding ph, pw):
 * with include_pad (windowed pools only, PyTorch's count_include_pad) the kernel area clipped to
 * the padded input, else the number of input elements the window covers. */
NR_POOL_FN float nr_pool_avg_divisor(nr_pool_span r, nr_pool_span c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                                     int64_t ph, int64_t pw, int include_pad, int adaptive)
{
   if (include_pad && !adaptive) {
      const int64_t he = r.start + kh < h + ph ? r.start + kh : h + ph;
      const int64_t we = c.start + kw < w + pw ? c.start + kw : w + pw;
      return (float)((he - r.start) * (we - c.start));
   }
   return (float)((r.hi - r.lo) * (c.hi - c.lo));
}

#endif

/* nn_conv.c — 2-d convolution on the CPU: forward, backward w.r.t. data, backward w.r.t. weight
 * and bias (nr_conv2d_* in core/nr.h).
 *
 * How: im2col + sgemm (nr_sgemm: OpenBLAS, single-threaded) per (chunk of samples, group), with
 * OpenMP across the chunks (see conv_make_plan: one sample per chunk
 * except on maps under 64 positions, where several samples share one wider GEMM); a 1x1
 * stride-1 unpadded conv multiplies the input directly (no im2col); a depthwise conv
 * (groups == Cin == Cout) uses the direct kernels of core/nn_depthwise.c; on AVX2 machines 3x3
 * stride-1 layers with >= 128 channels run forward and backward-data by Winograd
 * (core/nn_winograd.c), other dense 3x3 ones through oneDNN (core/perf_dnnl_conv.c) where it is
 * faster (with AVX-512 oneDNN takes all of them and their weight gradients). When only one thread
 * is useful (one chunk, a tiny problem, or one thread configured) the chunk loop runs serially
 * and nr_sgemm splits each product.
 * Invariants: no allocation per call except the grow-only per-thread scratch (nn_internal.h);
 * outputs are written, never allocated; weight gradients use per-thread accumulators reduced in
 * thread order, so results are deterministic for a given thread count.
 * Not here: cuDNN (core/cuda/), oneDNN.
 */
#include "nn_internal.h"
#include "perf.h" /* oneDNN fast paths for dense 3x3 convs (core/perf_dnnl_conv.c) */

#include <limits.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* Validates the geometry and the shapes of x/dx (N, Cin, H, W), y/dy (N, Cout, Ho, Wo) and
 * w/dw (Cout, Cin/groups, KH, KW); fills g. */
static nr_status conv_setup(const char *func, const nr_tensor *x, const char *xname,
                            const nr_tensor *y, const char *yname, const nr_tensor *w,
                            const char *wname, int32_t sh, int32_t sw, int32_t ph, int32_t pw,
                            int32_t dh, int32_t dw, int32_t groups, conv_geom *g)
{
   NR_TRY(nn_check(func, xname, x, NR_DTYPE_ACT, 4, NULL, NULL));
   NR_TRY(nn_check(func, wname, w, NR_F32, 4, NULL, x));
   if (sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 || dw < 1 || groups < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "bad geometry: stride %dx%d (>= 1), padding %dx%d (>= 0), dilation %dx%d (>= 1), groups %d (>= 1)",
                        sh, sw, ph, pw, dh, dw, groups);
   g->n = x->shape[0], g->cin = x->shape[1], g->h = x->shape[2], g->w = x->shape[3];
   g->cout = w->shape[0], g->kh = w->shape[2], g->kw = w->shape[3];
   g->sh = sh, g->sw = sw, g->ph = ph, g->pw = pw, g->dh = dh, g->dw = dw, g->groups = groups;
   if (g->cin % groups || g->cout % groups)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "groups %d must divide in channels %lld and out channels %lld",
                        groups, (long long)g->cin, (long long)g->cout);
   g->cg = g->cin / groups, g->og = g->cout / groups;
   int64_t ws[4] = {g->cout, g->cg, -1, -1};
   NR_TRY(nn_check(func, wname, w, NR_F32, 4, ws, x));
   if (g->kh < 1 || g->kw < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: empty kernel %lldx%lld", wname, (long long)g->kh, (long long)g->kw);
   g->ho = nn_out_size(g->h, g->kh, sh, ph, dh);
   g->wo = nn_out_size(g->w, g->kw, sw, pw, dw);
   if (g->ho < 1 || g->wo < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "input %lldx%lld is too small for kernel %lldx%lld (dilation %dx%d, padding %dx%d)",
                        (long long)g->h, (long long)g->w, (long long)g->kh, (long long)g->kw, dh, dw, ph, pw);
   int64_t ys[4] = {g->n, g->cout, g->ho, g->wo};
   NR_TRY(nn_check(func, yname, y, NR_DTYPE_ACT, 4, ys, x));
   g->k = g->cg * g->kh * g->kw;
   g->p = g->ho * g->wo;
   if (g->k > INT_MAX / 4 || g->p > INT_MAX / 4 || g->og > INT_MAX / 4 || g->h * g->w > INT_MAX / 4)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "sizes too large for BLAS");
   return NR_OK;
}

static inline bool conv_is_1x1(const conv_geom *g)
{
   return g->kh == 1 && g->kw == 1 && g->sh == 1 && g->sw == 1 && g->ph == 0 && g->pw == 0;
}
static inline bool conv_is_depthwise(const conv_geom *g)
{
   return g->groups == g->cin && g->cin == g->cout && g->groups > 1;
}

/* Whether Winograd takes this forward / backward-data pass: its geometry, and only in the auto
 * conv mode (a forced mode tests its own path). */
/* Winograd where it applies: in auto mode only where oneDNN has no AVX-512 kernels (with them
 * its direct 3x3 convolution is faster: bench/README.md), or when forced (mode 4). */
static inline bool conv_winograd(const conv_geom *g)
{
   const int mode = nr_perf_conv_mode();
   return (mode == 4 || (mode == 0 && !nr_perf_dnnl_wide())) && nn_winograd_applies(g);
}

/* Range of output positions o (0 <= o < out) whose input o*s - p + kk lies in [0, in). */
static inline void valid_range(int64_t in, int64_t out, int64_t s, int64_t p, int64_t kk, int64_t *lo, int64_t *hi)
{
   int64_t off = kk - p; /* input = o*s + off */
   int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
   int64_t b = in - off <= 0 ? 0 : (in - off - 1) / s + 1;
   if (b > out) b = out;
   if (a > b) a = b;
   *lo = a, *hi = b;
}

/* cols (C*KH*KW, Ho*Wo) <- patches of x (C, H, W); rows of cols are ld floats apart (ld >= Ho*Wo:
 * several samples side by side). */
static void im2col(const float *x, float *cols, int64_t ld, int64_t c, const conv_geom *g)
{
   const int64_t ho = g->ho, wo = g->wo, h = g->h, w = g->w;
   if (conv_is_1x1(g)) {
      for (int64_t ci = 0; ci < c; ci++) memcpy(cols + ci * ld, x + ci * h * w, sizeof(float) * h * w);
      return;
   }
   for (int64_t ci = 0; ci < c; ci++)
      for (int64_t i = 0; i < g->kh; i++)
         for (int64_t j = 0; j < g->kw; j++) {
            float *row = cols + ((ci * g->kh + i) * g->kw + j) * ld;
            const float *plane = x + ci * h * w;
            int64_t oh0, oh1, ow0, ow1;
            valid_range(h, ho, g->sh, g->ph, i * g->dh, &oh0, &oh1);
            valid_range(w, wo, g->sw, g->pw, j * g->dw, &ow0, &ow1);
            if (oh0 > 0) memset(row, 0, sizeof(float) * oh0 * wo);
            if (oh1 < ho) memset(row + oh1 * wo, 0, sizeof(float) * (ho - oh1) * wo);
            for (int64_t oh = oh0; oh < oh1; oh++) {
               float *r = row + oh * wo;
               const float *src = plane + (oh * g->sh - g->ph + i * g->dh) * w + (j * g->dw - g->pw);
               for (int64_t ow = 0; ow < ow0; ow++) r[ow] = 0;
               if (g->sw == 1) {
                  memcpy(r + ow0, src + ow0, sizeof(float) * (ow1 - ow0));
               } else {
                  for (int64_t ow = ow0; ow < ow1; ow++) r[ow] = src[ow * g->sw];
               }
               for (int64_t ow = ow1; ow < wo; ow++) r[ow] = 0;
            }
         }
}

/* dx (C, H, W) += columns (rows ld apart) scattered back: the adjoint of im2col. */
static void col2im(const float *cols, int64_t ld, float *dx, int64_t c, const conv_geom *g)
{
   const int64_t ho = g->ho, wo = g->wo, h = g->h, w = g->w;
   for (int64_t ci = 0; ci < c; ci++)
      for (int64_t i = 0; i < g->kh; i++)
         for (int64_t j = 0; j < g->kw; j++) {
            const float *row = cols + ((ci * g->kh + i) * g->kw + j) * ld;
            float *plane = dx + ci * h * w;
            int64_t oh0, oh1, ow0, ow1;
            valid_range(h, ho, g->sh, g->ph, i * g->dh, &oh0, &oh1);
            valid_range(w, wo, g->sw, g->pw, j * g->dw, &ow0, &ow1);
            for (int64_t oh = oh0; oh < oh1; oh++) {
               const float *r = row + oh * wo;
               float *dst = plane + (oh * g->sh - g->ph + i * g->dh) * w + (j * g->dw - g->pw);
               if (g->sw == 1) {
                  for (int64_t ow = ow0; ow < ow1; ow++) dst[ow] += r[ow];
               } else {
                  for (int64_t ow = ow0; ow < ow1; ow++) dst[ow * g->sw] += r[ow];
               }
            }
         }
}

/* Work plan: samples are processed in chunks of `batch` consecutive samples, one GEMM per
 * (chunk, group) with batch * Ho*Wo columns. Batching (gathering several samples' columns side
 * by side) pays only for small feature maps, where one sample gives BLAS a thin matrix: measured
 * with single-thread CPU time at batch 64, 512->512 3x3 on 4x4 maps ran forward 119 -> 74 ms
 * (40 -> 66 GFLOP/s), backward-data 170 -> 77 ms, while from 7x7 up one sample per GEMM was as
 * fast or faster (the gather/scatter copies cost more than the wider GEMM gains). So maps with
 * fewer than CONV_BATCH_BELOW positions are batched up to ~CONV_COLS columns, keeping at least as
 * many chunks as threads. Chunks run on OpenMP threads, each product on one; with fewer chunks
 * than threads (batch 1) the chunk loop is serial and nr_sgemm splits each product.
 * Exception: a 1x1 conv's forward and backward-data products on maps of at most
 * NR_SGEMM_NARROW_COLS positions (a multiple of 8) stay one sample each: nr_sgemm's own narrow
 * kernel reads them in place and beats the batched OpenBLAS product (4x4 maps, batch 64:
 * 128->256 0.68 -> 0.52 ms, 256->256 1.21 -> 1.01 ms).
 * NR_CONV_COLS=<n> (environment) batches every map up to n columns (tuning and tests). */
typedef struct {
   int64_t batch, chunks;
   int threads;
} conv_plan;

enum { CONV_BATCH_BELOW = 64, CONV_COLS = 1024, CONV_MIN_PARALLEL = 1 << 20 /* multiply-adds */ };
static int64_t g_conv_cols = 0;               /* NR_CONV_COLS; 0: the default rule above */
static const int64_t CONV_SCRATCH = 1 << 22; /* at most 4 Mi floats of columns per thread */

__attribute__((constructor)) static void conv_read_env(void)
{
   const char *e = getenv("NR_CONV_COLS");
   if (e && atoll(e) > 0) g_conv_cols = atoll(e);
}

/* narrow_ok: the pass's product has the positions as C's columns (forward, backward-data). */
static conv_plan conv_make_plan(const conv_geom *g, bool narrow_ok)
{
   conv_plan p;
   const int t = nr_threads() > 0 ? nr_threads() : 1;
   const bool narrow = narrow_ok && conv_is_1x1(g) && g->p <= NR_SGEMM_NARROW_COLS && g->p % 8 == 0;
   int64_t b = 1;
   if (g_conv_cols > 0)
      b = (g_conv_cols + g->p - 1) / g->p;
   else if (g->p < CONV_BATCH_BELOW && !narrow) {
      b = (CONV_COLS + g->p - 1) / g->p;
      int64_t per_thread = (g->n + t - 1) / t;
      if (b > per_thread) b = per_thread;
   }
   int64_t cap = CONV_SCRATCH / (g->k * g->p > 0 ? g->k * g->p : 1);
   if (b > cap) b = cap;
   if (b > g->n) b = g->n;
   if (b < 1) b = 1;
   p.batch = b;
   p.chunks = (g->n + b - 1) / b;
   p.threads = p.chunks >= t ? t : 1;
   /* tiny problems (gradient checks, toy models): a parallel region costs more than it saves */
   if (g->n * g->cout * g->p * g->k < CONV_MIN_PARALLEL) p.threads = 1;
   return p;
}

/* tmp (Og, L) <- dy of samples n0..n0+nb-1, group gi, side by side (the GEMM layout). */
static void gather_dy(const float *dy, float *tmp, int64_t L, int64_t n0, int64_t nb, int64_t gi, const conv_geom *g)
{
   for (int64_t b = 0; b < nb; b++)
      for (int64_t o = 0; o < g->og; o++)
         memcpy(tmp + o * L + b * g->p, dy + ((n0 + b) * g->cout + gi * g->og + o) * g->p, sizeof(float) * g->p);
}

/* This thread's buffers for one chunk of pl->batch samples: im2col columns (NULL when not needed:
 * a 1x1 conv on single samples reads x / writes dx directly) and the gather buffer of a
 * multi-sample chunk (NULL for single samples). False when an allocation failed. */
static bool chunk_buffers(const conv_geom *g, const conv_plan *pl, bool direct, float **cols, float **tmp)
{
   const int64_t L = pl->batch * g->p;
   const bool want_cols = !(direct && pl->batch == 1), want_tmp = pl->batch > 1;
   *cols = want_cols ? nn_scratch(0, (size_t)(g->k * L)) : NULL;
   *tmp = want_tmp ? nn_scratch(1, (size_t)(g->og * L)) : NULL;
   return (!want_cols || *cols) && (!want_tmp || *tmp);
}

/* ---------------------------------------------------------------- public entry points */

/* The CPU forward; epi (NULL: none) is applied to each output plane once it is final. */
static nr_status conv_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                              const conv_geom *gp, const nn_epilogue *epi)
{
   const conv_geom g = *gp;
   if (g.n == 0) return NR_OK;
   if (conv_winograd(&g))
      return nn_winograd_forward(x->data, y->data, w->data, b ? b->data : NULL, &g, epi);
   {
      nr_status ps = nr_perf_conv2d_forward(x, y, w, b, (int32_t)g.sh, (int32_t)g.sw, (int32_t)g.ph, (int32_t)g.pw,
                                            (int32_t)g.dh, (int32_t)g.dw, (int32_t)g.groups);
      if (ps != NR_PERF_UNHANDLED) {
         if (ps == NR_OK && epi) nn_epilogue_all(epi, y->data, g.n * g.cout, g.cout, g.p);
         return ps;
      }
   }
   const float *px = x->data, *pw = w->data, *pb = b ? b->data : NULL;
   float *py = y->data;
   if (conv_is_depthwise(&g)) {
      return nn_dw_forward(px, py, pw, pb, &g, epi);
   }
   const bool direct = conv_is_1x1(&g);
   const conv_plan pl = conv_make_plan(&g, true);
   const int64_t L = pl.batch * g.p; /* GEMM width */
   bool oom = false;
#pragma omp parallel num_threads(pl.threads) if (pl.threads > 1)
   {
      /* one sample per chunk: the GEMM reads x itself (1x1) or its columns, and writes y */
      float *cols, *tmp;
      const bool ok = chunk_buffers(&g, &pl, direct, &cols, &tmp);
      if (!ok) {
#pragma omp atomic write
         oom = true;
      }
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < pl.chunks; ch++) {
         if (!ok) continue;
         const int64_t n0 = ch * pl.batch, nb = n0 + pl.batch > g.n ? g.n - n0 : pl.batch, wd = nb * g.p;
         for (int64_t gi = 0; gi < g.groups; gi++) {
            const float *src = px + (n0 * g.cin + gi * g.cg) * g.h * g.w;
            int64_t ldb = g.p;
            if (cols) {
               for (int64_t s = 0; s < nb; s++)
                  im2col(px + ((n0 + s) * g.cin + gi * g.cg) * g.h * g.w, cols + s * g.p, L, g.cg, &g);
               src = cols, ldb = L;
            }
            float *dst = tmp ? tmp : py + (n0 * g.cout + gi * g.og) * g.p;
            nr_sgemm(false, false, g.og, wd, g.k, 1.0f, pw + gi * g.og * g.k, g.k, src, ldb, 0.0f, dst, tmp ? L : g.p);
            if (tmp)
               for (int64_t s = 0; s < nb; s++)
                  for (int64_t o = 0; o < g.og; o++)
                     memcpy(py + ((n0 + s) * g.cout + gi * g.og + o) * g.p, tmp + o * L + s * g.p, sizeof(float) * g.p);
         }
         if (pb)
            for (int64_t n = n0; n < n0 + nb; n++)
               for (int64_t c = 0; c < g.cout; c++) {
                  float *yc = py + (n * g.cout + c) * g.p, v = pb[c];
                  for (int64_t i = 0; i < g.p; i++) yc[i] += v;
               }
         if (epi)
            for (int64_t n = n0; n < n0 + nb; n++)
               for (int64_t c = 0; c < g.cout; c++) nn_epilogue_plane(epi, c, py + (n * g.cout + c) * g.p, g.p);
      }
   }
   if (oom) return NR_FAIL(NR_E_OOM, "no memory for the im2col buffers (%lld floats)", (long long)((g.k + g.og) * L));
   return NR_OK;
}

/* The argument checks both forward entry points make (func: the caller's name for messages). */
static nr_status forward_setup(const char *func, const nr_tensor *x, const nr_tensor *y, const nr_tensor *w,
                               const nr_tensor *b, int32_t sh, int32_t sw, int32_t ph, int32_t pw, int32_t dh,
                               int32_t dw, int32_t groups, conv_geom *g)
{
   NR_TRY(nr_check_tensor(func, "x", x, NR_DTYPE_ACT, -1, 4, NULL));
   NR_TRY(nr_check_tensor(func, "y", y, NR_DTYPE_ACT, -1, 4, NULL));
   NR_TRY(nr_check_tensor(func, "w", w, NR_F32, -1, 4, NULL));
   NR_TRY(conv_setup(func, x, "x", y, "y", w, "w", sh, sw, ph, pw, dh, dw, groups, g));
   int64_t bs[1] = {g->cout};
   if (b) NR_TRY(nn_check(func, "b", b, NR_F32, 1, bs, x));
   /* y is written while x, w and b are still read (a module applied to its own output) */
   NR_TRY(nr_check_no_overlap(func, "y", y, "x", x));
   NR_TRY(nr_check_no_overlap(func, "y", y, "w", w));
   return nr_check_no_overlap(func, "y", y, "b", b);
}

nr_status nr_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                            int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                            int32_t dil_h, int32_t dil_w, int32_t groups)
{
   conv_geom g;
   NR_TRY(forward_setup(__func__, x, y, w, b, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, &g));
   NR_ON_CUDA(x, nr_cuda_conv2d_forward(x, y, w, b, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups));
   return conv_forward(x, y, w, b, &g, NULL);
}

#ifdef NR_WITH_CUDA
/* CUDA: the folded BN (and ReLU) as one kernel on the conv output. */
static nr_status cuda_conv_bn(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b, int32_t sh,
                              int32_t sw, int32_t ph, int32_t pw, int32_t dh, int32_t dw, int32_t groups,
                              const nr_tensor *gamma, const nr_tensor *beta, const nr_tensor *rm, const nr_tensor *rv,
                              float eps, int32_t relu)
{
   NR_TRY(nr_cuda_conv2d_forward(x, y, w, b, sh, sw, ph, pw, dh, dw, groups));
   return nr_cuda_bn2d_forward_eval(y, y, gamma, beta, rm, rv, eps, relu);
}
#endif

nr_status nr_conv2d_forward_bn(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                               int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h,
                               int32_t dil_w, int32_t groups, const nr_tensor *gamma, const nr_tensor *beta,
                               const nr_tensor *running_mean, const nr_tensor *running_var, float eps, int32_t relu)
{
   conv_geom g;
   NR_TRY(forward_setup(__func__, x, y, w, b, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, &g));
   int64_t cs[1] = {g.cout};
   if (!gamma != !beta) return NR_FAIL(NR_E_ARG, "gamma and beta: give both or neither");
   if (gamma) NN_CHECK("gamma", gamma, NR_F32, 1, cs, x);
   if (beta) NN_CHECK("beta", beta, NR_F32, 1, cs, x);
   NN_CHECK("running_mean", running_mean, NR_F32, 1, cs, x);
   NN_CHECK("running_var", running_var, NR_F32, 1, cs, x);
   if (!(eps > 0)) return NR_FAIL(NR_E_ARG, "eps must be > 0, got %g", eps);
   NR_ON_CUDA(x, cuda_conv_bn(x, y, w, b, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, gamma, beta,
                              running_mean, running_var, eps, relu));
   const nn_epilogue epi = {gamma ? gamma->data : NULL, beta ? beta->data : NULL, running_mean->data,
                            running_var->data, eps, relu != 0};
   return conv_forward(x, y, w, b, &g, &epi);
}

nr_status nr_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w, int32_t stride_h,
                                  int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h, int32_t dil_w,
                                  int32_t groups)
{
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dx", dx, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("w", w, NR_F32, -1, 4, NULL);
   conv_geom g;
   NR_TRY(conv_setup(__func__, dx, "dx", dy, "dy", w, "w", stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, &g));
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "dy", dy));
   NR_TRY(nr_check_no_overlap(__func__, "dx", dx, "w", w));
   NR_ON_CUDA(dy, nr_cuda_conv2d_backward_data(dy, dx, w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups));
   if (g.n == 0) return NR_OK;
   if (conv_winograd(&g)) return nn_winograd_backward_data(dy->data, dx->data, w->data, &g);
   {
      nr_status ps = nr_perf_conv2d_backward_data(dy, dx, w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups);
      if (ps != NR_PERF_UNHANDLED) return ps;
   }
   const float *pdy = dy->data, *pw = w->data;
   float *pdx = dx->data;
   if (conv_is_depthwise(&g)) {
      return nn_dw_backward_data(pdy, pdx, pw, &g);
   }
   const bool direct = conv_is_1x1(&g);
   const conv_plan pl = conv_make_plan(&g, true);
   const int64_t L = pl.batch * g.p;
   bool oom = false;
#pragma omp parallel num_threads(pl.threads) if (pl.threads > 1)
   {
      float *cols, *tmp;
      const bool ok = chunk_buffers(&g, &pl, direct, &cols, &tmp);
      if (!ok) {
#pragma omp atomic write
         oom = true;
      }
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < pl.chunks; ch++) {
         if (!ok) continue;
         const int64_t n0 = ch * pl.batch, nb = n0 + pl.batch > g.n ? g.n - n0 : pl.batch, wd = nb * g.p;
         if (!direct) memset(pdx + n0 * g.cin * g.h * g.w, 0, sizeof(float) * nb * g.cin * g.h * g.w);
         for (int64_t gi = 0; gi < g.groups; gi++) {
            const float *dyg = pdy + (n0 * g.cout + gi * g.og) * g.p;
            int64_t lda = g.p;
            if (tmp) {
               gather_dy(pdy, tmp, L, n0, nb, gi, &g);
               dyg = tmp, lda = L;
            }
            /* columns (K, wd) = w_g^T (K, Og) @ dy_g (Og, wd) */
            float *dst = cols ? cols : pdx + (n0 * g.cin + gi * g.cg) * g.h * g.w;
            nr_sgemm(true, false, g.k, wd, g.og, 1.0f, pw + gi * g.og * g.k, g.k, dyg, lda, 0.0f, dst, cols ? L : g.p);
            if (!cols) continue;
            for (int64_t s = 0; s < nb; s++) {
               float *dxg = pdx + ((n0 + s) * g.cin + gi * g.cg) * g.h * g.w;
               if (direct) {
                  for (int64_t c = 0; c < g.cg; c++) memcpy(dxg + c * g.p, cols + c * L + s * g.p, sizeof(float) * g.p);
               } else {
                  col2im(cols + s * g.p, L, dxg, g.cg, &g);
               }
            }
         }
      }
   }
   if (oom) return NR_FAIL(NR_E_OOM, "no memory for the im2col buffers (%lld floats)", (long long)((g.k + g.og) * L));
   return NR_OK;
}

nr_status nr_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw, nr_tensor *db,
                                    int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                    int32_t dil_h, int32_t dil_w, int32_t groups, float scale, float acc)
{
   NR_CHECK_T("x", x, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dy", dy, NR_DTYPE_ACT, -1, 4, NULL);
   NR_CHECK_T("dw", dw, NR_F32, -1, 4, NULL);
   conv_geom g;
   NR_TRY(conv_setup(__func__, x, "x", dy, "dy", dw, "dw", stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, &g));
   NR_TRY(nr_check_no_overlap(__func__, "dw", dw, "x", x));
   NR_TRY(nr_check_no_overlap(__func__, "dw", dw, "dy", dy));
   if (db) {
      int64_t bs[1] = {g.cout};
      NN_CHECK("db", db, NR_F32, 1, bs, x);
   }
   NR_ON_CUDA(x, nr_cuda_conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                                groups, scale, acc));
   {
      nr_status ps = nr_perf_conv2d_backward_weight(x, dy, dw, db, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                                    groups, scale, acc);
      if (ps != NR_PERF_UNHANDLED) return ps;
   }
   const float *px = x->data, *pdy = dy->data;
   float *pdw = dw->data;
   const int64_t wn = g.cout * g.k;
   if (db) nn_bias_grad(pdy, db->data, g.n, g.cout, g.p, scale, acc);
   if (g.n == 0) {
      for (int64_t i = 0; i < wn; i++) pdw[i] = acc == 0 ? 0.0f : acc * pdw[i];
      return NR_OK;
   }
   if (conv_is_depthwise(&g)) {
      return nn_dw_backward_weight(px, pdy, pdw, &g, scale, acc);
   }
   const bool direct = conv_is_1x1(&g);
   const conv_plan pl = conv_make_plan(&g, false);
   const int64_t L = pl.batch * g.p;
   enum { MAXT = 256 };
   float *parts[MAXT];
   const int used = pl.threads > MAXT ? MAXT : pl.threads;
   bool oom = false;
#pragma omp parallel num_threads(used) if (used > 1)
   {
      const int t = omp_get_thread_num();
      float *cols, *tmp;
      const bool bufs = chunk_buffers(&g, &pl, direct, &cols, &tmp);
      /* per-thread partial sums; dw's old contents are applied once, with acc, in the reduction */
      float *part = nn_scratch(2, (size_t)wn);
      parts[t] = part;
      const bool ok = bufs && part;
      if (!ok) {
#pragma omp atomic write
         oom = true;
      } else {
         memset(part, 0, sizeof(float) * wn);
      }
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < pl.chunks; ch++) {
         if (!ok) continue;
         const int64_t n0 = ch * pl.batch, nb = n0 + pl.batch > g.n ? g.n - n0 : pl.batch, wd = nb * g.p;
         for (int64_t gi = 0; gi < g.groups; gi++) {
            const float *src = px + (n0 * g.cin + gi * g.cg) * g.h * g.w;
            int64_t ldb = g.p;
            if (cols) {
               for (int64_t s = 0; s < nb; s++)
                  im2col(px + ((n0 + s) * g.cin + gi * g.cg) * g.h * g.w, cols + s * g.p, L, g.cg, &g);
               src = cols, ldb = L;
            }
            const float *dyg = pdy + (n0 * g.cout + gi * g.og) * g.p;
            int64_t lda = g.p;
            if (tmp) {
               gather_dy(pdy, tmp, L, n0, nb, gi, &g);
               dyg = tmp, lda = L;
            }
            /* part_g (Og, K) += dy_g (Og, wd) @ columns^T (wd, K) */
            nr_sgemm(false, true, g.og, g.k, wd, 1.0f, dyg, lda, src, ldb, 1.0f, part + gi * g.og * g.k, g.k);
         }
      }
      /* the implicit barrier above: every partial sum is complete and oom is final */
      if (!oom) {
#pragma omp for schedule(static)
         for (int64_t i = 0; i < wn; i++) {
            float s = 0;
            for (int q = 0; q < used; q++) s += parts[q][i];
            pdw[i] = (acc == 0 ? 0.0f : acc * pdw[i]) + scale * s;
         }
      }
   }
   if (oom)
      return NR_FAIL(NR_E_OOM, "no memory for the weight-gradient buffers (%lld floats)", (long long)((g.k + g.og) * L + wn));
   return NR_OK;
}

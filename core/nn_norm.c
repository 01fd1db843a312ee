/* nn_norm.c — batch normalisation on the CPU (nr_bn2d_* in core/nr.h; (N, C, H, W) for
 * BatchNorm2d, (N, C) and (N, C, L) for BatchNorm1d): training forward (batch statistics,
 * running-statistic update, saved mean/invstd), evaluation forward, and the backward passes of
 * both.
 * Each takes an optional fused ReLU (forward: relu flag; backward: relu_y, the fused output,
 * masking dy on the fly), so a BatchNorm2d followed by an in-place ReLU costs one pass over the
 * data each way instead of two (forward bit-identical to running them one after the other; the
 * backward's per-channel sums may round differently, ~1e-7 relative).
 * Invariants: per-channel sums accumulate in double (per-plane partial sums in float over blocks
 * of BN_BLOCK elements), each channel is handled by one thread, so results do not depend on the
 * thread count; y may alias x and dx may alias dy (every element is read before it is written).
 */
#include "nn_internal.h"

#include <math.h>

/* x as (N, C, hw): hw the product of the dimensions after C (1 for (N, C)). */
typedef struct {
   int64_t n, c, hw;
} bn_geom;

/* x (N, C), (N, C, L) or (N, C, H, W); name is x's or dy's. */
static nr_status bn_input_check(const char *func, const char *name, const nr_tensor *x)
{
   NR_TRY(nr_check_tensor(func, name, x, NR_DTYPE_ACT, -1, -1, NULL));
   if (x->ndim < 2 || x->ndim > 4) {
      char got[256];
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: expected (N, C), (N, C, L) or (N, C, H, W), got %s",
                        name, nr_tensor_describe(x, got, sizeof got));
   }
   return NR_OK;
}

/* x/dy and the (C) vectors; gamma and beta may be NULL (both, or neither). */
static nr_status bn_setup(const char *func, const nr_tensor *x, const nr_tensor *y, const char *yname,
                          const nr_tensor *gamma, const nr_tensor *beta, const char *gname, const char *bname,
                          bn_geom *g)
{
   NR_TRY(nn_check(func, "x", x, NR_DTYPE_ACT, x->ndim, NULL, NULL));
   g->n = x->shape[0], g->c = x->shape[1], g->hw = 1;
   for (int d = 2; d < x->ndim; d++) g->hw *= x->shape[d];
   if (y) NR_TRY(nn_check(func, yname, y, NR_DTYPE_ACT, x->ndim, x->shape, x));
   int64_t cs[1] = {g->c};
   if (gamma) NR_TRY(nn_check(func, gname, gamma, NR_F32, 1, cs, x));
   if (beta) NR_TRY(nn_check(func, bname, beta, NR_F32, 1, cs, x));
   return NR_OK;
}

static nr_status vec_check(const char *func, const char *name, const nr_tensor *v, const nr_tensor *x)
{
   int64_t cs[1] = {x->shape[1]};
   return nn_check(func, name, v, NR_F32, 1, cs, x);
}

/* Elements per float partial sum of a plane: the partial sums are added in double, so a large
 * plane's sums do not lose ~sqrt(hw) ulps to one float running sum (more without vectorised
 * lanes, as in a -O2 build), at no cost the loops notice. */
enum { BN_BLOCK = 256 };

/* sum of p[i] - k (square: of (p[i] - k)^2) over n elements: float partial sums of BN_BLOCK
 * elements added in double (square is a constant at each call, so the loop has no branch). */
static inline double blocked_sum(const float *p, int64_t n, float k, int square)
{
   double s = 0;
   for (int64_t b0 = 0; b0 < n; b0 += BN_BLOCK, p += BN_BLOCK) {
      const int64_t len = n - b0 < BN_BLOCK ? n - b0 : BN_BLOCK;
      float sb = 0;
#pragma omp simd reduction(+ : sb)
      for (int64_t i = 0; i < len; i++) {
         const float d = p[i] - k;
         sb += square ? d * d : d;
      }
      s += sb;
   }
   return s;
}

/* Per-plane sums of dy' and dy' * (x - mean), dy' = dy masked by r > 0 when r is given. */
static inline void plane_sums(const float *p, const float *d, const float *r, int64_t hw, float mean, double *sa,
                              double *sb)
{
   double sa_ = 0, sb_ = 0;
   for (int64_t b0 = 0; b0 < hw; b0 += BN_BLOCK) {
      const int64_t b1 = b0 + BN_BLOCK < hw ? b0 + BN_BLOCK : hw;
      float a = 0, b = 0;
      if (r) {
#pragma omp simd reduction(+ : a, b)
         for (int64_t i = b0; i < b1; i++) {
            const float dd = d[i]; /* loaded unconditionally: the select becomes a blend, not a branch */
            const float dv = r[i] > 0.0f ? dd : 0.0f;
            a += dv;
            b += dv * (p[i] - mean);
         }
      } else {
#pragma omp simd reduction(+ : a, b)
         for (int64_t i = b0; i < b1; i++) {
            a += d[i];
            b += d[i] * (p[i] - mean);
         }
      }
      sa_ += a, sb_ += b;
   }
   *sa = sa_, *sb = sb_;
}

/* Sums of dy' and dy' * (x - mean) over channel c of every sample, in double. */
static void channel_sums(const float *px, const float *pdy, const float *pr, const bn_geom *g, int64_t c, float mean,
                         double *sdy, double *sdyx)
{
   double s1 = 0, s2 = 0;
   for (int64_t n = 0; n < g->n; n++) {
      const int64_t off = (n * g->c + c) * g->hw;
      double a, b;
      plane_sums(px + off, pdy + off, pr ? pr + off : NULL, g->hw, mean, &a, &b);
      s1 += a;
      s2 += b;
   }
   *sdy = s1, *sdyx = s2;
}

/* A channel's statistics from its sums about K over n planes of hw values (s1: the plane means'
 * offsets from K, s2 their squares, devs the deviations inside the planes; total: the plain sum
 * where those are not finite, else 0): sm[c] <- the mean, si[c] <- 1 / sqrt(biased var + eps),
 * and the running statistics' update (PyTorch's, with the unbiased variance). */
static inline void channel_stats(double K, double s1, double s2, double devs, double total, int64_t n, int64_t hw,
                                 float eps, float momentum, int64_t c, float *sm, float *si, float *rm, float *rv)
{
   const int64_t m = n * hw;
   double mean = K + s1 / (double)n;
   const double m2 = devs + (double)hw * (s2 - s1 * s1 / (double)n);
   /* an inf makes the shifted sums inf - inf: the mean is then the plain sum's (inf, as PyTorch
    * and the GPU give), whichever sample held it */
   if (!isfinite(mean) && !isnan(total)) mean = total / (double)m;
   const float meanf = (float)mean;
   const double var = m2 / (double)m;
   const float invstd = (float)(1.0 / sqrt(var + (double)eps));
   sm[c] = meanf;
   si[c] = invstd;
   rm[c] = (1.0f - momentum) * rm[c] + momentum * meanf;
   rv[c] = (1.0f - momentum) * rv[c] + momentum * (float)(var * (double)m / (double)(m - 1));
}

/* A channel whose shifted sums overflowed although its values are finite (values near FLT_MAX
 * apart: x - k overflows float) is summed again in double, two passes: K <- the mean, *devs <- the
 * squared deviations about it, for channel_stats with s1 = s2 = 0. Its n planes of hw values
 * start stride floats apart from p; total is their plain sum. */
static void channel_moments_double(const float *p, int64_t n, int64_t stride, int64_t hw, double total, double *K,
                                   double *devs)
{
   const double mean = total / (double)(n * hw);
   double m2 = 0;
   for (int64_t j = 0; j < n; j++)
      for (int64_t i = 0; i < hw; i++) {
         const double d = (double)p[j * stride + i] - mean;
         m2 += d * d;
      }
   *K = mean;
   *devs = m2;
}

/* ---- one value per plane (hw = 1: BatchNorm1d on (N, C) or (N, C, 1), BatchNorm2d on 1x1
 * maps): the per-channel loops below would stride through memory a float at a time. These run
 * the same arithmetic on blocks of ROW_CB channels, row by row (contiguous, vectorised across the
 * channels), with the same per-channel order of additions, so the results equal the plane
 * loops' bit for bit (checked on 256 tensors of a training and evaluation sweep when written).
 * A block's sums live on the stack; blocks run in parallel, each on its own channels. */
enum { ROW_CB = 64 };

/* The AVX2 clones below would fuse multiplies and adds (FMA) where the plane loops round twice:
 * the plane loops sit in OpenMP regions, which are not cloned, and the library builds for
 * x86-64-v2 (no FMA; CMakeLists.txt), so contraction off here keeps the two paths' bits equal
 * (a build for a target with FMA would contract the plane loops too, and they would differ in
 * the last bits). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* nn_affine_planes' two forms as one, (x - mc) * a + bc: centred (mc = m, bc = b) by its rule,
 * else mc = 0, bc = b - m * a (x - 0 is x, so both are its expressions exactly). */
static inline void affine_coefs(float m, float a, float b, float *mc, float *ac, float *bc)
{
   const int centred = nn_affine_centred(m, a);
   *mc = centred ? m : 0.0f;
   *ac = a;
   *bc = centred ? b : b - m * a;
}

/* y = (x - mc) * a + bc per channel over a block's rows, then nn_relu when relu. */
NR_SIMD_CLONES
static void rows_affine(const bn_geom *g, int64_t c0, int64_t nb, const float *px, float *py, const float *mc,
                        const float *a, const float *bc, int relu)
{
   const int64_t C = g->c;
   for (int64_t n = 0; n < g->n; n++) {
      const float *x = px + n * C + c0;
      float *y = py + n * C + c0;
      if (relu) {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) y[j] = nn_relu((x[j] - mc[j]) * a[j] + bc[j]);
      } else {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) y[j] = (x[j] - mc[j]) * a[j] + bc[j];
      }
   }
}

/* One row's terms of a channel's statistics (the plane loop's at hw = 1): its plane mean pm
 * about k, q = pm - K and the deviation about the float-rounded mean less that rounding's share. */
static inline void row_terms(float x, float k, double K, double *q, double *e)
{
   const double pm = (double)k + (double)(x - k);
   const float pf = (float)pm;
   const float d = x - pf;
   const double off = pm - (double)pf;
   *q = pm - K;
   *e = (double)(d * d) - off * off;
}

/* Training forward of channels c0 .. c0 + nb - 1 (the plane loop's statistics at hw = 1: each
 * plane mean is the value, k the first row's, its deviations about the float-rounded mean). */
NR_SIMD_CLONES
static void rows_forward_train(const bn_geom *g, int64_t c0, int64_t nb, const float *px, float *py, float *sm,
                               float *si, const float *pg, const float *pb, float *rm, float *rv, float momentum,
                               float eps, int relu)
{
   const int64_t C = g->c, N = g->n;
   float k[ROW_CB], mc[ROW_CB], aa[ROW_CB], bc[ROW_CB];
   double K[ROW_CB], s1[ROW_CB], s2[ROW_CB], devs[ROW_CB];
   for (int64_t j = 0; j < nb; j++) {
      const float k0 = px[c0 + j];
      k[j] = isfinite(k0) ? k0 : 0.0f;
      s1[j] = s2[j] = devs[j] = 0;
      K[j] = (double)k[j] + (double)(px[c0 + j] - k[j]);
   }
   /* two rows per pass: each sum still takes row n's term before row n + 1's (the same bits),
    * with half the loads and stores of the sums */
   int64_t n = 0;
   for (; n + 1 < N; n += 2) {
      const float *x0 = px + n * C + c0, *x1 = x0 + C;
#pragma omp simd
      for (int64_t j = 0; j < nb; j++) {
         double q0, e0, q1, e1;
         row_terms(x0[j], k[j], K[j], &q0, &e0);
         row_terms(x1[j], k[j], K[j], &q1, &e1);
         s1[j] = s1[j] + q0 + q1;
         s2[j] = s2[j] + q0 * q0 + q1 * q1;
         devs[j] = devs[j] + e0 + e1;
      }
   }
   for (; n < N; n++) {
      const float *x = px + n * C + c0;
#pragma omp simd
      for (int64_t j = 0; j < nb; j++) {
         double q, e;
         row_terms(x[j], k[j], K[j], &q, &e);
         s1[j] += q;
         s2[j] += q * q;
         devs[j] += e;
      }
   }
   for (int64_t j = 0; j < nb; j++) {
      const int64_t c = c0 + j;
      double total = 0; /* the plain sum when the shifted sums were not finite (inputs holding inf) */
      if (!isfinite(s1[j]) || !isfinite(devs[j])) {
         for (int64_t n = 0; n < N; n++) total += (double)px[n * C + c];
         if (isfinite(total)) {
            channel_moments_double(px + c, N, C, 1, total, &K[j], &devs[j]);
            s1[j] = s2[j] = 0;
         }
      }
      channel_stats(K[j], s1[j], s2[j], devs[j], total, N, 1, eps, momentum, c, sm, si, rm, rv);
      affine_coefs(sm[c], si[c] * (pg ? pg[c] : 1.0f), pb ? pb[c] : 0.0f, &mc[j], &aa[j], &bc[j]);
   }
   rows_affine(g, c0, nb, px, py, mc, aa, bc, relu);
}

/* Evaluation forward of a block: y = (x - mean) * invstd * gamma + beta, as nn_affine_planes. */
static void rows_forward_eval(const bn_geom *g, int64_t c0, int64_t nb, const float *px, float *py, const float *pg,
                              const float *pb, const float *rm, const float *rv, float eps, int relu)
{
   float mc[ROW_CB], aa[ROW_CB], bc[ROW_CB];
   for (int64_t j = 0; j < nb; j++) {
      float m, a, b;
      nn_bn_eval_ab(pg, pb, rm, rv, eps, c0 + j, &m, &a, &b);
      affine_coefs(m, a, b, &mc[j], &aa[j], &bc[j]);
   }
   rows_affine(g, c0, nb, px, py, mc, aa, bc, relu);
}

/* Sums of dy' and dy' * (x - mean) of a block (channel_sums at hw = 1), dy' masked by r > 0. */
NR_SIMD_CLONES
static void rows_sums(const bn_geom *g, int64_t c0, int64_t nb, const float *px, const float *pdy, const float *pr,
                      const float *mean, double *sdy, double *sdyx)
{
   const int64_t C = g->c, N = g->n;
   for (int64_t j = 0; j < nb; j++) sdy[j] = sdyx[j] = 0;
   /* two rows per pass, row n's terms added before row n + 1's (as rows_forward_train); the mask
    * r > 0 (dy loaded unconditionally: the select becomes a blend) or none */
   int64_t n = 0;
   for (; n + 1 < N; n += 2) {
      const float *x0 = px + n * C + c0, *d0 = pdy + n * C + c0, *x1 = x0 + C, *d1 = d0 + C;
      if (pr) {
         const float *r0 = pr + n * C + c0, *r1 = r0 + C;
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) {
            const float e0 = d0[j], e1 = d1[j];
            const float v0 = r0[j] > 0.0f ? e0 : 0.0f, v1 = r1[j] > 0.0f ? e1 : 0.0f;
            sdy[j] = sdy[j] + (double)v0 + (double)v1;
            sdyx[j] = sdyx[j] + (double)(v0 * (x0[j] - mean[j])) + (double)(v1 * (x1[j] - mean[j]));
         }
      } else {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) {
            sdy[j] = sdy[j] + (double)d0[j] + (double)d1[j];
            sdyx[j] = sdyx[j] + (double)(d0[j] * (x0[j] - mean[j])) + (double)(d1[j] * (x1[j] - mean[j]));
         }
      }
   }
   for (; n < N; n++) {
      const float *x = px + n * C + c0, *d = pdy + n * C + c0;
      if (pr) {
         const float *r = pr + n * C + c0;
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) {
            const float dd = d[j];
            const float dv = r[j] > 0.0f ? dd : 0.0f;
            sdy[j] += (double)dv;
            sdyx[j] += (double)(dv * (x[j] - mean[j]));
         }
      } else {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) {
            sdy[j] += (double)d[j];
            sdyx[j] += (double)(d[j] * (x[j] - mean[j]));
         }
      }
   }
}

/* dx of a block: k * (dy' - mdy - (x - mean) * mdyx) (train), or k * dy' (eval: mdy, mdyx NULL). */
NR_SIMD_CLONES
static void rows_dx(const bn_geom *g, int64_t c0, int64_t nb, const float *px, const float *pdy, const float *pr,
                    float *pdx, const float *mean, const float *k, const float *mdy, const float *mdyx)
{
   const int64_t C = g->c;
   for (int64_t n = 0; n < g->n; n++) {
      const float *x = px + n * C + c0, *d = pdy + n * C + c0, *r = pr ? pr + n * C + c0 : NULL;
      float *o = pdx + n * C + c0;
      if (mdy && r) {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) {
            const float dd = d[j];
            const float dv = r[j] > 0.0f ? dd : 0.0f;
            o[j] = k[j] * (dv - mdy[j] - (x[j] - mean[j]) * mdyx[j]);
         }
      } else if (mdy) {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) o[j] = k[j] * (d[j] - mdy[j] - (x[j] - mean[j]) * mdyx[j]);
      } else if (r) {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) {
            const float dd = d[j];
            o[j] = k[j] * (r[j] > 0.0f ? dd : 0.0f);
         }
      } else {
#pragma omp simd
         for (int64_t j = 0; j < nb; j++) o[j] = k[j] * d[j];
      }
   }
}

/* Both backward passes of a block: parameter gradients (acc rule) and dx; running statistics
 * (rm, rv, eps) for evaluation, else the saved batch mean / invstd (sm, si). */
static void rows_backward(const bn_geom *g, int64_t c0, int64_t nb, const float *px, const float *pdy,
                          const float *pr, float *pdx, float *dg, float *dbt, const float *pg, const float *sm,
                          const float *si, const float *rm, const float *rv, float eps, float scale, float acc)
{
   float mean[ROW_CB] = {0}, k[ROW_CB], mdy[ROW_CB], mdyx[ROW_CB];
   double sdy[ROW_CB] = {0}, sdyx[ROW_CB] = {0}; /* (zero when only dx is asked in evaluation) */
   const int eval = rm != NULL;
   const double m = (double)g->n;
   for (int64_t j = 0; j < nb; j++) mean[j] = eval ? rm[c0 + j] : sm[c0 + j];
   if (dg || dbt || !eval) rows_sums(g, c0, nb, px, pdy, pr, mean, sdy, sdyx);
   for (int64_t j = 0; j < nb; j++) {
      const int64_t c = c0 + j;
      const float invstd = eval ? (float)(1.0 / sqrt((double)rv[c] + (double)eps)) : si[c];
      const double sdyxhat = sdyx[j] * invstd;
      /* (each pass's own order of the products, as the plane loops) */
      if (dg) dg[c] = (acc == 0 ? 0.0f : acc * dg[c]) + (float)(eval ? scale * sdyx[j] * invstd : scale * sdyxhat);
      if (dbt) dbt[c] = (acc == 0 ? 0.0f : acc * dbt[c]) + (float)(scale * sdy[j]);
      k[j] = (pg ? pg[c] : 1.0f) * invstd;
      if (!eval) {
         mdy[j] = (float)(sdy[j] / m);
         mdyx[j] = (float)(sdyxhat / m) * invstd;
      }
   }
   if (pdx) rows_dx(g, c0, nb, px, pdy, pr, pdx, mean, k, eval ? NULL : mdy, eval ? NULL : mdyx);
}

#pragma GCC pop_options

/* Runs call on every block of ROW_CB channels of g (c0, nb: the block's first channel and size,
 * in scope for call), in parallel when work per channel makes it worth it; then returns NR_OK. */
#define ROWS_RUN(g, work, call)                                                                    \
   do {                                                                                            \
      const int64_t nblk_ = ((g).c + ROW_CB - 1) / ROW_CB, work_ = (work) * ROW_CB;               \
      _Pragma("omp parallel for if (nr_parallel_worth(nblk_, work_))")                             \
      for (int64_t b_ = 0; b_ < nblk_; b_++) {                                                     \
         const int64_t c0 = b_ * ROW_CB, nb = (g).c - c0 < ROW_CB ? (g).c - c0 : ROW_CB;           \
         call;                                                                                     \
      }                                                                                            \
      return NR_OK;                                                                                \
   } while (0)

static nr_status relu_y_check(const char *func, const nr_tensor *relu_y, const nr_tensor *x)
{
   return relu_y ? nn_check(func, "relu_y", relu_y, NR_DTYPE_ACT, x->ndim, x->shape, x) : NR_OK;
}

nr_status nr_bn2d_forward_train(const nr_tensor *x, nr_tensor *y, nr_tensor *save_mean, nr_tensor *save_invstd,
                                const nr_tensor *gamma, const nr_tensor *beta, nr_tensor *running_mean,
                                nr_tensor *running_var, float momentum, float eps, int32_t relu)
{
   NR_TRY(bn_input_check(__func__, "x", x));
   bn_geom g;
   NR_TRY(bn_setup(__func__, x, y, "y", gamma, beta, "gamma", "beta", &g));
   NR_TRY(vec_check(__func__, "save_mean", save_mean, x));
   NR_TRY(vec_check(__func__, "save_invstd", save_invstd, x));
   NR_TRY(vec_check(__func__, "running_mean", running_mean, x));
   NR_TRY(vec_check(__func__, "running_var", running_var, x));
   if (!(eps > 0) || !(momentum >= 0 && momentum <= 1))
      return NR_FAIL(NR_E_ARG, "eps must be > 0 (got %g) and momentum in [0, 1] (got %g)", eps, momentum);
   const int64_t m = g.n * g.hw;
   if (m == 0) { /* an empty batch (as PyTorch): no output, running statistics untouched */
      NR_TRY(nr_tensor_fill(save_mean, 0));
      return nr_tensor_fill(save_invstd, 0);
   }
   if (m < 2) {
      char got[256];
      return NR_FAIL(NR_E_ARG, "training needs more than one value per channel (input %s)",
                     nr_tensor_describe(x, got, sizeof got));
   }
   NR_ON_CUDA(x, nr_cuda_bn2d_forward_train(x, y, save_mean, save_invstd, gamma, beta, running_mean, running_var,
                                            momentum, eps, relu));
   const float *px = x->data, *pg = gamma ? gamma->data : NULL, *pb = beta ? beta->data : NULL;
   float *py = y->data, *sm = save_mean->data, *si = save_invstd->data, *rm = running_mean->data,
         *rv = running_var->data;
   if (g.hw == 1)
      ROWS_RUN(g, 3 * m, rows_forward_train(&g, c0, nb, px, py, sm, si, pg, pb, rm, rv, momentum, eps, relu));
#pragma omp parallel for if (nr_parallel_worth(g.c, 3 * m))
   for (int64_t c = 0; c < g.c; c++) {
      /* one pass over memory: each plane's mean and squared deviations (its second loop runs on
       * the cache-resident plane), combined in double: the sum of squares about the channel mean
       * is the planes' own plus hw * sum (pm_j - mean)^2, taken about the first plane's mean K
       * (s1, s2: sums of pm_j - K and its square), so no cancellation and no division per plane */
      const double hw = (double)g.hw, inv_hw = 1.0 / hw;
      /* each plane's sum is taken in float about k, the channel's first value (a sample, so
       * within the spread of the mean; 0 when not finite): a plain float sum is off by a few ulps
       * of the mean over large planes, and that error reaches every output when the mean is
       * large against the spread (x - mean cancels); about k the rounding is on the scale of the
       * spread, and the mean comes within half an ulp, as PyTorch's. In blocks of BN_BLOCK
       * added in double: k keeps a bias of up to a few spreads, and one float running sum over
       * a large plane grows with it (without vectorised lanes, as in a -O2 build, past half an
       * ulp). A channel holding inf / NaN is summed again in double below (its mean the plain
       * sum's), one whose finite values lie near FLT_MAX apart wholly (channel_moments_double). */
      const float k0 = px[c * g.hw], k = isfinite(k0) ? k0 : 0.0f;
      double K = 0, s1 = 0, s2 = 0, devs = 0;
      for (int64_t n = 0; n < g.n; n++) {
         const float *p = px + (n * g.c + c) * g.hw;
         /* deviations from the float-rounded plane mean pf, less what that rounding adds
          * (hw * (pm - pf)^2); blocked too (a float running sum of hw positive terms loses
          * ~sqrt(hw) ulps) */
         const double pm = (double)k + blocked_sum(p, g.hw, k, 0) * inv_hw;
         const float pf = (float)pm;
         const double dev = blocked_sum(p, g.hw, pf, 1);
         if (n == 0) K = pm;
         const double q = pm - K, off = pm - (double)pf;
         s1 += q;
         s2 += q * q;
         devs += dev - hw * off * off;
      }
      double total = 0; /* the plain sum when the shifted sums were not finite (inputs holding inf) */
      if (!isfinite(s1) || !isfinite(devs)) {
         for (int64_t n = 0; n < g.n; n++) {
            const float *p = px + (n * g.c + c) * g.hw;
            double part = 0;
#pragma omp simd reduction(+ : part)
            for (int64_t i = 0; i < g.hw; i++) part += (double)p[i];
            total += part;
         }
         if (isfinite(total)) {
            channel_moments_double(px + c * g.hw, g.n, g.c * g.hw, g.hw, total, &K, &devs);
            s1 = s2 = 0;
         }
      }
      channel_stats(K, s1, s2, devs, total, g.n, g.hw, eps, momentum, c, sm, si, rm, rv);
      const float a = si[c] * (pg ? pg[c] : 1.0f), b = pb ? pb[c] : 0.0f;
      nn_affine_planes(px + c * g.hw, py + c * g.hw, g.n, g.c * g.hw, g.hw, sm[c], a, b, relu);
   }
   return NR_OK;
}

nr_status nr_bn2d_forward_eval(const nr_tensor *x, nr_tensor *y, const nr_tensor *gamma, const nr_tensor *beta,
                               const nr_tensor *running_mean, const nr_tensor *running_var, float eps, int32_t relu)
{
   NR_TRY(bn_input_check(__func__, "x", x));
   bn_geom g;
   NR_TRY(bn_setup(__func__, x, y, "y", gamma, beta, "gamma", "beta", &g));
   NR_TRY(vec_check(__func__, "running_mean", running_mean, x));
   NR_TRY(vec_check(__func__, "running_var", running_var, x));
   if (!(eps > 0)) return NR_FAIL(NR_E_ARG, "eps must be > 0, got %g", eps);
   NR_ON_CUDA(x, nr_cuda_bn2d_forward_eval(x, y, gamma, beta, running_mean, running_var, eps, relu));
   const float *px = x->data, *pg = gamma ? gamma->data : NULL, *pb = beta ? beta->data : NULL,
               *rm = running_mean->data, *rv = running_var->data;
   float *py = y->data;
   if (g.hw == 1) ROWS_RUN(g, g.n, rows_forward_eval(&g, c0, nb, px, py, pg, pb, rm, rv, eps, relu));
   const int64_t nc = g.n * g.c;
#pragma omp parallel for if (nr_parallel_worth(nc, g.hw))
   for (int64_t q = 0; q < nc; q++) {
      float m, a, b;
      nn_bn_eval_ab(pg, pb, rm, rv, eps, q % g.c, &m, &a, &b);
      nn_affine_plane(px + q * g.hw, py + q * g.hw, g.hw, m, a, b, relu);
   }
   return NR_OK;
}

/* Shared argument checks of the two backward passes. */
static nr_status bn_backward_setup(const char *func, const nr_tensor *x, const nr_tensor *dy, const nr_tensor *dx,
                                   const nr_tensor *dgamma, const nr_tensor *dbeta, const nr_tensor *gamma,
                                   bn_geom *g)
{
   NR_TRY(bn_setup(func, x, dy, "dy", dgamma, dbeta, "dgamma", "dbeta", g));
   if (dx) NR_TRY(nn_check(func, "dx", dx, NR_DTYPE_ACT, x->ndim, x->shape, x));
   if (gamma) NR_TRY(vec_check(func, "gamma", gamma, x));
   return NR_OK;
}

/* The backward of an empty batch: no dx, and each parameter gradient d <- acc * d + scale * 0. */
static nr_status backward_empty(nr_tensor *dgamma, nr_tensor *dbeta, float acc)
{
   nr_tensor *d[2] = {dgamma, dbeta};
   for (int i = 0; i < 2; i++) {
      if (!d[i] || acc == 1) continue;
      NR_TRY(acc == 0 ? nr_tensor_fill(d[i], 0) : nr_binary_scalar(d[i], acc, d[i], NR_OP_MUL));
   }
   return NR_OK;
}

nr_status nr_bn2d_backward(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx, nr_tensor *dgamma,
                           nr_tensor *dbeta, const nr_tensor *gamma, const nr_tensor *save_mean,
                           const nr_tensor *save_invstd, float scale, float acc, const nr_tensor *relu_y)
{
   NR_TRY(bn_input_check(__func__, "x", x));
   NR_TRY(bn_input_check(__func__, "dy", dy));
   bn_geom g;
   NR_TRY(bn_backward_setup(__func__, x, dy, dx, dgamma, dbeta, gamma, &g));
   NR_TRY(vec_check(__func__, "save_mean", save_mean, x));
   NR_TRY(vec_check(__func__, "save_invstd", save_invstd, x));
   NR_TRY(relu_y_check(__func__, relu_y, x));
   if (g.n * g.hw == 0) return backward_empty(dgamma, dbeta, acc);
   NR_ON_CUDA(x,
              nr_cuda_bn2d_backward(x, dy, dx, dgamma, dbeta, gamma, save_mean, save_invstd, scale, acc, relu_y));
   const float *px = x->data, *pdy = dy->data, *pg = gamma ? gamma->data : NULL, *sm = save_mean->data,
               *si = save_invstd->data, *pr = relu_y ? relu_y->data : NULL;
   float *pdx = dx ? dx->data : NULL, *dg = dgamma ? dgamma->data : NULL, *dbt = dbeta ? dbeta->data : NULL;
   const int64_t m = g.n * g.hw;
   if (g.hw == 1)
      ROWS_RUN(g, 3 * m, rows_backward(&g, c0, nb, px, pdy, pr, pdx, dg, dbt, pg, sm, si, NULL, NULL, 0, scale, acc));
#pragma omp parallel for if (nr_parallel_worth(g.c, 3 * m))
   for (int64_t c = 0; c < g.c; c++) {
      const float mean = sm[c], invstd = si[c];
      double sdy, sdyx;
      channel_sums(px, pdy, pr, &g, c, mean, &sdy, &sdyx);
      const double sdyxhat = sdyx * invstd; /* sum dy * xhat */
      if (dg) dg[c] = (acc == 0 ? 0.0f : acc * dg[c]) + (float)(scale * sdyxhat);
      if (dbt) dbt[c] = (acc == 0 ? 0.0f : acc * dbt[c]) + (float)(scale * sdy);
      if (!pdx) continue;
      /* dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) */
      const float k = (pg ? pg[c] : 1.0f) * invstd;
      const float mdy = (float)(sdy / (double)m), mdyx = (float)(sdyxhat / (double)m) * invstd;
      for (int64_t n = 0; n < g.n; n++) {
         const int64_t off = (n * g.c + c) * g.hw;
         const float *p = px + off, *d = pdy + off, *r = pr ? pr + off : NULL;
         float *o = pdx + off;
         if (r) {
#pragma omp simd
            for (int64_t i = 0; i < g.hw; i++) {
               const float dd = d[i];
               const float dv = r[i] > 0.0f ? dd : 0.0f;
               o[i] = k * (dv - mdy - (p[i] - mean) * mdyx);
            }
         } else {
#pragma omp simd
            for (int64_t i = 0; i < g.hw; i++) o[i] = k * (d[i] - mdy - (p[i] - mean) * mdyx);
         }
      }
   }
   return NR_OK;
}

nr_status nr_bn2d_backward_eval(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx, nr_tensor *dgamma,
                                nr_tensor *dbeta, const nr_tensor *gamma, const nr_tensor *running_mean,
                                const nr_tensor *running_var, float eps, float scale, float acc,
                                const nr_tensor *relu_y)
{
   NR_TRY(bn_input_check(__func__, "x", x));
   NR_TRY(bn_input_check(__func__, "dy", dy));
   bn_geom g;
   NR_TRY(bn_backward_setup(__func__, x, dy, dx, dgamma, dbeta, gamma, &g));
   NR_TRY(vec_check(__func__, "running_mean", running_mean, x));
   NR_TRY(vec_check(__func__, "running_var", running_var, x));
   if (!(eps > 0)) return NR_FAIL(NR_E_ARG, "eps must be > 0, got %g", eps);
   NR_TRY(relu_y_check(__func__, relu_y, x));
   if (g.n * g.hw == 0) return backward_empty(dgamma, dbeta, acc);
   NR_ON_CUDA(x, nr_cuda_bn2d_backward_eval(x, dy, dx, dgamma, dbeta, gamma, running_mean, running_var, eps, scale,
                                            acc, relu_y));
   const float *px = x->data, *pdy = dy->data, *pg = gamma ? gamma->data : NULL, *rm = running_mean->data,
               *rv = running_var->data, *pr = relu_y ? relu_y->data : NULL;
   float *pdx = dx ? dx->data : NULL, *dg = dgamma ? dgamma->data : NULL, *dbt = dbeta ? dbeta->data : NULL;
   const int64_t m = g.n * g.hw;
   if (g.hw == 1)
      ROWS_RUN(g, 2 * m, rows_backward(&g, c0, nb, px, pdy, pr, pdx, dg, dbt, pg, NULL, NULL, rm, rv, eps, scale, acc));
#pragma omp parallel for if (nr_parallel_worth(g.c, 2 * m))
   for (int64_t c = 0; c < g.c; c++) {
      const float mean = rm[c], invstd = (float)(1.0 / sqrt((double)rv[c] + (double)eps));
      if (dg || dbt) {
         double sdy, sdyx;
         channel_sums(px, pdy, pr, &g, c, mean, &sdy, &sdyx);
         if (dg) dg[c] = (acc == 0 ? 0.0f : acc * dg[c]) + (float)(scale * sdyx * invstd);
         if (dbt) dbt[c] = (acc == 0 ? 0.0f : acc * dbt[c]) + (float)(scale * sdy);
      }
      if (!pdx) continue;
      const float k = (pg ? pg[c] : 1.0f) * invstd;
      for (int64_t n = 0; n < g.n; n++) {
         const int64_t off = (n * g.c + c) * g.hw;
         const float *d = pdy + off, *r = pr ? pr + off : NULL;
         float *o = pdx + off;
         if (r) { /* dy masked first, as the GPU and an unfused ReLU: an inf/NaN k then gives NaN there */
#pragma omp simd
            for (int64_t i = 0; i < g.hw; i++) o[i] = k * (r[i] > 0.0f ? d[i] : 0.0f);
         } else {
#pragma omp simd
            for (int64_t i = 0; i < g.hw; i++) o[i] = k * d[i];
         }
      }
   }
   return NR_OK;
}

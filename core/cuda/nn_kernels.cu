/* nn_kernels.cu — own CUDA kernels of the layer, optimizer and NR primitives: batch norm
 * (training, evaluation, both backwards), ReLU, sigmoid, max/avg pooling (windowed and adaptive),
 * global pooling, bias add and bias gradient, dropout, softmax cross-entropy, fused SGD, BN
 * liveliness masks, L1 sign step.
 *
 * What it is: the GPU side of core/nn_*.c, core/optim.c and core/nr_ops.c, with the same
 * semantics as those CPU references (documented in core/nr.h). Layer kernels are templates over
 * the activation element type (f32, or bf16 for mixed precision; kernel_util.cuh); parameters,
 * statistics, dropout masks and softmax probabilities stay f32. The layer entry points were
 * argument-checked by their CPU callers (dtype, shape, contiguity, same device) before dispatch;
 * SGD is checked by core/optim.c too; the NR primitives dispatch first, so they check everything here.
 * What it is not: convolutions (conv.c, cuDNN) or general tensor math (tensor_kernels.cu).
 * Invariants: per-channel statistics are two-pass (mean, then squared deviations from the float
 * mean) and accumulate in double (the CPU merges per-plane float means in double, so the two agree
 * to rounding, not bit for bit); reductions are split over (chunk, channel) blocks
 * into double partials and finished per channel, so the result does not depend on timing; label
 * ranges are checked on the device and reported through a flag copied back (never a device
 * assert); nothing synchronises except where a value goes to the host (the loss-label check,
 * the live count).
 */
#include "kernel_util.cuh"
#include "../adam_coef.h"
#include "../nn_rank.h"
#include "../nn_pool_window.h"
#include "../nn_act_math.h"

#include <cuda_runtime.h>
#include <math.h>

namespace {


/* Division by a runtime constant for 0 <= n < 2^31 (the divisor >= 1): q = (umulhi(n, m) + n) >> s. */
struct fastdiv {
   uint32_t d, m, s;
};
fastdiv make_fastdiv(uint32_t d)
{
   fastdiv f;
   f.d = d;
   f.s = 0;
   while ((1u << f.s) < d) f.s++;
   f.m = (uint32_t)((((uint64_t)1 << 32) * (((uint64_t)1 << f.s) - d)) / d + 1);
   return f;
}
__device__ __forceinline__ uint32_t fdiv(const fastdiv &f, uint32_t n)
{
   return (__umulhi(n, f.m) + n) >> f.s;
}

/* ---------------------------------------------------------------- per-channel reductions */

/* Channel of flat element i of an (N, C, R) tensor: fast 32-bit division when the tensor has
 * fewer than 2^31 elements, plain 64-bit division otherwise. */
struct chandiv {
   fastdiv r, c;
   int64_t r64, c64;
   int fast;
};
chandiv make_chandiv(int64_t c, int64_t r, int64_t numel)
{
   chandiv d;
   d.fast = numel < (INT64_C(1) << 31) && r > 0 && c > 0;
   d.r = make_fastdiv((uint32_t)(d.fast ? r : 1));
   d.c = make_fastdiv((uint32_t)(d.fast ? c : 1));
   d.r64 = r > 0 ? r : 1;
   d.c64 = c > 0 ? c : 1;
   return d;
}
__device__ __forceinline__ int64_t chan_of(const chandiv &d, int64_t i)
{
   if (d.fast) {
      uint32_t q = fdiv(d.r, (uint32_t)i);
      return (int64_t)(q - fdiv(d.c, q) * d.c.d);
   }
   return (i / d.r64) % d.c64;
}

/* A tensor viewed as (N, C, R) with the channel in the middle: R = H*W for NCHW, and a
 * channels-last tensor is (N*H*W, C, 1), rows of C channels (chan_view). */
struct chan3 {
   int64_t n, c, r;
};

enum { RED_SUM_X = 0, RED_SQDEV = 1, RED_DY_DYX = 2 };

/* dy masked by the fused ReLU's output when relu_y is given: dy where relu_y > 0, else 0 (0 at a
 * NaN, as k_relu_b and the CPU's plane_sums); the BN backward's reading of its gradient. */
template <typename T> __device__ __forceinline__ float masked_dy(const T *dy, const T *relu_y, int64_t i)
{
   const float d = ld(dy + i);
   return relu_y && !(ld(relu_y + i) > 0.0f) ? 0.0f : d;
}

/* grid (S, C), 256 threads: block (s, c) reduces the s-th chunk of channel c's L = N*R values.
 * RED_SUM_X: q0 = sum x; RED_SQDEV: q0 = sum (x - mean_c)^2 (float differences, as the CPU);
 * RED_DY_DYX: q0 = sum dy', q1 = sum dy' * (x - mean_c), dy' = masked_dy (relu_y may be NULL).
 * part[(q * C + c) * S + s]. */
template <typename T>
__global__ void k_chan_partial(const T *x, const T *dy, const T *relu_y, const float *mean, chan3 g, fastdiv rdiv,
                               int mode, double *part)
{
   const int s = blockIdx.x, S = gridDim.x;
   const int64_t c = blockIdx.y;
   const uint32_t L = (uint32_t)(g.n * g.r);
   const uint32_t lo = (uint32_t)((uint64_t)L * s / S), hi = (uint32_t)((uint64_t)L * (s + 1) / S);
   const float mu = mean ? mean[c] : 0.0f;
   double a = 0, b = 0;
   for (uint32_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      uint32_t n = fdiv(rdiv, j), r = j - n * rdiv.d;
      int64_t at = ((int64_t)n * g.c + c) * g.r + r;
      if (mode == RED_SUM_X) a += ld(x + at);
      else if (mode == RED_SQDEV) {
         float d = ld(x + at) - mu;
         a += d * d;
      } else {
         float d = masked_dy(dy, relu_y, at);
         a += d;
         b += d * (ld(x + at) - mu);
      }
   }
   __shared__ double sa[256], sb[256];
   sa[threadIdx.x] = a;
   sb[threadIdx.x] = b;
   __syncthreads();
   for (int k = blockDim.x / 2; k > 0; k >>= 1) {
      if ((int)threadIdx.x < k) {
         sa[threadIdx.x] += sa[threadIdx.x + k];
         sb[threadIdx.x] += sb[threadIdx.x + k];
      }
      __syncthreads();
   }
   if (threadIdx.x == 0) {
      part[c * S + s] = sa[0];
      if (mode == RED_DY_DYX) part[(g.c + c) * S + s] = sb[0];
   }
}

/* The R == 1 case (channels-last activations, Linear's (N, F) bias gradient): rows of C
 * channels. grid (S, ceil(C / 32)), block (32, 8): lanes run along channels, so a warp reads 32
 * neighbouring values of one row (k_chan_partial would read one value per row and thread);
 * block (s, b) covers the s-th chunk of rows for channels 32b .. 32b+31. Same part layout. */
template <typename T>
__global__ void k_chan_partial_rows(const T *x, const T *dy, const T *relu_y, const float *mean, chan3 g, int mode,
                                    double *part)
{
   const int s = blockIdx.x, S = gridDim.x;
   const int64_t c = (int64_t)blockIdx.y * 32 + threadIdx.x;
   const int64_t L = g.n, lo = L * s / S, hi = L * (s + 1) / S;
   double a = 0, b = 0;
   if (c < g.c) {
      const float mu = mean ? mean[c] : 0.0f;
      for (int64_t j = lo + threadIdx.y; j < hi; j += blockDim.y) {
         const int64_t at = j * g.c + c;
         if (mode == RED_SUM_X) a += ld(x + at);
         else if (mode == RED_SQDEV) {
            float d = ld(x + at) - mu;
            a += d * d;
         } else {
            float d = masked_dy(dy, relu_y, at);
            a += d;
            b += d * (ld(x + at) - mu);
         }
      }
   }
   __shared__ double sa[8][33], sb[8][33];
   sa[threadIdx.y][threadIdx.x] = a;
   sb[threadIdx.y][threadIdx.x] = b;
   __syncthreads();
   if (threadIdx.y == 0 && c < g.c) {
      for (int k = 1; k < (int)blockDim.y; k++) {
         a += sa[k][threadIdx.x];
         b += sb[k][threadIdx.x];
      }
      part[c * S + s] = a;
      if (mode == RED_DY_DYX) part[(g.c + c) * S + s] = b;
   }
}

__device__ __forceinline__ double sum_parts(const double *part, int64_t c, int S)
{
   double t = 0;
   for (int s = 0; s < S; s++) t += part[c * S + s];
   return t;
}

/* Number of chunks per channel (per 32 channels for rows): about 4 blocks per SM in all, each
 * with at least ~2048 values, at most 64 (256 for rows), at least 1. */
int chunks_for(const nr_cuda_ctx *ctx, chan3 g)
{
   const int rows = g.r == 1;
   const int64_t groups = rows ? (g.c + 31) / 32 : g.c;
   int64_t want = (4LL * ctx->sm_count + groups - 1) / (groups > 0 ? groups : 1);
   int64_t per = rows ? g.n * 32 : g.n * g.r;
   int64_t maxs = per / 2048 > 1 ? per / 2048 : 1;
   if (want > maxs) want = maxs;
   if (want > (rows ? 256 : 64)) want = rows ? 256 : 64;
   return (int)(want < 1 ? 1 : want);
}

/* Grid limits of the reductions: k_chan_partial puts a channel per grid row and divides by r in
 * 32 bits; k_chan_partial_rows (r == 1) puts 32 channels per grid row and indexes in 64 bits. */
nr_status chan_check(const char *func, chan3 g)
{
   if (g.r == 1 ? (g.c + 31) / 32 > 65535 : g.n * g.r >= (INT64_C(1) << 31) || g.c > 65535)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "per-channel size %lld or channel count %lld exceeds the CUDA kernel's limits (%s)",
                        (long long)(g.n * g.r), (long long)g.c, g.r == 1 ? "2^21 channels" : "2^31, 65535");
   return NR_OK;
}

/* Launches k_chan_partial; *part (scratch slot 0) receives 2 * C * S doubles. */
template <typename T>
nr_status chan_reduce_typed(nr_cuda_ctx *ctx, const char *func, const T *x, const T *dy, const T *relu_y,
                            const float *mean, chan3 g, int mode, double **part, int *S)
{
   NR_TRY(chan_check(func, g));
   *S = chunks_for(ctx, g);
   void *p;
   NR_TRY(nr_cuda_scratch(ctx, 0, (int64_t)sizeof(double) * 2 * g.c * *S, &p));
   *part = (double *)p;
   if (g.r == 1) {
      dim3 grid((unsigned)*S, (unsigned)((g.c + 31) / 32)), block(32, 8);
      k_chan_partial_rows<T><<<grid, block, 0, ctx->stream>>>(x, dy, relu_y, mean, g, mode, *part);
   } else {
      dim3 grid((unsigned)*S, (unsigned)g.c);
      k_chan_partial<T><<<grid, 256, 0, ctx->stream>>>(x, dy, relu_y, mean, g,
                                                       make_fastdiv((uint32_t)(g.r > 0 ? g.r : 1)), mode, *part);
   }
   NR_CU_LAUNCHED("%s: per-channel reduction (%lld, %lld, %lld)", func, (long long)g.n, (long long)g.c, (long long)g.r);
   return NR_OK;
}

/* chan_reduce_typed on activation tensors x, dy and relu_y (both may be NULL), f32 or bf16. */
nr_status chan_reduce(nr_cuda_ctx *ctx, const char *func, const nr_tensor *x, const nr_tensor *dy,
                      const nr_tensor *relu_y, const float *mean, chan3 g, int mode, double **part, int *S)
{
   return with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      return chan_reduce_typed<T>(ctx, func, cptr<T>(x), cptr<T>(dy), cptr<T>(relu_y), mean, g, mode, part, S);
   });
}

/* acc/scale rule: d <- acc * d + scale * v, with acc == 0 ignoring old contents (even NaN). */
__device__ __forceinline__ float acc_rule(float old, float acc, double scale_v)
{
   return (acc == 0.0f ? 0.0f : acc * old) + (float)scale_v;
}

/* ---------------------------------------------------------------- batch norm */

__global__ void k_bn_mean(const double *part, int S, int64_t C, double m, float *save_mean)
{
   GRID_LOOP(c, C) save_mean[c] = (float)(sum_parts(part, c, S) / m);
}

__global__ void k_bn_var(const double *part, int S, int64_t C, double m, float eps, float momentum,
                         const float *save_mean, float *save_invstd, float *rm, float *rv)
{
   GRID_LOOP(c, C)
   {
      double var = sum_parts(part, c, S) / m;
      save_invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
      rm[c] = (1.0f - momentum) * rm[c] + momentum * save_mean[c];
      rv[c] = (1.0f - momentum) * rv[c] + momentum * (float)(var * m / (m - 1));
   }
}

/* Per channel: coef = {mean_c, a_c, beta_c} with a_c = invstd_c * gamma_c; eval = 1: invstd_c =
 * 1 / sqrt(var_c + eps) from the running variance passed as `invstd`. */
__global__ void k_bn_coef(int64_t C, const float *mean, const float *invstd, const float *gamma, const float *beta,
                          int eval, float eps, float *coef)
{
   GRID_LOOP(c, C)
   {
      float is = eval ? (float)(1.0 / sqrt((double)invstd[c] + (double)eps)) : invstd[c];
      coef[3 * c] = mean[c];
      coef[3 * c + 1] = is * (gamma ? gamma[c] : 1.0f);
      coef[3 * c + 2] = beta ? beta[c] : 0.0f;
   }
}

/* y = (x - mean_c) * a_c + beta_c (y may be x; centred first, as the CPU's nn_affine_plane, so a
 * mean large against the spread costs no digits), then relu_of when relu: the fused ReLU in the
 * same pass instead of a second one over the activation. */
template <typename T> __global__ void k_bn_affine(const T *x, T *y, int64_t n, chandiv cd, const float *coef, int relu)
{
   GRID_LOOP(i, n)
   {
      int64_t c = chan_of(cd, i);
      float v = (ld(x + i) - coef[3 * c]) * coef[3 * c + 1] + coef[3 * c + 2];
      st(y + i, relu ? relu_of(v) : v);
   }
}

nr_status bn_apply(nr_cuda_ctx *ctx, const char *func, const nr_tensor *x, nr_tensor *y, const float *mean,
                   const float *invstd, const nr_tensor *gamma, const nr_tensor *beta, int eval, float eps, int relu);

/* Per channel: mean and invstd (train: saved; eval: from running stats) and the dgamma/dbeta
 * write-back; coef[c] = {k, mdy, mdyx} for the dx kernel. */
__global__ void k_bn_bwd_finish(const double *part, int S, int64_t C, double m, const float *mean_in,
                                const float *invstd_in, const float *rv, float eps, const float *gamma, float *dgamma,
                                float *dbeta, float scale, float acc, float *coef, int eval)
{
   GRID_LOOP(c, C)
   {
      float invstd = eval ? (float)(1.0 / sqrt((double)rv[c] + (double)eps)) : invstd_in[c];
      double sdy = sum_parts(part, c, S), sdyx = sum_parts(part + C * S, c, S);
      double sdyxhat = sdyx * invstd;
      if (dgamma) dgamma[c] = acc_rule(dgamma[c], acc, scale * sdyxhat);
      if (dbeta) dbeta[c] = acc_rule(dbeta[c], acc, scale * sdy);
      float k = (gamma ? gamma[c] : 1.0f) * invstd;
      coef[3 * c] = k;
      coef[3 * c + 1] = eval ? 0.0f : (float)(sdy / m);
      coef[3 * c + 2] = eval ? 0.0f : (float)(sdyxhat / m) * invstd;
   }
   (void)mean_in;
}

/* Training: dx = k * (dy' - mean(dy') - xhat-term); evaluation: dx = k * dy' (x is not read, so an
 * infinite x does not turn dx into NaN, as on the CPU); dy' = masked_dy. dx may be dy: each
 * element is read before it is written. */
template <typename T>
__global__ void k_bn_dx(const T *x, const T *dy, const T *relu_y, T *dx, int64_t n, chandiv cd, const float *mean,
                        const float *coef, int eval)
{
   GRID_LOOP(i, n)
   {
      int64_t c = chan_of(cd, i);
      float k = coef[3 * c], d = masked_dy(dy, relu_y, i);
      if (eval) {
         st(dx + i, k * d);
      } else {
         float mdy = coef[3 * c + 1], mdyx = coef[3 * c + 2];
         st(dx + i, k * (d - mdy - (ld(x + i) - mean[c]) * mdyx));
      }
   }
}

/* t (N, C, ...) as (N, C, R) for the per-channel kernels; a channels-last t as (N*H*W, C, 1). */
chan3 chan_view(const nr_tensor *t)
{
   chan3 g;
   g.c = t->shape[1];
   if (nr_is_nhwc(t)) {
      g.n = t->shape[0] * t->shape[2] * t->shape[3];
      g.r = 1;
      return g;
   }
   g.n = t->shape[0];
   int64_t nc = g.n * g.c;
   g.r = nc > 0 ? nr_tensor_numel(t) / nc : 0;
   return g;
}

/* f32 parameters, statistics and masks (kernel_util.cuh's pointer helpers, named for brevity) */
inline const float *fp(const nr_tensor *t) { return cptr<float>(t); }
inline float *fpm(nr_tensor *t) { return mptr<float>(t); }

/* BN backward; relu_y (or NULL): the fused ReLU's output, masking dy in both passes (reduction and
 * dx) instead of a separate ReLU backward pass staging the masked gradient. */
nr_status bn_backward_any(const char *func, const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx, nr_tensor *dgamma,
                          nr_tensor *dbeta, const nr_tensor *gamma, const nr_tensor *mean, const nr_tensor *invstd,
                          const nr_tensor *rv, float eps, float scale, float acc, int eval, const nr_tensor *relu_y)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   chan3 g = chan_view(x);
   if (g.c == 0) return NR_OK;
   const int64_t m = g.n * g.r;
   double *part = NULL;
   int S = 1;
   bool need_sums = !eval || dgamma || dbeta;
   if (need_sums && m > 0) NR_TRY(chan_reduce(ctx, func, x, dy, relu_y, fp(mean), g, RED_DY_DYX, &part, &S));
   else {
      /* no sums needed (or m == 0): zero partials so the finish kernel sees sums of 0 */
      void *p;
      NR_TRY(nr_cuda_scratch(ctx, 0, (int64_t)sizeof(double) * 2 * g.c, &p));
      part = (double *)p;
      NR_CU(cudaMemsetAsync(part, 0, sizeof(double) * 2 * g.c, ctx->stream), "%s: zeroing sums", func);
   }
   void *coef;
   NR_TRY(nr_cuda_scratch(ctx, 1, (int64_t)sizeof(float) * 3 * g.c, &coef));
   k_bn_bwd_finish<<<grid_for(g.c), 256, 0, ctx->stream>>>(part, S, g.c, (double)m, fp(mean), fp(invstd), fp(rv), eps,
                                                          fp(gamma), fpm(dgamma), fpm(dbeta), scale, acc,
                                                          (float *)coef, eval);
   NR_CU_LAUNCHED("%s: finishing %s", func, NR_DESC(x));
   if (!dx || g.n * g.c * g.r == 0) return NR_OK;
   int64_t n = g.n * g.c * g.r;
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_bn_dx<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(x), cptr<T>(dy), cptr<T>(relu_y), mptr<T>(dx), n,
                                                       make_chandiv(g.c, g.r, n), fp(mean), (const float *)coef, eval);
   });
   NR_CU_LAUNCHED("%s: dx %s", func, NR_DESC(dx));
   return NR_OK;
}

/* ---------------------------------------------------------------- activations, dropout, bias */

template <typename T> __global__ void k_relu_f(const T *x, T *y, int64_t n)
{
   GRID_LOOP(i, n)
   {
      float v = ld(x + i);
      st(y + i, relu_of(v));
   }
}
template <typename T> __global__ void k_relu_b(const T *y, const T *dy, T *dx, int64_t n)
{
   GRID_LOOP(i, n) st(dx + i, ld(y + i) > 0 ? ld(dy + i) : 0.0f);
}
template <typename T> __global__ void k_sigm_f(const T *x, T *y, int64_t n)
{
   GRID_LOOP(i, n) st(y + i, 1.0f / (1.0f + expf(-ld(x + i))));
}
template <typename T> __global__ void k_sigm_b(const T *y, const T *dy, T *dx, int64_t n)
{
   GRID_LOOP(i, n)
   {
      float v = ld(y + i);
      st(dx + i, ld(dy + i) * v * (1.0f - v));
   }
}
/* The nr_activation_* kinds (kind: NR_ACT_*, one per launch), core/nn_act_math.h's formulas, as
 * core/nn_act.c. */
template <typename T> __global__ void k_act_f(const T *x, T *y, int kind, float alpha, int64_t n)
{
   GRID_LOOP(i, n) st(y + i, nr_act_forward(kind, ld(x + i), alpha));
}
template <typename T> __global__ void k_act_b(const T *s, const T *dy, T *dx, int kind, float alpha, int64_t n)
{
   GRID_LOOP(i, n) st(dx + i, nr_act_backward(kind, ld(s + i), ld(dy + i), alpha));
}
/* The mask stays f32 (it is drawn by the global generator, as on the CPU). */
template <typename T> __global__ void k_dropout_f(const T *x, T *y, float *mask, int64_t n, float keep, int identity)
{
   GRID_LOOP(i, n)
   {
      float m = identity ? 1.0f : mask[i] * keep;
      mask[i] = m;
      st(y + i, ld(x + i) * m);
   }
}
template <typename T> __global__ void k_mask_mul(const T *a, const float *m, T *o, int64_t n)
{
   GRID_LOOP(i, n) st(o + i, ld(a + i) * m[i]);
}

template <typename T> __global__ void k_bias_add(T *y, const float *b, int64_t n, chandiv cd)
{
   GRID_LOOP(i, n) st(y + i, ld(y + i) + b[chan_of(cd, i)]);
}
__global__ void k_bias_finish(const double *part, int S, int64_t C, float *db, float scale, float acc)
{
   GRID_LOOP(c, C) db[c] = acc_rule(db[c], acc, (double)scale * sum_parts(part, c, S));
}

/* ---------------------------------------------------------------- pooling */

/* Input (N, C, h, w), output (N, C, ho, wo), nc = N*C planes; cl: both channels-last; ad:
 * adaptive windows (kernel, stride and padding unused; nn_pool_window.h). */
struct pool {
   int64_t nc, c, h, w, ho, wo;
   int32_t kh, kw, sh, sw, ph, pw, cl, ad;
};

pool make_pool(const nr_tensor *x, const nr_tensor *y, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph, int32_t pw)
{
   pool p;
   p.nc = x->shape[0] * x->shape[1];
   p.c = x->shape[1];
   p.cl = nr_is_nhwc(x) || nr_is_nhwc(y); /* the checks let the other be read either way */
   p.h = x->shape[2];
   p.w = x->shape[3];
   p.ho = y->shape[2];
   p.wo = y->shape[3];
   p.kh = kh;
   p.kw = kw;
   p.sh = sh;
   p.sw = sw;
   p.ph = ph;
   p.pw = pw;
   p.ad = 0;
   return p;
}

pool make_adaptive_pool(const nr_tensor *x, const nr_tensor *y)
{
   pool p = make_pool(x, y, 1, 1, 1, 1, 0, 0);
   p.ad = 1;
   return p;
}

typedef nr_pool_span span; /* (nn_pool_window.h: the CPU's windows) */
__device__ __forceinline__ span row_span(const pool &p, int64_t oh)
{
   return nr_pool_span_at(oh, p.h, p.ho, p.kh, p.sh, p.ph, p.ad);
}
__device__ __forceinline__ span col_span(const pool &p, int64_t ow)
{
   return nr_pool_span_at(ow, p.w, p.wo, p.kw, p.sw, p.pw, p.ad);
}

/* Element i (in memory order) of a tensor with planes of hh x ww pixels: its plane q = n*C + c
 * and pixel (y, x). NCHW runs x fastest, channels-last c. */
struct pix {
   int64_t q, y, x;
};
__device__ __forceinline__ pix pix_of(const pool &p, int64_t i, int64_t hh, int64_t ww)
{
   pix r;
   int64_t c = 0;
   if (p.cl) {
      c = i % p.c;
      i /= p.c;
   }
   r.x = i % ww;
   i /= ww;
   r.y = i % hh;
   r.q = p.cl ? (i / hh) * p.c + c : i / hh;
   return r;
}
/* Offset of plane q's pixel 0 in a tensor with hh x ww planes; pixel k of the plane is at
 * base + k * pix_step(p). */
__device__ __forceinline__ int64_t plane_base(const pool &p, int64_t q, int64_t hh, int64_t ww)
{
   if (!p.cl) return q * hh * ww;
   int64_t n = q / p.c;
   return n * hh * ww * p.c + (q - n * p.c);
}
__device__ __forceinline__ int64_t pix_step(const pool &p) { return p.cl ? p.c : 1; }

template <typename T> __global__ void k_maxpool_f(const T *x, T *y, int64_t *ind, pool p)
{
   const int64_t step = pix_step(p);
   GRID_LOOP(i, p.nc * p.ho * p.wo)
   {
      pix o = pix_of(p, i, p.ho, p.wo);
      const span r = row_span(p, o.y), c = col_span(p, o.x);
      const T *xp = x + plane_base(p, o.q, p.h, p.w);
      float best = -INFINITY;
      int64_t arg = r.lo * p.w + c.lo;
      /* the CPU's (PyTorch's) rule: take v when v > best or v is NaN, so the last NaN wins */
      for (int64_t ih = r.lo; ih < r.hi; ih++)
         for (int64_t iw = c.lo; iw < c.hi; iw++) {
            float v = ld(xp + (ih * p.w + iw) * step);
            if (v > best || isnan(v)) {
               best = v;
               arg = ih * p.w + iw;
            }
         }
      st(y + i, best);
      ind[i] = arg;
   }
}

/* The output windows (oh0..oh1, ow0..ow1) that cover input pixel (ih, iw): window oh covers ih iff
 * oh*sh - ph <= ih < oh*sh - ph + kh; an adaptive one iff floor(oh*h/ho) <= ih < ceil((oh+1)*h/ho),
 * that is floor(ih*ho/h) <= oh <= floor(((ih+1)*ho - 1)/h). */
struct cover {
   int64_t oh0, oh1, ow0, ow1;
};
__device__ __forceinline__ cover covering(const pool &p, int64_t ih, int64_t iw)
{
   cover c;
   if (p.ad) {
      c.oh0 = ih * p.ho / p.h;
      c.oh1 = ((ih + 1) * p.ho - 1) / p.h;
      c.ow0 = iw * p.wo / p.w;
      c.ow1 = ((iw + 1) * p.wo - 1) / p.w;
      return c;
   }
   int64_t nh = ih + p.ph - p.kh + 1, nw = iw + p.pw - p.kw + 1;
   c.oh0 = nh <= 0 ? 0 : (nh + p.sh - 1) / p.sh;
   c.oh1 = (ih + p.ph) / p.sh;
   c.ow0 = nw <= 0 ? 0 : (nw + p.sw - 1) / p.sw;
   c.ow1 = (iw + p.pw) / p.sw;
   if (c.oh1 > p.ho - 1) c.oh1 = p.ho - 1;
   if (c.ow1 > p.wo - 1) c.ow1 = p.wo - 1;
   return c;
}

/* A gather: each input element sums, in f32 and in window order (the CPU scatter's order), the dy
 * of the covering windows whose index chose it; no atomics, so the result does not depend on
 * timing. Indices (dy's layout) outside the plane match nothing. */
template <typename T> __global__ void k_maxpool_b(const T *dy, const int64_t *ind, T *dx, pool p)
{
   const int64_t step = pix_step(p);
   GRID_LOOP(i, p.nc * p.h * p.w)
   {
      pix at = pix_of(p, i, p.h, p.w);
      const int64_t me = at.y * p.w + at.x, base = plane_base(p, at.q, p.ho, p.wo);
      cover c = covering(p, at.y, at.x);
      float s = 0;
      for (int64_t oh = c.oh0; oh <= c.oh1; oh++)
         for (int64_t ow = c.ow0; ow <= c.ow1; ow++) {
            const int64_t o = base + (oh * p.wo + ow) * step;
            if (ind[o] == me) s += ld(dy + o);
         }
      st(dx + i, s);
   }
}

__device__ __forceinline__ float avg_div(const pool &p, const span &r, const span &c, int inc)
{
   return nr_pool_avg_divisor(r, c, p.h, p.w, p.kh, p.kw, p.ph, p.pw, inc, p.ad);
}

template <typename T> __global__ void k_avgpool_f(const T *x, T *y, pool p, int inc)
{
   const int64_t step = pix_step(p);
   GRID_LOOP(i, p.nc * p.ho * p.wo)
   {
      pix o = pix_of(p, i, p.ho, p.wo);
      const span r = row_span(p, o.y), c = col_span(p, o.x);
      const T *xp = x + plane_base(p, o.q, p.h, p.w);
      float s = 0;
      for (int64_t ih = r.lo; ih < r.hi; ih++)
         for (int64_t iw = c.lo; iw < c.hi; iw++) s += ld(xp + (ih * p.w + iw) * step);
      st(y + i, s / avg_div(p, r, c, inc));
   }
}

/* A gather: each input element sums, in f32, dy / divisor over the windows that cover it (no
 * atomics, deterministic). */
template <typename T> __global__ void k_avgpool_b(const T *dy, T *dx, pool p, int inc)
{
   const int64_t step = pix_step(p);
   GRID_LOOP(i, p.nc * p.h * p.w)
   {
      pix at = pix_of(p, i, p.h, p.w);
      cover c = covering(p, at.y, at.x);
      const T *g = dy + plane_base(p, at.q, p.ho, p.wo);
      float s = 0;
      for (int64_t oh = c.oh0; oh <= c.oh1; oh++) {
         const span r = row_span(p, oh);
         for (int64_t ow = c.ow0; ow <= c.ow1; ow++)
            s += ld(g + (oh * p.wo + ow) * step) / avg_div(p, r, col_span(p, ow), inc);
      }
      st(dx + i, s);
   }
}

/* One warp per (n, c) plane. */
template <typename T> __global__ void k_gap_f(const T *x, T *y, int64_t nc, int64_t hw)
{
   int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32, nwarps = (int64_t)gridDim.x * blockDim.x / 32;
   int lane = threadIdx.x & 31;
   for (int64_t q = warp; q < nc; q += nwarps) {
      const T *p = x + q * hw;
      double s = 0;
      for (int64_t i = lane; i < hw; i += 32) s += ld(p + i);
      for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
      if (lane == 0) st(y + q, (float)(s / (double)hw));
   }
}
template <typename T> __global__ void k_gap_b(const T *dy, T *dx, int64_t nc, int64_t hw)
{
   GRID_LOOP(i, nc * hw) st(dx + i, ld(dy + i / hw) / (float)hw);
}
/* Channels-last x (N, H, W, C in memory): one thread per (n, c), neighbouring threads read
 * neighbouring channels. */
template <typename T> __global__ void k_gap_f_cl(const T *x, T *y, int64_t nc, int64_t c, int64_t hw)
{
   GRID_LOOP(i, nc)
   {
      const T *p = x + (i / c) * hw * c + i % c;
      double s = 0;
      for (int64_t k = 0; k < hw; k++) s += ld(p + k * c);
      st(y + i, (float)(s / (double)hw));
   }
}
template <typename T> __global__ void k_gap_b_cl(const T *dy, T *dx, int64_t nc, int64_t c, int64_t hw)
{
   GRID_LOOP(i, nc * hw) st(dx + i, ld(dy + (i / (hw * c)) * c + i % c) / (float)hw);
}

/* ---------------------------------------------------------------- softmax cross-entropy */

/* Records the smallest bad position in *bad (initialised to ~0). */
__global__ void k_label_check(const int64_t *labels, int64_t stride, int64_t n, int64_t k, unsigned long long *bad)
{
   GRID_LOOP(i, n)
   {
      const int64_t v = labels[i * stride]; /* strided labels, as the CPU check reads them */
      if (v < 0 || v >= k) atomicMin(bad, (unsigned long long)i);
   }
}

/* A block-wide reduction of one value per thread with op (blockDim.x a power of two <= 256,
 * every thread of the block calling; sh: shared scratch of blockDim.x values); every thread gets
 * the result, and sh may be reused after it returns. */
template <typename V, typename Op> __device__ V block_reduce(V v, V *sh, Op op)
{
   sh[threadIdx.x] = v;
   __syncthreads();
   for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if ((int)threadIdx.x < s) sh[threadIdx.x] = op(sh[threadIdx.x], sh[threadIdx.x + s]);
      __syncthreads();
   }
   const V r = sh[0];
   __syncthreads();
   return r;
}
/* the larger of a and b, b's NaN ignored (as the per-thread maxima) */
__device__ __forceinline__ float max_of(float a, float b) { return b > a ? b : a; }
__device__ __forceinline__ double sum_of(double a, double b) { return a + b; }

/* One block per row: probs = softmax(x); rowloss = (1-ls) * nll + ls * (lse - mean(x - mx)).
 * x: the logits (T); probs f32. */
template <typename T>
__global__ void k_xent_f(const T *x, const int64_t *labels, float *probs, double *rowloss, int64_t n, int64_t k, double ls)
{
   __shared__ float smx[256];
   __shared__ double sse[256], ssx[256];
   for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
      const T *xr = x + row * k;
      float *pr = probs + row * k;
      float mx = -INFINITY;
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) mx = ld(xr + j) > mx ? ld(xr + j) : mx;
      mx = block_reduce(mx, smx, max_of);
      double se = 0, sx = 0;
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
         float e = expf(ld(xr + j) - mx);
         pr[j] = e;
         se += e;
         sx += (double)ld(xr + j) - mx;
      }
      se = block_reduce(se, sse, sum_of);
      sx = block_reduce(sx, ssx, sum_of);
      float inv = (float)(1.0 / se);
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) pr[j] *= inv;
      if (threadIdx.x == 0) {
         int64_t lab = labels[row];
         double lse = log(se);
         /* bad labels are reported by the host */
         double nll = (lab >= 0 && lab < k) ? lse - ((double)ld(xr + lab) - mx) : 0.0;
         /* terms weighted 0 are left out (0 * inf is NaN with -inf logits), as nn_loss.c */
         rowloss[row] = (ls < 1.0 ? (1.0 - ls) * nll : 0.0) + (ls > 0.0 ? ls * (lse - sx / (double)k) : 0.0);
      }
      __syncthreads();
   }
}

/* Softmax / log-softmax over the last dimension, one block of 256 per row (grid-strided over
 * rows): the max (NaN noticed), then the sum of exp in double, as core/nn_act.c. */
template <typename T>
__global__ void k_softmax_f(const T *x, T *y, int64_t rows, int64_t k, int take_log)
{
   __shared__ float smx[256];
   __shared__ double sse[256];
   __shared__ int snan;
   for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
      const T *xr = x + row * k;
      T *yr = y + row * k;
      if (threadIdx.x == 0) snan = 0;
      __syncthreads();
      float mx = -INFINITY;
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
         float v = ld(xr + j);
         if (v != v) snan = 1;
         else if (v > mx) mx = v;
      }
      mx = block_reduce(mx, smx, max_of); /* (its barriers also publish snan) */
      if (snan || mx == -INFINITY) { /* NaN in, or every logit -inf: NaN out */
         for (int64_t j = threadIdx.x; j < k; j += blockDim.x) st(yr + j, NAN);
         __syncthreads();
         continue;
      }
      double se = 0;
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) se += exp((double)(ld(xr + j) - mx));
      se = block_reduce(se, sse, sum_of);
      if (take_log) {
         const float lse = (float)log(se);
         for (int64_t j = threadIdx.x; j < k; j += blockDim.x) st(yr + j, (ld(xr + j) - mx) - lse);
      } else {
         const double inv = 1.0 / se;
         for (int64_t j = threadIdx.x; j < k; j += blockDim.x) st(yr + j, (float)(exp((double)(ld(xr + j) - mx)) * inv));
      }
      __syncthreads();
   }
}

/* Its backward, one block per row: the row sum (of dy, or of dy * y) in double. */
template <typename T>
__global__ void k_softmax_b(const T *y, const T *dy, T *dx, int64_t rows, int64_t k, int take_log)
{
   __shared__ double ss[256];
   for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
      const T *yr = y + row * k, *gr = dy + row * k;
      T *dr = dx + row * k;
      double s = 0;
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) s += take_log ? (double)ld(gr + j) : (double)ld(gr + j) * ld(yr + j);
      const float sf = (float)block_reduce(s, ss, sum_of);
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
         const float yv = ld(yr + j), gv = ld(gr + j);
         st(dr + j, take_log ? gv - expf(yv) * sf : yv * (gv - sf));
      }
      __syncthreads();
   }
}

__global__ void k_xent_mean(const double *rowloss, int64_t n, float *loss)
{
   __shared__ double sh[256];
   double s = 0;
   for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += rowloss[i];
   sh[threadIdx.x] = s;
   __syncthreads();
   for (int k = blockDim.x / 2; k > 0; k >>= 1) {
      if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
      __syncthreads();
   }
   if (threadIdx.x == 0) loss[0] = n > 0 ? (float)(sh[0] / (double)n) : NAN;
}

template <typename T>
__global__ void k_xent_b(const float *probs, const int64_t *labels, T *d, int64_t n, int64_t k, float s, float off, float on)
{
   GRID_LOOP(i, n * k)
   {
      int64_t row = i / k, j = i % k;
      float v = s * (probs[i] - off);
      if (labels[row] == j) v -= s * on;
      st(d + i, v);
   }
}

/* One warp per row: the classes ranked before the label (higher score, or equal and a lower id);
 * each warp's lane 0 counts its rows' hits, the block sums them and adds them once (the counts
 * stay exact in f32 below 2^24). acc[0] and acc[3] by one thread. */
template <typename T>
__global__ void k_batch_metrics(const T *x, const int64_t *labels, const float *loss, float *acc, int64_t n, int64_t k)
{
   const int lane = threadIdx.x & 31;
   const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
   float h1 = 0, h5 = 0;
   for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < n; row += warps) {
      const int64_t y = labels[row];
      if (y < 0 || y >= k) continue; /* the same for the whole warp */
      const T *xr = x + row * k;
      const float sy = ld(xr + y);
      int above = 0;
      for (int64_t j = lane; j < k; j += 32) {
         const float v = ld(xr + j);
         above += nr_ranks_before(v, j, sy, y);
      }
      for (int o = 16; o > 0; o >>= 1) above += __shfl_down_sync(0xffffffffu, above, o);
      if (lane == 0) {
         h1 += above == 0;
         h5 += above < 5;
      }
   }
   __shared__ float s1[32], s5[32];
   const int warp = threadIdx.x >> 5;
   if (lane == 0) {
      s1[warp] = h1;
      s5[warp] = h5;
   }
   __syncthreads();
   if (threadIdx.x == 0) {
      float b1 = 0, b5 = 0;
      for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
         b1 += s1[w];
         b5 += s5[w];
      }
      if (b5 > 0) {
         atomicAdd(acc + 1, b1);
         atomicAdd(acc + 2, b5);
      }
   }
   if (blockIdx.x == 0 && threadIdx.x == 0) {
      if (loss) acc[0] += loss[0] * (float)n;
      acc[3] += (float)n;
   }
}

/* Checks labels on the device; one 8-byte read-back (this synchronises the stream). */
nr_status check_labels(nr_cuda_ctx *ctx, const char *func, const nr_tensor *labels, int64_t k)
{
   int64_t n = labels->shape[0];
   if (n == 0) return NR_OK;
   void *p;
   NR_TRY(nr_cuda_scratch(ctx, 2, 8, &p));
   unsigned long long *bad = (unsigned long long *)p, got = 0;
   NR_CU(cudaMemsetAsync(bad, 0xff, 8, ctx->stream), "%s: label check flag", func);
   k_label_check<<<grid_for(n), 256, 0, ctx->stream>>>((const int64_t *)labels->data, labels->stride[0], n, k, bad);
   NR_CU_LAUNCHED("%s: label check %s", func, NR_DESC(labels));
   NR_CU(cudaMemcpyAsync(&got, bad, 8, cudaMemcpyDeviceToHost, ctx->stream), "%s: label check flag", func);
   NR_CU(cudaStreamSynchronize(ctx->stream), "%s: label check", func);
   if (got == ~0ULL) return NR_OK;
   int64_t v = 0;
   NR_CU(cudaMemcpyAsync(&v, (const int64_t *)labels->data + labels->stride[0] * (int64_t)got, 8, cudaMemcpyDeviceToHost,
                         ctx->stream),
         "%s: reading label %llu", func, got);
   NR_CU(cudaStreamSynchronize(ctx->stream), "%s: reading a label", func);
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                     "labels[%llu] = %lld is outside 0..%lld (class ids are 0-based, %lld classes)", got, (long long)v,
                     (long long)(k - 1), (long long)k);
}

/* ---------------------------------------------------------------- SGD and NR primitives */

/* One element of the SGD update, in the CPU's order of operations (core/optim.c); nvcc may fuse
 * a multiply and an add into one FMA (its default), so a result can differ from the CPU's in
 * the last bit per step (cuda_spec compares within 1e-4, not bit for bit). */
__device__ __forceinline__ void sgd_elem(float *p, const float *g, float *b, int64_t i, float lr, float mu, float wd,
                                         int nesterov)
{
   float d = g[i];
   if (wd != 0.0f) d = d + wd * p[i];
   if (b) {
      float v = mu * b[i] + d;
      b[i] = v;
      d = nesterov ? d + mu * v : v;
   }
   p[i] = p[i] - lr * d;
}

__global__ void k_sgd(float *p, const float *g, float *b, int64_t n, float lr, float mu, float wd, int nesterov)
{
   GRID_LOOP(i, n) sgd_elem(p, g, b, i, lr, mu, wd, nesterov);
}

/* A piece of one parameter for the batched step: block k updates elements [begin, end) of its
 * chunk's tensors. */
struct sgd_chunk {
   float *p;
   const float *g;
   float *b;
   int64_t begin, end;
};
enum { SGD_CHUNK = 1 << 16 };

__global__ void k_sgd_many(const sgd_chunk *chunks, float lr, float mu, float wd, int nesterov)
{
   const sgd_chunk c = chunks[blockIdx.x];
   for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) sgd_elem(c.p, c.g, c.b, i, lr, mu, wd, nesterov);
}

/* Adam / AdamW: block k updates elements [begin, end) of its chunk's parameter, with that
 * parameter's step scalars (adam_coef.h); the same order of operations as core/optim.c. */
struct adam_chunk {
   float *p;
   const float *g;
   float *m, *v, *vmax; /* vmax: amsgrad's maximum, or NULL */
   int64_t begin, end;
   nr_adam_coef c;
};

__global__ void k_adam_many(const adam_chunk *chunks)
{
   const adam_chunk ch = chunks[blockIdx.x];
   const nr_adam_coef c = ch.c;
   for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
      float d = ch.g[i];
      float pi = ch.p[i];
      if (c.l2 != 0.0f) d = d + c.l2 * pi;
      pi = pi * c.decay;
      float mi = ch.m[i] * c.beta1 + d * c.one_minus_beta1;
      float vi = ch.v[i] * c.beta2 + c.one_minus_beta2 * d * d;
      ch.m[i] = mi;
      ch.v[i] = vi;
      if (ch.vmax) { /* amsgrad, as core/optim.c */
         const float mx = ch.vmax[i];
         vi = (vi > mx || vi != vi) ? vi : mx;
         ch.vmax[i] = vi;
      }
      ch.p[i] = pi + c.neg_step_size * (mi / (sqrtf(vi) / c.bc2_sqrt + c.eps));
   }
}

/* Gradient clipping (core/optim.c's nr_clip_grad_norm): block k reduces chunk k's sum of squares
 * (type 2) or largest |g| (type 0, a NaN wins) into part[k]; k_clip_finish (one block) combines
 * the parts in a fixed order into the total and the scale; k_clip_scale multiplies every chunk by
 * the scale, read on the device (nothing comes back to the host). */
struct clip_chunk {
   float *g;
   int64_t begin, end;
};

__device__ __forceinline__ double nan_max_of(double a, double b) { return (a != a) ? a : ((b != b || b > a) ? b : a); }

__global__ void k_clip_norm(const clip_chunk *chunks, double *part, int type)
{
   __shared__ double sh[256];
   const clip_chunk c = chunks[blockIdx.x];
   double v = 0;
   for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
      const double x = c.g[i];
      v = type == 2 ? v + x * x : nan_max_of(v, fabs(x));
   }
   v = type == 2 ? block_reduce(v, sh, sum_of) : block_reduce(v, sh, nan_max_of);
   if (threadIdx.x == 0) part[blockIdx.x] = v;
}

__global__ void k_clip_finish(const double *part, int64_t nparts, float *total, float *scale, double max_norm, int type)
{
   __shared__ double sh[256];
   double v = 0;
   for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) v = type == 2 ? v + part[i] : nan_max_of(v, part[i]);
   v = type == 2 ? block_reduce(v, sh, sum_of) : block_reduce(v, sh, nan_max_of);
   if (threadIdx.x == 0) {
      const float tot = (float)(type == 2 ? sqrt(v) : v);
      *total = tot;
      float coef = (1.0f / (tot + 1e-6f)) * (float)max_norm; /* PyTorch's expression, as the CPU */
      *scale = coef > 1.0f ? 1.0f : coef;
   }
}

__global__ void k_clip_scale(const clip_chunk *chunks, const float *scale)
{
   const clip_chunk c = chunks[blockIdx.x];
   const float k = *scale;
   if (k == 1.0f) return; /* (nothing to change: the usual step under a generous max_norm) */
   for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) c.g[i] *= k;
}

/* One block: max |gamma| ignoring NaN, then mask and live count into *live. */
__global__ void k_live_mask(const float *g, int64_t gs, uint8_t *m, int64_t ms, int64_t c, float rel, float abs_min,
                            long long *live)
{
   __shared__ float smax[256];
   __shared__ long long scount[256];
   float mx = 0.0f;
   for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
      float a = fabsf(g[i * gs]);
      if (a > mx) mx = a;
   }
   smax[threadIdx.x] = mx;
   __syncthreads();
   for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if ((int)threadIdx.x < s && smax[threadIdx.x + s] > smax[threadIdx.x]) smax[threadIdx.x] = smax[threadIdx.x + s];
      __syncthreads();
   }
   float gmax = smax[0];
   bool dead = c == 0 || gmax < abs_min || !isfinite(gmax);
   float thr = rel * gmax;
   long long cnt = 0;
   for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
      uint8_t on = dead ? 0 : (fabsf(g[i * gs]) >= thr);
      m[i * ms] = on;
      cnt += on;
   }
   scount[threadIdx.x] = cnt;
   __syncthreads();
   for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if ((int)threadIdx.x < s) scount[threadIdx.x] += scount[threadIdx.x + s];
      __syncthreads();
   }
   if (threadIdx.x == 0) *live = scount[0];
}

__global__ void k_l1_sign(const float *g, int64_t gs, float *d, int64_t ds, int64_t c, float lambda)
{
   GRID_LOOP(i, c)
   {
      float v = g[i * gs];
      d[i * ds] += v > 0.0f ? lambda : (v < 0.0f ? -lambda : 0.0f);
   }
}

/* NR-CA cross attention: out = a + 2 sigmoid(a) b (gate = sigmoid(a)); backward da, db. */
template <typename T> __global__ void k_ca_f(const T *a, const T *b, T *out, T *gate, int64_t n)
{
   GRID_LOOP(i, n)
   {
      float av = ld(a + i), s = 1.0f / (1.0f + expf(-av));
      float bv = ld(b + i);
      st(gate + i, s);
      st(out + i, av + 2.0f * s * bv);
   }
}
template <typename T> __global__ void k_ca_b(const T *gate, const T *b, const T *g, T *da, T *db, int64_t n)
{
   GRID_LOOP(i, n)
   {
      float s = ld(gate + i), gv = ld(g + i), bv = ld(b + i);
      st(da + i, gv * (1.0f + 2.0f * s * (1.0f - s) * bv));
      st(db + i, 2.0f * s * gv);
   }
}

nr_status bn_apply(nr_cuda_ctx *ctx, const char *func, const nr_tensor *x, nr_tensor *y, const float *mean,
                   const float *invstd, const nr_tensor *gamma, const nr_tensor *beta, int eval, float eps, int relu)
{
   chan3 g = chan_view(x);
   int64_t n = g.n * g.c * g.r;
   if (n == 0 || g.c == 0) return NR_OK;
   void *coef;
   NR_TRY(nr_cuda_scratch(ctx, 1, (int64_t)sizeof(float) * 3 * g.c, &coef));
   k_bn_coef<<<grid_for(g.c), 256, 0, ctx->stream>>>(g.c, mean, invstd, fp(gamma), fp(beta), eval, eps, (float *)coef);
   NR_CU_LAUNCHED("%s: coefficients %s", func, NR_DESC(x));
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_bn_affine<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), n, make_chandiv(g.c, g.r, n),
                                                           (const float *)coef, relu);
   });
   NR_CU_LAUNCHED("%s: normalising %s", func, NR_DESC(x));
   return NR_OK;
}

} // namespace

/* ================================================================ entry points (C linkage) */

/* The chunk table of a batched optimizer step: the n parameters (numel(k) elements each) cut into
 * chunks of SGD_CHUNK elements, one block each, fill(chunk, k, begin, end) describing each; the
 * table goes to scratch slot 3 through the pinned staging ring (no host wait for the queued
 * step). *count is 0 (and *dev untouched) when there is no element. */
template <typename Chunk, typename Numel, typename Fill>
static nr_status chunk_table(nr_cuda_ctx *ctx, int64_t n, Numel numel, Fill fill, const char *what, const Chunk **dev,
                             int64_t *count)
{
   int64_t nchunks = 0;
   for (int64_t k = 0; k < n; k++) nchunks += (numel(k) + SGD_CHUNK - 1) / SGD_CHUNK;
   *count = nchunks;
   if (nchunks == 0) return NR_OK;
   if (nchunks > INT32_MAX) return NR_FAIL(NR_E_ARG, "%lld parameter chunks exceed one launch", (long long)nchunks);
   Chunk *host = (Chunk *)malloc((size_t)nchunks * sizeof *host);
   if (!host) return NR_FAIL(NR_E_OOM, "out of host memory for %lld %s chunks", (long long)nchunks, what);
   int64_t c = 0;
   for (int64_t k = 0; k < n; k++) {
      const int64_t m = numel(k);
      for (int64_t at = 0; at < m; at += SGD_CHUNK, c++) fill(host[c], k, at, at + SGD_CHUNK < m ? at + SGD_CHUNK : m);
   }
   void *d = NULL;
   nr_status st = nr_cuda_scratch(ctx, 3, nchunks * (int64_t)sizeof *host, &d);
   if (st == NR_OK) st = nr_cuda_upload(ctx, d, host, nchunks * (int64_t)sizeof *host);
   free(host);
   NR_TRY(st);
   *dev = (const Chunk *)d;
   return NR_OK;
}

extern "C" {

/* ---- batch norm */

nr_status nr_cuda_bn2d_forward_train(const nr_tensor *x, nr_tensor *y, nr_tensor *save_mean, nr_tensor *save_invstd,
                                     const nr_tensor *gamma, const nr_tensor *beta, nr_tensor *running_mean,
                                     nr_tensor *running_var, float momentum, float eps, int32_t relu)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   chan3 g = chan_view(x);
   if (g.c == 0) return NR_OK;
   const double m = (double)(g.n * g.r);
   double *part;
   int S;
   NR_TRY(chan_reduce(ctx, __func__, x, NULL, NULL, NULL, g, RED_SUM_X, &part, &S));
   k_bn_mean<<<grid_for(g.c), 256, 0, ctx->stream>>>(part, S, g.c, m, fpm(save_mean));
   NR_CU_LAUNCHED("bn2d_forward_train mean %s", NR_DESC(x));
   NR_TRY(chan_reduce(ctx, __func__, x, NULL, NULL, fp(save_mean), g, RED_SQDEV, &part, &S));
   k_bn_var<<<grid_for(g.c), 256, 0, ctx->stream>>>(part, S, g.c, m, eps, momentum, fp(save_mean), fpm(save_invstd),
                                                   fpm(running_mean), fpm(running_var));
   NR_CU_LAUNCHED("bn2d_forward_train var %s", NR_DESC(x));
   return bn_apply(ctx, __func__, x, y, fp(save_mean), fp(save_invstd), gamma, beta, 0, eps, relu);
}

nr_status nr_cuda_bn2d_forward_eval(const nr_tensor *x, nr_tensor *y, const nr_tensor *gamma, const nr_tensor *beta,
                                    const nr_tensor *running_mean, const nr_tensor *running_var, float eps,
                                    int32_t relu)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   chan3 g = chan_view(x);
   int64_t n = g.n * g.c * g.r;
   if (n == 0) return NR_OK;
   /* eval = 1: the "invstd" argument is the running variance, turned into 1/sqrt(var + eps) */
   return bn_apply(ctx, __func__, x, y, fp(running_mean), fp(running_var), gamma, beta, 1, eps, relu);
}

nr_status nr_cuda_bn2d_backward(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx, nr_tensor *dgamma,
                                nr_tensor *dbeta, const nr_tensor *gamma, const nr_tensor *save_mean,
                                const nr_tensor *save_invstd, float scale, float acc, const nr_tensor *relu_y)
{
   return bn_backward_any(__func__, x, dy, dx, dgamma, dbeta, gamma, save_mean, save_invstd, NULL, 1.0f, scale, acc, 0,
                          relu_y);
}

nr_status nr_cuda_bn2d_backward_eval(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx, nr_tensor *dgamma,
                                     nr_tensor *dbeta, const nr_tensor *gamma, const nr_tensor *running_mean,
                                     const nr_tensor *running_var, float eps, float scale, float acc,
                                     const nr_tensor *relu_y)
{
   return bn_backward_any(__func__, x, dy, dx, dgamma, dbeta, gamma, running_mean, NULL, running_var, eps, scale, acc, 1,
                          relu_y);
}

/* ---- activations and dropout */

/* Launches kernel<T>(args..., n) over the n elements of activation ref, T its element type. */
#define ELEMWISE(kernel, ref, what, ...)                                                          \
   do {                                                                                         \
      nr_cuda_ctx *ctx;                                                                         \
      NR_TRY(nr_cuda_ctx_get((ref)->device_index, &ctx));                                       \
      int64_t n = nr_tensor_numel(ref);                                                         \
      if (n == 0) return NR_OK;                                                                 \
      with_act_type(ref, [&](auto tag) {                                                        \
         using T = decltype(tag);                                                               \
         kernel<T><<<grid_for(n), 256, 0, ctx->stream>>>(__VA_ARGS__, n);                       \
      });                                                                                       \
      NR_CU_LAUNCHED("%s %s", what, NR_DESC(ref));                                              \
      return NR_OK;                                                                             \
   } while (0)

nr_status nr_cuda_activation_forward(const nr_tensor *x, nr_tensor *y, int32_t kind, float alpha)
{
   ELEMWISE(k_act_f, x, "activation_forward", cptr<T>(x), mptr<T>(y), (int)kind, alpha);
}
nr_status nr_cuda_activation_backward(const nr_tensor *saved, const nr_tensor *dy, nr_tensor *dx, int32_t kind, float alpha)
{
   ELEMWISE(k_act_b, saved, "activation_backward", cptr<T>(saved), cptr<T>(dy), mptr<T>(dx), (int)kind, alpha);
}
nr_status nr_cuda_relu_forward(const nr_tensor *x, nr_tensor *y)
{
   ELEMWISE(k_relu_f, x, "relu_forward", cptr<T>(x), mptr<T>(y));
}
nr_status nr_cuda_relu_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx)
{
   ELEMWISE(k_relu_b, y, "relu_backward", cptr<T>(y), cptr<T>(dy), mptr<T>(dx));
}
nr_status nr_cuda_sigmoid_forward(const nr_tensor *x, nr_tensor *y)
{
   ELEMWISE(k_sigm_f, x, "sigmoid_forward", cptr<T>(x), mptr<T>(y));
}
nr_status nr_cuda_sigmoid_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx)
{
   ELEMWISE(k_sigm_b, y, "sigmoid_backward", cptr<T>(y), cptr<T>(dy), mptr<T>(dx));
}

nr_status nr_cuda_dropout_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *mask, float p)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   int64_t n = nr_tensor_numel(x);
   /* the mask comes from the global generator exactly as on the CPU (drawn on the host, staged) */
   if (p > 0.0f) NR_TRY_WRAP(nr_rng_bernoulli(mask, 1.0 - (double)p));
   if (n == 0) return NR_OK;
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_dropout_f<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), fpm(mask), n, 1.0f / (1.0f - p),
                                                           p == 0.0f);
   });
   NR_CU_LAUNCHED("dropout_forward %s", NR_DESC(x));
   return NR_OK;
}

nr_status nr_cuda_dropout_backward(const nr_tensor *dy, const nr_tensor *mask, nr_tensor *dx)
{
   ELEMWISE(k_mask_mul, dy, "dropout_backward", cptr<T>(dy), fp(mask), mptr<T>(dx));
}

/* ---- bias */

nr_status nr_cuda_bias_add(nr_tensor *y, const nr_tensor *b)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(y->device_index, &ctx));
   chan3 g = chan_view(y);
   int64_t n = g.n * g.c * g.r;
   if (n == 0) return NR_OK;
   with_act_type(y, [&](auto tag) {
      using T = decltype(tag);
      k_bias_add<T><<<grid_for(n), 256, 0, ctx->stream>>>(mptr<T>(y), fp(b), n, make_chandiv(g.c, g.r, n));
   });
   NR_CU_LAUNCHED("bias_add %s + %s", NR_DESC(y), NR_DESC(b));
   return NR_OK;
}

nr_status nr_cuda_bias_backward(const nr_tensor *dy, nr_tensor *db, float scale, float acc)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dy->device_index, &ctx));
   chan3 g = chan_view(dy);
   if (g.c == 0) return NR_OK;
   double *part;
   int S = 1;
   if (g.n * g.r > 0) NR_TRY(chan_reduce(ctx, __func__, dy, NULL, NULL, NULL, g, RED_SUM_X, &part, &S));
   else {
      void *p;
      NR_TRY(nr_cuda_scratch(ctx, 0, (int64_t)sizeof(double) * g.c, &p));
      part = (double *)p;
      NR_CU(cudaMemsetAsync(part, 0, sizeof(double) * g.c, ctx->stream), "bias_backward: zeroing sums");
   }
   k_bias_finish<<<grid_for(g.c), 256, 0, ctx->stream>>>(part, S, g.c, fpm(db), scale, acc);
   NR_CU_LAUNCHED("bias_backward %s", NR_DESC(dy));
   return NR_OK;
}

/* ---- pooling: one launcher per kernel, shared by the windowed and the adaptive entry points */

static nr_status maxpool_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices, pool p)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   int64_t n = p.nc * p.ho * p.wo;
   if (n == 0) return NR_OK;
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_maxpool_f<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), (int64_t *)indices->data, p);
   });
   NR_CU_LAUNCHED("maxpool2d_forward %s -> %s", NR_DESC(x), NR_DESC(y));
   return NR_OK;
}

static nr_status maxpool_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx, pool p)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dy->device_index, &ctx));
   const int64_t nx = nr_tensor_numel(dx);
   if (nx == 0) return NR_OK;
   with_act_type(dy, [&](auto tag) {
      using T = decltype(tag);
      k_maxpool_b<T><<<grid_for(nx), 256, 0, ctx->stream>>>(cptr<T>(dy), (const int64_t *)indices->data, mptr<T>(dx), p);
   });
   NR_CU_LAUNCHED("maxpool2d_backward %s -> %s", NR_DESC(dy), NR_DESC(dx));
   return NR_OK;
}

static nr_status avgpool_forward(const nr_tensor *x, nr_tensor *y, pool p, int32_t count_include_pad)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   int64_t n = p.nc * p.ho * p.wo;
   if (n == 0) return NR_OK;
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_avgpool_f<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), p, count_include_pad);
   });
   NR_CU_LAUNCHED("avgpool2d_forward %s -> %s", NR_DESC(x), NR_DESC(y));
   return NR_OK;
}

static nr_status avgpool_backward(const nr_tensor *dy, nr_tensor *dx, pool p, int32_t count_include_pad)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dy->device_index, &ctx));
   int64_t nx = nr_tensor_numel(dx);
   if (nx == 0) return NR_OK;
   with_act_type(dy, [&](auto tag) {
      using T = decltype(tag);
      k_avgpool_b<T><<<grid_for(nx), 256, 0, ctx->stream>>>(cptr<T>(dy), mptr<T>(dx), p, count_include_pad);
   });
   NR_CU_LAUNCHED("avgpool2d_backward %s -> %s", NR_DESC(dy), NR_DESC(dx));
   return NR_OK;
}

nr_status nr_cuda_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices, int32_t kernel_h,
                                    int32_t kernel_w, int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                    int32_t ceil_mode)
{
   return maxpool_forward(x, y, indices, make_pool(x, y, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w));
}

nr_status nr_cuda_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx, int32_t kernel_h,
                                     int32_t kernel_w, int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                     int32_t ceil_mode)
{
   return maxpool_backward(dy, indices, dx, make_pool(dx, dy, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w));
}

nr_status nr_cuda_avgpool2d_forward(const nr_tensor *x, nr_tensor *y, int32_t kernel_h, int32_t kernel_w,
                                    int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                    int32_t count_include_pad, int32_t ceil_mode)
{
   return avgpool_forward(x, y, make_pool(x, y, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w), count_include_pad);
}

nr_status nr_cuda_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx, int32_t kernel_h, int32_t kernel_w,
                                     int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                     int32_t count_include_pad, int32_t ceil_mode)
{
   return avgpool_backward(dy, dx, make_pool(dx, dy, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w),
                           count_include_pad);
}

nr_status nr_cuda_adaptive_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices)
{
   return maxpool_forward(x, y, indices, make_adaptive_pool(x, y));
}

nr_status nr_cuda_adaptive_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx)
{
   return maxpool_backward(dy, indices, dx, make_adaptive_pool(dx, dy));
}

nr_status nr_cuda_adaptive_avgpool2d_forward(const nr_tensor *x, nr_tensor *y)
{
   return avgpool_forward(x, y, make_adaptive_pool(x, y), 0);
}

nr_status nr_cuda_adaptive_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx)
{
   return avgpool_backward(dy, dx, make_adaptive_pool(dx, dy), 0);
}

nr_status nr_cuda_global_avgpool_forward(const nr_tensor *x, nr_tensor *y)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   int64_t nc = x->shape[0] * x->shape[1], hw = x->shape[2] * x->shape[3];
   if (hw == 0 && nc > 0) return NR_FAIL(NR_E_ARG, "x: empty spatial size");
   if (nc == 0) return NR_OK;
   const bool cl = nr_is_nhwc(x);
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      if (cl) k_gap_f_cl<T><<<grid_for(nc), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), nc, x->shape[1], hw);
      else k_gap_f<T><<<grid_for(nc * 32), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), nc, hw);
   });
   NR_CU_LAUNCHED("global_avgpool_forward %s", NR_DESC(x));
   return NR_OK;
}

nr_status nr_cuda_global_avgpool_backward(const nr_tensor *dy, nr_tensor *dx)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dy->device_index, &ctx));
   int64_t nc = dx->shape[0] * dx->shape[1], hw = dx->shape[2] * dx->shape[3];
   if (nc * hw == 0) return NR_OK;
   const bool cl = nr_is_nhwc(dx);
   with_act_type(dy, [&](auto tag) {
      using T = decltype(tag);
      if (cl) k_gap_b_cl<T><<<grid_for(nc * hw), 256, 0, ctx->stream>>>(cptr<T>(dy), mptr<T>(dx), nc, dx->shape[1], hw);
      else k_gap_b<T><<<grid_for(nc * hw), 256, 0, ctx->stream>>>(cptr<T>(dy), mptr<T>(dx), nc, hw);
   });
   NR_CU_LAUNCHED("global_avgpool_backward %s", NR_DESC(dx));
   return NR_OK;
}

/* ---- softmax cross-entropy */

nr_status nr_cuda_softmax_xent_forward(const nr_tensor *logits, const nr_tensor *labels, nr_tensor *loss,
                                       nr_tensor *probs, float label_smoothing)
{
   int32_t dev = logits->device_index;
   NR_TRY(nr_cuda_check_on(__func__, "labels", labels, dev));
   NR_TRY(nr_check_contiguous(__func__, "labels", labels));
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   int64_t n = logits->shape[0], k = logits->shape[1];
   if (labels->shape[0] != n)
      return NR_FAIL(NR_E_ARG, "labels %s do not match logits %s", NR_DESC(labels), NR_DESC(logits));
   void *rl;
   NR_TRY(nr_cuda_scratch(ctx, 1, (int64_t)sizeof(double) * (n > 0 ? n : 1), &rl));
   if (n > 0) {
      with_act_type(logits, [&](auto tag) {
         using T = decltype(tag);
         k_xent_f<T><<<(unsigned)(n < 65535 * 16 ? n : 65535 * 16), 256, 0, ctx->stream>>>(
             cptr<T>(logits), (const int64_t *)labels->data, fpm(probs), (double *)rl, n, k, (double)label_smoothing);
      });
      NR_CU_LAUNCHED("softmax_xent_forward %s", NR_DESC(logits));
   }
   k_xent_mean<<<1, 256, 0, ctx->stream>>>((const double *)rl, n, fpm(loss));
   NR_CU_LAUNCHED("softmax_xent_forward mean %s", NR_DESC(logits));
   return NR_OK;
}

/* ---- softmax over the last dimension */

static inline unsigned softmax_grid(int64_t rows) { return (unsigned)(rows < 65535 * 16 ? rows : 65535 * 16); }

nr_status nr_cuda_softmax_forward(const nr_tensor *x, nr_tensor *y, int32_t log_softmax)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   const int64_t k = x->shape[x->ndim - 1], rows = k > 0 ? nr_tensor_numel(x) / k : 0;
   if (rows == 0) return NR_OK;
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_softmax_f<T><<<softmax_grid(rows), 256, 0, ctx->stream>>>(cptr<T>(x), mptr<T>(y), rows, k, log_softmax != 0);
   });
   NR_CU_LAUNCHED("softmax_forward %s", NR_DESC(x));
   return NR_OK;
}

nr_status nr_cuda_softmax_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx, int32_t log_softmax)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(y->device_index, &ctx));
   const int64_t k = y->shape[y->ndim - 1], rows = k > 0 ? nr_tensor_numel(y) / k : 0;
   if (rows == 0) return NR_OK;
   with_act_type(y, [&](auto tag) {
      using T = decltype(tag);
      k_softmax_b<T><<<softmax_grid(rows), 256, 0, ctx->stream>>>(cptr<T>(y), cptr<T>(dy), mptr<T>(dx), rows, k,
                                                                 log_softmax != 0);
   });
   NR_CU_LAUNCHED("softmax_backward %s", NR_DESC(y));
   return NR_OK;
}

nr_status nr_cuda_softmax_xent_backward(const nr_tensor *probs, const nr_tensor *labels, nr_tensor *dlogits,
                                        float label_smoothing, float scale)
{
   int32_t dev = probs->device_index;
   NR_TRY(nr_cuda_check_on(__func__, "labels", labels, dev));
   NR_TRY(nr_check_contiguous(__func__, "labels", labels));
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   int64_t n = probs->shape[0], k = probs->shape[1];
   if (labels->shape[0] != n)
      return NR_FAIL(NR_E_ARG, "labels %s do not match probs %s", NR_DESC(labels), NR_DESC(probs));
   if (n == 0 || k == 0) return NR_OK;
   float s = scale / (float)n, off = label_smoothing / (float)k, on = 1.0f - label_smoothing;
   with_act_type(dlogits, [&](auto tag) {
      using T = decltype(tag);
      k_xent_b<T><<<grid_for(n * k), 256, 0, ctx->stream>>>(fp(probs), (const int64_t *)labels->data, mptr<T>(dlogits), n,
                                                            k, s, off, on);
   });
   NR_CU_LAUNCHED("softmax_xent_backward %s", NR_DESC(probs));
   return NR_OK;
}

nr_status nr_cuda_check_class_ids(const char *func, const nr_tensor *labels, int64_t num_classes)
{
   nr_cuda_ctx *ctx; /* any stride, as the CPU check */
   NR_TRY(nr_cuda_ctx_get(labels->device_index, &ctx));
   return check_labels(ctx, func, labels, num_classes);
}

nr_status nr_cuda_batch_metrics_add(const nr_tensor *logits, const nr_tensor *labels, const nr_tensor *loss,
                                    nr_tensor *acc)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(logits->device_index, &ctx));
   const int64_t n = logits->shape[0], k = logits->shape[1];
   const int64_t want = (n * 32 + 255) / 256;
   const unsigned blocks = (unsigned)(want < 1 ? 1 : want < 1024 ? want : 1024);
   with_act_type(logits, [&](auto tag) {
      using T = decltype(tag);
      k_batch_metrics<T><<<blocks, 256, 0, ctx->stream>>>(cptr<T>(logits), (const int64_t *)labels->data,
                                                          loss ? fp(loss) : nullptr, fpm(acc), n, k);
   });
   NR_CU_LAUNCHED("batch_metrics_add %s", NR_DESC(logits));
   return NR_OK;
}

/* ---- NR-CA cross attention */

nr_status nr_cuda_cross_attention_forward(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, nr_tensor *gate)
{
   ELEMWISE(k_ca_f, a, "cross_attention_forward", cptr<T>(a), cptr<T>(b), mptr<T>(out), mptr<T>(gate));
}

nr_status nr_cuda_cross_attention_backward(const nr_tensor *gate, const nr_tensor *b, const nr_tensor *g, nr_tensor *da,
                                           nr_tensor *db)
{
   ELEMWISE(k_ca_b, g, "cross_attention_backward", cptr<T>(gate), cptr<T>(b), cptr<T>(g), mptr<T>(da), mptr<T>(db));
}

/* ---- SGD */

nr_status nr_cuda_sgd_step(nr_tensor *param, const nr_tensor *grad, nr_tensor *momentum_buf, float lr, float momentum,
                           float weight_decay, int32_t nesterov)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(param->device_index, &ctx));
   int64_t n = nr_tensor_numel(param);
   if (n == 0) return NR_OK;
   k_sgd<<<grid_for(n), 256, 0, ctx->stream>>>(fpm(param), fp(grad), momentum != 0.0f ? fpm(momentum_buf) : NULL, n, lr,
                                               momentum, weight_decay, nesterov != 0);
   NR_CU_LAUNCHED("sgd_step %s", NR_DESC(param));
   return NR_OK;
}

nr_status nr_cuda_sgd_step_many(const nr_sgd_job *jobs, int64_t n, float lr, float momentum, float weight_decay,
                                int32_t nesterov)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(jobs[0].param->device_index, &ctx));
   const sgd_chunk *dev = NULL;
   int64_t nchunks = 0;
   NR_TRY(chunk_table(
       ctx, n, [&](int64_t k) { return nr_tensor_numel(jobs[k].param); },
       [&](sgd_chunk &ch, int64_t k, int64_t begin, int64_t end) {
          ch.p = fpm(jobs[k].param);
          ch.g = fp(jobs[k].grad);
          ch.b = momentum != 0.0f ? fpm(jobs[k].momentum_buf) : NULL;
          ch.begin = begin;
          ch.end = end;
       },
       "SGD", &dev, &nchunks));
   if (nchunks == 0) return NR_OK;
   k_sgd_many<<<(unsigned)nchunks, 256, 0, ctx->stream>>>(dev, lr, momentum, weight_decay, nesterov != 0);
   NR_CU_LAUNCHED("sgd_step_many over %lld parameters", (long long)n);
   return NR_OK;
}

nr_status nr_cuda_adam_step_many(const nr_adam_job *jobs, int64_t n, double lr, double beta1, double beta2, double eps,
                                 double weight_decay, int32_t decoupled)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(jobs[0].param->device_index, &ctx));
   const adam_chunk *dev = NULL;
   int64_t nchunks = 0;
   NR_TRY(chunk_table(
       ctx, n, [&](int64_t k) { return nr_tensor_numel(jobs[k].param); },
       [&](adam_chunk &ch, int64_t k, int64_t begin, int64_t end) {
          const nr_adam_job *j = &jobs[k];
          ch.p = fpm(j->param);
          ch.g = fp(j->grad);
          ch.m = fpm(j->exp_avg);
          ch.v = fpm(j->exp_avg_sq);
          ch.vmax = j->max_exp_avg_sq ? fpm(j->max_exp_avg_sq) : NULL;
          ch.begin = begin;
          ch.end = end;
          ch.c = nr_adam_coef_of(j->step, lr, beta1, beta2, eps, weight_decay, decoupled);
       },
       "Adam", &dev, &nchunks));
   if (nchunks == 0) return NR_OK;
   k_adam_many<<<(unsigned)nchunks, 256, 0, ctx->stream>>>(dev);
   NR_CU_LAUNCHED("adam_step_many over %lld parameters", (long long)n);
   return NR_OK;
}

nr_status nr_cuda_clip_grad_norm(nr_tensor *const *grads, int64_t n, nr_tensor *total, double max_norm,
                                 int32_t norm_type)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(total->device_index, &ctx));
   const clip_chunk *dev = NULL;
   int64_t nchunks = 0;
   NR_TRY(chunk_table(
       ctx, n, [&](int64_t k) { return nr_tensor_numel(grads[k]); },
       [&](clip_chunk &ch, int64_t k, int64_t begin, int64_t end) {
          ch.g = fpm(grads[k]);
          ch.begin = begin;
          ch.end = end;
       },
       "gradient", &dev, &nchunks));
   void *scr;
   NR_TRY(nr_cuda_scratch(ctx, 1, (int64_t)sizeof(double) * (nchunks + 1), &scr));
   double *part = (double *)scr;
   float *scale = (float *)(part + nchunks);
   if (nchunks > 0) k_clip_norm<<<(unsigned)nchunks, 256, 0, ctx->stream>>>(dev, part, norm_type);
   k_clip_finish<<<1, 256, 0, ctx->stream>>>(part, nchunks, fpm(total), scale, max_norm, norm_type);
   if (nchunks > 0) k_clip_scale<<<(unsigned)nchunks, 256, 0, ctx->stream>>>(dev, scale);
   NR_CU_LAUNCHED("clip_grad_norm over %lld gradients", (long long)n);
   return NR_OK;
}

/* ---- NR primitives */

nr_status nr_cuda_bn_live_mask(const nr_tensor *gamma, nr_tensor *mask, float threshold_rel, float abs_min, int64_t *live)
{
   NR_CHECK_T("gamma", gamma, NR_F32, NR_CUDA, 1, NULL);
   int64_t c = gamma->shape[0];
   int64_t ms[1] = {c};
   NR_CHECK_T("mask", mask, NR_U8, NR_CUDA, 1, ms);
   NR_TRY(nr_cuda_check_on(__func__, "mask", mask, gamma->device_index));
   if (!(threshold_rel >= 0.0f) || !(abs_min >= 0.0f))
      return NR_FAIL(NR_E_ARG, "threshold_rel (%g) and abs_min (%g) must be >= 0", (double)threshold_rel, (double)abs_min);
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(gamma->device_index, &ctx));
   void *p;
   NR_TRY(nr_cuda_scratch(ctx, 2, 8, &p));
   k_live_mask<<<1, 256, 0, ctx->stream>>>(fp(gamma), gamma->stride[0], (uint8_t *)mask->data, mask->stride[0], c,
                                           threshold_rel, abs_min, (long long *)p);
   NR_CU_LAUNCHED("bn_live_mask %s", NR_DESC(gamma));
   if (live) {
      long long v = 0;
      NR_CU(cudaMemcpyAsync(&v, p, 8, cudaMemcpyDeviceToHost, ctx->stream), "bn_live_mask: reading the live count");
      NR_CU(cudaStreamSynchronize(ctx->stream), "bn_live_mask %s", NR_DESC(gamma));
      *live = (int64_t)v;
   }
   return NR_OK;
}

nr_status nr_cuda_l1_sign_add(const nr_tensor *gamma, nr_tensor *grad, float lambda)
{
   NR_CHECK_T("gamma", gamma, NR_F32, NR_CUDA, 1, NULL);
   int64_t gs[1] = {gamma->shape[0]};
   NR_CHECK_T("grad", grad, NR_F32, NR_CUDA, 1, gs);
   NR_TRY(nr_cuda_check_on(__func__, "grad", grad, gamma->device_index));
   if (lambda == 0.0f || gs[0] == 0) return NR_OK;
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(gamma->device_index, &ctx));
   k_l1_sign<<<grid_for(gs[0]), 256, 0, ctx->stream>>>(fp(gamma), gamma->stride[0], fpm(grad), grad->stride[0], gs[0], lambda);
   NR_CU_LAUNCHED("l1_sign_add %s", NR_DESC(gamma));
   return NR_OK;
}

} // extern "C"

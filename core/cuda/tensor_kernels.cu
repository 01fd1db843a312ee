/* tensor_kernels.cu — CUDA kernels of the general tensor operations: strided copies with dtype
 * conversion, fill, elementwise binary/scalar/unary ops, axpy, reductions, argmax, index
 * select/copy; the math kernels take f32 or bf16 operands (kernel_util.cuh).
 *
 * What it is: the GPU side of core/tensor.c and core/math.c. Arguments were checked by the CPU
 * entry points (shapes, dtypes, same device) before dispatch; index_select/copy and argmax check
 * their own (their CPU checks are CPU-only).
 * What it is not: layer kernels (nn_kernels.cu) or cuBLAS/cuDNN calls (blas.c, conv.c).
 * Invariants: every kernel runs on the tensor's device's compute stream; strided operands are
 * addressed in row-major element order exactly like nr_linear_offset; sums accumulate in double
 * (as the CPU); nothing here synchronises except index checks on GPU-resident indices, which read
 * one flag back.
 */
#include "kernel_util.cuh"

#include <cuda_runtime.h>
#include <math.h>

namespace {

struct geo {
   int32_t nd;
   int32_t contig;
   int64_t shape[8];
   int64_t stride[8];
};

geo make_geo(const nr_tensor *t)
{
   geo g;
   g.nd = t->ndim;
   g.contig = nr_tensor_is_contiguous(t);
   for (int d = 0; d < 8; d++) {
      g.shape[d] = d < t->ndim ? t->shape[d] : 1;
      g.stride[d] = d < t->ndim ? t->stride[d] : 0;
   }
   return g;
}

/* a and b store their elements in one dense order (both contiguous, or both channels-last of one
 * shape), so elementwise kernels may index both by the flat position. */
bool same_dense_order(const nr_tensor *a, const nr_tensor *b)
{
   if (nr_tensor_is_contiguous(a) && nr_tensor_is_contiguous(b)) return true;
   if (!nr_tensor_is_channels_last(a) || !nr_tensor_is_channels_last(b)) return false;
   for (int d = 0; d < 4; d++)
      if (a->shape[d] != b->shape[d]) return false;
   return true;
}
/* Marks both geometries flat when same_dense_order(a, b). */
void flat_if_same_order(geo &ga, const nr_tensor *a, geo &gb, const nr_tensor *b)
{
   if (same_dense_order(a, b)) ga.contig = gb.contig = 1;
}

__device__ __forceinline__ int64_t goff(const geo &g, int64_t i)
{
   if (g.contig) return i;
   int64_t off = 0;
   for (int d = g.nd - 1; d >= 0; d--) {
      int64_t n = g.shape[d];
      off += (i % n) * g.stride[d];
      i /= n;
   }
   return off;
}

/* ---------------------------------------------------------------- copy, set, fill */

/* Conversions as the CPU's (core/tensor.c store_double / store_i64): into int64, NaN and values
 * outside int64 give INT64_MIN; into uint8, the int64 value wraps mod 256; from int64, one
 * rounding (not through a double, which rounds twice past 2^53). */
template <typename T> __device__ __forceinline__ double to_d(T v) { return (double)v; }
template <typename T> __device__ __forceinline__ T from_d(double v) { return (T)v; }
template <> __device__ __forceinline__ double to_d<bf16>(bf16 v) { return (double)__bfloat162float(v); }
template <> __device__ __forceinline__ bf16 from_d<bf16>(double v) { return __float2bfloat16_rn((float)v); }
template <> __device__ __forceinline__ int64_t from_d<int64_t>(double v)
{
   return v >= -0x1p63 && v < 0x1p63 ? (int64_t)v : INT64_MIN;
}
template <> __device__ __forceinline__ uint8_t from_d<uint8_t>(double v) { return (uint8_t)(uint64_t)from_d<int64_t>(v); }

template <typename TD, typename TS> __device__ __forceinline__ TD convert(TS v) { return from_d<TD>(to_d<TS>(v)); }
template <> __device__ __forceinline__ float convert<float, int64_t>(int64_t v) { return (float)v; }
template <> __device__ __forceinline__ bf16 convert<bf16, int64_t>(int64_t v) { return __float2bfloat16_rn((float)v); }
template <> __device__ __forceinline__ uint8_t convert<uint8_t, int64_t>(int64_t v) { return (uint8_t)(uint64_t)v; }
template <> __device__ __forceinline__ int64_t convert<int64_t, int64_t>(int64_t v) { return v; }

template <typename TD, typename TS>
__global__ void k_copy(TD *dst, geo gd, const TS *src, geo gs, int64_t n)
{
   GRID_LOOP(i, n) dst[goff(gd, i)] = convert<TD, TS>(src[goff(gs, i)]);
}

template <typename TD>
nr_status launch_copy_to(nr_cuda_ctx *ctx, nr_tensor *dst, const nr_tensor *src, int64_t n)
{
   geo gd = make_geo(dst), gs = make_geo(src);
   flat_if_same_order(gd, dst, gs, src);
   unsigned grid = grid_for(n);
   switch (src->dtype) {
   case NR_F32: k_copy<TD, float><<<grid, 256, 0, ctx->stream>>>((TD *)dst->data, gd, (const float *)src->data, gs, n); break;
   case NR_I64: k_copy<TD, int64_t><<<grid, 256, 0, ctx->stream>>>((TD *)dst->data, gd, (const int64_t *)src->data, gs, n); break;
   case NR_BF16: k_copy<TD, bf16><<<grid, 256, 0, ctx->stream>>>((TD *)dst->data, gd, (const bf16 *)src->data, gs, n); break;
   default: k_copy<TD, uint8_t><<<grid, 256, 0, ctx->stream>>>((TD *)dst->data, gd, (const uint8_t *)src->data, gs, n); break;
   }
   NR_CU_LAUNCHED("copy %s -> %s", NR_DESC(src), NR_DESC(dst));
   return NR_OK;
}

template <typename T> __global__ void k_set_one(T *p, double v) { *p = from_d<T>(v); }

template <typename T> __global__ void k_fill(T *p, geo g, int64_t n, double value)
{
   const T v = from_d<T>(value);
   GRID_LOOP(i, n) p[goff(g, i)] = v;
}

/* ---------------------------------------------------------------- elementwise math */

__device__ __forceinline__ float bin(float x, float y, int op)
{
   switch (op) {
   case NR_OP_ADD: return x + y;
   case NR_OP_SUB: return x - y;
   case NR_OP_MUL: return x * y;
   case NR_OP_DIV: return x / y;
   /* a NaN on either side propagates (torch.maximum / minimum), as math.c */
   case NR_OP_MAX: return x > y || x != x ? x : y;
   default: return x < y || x != x ? x : y;
   }
}

__device__ __forceinline__ float un(float x, int op)
{
   switch (op) {
   case NR_OP_NEG: return -x;
   case NR_OP_ABS: return fabsf(x);
   case NR_OP_EXP: return expf(x);
   case NR_OP_LOG: return logf(x);
   case NR_OP_SQRT: return sqrtf(x);
   case NR_OP_SIGN: return (float)((x > 0) - (x < 0));
   case NR_OP_RELU: return relu_of(x);
   case NR_OP_SIGMOID: return 1.0f / (1.0f + expf(-x));
   case NR_OP_TANH: return tanhf(x);
   default: return x * x;
   }
}

/* Elementwise kernels: T is the operands' element type (f32 or bf16), math in f32. */
template <typename T>
__global__ void k_binary(const T *a, geo ga, const T *b, geo gb, T *o, geo go, int64_t n, int op)
{
   GRID_LOOP(i, n) st(o + goff(go, i), bin(ld(a + goff(ga, i)), ld(b + goff(gb, i)), op));
}

template <typename T>
__global__ void k_binary_contig(const T *a, const T *b, T *o, int64_t n, int op) /* o may be a or b */
{
   GRID_LOOP(i, n) st(o + i, bin(ld(a + i), ld(b + i), op));
}

template <typename T>
__global__ void k_binary_scalar(const T *a, geo ga, float s, T *o, geo go, int64_t n, int op)
{
   GRID_LOOP(i, n) st(o + goff(go, i), bin(ld(a + goff(ga, i)), s, op));
}

template <typename T> __global__ void k_unary(const T *a, geo ga, T *o, geo go, int64_t n, int op)
{
   GRID_LOOP(i, n) st(o + goff(go, i), un(ld(a + goff(ga, i)), op));
}

template <typename T> __global__ void k_axpy(const T *x, geo gx, T *y, geo gy, int64_t n, float alpha)
{
   GRID_LOOP(i, n)
   {
      T *p = y + goff(gy, i);
      st(p, ld(p) + alpha * ld(x + goff(gx, i)));
   }
}

template <typename T> __global__ void k_acc(float *dst, geo gd, const T *src, geo gs, int64_t n, float scale, float acc)
{
   GRID_LOOP(i, n)
   {
      float *d = dst + goff(gd, i);
      *d = (acc == 0.0f ? 0.0f : acc * *d) + scale * ld(src + goff(gs, i));
   }
}

/* ---------------------------------------------------------------- reductions */

__device__ __forceinline__ double red_init(int op)
{
   return op == NR_RED_MAX ? -INFINITY : op == NR_RED_MIN ? INFINITY : 0.0;
}
/* max/min: a NaN wins and stays (PyTorch), in any combination order */
__device__ __forceinline__ double red_step(double acc, double v, int op)
{
   if (op == NR_RED_MAX) return v > acc || v != v ? v : acc;
   if (op == NR_RED_MIN) return v < acc || v != v ? v : acc;
   return acc + v;
}

/* One block per output element (outer x inner), threads stride over the reduced length. */
template <typename T>
__global__ void k_reduce_block(const T *a, geo ga, T *out, int64_t outer, int64_t len, int64_t inner, int op)
{
   __shared__ double sh[256];
   for (int64_t oi = blockIdx.x; oi < outer * inner; oi += gridDim.x) {
      int64_t o = oi / inner, in = oi % inner;
      double acc = red_init(op);
      for (int64_t k = threadIdx.x; k < len; k += blockDim.x)
         acc = red_step(acc, (double)ld(a + goff(ga, (o * len + k) * inner + in)), op);
      sh[threadIdx.x] = acc;
      __syncthreads();
      for (int s = blockDim.x / 2; s > 0; s >>= 1) {
         if ((int)threadIdx.x < s) sh[threadIdx.x] = red_step(sh[threadIdx.x], sh[threadIdx.x + s], op);
         __syncthreads();
      }
      if (threadIdx.x == 0) {
         double r = sh[0];
         if (op == NR_RED_MEAN) r = len ? r / (double)len : NAN;
         st(out + oi, (float)r);
      }
      __syncthreads();
   }
}

/* One thread per output element (short reduced lengths, many outputs). */
template <typename T>
__global__ void k_reduce_thread(const T *a, geo ga, T *out, int64_t outer, int64_t len, int64_t inner, int op)
{
   GRID_LOOP(oi, outer * inner)
   {
      int64_t o = oi / inner, in = oi % inner;
      double acc = red_init(op);
      for (int64_t k = 0; k < len; k++) acc = red_step(acc, (double)ld(a + goff(ga, (o * len + k) * inner + in)), op);
      if (op == NR_RED_MEAN) acc = len ? acc / (double)len : NAN;
      st(out + oi, (float)acc);
   }
}

/* (v2, i2) beats (v1, i1) for argmax: a NaN is the maximum (PyTorch), ties and NaNs go to the
 * lower position, i < 0 marks "no element". */
__device__ __forceinline__ bool argmax_better(float v2, int64_t i2, float v1, int64_t i1)
{
   if (i2 < 0) return false;
   if (i1 < 0) return true;
   const bool n1 = v1 != v1, n2 = v2 != v2;
   if (n1 || n2) return n2 && (!n1 || i2 < i1);
   return v2 > v1 || (v2 == v1 && i2 < i1);
}

/* argmax: the first maximum, or the first NaN when there is one (as the CPU loop). */
template <typename T>
__global__ void k_argmax(const T *a, geo ga, int64_t *out, int64_t outer, int64_t len, int64_t inner)
{
   __shared__ float sv[256];
   __shared__ int64_t si[256];
   for (int64_t oi = blockIdx.x; oi < outer * inner; oi += gridDim.x) {
      int64_t o = oi / inner, in = oi % inner;
      float bv = 0.0f;
      int64_t bi = -1;
      for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
         float v = ld(a + goff(ga, (o * len + k) * inner + in));
         if (argmax_better(v, k, bv, bi)) {
            bv = v;
            bi = k;
         }
      }
      sv[threadIdx.x] = bv;
      si[threadIdx.x] = bi;
      __syncthreads();
      for (int s = blockDim.x / 2; s > 0; s >>= 1) {
         if ((int)threadIdx.x < s && argmax_better(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
            sv[threadIdx.x] = sv[threadIdx.x + s];
            si[threadIdx.x] = si[threadIdx.x + s];
         }
         __syncthreads();
      }
      if (threadIdx.x == 0) out[oi] = si[0] < 0 ? 0 : si[0];
      __syncthreads();
   }
}

/* ---------------------------------------------------------------- index select / copy */

__global__ void k_index_check(const int64_t *ix, int64_t k, int64_t limit, unsigned long long *bad)
{
   GRID_LOOP(i, k) if (ix[i] < 0 || ix[i] >= limit) atomicMin(bad, (unsigned long long)i);
}

/* out[(o, i, r)] = src[(o, ix[i], r)] (select) or dst[(o, ix[i], r)] = src[(o, i, r)] (copy), in
 * the operands' element order (row-major or channels-last: nr_index_geometry). */
template <typename T>
__global__ void k_index(const T *src, T *dst, const int64_t *ix, int64_t outer, int64_t k, int64_t s, int64_t inner, int copy)
{
   GRID_LOOP(j, outer * k * inner)
   {
      int64_t r = j % inner, t = j / inner, i = t % k, o = t / k;
      if (!copy) dst[j] = src[(o * s + ix[i]) * inner + r];
      else dst[(o * s + ix[i]) * inner + r] = src[j];
   }
}

nr_status index_op(const char *func, nr_tensor *big, int32_t dim, const nr_tensor *index, nr_tensor *small, int copy)
{
   int32_t dev = big->device_index;
   NR_TRY(nr_cuda_check_on(func, copy ? "src" : "out", small, dev));
   int64_t outer, inner, s;
   NR_TRY(nr_index_geometry(func, big, dim, index, small, &outer, &s, &inner));
   if (index->device == NR_CUDA && index->device_index != dev)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "index is on cuda:%d, tensors on cuda:%d", index->device_index, dev);
   const int64_t k = index->shape[0];
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   if (k == 0) return NR_OK;
   /* scratch layout: [0, 8) the "first bad position" flag, then a device copy of a host index */
   void *scr;
   NR_TRY(nr_cuda_scratch(ctx, 3, 8 + k * 8, &scr));
   unsigned long long *bad = (unsigned long long *)scr;
   const int64_t *ix;
   if (index->device == NR_CPU) {
      const int64_t *h = (const int64_t *)index->data;
      for (int64_t i = 0; i < k; i++)
         if (h[i] < 0 || h[i] >= s)
            return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "index %lld out of range 0..%lld (position %lld)",
                              (long long)h[i], (long long)s - 1, (long long)i);
      int64_t *dix = (int64_t *)((char *)scr + 8);
      NR_TRY(nr_cuda_upload(ctx, dix, h, k * 8));
      ix = dix;
   } else {
      ix = (const int64_t *)index->data;
      unsigned long long got = 0;
      NR_CU(cudaMemsetAsync(bad, 0xff, 8, ctx->stream), "index check flag"); /* ~0: no bad position */
      k_index_check<<<grid_for(k), 256, 0, ctx->stream>>>(ix, k, s, bad);
      NR_CU_LAUNCHED("index check");
      NR_CU(cudaMemcpyAsync(&got, bad, 8, cudaMemcpyDeviceToHost, ctx->stream), "index check flag");
      NR_CU(cudaStreamSynchronize(ctx->stream), "index check");
      if (got != ~0ULL) {
         int64_t v = 0;
         NR_CU(cudaMemcpy(&v, ix + got, 8, cudaMemcpyDeviceToHost), "reading the bad index");
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "index %lld out of range 0..%lld (position %llu)",
                           (long long)v, (long long)s - 1, got);
      }
   }
   int64_t n = outer * k * inner;
   unsigned grid = grid_for(n);
   const void *sp = copy ? small->data : big->data;
   void *dp = copy ? big->data : small->data;
   switch (nr_dtype_size(big->dtype)) {
   case 4: k_index<float><<<grid, 256, 0, ctx->stream>>>((const float *)sp, (float *)dp, ix, outer, k, s, inner, copy); break;
   case 2: k_index<uint16_t><<<grid, 256, 0, ctx->stream>>>((const uint16_t *)sp, (uint16_t *)dp, ix, outer, k, s, inner, copy); break;
   case 8: k_index<int64_t><<<grid, 256, 0, ctx->stream>>>((const int64_t *)sp, (int64_t *)dp, ix, outer, k, s, inner, copy); break;
   default: k_index<uint8_t><<<grid, 256, 0, ctx->stream>>>((const uint8_t *)sp, (uint8_t *)dp, ix, outer, k, s, inner, copy); break;
   }
   NR_CU_LAUNCHED("%s %s dim %d", copy ? "index_copy" : "index_select", NR_DESC(big), dim);
   return NR_OK;
}

/* ---------------------------------------------------------------- images (data loading) */

struct affine4 {
   float scale[4], bias[4];
};

/* dst (dense, NCHW or NHWC: i runs in dst's memory order, so writes coalesce) <- src (NCHW
 * bytes) * scale[c] + bias[c], rounded after the multiply and after the add (as the CPU's
 * bytes_to_f32), so both give the same bits. */
template <typename TD>
__global__ void k_images_normalize(const uint8_t *src, TD *dst, int64_t n, int64_t C, int64_t hw, int nhwc, affine4 a)
{
   GRID_LOOP(i, n) {
      int64_t c, s = i;
      if (nhwc) {
         const int64_t px = i / C;
         c = i % C;
         s = (px / hw * C + c) * hw + px % hw;
      } else {
         c = (i / hw) % C;
      }
      st(dst + i, __fadd_rn(__fmul_rn((float)src[s], a.scale[c]), a.bias[c])); /* unfused, as the CPU */
   }
}

} // namespace

/* ================================================================ entry points (C linkage) */

extern "C" {

nr_status nr_cuda_launch_copy(nr_cuda_ctx *ctx, nr_tensor *dst, const nr_tensor *src)
{
   int64_t n = nr_tensor_numel(src);
   if (n == 0) return NR_OK;
   if (dst->dtype == src->dtype && same_dense_order(dst, src)) {
      if (dst->data != src->data)
         NR_CU(cudaMemcpyAsync(dst->data, src->data, (size_t)(n * nr_dtype_size(src->dtype)), cudaMemcpyDeviceToDevice,
                               ctx->stream),
               "copy %s -> %s", NR_DESC(src), NR_DESC(dst));
      return NR_OK;
   }
   switch (dst->dtype) {
   case NR_F32: return launch_copy_to<float>(ctx, dst, src, n);
   case NR_I64: return launch_copy_to<int64_t>(ctx, dst, src, n);
   case NR_BF16: return launch_copy_to<bf16>(ctx, dst, src, n);
   default: return launch_copy_to<uint8_t>(ctx, dst, src, n);
   }
}

nr_status nr_cuda_launch_acc(nr_cuda_ctx *ctx, nr_tensor *dst, const nr_tensor *src, float scale, float acc)
{
   int64_t n = nr_tensor_numel(dst);
   if (n == 0) return NR_OK;
   geo gd = make_geo(dst), gs = make_geo(src);
   flat_if_same_order(gd, dst, gs, src);
   with_act_type(src, [&](auto tag) {
      using T = decltype(tag);
      k_acc<T><<<grid_for(n), 256, 0, ctx->stream>>>(mptr<float>(dst), gd, cptr<T>(src), gs, n, scale, acc);
   });
   NR_CU_LAUNCHED("accumulating %s into %s", NR_DESC(src), NR_DESC(dst));
   return NR_OK;
}

nr_status nr_cuda_launch_set_one(nr_cuda_ctx *ctx, nr_tensor *t, int64_t off, double value)
{
   switch (t->dtype) {
   case NR_F32: k_set_one<float><<<1, 1, 0, ctx->stream>>>((float *)t->data + off, value); break;
   case NR_I64: k_set_one<int64_t><<<1, 1, 0, ctx->stream>>>((int64_t *)t->data + off, value); break;
   case NR_BF16: k_set_one<bf16><<<1, 1, 0, ctx->stream>>>((bf16 *)t->data + off, value); break;
   default: k_set_one<uint8_t><<<1, 1, 0, ctx->stream>>>((uint8_t *)t->data + off, value); break;
   }
   NR_CU_LAUNCHED("set element %lld of %s", (long long)off, NR_DESC(t));
   return NR_OK;
}

nr_status nr_cuda_fill(nr_tensor *t, double value)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(t->device_index, &ctx));
   int64_t n = nr_tensor_numel(t);
   if (n == 0) return NR_OK;
   if (value == 0.0 && !signbit(value) && (nr_tensor_is_contiguous(t) || nr_tensor_is_channels_last(t))) { /* dense; -0.0 keeps its sign */
      NR_CU(cudaMemsetAsync(t->data, 0, (size_t)(n * nr_dtype_size(t->dtype)), ctx->stream), "fill %s with 0", NR_DESC(t));
      return NR_OK;
   }
   geo g = make_geo(t);
   unsigned grid = grid_for(n);
   switch (t->dtype) {
   case NR_F32: k_fill<float><<<grid, 256, 0, ctx->stream>>>((float *)t->data, g, n, value); break;
   case NR_I64: k_fill<int64_t><<<grid, 256, 0, ctx->stream>>>((int64_t *)t->data, g, n, value); break;
   case NR_BF16: k_fill<bf16><<<grid, 256, 0, ctx->stream>>>((bf16 *)t->data, g, n, value); break;
   default: k_fill<uint8_t><<<grid, 256, 0, ctx->stream>>>((uint8_t *)t->data, g, n, value); break;
   }
   NR_CU_LAUNCHED("fill %s with %g", NR_DESC(t), value);
   return NR_OK;
}

nr_status nr_cuda_binary(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(a->device_index, &ctx));
   int64_t n = nr_tensor_numel(a);
   if (n == 0) return NR_OK;
   bool same = a->ndim == b->ndim;
   for (int d = 0; same && d < a->ndim; d++) same = a->shape[d] == b->shape[d];
   if (same && same_dense_order(a, b) && same_dense_order(a, out)) {
      with_act_type(a, [&](auto tag) {
         using T = decltype(tag);
         k_binary_contig<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(a), cptr<T>(b), mptr<T>(out), n, op);
      });
      NR_CU_LAUNCHED("binary op %d %s, %s", op, NR_DESC(a), NR_DESC(b));
      return NR_OK;
   }
   /* b as a view with a's shape: broadcast dims (size 1) and a one-element b get stride 0 */
   geo ga = make_geo(a), go = make_geo(out), gb = ga;
   gb.contig = same && nr_tensor_is_contiguous(b);
   for (int d = 0; d < 8; d++) {
      bool real = same || (b->ndim == a->ndim && d < b->ndim && b->shape[d] == a->shape[d] && nr_tensor_numel(b) != 1);
      gb.stride[d] = (d < a->ndim && real) ? b->stride[d] : 0;
   }
   with_act_type(a, [&](auto tag) {
      using T = decltype(tag);
      k_binary<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(a), ga, cptr<T>(b), gb, mptr<T>(out), go, n, op);
   });
   NR_CU_LAUNCHED("binary op %d %s, %s -> %s", op, NR_DESC(a), NR_DESC(b), NR_DESC(out));
   return NR_OK;
}

nr_status nr_cuda_binary_scalar(const nr_tensor *a, double s, nr_tensor *out, int32_t op)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(a->device_index, &ctx));
   int64_t n = nr_tensor_numel(a);
   if (n == 0) return NR_OK;
   geo ga = make_geo(a), go = make_geo(out);
   flat_if_same_order(ga, a, go, out);
   with_act_type(a, [&](auto tag) {
      using T = decltype(tag);
      k_binary_scalar<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(a), ga, (float)s, mptr<T>(out), go, n, op);
   });
   NR_CU_LAUNCHED("binary op %d %s with %g", op, NR_DESC(a), s);
   return NR_OK;
}

nr_status nr_cuda_unary(const nr_tensor *a, nr_tensor *out, int32_t op)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(a->device_index, &ctx));
   int64_t n = nr_tensor_numel(a);
   if (n == 0) return NR_OK;
   geo ga = make_geo(a), go = make_geo(out);
   flat_if_same_order(ga, a, go, out);
   with_act_type(a, [&](auto tag) {
      using T = decltype(tag);
      k_unary<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(a), ga, mptr<T>(out), go, n, op);
   });
   NR_CU_LAUNCHED("unary op %d %s", op, NR_DESC(a));
   return NR_OK;
}

nr_status nr_cuda_axpy(const nr_tensor *x, nr_tensor *y, double alpha)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(x->device_index, &ctx));
   int64_t n = nr_tensor_numel(x);
   if (n == 0) return NR_OK;
   geo gx = make_geo(x), gy = make_geo(y);
   flat_if_same_order(gx, x, gy, y);
   with_act_type(x, [&](auto tag) {
      using T = decltype(tag);
      k_axpy<T><<<grid_for(n), 256, 0, ctx->stream>>>(cptr<T>(x), gx, mptr<T>(y), gy, n, (float)alpha);
   });
   NR_CU_LAUNCHED("axpy %s into %s", NR_DESC(x), NR_DESC(y));
   return NR_OK;
}

static void split(const nr_tensor *a, int32_t dim, int64_t *outer, int64_t *len, int64_t *inner)
{
   *outer = 1;
   *inner = 1;
   *len = nr_tensor_numel(a);
   if (dim >= 0) {
      *len = a->shape[dim];
      for (int d = 0; d < dim; d++) *outer *= a->shape[d];
      for (int d = dim + 1; d < a->ndim; d++) *inner *= a->shape[d];
   }
}

nr_status nr_cuda_reduce(const nr_tensor *a, int32_t dim, nr_tensor *out, int32_t op)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(a->device_index, &ctx));
   int64_t outer, len, inner;
   split(a, dim, &outer, &len, &inner);
   if ((op == NR_RED_MAX || op == NR_RED_MIN) && len == 0) return NR_FAIL(NR_E_ARG, "max/min of an empty dimension");
   int64_t nout = outer * inner;
   if (nout == 0) return NR_OK;
   geo ga = make_geo(a);
   with_act_type(a, [&](auto tag) {
      using T = decltype(tag);
      if (len <= 64 && nout >= 4096)
         k_reduce_thread<T><<<grid_for(nout), 256, 0, ctx->stream>>>(cptr<T>(a), ga, mptr<T>(out), outer, len, inner, op);
      else
         k_reduce_block<T><<<(unsigned)(nout < 65535 * 16 ? nout : 65535 * 16), 256, 0, ctx->stream>>>(
             cptr<T>(a), ga, mptr<T>(out), outer, len, inner, op);
   });
   NR_CU_LAUNCHED("reduce op %d of %s over dim %d", op, NR_DESC(a), dim);
   return NR_OK;
}

nr_status nr_cuda_argmax(const nr_tensor *a, int32_t dim, nr_tensor *out)
{
   NR_TRY(nr_cuda_check_on(__func__, "out", out, a->device_index));
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(a->device_index, &ctx));
   int64_t outer, len, inner;
   split(a, dim, &outer, &len, &inner);
   if (len == 0) return NR_FAIL(NR_E_ARG, "argmax of an empty dimension");
   int64_t nout = outer * inner;
   if (nout == 0) return NR_OK;
   with_act_type(a, [&](auto tag) {
      using T = decltype(tag);
      k_argmax<T><<<(unsigned)(nout < 65535 * 16 ? nout : 65535 * 16), 256, 0, ctx->stream>>>(
          cptr<T>(a), make_geo(a), (int64_t *)out->data, outer, len, inner);
   });
   NR_CU_LAUNCHED("argmax of %s over dim %d", NR_DESC(a), dim);
   return NR_OK;
}

nr_status nr_cuda_index_select(const nr_tensor *src, int32_t dim, const nr_tensor *index, nr_tensor *out)
{
   return index_op(__func__, (nr_tensor *)src, dim, index, out, 0);
}

nr_status nr_cuda_index_copy(nr_tensor *dst, int32_t dim, const nr_tensor *index, const nr_tensor *src)
{
   return index_op(__func__, dst, dim, index, (nr_tensor *)src, 1);
}

nr_status nr_cuda_images_normalize(const nr_tensor *src, const float *scale, const float *bias, nr_tensor *dst)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(src->device_index, &ctx));
   const int64_t n = nr_tensor_numel(src), C = src->shape[1], hw = src->shape[2] * src->shape[3];
   if (n == 0) return NR_OK;
   affine4 a;
   for (int c = 0; c < 4; c++) {
      a.scale[c] = c < C ? scale[c] : 0.0f;
      a.bias[c] = c < C ? bias[c] : 0.0f;
   }
   const int nhwc = !nr_tensor_is_contiguous(dst);
   with_act_type(dst, [&](auto tag) {
      using T = decltype(tag);
      k_images_normalize<T><<<grid_for(n), 256, 0, ctx->stream>>>((const uint8_t *)src->data, mptr<T>(dst), n, C, hw,
                                                                   nhwc, a);
   });
   NR_CU_LAUNCHED("normalize images %s -> %s", NR_DESC(src), NR_DESC(dst));
   return NR_OK;
}

} // extern "C"

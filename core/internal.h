/* internal.h — helpers shared by the C files in core/; not part of the FFI contract.
 *
 * Error reporting: NR_FAIL(code, fmt, ...) records "function: message (file:line)" in the
 * thread-local error buffer and evaluates to code, so kernels write `return NR_FAIL(...)`.
 * Argument checks: nr_check_tensor() validates dtype, device, ndim and (optionally) shape and
 * names the argument in its message, e.g. "weight: expected f32 (64, 3, 3, 3), got f32 (64, 3)".
 */
#ifndef NR_INTERNAL_H
#define NR_INTERNAL_H

#include "nr.h"
#include <stdarg.h>
#include <stdbool.h>

nr_status nr_fail_at(nr_status code, const char *func, const char *file, int line,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
#define NR_FAIL(code, ...) nr_fail_at((code), __func__, __FILE__, __LINE__, __VA_ARGS__)
#define NR_TRY(expr)                                                                            \
   do {                                                                                         \
      nr_status nr_try_status_ = (expr);                                                        \
      if (nr_try_status_ != NR_OK) return nr_try_status_;                                       \
   } while (0)
/* Rewrites the current error so it names the calling function too (outer: inner message). */
nr_status nr_fail_wrap(nr_status code, const char *func);
#define NR_TRY_WRAP(expr)                                                                       \
   do {                                                                                         \
      nr_status nr_try_status_ = (expr);                                                        \
      if (nr_try_status_ != NR_OK) return nr_fail_wrap(nr_try_status_, __func__);              \
   } while (0)

/* "f32 cpu (2, 3, 4)" into buf (always NUL-terminated). */
const char *nr_tensor_describe(const nr_tensor *t, char *buf, size_t n);
const char *nr_dtype_name(int32_t dtype);

/* The dtype argument of nr_check_tensor for an activation (x, y, dy, dx, logits, operands of the
 * tensor math): f32 anywhere, or bf16 on CUDA (mixed precision computes on the GPU only). */
enum { NR_DTYPE_ACT = -2 };

/* Tensors and views hold at most 2^40 elements, and no dimension is larger, even where another
 * is 0 (core/tensor.c checks both; the .npy reader names a larger header size with its file). */
#define NR_MAX_NUMEL (INT64_C(1) << 40)

/* Checks a tensor argument. ndim < 0: any; shape == NULL: any shape; a shape entry < 0: any.
 * dtype -1: any, NR_DTYPE_ACT: an activation; device < 0: any. name is used in the message. */
nr_status nr_check_tensor(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                          int32_t device, int32_t ndim, const int64_t *shape);
#define NR_CHECK_T(name, t, dtype, device, ndim, shape)                                        \
   NR_TRY(nr_check_tensor(__func__, name, t, dtype, device, ndim, shape))
/* Checks that two tensors sit on the same device. */
nr_status nr_check_same_device(const char *func, const nr_tensor *a, const nr_tensor *b);
/* Checks a is contiguous (kernels that need it say so in nr.h). */
nr_status nr_check_contiguous(const char *func, const char *name, const nr_tensor *t);
#define NR_CHECK_CONTIG(name, t) NR_TRY(nr_check_contiguous(__func__, name, t))

/* t is channels-last and not also contiguous: the kernels' NHWC case. A tensor that is both
 * (sizes of 1, e.g. (N, C, 1, 1)) has one element order, so either indexing reads it right. */
static inline int nr_is_nhwc(const nr_tensor *t)
{
   return t->ndim == 4 && !nr_tensor_is_contiguous(t) && nr_tensor_is_channels_last(t);
}

/* Rewrites the strides of a dense 4-d t (a fresh tensor or a scratch view) to the channels-last
 * ones of its shape: KRSC for a weight, NHWC for an activation. */
static inline void nr_make_channels_last(nr_tensor *t)
{
   const int64_t c = t->shape[1], h = t->shape[2], w = t->shape[3];
   t->stride[1] = 1;
   t->stride[3] = c;
   t->stride[2] = w * c;
   t->stride[0] = h * w * c;
}

/* Checks that b has a's dtype (activations of one call share theirs). */
nr_status nr_check_same_dtype(const char *func, const char *an, const nr_tensor *a, const char *bn,
                              const nr_tensor *b);

/* bfloat16 <-> f32: round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t nr_f32_to_bf16(float f)
{
   union { float f; uint32_t u; } v = {f};
   if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
   return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline float nr_bf16_to_f32(uint16_t h)
{
   union { uint32_t u; float f; } v = {(uint32_t)h << 16};
   return v.f;
}

/* Checks index_select / index_copy arguments (big: the indexed tensor, small: the k-row one; index
 * int64 (k), contiguous, on any device) and splits the element order around dim: outer x len x
 * inner, len = big's size on dim. The order is row-major when both are contiguous, or the
 * channels-last one (memory dims N, H, W, C) when both are channels-last; anything else is
 * refused. Index values are not checked. */
nr_status nr_index_geometry(const char *func, const nr_tensor *big, int32_t dim, const nr_tensor *index,
                            const nr_tensor *small, int64_t *outer, int64_t *len, int64_t *inner);

/* Element offset (in elements, from t->data) of the i-th element in row-major order. */
static inline int64_t nr_linear_offset(const nr_tensor *t, int64_t i)
{
   int64_t off = 0;
   for (int d = t->ndim - 1; d >= 0; d--) {
      int64_t n = t->shape[d];
      off += (i % n) * t->stride[d];
      i /= n;
   }
   return off;
}

/* nr_tensor_new on a given GPU (device_index; ignored on the CPU) instead of the current one. */
nr_tensor *nr_tensor_new_at(int32_t dtype, int32_t device, int32_t device_index, int32_t ndim, const int64_t *shape);

/* NR_E_ARG naming func, both tensors and their roles when out and in are non-empty views of one
 * storage whose byte spans intersect: for ops that write out while still reading in (matmul,
 * index select/copy), where overlap would silently give wrong values. */
/* Elementwise ops (out[i] = f(in[i], ...)): the input to read, *src. out's elements must not share
 * memory; out may be in itself (the same view: in place); two dense views that overlap otherwise
 * are refused (as PyTorch); strided views whose memory ranges meet are read through a copy
 * (*tmp, the caller frees it). */
nr_status nr_elementwise_source(const char *func, const char *out_name, const nr_tensor *out, const char *in_name,
                                const nr_tensor *in, const nr_tensor **src, nr_tensor **tmp);
nr_status nr_check_no_overlap(const char *func, const char *out_name, const nr_tensor *out, const char *in_name,
                              const nr_tensor *in);

/* Storage allocation with accounting (core/tensor.c). */
void *nr_mem_alloc(int32_t device, int32_t device_index, int64_t bytes);
void nr_mem_free(int32_t device, int32_t device_index, void *ptr, int64_t bytes);

/* OpenMP helpers: true when a loop of n iterations of `work` flops is worth threading. */
static inline bool nr_parallel_worth(int64_t n, int64_t work) { return n > 1 && n * work > 32768; }

/* Hot loops compiled for AVX2 + FMA (x86-64-v3) and for the baseline target, the right one picked
 * for this CPU when the library loads (GCC target_clones). Put it on a function without OpenMP
 * pragmas that spawn threads (a parallel region's body is outlined and not cloned): the
 * per-plane kernels that a parallel loop calls. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NR_NO_SIMD_CLONES)
#define NR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NR_SIMD_CLONES
#endif

/* Row-major sgemm, C = alpha * op(A) op(B) + beta * C (op: transpose when ta / tb), on one
 * thread pool (core/gemm.c): split over OpenMP threads when called outside a parallel region and
 * large enough, one thread inside one; OpenBLAS stays single-threaded; narrow products on an own
 * kernel. */
enum { NR_SGEMM_NARROW_COLS = 64 }; /* narrow: !tb, n <= this and a multiple of 8 */
void nr_sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
              const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
int nr_threads(void);

/* Backend dispatch: NR_ON_CUDA(t, nr_cuda_xxx(...)) returns the CUDA implementation's status
 * when t lives on a GPU, and a clear error when the library was built without CUDA. The CUDA
 * side declares its nr_cuda_* entry points in core/cuda/cuda_internal.h. */
#ifdef NR_WITH_CUDA
#include "cuda/cuda_internal.h"
#define NR_ON_CUDA(t, call)                                                                     \
   do {                                                                                         \
      if ((t)->device == NR_CUDA) return (call);                                                \
   } while (0)
#else
#define NR_ON_CUDA(t, call)                                                                     \
   do {                                                                                         \
      if ((t)->device == NR_CUDA) return NR_FAIL(NR_E_DEVICE, "this nrlua was built without CUDA"); \
   } while (0)
#endif

#endif

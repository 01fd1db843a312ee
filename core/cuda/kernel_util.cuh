/* kernel_util.cuh — device-side helpers shared by the .cu files of the CUDA backend.
 *
 * What it is: the launch-size rule (grid_for, GRID_LOOP), the activation element types (f32 and
 * bf16) with their load/store conversions, and with_act_type(), which runs a generic host lambda
 * with the element type of an activation tensor (one kernel template serves both precisions).
 * What it is not: host runtime helpers (cuda_common.h).
 * Invariants: bf16 elements are loaded to f32, computed in f32 and rounded to nearest even when
 * stored, so a bf16 kernel equals its f32 twin on bf16-rounded inputs up to the final rounding.
 */
#ifndef NR_CUDA_KERNEL_UTIL_CUH
#define NR_CUDA_KERNEL_UTIL_CUH

#include "cuda_common.h"

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

/* Blocks for n elements at `threads` per block, capped (GRID_LOOP strides over the rest). */
inline unsigned grid_for(int64_t n, int threads = 256)
{
   int64_t b = (n + threads - 1) / threads;
   if (b > 65535LL * 16) b = 65535LL * 16;
   return (unsigned)(b < 1 ? 1 : b);
}

#define GRID_LOOP(i, n)                                                                           \
   for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* Activation element <-> f32. */
__device__ __forceinline__ float ld(const float *p) { return *p; }
__device__ __forceinline__ float ld(const bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float *p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* ReLU as the CPU's nn_relu (core/nn_internal.h) and PyTorch's: 0 for v <= 0, v otherwise, so a
 * NaN stays NaN. The one expression of every CUDA ReLU (k_relu_f, the fused BN + ReLU, Tensor:relu). */
__device__ __forceinline__ float relu_of(float v) { return v <= 0.0f ? 0.0f : v; }

/* Runs f(T{}) with T = float or bf16, the element type of activation tensor t, and returns what f
 * returns. Callers launch inside and check the launch after it (__func__ inside a lambda would
 * name the lambda):  with_act_type(x, [&](auto tag) { using T = decltype(tag); k<T><<<...>>>(...); });
 *                    NR_CU_LAUNCHED(...); */
template <typename F> inline auto with_act_type(const nr_tensor *t, F &&f)
{
   if (t->dtype == NR_BF16) return f(bf16());
   return f(float());
}

template <typename T> inline const T *cptr(const nr_tensor *t) { return t ? (const T *)t->data : NULL; }
template <typename T> inline T *mptr(nr_tensor *t) { return t ? (T *)t->data : NULL; }

#endif

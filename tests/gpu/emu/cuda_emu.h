/* cuda_emu.h — the CUDA device language for the emulator: force-included (-include) when a .cu
 * file of core/cuda/ is compiled as C++ by the host compiler (after rewrite_launch.cmake turned
 * each `k<<<grid, block, shmem, stream>>>(args)` into `nr_emu::Launch("k", grid, block, shmem,
 * stream).run(k, args)`).
 *
 * What it is: the execution-space keywords (empty), __shared__ (a static: blocks run one after
 * another, so all threads of the running block see one copy), the built-in indices (globals the
 * scheduler sets before it resumes a thread), __syncthreads and __shfl_down_sync (barriers across
 * the block or the warp, each CUDA thread being a fiber), the atomics (plain read-modify-write:
 * fibers switch only at barriers) and the few intrinsics the backend uses.
 * What it is not: a model of the GPU's floating-point contraction (nvcc fuses a * b + c into FMAs;
 * the host compiler may not), of its memory model or of warp divergence: a warp's lanes meet only
 * at the shuffles.
 * Invariants: kernel arguments are copied per thread, as CUDA passes them by value; a launch
 * with a bad configuration runs nothing and sets the error cudaGetLastError returns.
 */
#ifndef NR_CUDA_EMU_H
#define NR_CUDA_EMU_H

#ifndef __cplusplus
#error "cuda_emu.h is for .cu files compiled as C++"
#endif

#include <cuda_runtime.h> /* before the macros below: it declares names they replace */
#include <cuda_bf16.h>

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace nr_emu {
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

/* Barrier of the running block; every live thread must reach it. */
void sync_block();
/* Lane exchange of the running warp: each participating lane gives v and gets the v of lane
 * (its lane + delta) when that lies in its width-sized segment, else its own. */
uint64_t shfl_down(unsigned mask, uint64_t v, unsigned delta, int width);

/* Runs thread_main(arg) for every thread of every block of the grid (nothing when the
 * configuration is invalid: the error is recorded for cudaGetLastError). */
void run_grid(const char *kernel, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
              void (*thread_main)(void *), void *arg);

class Launch {
 public:
   Launch(const char *kernel, dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = 0)
      : kernel_(kernel), grid_(grid), block_(block), shmem_(shmem), stream_(stream)
   {
   }
   /* The kernel's parameters are converted from the arguments once, as a call would, and each
    * thread gets its own copy of them. */
   template <typename... P, typename... A> void run(void (*k)(P...), A &&...args)
   {
      static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
      std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
      struct Call {
         void (*k)(P...);
         const std::tuple<std::decay_t<P>...> *params;
         static void thread_main(void *v)
         {
            const Call *c = (const Call *)v;
            std::tuple<std::decay_t<P>...> mine(*c->params);
            std::apply(c->k, mine);
         }
      } call{k, &params};
      run_grid(kernel_, grid_, block_, shmem_, stream_, &Call::thread_main, &call);
   }

 private:
   const char *kernel_;
   dim3 grid_, block_;
   size_t shmem_;
   cudaStream_t stream_;
};
} // namespace nr_emu

#define threadIdx (::nr_emu::thread_idx)
#define blockIdx (::nr_emu::block_idx)
#define blockDim (::nr_emu::block_dim)
#define gridDim (::nr_emu::grid_dim)
#define warpSize 32

inline void __syncthreads() { nr_emu::sync_block(); }

template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
   static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "__shfl_down_sync: 8-byte values at most");
   uint64_t in = 0;
   memcpy(&in, &v, sizeof v);
   const uint64_t out = nr_emu::shfl_down(mask, in, delta, width);
   T r;
   memcpy(&r, &out, sizeof r);
   return r;
}

template <typename T> inline T atomicAdd(T *p, T v)
{
   const T old = *p;
   *p = old + v;
   return old;
}
template <typename T> inline T atomicMin(T *p, T v)
{
   const T old = *p;
   if (v < old) *p = v;
   return old;
}
template <typename T> inline T atomicMax(T *p, T v)
{
   const T old = *p;
   if (v > old) *p = v;
   return old;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
/* Round-to-nearest products and sums that the device compiler may not contract into an FMA. */
inline float __fmul_rn(float a, float b)
{
   volatile float r = a * b;
   return r;
}
inline float __fadd_rn(float a, float b)
{
   volatile float r = a + b;
   return r;
}

#endif

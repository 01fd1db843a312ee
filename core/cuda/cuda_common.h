/* cuda_common.h — helpers shared by the files of the CUDA backend (core/cuda/: the .c and .cu files).
 *
 * What it is: the per-device context (compute stream, cuBLAS and cuDNN handles, scratch), the
 * status-checking macros that turn every CUDA / cuBLAS / cuDNN error into
 * NR_FAIL(NR_E_DEVICE, "<op> <shapes>: <library message>"), and the launchers that runtime.c
 * (plain C) calls in tensor_kernels.cu.
 * What it is not: public API (core/nr.h) or the entry points the core C files call (cuda_internal.h).
 * Invariants: all device work of a GPU goes to its one compute stream, so a block returned to
 * the caching allocator may be reused by later work without synchronisation; one host thread at
 * a time issues a GPU's work (nrlua's Lua thread: the loader threads never touch the device), as
 * the context's scratch buffers, cuBLAS / cuDNN handles and a convolution plan's descriptors
 * (whose math type is set per call) are shared without locks; the format
 * arguments of the checking macros are evaluated only on failure, so describing shapes there
 * costs nothing on the hot path.
 */
#ifndef NR_CUDA_COMMON_H
#define NR_CUDA_COMMON_H

#ifdef __cplusplus
extern "C" {
#endif
#include "../internal.h"
#ifdef __cplusplus
}
#endif

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { NR_CUDA_MAX_DEVICES = 16, NR_CUDA_SCRATCH_SLOTS = 6 };
/* Scratch slots: 0 per-channel partial sums, 1 per-channel coefficients / per-row losses,
 * 2 flags and counts read back, 3 index copies, 4 cuDNN workspace, 5 operands converted for
 * mixed precision (bf16 weights, bf16 weight gradients: weight-sized, so small). */

typedef struct nr_cuda_ctx {
   int32_t device;
   cudaStream_t stream;
   cublasHandle_t blas;
   cudnnHandle_t dnn;
   int32_t sm_count;
   void *scratch[NR_CUDA_SCRATCH_SLOTS];        /* grow-only, from the caching allocator */
   int64_t scratch_bytes[NR_CUDA_SCRATCH_SLOTS];
} nr_cuda_ctx;

/* The context of a GPU, created on first use; makes that GPU current for the calling thread's
 * CUDA runtime (the user's current device for new tensors is kept separately). */
nr_status nr_cuda_ctx_get(int32_t device_index, nr_cuda_ctx **out);
/* A device buffer of at least bytes in slot (0..NR_CUDA_SCRATCH_SLOTS-1); contents unspecified;
 * valid until the next call for the same slot. */
nr_status nr_cuda_scratch(nr_cuda_ctx *ctx, int slot, int64_t bytes, void **out);
/* Host bytes -> device, in order on the compute stream, through the pinned staging ring: returns
 * once src may be changed or freed (without the host wait a pageable cudaMemcpyAsync may add:
 * the driver can synchronise with the stream before staging pageable memory). */
nr_status nr_cuda_upload(nr_cuda_ctx *ctx, void *dst, const void *src, int64_t bytes);
/* 1 when cuDNN convolutions and cuBLAS matmuls may use TF32 tensor cores (nr_cuda_set_allow_tf32). */
int32_t nr_cuda_tf32_allowed(void);

/* Failure helpers: format "<what>: <library message>" and record it as NR_E_DEVICE. */
nr_status nr_cuda_fail_rt(cudaError_t e, const char *func, const char *file, int line,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));
nr_status nr_cuda_fail_blas(cublasStatus_t e, const char *func, const char *file, int line,
                            const char *fmt, ...) __attribute__((format(printf, 5, 6)));
nr_status nr_cuda_fail_dnn(cudnnStatus_t e, const char *func, const char *file, int line,
                           const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define NR_CU(expr, ...)                                                                        \
   do {                                                                                         \
      cudaError_t nr_cu_e_ = (expr);                                                            \
      if (nr_cu_e_ != cudaSuccess)                                                              \
         return nr_cuda_fail_rt(nr_cu_e_, __func__, __FILE__, __LINE__, __VA_ARGS__);           \
   } while (0)
#define NR_CUBLAS(expr, ...)                                                                    \
   do {                                                                                         \
      cublasStatus_t nr_cb_e_ = (expr);                                                         \
      if (nr_cb_e_ != CUBLAS_STATUS_SUCCESS)                                                    \
         return nr_cuda_fail_blas(nr_cb_e_, __func__, __FILE__, __LINE__, __VA_ARGS__);         \
   } while (0)
#define NR_CUDNN(expr, ...)                                                                     \
   do {                                                                                         \
      cudnnStatus_t nr_dn_e_ = (expr);                                                          \
      if (nr_dn_e_ != CUDNN_STATUS_SUCCESS)                                                     \
         return nr_cuda_fail_dnn(nr_dn_e_, __func__, __FILE__, __LINE__, __VA_ARGS__);          \
   } while (0)
/* After a kernel launch: reports launch errors (bad configuration, earlier asynchronous faults). */
#define NR_CU_LAUNCHED(...) NR_CU(cudaGetLastError(), __VA_ARGS__)

/* Shape description for failure messages, e.g. "f32 cuda (2, 3)": a thread-local ring of 8
 * buffers, so up to 8 may appear in one message. */
const char *nr_cuda_desc(const nr_tensor *t);
#define NR_DESC(t) nr_cuda_desc(t)

/* Checks that t is on a GPU, on device dev; name is used in the message. */
nr_status nr_cuda_check_on(const char *func, const char *name, const nr_tensor *t, int32_t dev);

/* t converted to dtype: t itself (*out = *t) when it has that dtype already, else a contiguous
 * copy in scratch slot `slot` (valid until that slot is used again). Used for the f32 master
 * weights of a bf16 convolution or matmul. */
nr_status nr_cuda_as_dtype(nr_cuda_ctx *ctx, const nr_tensor *t, int32_t dtype, int slot, nr_tensor *out);
/* dst <- acc * dst + scale * src elementwise (acc == 0 ignores old contents): equal shapes, any
 * strides; dst f32, src f32 or bf16 (a bf16 or KRSC weight gradient folded into its f32 master
 * gradient). */
nr_status nr_cuda_launch_acc(nr_cuda_ctx *ctx, nr_tensor *dst, const nr_tensor *src, float scale, float acc);

/* ---- launchers in tensor_kernels.cu used by runtime.c */
/* dst <- src elementwise in row-major order (equal numel), any strides and dtypes, same GPU. */
nr_status nr_cuda_launch_copy(nr_cuda_ctx *ctx, nr_tensor *dst, const nr_tensor *src);
/* One element at offset off (elements from t->data) <- value converted to t's dtype. */
nr_status nr_cuda_launch_set_one(nr_cuda_ctx *ctx, nr_tensor *t, int64_t off, double value);

#ifdef __cplusplus
}
#endif
#endif

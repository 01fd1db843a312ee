/* blas.c — nr_cuda_matmul: row-major GEMM on cuBLAS.
 *
 * What it is: out (M, N) = alpha * op(a) @ op(b) + beta * out for row-major operands with
 * contiguous rows. cuBLAS is column-major, and a row-major (R, C) matrix with row stride ld is
 * the column-major (C, R) matrix with leading dimension ld, so we compute
 * out^T = op(b)^T @ op(a)^T: cublasGemmEx(opB, opA, N, M, K, b, a, out).
 * What it is not: batched or mixed-precision GEMM.
 * Invariants: fp32 accumulation; TF32 only when nr_cuda_set_allow_tf32(1); beta = 0 never reads
 * out (cuBLAS semantics), matching the CPU kernel's sgemm.
 */
#include "cuda_common.h"

nr_status nr_cuda_matmul(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t trans_a,
                         int32_t trans_b, float alpha, float beta)
{
   int32_t dev = a->device_index;
   NR_TRY(nr_cuda_check_on(__func__, "b", b, dev));
   NR_TRY(nr_cuda_check_on(__func__, "out", out, dev));
   int64_t m = out->shape[0], n = out->shape[1], k = trans_a ? a->shape[0] : a->shape[1];
   if (m == 0 || n == 0) return NR_OK;
   int64_t lda = a->shape[0] > 1 ? a->stride[0] : a->shape[1];
   int64_t ldb = b->shape[0] > 1 ? b->stride[0] : b->shape[1];
   int64_t ldc = out->shape[0] > 1 ? out->stride[0] : out->shape[1];
   if (lda < 1) lda = 1;
   if (ldb < 1) ldb = 1;
   if (ldc < 1) ldc = 1;
   if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX || ldc > INT32_MAX)
      return NR_FAIL(NR_E_ARG, "matmul %s x %s: dimensions exceed cuBLAS's 32-bit limits", NR_DESC(a), NR_DESC(b));
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   cublasComputeType_t ct = nr_cuda_tf32_allowed() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
   NR_CUBLAS(cublasGemmEx(ctx->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n,
                          (int)m, (int)k, &alpha, b->data, CUDA_R_32F, (int)ldb, a->data, CUDA_R_32F, (int)lda, &beta,
                          out->data, CUDA_R_32F, (int)ldc, ct, CUBLAS_GEMM_DEFAULT),
             "matmul %s%s x %s%s -> %s", NR_DESC(a), trans_a ? "^T" : "", NR_DESC(b), trans_b ? "^T" : "", NR_DESC(out));
   return NR_OK;
}

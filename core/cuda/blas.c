/* blas.c — nr_cuda_matmul: row-major GEMM on cuBLAS.
 *
 * What it is: out (M, N) = alpha * op(a) @ op(b) + beta * out for row-major operands with
 * contiguous rows. cuBLAS is column-major, and a row-major (R, C) matrix with row stride ld is
 * the column-major (C, R) matrix with leading dimension ld, so we compute
 * out^T = op(b)^T @ op(a)^T: cublasGemmEx(opB, opA, N, M, K, b, a, out).
 * Mixed precision: when a or b is bf16 the product runs on bf16 tensor cores (an f32 operand,
 * the master weight of a Linear, is converted to bf16 in scratch slot 5) and out may be f32 or
 * bf16 (a weight gradient lands in its f32 master gradient directly).
 * What it is not: batched GEMM.
 * Invariants: fp32 accumulation; TF32 only when nr_cuda_set_allow_tf32(1) (f32 operands); beta = 0
 * never reads out (cuBLAS semantics), matching the CPU kernel's sgemm.
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
   const int half = a->dtype == NR_BF16 || b->dtype == NR_BF16;
   if (!half && out->dtype == NR_BF16)
      return NR_FAIL(NR_E_ARG, "matmul %s x %s -> %s: a bf16 result needs a bf16 operand", NR_DESC(a), NR_DESC(b),
                     NR_DESC(out));
   nr_tensor ac = *a, bc = *b;
   if (half) { /* at most one operand is converted (both f32 was excluded above), so one slot suffices */
      if (a->dtype != NR_BF16) {
         NR_TRY(nr_cuda_as_dtype(ctx, a, NR_BF16, 5, &ac));
         lda = a->shape[1] > 0 ? a->shape[1] : 1;
      }
      if (b->dtype != NR_BF16) {
         NR_TRY(nr_cuda_as_dtype(ctx, b, NR_BF16, 5, &bc));
         ldb = b->shape[1] > 0 ? b->shape[1] : 1;
      }
   }
   const cudaDataType_t in_t = half ? CUDA_R_16BF : CUDA_R_32F;
   const cudaDataType_t out_t = out->dtype == NR_BF16 ? CUDA_R_16BF : CUDA_R_32F;
   cublasComputeType_t ct = nr_cuda_tf32_allowed() && !half ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
   NR_CUBLAS(cublasGemmEx(ctx->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n,
                          (int)m, (int)k, &alpha, bc.data, in_t, (int)ldb, ac.data, in_t, (int)lda, &beta,
                          out->data, out_t, (int)ldc, ct, CUBLAS_GEMM_DEFAULT),
             "matmul %s%s x %s%s -> %s", NR_DESC(a), trans_a ? "^T" : "", NR_DESC(b), trans_b ? "^T" : "", NR_DESC(out));
   return NR_OK;
}

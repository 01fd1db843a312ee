/* cublas_emu.c — the cuBLAS entry points of the CUDA backend (core/cuda/blas.c, runtime.c), on the CPU.
 *
 * What it is: cublasCreate / Destroy / SetStream / GetProperty and cublasGemmEx with cuBLAS's
 * column-major semantics, C = alpha * op(A) op(B) + beta * C, validating arguments as the cuBLAS
 * documentation of cublasGemmEx describes (INVALID_VALUE for bad sizes, leading dimensions and
 * operations; NOT_SUPPORTED for type / compute-type / algorithm combinations outside its table),
 * with a diagnostic through nr_emu_report. The real symbols are defined: cublas_v2.h maps
 * cublasCreate, cublasDestroy and cublasSetStream to their _v2 names.
 * Numerics: a double-precision reference of what the GPU computes: bf16 operands read as bf16, a
 * bf16 C written rounded to nearest even; CUBLAS_COMPUTE_32F(_PEDANTIC) multiplies fp32 inputs
 * exactly, CUBLAS_COMPUTE_32F_FAST_TF32 rounds them to TF32 first and CUBLAS_COMPUTE_32F_FAST_16BF
 * to bf16 (the worst case those compute types allow).
 * What it is not: cuBLAS. Real types only (A and B CUDA_R_32F or CUDA_R_16BF, C CUDA_R_32F or
 * CUDA_R_16BF), host pointer mode only (the backend never sets device pointer mode), no other
 * routines.
 * Invariants: every call runs to completion before it returns; device memory is touched only
 * between nr_emu_device_enter and nr_emu_device_leave, after each matrix span actually read or
 * written (from its leading dimension and dimensions) was checked to lie in an allocation of the
 * current device (a span that is not fails the call as CUBLAS_STATUS_EXECUTION_FAILED: the fault
 * the GPU kernel would take); C is not read when beta == 0, A and B not when k == 0 or alpha == 0.
 */
#include <cublas_v2.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu_internal.h"

/* ---- handles */

enum { HANDLE_MAGIC = 0x63624c48 };

struct cublasContext {
   uint32_t magic;
   int device; /* current at cublasCreate: cuBLAS assumes it stays the handle's device */
   cudaStream_t stream;
};

static int handle_ok(cublasHandle_t h) { return h && h->magic == HANDLE_MAGIC; }

__attribute__((format(printf, 3, 4))) static cublasStatus_t fail(cublasStatus_t st, const char *func, const char *fmt, ...)
{
   va_list ap;
   va_start(ap, fmt);
   nr_emu_vreport(func, fmt, ap);
   va_end(ap);
   return st;
}

cublasStatus_t CUBLASWINAPI cublasCreate_v2(cublasHandle_t *handle)
{
   if (!handle) return fail(CUBLAS_STATUS_INVALID_VALUE, __func__, "handle is NULL");
   struct cublasContext *h = calloc(1, sizeof *h);
   if (!h) return fail(CUBLAS_STATUS_ALLOC_FAILED, __func__, "out of host memory");
   h->magic = HANDLE_MAGIC;
   h->device = nr_emu_current_device();
   *handle = h;
   return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasDestroy_v2(cublasHandle_t handle)
{
   if (!handle_ok(handle)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, __func__, "handle is NULL or not a live handle");
   handle->magic = 0;
   free(handle);
   return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId)
{
   if (!handle_ok(handle)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, __func__, "handle is NULL or not a live handle");
   handle->stream = streamId;
   return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasGetProperty(libraryPropertyType type, int *value)
{
   if (!value) return fail(CUBLAS_STATUS_INVALID_VALUE, __func__, "value is NULL");
   switch (type) {
   case MAJOR_VERSION: *value = CUBLAS_VER_MAJOR; return CUBLAS_STATUS_SUCCESS;
   case MINOR_VERSION: *value = CUBLAS_VER_MINOR; return CUBLAS_STATUS_SUCCESS;
   case PATCH_LEVEL: *value = CUBLAS_VER_PATCH; return CUBLAS_STATUS_SUCCESS;
   default: return fail(CUBLAS_STATUS_INVALID_VALUE, __func__, "type %d is not a libraryPropertyType", (int)type);
   }
}

/* ---- GEMM */

/* One operand as stored: rows x cols column-major with leading dimension ld. */
typedef struct {
   const char *name;
   void *p;
   cudaDataType type;
   int64_t rows, cols, ld;
} matrix;

static size_t type_size(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

/* Bytes from the first element to one past the last one read or written (0: none). */
static size_t span_bytes(const matrix *m)
{
   if (m->rows == 0 || m->cols == 0) return 0;
   return (size_t)((m->cols - 1) * m->ld + m->rows) * type_size(m->type);
}

/* cuBLAS does not check data pointers: on a GPU a bad one faults in the kernel (an illegal or
 * misaligned address). The emulator refuses the call instead, as CUBLAS_STATUS_EXECUTION_FAILED. */
static cublasStatus_t check_span(const char *func, const matrix *m)
{
   const size_t bytes = span_bytes(m);
   if (!bytes) return CUBLAS_STATUS_SUCCESS;
   const int dev = nr_emu_current_device();
   if (!m->p) return fail(CUBLAS_STATUS_EXECUTION_FAILED, func, "%s is NULL", m->name);
   if ((uintptr_t)m->p % type_size(m->type))
      return fail(CUBLAS_STATUS_EXECUTION_FAILED, func, "%s (%p) is not aligned to its elements", m->name, m->p);
   if (nr_emu_is_device_span(dev, m->p, bytes)) return CUBLAS_STATUS_SUCCESS;
   const int owner = nr_emu_device_of(m->p);
   const char *why = owner < 0 ? "is not device memory"
                     : owner != dev ? "is memory of another device"
                                    : "runs past the end of its allocation";
   return fail(CUBLAS_STATUS_EXECUTION_FAILED, func,
               "%s (%p: %lld x %lld, ld %lld, %zu bytes) %s (its device %d, current device %d)", m->name, m->p,
               (long long)m->rows, (long long)m->cols, (long long)m->ld, bytes, why, owner, dev);
}

/* Input rounding of a compute type for fp32 operands. */
typedef enum { ROUND_NONE, ROUND_TF32, ROUND_BF16 } input_rounding;

/* The cublasGemmEx table (cuBLAS docs, "cublasGemmEx"), restricted to real types: compute 32F /
 * 32F_PEDANTIC with A = B = C = R_32F, or A = B = R_16BF and C = R_16BF or R_32F; the fast
 * 32F compute types with A = B = C = R_32F. */
static cublasStatus_t check_types(const char *func, cudaDataType at, cudaDataType bt, cudaDataType ct,
                                  cublasComputeType_t compute, input_rounding *rnd)
{
   const int f32 = at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F;
   const int bf16 = at == CUDA_R_16BF && bt == CUDA_R_16BF && (ct == CUDA_R_16BF || ct == CUDA_R_32F);
   int ok = 0;
   *rnd = ROUND_NONE;
   switch (compute) {
   case CUBLAS_COMPUTE_32F:
   case CUBLAS_COMPUTE_32F_PEDANTIC: ok = f32 || bf16; break;
   case CUBLAS_COMPUTE_32F_FAST_TF32: ok = f32, *rnd = ROUND_TF32; break;
   case CUBLAS_COMPUTE_32F_FAST_16BF: ok = f32, *rnd = ROUND_BF16; break;
   default: break;
   }
   if (ok) return CUBLAS_STATUS_SUCCESS;
   return fail(CUBLAS_STATUS_NOT_SUPPORTED, func,
               "Atype %d, Btype %d, Ctype %d with computeType %d is not a supported combination (emulated: "
               "COMPUTE_32F(_PEDANTIC) with R_32F or R_16BF inputs, COMPUTE_32F_FAST_TF32 / _FAST_16BF with R_32F)",
               (int)at, (int)bt, (int)ct, (int)compute);
}

static int algo_valid(cublasGemmAlgo_t a)
{
   return (a >= CUBLAS_GEMM_DEFAULT && a <= CUBLAS_GEMM_ALGO23) ||
          (a >= CUBLAS_GEMM_DEFAULT_TENSOR_OP && a <= CUBLAS_GEMM_ALGO15_TENSOR_OP);
}

static float read_elem(const matrix *m, int64_t i, int64_t j, input_rounding rnd)
{
   const int64_t off = i + j * m->ld;
   if (m->type == CUDA_R_16BF) return bf16_to_float(((const uint16_t *)m->p)[off]);
   const float v = ((const float *)m->p)[off];
   return rnd == ROUND_TF32 ? round_tf32(v) : rnd == ROUND_BF16 ? bf16_to_float(bf16_from_float(v)) : v;
}

/* op(M) as a dense (r x inner) array, row i contiguous: the element (i, l) of op(M) for an A
 * operand, of op(M)^T for a B operand (transposed: M stored inner x r). */
static void gather(const matrix *m, int transposed, int64_t r, int64_t inner, input_rounding rnd, double *out)
{
   for (int64_t i = 0; i < r; i++)
      for (int64_t l = 0; l < inner; l++) out[i * inner + l] = transposed ? read_elem(m, l, i, rnd) : read_elem(m, i, l, rnd);
}

cublasStatus_t CUBLASWINAPI cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                                         int n, int k, const void *alpha, const void *A, cudaDataType Atype, int lda,
                                         const void *B, cudaDataType Btype, int ldb, const void *beta, void *C,
                                         cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                         cublasGemmAlgo_t algo)
{
   const char *func = __func__;
   if (!handle_ok(handle)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, func, "handle is NULL or not a live handle");
   const int cur = nr_emu_current_device();
   if (cur != handle->device)
      return fail(CUBLAS_STATUS_EXECUTION_FAILED, func,
                  "the handle was created on device %d but device %d is current (a cuBLAS handle stays on its device)",
                  handle->device, cur);
   if (m < 0 || n < 0 || k < 0) return fail(CUBLAS_STATUS_INVALID_VALUE, func, "m %d, n %d, k %d: negative", m, n, k);
   const int ops_ok = (transa == CUBLAS_OP_N || transa == CUBLAS_OP_T || transa == CUBLAS_OP_C) &&
                      (transb == CUBLAS_OP_N || transb == CUBLAS_OP_T || transb == CUBLAS_OP_C);
   if (!ops_ok) return fail(CUBLAS_STATUS_INVALID_VALUE, func, "transa %d / transb %d is not N, T or C", transa, transb);
   const int ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N; /* real types: C is T */
   matrix a = {"A", (void *)A, Atype, ta ? k : m, ta ? m : k, lda};
   matrix b = {"B", (void *)B, Btype, tb ? n : k, tb ? k : n, ldb};
   matrix c = {"C", C, Ctype, m, n, ldc};
   const matrix *mats[3] = {&a, &b, &c};
   for (int i = 0; i < 3; i++) {
      const int64_t need = mats[i]->rows > 1 ? mats[i]->rows : 1;
      if (mats[i]->ld < need)
         return fail(CUBLAS_STATUS_INVALID_VALUE, func, "ld%c %lld < max(1, %lld), the rows of %s as stored",
                     "abc"[i], (long long)mats[i]->ld, (long long)mats[i]->rows, mats[i]->name);
   }
   if (!alpha || !beta) return fail(CUBLAS_STATUS_INVALID_VALUE, func, "alpha or beta is NULL");
   if (nr_emu_device_of(alpha) >= 0 || nr_emu_device_of(beta) >= 0)
      return fail(CUBLAS_STATUS_INVALID_VALUE, func,
                  "alpha or beta points to device memory, but the pointer mode is CUBLAS_POINTER_MODE_HOST");
   input_rounding rnd;
   cublasStatus_t st = check_types(func, Atype, Btype, Ctype, computeType, &rnd);
   if (st) return st;
   if (!algo_valid(algo)) return fail(CUBLAS_STATUS_NOT_SUPPORTED, func, "algo %d is not a cublasGemmAlgo_t", (int)algo);
   float al, be;
   memcpy(&al, alpha, sizeof al);
   memcpy(&be, beta, sizeof be);
   if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
   /* what is touched: C always (written; read when beta != 0), A and B when there is a product */
   const int product = k > 0 && al != 0.0f;
   for (int i = product ? 0 : 2; i < 3; i++) {
      st = check_span(func, mats[i]);
      if (st) return st;
   }
   double *pa = NULL, *pb = NULL;
   if (product) {
      pa = malloc(sizeof(double) * (size_t)m * (size_t)k);
      pb = malloc(sizeof(double) * (size_t)n * (size_t)k);
      if (!pa || !pb) {
         free(pa);
         free(pb);
         return fail(CUBLAS_STATUS_ALLOC_FAILED, func, "out of host memory");
      }
   }
   nr_emu_device_enter(handle->stream);
   if (product) {
      gather(&a, ta, m, k, rnd, pa); /* pa[i, l] = op(A)(i, l) */
      gather(&b, !tb, n, k, rnd, pb); /* pb[j, l] = op(B)(l, j) */
   }
   for (int64_t j = 0; j < n; j++)
      for (int64_t i = 0; i < m; i++) {
         double acc = 0.0;
         if (product)
            for (int64_t l = 0; l < k; l++) acc += pa[i * k + l] * pb[j * k + l];
         double v = (double)al * acc;
         const int64_t off = i + j * (int64_t)ldc;
         if (Ctype == CUDA_R_16BF) {
            uint16_t *q = C;
            if (be != 0.0f) v += (double)be * bf16_to_float(q[off]);
            q[off] = bf16_from_float((float)v);
         } else {
            float *q = C;
            if (be != 0.0f) v += (double)be * q[off];
            q[off] = (float)v;
         }
      }
   nr_emu_device_leave();
   free(pa);
   free(pb);
   return CUBLAS_STATUS_SUCCESS;
}

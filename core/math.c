/* math.c — f32 elementwise arithmetic, reductions, argmax and BLAS matmul on the CPU.
 * Layer kernels live in their own files; these are the general tensor operations the Lua
 * Tensor methods use. Fast paths for contiguous operands; general strided paths otherwise. */
#include "internal.h"
#include "nn_internal.h" /* nn_relu: the one CPU ReLU expression */

#include <math.h>

static nr_status same_shape(const char *func, const char *an, const nr_tensor *a, const char *bn,
                            const nr_tensor *b)
{
   bool same = a->ndim == b->ndim;
   for (int d = 0; same && d < a->ndim; d++) same = a->shape[d] == b->shape[d];
   if (same) return NR_OK;
   char da[128], db[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "shape mismatch: %s %s vs %s %s", an,
                     nr_tensor_describe(a, da, sizeof da), bn, nr_tensor_describe(b, db, sizeof db));
}

/* The checks of an op that reads one activation `in` into `out` of its shape (same dtype and
 * device), and where to read `in` from (nr_elementwise_source: a copy when the two meet in
 * memory; *tmp, when set, is that copy, for the caller to free). */
static nr_status one_input(const char *func, const char *in_name, const nr_tensor *in, const char *out_name,
                           nr_tensor *out, const nr_tensor **src, nr_tensor **tmp)
{
   NR_TRY(nr_check_tensor(func, in_name, in, NR_DTYPE_ACT, -1, -1, NULL));
   NR_TRY(nr_check_tensor(func, out_name, out, NR_DTYPE_ACT, -1, -1, NULL));
   NR_TRY(nr_check_same_dtype(func, in_name, in, out_name, out));
   NR_TRY(nr_check_same_device(func, in, out));
   NR_TRY(same_shape(func, in_name, in, out_name, out));
   return nr_elementwise_source(func, out_name, out, in_name, in, src, tmp);
}

static inline float apply_binary(float x, float y, int op)
{
   switch (op) {
   case NR_OP_ADD: return x + y;
   case NR_OP_SUB: return x - y;
   case NR_OP_MUL: return x * y;
   case NR_OP_DIV: return x / y;
   /* maximum/minimum propagate a NaN from either side, as torch.maximum / torch.minimum */
   case NR_OP_MAX: return x > y || x != x ? x : y;
   default: return x < y || x != x ? x : y;
   }
}

/* Contiguous loops run with op a compile-time constant: one loop per op, in which apply_binary /
 * apply_unary's switch folds away and the loop vectorises. With the switch inside one loop, the
 * selects (ReLU, max, min) compiled to branches that mispredict on random data: Tensor:relu took
 * 8.3 ms on 4M elements against 1.2 ms for abs. */
#define PAR_SIMD_LOOP(count, body)                                                                 \
   do {                                                                                         \
      const int64_t n_loop = (count);                                                           \
      _Pragma("omp parallel for simd if (n_loop > 65536)") for (int64_t i = 0; i < n_loop; i++) body; \
   } while (0)
#define BINARY_OPS(X) X(NR_OP_ADD) X(NR_OP_SUB) X(NR_OP_MUL) X(NR_OP_DIV) X(NR_OP_MAX) X(NR_OP_MIN)
#define UNARY_OPS(X)                                                                               \
   X(NR_OP_NEG) X(NR_OP_ABS) X(NR_OP_EXP) X(NR_OP_LOG) X(NR_OP_SQRT) X(NR_OP_SIGN) X(NR_OP_RELU)      \
   X(NR_OP_SIGMOID) X(NR_OP_TANH) X(NR_OP_SQUARE)

/* po[i] = pa[i] op pb[i] (pb_step 1) or pa[i] op pb[0] (pb_step 0). */
static void binary_contiguous(const float *pa, const float *pb, int64_t pb_step, float *po, int64_t n, int op)
{
   switch (op) {
#define BINARY_CASE(OP)                                                                            \
   case OP:                                                                                     \
      if (pb_step) PAR_SIMD_LOOP(n, po[i] = apply_binary(pa[i], pb[i], OP));                       \
      else {                                                                                     \
         const float y = pb[0];                                                                  \
         PAR_SIMD_LOOP(n, po[i] = apply_binary(pa[i], y, OP));                                   \
      }                                                                                          \
      break;
      BINARY_OPS(BINARY_CASE)
#undef BINARY_CASE
   }
}

/* Offset into b for a's i-th element when b broadcasts (size-1 dims repeat). */
static inline int64_t broadcast_offset(const nr_tensor *a, const nr_tensor *b, int64_t i)
{
   int64_t off = 0;
   for (int d = a->ndim - 1; d >= 0; d--) {
      int64_t n = a->shape[d], k = i % n;
      if (b->shape[d] != 1) off += k * b->stride[d];
      i /= n;
   }
   return off;
}

static nr_status binary_run(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op);
static nr_status broadcast_of(const char *func, const nr_tensor *a, const nr_tensor *b, bool *bcast);

nr_status nr_binary(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op)
{
   NR_CHECK_T("a", a, NR_DTYPE_ACT, -1, -1, NULL);
   NR_CHECK_T("b", b, NR_DTYPE_ACT, -1, -1, NULL);
   NR_CHECK_T("out", out, NR_DTYPE_ACT, -1, -1, NULL);
   if (op < NR_OP_ADD || op > NR_OP_MIN) return NR_FAIL(NR_E_ARG, "unknown binary op %d", op);
   NR_TRY(nr_check_same_dtype(__func__, "a", a, "b", b));
   NR_TRY(nr_check_same_dtype(__func__, "a", a, "out", out));
   NR_TRY(nr_check_same_device(__func__, a, b));
   NR_TRY(nr_check_same_device(__func__, a, out));
   NR_TRY(same_shape(__func__, "a", a, "out", out));
   bool bcast;
   NR_TRY(broadcast_of(__func__, a, b, &bcast)); /* before any copy is made */
   const nr_tensor *sa, *sb;
   nr_tensor *ta = NULL, *tb = NULL;
   nr_status st = nr_elementwise_source(__func__, "out", out, "a", a, &sa, &ta);
   if (!st) st = nr_elementwise_source(__func__, "out", out, "b", b, &sb, &tb);
   if (!st) st = binary_run(sa, sb, out, op);
   nr_tensor_free(ta);
   nr_tensor_free(tb);
   return st;
}

/* Whether b broadcasts over a (same rank, each size equal or 1), b not one element; else an error
 * naming func when the shapes differ otherwise. */
static nr_status broadcast_of(const char *func, const nr_tensor *a, const nr_tensor *b, bool *bcast)
{
   *bcast = false;
   if (nr_tensor_numel(b) == 1 || same_shape(func, "a", a, "b", b) == NR_OK) {
      nr_clear_error();
      return NR_OK;
   }
   bool ok = a->ndim == b->ndim;
   for (int d = 0; ok && d < a->ndim; d++) ok = b->shape[d] == a->shape[d] || b->shape[d] == 1;
   if (!ok) return same_shape(func, "a", a, "b", b);
   nr_clear_error();
   *bcast = true;
   return NR_OK;
}

static nr_status binary_run(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op)
{
   int64_t nb = nr_tensor_numel(b), n = nr_tensor_numel(a);
   bool scalar = nb == 1, bcast;
   NR_TRY(broadcast_of("nr_binary", a, b, &bcast));
   NR_ON_CUDA(a, nr_cuda_binary(a, b, out, op));
   const float *pa = a->data, *pb = b->data;
   float *po = out->data;
   if (scalar) return nr_binary_scalar(a, pb[0], out, op);
   if (!bcast && nr_tensor_is_contiguous(a) && nr_tensor_is_contiguous(b) && nr_tensor_is_contiguous(out)) {
      binary_contiguous(pa, pb, 1, po, n, op);
      return NR_OK;
   }
#pragma omp parallel for if (n > 65536)
   for (int64_t i = 0; i < n; i++)
      po[nr_linear_offset(out, i)] =
          apply_binary(pa[nr_linear_offset(a, i)], pb[bcast ? broadcast_offset(a, b, i) : nr_linear_offset(b, i)], op);
   return NR_OK;
}

static nr_status binary_scalar_run(const nr_tensor *a, double s, nr_tensor *out, int32_t op);

nr_status nr_binary_scalar(const nr_tensor *a, double s, nr_tensor *out, int32_t op)
{
   if (op < NR_OP_ADD || op > NR_OP_MIN) return NR_FAIL(NR_E_ARG, "unknown binary op %d", op);
   const nr_tensor *sa;
   nr_tensor *ta = NULL;
   NR_TRY(one_input(__func__, "a", a, "out", out, &sa, &ta));
   nr_status st = binary_scalar_run(sa, s, out, op);
   nr_tensor_free(ta);
   return st;
}

static nr_status binary_scalar_run(const nr_tensor *a, double s, nr_tensor *out, int32_t op)
{
   NR_ON_CUDA(a, nr_cuda_binary_scalar(a, s, out, op));
   int64_t n = nr_tensor_numel(a);
   const float *pa = a->data;
   float *po = out->data, y = (float)s;
   if (nr_tensor_is_contiguous(a) && nr_tensor_is_contiguous(out)) {
      binary_contiguous(pa, &y, 0, po, n, op);
      return NR_OK;
   }
   for (int64_t i = 0; i < n; i++) po[nr_linear_offset(out, i)] = apply_binary(pa[nr_linear_offset(a, i)], y, op);
   return NR_OK;
}

static inline float apply_unary(float x, int op)
{
   switch (op) {
   case NR_OP_NEG: return -x;
   case NR_OP_ABS: return fabsf(x);
   case NR_OP_EXP: return expf(x);
   case NR_OP_LOG: return logf(x);
   case NR_OP_SQRT: return sqrtf(x);
   case NR_OP_SIGN: return (float)((x > 0) - (x < 0));
   case NR_OP_RELU: return nn_relu(x); /* NaN stays NaN */
   case NR_OP_SIGMOID: return 1.0f / (1.0f + expf(-x));
   case NR_OP_TANH: return tanhf(x);
   default: return x * x;
   }
}

static nr_status unary_run(const nr_tensor *a, nr_tensor *out, int32_t op);

nr_status nr_unary(const nr_tensor *a, nr_tensor *out, int32_t op)
{
   if (op < NR_OP_NEG || op > NR_OP_SQUARE) return NR_FAIL(NR_E_ARG, "unknown unary op %d", op);
   const nr_tensor *sa;
   nr_tensor *ta = NULL;
   NR_TRY(one_input(__func__, "a", a, "out", out, &sa, &ta));
   nr_status st = unary_run(sa, out, op);
   nr_tensor_free(ta);
   return st;
}

static nr_status unary_run(const nr_tensor *a, nr_tensor *out, int32_t op)
{
   NR_ON_CUDA(a, nr_cuda_unary(a, out, op));
   int64_t n = nr_tensor_numel(a);
   const float *pa = a->data;
   float *po = out->data;
   if (nr_tensor_is_contiguous(a) && nr_tensor_is_contiguous(out)) {
      switch (op) { /* one vectorisable loop per op, as binary_contiguous */
#define UNARY_CASE(OP)                                                                             \
   case OP: PAR_SIMD_LOOP(n, po[i] = apply_unary(pa[i], OP)); break;
         UNARY_OPS(UNARY_CASE)
#undef UNARY_CASE
      }
      return NR_OK;
   }
   for (int64_t i = 0; i < n; i++) po[nr_linear_offset(out, i)] = apply_unary(pa[nr_linear_offset(a, i)], op);
   return NR_OK;
}

static nr_status axpy_run(const nr_tensor *x, nr_tensor *y, double alpha);

nr_status nr_axpy(const nr_tensor *x, nr_tensor *y, double alpha)
{
   const nr_tensor *sx;
   nr_tensor *tx = NULL;
   NR_TRY(one_input(__func__, "x", x, "y", y, &sx, &tx));
   nr_status st = axpy_run(sx, y, alpha);
   nr_tensor_free(tx);
   return st;
}

static nr_status axpy_run(const nr_tensor *x, nr_tensor *y, double alpha)
{
   NR_ON_CUDA(x, nr_cuda_axpy(x, y, alpha));
   int64_t n = nr_tensor_numel(x);
   const float *px = x->data;
   float *py = y->data, a = (float)alpha;
   if (nr_tensor_is_contiguous(x) && nr_tensor_is_contiguous(y)) {
#pragma omp parallel for if (n > 65536)
      for (int64_t i = 0; i < n; i++) py[i] += a * px[i];
      return NR_OK;
   }
   for (int64_t i = 0; i < n; i++) py[nr_linear_offset(y, i)] += a * px[nr_linear_offset(x, i)];
   return NR_OK;
}

/* out's expected shape for a reduction over dim (kept as 1), or one element for dim = -1. */
static nr_status check_reduce_out(const char *func, const nr_tensor *a, int32_t dim, const nr_tensor *out)
{
   if (dim < -1 || dim >= a->ndim)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "dim %d out of range for a %d-d tensor", dim, a->ndim);
   if (dim == -1) {
      if (nr_tensor_numel(out) != 1)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "out must have one element for a full reduction");
      return NR_OK;
   }
   bool ok = out->ndim == a->ndim;
   for (int d = 0; ok && d < a->ndim; d++) ok = out->shape[d] == (d == dim ? 1 : a->shape[d]);
   if (!ok) {
      char da[128], db[128];
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "out %s does not match %s reduced over dim %d",
                        nr_tensor_describe(out, db, sizeof db), nr_tensor_describe(a, da, sizeof da), dim);
   }
   if (!nr_tensor_is_contiguous(out))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "out must be contiguous");
   return NR_OK;
}

nr_status nr_reduce(const nr_tensor *a, int32_t dim, nr_tensor *out, int32_t op)
{
   NR_CHECK_T("a", a, NR_DTYPE_ACT, -1, -1, NULL);
   NR_CHECK_T("out", out, NR_DTYPE_ACT, -1, -1, NULL);
   if (op < NR_RED_SUM || op > NR_RED_MIN) return NR_FAIL(NR_E_ARG, "unknown reduction %d", op);
   NR_TRY(nr_check_same_dtype(__func__, "a", a, "out", out));
   NR_TRY(nr_check_same_device(__func__, a, out));
   NR_TRY(check_reduce_out(__func__, a, dim, out));
   NR_TRY(nr_check_no_overlap(__func__, "out", out, "a", a)); /* a is read while out is written */
   NR_ON_CUDA(a, nr_cuda_reduce(a, dim, out, op));
   int64_t n = nr_tensor_numel(a), outer = 1, len = n, inner = 1;
   if (dim >= 0) {
      len = a->shape[dim];
      for (int d = 0; d < dim; d++) outer *= a->shape[d];
      for (int d = dim + 1; d < a->ndim; d++) inner *= a->shape[d];
   }
   if ((op == NR_RED_MAX || op == NR_RED_MIN) && len == 0)
      return NR_FAIL(NR_E_ARG, "max/min of an empty dimension");
   float *po = out->data;
   const float *pa = a->data;
   bool contig = nr_tensor_is_contiguous(a);
#pragma omp parallel for collapse(2) if (n > 65536)
   for (int64_t o = 0; o < outer; o++)
      for (int64_t in = 0; in < inner; in++) {
         double acc = op == NR_RED_MAX ? -INFINITY : op == NR_RED_MIN ? INFINITY : 0.0;
         for (int64_t k = 0; k < len; k++) {
            int64_t i = (o * len + k) * inner + in;
            double v = pa[contig ? i : nr_linear_offset(a, i)];
            /* a NaN wins and stays (PyTorch's max/min of a tensor holding a NaN is NaN) */
            if (op == NR_RED_MAX) acc = v > acc || v != v ? v : acc;
            else if (op == NR_RED_MIN) acc = v < acc || v != v ? v : acc;
            else acc += v;
         }
         if (op == NR_RED_MEAN) acc = len ? acc / (double)len : NAN;
         po[o * inner + in] = (float)acc;
      }
   return NR_OK;
}

nr_status nr_argmax(const nr_tensor *a, int32_t dim, nr_tensor *out)
{
   NR_CHECK_T("a", a, NR_DTYPE_ACT, -1, -1, NULL);
   NR_CHECK_T("out", out, NR_I64, -1, -1, NULL);
   NR_TRY(nr_check_same_device(__func__, a, out));
   NR_TRY(check_reduce_out(__func__, a, dim, out));
   NR_ON_CUDA(a, nr_cuda_argmax(a, dim, out));
   int64_t n = nr_tensor_numel(a), outer = 1, len = n, inner = 1;
   if (dim >= 0) {
      len = a->shape[dim];
      for (int d = 0; d < dim; d++) outer *= a->shape[d];
      for (int d = dim + 1; d < a->ndim; d++) inner *= a->shape[d];
   }
   if (len == 0) return NR_FAIL(NR_E_ARG, "argmax of an empty dimension");
   int64_t *po = out->data;
   const float *pa = a->data;
   for (int64_t o = 0; o < outer; o++)
      for (int64_t in = 0; in < inner; in++) {
         /* the first maximum; a NaN counts as the maximum, so the first NaN's position (PyTorch) */
         int64_t best = 0;
         float bv = pa[nr_linear_offset(a, (o * len) * inner + in)];
         for (int64_t k = 1; k < len && bv == bv; k++) {
            float v = pa[nr_linear_offset(a, (o * len + k) * inner + in)];
            if (v > bv || v != v) {
               bv = v;
               best = k;
            }
         }
         po[o * inner + in] = best;
      }
   return NR_OK;
}

nr_status nr_matmul(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t trans_a,
                    int32_t trans_b, float alpha, float beta)
{
   NR_CHECK_T("a", a, NR_DTYPE_ACT, -1, 2, NULL);
   NR_CHECK_T("b", b, NR_DTYPE_ACT, -1, 2, NULL);
   NR_CHECK_T("out", out, NR_DTYPE_ACT, -1, 2, NULL);
   NR_TRY(nr_check_same_device(__func__, a, b));
   NR_TRY(nr_check_same_device(__func__, a, out));
   int64_t m = trans_a ? a->shape[1] : a->shape[0], k = trans_a ? a->shape[0] : a->shape[1];
   int64_t kb = trans_b ? b->shape[1] : b->shape[0], n = trans_b ? b->shape[0] : b->shape[1];
   if (k != kb || out->shape[0] != m || out->shape[1] != n) {
      char da[128], db[128], dc[128];
      return NR_FAIL(NR_E_ARG, "cannot multiply %s%s by %s%s into %s", nr_tensor_describe(a, da, sizeof da),
                     trans_a ? "^T" : "", nr_tensor_describe(b, db, sizeof db), trans_b ? "^T" : "",
                     nr_tensor_describe(out, dc, sizeof dc));
   }
   /* a BLAS layout: rows contiguous, and each row starting at or past the previous one's end
    * (a row stride below the row length, zero or negative would read or write out of the
    * tensor's memory, or have rows share elements) */
   const nr_tensor *ops[3] = {a, b, out};
   static const char *names[3] = {"a", "b", "out"};
   for (int i = 0; i < 3; i++) {
      const nr_tensor *t = ops[i];
      if (nr_tensor_numel(t) == 0) continue; /* nothing is read or written through it */
      if ((t->shape[1] > 1 && t->stride[1] != 1) ||
          (t->shape[0] > 1 && (t->stride[0] < t->shape[1] || t->stride[0] < 1 || t->stride[0] > INT32_MAX))) {
         char d[128];
         return NR_FAIL(NR_E_ARG, "%s %s is not a matrix layout BLAS takes (rows contiguous, stride[0] >= the row "
                        "length, strides %lld, %lld): %s", names[i], nr_tensor_describe(t, d, sizeof d),
                        (long long)t->stride[0], (long long)t->stride[1],
                        t == out ? "write into a contiguous out" : "pass a contiguous copy");
      }
   }
   NR_TRY(nr_check_no_overlap(__func__, "out", out, "a", a)); /* GEMM reads a and b while writing out */
   NR_TRY(nr_check_no_overlap(__func__, "out", out, "b", b));
   NR_ON_CUDA(a, nr_cuda_matmul(a, b, out, trans_a, trans_b, alpha, beta));
   if (m == 0 || n == 0) return NR_OK;
   int lda = (int)(a->shape[0] > 1 ? a->stride[0] : a->shape[1]), ldb = (int)(b->shape[0] > 1 ? b->stride[0] : b->shape[1]);
   int ldc = (int)(out->shape[0] > 1 ? out->stride[0] : out->shape[1]);
   if (lda < 1) lda = 1;
   if (ldb < 1) ldb = 1;
   if (ldc < 1) ldc = 1;
   nr_sgemm(trans_a, trans_b, m, n, k, alpha, a->data, lda, b->data, ldb, beta, out->data, ldc);
   return NR_OK;
}

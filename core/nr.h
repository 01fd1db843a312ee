/* nr.h — the nrlua C runtime: the one public header and the FFI contract.
 *
 * What it is: every function and type the Lua package (lua/nr) calls. The block between the
 * NR_FFI_BEGIN and NR_FFI_END markers is read verbatim by lua/nr/ffi.lua and handed to
 * ffi.cdef, so it must stay FFI-clean: fixed-width ints, floats, pointers, enums, plain structs
 * passed by pointer; no macros, no #include, no structs by value, no varargs, no callbacks.
 * What it is not: the internal helpers shared by the C files in core/ (core/internal.h).
 *
 * Conventions
 *  - Names are nr_<noun>_<verb>. Argument order: inputs, outputs, weights, buffers, scalars.
 *  - Every fallible function returns nr_status (0 = NR_OK) or, for constructors, a pointer that
 *    is NULL on failure. On failure nr_last_error() holds "function: message (file:line)".
 *    C never raises a Lua error and never exits or aborts.
 *  - Shapes are commented as (N, C, H, W) etc. Tensors passed as outputs must already have the
 *    documented shape, dtype and device; kernels check and never allocate outputs themselves,
 *    so the caller (Lua) keeps buffers across steps.
 *  - Dimension indices and positions in this header are 0-based (Lua converts from 1-based).
 *  - Section owners: each section below is self-contained; add new declarations to the section
 *    they belong to and document every parameter.
 */
#ifndef NR_H
#define NR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* NR_FFI_BEGIN */

/* ---------------------------------------------------------------- runtime and errors */

typedef int32_t nr_status;
enum {
   NR_OK = 0,
   NR_E_ARG = 1,      /* bad argument: shape, dtype, device, range */
   NR_E_OOM = 2,      /* allocation failed (host or device) */
   NR_E_IO = 3,       /* file could not be opened, read or written */
   NR_E_FORMAT = 4,   /* file contents are not what was expected (corrupt, wrong magic) */
   NR_E_DEVICE = 5,   /* CUDA / cuDNN / cuBLAS error, or no such device */
   NR_E_INTERNAL = 6  /* a library (BLAS, oneDNN, zlib, ...) reported an error */
};

/* Message of the last failure on this thread: "function: message (file:line)". */
const char *nr_last_error(void);
/* Clears the message (tests use it). */
void nr_clear_error(void);
/* Library version string, e.g. "0.1.0". */
const char *nr_version(void);
/* Compile-time features: 1 if the library was built with CUDA, 0 otherwise. */
int32_t nr_has_cuda(void);

/* Worker threads for CPU kernels (OpenMP and BLAS). n <= 0 means all cores. */
void nr_set_num_threads(int32_t n);
int32_t nr_get_num_threads(void);

/* Bytes currently allocated for tensor storage on a device kind (NR_CPU or NR_CUDA),
 * the peak since start (or the last reset), and the number of allocations made so far. */
int64_t nr_memory_in_use(int32_t device);
int64_t nr_memory_peak(int32_t device);
int64_t nr_memory_alloc_count(int32_t device);
void nr_memory_reset_peak(int32_t device);

/* ---------------------------------------------------------------- tensors */

typedef enum { NR_F32 = 0, NR_I64 = 1, NR_U8 = 2 } nr_dtype;
typedef enum { NR_CPU = 0, NR_CUDA = 1 } nr_device;

typedef struct nr_storage nr_storage; /* opaque, reference counted */

/* A strided view of a storage. Lua reads these fields directly; only C writes them.
 * data points at element 0 of the view (storage base + offset * element size). */
typedef struct nr_tensor {
   int32_t dtype;        /* nr_dtype */
   int32_t device;       /* nr_device */
   int32_t device_index; /* GPU ordinal; 0 on CPU */
   int32_t ndim;         /* 0..8 */
   int64_t shape[8];
   int64_t stride[8];    /* in elements */
   int64_t offset;       /* in elements, from the storage base */
   void *data;
   nr_storage *storage;
} nr_tensor;

/* A new contiguous tensor, uninitialised. shape: ndim entries, each >= 0. */
nr_tensor *nr_tensor_new(int32_t dtype, int32_t device, int32_t ndim, const int64_t *shape);
/* A new tensor that views src's storage with the given geometry (checked against the storage). */
nr_tensor *nr_tensor_view(const nr_tensor *src, int32_t ndim, const int64_t *shape,
                          const int64_t *stride, int64_t offset);
/* Releases the view; the storage is released with its last view. NULL is ignored. */
void nr_tensor_free(nr_tensor *t);
/* Number of elements; 1 for ndim 0. */
int64_t nr_tensor_numel(const nr_tensor *t);
/* 1 if the view is contiguous in row-major order. */
int32_t nr_tensor_is_contiguous(const nr_tensor *t);
/* 1 if a and b share storage. */
int32_t nr_tensor_same_storage(const nr_tensor *a, const nr_tensor *b);
/* Bytes per element of a dtype. */
int32_t nr_dtype_size(int32_t dtype);

/* dst <- src, elementwise over equal shapes, any strides, converting dtype, across devices. */
nr_status nr_tensor_copy(nr_tensor *dst, const nr_tensor *src);
/* Every element <- value (converted to the tensor's dtype). */
nr_status nr_tensor_fill(nr_tensor *t, double value);
/* out[i] <- src[index[i]] along dim. src (.., S, ..), index (K) int64, out (.., K, ..). */
nr_status nr_tensor_index_select(const nr_tensor *src, int32_t dim, const nr_tensor *index,
                                 nr_tensor *out);
/* dst[index[i]] <- src[i] along dim. dst (.., D, ..), index (K) int64, src (.., K, ..). */
nr_status nr_tensor_index_copy(nr_tensor *dst, int32_t dim, const nr_tensor *index,
                               const nr_tensor *src);
/* Reads element i of the flattened view (row-major order over the view) as a double. */
nr_status nr_tensor_get(const nr_tensor *t, int64_t i, double *value);
/* Writes element i of the flattened view. */
nr_status nr_tensor_set(nr_tensor *t, int64_t i, double value);

/* ---------------------------------------------------------------- random numbers */
/* One global generator (xoshiro256**), advanced sequentially, so results do not depend on the
 * thread count. The state is 4 uint64 words, saved in checkpoints. */
void nr_rng_seed(uint64_t seed);
void nr_rng_get_state(uint64_t *state4);
void nr_rng_set_state(const uint64_t *state4);
/* Uniform in [lo, hi) (f32), or integers in [lo, hi) for int64/uint8 tensors. */
nr_status nr_rng_uniform(nr_tensor *t, double lo, double hi);
/* Normal(mean, std), f32 only. */
nr_status nr_rng_normal(nr_tensor *t, double mean, double std);
/* Bernoulli mask: 1 with probability p, else 0 (f32 or uint8). */
nr_status nr_rng_bernoulli(nr_tensor *t, double p);
/* A random permutation of 0..n-1 into an int64 tensor of shape (n). */
nr_status nr_rng_permutation(nr_tensor *out);
/* One uint64 draw (for seeding worker generators deterministically). */
uint64_t nr_rng_next(void);

/* ---------------------------------------------------------------- tensor math (f32) */

typedef enum {
   NR_OP_ADD = 0, NR_OP_SUB = 1, NR_OP_MUL = 2, NR_OP_DIV = 3, NR_OP_MAX = 4, NR_OP_MIN = 5
} nr_binary_op;
typedef enum {
   NR_OP_NEG = 0, NR_OP_ABS = 1, NR_OP_EXP = 2, NR_OP_LOG = 3, NR_OP_SQRT = 4,
   NR_OP_SIGN = 5, NR_OP_RELU = 6, NR_OP_SIGMOID = 7, NR_OP_TANH = 8, NR_OP_SQUARE = 9
} nr_unary_op;

/* out = a (op) b. a, b, out have equal shapes, except that b may have one element (a scalar
 * tensor) or b may broadcast: each of b's dims equals a's or is 1 (same ndim). Any strides. */
nr_status nr_binary(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op);
/* out = a (op) s for a scalar s. */
nr_status nr_binary_scalar(const nr_tensor *a, double s, nr_tensor *out, int32_t op);
/* out = op(a). */
nr_status nr_unary(const nr_tensor *a, nr_tensor *out, int32_t op);
/* y <- alpha * x + y (equal shapes). */
nr_status nr_axpy(const nr_tensor *x, nr_tensor *y, double alpha);

typedef enum { NR_RED_SUM = 0, NR_RED_MEAN = 1, NR_RED_MAX = 2, NR_RED_MIN = 3 } nr_reduce_op;
/* Reduces a over dim (keeping it as size 1 in out), or over everything when dim = -1 (out has
 * one element). Sums accumulate in double. */
nr_status nr_reduce(const nr_tensor *a, int32_t dim, nr_tensor *out, int32_t op);
/* out (int64) <- index of the max along dim (out has dim removed... kept as size 1). */
nr_status nr_argmax(const nr_tensor *a, int32_t dim, nr_tensor *out);

/* out = alpha * op(a) @ op(b) + beta * out, where op transposes when trans_* != 0.
 * a (M, K) or (K, M), b (K, N) or (N, K), out (M, N); 2-d, rows contiguous (stride[1] == 1). */
nr_status nr_matmul(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t trans_a,
                    int32_t trans_b, float alpha, float beta);

/* ---------------------------------------------------------------- files */
/* NumPy .npy (format 1.0/2.0; <f4, <i8, |u1; C order). Returns a new CPU tensor. */
nr_tensor *nr_npy_load(const char *path);
/* Writes t (any device, any strides) as .npy, atomically (temp file + fsync + rename). */
nr_status nr_npy_save(const nr_tensor *t, const char *path);
/* Writes len bytes to path atomically: path.tmp, fsync, rename, fsync of the directory. */
nr_status nr_file_write_atomic(const char *path, const void *bytes, int64_t len);

/* ---------------------------------------------------------------- nn kernels (CPU/CUDA) */
/* (section: layers) */

/* ---------------------------------------------------------------- optimizers */
/* (section: optim) */

/* ---------------------------------------------------------------- data */
/* (section: data) */

/* ---------------------------------------------------------------- neural rejuvenation */
/* (section: nr) */

/* ---------------------------------------------------------------- CUDA runtime */
/* (section: cuda) */

/* NR_FFI_END */

#ifdef __cplusplus
}
#endif
#endif /* NR_H */

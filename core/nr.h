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
/* The status of that failure (NR_E_OOM: an allocation failed), NR_OK when there is none. */
nr_status nr_last_status(void);
/* Clears the message (tests use it). */
void nr_clear_error(void);
/* Library version string, e.g. "0.1.0". */
const char *nr_version(void);
/* Compile-time features: 1 if the library was built with CUDA, 0 otherwise. */
int32_t nr_has_cuda(void);

/* Worker threads for CPU kernels (OpenMP and BLAS). n <= 0 means all cores. */
void nr_set_num_threads(int32_t n);
int32_t nr_get_num_threads(void);
/* CPUs this process may run on (its affinity mask), and CPUs online on the machine. */
int32_t nr_cpu_available(void);
int32_t nr_cpu_online(void);

/* Bytes currently allocated for tensor storage on a device kind (NR_CPU or NR_CUDA),
 * the peak since start (or the last reset), and the number of allocations made so far. */
int64_t nr_memory_in_use(int32_t device);
int64_t nr_memory_peak(int32_t device);
int64_t nr_memory_alloc_count(int32_t device);
void nr_memory_reset_peak(int32_t device);
/* The same three for one GPU (cuda:device_index); reset_peak(NR_CUDA) resets every GPU's too. */
nr_status nr_memory_of_gpu(int32_t device_index, int64_t *in_use, int64_t *peak, int64_t *allocations);
void nr_memory_reset_peak_of_gpu(int32_t device_index);

/* ---------------------------------------------------------------- tensors */

/* NR_BF16: bfloat16 (the top 16 bits of an f32), for mixed-precision activations. CPU tensors of
 * it hold and convert data (copy, fill, get/set round to nearest even); computing with it — the
 * layer kernels, tensor math and matmul — runs on CUDA only (see the layers section). */
typedef enum { NR_F32 = 0, NR_I64 = 1, NR_U8 = 2, NR_BF16 = 3 } nr_dtype;
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
/* A new tensor that views src's storage with the given geometry (checked against the storage,
 * overflow-safe; at most 2^40 elements, as nr_tensor_new). */
nr_tensor *nr_tensor_view(const nr_tensor *src, int32_t ndim, const int64_t *shape,
                          const int64_t *stride, int64_t offset);
/* Releases the view; the storage is released with its last view. NULL is ignored. */
void nr_tensor_free(nr_tensor *t);
/* Number of elements; 1 for ndim 0. */
int64_t nr_tensor_numel(const nr_tensor *t);
/* 1 if the view is contiguous in row-major order. */
int32_t nr_tensor_is_contiguous(const nr_tensor *t);
/* 1 if t is 4-d (N, C, H, W) laid out channels-last (NHWC): strides (H*W*C, 1, W*C, C), sizes of 1
 * ignored as by nr_tensor_is_contiguous (so an (N, C, 1, 1) tensor is both). On CUDA, every
 * layer kernel takes channels-last activations and keeps the layout (x, y, dx, dy and per-element
 * companions such as pooling indices share one); CPU kernels take contiguous tensors only. */
int32_t nr_tensor_is_channels_last(const nr_tensor *t);
/* 1 if a and b share storage. */
int32_t nr_tensor_same_storage(const nr_tensor *a, const nr_tensor *b);
/* Bytes per element of a dtype. */
int32_t nr_dtype_size(int32_t dtype);

/* dst <- src, elementwise over equal shapes, any strides, converting dtype, across devices.
 * Views of one memory: two that are each dense in some order (contiguous, channels-last, or a
 * transpose/permutation of either) and overlap without being the same view are refused (as
 * PyTorch's copy_; a:copy(a:t()) included): copy from a clone. Strided views whose byte spans
 * meet are copied through a temporary, so dst always ends up with src's values. A dst that
 * repeats an element (stride 0 on a dimension of size > 1) is refused. */
nr_status nr_tensor_copy(nr_tensor *dst, const nr_tensor *src);
/* Every element <- value (converted to the tensor's dtype). */
nr_status nr_tensor_fill(nr_tensor *t, double value);
/* out[i] <- src[index[i]] along dim. src (.., S, ..), index (K) int64, out (.., K, ..). For both
 * calls the two tensors are contiguous, or both channels-last (4-d). index lives on the CPU, or on
 * src/dst's GPU (then checked there, which reads a flag back). out (index_select) or src
 * (index_copy) must not overlap the other tensor's memory (refused: copy from a clone). */
nr_status nr_tensor_index_select(const nr_tensor *src, int32_t dim, const nr_tensor *index,
                                 nr_tensor *out);
/* dst[index[i]] <- src[i] along dim. dst (.., D, ..), index (K) int64, src (.., K, ..). With a
 * repeated index the row written there is unspecified on a GPU (as PyTorch's index_copy_). */
nr_status nr_tensor_index_copy(nr_tensor *dst, int32_t dim, const nr_tensor *index,
                               const nr_tensor *src);
/* Reads element i of the flattened view (row-major order over the view) as a double; any NaN
 * comes back as the one canonical quiet NaN (LuaJIT reads other NaN payloads as non-numbers). */
nr_status nr_tensor_get(const nr_tensor *t, int64_t i, double *value);
/* Writes element i of the flattened view. */
nr_status nr_tensor_set(nr_tensor *t, int64_t i, double value);

/* ---------------------------------------------------------------- random numbers */
/* One global generator (xoshiro256**), advanced sequentially, so results do not depend on the
 * thread count. The state is 4 uint64 words, saved in checkpoints. */
void nr_rng_seed(uint64_t seed);
void nr_rng_get_state(uint64_t *state4);
void nr_rng_set_state(const uint64_t *state4);
/* Uniform in [lo, hi) (f32; bf16: the f32 draws rounded), or integers in [lo, hi) for int64/uint8 tensors. */
nr_status nr_rng_uniform(nr_tensor *t, double lo, double hi);
/* Normal(mean, std), f32 (or bf16: the f32 draws rounded). */
nr_status nr_rng_normal(nr_tensor *t, double mean, double std);
/* Bernoulli mask: 1 with probability p, else 0 (f32, bf16 or uint8). */
nr_status nr_rng_bernoulli(nr_tensor *t, double p);
/* A random permutation of 0..n-1 into an int64 tensor of shape (n). */
nr_status nr_rng_permutation(nr_tensor *out);
/* One uint64 draw (for seeding worker generators deterministically). */
uint64_t nr_rng_next(void);

/* ---------------------------------------------------------------- tensor math (f32; bf16 on CUDA) */
/* Operands of one call share a dtype: f32, or bf16 on CUDA (computed in f32, stored rounded). */

typedef enum {
   NR_OP_ADD = 0, NR_OP_SUB = 1, NR_OP_MUL = 2, NR_OP_DIV = 3, NR_OP_MAX = 4, NR_OP_MIN = 5
} nr_binary_op;
typedef enum {
   NR_OP_NEG = 0, NR_OP_ABS = 1, NR_OP_EXP = 2, NR_OP_LOG = 3, NR_OP_SQRT = 4,
   NR_OP_SIGN = 5, NR_OP_RELU = 6, NR_OP_SIGMOID = 7, NR_OP_TANH = 8, NR_OP_SQUARE = 9
} nr_unary_op;

/* out = a (op) b. a, b, out have equal shapes, except that b may have one element (a scalar
 * tensor) or b may broadcast: each of b's dims equals a's or is 1 (same ndim). Any strides.
 * NR_OP_MAX / NR_OP_MIN give NaN when either operand is NaN (torch.maximum / minimum). */
nr_status nr_binary(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op);
/* out = a (op) s for a scalar s. */
nr_status nr_binary_scalar(const nr_tensor *a, double s, nr_tensor *out, int32_t op);
/* out = op(a). NR_OP_RELU keeps a NaN (as nr_relu_forward). */
nr_status nr_unary(const nr_tensor *a, nr_tensor *out, int32_t op);
/* y <- alpha * x + y (equal shapes). */
nr_status nr_axpy(const nr_tensor *x, nr_tensor *y, double alpha);

typedef enum { NR_RED_SUM = 0, NR_RED_MEAN = 1, NR_RED_MAX = 2, NR_RED_MIN = 3 } nr_reduce_op;
/* Reduces a over dim (keeping it as size 1 in out), or over everything when dim = -1 (out has
 * one element). Sums accumulate in double. Max/min are NaN where a NaN is reduced (PyTorch). */
nr_status nr_reduce(const nr_tensor *a, int32_t dim, nr_tensor *out, int32_t op);
/* out (int64) <- index of the max along dim (out has dim removed... kept as size 1): the first
 * maximum, or the first NaN when there is one (PyTorch counts NaN as the maximum). */
nr_status nr_argmax(const nr_tensor *a, int32_t dim, nr_tensor *out);

/* out = alpha * op(a) @ op(b) + beta * out, where op transposes when trans_* != 0.
 * a (M, K) or (K, M), b (K, N) or (N, K), out (M, N); 2-d, rows contiguous (stride[1] == 1).
 * On CUDA the dtypes may mix (mixed precision): when a or b is bf16 the product runs on bf16
 * tensor cores with f32 accumulation (an f32 operand is rounded to bf16 first) and out is f32 or
 * bf16; a bf16 out needs a bf16 operand. out must not overlap a or b in memory (refused). */
nr_status nr_matmul(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t trans_a,
                    int32_t trans_b, float alpha, float beta);

/* ---------------------------------------------------------------- files */
/* NumPy .npy (format 1.0/2.0; <f4, <i8, |u1; C order). Returns a new CPU tensor. */
nr_tensor *nr_npy_load(const char *path);
/* Writes t (any device, any strides) as .npy, atomically (temp file + fsync + rename). */
nr_status nr_npy_save(const nr_tensor *t, const char *path);
/* Writes len bytes to path atomically: path.tmp, fsync, rename, fsync of the directory. */
nr_status nr_file_write_atomic(const char *path, const void *bytes, int64_t len);
/* Puts the folder staged at target in one step, exchanging it with a folder already there
 * (renameat2 RENAME_EXCHANGE; two renames where the file system lacks it): target names a
 * complete folder throughout, and the old one is left at staged for the caller to remove. */
nr_status nr_dir_replace(const char *staged, const char *target);
/* One writer per file: opens (creating) path and takes an exclusive advisory lock on it
 * (flock, non-blocking), writes this process's id into it and gives the open descriptor in *fd;
 * the lock lasts until nr_file_unlock(*fd) or the process ends, however it ends. A lock held
 * elsewhere is NR_E_IO "... is locked by process N", with N (0 when not yet written) in *holder;
 * *holder is -2 when the file system does not support locks (NR_E_IO), -1 otherwise (locked
 * here, or another error).
 * Two opens of one file in one process are two holders. The descriptor is close-on-exec. */
nr_status nr_file_lock(const char *path, int32_t *fd, int64_t *holder);
void nr_file_unlock(int32_t fd);
/* CRC-32 (zlib's, as gzip and PNG) of a whole file into *crc: checkpoints record it so a file
 * changed after it was written (disk or copy corruption) is found before it is loaded. */
nr_status nr_file_crc32(const char *path, uint32_t *crc);

/* ---------------------------------------------------------------- nn kernels (CPU/CUDA) */
/* (section: layers) */
/* Layer kernels: forward and backward of the nr.nn layers (core/nn_*.c on the CPU; the CUDA
 * backend implements nr_cuda_<name> with the identical parameter list, core/cuda/).
 * Common rules for this section:
 *  - Mixed precision: the activations of a call (x, y, dx, dy, logits, dlogits) may be bf16 on
 *    CUDA, all of one dtype; weights, biases, their gradients, BN statistics, dropout masks,
 *    softmax probabilities and the loss stay f32 (the master copy), and conv/matmul round the
 *    weight to bf16 per call. bf16 kernels compute in f32 and round what they store.
 *  - All tensors f32 unless stated; all on the same device; every tensor argument contiguous
 *    (row-major, NCHW). Outputs are allocated by the caller with the documented shape.
 *  - Geometry: Ho = (H + 2*pad_h - dil_h*(KH-1) - 1) / stride_h + 1 (floor), likewise Wo; pools
 *    use dil = 1. stride >= 1, pad >= 0, dil >= 1, and Ho, Wo >= 1, else NR_E_ARG.
 *  - Parameter gradients follow "dW <- acc * dW + scale * dL/dW": acc = 1 accumulates (Torch7
 *    accGradParameters), acc = 0 overwrites (old contents, even NaN, are ignored); scale is
 *    Torch7's accGradParameters scale (1 normally). Input gradients (dx) are always overwritten.
 *  - Results do not depend on the thread count except for float summation order in reductions
 *    over the batch (which is fixed per thread count).
 *  - Convolutions and pools refuse (NR_E_ARG) an output that overlaps in memory a tensor they
 *    read (a module's output buffer passed back as its input); elementwise layers (ReLU, BN in
 *    evaluation mode) may run in place where stated.
 */

/* 2-d convolution (cross-correlation, as PyTorch), with groups.
 * x (N, Cin, H, W); y (N, Cout, Ho, Wo); w (Cout, Cin/groups, KH, KW); b (Cout) or NULL.
 * groups >= 1 divides Cin and Cout. y <- conv(x, w) + b. */
nr_status nr_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w,
                            const nr_tensor *b, int32_t stride_h, int32_t stride_w, int32_t pad_h,
                            int32_t pad_w, int32_t dil_h, int32_t dil_w, int32_t groups);
/* nr_conv2d_forward with a BatchNorm2d in evaluation mode folded in (inference: the conv output
 * is not kept): y = BN_eval(conv(x) + b) with gamma, beta (Cout, both or neither),
 * running_mean, running_var (Cout) and eps exactly as nr_bn2d_forward_eval, then max(y, 0) when
 * relu. Applied to each output plane while it is in cache: one pass less over memory per BN
 * (and per ReLU) than the three layers run one after the other, same values. */
nr_status nr_conv2d_forward_bn(const nr_tensor *x, nr_tensor *y, const nr_tensor *w,
                               const nr_tensor *b, int32_t stride_h, int32_t stride_w,
                               int32_t pad_h, int32_t pad_w, int32_t dil_h, int32_t dil_w,
                               int32_t groups, const nr_tensor *gamma, const nr_tensor *beta,
                               const nr_tensor *running_mean, const nr_tensor *running_var,
                               float eps, int32_t relu);
/* Gradient w.r.t. the input. dy (N, Cout, Ho, Wo); dx (N, Cin, H, W), overwritten;
 * w (Cout, Cin/groups, KH, KW). Geometry arguments as in the forward. */
nr_status nr_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w,
                                  int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                  int32_t dil_h, int32_t dil_w, int32_t groups);
/* Gradients w.r.t. the weight and bias. x (N, Cin, H, W) the forward input; dy (N, Cout, Ho, Wo);
 * dw (Cout, Cin/groups, KH, KW) <- acc * dw + scale * dL/dw; db (Cout) or NULL, same rule. */
nr_status nr_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw,
                                    nr_tensor *db, int32_t stride_h, int32_t stride_w,
                                    int32_t pad_h, int32_t pad_w, int32_t dil_h, int32_t dil_w,
                                    int32_t groups, float scale, float acc);

/* Batch normalisation over (N, H, W) per channel, training mode (batch statistics).
 * x (N, C, H, W); y (N, C, H, W) (may be x itself: in place). Every nr_bn2d_* function also takes
 * x, y, dy, dx as (N, C) or (N, C, L) (BatchNorm1d: statistics over N, or N and L; H*W below
 * reads as L, or 1);
 * save_mean (C) <- batch mean; save_invstd (C) <- 1 / sqrt(biased batch var + eps) (both kept
 * by the caller for nr_bn2d_backward); gamma (C), beta (C): both NULL when affine = false;
 * running_mean, running_var (C), updated in place (PyTorch): r <- (1 - momentum) * r +
 * momentum * stat, with the unbiased variance (n / (n - 1), n = N*H*W) for running_var.
 * y = (x - mean) * invstd * gamma + beta; relu != 0: the ReLU of that (nr_relu_forward's, NaN
 * kept) in the same pass (BN and a ReLU after it fused, one pass over the data instead of two).
 * Needs N*H*W >= 2 (NR_E_ARG otherwise, as PyTorch), except an empty batch (N*H*W = 0): nothing
 * to compute, running statistics untouched, save_mean / save_invstd zeros (its backward leaves dx
 * empty and the parameter gradients at acc * d). */
nr_status nr_bn2d_forward_train(const nr_tensor *x, nr_tensor *y, nr_tensor *save_mean,
                                nr_tensor *save_invstd, const nr_tensor *gamma,
                                const nr_tensor *beta, nr_tensor *running_mean,
                                nr_tensor *running_var, float momentum, float eps, int32_t relu);
/* Evaluation mode: y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta (relu: as
 * above). x, y (N, C, H, W) (y may be x); gamma, beta (C) or both NULL; running_mean,
 * running_var (C). */
nr_status nr_bn2d_forward_eval(const nr_tensor *x, nr_tensor *y, const nr_tensor *gamma,
                               const nr_tensor *beta, const nr_tensor *running_mean,
                               const nr_tensor *running_var, float eps, int32_t relu);
/* Backward of nr_bn2d_forward_train (statistics depend on x).
 * x (N, C, H, W) the forward input; dy (N, C, H, W); dx (N, C, H, W) overwritten, or NULL
 * (not needed); dgamma, dbeta (C) <- acc * d + scale * dL/d, or NULL (affine = false);
 * gamma (C) or NULL (= 1); save_mean, save_invstd (C) from the forward; relu_y: NULL, or the
 * output of a forward with relu = 1, whose ReLU backward is applied to dy first (dy where
 * relu_y > 0, else 0; dy itself is not modified). */
nr_status nr_bn2d_backward(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx,
                           nr_tensor *dgamma, nr_tensor *dbeta, const nr_tensor *gamma,
                           const nr_tensor *save_mean, const nr_tensor *save_invstd, float scale,
                           float acc, const nr_tensor *relu_y);
/* Backward of nr_bn2d_forward_eval (statistics are constants):
 * dx = dy * gamma / sqrt(running_var + eps); dgamma, dbeta as in nr_bn2d_backward.
 * x, dy, dx (N, C, H, W) (dx may be NULL); gamma (C) or NULL; running_mean, running_var (C);
 * relu_y as in nr_bn2d_backward. */
nr_status nr_bn2d_backward_eval(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx,
                                nr_tensor *dgamma, nr_tensor *dbeta, const nr_tensor *gamma,
                                const nr_tensor *running_mean, const nr_tensor *running_var,
                                float eps, float scale, float acc, const nr_tensor *relu_y);

/* Activations, elementwise, any shape (x, y, dy, dx all the same shape; y may be x and dx may
 * be dy: in place). ReLU: y = x > 0 ? x : 0, a NaN kept as NaN (PyTorch; it is never turned into
 * 0, so divergence reaches the loss); backward from the output: dx = y > 0 ? dy : 0 (0 at a NaN).
 * Sigmoid: y = 1 / (1 + exp(-x)); backward from the output: dx = dy * y * (1 - y). */
nr_status nr_relu_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_relu_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx);
nr_status nr_sigmoid_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_sigmoid_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx);
/* More elementwise activations, one entry point each way, kind NR_ACT_*: tanh; ReLU6
 * (min(max(x, 0), 6)); leaky ReLU (x > 0 ? x : alpha x, any alpha); ELU (x > 0 ? x :
 * alpha (exp(x) - 1)); SiLU (x sigmoid(x)); GELU (x Phi(x), erf form; GELU_TANH: PyTorch's
 * approximate='tanh'); Hardswish (x relu6(x + 3) / 6); Hardsigmoid (relu6(x + 3) / 6). PyTorch's
 * formulas and derivatives at the kinks (core/nn_act_math.h, shared with the CUDA twins); NaN
 * stays NaN. x, y: activations (f32, or bf16 on CUDA) of one shape and memory format; y may be x.
 * The backward reads `saved`: the forward's output y for tanh (dx = dy (1 - y^2)) and ReLU6 (dy
 * where 0 < y < 6: 0 at the ends, as PyTorch's hardtanh, and for a NaN, as nr_relu_backward),
 * the forward's input x for the others. alpha is read by leaky ReLU and ELU only (finite). */
enum {
   NR_ACT_TANH = 1, NR_ACT_RELU6 = 2, NR_ACT_LEAKY_RELU = 3, NR_ACT_ELU = 4, NR_ACT_SILU = 5, NR_ACT_GELU = 6,
   NR_ACT_GELU_TANH = 7, NR_ACT_HARDSWISH = 8, NR_ACT_HARDSIGMOID = 9
};
nr_status nr_activation_forward(const nr_tensor *x, nr_tensor *y, int32_t kind, float alpha);
nr_status nr_activation_backward(const nr_tensor *saved, const nr_tensor *dy, nr_tensor *dx, int32_t kind, float alpha);
/* Softmax over the last dimension (PyTorch's softmax(x, dim=-1)), each row of K values:
 * y = exp(x - max) / sum exp(x - max); log_softmax != 0: y = x - max - log sum exp(x - max).
 * x: an activation (f32, or bf16 on CUDA), any shape with ndim >= 1, row-major contiguous; y the
 * same. The sums are in double; a row with a NaN gives NaN, a row of -inf NaN (as PyTorch). */
nr_status nr_softmax_forward(const nr_tensor *x, nr_tensor *y, int32_t log_softmax);
/* Its backward from the forward's output y: softmax dx = y * (dy - sum_k dy * y); log-softmax
 * dx = dy - exp(y) * sum_k dy. */
nr_status nr_softmax_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx, int32_t log_softmax);

/* Max pooling (PyTorch MaxPool2d, dilation 1; padding counts as -inf and must be <= kernel / 2).
 * ceil_mode 0: Ho = floor((H + 2*pad_h - kernel_h) / stride_h) + 1; 1: PyTorch's ceil_mode (ceil
 * instead of floor, the last window clipped to the input, and dropped when it would start past
 * the input and its left padding); likewise Wo. x (N, C, H, W); y (N, C, Ho, Wo); indices
 * (N, C, Ho, Wo) int64 <- argmax position h * W + w inside x's (H, W) plane (PyTorch's
 * convention; first max on ties). */
nr_status nr_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices,
                               int32_t kernel_h, int32_t kernel_w, int32_t stride_h,
                               int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t ceil_mode);
/* dy (N, C, Ho, Wo); indices (N, C, Ho, Wo) int64 from the forward with the same geometry (dy's
 * size is checked against it); dx (N, C, H, W) overwritten: zero except at the argmax positions,
 * where the dy of every window choosing it is summed in window order (the same bits on both
 * devices: the GPU gathers over the windows covering each element, no atomics). An index outside
 * the plane is NR_E_ARG on the CPU; on CUDA it is never matched (checking would cost a
 * device-to-host read every step). */
nr_status nr_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx,
                                int32_t kernel_h, int32_t kernel_w, int32_t stride_h,
                                int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t ceil_mode);
/* Average pooling (PyTorch AvgPool2d; padding <= kernel / 2; ceil_mode as max pooling's).
 * count_include_pad = 1 (PyTorch's default): divide by kernel_h * kernel_w clipped to the padded
 * input; 0: divide by the number of real input elements in the window. x (N, C, H, W);
 * y (N, C, Ho, Wo). */
nr_status nr_avgpool2d_forward(const nr_tensor *x, nr_tensor *y, int32_t kernel_h,
                               int32_t kernel_w, int32_t stride_h, int32_t stride_w, int32_t pad_h,
                               int32_t pad_w, int32_t count_include_pad, int32_t ceil_mode);
/* dy (N, C, Ho, Wo); dx (N, C, H, W) overwritten. Arguments as in the forward. */
nr_status nr_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx, int32_t kernel_h,
                                int32_t kernel_w, int32_t stride_h, int32_t stride_w,
                                int32_t pad_h, int32_t pad_w, int32_t count_include_pad,
                                int32_t ceil_mode);
/* Adaptive pooling (PyTorch AdaptiveMaxPool2d / AdaptiveAvgPool2d): the output size is y's
 * (Ho, Wo), any sizes >= 1 (Ho > H repeats rows); output row oh pools the input rows
 * floor(oh*H/Ho) .. ceil((oh+1)*H/Ho) - 1, likewise columns, so windows may differ in size and
 * overlap. x (N, C, H, W), H, W >= 1; y (N, C, Ho, Wo); indices as nr_maxpool2d_forward's; the
 * average divides by the window's element count. Backwards: dx (N, C, H, W) overwritten, the max
 * as nr_maxpool2d_backward (same sums in the same order on both devices). */
nr_status nr_adaptive_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices);
nr_status nr_adaptive_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices,
                                         nr_tensor *dx);
nr_status nr_adaptive_avgpool2d_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_adaptive_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx);
/* Global average pooling: x (N, C, H, W) -> y (N, C), the mean over (H, W). */
nr_status nr_global_avgpool_forward(const nr_tensor *x, nr_tensor *y);
/* dy (N, C); dx (N, C, H, W) <- dy / (H * W) broadcast, overwritten. */
nr_status nr_global_avgpool_backward(const nr_tensor *dy, nr_tensor *dx);

/* Bias over dimension 1 (Linear, Conv without fused bias): y (N, F, ...) (2-d or more);
 * b (F); y[n, f, ...] += b[f], in place. Linear's matrix products use nr_matmul. */
nr_status nr_bias_add(nr_tensor *y, const nr_tensor *b);
/* db (F) <- acc * db + scale * sum of dy (N, F, ...) over every dimension but 1. */
nr_status nr_bias_backward(const nr_tensor *dy, nr_tensor *db, float scale, float acc);

/* Inverted dropout. x, y (any shape, equal; y may be x); mask (same shape as x) f32, written
 * here: mask = 1 / (1 - p) with probability 1 - p, else 0 (drawn from the global generator,
 * nr_rng_bernoulli); y = x * mask. 0 <= p < 1; p = 0 gives mask = 1, y = x. */
nr_status nr_dropout_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *mask, float p);
/* dx = dy * mask (dy, mask, dx same shape; dx may be dy). */
nr_status nr_dropout_backward(const nr_tensor *dy, const nr_tensor *mask, nr_tensor *dx);

/* Class ids: every element of labels (N) int64 is in 0..num_classes-1, else NR_E_ARG naming the
 * value and its position, e.g. "labels[3] = 10 is outside 0..9". On CUDA this reads one flag
 * back, so it synchronises the stream; check labels on the host before copying them instead. */
nr_status nr_check_class_ids(const nr_tensor *labels, int64_t num_classes);
/* Softmax cross-entropy, mean over the batch, with label smoothing (PyTorch CrossEntropyLoss):
 * target_k = (1 - ls) * [k == label] + ls / K; loss = mean_n sum_k -target_k * log softmax_k.
 * logits (N, K); labels (N) int64, each in 0..K-1 (checked as nr_check_class_ids); loss (one
 * element, any ndim) <- the mean; probs (N, K) <- softmax(logits), kept by the caller for the
 * backward. 0 <= ls <= 1. labels_checked: nonzero when the caller has already checked the
 * labels (on the host, before copying them to the GPU): the CUDA path then skips its check and
 * the stream synchronisation it costs; out-of-range labels would then give wrong numbers but
 * never touch memory outside the tensors. The CPU path always checks (it costs nothing). */
nr_status nr_softmax_xent_forward(const nr_tensor *logits, const nr_tensor *labels,
                                  nr_tensor *loss, nr_tensor *probs, float label_smoothing,
                                  int32_t labels_checked);
/* dlogits (N, K) <- scale * (probs - target) / N, overwritten (scale: dL/dloss, 1 normally).
 * probs (N, K) from the forward; labels (N) int64, checked again unless labels_checked (as in
 * the forward). */
nr_status nr_softmax_xent_backward(const nr_tensor *probs, const nr_tensor *labels,
                                   nr_tensor *dlogits, float label_smoothing, float scale,
                                   int32_t labels_checked);
/* Running classification metrics without reading anything back (no stream synchronisation):
 * acc (4) f32, on the logits' device, += {loss[0] * N, top-1 hits, top-5 hits, N}. logits (N, K)
 * an activation; labels (N) int64; loss: the batch's mean loss (one f32 element) or NULL (acc[0]
 * unchanged). A row is a top-k hit when fewer than k classes score above its label, ties going
 * to the lower class id (as a stable descending sort); a label outside 0..K-1 is never a hit.
 * The f32 counts are exact below 2^24: read and zero acc before that many samples. */
nr_status nr_batch_metrics_add(const nr_tensor *logits, const nr_tensor *labels, const nr_tensor *loss,
                               nr_tensor *acc);

/* ---------------------------------------------------------------- optimizers */
/* (section: optim) */
/* One SGD step on a parameter, in place, with torch.optim.SGD semantics (dampening 0):
 *   d = grad + weight_decay * param
 *   if momentum != 0: buf = momentum * buf + d;  d = nesterov ? d + momentum * buf : buf
 *   param -= lr * d
 * param (any shape) f32, contiguous; grad same shape, contiguous; momentum_buf same shape,
 * contiguous, zero-filled before the first step (which makes the first step set buf = d, as
 * PyTorch does); it may be NULL when momentum == 0. nesterov: 0 or 1 (needs momentum > 0).
 * Elementwise, so results do not depend on the thread count. */
nr_status nr_sgd_step(nr_tensor *param, const nr_tensor *grad, nr_tensor *momentum_buf, float lr,
                      float momentum, float weight_decay, int32_t nesterov);
/* nr_sgd_step for n parameters with the same settings (one parameter group) in one call: every
 * job is checked before any parameter changes (a message names the job), all on one device; on
 * CUDA one kernel launch updates them all. Each job's result equals nr_sgd_step's bit for bit.
 * No two jobs may share a parameter or momentum buffer (nr.optim.SGD refuses a tensor listed
 * twice): the CUDA launch would update it from two blocks at once. */
typedef struct nr_sgd_job {
   nr_tensor *param;
   const nr_tensor *grad;
   nr_tensor *momentum_buf; /* NULL when momentum == 0 */
} nr_sgd_job;
nr_status nr_sgd_step_many(const nr_sgd_job *jobs, int64_t n, float lr, float momentum, float weight_decay,
                           int32_t nesterov);
/* The checks of nr_sgd_step_many alone, changing nothing: an optimizer with several groups
 * checks every group before it steps any, so a refused step leaves all parameters as they were. */
nr_status nr_sgd_check_many(const nr_sgd_job *jobs, int64_t n, float momentum, float weight_decay, int32_t nesterov);

/* One Adam or AdamW step (torch.optim.Adam / AdamW semantics) on each job's parameter, in place;
 * decoupled = 0 is Adam (L2 decay through the gradient), 1 AdamW:
 *   Adam:  d = grad + weight_decay * param          AdamW: param *= 1 - lr * weight_decay; d = grad
 *   exp_avg = beta1 * exp_avg + (1 - beta1) * d;    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * d * d
 *   amsgrad (a job with max_exp_avg_sq): max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq), used below
 *   param -= lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
 * step is the job's step number counting this one (>= 1; per parameter, as PyTorch's
 * state['step']). exp_avg and exp_avg_sq: f32 of the parameter's shape, contiguous, zero-filled
 * before a parameter's first step. Checks, devices and the one CUDA launch as nr_sgd_step_many.
 * The settings are doubles, as PyTorch's Python floats: 1 - beta, the bias corrections and the
 * step size are computed in double and rounded to float where they meet the tensors. */
typedef struct nr_adam_job {
   nr_tensor *param;
   const nr_tensor *grad;
   nr_tensor *exp_avg;
   nr_tensor *exp_avg_sq;
   nr_tensor *max_exp_avg_sq; /* amsgrad's running maximum of exp_avg_sq, or NULL (amsgrad off) */
   int64_t step;
} nr_adam_job;
nr_status nr_adam_step_many(const nr_adam_job *jobs, int64_t n, double lr, double beta1, double beta2, double eps,
                            double weight_decay, int32_t decoupled);
/* The checks of nr_adam_step_many alone, changing nothing. */
nr_status nr_adam_check_many(const nr_adam_job *jobs, int64_t n, double lr, double beta1, double beta2, double eps,
                             double weight_decay);
/* Gradient clipping by the norm of all gradients together (torch.nn.utils.clip_grad_norm_):
 * total (1 element, f32, the grads' device) <- the norm over every element of grads[0..n-1]:
 * norm_type 2 the square root of the sum of squares (summed in double over chunks of the
 * gradients, combined in chunk order: the value does not depend on the thread count), 0 the
 * largest |g| (PyTorch's norm_type = inf; a NaN gives NaN); then every gradient is scaled in
 * place by min(1, (1 / (total + 1e-6)) * max_norm) in float, PyTorch's expression (a NaN total
 * gives NaN gradients, an inf one zeros, or NaN under an inf max_norm, as there; a total past
 * ~1.8e19, whose square overflows PyTorch 1.13's float sum to inf, is exact here). grads: f32,
 * contiguous, on total's device, no tensor twice (it would be scaled twice); max_norm > 0. On
 * CUDA nothing is read back: the scale is computed and applied on the device. */
nr_status nr_clip_grad_norm(nr_tensor *const *grads, int64_t n, nr_tensor *total, double max_norm,
                            int32_t norm_type);

/* ---------------------------------------------------------------- data */
/* (section: data) */
/* Datasets (core/data_dataset.c, data_idx.c, data_cifar.c, data_image.c). Samples are uint8 in C
 * memory (IDX and CIFAR load fully when opened) or decoded per sample from files (image folders,
 * decoded on the loader's worker threads). Opening checks what it can (existence, magic numbers,
 * sizes, image/label count agreement, label range, folder layout) and fails with a message naming
 * the file. A dataset is reference counted: loaders hold a reference; nr_dataset_free drops the
 * caller's, so the order in which a dataset and its loaders are freed does not matter. */
typedef struct nr_dataset nr_dataset;

/* IDX image (magic 0x803, (N, H, W)) and label (magic 0x801, (N)) files, gzipped or raw.
 * classes > 0: labels must lie in 0..classes-1; classes <= 0: classes = max label + 1. */
nr_dataset *nr_dataset_open_idx(const char *images_path, const char *labels_path, int32_t classes);
/* CIFAR binary format. kind 10: data_batch_1..5.bin (train) / test_batch.bin (test), records of
 * 1 label + 3072 pixels; kind 100: train.bin / test.bin, records of coarse + fine label + 3072.
 * Files are looked up in root, then root/cifar-10-batches-bin or root/cifar-100-binary.
 * train != 0: training split. coarse != 0 (CIFAR-100): the 20 coarse labels, else the 100 fine. */
nr_dataset *nr_dataset_open_cifar(const char *root, int32_t kind, int32_t train, int32_t coarse);
/* Image folder root/<class>/[subfolders/]file.{png,jpg,jpeg} (extension case-insensitive, subfolders walked);
 * class k is the k-th subfolder name in byte order, files sorted by path. Samples decode to RGB. */
nr_dataset *nr_dataset_open_imagefolder(const char *root);
/* The same with the class ids of another split (a validation split takes the training split's):
 * class k is classes[k] (k < nclasses); every class subfolder of root must be one of them (else an
 * error names it), classes without a subfolder have no samples. classes NULL: as above. */
nr_dataset *nr_dataset_open_imagefolder_classes(const char *root, const char *const *classes, int32_t nclasses);
/* Drops the caller's reference. NULL is ignored. */
void nr_dataset_free(nr_dataset *ds);
int64_t nr_dataset_size(const nr_dataset *ds);
int32_t nr_dataset_classes(const nr_dataset *ds);
int32_t nr_dataset_channels(const nr_dataset *ds);
/* Sample height and width; 0 when they vary (image folders). */
int32_t nr_dataset_height(const nr_dataset *ds);
int32_t nr_dataset_width(const nr_dataset *ds);
/* Name of class k, 0-based (image folders), NULL otherwise or out of range. */
const char *nr_dataset_class_name(const nr_dataset *ds, int32_t k);
/* File of sample i, 0-based (image folders), NULL otherwise or out of range. */
const char *nr_dataset_path(const nr_dataset *ds, int64_t i);
/* Class id of sample i (0..classes-1); -1 when i is out of range. */
int64_t nr_dataset_label(const nr_dataset *ds, int64_t i);
/* Sample i as a new uint8 (C, H, W) CPU tensor (decoded for image folders). */
nr_tensor *nr_dataset_image(const nr_dataset *ds, int64_t i);

/* Image files. Reads a PNG or JPEG (by content) into a new uint8 (C, H, W) tensor; channels 0
 * keeps the file's (1 gray, 3 RGB, 4 RGBA; gray+alpha gives 1), 1 / 3 / 4 convert (alpha is
 * dropped, not composited, as PIL's convert('RGB')). */
nr_tensor *nr_image_read(const char *path, int32_t channels);
/* img uint8 (C, H, W) on the CPU, any strides; PNG: C in 1, 3, 4; JPEG: C in 1, 3, quality
 * 1..100 (4:2:0 for colour). Written atomically. */
nr_status nr_image_write_png(const nr_tensor *img, const char *path);
nr_status nr_image_write_jpeg(const nr_tensor *img, const char *path, int32_t quality);

/* Batch loader (core/data_loader.c, data_augment.c): worker threads decode and augment samples
 * into a ring of nslots = prefetch + 1 batch buffers, delivered in order. The epoch's order is a
 * permutation drawn from (seed, epoch) and sample i's augmentation from (seed, epoch, i), never
 * from the global generator, so batches do not depend on thread count or timing.
 * Augmentation order: random_resized_crop | resize; center_crop; pad + random crop; flip;
 * channels; /255 and normalize. Zero padding is applied before normalisation (as torchvision).
 * With output_u8 the last step is left to the consumer: the batch holds the bytes 0..255 and
 * nr_images_normalize turns it into exactly the f32 the loader would have made (on a GPU after a
 * copy a quarter the size). */
enum { NR_LOADER_MAX_THREADS = 1024 }; /* worker threads a loader may start */
typedef struct nr_loader_config {
   int32_t batch;              /* samples per batch, >= 1 */
   int32_t shuffle;            /* 1: permute each epoch */
   int32_t drop_last;          /* 1: drop the last incomplete batch */
   int32_t threads;            /* worker threads, 1..NR_LOADER_MAX_THREADS */
   int32_t prefetch;           /* batches decoded ahead, >= 1 */
   int32_t shard_rank;         /* distributed sampler: this rank, 0..shard_size-1 */
   int32_t shard_size;         /* ranks, >= 1; each gets ceil(N / size) samples (wrapping) */
   int32_t pad;                /* zero padding on each side before the random crop */
   int32_t crop;               /* random crop side (0: none; with pad > 0: the input size) */
   int32_t random_resized_crop;/* output side of a random-resized crop (0: none) */
   int32_t resize_h, resize_w; /* exact bilinear resize; resize_w = 0: shorter side to resize_h */
   int32_t center_crop;        /* center crop side (0: none) */
   int32_t flip;               /* 1: horizontal flip with probability 1/2 */
   int32_t channels;           /* output channels (0: as stored; 1 -> 3 replicates, 3 -> 1 luma) */
   int32_t normalize;          /* 1: (x/255 - mean[c]) / std[c], else x/255 */
   int32_t fast_decode;        /* 1: decode JPEGs reduced (DCT scaling 1/2, 1/4, 1/8) when the resize or
                                  random-resized crop shrinks them anyway: faster, not bitwise
                                  equal to the full decode; still a pure function of the seed */
   int32_t output_u8;          /* 1: images are uint8 (batch, C, H, W), not /255 or normalized */
   float mean[4], std[4];
   float scale_lo, scale_hi;   /* random_resized_crop area fraction (0.08, 1) */
   float ratio_lo, ratio_hi;   /* random_resized_crop aspect ratio (3/4, 4/3) */
   uint64_t seed;
} nr_loader_config;
typedef struct nr_loader nr_loader;

/* Starts the worker threads; the loader holds a reference to ds. cfg is copied. Sizes (pad, crop,
 * resize, center_crop, random_resized_crop) and output sides are at most 2^20. The output
 * size is fixed here: an error when it would vary per sample (image folders need a crop or an
 * exact resize). */
nr_loader *nr_loader_new(nr_dataset *ds, const nr_loader_config *cfg);
/* shape4 <- (batch, C, H, W) of a full batch. */
void nr_loader_output_shape(const nr_loader *l, int64_t *shape4);
/* Samples this shard sees per epoch, and batches per epoch. */
int64_t nr_loader_samples(const nr_loader *l);
int64_t nr_loader_nbatches(const nr_loader *l);
/* Number of batch buffers, and buffer `slot`'s images f32 (uint8 with output_u8) (batch, C, H, W) (which = 0) or
 * labels int64 (batch) (which = 1); borrowed: view it (nr_tensor_view) to keep it. */
int32_t nr_loader_nslots(const nr_loader *l);
nr_tensor *nr_loader_buffer(nr_loader *l, int32_t slot, int32_t which);
/* The epoch's sample order for this shard: out int64 (nr_loader_samples) of dataset indices. */
nr_status nr_loader_indices(const nr_loader *l, int64_t epoch, nr_tensor *out);
/* Begins epoch `epoch` (1-based), abandoning any epoch in progress. */
nr_status nr_loader_start(nr_loader *l, int64_t epoch);
/* Waits for the next batch, in order: *slot <- its buffer, *count <- its samples (the first
 * *count rows are valid); *count = 0 at the end of the epoch. The previous batch's buffer is
 * handed back to the workers by this call. A worker's error (an undecodable file) is returned
 * here, naming the file, and ends the epoch; the loader stays usable for nr_loader_start. */
nr_status nr_loader_next(nr_loader *l, int32_t *slot, int32_t *count);
/* Stops and joins the workers, frees the buffers, drops the dataset reference. NULL ignored. */
void nr_loader_free(nr_loader *l);
/* The loader's last step for images it handed out as bytes (output_u8): dst <- per channel c
 * (src / 255 - mean[c]) / std[c], or src / 255 when mean and std are NULL, with the loader's
 * arithmetic (the same f32 values). src uint8 (B, C, H, W) contiguous, C <= 4; dst f32 or bf16 of
 * src's shape on src's device (the GPU's), contiguous or channels-last; std[c] > 0. */
nr_status nr_images_normalize(const nr_tensor *src, const float *mean, const float *std, nr_tensor *dst);

/* ---------------------------------------------------------------- neural rejuvenation */
/* (section: nr) */
/* Liveliness of one BN's channels (paper 3.1.1). gamma (C) f32, contiguous or strided; mask (C)
 * uint8 on the same device, written 1 = live, 0 = dead. A channel is live iff
 * |gamma_c| >= threshold_rel * max|gamma| (paper: 0.01); when max|gamma| < abs_min (paper code:
 * 1e-3) the layer is dead as a whole and every entry is 0. *live (a host pointer) receives the
 * number of live channels. */
nr_status nr_bn_live_mask(const nr_tensor *gamma, nr_tensor *mask, float threshold_rel, float abs_min,
                          int64_t *live);
/* The L1 subgradient on BN scales: grad_c += lambda * sign(gamma_c), sign(0) = 0.
 * gamma (C) f32, grad (C) f32 on the same device. */
nr_status nr_l1_sign_add(const nr_tensor *gamma, nr_tensor *grad, float lambda);
/* NR-CA cross attention (paper 3.3), elementwise over equal shapes: the output of a receiving
 * group is out = a + 2 * sigmoid(a) * b, with a its own response and b the sum of the cross
 * responses; gate <- sigmoid(a) is kept for the backward. a, b, out, gate: contiguous activations
 * (f32, or bf16 on CUDA) of one shape, dtype and device; out may be a or b. */
nr_status nr_cross_attention_forward(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, nr_tensor *gate);
/* Its backward, from the forward's gate s and b and the output gradient g:
 * da = g * (1 + 2 * s * (1 - s) * b) (the gate is not detached), db = 2 * s * g. Same rules as the
 * forward; da and db overwritten (either may be g). */
nr_status nr_cross_attention_backward(const nr_tensor *gate, const nr_tensor *b, const nr_tensor *g, nr_tensor *da,
                                      nr_tensor *db);
/* Surgery placement: writes every element of dst (f32, contiguous, ndim >= 1) in one pass,
 *   dst[a_rows[1][i], a_cols[1][j], ...] = a[a_rows[0][i], a_cols[0][j], ...]   gathered block
 *   dst[b_rows[i], b_cols[j], ...]       = b[i, j, ...]                           new block
 *   every other element                  = fill.
 * a_rows (2, K) / a_cols (2, L): int64 CPU tensors of (source, destination) positions along
 * dims 0 / 1; b_rows (K2) / b_cols (L2): destination positions. With both column maps NULL only
 * dim 0 is remapped (a is (S0, ...), b is (K2, ...)). a and b (f32, contiguous, on dst's device)
 * match dst in the dimensions that are not remapped; a may be NULL (with its maps NULL too).
 * b NULL with b_rows given: the new block is drawn N(0, b_std^2), element e of the block (in
 * row-major order) a function of (b_seed, e) only (SplitMix64 + Box-Muller), so the result does
 * not depend on the thread count; b_std and b_seed are ignored otherwise. Destinations must be
 * distinct and the blocks must not overlap. The NR surgery builds every resized tensor with it:
 * [survivors | new channels], new channels = fill (0, or gamma0 / 1 for BN vectors) or a fresh
 * (Kaiming) block. */
nr_status nr_surgery_place(nr_tensor *dst, float fill, const nr_tensor *a, const nr_tensor *a_rows,
                           const nr_tensor *a_cols, const nr_tensor *b, const nr_tensor *b_rows,
                           const nr_tensor *b_cols, float b_std, uint64_t b_seed);
/* The same for n jobs in one call (one parallel region over the rows of all of them). Every job
 * is checked before anything is written: a bad one fails the call, naming the job. Every dst on
 * one device. */
typedef struct nr_place_job {
   nr_tensor *dst;
   const nr_tensor *a, *a_rows, *a_cols;
   const nr_tensor *b, *b_rows, *b_cols;
   float fill, b_std;
   uint64_t b_seed;
} nr_place_job;
nr_status nr_surgery_place_many(const nr_place_job *jobs, int64_t n);

/* ---------------------------------------------------------------- CUDA runtime */
/* (section: cuda) */
/* CUDA runtime (core/cuda/runtime.c; in a build without CUDA, core/device.c answers "no
 * devices" and the functions that need one fail with NR_E_DEVICE). Device indices are 0-based.
 * Everything here works without a GPU. */
/* Number of visible GPUs; 0 without CUDA, without a driver or without a device. */
int32_t nr_cuda_device_count(void);
/* 1 when tensors can be placed on a GPU (built with CUDA and at least one device), else 0. */
int32_t nr_cuda_available(void);
/* Why nr_cuda_available() is 0, e.g. "this nrlua was built without CUDA" or
 * "cudaGetDeviceCount: no CUDA-capable device is detected"; "" when it is 1. */
const char *nr_cuda_unavailable_reason(void);
/* Selects the GPU on which this thread creates new CUDA tensors (default 0). */
nr_status nr_cuda_set_device(int32_t device_index);
int32_t nr_cuda_current_device(void);
/* Library versions, as CUDA encodes them (e.g. 13000, 91900): v[0] CUDA runtime (linked in),
 * v[1] driver (0 without one), v[2] cuDNN loaded, v[3] cuDNN built against, v[4] cuBLAS loaded
 * (major * 10000 + minor * 100 + patch), v[5] cuBLAS built against. Needs no GPU; NR_E_DEVICE
 * in a build without CUDA. */
nr_status nr_cuda_versions(int32_t *v);
/* Name of a GPU, e.g. "NVIDIA H100 80GB HBM3"; NULL when out of range or unavailable. */
const char *nr_cuda_device_name(int32_t device_index);
/* Free and total memory of a GPU in bytes (as the driver sees it; cached blocks count as used). */
nr_status nr_cuda_mem_info(int32_t device_index, int64_t *free_bytes, int64_t *total_bytes);
/* Waits for the work queued on every GPU this process used; reports asynchronous errors. */
nr_status nr_cuda_synchronize(void);
/* Bytes held in the caching allocator's free lists (of one GPU, or all when device_index < 0). */
int64_t nr_cuda_memory_cached(int32_t device_index);
/* Returns every cached block to the driver (cudaFree); memory of live tensors is untouched. */
nr_status nr_cuda_empty_cache(void);
/* allow = 1: cuDNN convolutions and cuBLAS matmuls may use TF32 tensor cores (faster, about
 * 1e-3 relative error; PyTorch's default for convolutions); 0 (the default): full fp32. */
void nr_cuda_set_allow_tf32(int32_t allow);
int32_t nr_cuda_get_allow_tf32(void);
/* on = 1: cuDNN convolutions use only algorithms that give the same bits on every run, chosen
 * by cuDNN's heuristics instead of a timed search (timings differ from run to run, and so would
 * the algorithm: PyTorch's cudnn.deterministic with cudnn.benchmark off; perhaps slower); the own
 * kernels are deterministic anyway, so a GPU run with the same seed and data order is then
 * reproducible on the same GPU and cuDNN version. 0 (the default): any, timed. */
void nr_cuda_set_deterministic(int32_t on);
int32_t nr_cuda_get_deterministic(void);
/* The largest activation (elements) one cuDNN convolution call takes; a batch whose input or
 * output is larger runs as consecutive calls on slices of its samples (weight gradients summed).
 * Default and maximum 2^31 - 1, the legacy API's 32-bit indexing; n <= 0 restores it. Lower it to
 * bound a call (the specs use it to exercise the split on small tensors). */
void nr_cuda_set_conv_max_elements(int64_t n);
int64_t nr_cuda_get_conv_max_elements(void);
/* Convolution plans made so far (one per distinct shape, layout, dtype and mode; each runs its
 * algorithm search once). */
int64_t nr_cuda_conv_plan_count(void);
/* Input prefetch: dst (CUDA, contiguous) <- src (CPU, contiguous, same dtype and shape) on the
 * GPU's copy stream, so the copy overlaps the work of the compute stream. The copy starts after
 * the work queued on the compute stream so far (which may still read dst); src may be reused when
 * this returns (its bytes were staged); *ticket names the copy. Before anything reads dst, the
 * compute stream must wait for it: nr_cuda_prefetch_wait. A dst freed before that is safe (the
 * allocator makes the compute stream wait for a pending copy into a freed block). */
nr_status nr_cuda_prefetch(nr_tensor *dst, const nr_tensor *src, int64_t *ticket);
/* The compute stream of the GPU waits (on the GPU; the host does not) for prefetch `ticket` and
 * every earlier one. */
nr_status nr_cuda_prefetch_wait(int32_t device_index, int64_t ticket);

/* ---------------------------------------------------------------- distributed (libnr_dist) */
/* Data-parallel collectives in the separate library libnr_dist (linked to MPI, and to NCCL in
 * CUDA builds), loaded only by lua/nr/dist.lua, so plain nrlua runs never load MPI. One process
 * per rank (mpirun); these are called from the Lua thread, every rank calling the same
 * collectives in the same order. Tensors given to collectives are contiguous and are reduced or
 * broadcast in place: CPU tensors through MPI, CUDA tensors through NCCL.
 * Failure policy: every wait is bounded by the timeout (then the call fails and names the
 * collective); a process exiting with a non-zero status while MPI is up calls MPI_Abort, so the
 * launcher ends every rank; a rank stopped by the launcher (SIGTERM) says so on stderr. */
typedef enum { NR_DIST_SUM = 0, NR_DIST_MAX = 1, NR_DIST_MIN = 2 } nr_dist_op;
typedef enum {
   NR_DIST_ORDERED = 0, /* CPU: all-to-all of 1/N chunks, each summed in rank order 0..N-1 in
                           double and rounded once, then all-gather: bit-identical on every rank
                           whatever MPI's algorithm; sends 2(N-1)/N of the buffer, as a ring */
   NR_DIST_MPI = 1,     /* CPU: MPI_Allreduce (MPI picks the algorithm; not guaranteed bit-stable) */
   NR_DIST_NCCL = 2     /* CUDA: ncclAllReduce on the communication stream */
} nr_dist_algo;

/* Initialises MPI (MPI_THREAD_FUNNELED) unless it already is; idempotent. timeout_s: seconds any
 * collective may wait (0: forever; < 0: $NR_DIST_TIMEOUT, else 1800). */
nr_status nr_dist_init(double timeout_s);
int32_t nr_dist_initialized(void);
int32_t nr_dist_rank(void);         /* 0..size-1 */
int32_t nr_dist_size(void);         /* ranks in the job */
int32_t nr_dist_local_rank(void);   /* rank among the processes on this machine (its GPU) */
int32_t nr_dist_local_size(void);
/* seconds < 0: $NR_DIST_TIMEOUT, else 1800; 0: wait forever. */
void nr_dist_set_timeout(double seconds);
/* Wall-clock seconds. */
double nr_dist_wtime(void);
nr_status nr_dist_barrier(void);
/* t <- scale * op over ranks of t (scale applies to NR_DIST_SUM). t: contiguous f32, or int64
 * with scale 1; algo: nr_dist_algo (NR_DIST_NCCL for CUDA tensors, the others for CPU). */
nr_status nr_dist_allreduce(nr_tensor *t, int32_t op, int32_t algo, double scale);
/* The same, started: *handle (1..256) names it until nr_dist_wait returns NR_OK; t must stay
 * alive and untouched until then. nr_dist_test progresses it and sets *done to 1 when finished. */
nr_status nr_dist_allreduce_start(nr_tensor *t, int32_t op, int32_t algo, double scale,
                                  int32_t *handle);
nr_status nr_dist_test(int32_t handle, int32_t *done);
nr_status nr_dist_wait(int32_t handle);
/* t <- root's t (any dtype, contiguous, the same shape on every rank). */
nr_status nr_dist_broadcast(nr_tensor *t, int32_t root);
/* buf[0..len) <- root's bytes (len equal on every rank). */
nr_status nr_dist_broadcast_bytes(void *buf, int64_t len, int32_t root);
/* out (size * n doubles, rank-major) <- every rank's in (n doubles). */
nr_status nr_dist_allgather_f64(const double *in, int32_t n, double *out);
/* 64-bit hash of a CPU tensor's values in row-major order (any strides); not a collective. */
nr_status nr_dist_fingerprint(const nr_tensor *t, uint64_t *hash);
/* 1 when libnr_dist was built with NCCL. */
int32_t nr_dist_has_nccl(void);
/* NCCL communicator over the job on GPU device_index (id from rank 0 through MPI_Bcast). */
nr_status nr_dist_nccl_init(int32_t device_index);
/* Frees NCCL and the communicators and finalizes MPI (every rank calls it; at a clean exit it
 * runs by itself). */
nr_status nr_dist_finalize(void);
/* Prints "nrlua rank r/N: message" on stderr and ends the whole job (MPI_Abort(code)); returns
 * only when MPI is not running. */
void nr_dist_abort(int32_t code, const char *message);
/* While busy (nr.train between train_begin and train_end), an exit even with status 0 ends the
 * whole job (MPI_Abort): the other ranks would wait for this one in a collective until the
 * timeout. Outside it a clean exit finalizes MPI. */
void nr_dist_set_busy(int32_t busy);

/* NR_FFI_END */

#ifdef __cplusplus
}
#endif
#endif /* NR_H */

/* conv.c — 2-d convolutions on cuDNN: forward, backward data, backward filter (+ bias), with
 * groups (grouped and depthwise convolutions are cuDNN group counts).
 *
 * What it is: a plan cache keyed by (device, shapes, geometry, groups, math mode) holding the
 * cuDNN descriptors and, per direction, the algorithm chosen the first time the shape is seen:
 * cudnnFind*AlgorithmEx (measured on the real buffers; set NR_CUDNN_FIND=0 for the
 * cudnnGet*_v7 heuristics instead). Workspaces come from the caching allocator (scratch slot 4).
 * What it is not: im2col fallbacks; every failure is reported, nothing silently runs on the host.
 * Layout: NCHW, or channels-last (NHWC) when the activations are (key[17]); then the weight is
 * handed to cuDNN as KRSC (converted per call with the dtype, scratch slot 5) and its gradient
 * comes back KRSC (scratch slot 5) and is folded into the KCRS dw, as for bf16.
 * Batches whose input or output would reach 2^31 elements (the legacy API's 32-bit indexing;
 * nr_cuda_set_conv_max_elements lowers the bound) run as calls on consecutive slices of their
 * samples (each slice 256-byte aligned where the sample size allows), the weight gradient summed
 * over them.
 * Invariants: activations (x, y, dx, dy) f32 or bf16, weights and their gradients always
 * f32 (the master copy). f32: math mode CUDNN_FMA_MATH (exact fp32) unless TF32 is allowed
 * (nr_cuda_set_allow_tf32), in which case the algorithm's own math type is used; backward filter
 * computes dw <- acc * dw + scale * dL/dw through cuDNN's alpha/beta (beta = 0 never reads dw).
 * bf16 (mixed precision): cuDNN's bf16 configuration (bf16 data, f32 compute) on tensor cores;
 * the weight is converted to bf16 per call (scratch slot 5) and the bf16 weight gradient is
 * folded into the f32 dw by nr_cuda_launch_acc. The algorithm search never writes dw.
 */
#include "cuda_common.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { KEY_LEN = 20, NBUCKETS = 509, FIND_BUDGET_MAX = 1 << 30 };

typedef struct plan {
   int32_t key[KEY_LEN];
   cudnnTensorDescriptor_t xd, yd;
   cudnnFilterDescriptor_t wd;
   /* one convolution descriptor per direction (0 forward, 1 backward data, 2 backward filter):
    * at the plan's base math type while its algorithm is searched, then at the math type that
    * algorithm runs with, so a call never changes a descriptor another direction shares */
   cudnnConvolutionDescriptor_t cd[3];
   int fwd_ready, bwdd_ready, bwdf_ready;
   cudnnConvolutionFwdAlgo_t fwd;
   cudnnConvolutionBwdDataAlgo_t bwdd;
   cudnnConvolutionBwdFilterAlgo_t bwdf;
   size_t fwd_ws, bwdd_ws, bwdf_ws;
   struct plan *next;
} plan;

static plan *g_plans[NBUCKETS];
static pthread_mutex_t g_plan_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t g_nplans; /* plans made (under g_plan_lock) */

int64_t nr_cuda_conv_plan_count(void)
{
   pthread_mutex_lock(&g_plan_lock);
   int64_t n = g_nplans;
   pthread_mutex_unlock(&g_plan_lock);
   return n;
}

/* NR_TRY that puts the convolution's description in front of the inner error (e.g. which conv
 * ran out of memory for its weight copy). */
#define TRY_IN(what, expr)                                                                        \
   do {                                                                                           \
      nr_status try_in_ = (expr);                                                                 \
      if (try_in_ != NR_OK) return nr_fail_wrap(try_in_, what);                                   \
   } while (0)

typedef struct {
   int64_t n, cin, h, w, cout, kh, kw, ho, wo;
} cgeom;

static const char *dir_name(int d) { return d == 0 ? "forward" : d == 1 ? "backward data" : "backward filter"; }

/* "conv2d x (N, C, H, W) w (...) stride 1x1 pad 0x0 dil 1x1 groups 1" for messages. */
static const char *conv_desc(const nr_tensor *x, const nr_tensor *w, const int32_t *k)
{
   static _Thread_local char buf[512];
   snprintf(buf, sizeof buf, "conv2d %s x %s stride %dx%d pad %dx%d dil %dx%d groups %d", NR_DESC(x), NR_DESC(w),
            k[10], k[11], k[12], k[13], k[14], k[15], k[9]);
   return buf;
}

static unsigned hash_key(const int32_t *k)
{
   uint32_t h = 2166136261u;
   for (int i = 0; i < KEY_LEN; i++) {
      h ^= (uint32_t)k[i];
      h *= 16777619u;
   }
   return h % NBUCKETS;
}

/* The math type a plan searches under (key: 8 tf32, 16 dtype): bf16 on tensor cores (as PyTorch
 * sets for half types), f32 with TF32 allowed: cuDNN's default, else exact fp32 FMA. */
static cudnnMathType_t base_math(const int32_t *k)
{
   if (k[16] == NR_BF16) return CUDNN_TENSOR_OP_MATH;
   return k[8] ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
}

static nr_status make_plan(const int32_t *k, const nr_tensor *x, const nr_tensor *w, plan **out)
{
   plan *p = calloc(1, sizeof *p);
   if (!p) return NR_FAIL(NR_E_OOM, "out of host memory");
   memcpy(p->key, k, sizeof p->key);
   const char *what = conv_desc(x, w, k);
   const cudnnDataType_t dt = k[16] == NR_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
   const cudnnTensorFormat_t fmt = k[17] ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
   nr_status st = NR_OK;
#define DN(expr)                                                                                 \
   do {                                                                                         \
      cudnnStatus_t e_ = (expr);                                                                \
      if (e_ != CUDNN_STATUS_SUCCESS && !st) st = nr_cuda_fail_dnn(e_, __func__, __FILE__, __LINE__, "%s: %s", what, #expr); \
   } while (0)
   DN(cudnnCreateTensorDescriptor(&p->xd));
   DN(cudnnCreateTensorDescriptor(&p->yd));
   DN(cudnnCreateFilterDescriptor(&p->wd));
   for (int d = 0; d < 3; d++) DN(cudnnCreateConvolutionDescriptor(&p->cd[d]));
   if (!st) {
      /* key: 0 dev, 1 n, 2 cin, 3 h, 4 w, 5 cout, 6 kh, 7 kw, 8 tf32, 9 groups, 10 sh, 11 sw,
       * 12 ph, 13 pw, 14 dh, 15 dw, 16 activation dtype (NR_F32 or NR_BF16), 17 channels-last,
       * 18 deterministic algorithms only */
      DN(cudnnSetTensor4dDescriptor(p->xd, fmt, dt, k[1], k[2], k[3], k[4]));
      DN(cudnnSetFilter4dDescriptor(p->wd, dt, fmt, k[5], k[2] / k[9], k[6], k[7]));
      for (int d = 0; d < 3; d++) {
         DN(cudnnSetConvolution2dDescriptor(p->cd[d], k[12], k[13], k[10], k[11], k[14], k[15],
                                            CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
         DN(cudnnSetConvolutionGroupCount(p->cd[d], k[9]));
         DN(cudnnSetConvolutionMathType(p->cd[d], base_math(k)));
      }
   }
   int on = 0, oc = 0, oh = 0, ow = 0;
   if (!st) DN(cudnnGetConvolution2dForwardOutputDim(p->cd[0], p->xd, p->wd, &on, &oc, &oh, &ow));
   if (!st) DN(cudnnSetTensor4dDescriptor(p->yd, fmt, dt, on, oc, oh, ow));
#undef DN
   if (st) {
      if (p->xd) cudnnDestroyTensorDescriptor(p->xd);
      if (p->yd) cudnnDestroyTensorDescriptor(p->yd);
      if (p->wd) cudnnDestroyFilterDescriptor(p->wd);
      for (int d = 0; d < 3; d++)
         if (p->cd[d]) cudnnDestroyConvolutionDescriptor(p->cd[d]);
      free(p);
      return st;
   }
   *out = p;
   return NR_OK;
}

/* The alignment of an address in bytes, up to 16 (what vectorized tensor-core kernels load). */
static int32_t align16(const void *ptr)
{
   const uintptr_t a = (uintptr_t)ptr;
   int32_t al = 1;
   while (al < 16 && a % (uintptr_t)(2 * al) == 0) al *= 2;
   return al;
}

/* The plan of a convolution; x is (N, Cin, H, W), w (Cout, Cin/groups, KH, KW), y's spatial size
 * (Ho, Wo) is checked against cuDNN's; y_data: the other activation's memory (y, or dy); nhwc:
 * the activations are channels-last. The key holds the two activations' alignment (as PyTorch's
 * cuDNN cache does): an algorithm picked on 16-byte aligned memory may need it, and a batch split
 * into slices (batch_chunk) can leave a slice less aligned than the first. */
static nr_status get_plan(const char *func, const nr_tensor *x, const void *y_data, const nr_tensor *w, int64_t ho,
                          int64_t wo, int32_t sh, int32_t sw, int32_t ph, int32_t pw, int32_t dh, int32_t dw,
                          int32_t groups, int nhwc, plan **out)
{
   const int64_t dims[] = {x->shape[0], x->shape[1], x->shape[2], x->shape[3], w->shape[0], w->shape[2], w->shape[3]};
   for (int i = 0; i < 7; i++)
      if (dims[i] > INT32_MAX)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s x %s: sizes exceed cuDNN's 32-bit limits", NR_DESC(x),
                           NR_DESC(w));
   if (groups < 1 || x->shape[1] % groups || w->shape[0] % groups || w->shape[1] * groups != x->shape[1])
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "groups %d does not fit x %s and w %s", groups, NR_DESC(x),
                        NR_DESC(w));
   /* the legacy descriptors take int strides: no tensor may span 2^31 elements (the entry points
    * split larger batches, so this is one sample too large) */
   const int64_t ny = x->shape[0] * w->shape[0] * ho * wo;
   if (nr_tensor_numel(x) > INT32_MAX || ny > INT32_MAX)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "x %s or its output (%lld elements) spans 2^31 elements or more, beyond cuDNN's 32-bit "
                        "indexing, even for one sample",
                        NR_DESC(x), (long long)ny);
   const int32_t ax = align16(x->data), ay = align16(y_data);
   int32_t k[KEY_LEN] = {x->device_index,    (int32_t)dims[0], (int32_t)dims[1], (int32_t)dims[2], (int32_t)dims[3],
                         (int32_t)dims[4],   (int32_t)dims[5], (int32_t)dims[6], nr_cuda_tf32_allowed(), groups,
                         sh, sw, ph, pw, dh, dw, x->dtype, nhwc, nr_cuda_get_deterministic(),
                         ax < ay ? ax : ay};
   unsigned hb = hash_key(k);
   pthread_mutex_lock(&g_plan_lock);
   plan *p = g_plans[hb];
   while (p && memcmp(p->key, k, sizeof k) != 0) p = p->next;
   pthread_mutex_unlock(&g_plan_lock);
   if (!p) {
      NR_TRY(make_plan(k, x, w, &p));
      pthread_mutex_lock(&g_plan_lock);
      p->next = g_plans[hb];
      g_plans[hb] = p;
      g_nplans++;
      pthread_mutex_unlock(&g_plan_lock);
   }
   int n = 0, c = 0, oh = 0, ow = 0;
   NR_CUDNN(cudnnGetTensor4dDescriptor(p->yd, &(cudnnDataType_t){CUDNN_DATA_FLOAT}, &n, &c, &oh, &ow,
                                       &(int){0}, &(int){0}, &(int){0}, &(int){0}),
            "%s", conv_desc(x, w, k));
   if (oh != ho || ow != wo)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: output is %d x %d, the tensor has %lld x %lld",
                        conv_desc(x, w, k), oh, ow, (long long)ho, (long long)wo);
   *out = p;
   return NR_OK;
}

static int use_find(void)
{
   const char *e = getenv("NR_CUDNN_FIND");
   return !(e && e[0] == '0');
}

/* Workspace budget for the algorithm search: a quarter of what is free (cached blocks count as
 * free for us), at most 1 GiB. */
static size_t find_budget(nr_cuda_ctx *ctx)
{
   size_t fr = 0, tot = 0;
   if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) {
      cudaGetLastError();
      return 64u << 20;
   }
   size_t b = (fr + (size_t)nr_cuda_memory_cached(ctx->device)) / 4;
   return b > (size_t)FIND_BUDGET_MAX ? (size_t)FIND_BUDGET_MAX : b;
}

static nr_status search(nr_cuda_ctx *ctx, plan *p, int dir, const void *x, const void *w, const void *y,
                        const char *what, int find, void *ws, size_t budget);

/* Picks the algorithm of one direction (0 fwd, 1 bwd data, 2 bwd filter) for plan p.
 * Buffers: x, w, y as in the forward (for direction 1 y is dy and x is dx; for 2 w is a scratch
 * stand-in for dw). */
static nr_status choose_algo(nr_cuda_ctx *ctx, plan *p, int dir, const void *x, const void *w, const void *y,
                             const char *what)
{
   /* search under the plan's base math type (a direction chosen again, by plan_workspace, left
    * its descriptor at its old algorithm's math type, which may exclude tensor-core algorithms) */
   NR_CUDNN(cudnnSetConvolutionMathType(p->cd[dir], base_math(p->key)), "%s: cudnnSetConvolutionMathType", what);
   /* deterministic plans (nr.cuda.set_deterministic) take cuDNN's heuristics under a fixed budget:
    * a measured search picks the fastest of the deterministic algorithms by timings (and a budget
    * from free memory) that differ from run to run, and different algorithms give different bits;
    * the heuristics are a function of the GPU, the cuDNN version and the shape (as PyTorch, whose
    * deterministic mode also needs cudnn.benchmark off) */
   const int deterministic = p->key[18] != 0;
   size_t budget = deterministic ? (size_t)FIND_BUDGET_MAX : find_budget(ctx);
   void *ws = NULL;
   const int find = use_find() && !deterministic;
   /* the search workspace comes straight from the driver and goes back at once, so a large
    * one-off budget does not stay in the allocator's cache; the budget counted cached blocks as
    * free, so when the driver says no they are handed back to it once before the budget shrinks
    * (a plan keeps what its search found, so a starved search would cost every later step) */
   int emptied = 0;
   while (find && budget > 0 && cudaMalloc(&ws, budget) != cudaSuccess) {
      cudaGetLastError();
      ws = NULL;
      if (!emptied && nr_cuda_memory_cached(ctx->device) > 0) {
         nr_cuda_empty_cache_of(ctx->device);
         emptied = 1;
         continue;
      }
      budget = budget > (16u << 20) ? budget / 2 : 0;
   }
   nr_status st = search(ctx, p, dir, x, w, y, what, find, ws, budget);
   if (ws) {
      cudaError_t e = cudaFree(ws);
      if (e != cudaSuccess && !st) st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "%s: freeing the search workspace", what);
   }
   /* a measured search that failed as a whole (cuDNN refusing the Find call, or no measured
    * algorithm usable) falls back to cuDNN's heuristics, which run nothing, instead of failing the
    * layer; a recoverable error the search left (out of memory) is cleared first, while a sticky
    * one (the context is lost) still shows in the stream's state and is not hidden */
   if (st != NR_OK && find) {
      (void)cudaGetLastError();
      cudaError_t live = cudaStreamQuery(ctx->stream); /* NotReady: still running, which is fine */
      if (live == cudaErrorNotReady) (void)cudaGetLastError(); /* not left for the next launch check */
      if (live == cudaSuccess || live == cudaErrorNotReady) {
         NR_CUDNN(cudnnSetConvolutionMathType(p->cd[dir], base_math(p->key)), "%s: cudnnSetConvolutionMathType",
                  what);
         st = search(ctx, p, dir, NULL, NULL, NULL, what, 0, NULL, budget);
      }
   }
   return st;
}

/* ---- batches beyond cuDNN's 32-bit indexing: consecutive samples per call */

static int64_t g_max_elements = INT32_MAX;

void nr_cuda_set_conv_max_elements(int64_t n) { g_max_elements = n <= 0 || n > INT32_MAX ? INT32_MAX : n; }
int64_t nr_cuda_get_conv_max_elements(void) { return g_max_elements; }

/* Samples whose bytes in t are a multiple of 256 (a power of two up to 256). */
static int64_t aligned_samples(const nr_tensor *t)
{
   int64_t bytes = t->stride[0] * nr_dtype_size(t->dtype), m = 256;
   while (m > 1 && bytes % 2 == 0) bytes /= 2, m /= 2;
   return m;
}

/* Samples per cuDNN call of a convolution over n samples whose activations (input and output)
 * are a and b: all n while both stay within the limit, else as many as fit (at least one),
 * rounded down to a multiple of the samples that keep every slice 256-byte aligned in both
 * (tensor-core kernels want 16-byte aligned pointers; bf16 samples of an odd number of elements
 * would otherwise start slices 2 bytes apart). Only samples so large that one call holds fewer
 * than that multiple (16M elements each in bf16) stay unaligned: their slices get plans of their
 * own, the algorithm searched on their own addresses (the plan key holds the alignment). */
static int64_t batch_chunk(const nr_tensor *a, const nr_tensor *b)
{
   const int64_t n = a->shape[0], big = nr_tensor_numel(a) > nr_tensor_numel(b) ? nr_tensor_numel(a) : nr_tensor_numel(b);
   if (n <= 1 || big <= g_max_elements) return n;
   const int64_t per = big / n, c = g_max_elements / per;
   if (c < 1) return 1;
   const int64_t ma = aligned_samples(a), mb = aligned_samples(b), m = ma > mb ? ma : mb; /* powers of two */
   return c >= m ? c - c % m : c;
}

/* Samples [n0, n0 + nb) of a 4-d activation, viewing t's memory (N is the outermost dimension
 * of both layouts, so the slice keeps t's format). */
static nr_tensor batch_view(const nr_tensor *t, int64_t n0, int64_t nb)
{
   nr_tensor v = *t;
   v.shape[0] = nb;
   v.data = (char *)t->data + n0 * t->stride[0] * nr_dtype_size(t->dtype);
   return v;
}

/* An algorithm the search offered that runs, fits the workspace budget and, when the plan asks
 * for it (nr.cuda.set_deterministic), gives the same bits on every run. */
static int usable(const plan *p, cudnnStatus_t st, size_t memory, cudnnDeterminism_t det, size_t budget)
{
   return st == CUDNN_STATUS_SUCCESS && memory <= budget && (!p->key[18] || det == CUDNN_DETERMINISTIC);
}

/* No algorithm fits (none supported, or none within the workspace the device could give). */
static nr_status no_algorithm(const plan *p, const char *what, const char *dir)
{
   return nr_fail_at(NR_E_DEVICE, "search", __FILE__, __LINE__, "%s: cuDNN offers no usable %s algorithm%s", what, dir,
                     p->key[17] ? " for channels-last activations (train with --memory-format contiguous)"
                     : p->key[18] ? " that is deterministic (nr.cuda.set_deterministic(false) allows the others)" : "");
}

/* The math type direction dir runs with, given the one its algorithm was chosen with (f32: exact
 * unless TF32 is allowed; bf16: always the algorithm's, tensor cores). */
static cudnnMathType_t run_math(const plan *p, cudnnMathType_t m)
{
   return base_math(p->key) == CUDNN_FMA_MATH ? CUDNN_FMA_MATH : m; /* exact fp32 stays exact */
}

/* Sets direction dir's descriptor to the math type its chosen algorithm (found under math type m)
 * runs with, and *ws to that algorithm's workspace: what the search reported, or cuDNN's own
 * query under the run math type when that is larger (reports and queries have differed across
 * math types and cuDNN versions; a workspace too small fails every call). A failed query keeps
 * the report. */
static nr_status adopt_algo(nr_cuda_ctx *ctx, plan *p, int dir, int algo, cudnnMathType_t m, size_t reported,
                            const char *what, size_t *ws)
{
   cudnnConvolutionDescriptor_t cd = p->cd[dir];
   NR_CUDNN(cudnnSetConvolutionMathType(cd, run_math(p, m)), "%s: cudnnSetConvolutionMathType", what);
   size_t q = 0;
   cudnnStatus_t st;
   if (dir == 0)
      st = cudnnGetConvolutionForwardWorkspaceSize(ctx->dnn, p->xd, p->wd, cd, p->yd, (cudnnConvolutionFwdAlgo_t)algo,
                                                   &q);
   else if (dir == 1)
      st = cudnnGetConvolutionBackwardDataWorkspaceSize(ctx->dnn, p->wd, p->yd, cd, p->xd,
                                                        (cudnnConvolutionBwdDataAlgo_t)algo, &q);
   else
      st = cudnnGetConvolutionBackwardFilterWorkspaceSize(ctx->dnn, p->xd, p->yd, cd, p->wd,
                                                          (cudnnConvolutionBwdFilterAlgo_t)algo, &q);
   *ws = st == CUDNN_STATUS_SUCCESS && q > reported ? q : reported;
   return NR_OK;
}

static nr_status search(nr_cuda_ctx *ctx, plan *p, int dir, const void *x, const void *w, const void *y,
                        const char *what, int find, void *ws, size_t budget)
{
   int got = 0;
   if (dir == 0) {
      cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
      if (find)
         NR_CUDNN(cudnnFindConvolutionForwardAlgorithmEx(ctx->dnn, p->xd, x, p->wd, w, p->cd[0], p->yd, (void *)y,
                                                         CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &got, perf, ws, budget),
                  "%s: cudnnFindConvolutionForwardAlgorithmEx", what);
      else
         NR_CUDNN(cudnnGetConvolutionForwardAlgorithm_v7(ctx->dnn, p->xd, p->wd, p->cd[0], p->yd,
                                                         CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &got, perf),
                  "%s: cudnnGetConvolutionForwardAlgorithm_v7", what);
      for (int i = 0; i < got; i++)
         if (usable(p, perf[i].status, perf[i].memory, perf[i].determinism, budget)) {
            p->fwd = perf[i].algo;
            NR_TRY(adopt_algo(ctx, p, 0, (int)perf[i].algo, perf[i].mathType, perf[i].memory, what, &p->fwd_ws));
            p->fwd_ready = 1;
            break;
         }
      if (!p->fwd_ready) return no_algorithm(p, what, "forward");
   } else if (dir == 1) {
      cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
      if (find)
         NR_CUDNN(cudnnFindConvolutionBackwardDataAlgorithmEx(ctx->dnn, p->wd, w, p->yd, y, p->cd[1], p->xd, (void *)x,
                                                              CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &got, perf, ws,
                                                              budget),
                  "%s: cudnnFindConvolutionBackwardDataAlgorithmEx", what);
      else
         NR_CUDNN(cudnnGetConvolutionBackwardDataAlgorithm_v7(ctx->dnn, p->wd, p->yd, p->cd[1], p->xd,
                                                              CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &got, perf),
                  "%s: cudnnGetConvolutionBackwardDataAlgorithm_v7", what);
      for (int i = 0; i < got; i++)
         if (usable(p, perf[i].status, perf[i].memory, perf[i].determinism, budget)) {
            p->bwdd = perf[i].algo;
            NR_TRY(adopt_algo(ctx, p, 1, (int)perf[i].algo, perf[i].mathType, perf[i].memory, what, &p->bwdd_ws));
            p->bwdd_ready = 1;
            break;
         }
      if (!p->bwdd_ready) return no_algorithm(p, what, "backward-data");
   } else {
      cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
      if (find)
         NR_CUDNN(cudnnFindConvolutionBackwardFilterAlgorithmEx(ctx->dnn, p->xd, x, p->yd, y, p->cd[2], p->wd,
                                                                (void *)w,
                                                                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &got, perf,
                                                                ws, budget),
                  "%s: cudnnFindConvolutionBackwardFilterAlgorithmEx", what);
      else
         NR_CUDNN(cudnnGetConvolutionBackwardFilterAlgorithm_v7(ctx->dnn, p->xd, p->yd, p->cd[2], p->wd,
                                                                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &got, perf),
                  "%s: cudnnGetConvolutionBackwardFilterAlgorithm_v7", what);
      for (int i = 0; i < got; i++)
         if (usable(p, perf[i].status, perf[i].memory, perf[i].determinism, budget)) {
            p->bwdf = perf[i].algo;
            NR_TRY(adopt_algo(ctx, p, 2, (int)perf[i].algo, perf[i].mathType, perf[i].memory, what, &p->bwdf_ws));
            p->bwdf_ready = 1;
            break;
         }
      if (!p->bwdf_ready) return no_algorithm(p, what, "backward-filter");
   }
   return NR_OK;
}

/* The workspace of direction dir's chosen algorithm (scratch slot 4). When the device cannot give
 * it (memory is tighter than when the algorithm was chosen), the direction is chosen again by
 * cuDNN's heuristics among algorithms that need no workspace, so the step runs (perhaps slower)
 * instead of failing at every step; the heuristics touch no buffer, so no gradient is clobbered.
 * Under nr.cuda.set_deterministic the new choice is deterministic too, but another algorithm: a
 * run short of memory then differs in its bits from one that had the workspace. */
static nr_status plan_workspace(nr_cuda_ctx *ctx, plan *p, int dir, const char *what, void **ws)
{
   size_t *need = dir == 0 ? &p->fwd_ws : dir == 1 ? &p->bwdd_ws : &p->bwdf_ws;
   *ws = NULL;
   if (!*need) return NR_OK;
   nr_status st = nr_cuda_scratch(ctx, 4, (int64_t)*need, ws);
   if (st != NR_E_OOM) return st;
   *(dir == 0 ? &p->fwd_ready : dir == 1 ? &p->bwdd_ready : &p->bwdf_ready) = 0;
   NR_CUDNN(cudnnSetConvolutionMathType(p->cd[dir], base_math(p->key)), "%s: cudnnSetConvolutionMathType", what);
   if (search(ctx, p, dir, NULL, NULL, NULL, what, 0, NULL, 0)) {
      /* none either: report the allocation that failed */
      return nr_fail_at(NR_E_OOM, __func__, __FILE__, __LINE__,
                        "%s: out of GPU memory for the %s workspace (%zu bytes), and no algorithm works without one",
                        what, dir_name(dir), *need);
   }
   *ws = NULL;
   /* an algorithm reported without workspace may need one after all (adopt_algo) */
   return *need ? nr_cuda_scratch(ctx, 4, (int64_t)*need, ws) : NR_OK;
}

/* The weight as cuDNN reads it: in the activations' dtype and, for channels-last, KRSC (a copy
 * in scratch slot 5 unless w is already both). A KCRS weight with C/groups == 1 (depthwise) or
 * R == S == 1 (pointwise) is KRSC too: same memory, no reordering copy. */
static nr_status conv_weight(nr_cuda_ctx *ctx, const nr_tensor *w, int32_t dtype, int nhwc, nr_tensor *out)
{
   if (!nhwc || nr_tensor_is_channels_last(w)) return nr_cuda_as_dtype(ctx, w, dtype, 5, out);
   void *p;
   NR_TRY(nr_cuda_scratch(ctx, 5, nr_tensor_numel(w) * nr_dtype_size(dtype), &p));
   *out = *w;
   out->dtype = dtype;
   out->data = p;
   nr_make_channels_last(out);
   return nr_cuda_launch_copy(ctx, out, w);
}

nr_status nr_cuda_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                                 int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h,
                                 int32_t dil_w, int32_t groups)
{
   int32_t dev = x->device_index;
   NR_TRY(nr_cuda_check_on(__func__, "y", y, dev));
   NR_TRY(nr_cuda_check_on(__func__, "w", w, dev));
   if (b) NR_TRY(nr_cuda_check_on(__func__, "b", b, dev));
   if (nr_tensor_numel(y) == 0) return NR_OK;
   if (nr_tensor_numel(x) == 0) { /* no input channels: y is the bias alone, as on the CPU (cuDNN
                                    * refuses a dimension of 0) */
      NR_TRY(nr_cuda_fill(y, 0.0));
      return b ? nr_cuda_bias_add(y, b) : NR_OK;
   }
   const int64_t chunk = batch_chunk(x, y);
   if (chunk < x->shape[0]) {
      for (int64_t n0 = 0; n0 < x->shape[0]; n0 += chunk) {
         const int64_t nb = chunk < x->shape[0] - n0 ? chunk : x->shape[0] - n0;
         nr_tensor xs = batch_view(x, n0, nb), ys = batch_view(y, n0, nb);
         NR_TRY(nr_cuda_conv2d_forward(&xs, &ys, w, b, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups));
      }
      return NR_OK;
   }
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   plan *p;
   const int nhwc = nr_is_nhwc(x) || nr_is_nhwc(y);
   NR_TRY(get_plan(__func__, x, y->data, w, y->shape[2], y->shape[3], stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   groups, nhwc, &p));
   const char *what = conv_desc(x, w, p->key);
   nr_tensor wc;
   TRY_IN(what, conv_weight(ctx, w, x->dtype, nhwc, &wc));
   if (!p->fwd_ready) NR_TRY(choose_algo(ctx, p, 0, x->data, wc.data, y->data, what));
   void *ws;
   NR_TRY(plan_workspace(ctx, p, 0, what, &ws));
   const float one = 1.0f, zero = 0.0f;
   NR_CUDNN(cudnnConvolutionForward(ctx->dnn, &one, p->xd, x->data, p->wd, wc.data, p->cd[0], p->fwd, ws, p->fwd_ws,
                                    &zero, p->yd, y->data),
            "%s: cudnnConvolutionForward (algo %d)", what, (int)p->fwd);
   return b ? nr_cuda_bias_add(y, b) : NR_OK;
}

nr_status nr_cuda_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w, int32_t stride_h,
                                       int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h, int32_t dil_w,
                                       int32_t groups)
{
   int32_t dev = dy->device_index;
   NR_TRY(nr_cuda_check_on(__func__, "dx", dx, dev));
   NR_TRY(nr_cuda_check_on(__func__, "w", w, dev));
   if (nr_tensor_numel(dx) == 0) return NR_OK;
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   if (nr_tensor_numel(dy) == 0) {
      NR_CU(cudaMemsetAsync(dx->data, 0, (size_t)(nr_tensor_numel(dx) * nr_dtype_size(dx->dtype)), ctx->stream),
            "zeroing %s", NR_DESC(dx));
      return NR_OK;
   }
   const int64_t chunk = batch_chunk(dx, dy);
   if (chunk < dx->shape[0]) {
      for (int64_t n0 = 0; n0 < dx->shape[0]; n0 += chunk) {
         const int64_t nb = chunk < dx->shape[0] - n0 ? chunk : dx->shape[0] - n0;
         nr_tensor dys = batch_view(dy, n0, nb), dxs = batch_view(dx, n0, nb);
         NR_TRY(nr_cuda_conv2d_backward_data(&dys, &dxs, w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups));
      }
      return NR_OK;
   }
   plan *p;
   const int nhwc = nr_is_nhwc(dx) || nr_is_nhwc(dy);
   NR_TRY(get_plan(__func__, dx, dy->data, w, dy->shape[2], dy->shape[3], stride_h, stride_w, pad_h, pad_w, dil_h,
                   dil_w, groups, nhwc, &p));
   const char *what = conv_desc(dx, w, p->key);
   nr_tensor wc;
   TRY_IN(what, conv_weight(ctx, w, dx->dtype, nhwc, &wc));
   if (!p->bwdd_ready) NR_TRY(choose_algo(ctx, p, 1, dx->data, wc.data, dy->data, what));
   void *ws;
   NR_TRY(plan_workspace(ctx, p, 1, what, &ws));
   const float one = 1.0f, zero = 0.0f;
   NR_CUDNN(cudnnConvolutionBackwardData(ctx->dnn, &one, p->wd, wc.data, p->yd, dy->data, p->cd[1], p->bwdd, ws,
                                         p->bwdd_ws, &zero, p->xd, dx->data),
            "%s: cudnnConvolutionBackwardData (algo %d)", what, (int)p->bwdd);
   return NR_OK;
}

/* The backward-filter plan of (x, dy) with its algorithm chosen (searched on a stand-in, so dw
 * is not written); *dws: the staging buffer (scratch slot 5) when cuDNN's gradient must be
 * folded into dw (bf16, or channels-last with a KRSC order that differs from dw's KCRS), else
 * NULL. */
static nr_status filter_plan(nr_cuda_ctx *ctx, const nr_tensor *x, const nr_tensor *dy, const nr_tensor *dw,
                             int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h,
                             int32_t dil_w, int32_t groups, plan **out, void **dws)
{
   const int nhwc = nr_is_nhwc(x) || nr_is_nhwc(dy);
   plan *p;
   NR_TRY(get_plan("nr_cuda_conv2d_backward_weight", x, dy->data, dw, dy->shape[2], dy->shape[3], stride_h, stride_w,
                   pad_h, pad_w, dil_h, dil_w, groups, nhwc, &p));
   const char *what = conv_desc(x, dw, p->key);
   const int64_t nw = nr_tensor_numel(dw), bytes = nw * nr_dtype_size(x->dtype);
   const int staged = x->dtype != dw->dtype || (nhwc && !nr_tensor_is_channels_last(dw));
   *dws = NULL;
   if (staged) TRY_IN(what, nr_cuda_scratch(ctx, 5, bytes, dws));
   if (!p->bwdf_ready) {
      void *tmp = staged ? *dws : nr_cuda_alloc(x->device_index, bytes);
      if (!tmp) return nr_fail_wrap(NR_E_OOM, what);
      nr_status st = choose_algo(ctx, p, 2, x->data, tmp, dy->data, what);
      if (!staged) nr_cuda_free(x->device_index, tmp, bytes);
      NR_TRY(st);
   }
   *out = p;
   return NR_OK;
}

/* dw <- acc * dw + scale * dL/dw (nr_cuda_conv2d_backward_weight without the bias). */
static nr_status filter_grad(nr_cuda_ctx *ctx, const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw, int32_t stride_h,
                             int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h, int32_t dil_w,
                             int32_t groups, float scale, float acc)
{
   int64_t nw = nr_tensor_numel(dw);
   if (nw == 0) return NR_OK;
   if (nr_tensor_numel(dy) == 0 || nr_tensor_numel(x) == 0) {
      /* no samples: dL/dw = 0, so dw <- acc * dw */
      if (acc == 0.0f)
         NR_CU(cudaMemsetAsync(dw->data, 0, (size_t)nw * sizeof(float), ctx->stream), "zeroing %s", NR_DESC(dw));
      else if (acc != 1.0f)
         NR_TRY(nr_cuda_binary_scalar(dw, acc, dw, NR_OP_MUL));
      return NR_OK;
   }
   plan *p;
   void *dws;
   NR_TRY(filter_plan(ctx, x, dy, dw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, &p, &dws));
   const int nhwc = p->key[17], staged = dws != NULL;
   const char *what = conv_desc(x, dw, p->key);
   void *ws;
   NR_TRY(plan_workspace(ctx, p, 2, what, &ws));
   const float one = 1.0f, zero = 0.0f;
   NR_CUDNN(cudnnConvolutionBackwardFilter(ctx->dnn, staged ? &one : &scale, p->xd, x->data, p->yd, dy->data, p->cd[2],
                                           p->bwdf, ws, p->bwdf_ws, staged ? &zero : &acc, p->wd, staged ? dws : dw->data),
            "%s: cudnnConvolutionBackwardFilter (algo %d)", what, (int)p->bwdf);
   if (!staged) return NR_OK;
   nr_tensor g = *dw;
   g.dtype = x->dtype;
   g.data = dws;
   if (nhwc) nr_make_channels_last(&g);
   return nr_cuda_launch_acc(ctx, dw, &g, scale, acc);
}

nr_status nr_cuda_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw, nr_tensor *db,
                                         int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                         int32_t dil_h, int32_t dil_w, int32_t groups, float scale, float acc)
{
   int32_t dev = x->device_index;
   NR_TRY(nr_cuda_check_on(__func__, "dy", dy, dev));
   NR_TRY(nr_cuda_check_on(__func__, "dw", dw, dev));
   if (db) NR_TRY(nr_cuda_check_on(__func__, "db", db, dev));
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dev, &ctx));
   /* a batch beyond the 32-bit indexing sums its chunks' gradients: the first scales dw by acc,
    * the others add to it */
   const int64_t n = x->shape[0], chunk = batch_chunk(x, dy);
   if (chunk >= n) {
      NR_TRY(filter_grad(ctx, x, dy, dw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, scale, acc));
   } else {
      /* both slice shapes get their plan and algorithm before the first slice writes dw, so a
       * search that finds nothing fails with dw untouched */
      const int64_t last = (n - 1) / chunk * chunk; /* the last slice's first sample */
      for (int k = 0; k < 2 && nr_tensor_numel(dw) > 0; k++) {
         const int64_t n0 = k ? last : 0, nb = k ? n - last : chunk;
         nr_tensor xs = batch_view(x, n0, nb), dys = batch_view(dy, n0, nb);
         plan *pl;
         void *dws;
         NR_TRY(filter_plan(ctx, &xs, &dys, dw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, &pl, &dws));
      }
      for (int64_t n0 = 0; n0 < n; n0 += chunk) {
         const int64_t nb = chunk < n - n0 ? chunk : n - n0;
         nr_tensor xs = batch_view(x, n0, nb), dys = batch_view(dy, n0, nb);
         NR_TRY(filter_grad(ctx, &xs, &dys, dw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, scale,
                            n0 == 0 ? acc : 1.0f));
      }
   }
   /* the bias last: when the filter gradient fails (no usable algorithm, no memory) the bias
    * gradient has not moved, so a caller that retries counts it once */
   return db ? nr_cuda_bias_backward(dy, db, scale, acc) : NR_OK;
}

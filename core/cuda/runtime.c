/* runtime.c — CUDA device management, the caching allocator, per-device contexts, element
 * access and copies between host and device.
 *
 * What it is: plain C over the CUDA runtime API (cudart is linked statically). One context per
 * GPU: a compute stream (blocking, so it is ordered with the legacy default stream), a cuBLAS
 * and a cuDNN handle bound to it, grow-only scratch buffers. The caching allocator keeps
 * size-bucketed free lists per GPU (4 buckets per power of two, so at most 25% is wasted) and
 * calls cudaMalloc only when a bucket is empty; on failure it
 * empties the cache and retries once, then reports the bytes asked for, in use and cached.
 * Host-to-device copies go through a ring of pinned staging buffers per GPU and stream (each copy is
 * asynchronous; a buffer is refilled only after an event says its last copy finished, so the
 * host can queue a few batches ahead of the GPU), device-to-host copies synchronise the stream.
 * Input prefetch (nr_cuda_prefetch) copies on a second, copy stream so a batch's transfer
 * overlaps the previous step's compute; events order it after the compute work queued before it
 * and the compute stream waits for its ticket.
 * What it is not: kernels (tensor_kernels.cu, nn_kernels.cu), cuDNN/cuBLAS ops (conv.c, blas.c).
 * Invariants: all work on a GPU is ordered on its compute stream (a prefetch is joined to it by its
 * ticket's wait, or at the latest when its destination is freed), so a freed block is safe to hand
 * out again at once; the allocator lock is held across a call that waits for the GPU only where
 * cached blocks go back to the driver (cudaFree waits for the whole device): nr_cuda_empty_cache
 * and the one retry after an out-of-memory; the CUDA runtime's current device is set per op
 * (nr_cuda_ctx_get), the user's choice for new tensors is a separate thread-local.
 */
#include "cuda_common.h"
#include "side.h"
#ifdef NR_CUDA_EMU
#include "emu_internal.h" /* tests only: nr_emu_poison_async */
#endif

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- errors */

static nr_status fail_lib(const char *lib_msg, const char *func, const char *file, int line,
                          const char *fmt, va_list ap)
{
   char what[1024];
   vsnprintf(what, sizeof what, fmt, ap);
   return nr_fail_at(NR_E_DEVICE, func, file, line, "%s: %s", what, lib_msg);
}

nr_status nr_cuda_fail_rt(cudaError_t e, const char *func, const char *file, int line, const char *fmt, ...)
{
   char lib[256];
   snprintf(lib, sizeof lib, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
   /* clear the runtime's pending error (a non-sticky one, e.g. a failed allocation or copy), so
    * the next kernel launch check does not report it again as its own failure */
   (void)cudaGetLastError();
   va_list ap;
   va_start(ap, fmt);
   nr_status st = fail_lib(lib, func, file, line, fmt, ap);
   va_end(ap);
   return st;
}

static const char *blas_name(cublasStatus_t e)
{
   switch (e) {
   case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
   case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
   case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
   case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
   case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
   case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
   case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
   case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
   case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
   default: return "unknown cuBLAS status";
   }
}

nr_status nr_cuda_fail_blas(cublasStatus_t e, const char *func, const char *file, int line, const char *fmt, ...)
{
   char lib[128];
   snprintf(lib, sizeof lib, "cuBLAS %s (%d)", blas_name(e), (int)e);
   va_list ap;
   va_start(ap, fmt);
   nr_status st = fail_lib(lib, func, file, line, fmt, ap);
   va_end(ap);
   return st;
}

nr_status nr_cuda_fail_dnn(cudnnStatus_t e, const char *func, const char *file, int line, const char *fmt, ...)
{
   char lib[1400], detail[1024] = "";
   /* cuDNN 9 keeps a thread-local explanation of the last failure */
   cudnnGetLastErrorString(detail, sizeof detail);
   snprintf(lib, sizeof lib, "cuDNN %s%s%s", cudnnGetErrorString(e), detail[0] ? ": " : "", detail);
   va_list ap;
   va_start(ap, fmt);
   nr_status st = fail_lib(lib, func, file, line, fmt, ap);
   va_end(ap);
   return st;
}

const char *nr_cuda_desc(const nr_tensor *t)
{
   static _Thread_local char ring[8][160];
   static _Thread_local unsigned next;
   char *buf = ring[next++ % 8];
   return nr_tensor_describe(t, buf, sizeof ring[0]);
}

nr_status nr_cuda_check_on(const char *func, const char *name, const nr_tensor *t, int32_t dev)
{
   if (!t) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: tensor is NULL", name);
   if (t->device != NR_CUDA || t->device_index != dev)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: expected a tensor on cuda:%d, got %s on %s:%d",
                        name, dev, nr_cuda_desc(t), t->device == NR_CUDA ? "cuda" : "cpu", t->device_index);
   return NR_OK;
}

/* ---------------------------------------------------------------- devices */

static pthread_once_t g_count_once = PTHREAD_ONCE_INIT;
static int g_count = 0;
static char g_unavailable[256] = "";

static void count_devices(void)
{
   int n = 0;
   cudaError_t e = cudaGetDeviceCount(&n);
   if (e != cudaSuccess) {
      snprintf(g_unavailable, sizeof g_unavailable, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e),
               cudaGetErrorName(e));
      cudaGetLastError();
      n = 0;
   } else if (n == 0) {
      snprintf(g_unavailable, sizeof g_unavailable, "no CUDA device is visible");
   }
   if (n > NR_CUDA_MAX_DEVICES) n = NR_CUDA_MAX_DEVICES;
   g_count = n;
}

int32_t nr_cuda_device_count(void)
{
   pthread_once(&g_count_once, count_devices);
   return g_count;
}
int32_t nr_cuda_available(void) { return nr_cuda_device_count() > 0; }
const char *nr_cuda_unavailable_reason(void)
{
   nr_cuda_device_count();
   return g_unavailable;
}

static _Thread_local int32_t g_user_device = 0;

int32_t nr_cuda_current_device(void) { return g_user_device; }

static nr_status check_index(const char *func, int32_t device_index)
{
   int n = nr_cuda_device_count();
   if (n == 0) return nr_fail_at(NR_E_DEVICE, func, __FILE__, __LINE__, "no GPU: %s", g_unavailable);
   if (device_index < 0 || device_index >= n)
      return nr_fail_at(NR_E_DEVICE, func, __FILE__, __LINE__, "no device cuda:%d (%d visible)", device_index, n);
   return NR_OK;
}

nr_status nr_cuda_set_device(int32_t device_index)
{
   NR_TRY(check_index(__func__, device_index));
   g_user_device = device_index;
   return NR_OK;
}

nr_status nr_cuda_versions(int32_t *v)
{
   if (!v) return NR_FAIL(NR_E_ARG, "v is NULL");
   int rt = 0, drv = 0, ma = 0, mi = 0, pa = 0;
   if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
   if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
   cudaGetLastError();
   v[0] = rt;
   v[1] = drv;
   v[2] = (int32_t)cudnnGetVersion();
   v[3] = CUDNN_VERSION;
   if (cublasGetProperty(MAJOR_VERSION, &ma) != CUBLAS_STATUS_SUCCESS || cublasGetProperty(MINOR_VERSION, &mi) != CUBLAS_STATUS_SUCCESS ||
       cublasGetProperty(PATCH_LEVEL, &pa) != CUBLAS_STATUS_SUCCESS)
      ma = mi = pa = 0;
   v[4] = ma * 10000 + mi * 100 + pa;
   v[5] = CUBLAS_VER_MAJOR * 10000 + CUBLAS_VER_MINOR * 100 + CUBLAS_VER_PATCH;
   return NR_OK;
}

static char g_names[NR_CUDA_MAX_DEVICES][256];
static pthread_mutex_t g_name_lock = PTHREAD_MUTEX_INITIALIZER;

const char *nr_cuda_device_name(int32_t device_index)
{
   if (device_index < 0 || device_index >= nr_cuda_device_count()) return NULL;
   pthread_mutex_lock(&g_name_lock);
   if (!g_names[device_index][0]) {
      struct cudaDeviceProp prop;
      if (cudaGetDeviceProperties(&prop, device_index) == cudaSuccess)
         snprintf(g_names[device_index], sizeof g_names[0], "%s", prop.name);
      else
         cudaGetLastError();
   }
   pthread_mutex_unlock(&g_name_lock);
   return g_names[device_index][0] ? g_names[device_index] : NULL;
}

static int32_t g_tf32 = 0;
void nr_cuda_set_allow_tf32(int32_t allow) { g_tf32 = allow != 0; }
int32_t nr_cuda_get_allow_tf32(void) { return g_tf32; }
int32_t nr_cuda_tf32_allowed(void) { return g_tf32; }
static int32_t g_deterministic = 0;
void nr_cuda_set_deterministic(int32_t on) { g_deterministic = on != 0; }
int32_t nr_cuda_get_deterministic(void) { return g_deterministic; }

/* Makes dev the CUDA runtime's current device for this thread (cheap when it already is). */
static nr_status use_device(int32_t dev)
{
   int cur = -1;
   NR_CU(cudaGetDevice(&cur), "cudaGetDevice");
   if (cur != dev) NR_CU(cudaSetDevice(dev), "cudaSetDevice(%d)", dev);
   return NR_OK;
}

nr_status nr_cuda_mem_info(int32_t device_index, int64_t *free_bytes, int64_t *total_bytes)
{
   NR_TRY(check_index(__func__, device_index));
   NR_TRY(use_device(device_index));
   size_t f = 0, t = 0;
   NR_CU(cudaMemGetInfo(&f, &t), "cudaMemGetInfo on cuda:%d", device_index);
   if (free_bytes) *free_bytes = (int64_t)f;
   if (total_bytes) *total_bytes = (int64_t)t;
   return NR_OK;
}

/* ---------------------------------------------------------------- caching allocator */

enum { NCLASSES = 256, SMALLEST = 512 };

typedef struct block {
   void *ptr;
   struct block *next;
} block;

enum { NR_STAGING_SLOTS = 4, NR_PREFETCH_SLOTS = 8 };
enum { STAGE_COMPUTE = 0, STAGE_PREFETCH = 1 }; /* the staging rings */

typedef struct devstate {
   block *free_list[NCLASSES];
   int64_t cached;   /* bytes in free lists */
   int64_t in_use;   /* bytes handed out (tensors, scratch, workspaces) */
   int ctx_ready;
   nr_cuda_ctx ctx;
   /* pinned staging for host-to-device copies: one ring of slots per stream (STAGE_COMPUTE,
    * STAGE_PREFETCH), used in turn, so a copy never waits for a slot held by the other stream */
   struct staging_slot {
      void *ptr;
      int64_t bytes;
      cudaEvent_t done; /* recorded after the slot's last copy */
      int pending;
   } staging[2][NR_STAGING_SLOTS];
   int staging_next[2];
   int64_t pin_failed; /* the smallest whole-transfer pin that failed (0: none): such prefetches go in chunks */
   /* input prefetch (nr_cuda_prefetch): copies on their own stream, each ordered after the compute
    * stream's work at its start (compute_mark) and named by a ticket; a slot holds the latest
    * copies' events and, until the compute stream waits for it, the destination bytes */
   cudaStream_t copy_stream; /* created on the first prefetch */
   cudaEvent_t compute_mark;
   struct prefetch_slot {
      cudaEvent_t done;
      const char *dst;
      int64_t bytes;
      int64_t ticket; /* 0: nothing the compute stream has not waited for */
   } prefetch[NR_PREFETCH_SLOTS];
   int64_t prefetch_seq;
} devstate;

static devstate g_dev[NR_CUDA_MAX_DEVICES];
static block *g_spare_nodes = NULL;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* Size class of a request: SMALLEST for small ones, else the smallest p + k * p / 4 >= bytes
 * (p a power of two, k = 1..4). */
static int size_class(int64_t bytes, int64_t *class_bytes)
{
   if (bytes <= SMALLEST) {
      *class_bytes = SMALLEST;
      return 0;
   }
   int lg = 63 - __builtin_clzll((unsigned long long)(bytes - 1)); /* p = 2^lg < bytes <= 2^(lg+1) */
   int64_t p = INT64_C(1) << lg, q = p / 4;
   int k = (int)((bytes - p + q - 1) / q); /* 1..4 */
   *class_bytes = p + k * q;
   int idx = 1 + (lg - 9) * 4 + (k - 1);
   return idx < NCLASSES ? idx : NCLASSES - 1;
}

/* Makes dev current where a failure has nothing to report (restoring the caller's device, a
 * retry after its first switch worked): the error is not left for the next launch check. */
static void set_device_quiet(int dev)
{
   if (cudaSetDevice(dev) != cudaSuccess) (void)cudaGetLastError();
}

/* Releases the cached blocks of one device; call with g_lock held. */
static void release_cached(int dev)
{
   devstate *d = &g_dev[dev];
   int cur = -1;
   if (cudaGetDevice(&cur) != cudaSuccess) cur = -1;
   if (cur != dev) set_device_quiet(dev);
   for (int c = 0; c < NCLASSES; c++) {
      while (d->free_list[c]) {
         block *b = d->free_list[c];
         d->free_list[c] = b->next;
         cudaFree(b->ptr);
         b->next = g_spare_nodes;
         g_spare_nodes = b;
      }
   }
   d->cached = 0;
   cudaGetLastError();
   if (cur >= 0 && cur != dev) set_device_quiet(cur);
}

void *nr_cuda_alloc(int32_t device_index, int64_t bytes)
{
   if (check_index(__func__, device_index)) return NULL;
   int64_t cb;
   int c = size_class(bytes, &cb);
   devstate *d = &g_dev[device_index];
   pthread_mutex_lock(&g_lock);
   /* the last class also holds oversized blocks of different sizes: only exact classes reuse */
   if (c < NCLASSES - 1 && d->free_list[c]) {
      block *b = d->free_list[c];
      d->free_list[c] = b->next;
      void *p = b->ptr;
      b->next = g_spare_nodes;
      g_spare_nodes = b;
      d->cached -= cb;
      d->in_use += cb;
      pthread_mutex_unlock(&g_lock);
      return p;
   }
   if (c == NCLASSES - 1) cb = bytes;
   int cur = -1;
   if (cudaGetDevice(&cur) != cudaSuccess) cur = -1;
   if (cur != device_index && cudaSetDevice(device_index) != cudaSuccess) {
      cudaError_t se = cudaGetLastError();
      pthread_mutex_unlock(&g_lock);
      NR_FAIL(NR_E_DEVICE, "cannot make cuda:%d current to allocate %lld bytes: %s", device_index, (long long)bytes,
              cudaGetErrorString(se));
      return NULL;
   }
   void *p = NULL;
   cudaError_t e = cudaMalloc(&p, (size_t)cb);
   if (e != cudaSuccess) {
      cudaGetLastError();
      int64_t cached = d->cached;
      release_cached(device_index);
      set_device_quiet(device_index);
      e = cudaMalloc(&p, (size_t)cb);
      if (e != cudaSuccess) {
         cudaGetLastError();
         size_t fr = 0, tot = 0;
         cudaMemGetInfo(&fr, &tot);
         cudaGetLastError();
         int64_t in_use = d->in_use;
         pthread_mutex_unlock(&g_lock);
         if (cur >= 0 && cur != device_index) set_device_quiet(cur);
         NR_FAIL(NR_E_OOM,
                 "out of GPU memory on cuda:%d allocating %lld bytes (%.1f MiB): %.1f MiB in use by nrlua, "
                 "%.1f MiB were cached (released and retried), device has %.1f MiB free of %.1f MiB (%s)",
                 device_index, (long long)bytes, bytes / 1048576.0, in_use / 1048576.0, cached / 1048576.0,
                 fr / 1048576.0, tot / 1048576.0, cudaGetErrorString(e));
         return NULL;
      }
   }
   d->in_use += cb;
   pthread_mutex_unlock(&g_lock);
   if (cur >= 0 && cur != device_index) set_device_quiet(cur);
   return p;
}

/* A prefetch into [ptr, ptr + bytes) that the compute stream has not waited for: the compute
 * stream waits for it now (on the GPU), so the block can be handed out again at once. Under g_lock. */
static void settle_prefetch_into(devstate *d, const void *ptr, int64_t bytes)
{
   const char *lo = ptr, *hi = lo + bytes;
   for (int i = 0; i < NR_PREFETCH_SLOTS; i++) {
      struct prefetch_slot *s = &d->prefetch[i];
      if (s->ticket && s->dst < hi && lo < s->dst + s->bytes) {
         if (cudaStreamWaitEvent(d->ctx.stream, s->done, 0) != cudaSuccess) {
            cudaGetLastError();
            cudaEventSynchronize(s->done); /* the host waits instead */
            cudaGetLastError();
         }
         s->ticket = 0;
      }
   }
}

void nr_cuda_free(int32_t device_index, void *ptr, int64_t bytes)
{
   if (!ptr || device_index < 0 || device_index >= NR_CUDA_MAX_DEVICES) return;
   int64_t cb;
   int c = size_class(bytes, &cb);
   devstate *d = &g_dev[device_index];
   pthread_mutex_lock(&g_lock);
   if (d->prefetch_seq) settle_prefetch_into(d, ptr, bytes);
   if (c == NCLASSES - 1) {
      /* oversized (beyond 2^72 cannot happen; kept for safety): give it back at once */
      d->in_use -= bytes;
      pthread_mutex_unlock(&g_lock);
      cudaFree(ptr);
      cudaGetLastError();
      return;
   }
   block *b = g_spare_nodes;
   if (b) g_spare_nodes = b->next;
   else b = malloc(sizeof *b);
   if (!b) { /* cannot record it: return it to the driver instead */
      d->in_use -= cb;
      pthread_mutex_unlock(&g_lock);
      cudaFree(ptr);
      cudaGetLastError();
      return;
   }
   b->ptr = ptr;
   b->next = d->free_list[c];
   d->free_list[c] = b;
   d->in_use -= cb;
   d->cached += cb;
#ifdef NR_CUDA_EMU
   /* the emulator fills the block with NaN after the work ordered before its reuse */
   if (d->ctx_ready) nr_emu_poison_async(ptr, (size_t)cb, d->ctx.stream);
#endif
   pthread_mutex_unlock(&g_lock);
}

int64_t nr_cuda_memory_cached(int32_t device_index)
{
   int64_t s = 0;
   pthread_mutex_lock(&g_lock);
   for (int i = 0; i < NR_CUDA_MAX_DEVICES; i++)
      if (device_index < 0 || device_index == i) s += g_dev[i].cached;
   pthread_mutex_unlock(&g_lock);
   return s;
}

void nr_cuda_empty_cache_of(int32_t device_index)
{
   if (device_index < 0 || device_index >= NR_CUDA_MAX_DEVICES) return;
   pthread_mutex_lock(&g_lock);
   if (g_dev[device_index].cached) release_cached(device_index);
   pthread_mutex_unlock(&g_lock);
}

nr_status nr_cuda_empty_cache(void)
{
   for (int i = 0, n = nr_cuda_device_count(); i < n; i++) nr_cuda_empty_cache_of(i);
   return NR_OK;
}

/* ---------------------------------------------------------------- contexts */

nr_status nr_cuda_ctx_get(int32_t device_index, nr_cuda_ctx **out)
{
   if (device_index < 0 || device_index >= NR_CUDA_MAX_DEVICES || device_index >= nr_cuda_device_count())
      return check_index(__func__, device_index);
   devstate *d = &g_dev[device_index];
   NR_TRY(use_device(device_index));
   if (__atomic_load_n(&d->ctx_ready, __ATOMIC_ACQUIRE)) {
      *out = &d->ctx;
      return NR_OK;
   }
   pthread_mutex_lock(&g_lock);
   nr_status st = NR_OK;
   if (!d->ctx_ready) {
      nr_cuda_ctx *c = &d->ctx;
      memset(c, 0, sizeof *c);
      c->device = device_index;
      /* a blocking stream: work on the legacy default stream (a plain cudaMemcpy by other code)
       * is ordered with it both ways; side streams (side.h: NCCL's) join it by events */
      cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamDefault);
      if (e != cudaSuccess) st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "cudaStreamCreate on cuda:%d", device_index);
      for (int i = 0; !st && i < 2 * NR_STAGING_SLOTS; i++) {
         e = cudaEventCreateWithFlags(&d->staging[i / NR_STAGING_SLOTS][i % NR_STAGING_SLOTS].done, cudaEventDisableTiming);
         if (e != cudaSuccess) st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "cudaEventCreate on cuda:%d", device_index);
      }
      if (!st) {
         int sms = 0;
         e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index);
         if (e != cudaSuccess) st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "cudaDeviceGetAttribute on cuda:%d", device_index);
         c->sm_count = sms > 0 ? sms : 1;
      }
      if (!st) {
         cublasStatus_t be = cublasCreate(&c->blas);
         if (be != CUBLAS_STATUS_SUCCESS) st = nr_cuda_fail_blas(be, __func__, __FILE__, __LINE__, "cublasCreate on cuda:%d", device_index);
      }
      if (!st) {
         cublasStatus_t be = cublasSetStream(c->blas, c->stream);
         if (be != CUBLAS_STATUS_SUCCESS) st = nr_cuda_fail_blas(be, __func__, __FILE__, __LINE__, "cublasSetStream");
      }
      if (!st) {
         cudnnStatus_t de = cudnnCreate(&c->dnn);
         if (de != CUDNN_STATUS_SUCCESS) st = nr_cuda_fail_dnn(de, __func__, __FILE__, __LINE__, "cudnnCreate on cuda:%d", device_index);
      }
      if (!st) {
         cudnnStatus_t de = cudnnSetStream(c->dnn, c->stream);
         if (de != CUDNN_STATUS_SUCCESS) st = nr_cuda_fail_dnn(de, __func__, __FILE__, __LINE__, "cudnnSetStream");
      }
      if (!st) {
         __atomic_store_n(&d->ctx_ready, 1, __ATOMIC_RELEASE);
      } else { /* undo what was made: the next call starts clean instead of leaking it again */
         if (c->dnn) cudnnDestroy(c->dnn);
         if (c->blas) cublasDestroy(c->blas);
         for (int i = 0; i < 2 * NR_STAGING_SLOTS; i++) {
            cudaEvent_t *ev = &d->staging[i / NR_STAGING_SLOTS][i % NR_STAGING_SLOTS].done;
            if (*ev) cudaEventDestroy(*ev);
            *ev = NULL;
         }
         if (c->stream) cudaStreamDestroy(c->stream);
         memset(c, 0, sizeof *c);
         cudaGetLastError();
      }
   }
   pthread_mutex_unlock(&g_lock);
   if (st) return st;
   *out = &d->ctx;
   return NR_OK;
}

nr_status nr_cuda_scratch(nr_cuda_ctx *ctx, int slot, int64_t bytes, void **out)
{
   if (slot < 0 || slot >= NR_CUDA_SCRATCH_SLOTS) return NR_FAIL(NR_E_INTERNAL, "scratch slot %d out of range", slot);
   if (bytes < 1) bytes = 1;
   if (ctx->scratch_bytes[slot] < bytes) {
      if (ctx->scratch[slot]) nr_cuda_free(ctx->device, ctx->scratch[slot], ctx->scratch_bytes[slot]);
      ctx->scratch[slot] = NULL;
      ctx->scratch_bytes[slot] = 0;
      int64_t want = bytes + bytes / 4; /* headroom: shapes grow a little between calls */
      void *p = nr_cuda_alloc(ctx->device, want);
      if (!p && (p = nr_cuda_alloc(ctx->device, bytes)) != NULL) want = bytes; /* no room for headroom */
      if (!p) return NR_E_OOM;
      ctx->scratch[slot] = p;
      ctx->scratch_bytes[slot] = want;
   }
   *out = ctx->scratch[slot];
   return NR_OK;
}

nr_status nr_cuda_synchronize(void)
{
   int n = nr_cuda_device_count();
   for (int i = 0; i < n; i++) {
      if (!__atomic_load_n(&g_dev[i].ctx_ready, __ATOMIC_ACQUIRE)) continue;
      NR_TRY(use_device(i));
      /* the whole device: the compute stream and any other library's streams (NCCL) */
      NR_CU(cudaDeviceSynchronize(), "synchronizing cuda:%d", i);
   }
   return NR_OK;
}

/* ---------------------------------------------------------------- element access */

nr_status nr_cuda_get(const nr_tensor *t, int64_t off, double *value)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(t->device_index, &ctx));
   int32_t es = nr_dtype_size(t->dtype);
   union {
      float f;
      int64_t i;
      uint16_t h;
      uint8_t u;
   } v;
   v.i = 0;
   NR_CU(cudaMemcpyAsync(&v, (const char *)t->data + off * es, (size_t)es, cudaMemcpyDeviceToHost, ctx->stream),
         "reading element %lld of %s", (long long)off, NR_DESC(t));
   NR_CU(cudaStreamSynchronize(ctx->stream), "reading element %lld of %s", (long long)off, NR_DESC(t));
   switch (t->dtype) {
   case NR_F32: *value = v.f; break;
   case NR_I64: *value = (double)v.i; break;
   case NR_BF16: *value = nr_bf16_to_f32(v.h); break;
   default: *value = v.u; break;
   }
   return NR_OK;
}

nr_status nr_cuda_set(nr_tensor *t, int64_t off, double value)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(t->device_index, &ctx));
   return nr_cuda_launch_set_one(ctx, t, off, value);
}

/* ---------------------------------------------------------------- copies */

enum { STAGING_MAX = 64 << 20 }; /* bytes; bigger copies go through in chunks */

/* Host bytes (pageable) -> device, asynchronously on the ring's stream (STAGE_COMPUTE: the compute
 * stream, STAGE_PREFETCH: the copy stream), through one of the device's pinned
 * staging rings: each chunk takes the ring's next slot, waiting only until that slot's previous
 * copy has finished. The prefetch ring stages a whole transfer in one slot (no chunks), so a big
 * batch never waits for its own earlier chunk, which sits behind the compute queued before it;
 * only when the host cannot pin that much does it fall back to chunks.
 * After a failure nothing queued still reads a staging buffer (the stream is drained). */
static nr_status stage_h2d(nr_cuda_ctx *ctx, int ring, void *dst, const void *src, int64_t bytes)
{
   devstate *d = &g_dev[ctx->device];
   cudaStream_t stream = ring == STAGE_PREFETCH ? d->copy_stream : ctx->stream;
   /* the prefetch ring stages a whole transfer in one slot, unless pinning that much failed before */
   const int whole = ring == STAGE_PREFETCH && !(d->pin_failed && bytes >= d->pin_failed);
   int64_t chunk = whole || bytes < STAGING_MAX ? bytes : STAGING_MAX;
   if (chunk <= 0) return NR_OK;
   nr_status st = NR_OK;
   for (int64_t done = 0; !st && done < bytes;) {
      int64_t n = bytes - done < chunk ? bytes - done : chunk;
      struct staging_slot *s = &d->staging[ring][d->staging_next[ring]];
      d->staging_next[ring] = (d->staging_next[ring] + 1) % NR_STAGING_SLOTS;
      cudaError_t e = cudaSuccess;
      if (s->pending) {
         e = cudaEventSynchronize(s->done);
         if (e != cudaSuccess) {
            st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "waiting for a staging buffer's previous host-to-device copy");
            break;
         }
         s->pending = 0;
      }
      if (s->bytes < n) {
         if (s->ptr && cudaFreeHost(s->ptr) != cudaSuccess) (void)cudaGetLastError();
         s->ptr = NULL;
         s->bytes = 0;
         int64_t want = n < (1 << 20) ? (1 << 20) : n;
         e = cudaHostAlloc(&s->ptr, (size_t)want, cudaHostAllocDefault);
         if (e != cudaSuccess) {
            s->ptr = NULL;
            cudaGetLastError();
            if (n > STAGING_MAX) { /* no pinned block this large: this and later transfers as large
                                    * go in chunks (a chunk may wait for an earlier one: less overlap) */
               if (!d->pin_failed || want < d->pin_failed) d->pin_failed = want;
               chunk = STAGING_MAX;
               continue;
            }
            st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "pinned staging buffer of %lld bytes", (long long)want);
            break;
         }
         s->bytes = want;
      }
      memcpy(s->ptr, (const char *)src + done, (size_t)n);
      e = cudaMemcpyAsync((char *)dst + done, s->ptr, (size_t)n, cudaMemcpyHostToDevice, stream);
      if (e == cudaSuccess) e = cudaEventRecord(s->done, stream);
      if (e != cudaSuccess) st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "host-to-device copy of %lld bytes", (long long)n);
      else s->pending = 1;
      done += n;
   }
   if (st) {
      cudaStreamSynchronize(stream); /* earlier chunks may still read their slots */
      cudaGetLastError();
   }
   return st;
}

nr_status nr_cuda_upload(nr_cuda_ctx *ctx, void *dst, const void *src, int64_t bytes)
{
   return stage_h2d(ctx, STAGE_COMPUTE, dst, src, bytes);
}

/* A contiguous tensor header over raw memory (no storage), shaped like `like` (equal numel). */
static nr_tensor raw_view(const nr_tensor *like, int32_t dtype, int32_t device, int32_t device_index, void *data)
{
   nr_tensor t;
   memset(&t, 0, sizeof t);
   t.dtype = dtype;
   t.device = device;
   t.device_index = device_index;
   t.ndim = like->ndim;
   int64_t st = 1;
   for (int d = like->ndim - 1; d >= 0; d--) {
      t.shape[d] = like->shape[d];
      t.stride[d] = st;
      st *= like->shape[d];
   }
   t.data = data;
   return t;
}

nr_status nr_cuda_as_dtype(nr_cuda_ctx *ctx, const nr_tensor *t, int32_t dtype, int slot, nr_tensor *out)
{
   if (t->dtype == dtype) {
      *out = *t;
      return NR_OK;
   }
   void *p;
   NR_TRY(nr_cuda_scratch(ctx, slot, nr_tensor_numel(t) * nr_dtype_size(dtype), &p));
   *out = raw_view(t, dtype, NR_CUDA, t->device_index, p);
   return nr_cuda_launch_copy(ctx, out, t);
}

static nr_status copy_h2d(nr_tensor *dst, const nr_tensor *src)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dst->device_index, &ctx));
   int64_t n = nr_tensor_numel(src), bytes = n * nr_dtype_size(src->dtype);
   if (n == 0) return NR_OK;
   if (!nr_tensor_is_contiguous(src)) {
      /* gather the strided host view into a contiguous host copy first */
      nr_tensor *h = nr_tensor_new(src->dtype, NR_CPU, src->ndim, src->shape);
      if (!h) return NR_E_OOM;
      nr_status st = nr_tensor_copy(h, src);
      if (!st) st = copy_h2d(dst, h);
      nr_tensor_free(h);
      return st;
   }
   if (nr_tensor_is_contiguous(dst) && dst->dtype == src->dtype)
      return stage_h2d(ctx, STAGE_COMPUTE, dst->data, src->data, bytes);
   void *tmp = nr_cuda_alloc(dst->device_index, bytes);
   if (!tmp) return NR_E_OOM;
   nr_status st = stage_h2d(ctx, STAGE_COMPUTE, tmp, src->data, bytes);
   if (!st) {
      nr_tensor tv = raw_view(dst, src->dtype, NR_CUDA, dst->device_index, tmp);
      st = nr_cuda_launch_copy(ctx, dst, &tv);
   }
   nr_cuda_free(dst->device_index, tmp, bytes); /* stream-ordered: safe to reuse at once */
   return st;
}

/* The copy stream and events of a GPU's prefetch, created on first use (the Lua thread only). */
static nr_status prefetch_ready(devstate *d, int32_t dev)
{
   if (d->copy_stream) return NR_OK;
   /* the events first and the stream last, so a failure leaves nothing half made: the next call
    * tries again (events made before a failure are created again, a small leak on a failing GPU) */
   NR_CU(cudaEventCreateWithFlags(&d->compute_mark, cudaEventDisableTiming), "cudaEventCreate on cuda:%d", dev);
   for (int i = 0; i < NR_PREFETCH_SLOTS; i++)
      NR_CU(cudaEventCreateWithFlags(&d->prefetch[i].done, cudaEventDisableTiming), "cudaEventCreate on cuda:%d", dev);
   /* non-blocking: ordered with the compute stream by events only, never by the legacy stream */
   cudaStream_t s;
   NR_CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "creating the copy stream of cuda:%d", dev);
   d->copy_stream = s;
   return NR_OK;
}

nr_status nr_cuda_prefetch(nr_tensor *dst, const nr_tensor *src, int64_t *ticket)
{
   NR_CHECK_T("dst", dst, -1, NR_CUDA, -1, NULL);
   NR_CHECK_T("src", src, dst->dtype, NR_CPU, dst->ndim, dst->shape);
   if (!ticket) return NR_FAIL(NR_E_ARG, "ticket: NULL");
   *ticket = 0;
   if (!nr_tensor_is_contiguous(dst) || !nr_tensor_is_contiguous(src))
      return NR_FAIL(NR_E_ARG, "dst %s and src %s must be contiguous", NR_DESC(dst), NR_DESC(src));
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(dst->device_index, &ctx));
   devstate *d = &g_dev[dst->device_index];
   NR_TRY(prefetch_ready(d, dst->device_index));
   const int64_t bytes = nr_tensor_numel(src) * nr_dtype_size(src->dtype);
   /* after the compute stream's work so far, which may still read dst */
   NR_CU(cudaEventRecord(d->compute_mark, ctx->stream), "prefetch: marking the compute stream");
   NR_CU(cudaStreamWaitEvent(d->copy_stream, d->compute_mark, 0), "prefetch: ordering the copy stream");
   NR_TRY(stage_h2d(ctx, STAGE_PREFETCH, dst->data, src->data, bytes));
   const int64_t t = d->prefetch_seq + 1;
   struct prefetch_slot *s = &d->prefetch[t % NR_PREFETCH_SLOTS];
   /* the slot's older copy has not been waited for: the compute stream waits for it now, before
    * its event is recorded again (conservative, and keeps the freed-block guard exact) */
   cudaError_t e = s->ticket ? cudaStreamWaitEvent(ctx->stream, s->done, 0) : cudaSuccess;
   if (e == cudaSuccess) e = cudaEventRecord(s->done, d->copy_stream);
   if (e != cudaSuccess) {
      /* the copy is queued but cannot be tracked: finish it (and the older one) on the host */
      nr_status st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "prefetch: ordering %s", NR_DESC(dst));
      cudaStreamSynchronize(d->copy_stream);
      cudaGetLastError();
      return st;
   }
   pthread_mutex_lock(&g_lock); /* nr_cuda_free reads the slots */
   s->dst = dst->data;
   s->bytes = bytes;
   s->ticket = t;
   d->prefetch_seq = t;
   pthread_mutex_unlock(&g_lock);
   *ticket = t;
   return NR_OK;
}

nr_status nr_cuda_prefetch_wait(int32_t device_index, int64_t ticket)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(device_index, &ctx));
   devstate *d = &g_dev[device_index];
   if (ticket < 1 || ticket > d->prefetch_seq)
      return NR_FAIL(NR_E_ARG, "cuda:%d has no prefetch ticket %lld (the latest is %lld)", device_index, (long long)ticket,
                     (long long)d->prefetch_seq);
   /* a slot recorded again since holds a later copy on the same in-order stream: waiting for it
    * covers this one too */
   NR_CU(cudaStreamWaitEvent(ctx->stream, d->prefetch[ticket % NR_PREFETCH_SLOTS].done, 0), "prefetch: waiting for ticket %lld",
         (long long)ticket);
   pthread_mutex_lock(&g_lock);
   for (int i = 0; i < NR_PREFETCH_SLOTS; i++)
      if (d->prefetch[i].ticket && d->prefetch[i].ticket <= ticket) d->prefetch[i].ticket = 0;
   pthread_mutex_unlock(&g_lock);
   return NR_OK;
}

static nr_status copy_d2h(nr_tensor *dst, const nr_tensor *src)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(src->device_index, &ctx));
   int64_t n = nr_tensor_numel(src), bytes = n * nr_dtype_size(src->dtype);
   if (n == 0) return NR_OK;
   bool direct = nr_tensor_is_contiguous(dst) && dst->dtype == src->dtype;
   void *dev = src->data, *tmp = NULL;
   if (!nr_tensor_is_contiguous(src)) {
      tmp = nr_cuda_alloc(src->device_index, bytes);
      if (!tmp) return NR_E_OOM;
      nr_tensor tv = raw_view(src, src->dtype, NR_CUDA, src->device_index, tmp);
      nr_status st = nr_cuda_launch_copy(ctx, &tv, src);
      if (st) {
         nr_cuda_free(src->device_index, tmp, bytes);
         return st;
      }
      dev = tmp;
   }
   nr_tensor *h = NULL;
   void *host = dst->data;
   if (!direct) {
      h = nr_tensor_new(src->dtype, NR_CPU, src->ndim, src->shape);
      if (!h) {
         if (tmp) nr_cuda_free(src->device_index, tmp, bytes);
         return NR_E_OOM;
      }
      host = h->data;
   }
   nr_status st = NR_OK;
   cudaError_t e = cudaMemcpyAsync(host, dev, (size_t)bytes, cudaMemcpyDeviceToHost, ctx->stream);
   if (e == cudaSuccess) e = cudaStreamSynchronize(ctx->stream);
   if (e != cudaSuccess)
      st = nr_cuda_fail_rt(e, __func__, __FILE__, __LINE__, "device-to-host copy %s -> %s", NR_DESC(src), NR_DESC(dst));
   if (tmp) nr_cuda_free(src->device_index, tmp, bytes);
   if (!st && h) st = nr_tensor_copy(dst, h);
   nr_tensor_free(h);
   return st;
}

static nr_status copy_d2d_peer(nr_tensor *dst, const nr_tensor *src)
{
   int64_t n = nr_tensor_numel(src), bytes = n * nr_dtype_size(src->dtype);
   if (n == 0) return NR_OK;
   if (nr_tensor_is_contiguous(dst) && nr_tensor_is_contiguous(src) && dst->dtype == src->dtype) {
      nr_cuda_ctx *cs, *cd;
      NR_TRY(nr_cuda_ctx_get(dst->device_index, &cd));
      NR_CU(cudaStreamSynchronize(cd->stream), "cuda:%d before a peer copy", dst->device_index);
      NR_TRY(nr_cuda_ctx_get(src->device_index, &cs));
      NR_CU(cudaMemcpyPeerAsync(dst->data, dst->device_index, src->data, src->device_index, (size_t)bytes, cs->stream),
            "peer copy %s (cuda:%d) -> %s (cuda:%d)", NR_DESC(src), src->device_index, NR_DESC(dst), dst->device_index);
      NR_CU(cudaStreamSynchronize(cs->stream), "peer copy");
      return NR_OK;
   }
   /* rare: strided or converting copy between GPUs goes through the host */
   nr_tensor *h = nr_tensor_new(src->dtype, NR_CPU, src->ndim, src->shape);
   if (!h) return NR_E_OOM;
   nr_status st = copy_d2h(h, src);
   if (!st) st = copy_h2d(dst, h);
   nr_tensor_free(h);
   return st;
}

nr_status nr_cuda_copy(nr_tensor *dst, const nr_tensor *src)
{
   if (dst->device == NR_CUDA && src->device == NR_CUDA) {
      if (dst->device_index != src->device_index) return copy_d2d_peer(dst, src);
      nr_cuda_ctx *ctx;
      NR_TRY(nr_cuda_ctx_get(dst->device_index, &ctx));
      return nr_cuda_launch_copy(ctx, dst, src);
   }
   if (dst->device == NR_CUDA) return copy_h2d(dst, src);
   return copy_d2h(dst, src);
}

/* ---------------------------------------------------------------- side streams (side.h) */

nr_status nr_cuda_side_stream_create(int32_t device_index, void **stream)
{
   nr_cuda_ctx *ctx; /* the compute stream exists before anything is ordered after it */
   NR_TRY(nr_cuda_ctx_get(device_index, &ctx));
   cudaStream_t s;
   NR_CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "a side stream on cuda:%d", device_index);
   *stream = s;
   return NR_OK;
}

nr_status nr_cuda_side_stream_destroy(void *stream)
{
   NR_CU(cudaStreamSynchronize((cudaStream_t)stream), "finishing a side stream's work");
   NR_CU(cudaStreamDestroy((cudaStream_t)stream), "destroying a side stream");
   return NR_OK;
}

/* `waiter` waits for the work queued so far on `after`, through a one-use event. */
static nr_status stream_after(cudaStream_t waiter, cudaStream_t after, const char *what, int32_t device_index)
{
   cudaEvent_t ev;
   NR_CU(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "%s on cuda:%d", what, device_index);
   cudaError_t e = cudaEventRecord(ev, after);
   if (e == cudaSuccess) e = cudaStreamWaitEvent(waiter, ev, 0);
   cudaEventDestroy(ev); /* released once its work completes */
   NR_CU(e, "%s on cuda:%d", what, device_index);
   return NR_OK;
}

nr_status nr_cuda_side_after_compute(int32_t device_index, void *stream)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(device_index, &ctx));
   return stream_after((cudaStream_t)stream, ctx->stream, "ordering a side stream after the compute stream", device_index);
}

nr_status nr_cuda_side_record(void *stream, void **event)
{
   cudaEvent_t ev;
   NR_CU(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "an event on a side stream");
   cudaError_t e = cudaEventRecord(ev, (cudaStream_t)stream);
   if (e != cudaSuccess) {
      cudaEventDestroy(ev);
      NR_CU(e, "recording an event on a side stream");
   }
   *event = ev;
   return NR_OK;
}

nr_status nr_cuda_side_query(void *event, int32_t *done)
{
   cudaError_t e = cudaEventQuery((cudaEvent_t)event);
   *done = e == cudaSuccess;
   if (e == cudaErrorNotReady) {
      cudaGetLastError(); /* not an error: leave no sticky "not ready" behind */
      return NR_OK;
   }
   NR_CU(e, "querying a side stream's event");
   return NR_OK;
}

nr_status nr_cuda_side_join(int32_t device_index, void *event)
{
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(device_index, &ctx));
   NR_CU(cudaStreamWaitEvent(ctx->stream, (cudaEvent_t)event, 0), "the compute stream of cuda:%d joining a side stream",
         device_index);
   return NR_OK;
}

void nr_cuda_side_event_destroy(void *event)
{
   if (event) cudaEventDestroy((cudaEvent_t)event);
}

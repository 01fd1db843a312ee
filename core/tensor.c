/* tensor.c — storage, views, copies, fills, index select/copy, memory accounting, threads.
 * Invariants: a storage is freed with its last view; data == storage base + offset * esize;
 * every view lies inside its storage and has at most 2^40 elements (checked, overflow-safe, in
 * nr_tensor_view), so spans and element counts of views never overflow int64. Copies and fills
 * over strided views walk merged runs (walk_plan), never one element's offset at a time; ops
 * that write while reading (copy, matmul, index select/copy) never silently read what they
 * already overwrote: they go through a temporary or refuse. */
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct nr_storage {
   void *base;
   int64_t bytes;
   int32_t device, device_index;
   atomic_int refs;
};

/* ---- memory accounting ---------------------------------------------------------------- */

typedef struct {
   atomic_llong in_use, peak, allocs;
} mem_stats;
enum { MAX_GPUS = 16 }; /* as the CUDA backend's NR_CUDA_MAX_DEVICES */
static mem_stats g_kind[2];        /* NR_CPU, NR_CUDA (every GPU) */
static mem_stats g_gpu[MAX_GPUS];  /* each GPU */

static void count(mem_stats *m, int64_t delta)
{
   long long now = atomic_fetch_add(&m->in_use, delta) + delta;
   if (delta > 0) {
      atomic_fetch_add(&m->allocs, 1);
      long long p = atomic_load(&m->peak);
      while (now > p && !atomic_compare_exchange_weak(&m->peak, &p, now)) {}
   }
}

static void account(int32_t device, int32_t device_index, int64_t delta)
{
   count(&g_kind[device], delta);
   if (device == NR_CUDA && device_index >= 0 && device_index < MAX_GPUS) count(&g_gpu[device_index], delta);
}

static void reset_peak(mem_stats *m) { atomic_store(&m->peak, atomic_load(&m->in_use)); }

int64_t nr_memory_in_use(int32_t device) { return (device == 0 || device == 1) ? g_kind[device].in_use : 0; }
int64_t nr_memory_peak(int32_t device) { return (device == 0 || device == 1) ? g_kind[device].peak : 0; }
int64_t nr_memory_alloc_count(int32_t device) { return (device == 0 || device == 1) ? g_kind[device].allocs : 0; }
void nr_memory_reset_peak(int32_t device)
{
   if (device != 0 && device != 1) return;
   reset_peak(&g_kind[device]);
   if (device == NR_CUDA)
      for (int i = 0; i < MAX_GPUS; i++) reset_peak(&g_gpu[i]);
}

nr_status nr_memory_of_gpu(int32_t device_index, int64_t *in_use, int64_t *peak, int64_t *allocations)
{
   if (device_index < 0 || device_index >= MAX_GPUS)
      return NR_FAIL(NR_E_ARG, "no GPU index %d (0..%d)", device_index, MAX_GPUS - 1);
   *in_use = g_gpu[device_index].in_use;
   *peak = g_gpu[device_index].peak;
   *allocations = g_gpu[device_index].allocs;
   return NR_OK;
}

void nr_memory_reset_peak_of_gpu(int32_t device_index)
{
   if (device_index >= 0 && device_index < MAX_GPUS) reset_peak(&g_gpu[device_index]);
}

/* Host buffers of NR_MAP_MIN bytes and more are mapped and unmapped directly, not malloc'd: once
 * glibc frees one of its own mappings it raises its mmap threshold (up to 32 MiB), so later buffers
 * of that size come from the heap, where the activations that change shape between training and
 * evaluation batches fragment it and are never returned: RSS grew epoch after epoch (347 -> 576 MB
 * over 20 epochs of the Fashion-MNIST quickstart, evaluating each epoch, at flat bytes in use).
 * Under ASan they stay in malloc, whose blocks it checks. */
#define NR_MAP_MIN ((int64_t)1 << 20)
#if defined(__SANITIZE_ADDRESS__)
#define NR_MAP_DIRECT 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NR_MAP_DIRECT 0
#endif
#endif
#ifndef NR_MAP_DIRECT
#define NR_MAP_DIRECT 1
#endif

void *nr_mem_alloc(int32_t device, int32_t device_index, int64_t bytes)
{
   void *p = NULL;
   int64_t rounded = (bytes + 63) / 64 * 64;
   if (rounded == 0) rounded = 64;
   if (device == NR_CPU) {
      if (NR_MAP_DIRECT && rounded >= NR_MAP_MIN) {
         p = mmap(NULL, (size_t)rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
         if (p == MAP_FAILED) p = NULL;
      } else {
         p = aligned_alloc(64, (size_t)rounded);
      }
      if (!p) {
         NR_FAIL(NR_E_OOM, "out of host memory allocating %lld bytes (%lld in use)",
                 (long long)bytes, (long long)g_kind[NR_CPU].in_use);
         return NULL;
      }
   } else if (device == NR_CUDA) {
#ifdef NR_WITH_CUDA
      p = nr_cuda_alloc(device_index, rounded);
      if (!p) return NULL; /* nr_cuda_alloc set the message */
#else
      (void)device_index;
      NR_FAIL(NR_E_DEVICE, "this nrlua was built without CUDA");
      return NULL;
#endif
   } else {
      NR_FAIL(NR_E_ARG, "unknown device %d", device);
      return NULL;
   }
   account(device, device_index, rounded);
   return p;
}

void nr_mem_free(int32_t device, int32_t device_index, void *ptr, int64_t bytes)
{
   int64_t rounded = (bytes + 63) / 64 * 64;
   if (rounded == 0) rounded = 64;
   if (device == NR_CPU) {
      if (NR_MAP_DIRECT && rounded >= NR_MAP_MIN) munmap(ptr, (size_t)rounded);
      else free(ptr);
   }
#ifdef NR_WITH_CUDA
   else nr_cuda_free(device_index, ptr, rounded);
#else
   (void)device_index;
#endif
   account(device, device_index, -rounded);
}

/* ---- threads ---------------------------------------------------------------------------- */

static int g_threads = 0;

int nr_threads(void) { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

void nr_set_num_threads(int32_t n)
{
   if (n <= 0) n = omp_get_num_procs();
   g_threads = n;
   omp_set_num_threads(n); /* OpenBLAS stays single-threaded: nr_sgemm (core/math.c) */
}
int32_t nr_get_num_threads(void) { return nr_threads(); }
int32_t nr_cpu_available(void) { return omp_get_num_procs(); }
int32_t nr_cpu_online(void)
{
   long n = sysconf(_SC_NPROCESSORS_ONLN);
   return n > 0 ? (int32_t)n : omp_get_num_procs();
}

/* ---- tensors ----------------------------------------------------------------------------- */

int32_t nr_dtype_size(int32_t dtype)
{
   switch (dtype) {
   case NR_F32: return 4;
   case NR_I64: return 8;
   case NR_U8: return 1;
   case NR_BF16: return 2;
   default: return 0;
   }
}

int64_t nr_tensor_numel(const nr_tensor *t)
{
   int64_t n = 1;
   for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
   return n;
}

int32_t nr_tensor_is_contiguous(const nr_tensor *t)
{
   for (int d = 0; d < t->ndim; d++)
      if (t->shape[d] == 0) return 1; /* no element: any strides (PyTorch's rule; a reshape of an empty one) */
   int64_t expect = 1;
   for (int d = t->ndim - 1; d >= 0; d--) {
      if (t->shape[d] != 1 && t->stride[d] != expect) return 0;
      expect *= t->shape[d];
   }
   return 1;
}

int32_t nr_tensor_is_channels_last(const nr_tensor *t)
{
   if (t->ndim != 4) return 0;
   static const int order[4] = {1, 3, 2, 0}; /* innermost first: C, W, H, N */
   int64_t expect = 1;
   for (int i = 0; i < 4; i++) {
      const int d = order[i];
      if (t->shape[d] != 1 && t->stride[d] != expect) return 0;
      expect *= t->shape[d];
   }
   return 1;
}

int32_t nr_tensor_same_storage(const nr_tensor *a, const nr_tensor *b)
{
   return a && b && a->storage == b->storage;
}

static nr_status check_geometry(int32_t ndim, const int64_t *shape)
{
   if (ndim < 0 || ndim > 8) return NR_FAIL(NR_E_ARG, "ndim %d out of range 0..8", ndim);
   for (int d = 0; d < ndim; d++)
      if (shape[d] < 0) return NR_FAIL(NR_E_ARG, "size %lld of dimension %d is negative", (long long)shape[d], d);
   return NR_OK;
}

/* Tensors and views hold at most NR_MAX_NUMEL (2^40) elements: numel, and numel times the element
 * size, then never overflow int64 (nor does anything that iterates over them). Each dimension is
 * bounded the same way even where another is 0 (an empty (0, 2^62) was accepted, then every op
 * that copies its shape refused it). */

static nr_status check_numel(const char *func, int32_t ndim, const int64_t *shape, int64_t *numel)
{
   int64_t n = 1;
   for (int d = 0; d < ndim; d++) {
      if (shape[d] > NR_MAX_NUMEL || (shape[d] > 0 && n > NR_MAX_NUMEL / shape[d])) {
         char buf[160];
         int len = 0;
         for (int e = 0; e < ndim && len < (int)sizeof buf - 24; e++)
            len += snprintf(buf + len, sizeof buf - (size_t)len, "%s%lld", e ? "x" : "", (long long)shape[e]);
         if (shape[d] > NR_MAX_NUMEL)
            return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "tensor too large: shape %s: size %lld of dimension %d "
                              "is more than 2^40", buf, (long long)shape[d], d + 1);
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "tensor too large: shape %s has more than 2^40 elements",
                           buf);
      }
      n *= shape[d];
   }
   *numel = n;
   return NR_OK;
}

/* The lowest and highest element offsets, relative to its first element, that a view of this
 * shape and stride reaches (empty dimensions are skipped); false when they overflow int64. */
static bool elem_span(int32_t ndim, const int64_t *shape, const int64_t *stride, int64_t *lo, int64_t *hi)
{
   *lo = *hi = 0;
   for (int d = 0; d < ndim; d++) {
      int64_t span;
      if (shape[d] == 0) continue;
      if (__builtin_mul_overflow(shape[d] - 1, stride[d], &span)) return false;
      if (span < 0 ? __builtin_add_overflow(*lo, span, lo) : __builtin_add_overflow(*hi, span, hi)) return false;
   }
   return true;
}

nr_tensor *nr_tensor_new(int32_t dtype, int32_t device, int32_t ndim, const int64_t *shape)
{
   int32_t dev_index = 0;
#ifdef NR_WITH_CUDA
   if (device == NR_CUDA) dev_index = nr_cuda_current_device();
#endif
   return nr_tensor_new_at(dtype, device, dev_index, ndim, shape);
}

nr_tensor *nr_tensor_new_at(int32_t dtype, int32_t device, int32_t dev_index, int32_t ndim, const int64_t *shape)
{
   if (nr_dtype_size(dtype) == 0) {
      NR_FAIL(NR_E_ARG, "unknown dtype %d", dtype);
      return NULL;
   }
   int64_t numel;
   if (check_geometry(ndim, shape) || check_numel(__func__, ndim, shape, &numel)) return NULL;
   nr_tensor *t = calloc(1, sizeof *t);
   nr_storage *s = calloc(1, sizeof *s);
   if (!t || !s) {
      free(t);
      free(s);
      NR_FAIL(NR_E_OOM, "out of host memory");
      return NULL;
   }
   if (device != NR_CUDA) dev_index = 0;
   s->bytes = numel * nr_dtype_size(dtype);
   s->base = nr_mem_alloc(device, dev_index, s->bytes);
   if (!s->base) {
      free(t);
      free(s);
      return NULL;
   }
   s->device = device;
   s->device_index = dev_index;
   atomic_init(&s->refs, 1);
   t->dtype = dtype;
   t->device = device;
   t->device_index = dev_index;
   t->ndim = ndim;
   int64_t st = 1;
   for (int d = ndim - 1; d >= 0; d--) {
      t->shape[d] = shape[d];
      t->stride[d] = st;
      st *= shape[d];
   }
   t->offset = 0;
   t->data = s->base;
   t->storage = s;
   return t;
}

nr_tensor *nr_tensor_view(const nr_tensor *src, int32_t ndim, const int64_t *shape,
                          const int64_t *stride, int64_t offset)
{
   if (!src) {
      NR_FAIL(NR_E_ARG, "source tensor is NULL");
      return NULL;
   }
   int64_t numel;
   if (check_geometry(ndim, shape) || check_numel(__func__, ndim, shape, &numel)) return NULL;
   int32_t es = nr_dtype_size(src->dtype);
   int64_t capacity = src->storage->bytes / es, lo, hi;
   /* a view of no element reads nothing: any offset will do (narrowing an empty view whose
    * strides step past its empty storage, as PyTorch allows) */
   if (numel == 0 && offset > capacity) offset = capacity;
   if (offset < 0 || offset > capacity) {
      NR_FAIL(NR_E_ARG, "offset %lld lies outside its storage of %lld elements", (long long)offset,
              (long long)capacity);
      return NULL;
   }
   if (!elem_span(ndim, shape, stride, &lo, &hi)) {
      int d = 0; /* name the dimension with the widest span */
      for (int e = 1; e < ndim; e++)
         if ((double)(shape[e] - 1) * fabs((double)stride[e]) > (double)(shape[d] - 1) * fabs((double)stride[d])) d = e;
      NR_FAIL(NR_E_ARG, "stride %lld of dimension %d (size %lld): view too large for its storage of %lld elements",
              (long long)stride[d], d, (long long)shape[d], (long long)capacity);
      return NULL;
   }
   /* lo <= 0 <= hi and 0 <= offset <= capacity: lo + offset cannot overflow, hi + offset can */
   if (numel > 0 && (lo + offset < 0 || hi >= capacity - offset)) {
      NR_FAIL(NR_E_ARG, "view [%lld, %lld] lies outside its storage of %lld elements", (long long)(lo + offset),
              (long long)(hi > INT64_MAX - offset ? INT64_MAX : hi + offset), (long long)capacity);
      return NULL;
   }
   nr_tensor *t = calloc(1, sizeof *t);
   if (!t) {
      NR_FAIL(NR_E_OOM, "out of host memory");
      return NULL;
   }
   *t = *src;
   t->ndim = ndim;
   for (int d = 0; d < 8; d++) {
      t->shape[d] = d < ndim ? shape[d] : 0;
      t->stride[d] = d < ndim ? stride[d] : 0;
   }
   t->offset = offset;
   t->data = (char *)src->storage->base + offset * es;
   atomic_fetch_add(&src->storage->refs, 1);
   return t;
}

void nr_tensor_free(nr_tensor *t)
{
   if (!t) return;
   nr_storage *s = t->storage;
   if (s && atomic_fetch_sub(&s->refs, 1) == 1) {
      nr_mem_free(s->device, s->device_index, s->base, s->bytes);
      free(s);
   }
   free(t);
}

/* ---- element access ------------------------------------------------------------------------ */

static inline double load_as_double(const void *base, int32_t dtype, int64_t off)
{
   switch (dtype) {
   case NR_F32: return ((const float *)base)[off];
   case NR_I64: return (double)((const int64_t *)base)[off];
   case NR_BF16: return nr_bf16_to_f32(((const uint16_t *)base)[off]);
   default: return ((const uint8_t *)base)[off];
   }
}

/* double -> int64 without C's undefined cases: NaN and values outside int64 give INT64_MIN (what
 * x86's conversion, and so PyTorch on it, gives); in range it truncates toward zero. */
static inline int64_t double_to_i64(double v)
{
   return v >= -0x1p63 && v < 0x1p63 ? (int64_t)v : INT64_MIN;
}

static inline void store_double(void *base, int32_t dtype, int64_t off, double v)
{
   switch (dtype) {
   case NR_F32: ((float *)base)[off] = (float)v; break;
   case NR_I64: ((int64_t *)base)[off] = double_to_i64(v); break;
   case NR_BF16: ((uint16_t *)base)[off] = nr_f32_to_bf16((float)v); break;
   default: ((uint8_t *)base)[off] = (uint8_t)(uint64_t)double_to_i64(v); break; /* wraps mod 256 */
   }
}

/* From int64 directly: through a double, values past 2^53 would round twice (int64 -> double ->
 * float) and large ones would reach uint8 through an undefined cast. */
static inline void store_i64(void *base, int32_t dtype, int64_t off, int64_t v)
{
   switch (dtype) {
   case NR_F32: ((float *)base)[off] = (float)v; break;
   case NR_I64: ((int64_t *)base)[off] = v; break;
   case NR_BF16: ((uint16_t *)base)[off] = nr_f32_to_bf16((float)v); break;
   default: ((uint8_t *)base)[off] = (uint8_t)(uint64_t)v; break; /* wraps mod 256, as PyTorch */
   }
}

/* Every NaN leaves as the one quiet NaN (0x7ff8000000000000). LuaJIT (2.1, GC64) keeps its
 * type tags in NaN payloads and does not canonicalise doubles read through the FFI: a float NaN
 * with the sign and high payload bits set (0xffffffff, bf16 0xfffd, ...) widens to a double that
 * Lua reads as nil or another non-number. This is the one door from tensor memory to a Lua
 * number (get, item, totable, reductions, printing), so it is closed here. */
static inline double canonical_nan(double v) { return v != v ? (double)NAN : v; }

nr_status nr_tensor_get(const nr_tensor *t, int64_t i, double *value)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   int64_t n = nr_tensor_numel(t);
   if (i < 0 || i >= n) return NR_FAIL(NR_E_ARG, "index %lld out of range for %lld elements", (long long)i, (long long)n);
   if (t->device != NR_CPU) {
#ifdef NR_WITH_CUDA
      double v = 0;
      NR_TRY(nr_cuda_get(t, nr_linear_offset(t, i), &v));
      *value = canonical_nan(v);
      return NR_OK;
#else
      return NR_FAIL(NR_E_DEVICE, "this nrlua was built without CUDA");
#endif
   }
   *value = canonical_nan(load_as_double(t->data, t->dtype, nr_linear_offset(t, i)));
   return NR_OK;
}

nr_status nr_tensor_set(nr_tensor *t, int64_t i, double value)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   int64_t n = nr_tensor_numel(t);
   if (i < 0 || i >= n) return NR_FAIL(NR_E_ARG, "index %lld out of range for %lld elements", (long long)i, (long long)n);
   if (t->device != NR_CPU) {
#ifdef NR_WITH_CUDA
      return nr_cuda_set(t, nr_linear_offset(t, i), value);
#else
      return NR_FAIL(NR_E_DEVICE, "this nrlua was built without CUDA");
#endif
   }
   store_double(t->data, t->dtype, nr_linear_offset(t, i), value);
   return NR_OK;
}

/* ---- copy and fill ----------------------------------------------------------------------- */

static nr_status check_same_shape(const char *func, const nr_tensor *a, const nr_tensor *b)
{
   bool same = a->ndim == b->ndim;
   for (int d = 0; same && d < a->ndim; d++) same = a->shape[d] == b->shape[d];
   if (same) return NR_OK;
   char da[128], db[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "shape mismatch: %s vs %s",
                     nr_tensor_describe(a, da, sizeof da), nr_tensor_describe(b, db, sizeof db));
}

/* The bytes [*lo, *hi) a non-empty view reaches (its lowest and highest element). Views are
 * checked by nr_tensor_view, so the span fits its storage; were it not, the whole address space
 * is returned (it overlaps everything, the safe answer). */
static void byte_span(const nr_tensor *t, const char **lo, const char **hi)
{
   int64_t a, b;
   const int64_t es = nr_dtype_size(t->dtype);
   if (!elem_span(t->ndim, t->shape, t->stride, &a, &b) || a < INT64_MIN / es || b > INT64_MAX / es - 1) {
      *lo = (const char *)0;
      *hi = (const char *)UINTPTR_MAX;
      return;
   }
   *lo = (const char *)t->data + a * es;
   *hi = (const char *)t->data + (b + 1) * es;
}

/* Whether two non-empty views of one storage have intersecting byte spans. */
static bool spans_intersect(const nr_tensor *a, const nr_tensor *b)
{
   if (a->storage != b->storage || a->device != b->device || a->device_index != b->device_index) return false;
   const char *a0, *a1, *b0, *b1;
   byte_span(a, &a0, &a1);
   byte_span(b, &b0, &b1);
   return a0 < b1 && b0 < a1;
}

nr_status nr_check_no_overlap(const char *func, const char *out_name, const nr_tensor *out, const char *in_name,
                              const nr_tensor *in)
{
   if (!out || !in || nr_tensor_numel(out) == 0 || nr_tensor_numel(in) == 0 || !spans_intersect(out, in)) return NR_OK;
   char d_out[128], d_in[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                     "%s %s overlaps %s %s in memory; write into another %s (or pass a clone of %s)", out_name,
                     nr_tensor_describe(out, d_out, sizeof d_out), in_name, nr_tensor_describe(in, d_in, sizeof d_in),
                     out_name, in_name);
}

/* Whether no two elements of a view (nd dims of shape, strides in elements) share an address:
 * sorted by |stride|, each dimension of size > 1 steps past everything the smaller ones span.
 * (Exotic interleavings that share nothing yet fail this are reported as sharing.) */
static bool elements_disjoint(int nd, const int64_t *shape, const int64_t *stride)
{
   int idx[8], m = 0; /* views have at most 8 dimensions */
   for (int d = 0; d < nd; d++)
      if (shape[d] > 1) idx[m++] = d;
   for (int i = 1; i < m; i++) /* by |stride|, ascending */
      for (int j = i; j > 0 && llabs(stride[idx[j - 1]]) > llabs(stride[idx[j]]); j--) {
         const int k = idx[j];
         idx[j] = idx[j - 1], idx[j - 1] = k;
      }
   int64_t reach = 0; /* how far the smaller dimensions span */
   for (int i = 0; i < m; i++) {
      const int64_t a = llabs(stride[idx[i]]);
      if (a <= reach) return false;
      reach += (shape[idx[i]] - 1) * a;
   }
   return true;
}

static bool dense_in_some_order(const nr_tensor *t);

nr_status nr_elementwise_source(const char *func, const char *out_name, const nr_tensor *out, const char *in_name,
                                const nr_tensor *in, const nr_tensor **src, nr_tensor **tmp)
{
   *src = in;
   *tmp = NULL;
   if (!out || nr_tensor_numel(out) == 0) return NR_OK;
   char d_out[128], d_in[128];
   if (!elements_disjoint(out->ndim, out->shape, out->stride))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "%s %s has elements that share memory (stride 0 or overlapping windows), so one result "
                        "would overwrite another; write into a contiguous tensor", out_name,
                        nr_tensor_describe(out, d_out, sizeof d_out));
   if (!in || nr_tensor_numel(in) == 0 || !spans_intersect(out, in)) return NR_OK;
   bool same_view = out->data == in->data && out->dtype == in->dtype && out->ndim == in->ndim;
   for (int d = 0; same_view && d < out->ndim; d++)
      same_view = out->shape[d] == in->shape[d] && (out->shape[d] < 2 || out->stride[d] == in->stride[d]);
   if (same_view) return NR_OK; /* in place: each element is read before it is written */
   if (dense_in_some_order(out) && dense_in_some_order(in))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "%s %s and %s %s overlap in memory without being the same view, so %s would be read after "
                        "being overwritten; write into another tensor (or pass a clone of %s)", out_name,
                        nr_tensor_describe(out, d_out, sizeof d_out), in_name, nr_tensor_describe(in, d_in, sizeof d_in),
                        in_name, in_name);
   /* strided views whose spans meet (columns of one matrix, interleaved rows): they may share no
    * element at all, so this is not refused (PyTorch computes them too); the input is read
    * through a copy, so the result is right either way */
   nr_tensor *t = nr_tensor_new_at(in->dtype, in->device, in->device_index, in->ndim, in->shape);
   if (!t) return NR_E_OOM; /* nr_tensor_new_at set the message */
   nr_status st = nr_tensor_copy(t, in);
   if (st) {
      nr_tensor_free(t);
      return st;
   }
   *src = *tmp = t;
   return NR_OK;
}

/* Non-overlapping and dense (PyTorch's is_non_overlapping_and_dense): the elements fill their
 * byte span exactly, each once, in some order of the dimensions (contiguous, channels-last, a
 * transpose or permutation of either). */
static bool dense_in_some_order(const nr_tensor *t)
{
   int idx[8], m = 0;
   for (int d = 0; d < t->ndim; d++)
      if (t->shape[d] != 1) idx[m++] = d;
   for (int i = 1; i < m; i++) /* by stride, ascending */
      for (int j = i; j > 0 && t->stride[idx[j - 1]] > t->stride[idx[j]]; j--) {
         const int k = idx[j];
         idx[j] = idx[j - 1];
         idx[j - 1] = k;
      }
   int64_t expect = 1;
   for (int i = 0; i < m; i++) {
      if (t->stride[idx[i]] != expect) return false;
      expect *= t->shape[idx[i]];
   }
   return true;
}

enum { COPY_DIRECT, COPY_VIA_TEMP };

/* How a copy between two non-empty views must run when they may share memory (PyTorch's rule for
 * copy_, with its "too hard" case made safe):
 * - different storages, disjoint byte spans, the same view, or two row-major views starting at
 *   one element (x:view(shape):copy(x)): elements are read before they can be overwritten, or
 *   each is copied onto itself: COPY_DIRECT;
 * - both dense in some order (contiguous, channels-last, transposed: every element of the span
 *   belongs to the view) and their spans intersect: some source element is overwritten before it
 *   is read, and PyTorch refuses ("unsupported operation: some elements of the input tensor and
 *   the written-to tensor refer to a single memory location"), so this refuses as well
 *   (a:copy(a:t()), a:narrow(1, 2, n):copy(a:narrow(1, 1, n)));
 * - otherwise (strided views whose spans intersect: they may interleave without sharing an
 *   element, as a column into its neighbour, or overlap, PyTorch's unchecked case):
 *   COPY_VIA_TEMP, source first copied into a temporary, so the result is always src's values. */
static nr_status copy_overlap(const char *func, const nr_tensor *dst, const nr_tensor *src, int *how)
{
   *how = COPY_DIRECT;
   if (!spans_intersect(dst, src)) return NR_OK;
   bool same_view = dst->data == src->data && dst->dtype == src->dtype && dst->ndim == src->ndim;
   for (int d = 0; same_view && d < dst->ndim; d++) same_view = dst->shape[d] < 2 || dst->stride[d] == src->stride[d];
   if (same_view || (dst->data == src->data && dst->dtype == src->dtype && nr_tensor_is_contiguous(dst) &&
                     nr_tensor_is_contiguous(src)))
      return NR_OK;
   if (dense_in_some_order(dst) && dense_in_some_order(src)) {
      char dd[128], ds[128];
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "dst %s and src %s overlap in memory; copy from a clone of src",
                        nr_tensor_describe(dst, dd, sizeof dd), nr_tensor_describe(src, ds, sizeof ds));
   }
   *how = COPY_VIA_TEMP;
   return NR_OK;
}

static nr_status copy_via_temp(nr_tensor *dst, const nr_tensor *src)
{
   nr_tensor *tmp = nr_tensor_new_at(src->dtype, src->device, src->device_index, src->ndim, src->shape);
   if (!tmp) return NR_E_OOM; /* nr_tensor_new_at set the message */
   nr_status st = nr_tensor_copy(tmp, src);
   if (st == NR_OK) st = nr_tensor_copy(dst, tmp);
   nr_tensor_free(tmp);
   return st;
}

/* ---- strided walks: copies and fills over any views ------------------------------------------ */

/* A destination and a source view of one shape walked together in row-major order (strides in
 * elements of each one's dtype; a fill's source is one element, stride 0). Size-1 dimensions are
 * dropped and neighbours merged where both views step evenly across them, so the innermost
 * dimension is the longest run each walks with one stride: a channel slice (N, C', H, W) of an
 * NCHW tensor copied from a contiguous source is N runs of C'HW adjacent elements (memmove). */
typedef struct walk {
   int nd; /* >= 1 */
   int64_t shape[8], sd[8], ss[8];
} walk;

static void walk_plan(walk *w, int32_t ndim, const int64_t *shape, const int64_t *sd, const int64_t *ss)
{
   int nd = 0;
   for (int d = 0; d < ndim; d++) {
      if (shape[d] == 1) continue;
      const int64_t s = ss ? ss[d] : 0;
      if (nd > 0 && w->sd[nd - 1] == sd[d] * shape[d] && w->ss[nd - 1] == s * shape[d]) {
         w->shape[nd - 1] *= shape[d];
         w->sd[nd - 1] = sd[d];
         w->ss[nd - 1] = s;
      } else {
         w->shape[nd] = shape[d], w->sd[nd] = sd[d], w->ss[nd] = s;
         nd++;
      }
   }
   if (nd == 0) w->shape[0] = 1, w->sd[0] = w->ss[0] = 0, nd = 1;
   w->nd = nd;
}

static void contiguous_strides(int32_t ndim, const int64_t *shape, int64_t *stride)
{
   int64_t st = 1;
   for (int d = ndim - 1; d >= 0; d--) {
      stride[d] = st;
      st *= shape[d];
   }
}

/* Whether no two elements of the walk's destination share an address (then its pieces may be
 * written in parallel): by stride, each dimension steps past everything the smaller ones span. */
static bool walk_dst_disjoint(const walk *w) { return elements_disjoint(w->nd, w->shape, w->sd); }

/* n elements from s (stride ss) to d (stride sd): same dtype as its bytes, else through double. */
static void copy_run(char *d, int32_t dt, int64_t sd, const char *s, int32_t st, int64_t ss, int64_t n)
{
   if (dt != st) {
      if (st == NR_I64)
         for (int64_t k = 0; k < n; k++) store_i64(d, dt, k * sd, ((const int64_t *)s)[k * ss]);
      else
         for (int64_t k = 0; k < n; k++) store_double(d, dt, k * sd, load_as_double(s, st, k * ss));
      return;
   }
#define NR_COPY_RUN(T)                                                                          \
   do {                                                                                         \
      T *o = (T *)d;                                                                            \
      const T *i = (const T *)s;                                                                \
      const T v = i[0];                                                                         \
      if (sd == 1 && ss == 1) memmove(o, i, (size_t)n * sizeof(T));                             \
      else if (sd == 1 && ss == 0) for (int64_t k = 0; k < n; k++) o[k] = v; /* a fill */      \
      else for (int64_t k = 0; k < n; k++) o[k * sd] = i[k * ss];                               \
   } while (0)
   switch (nr_dtype_size(dt)) {
   case 8: NR_COPY_RUN(uint64_t); break;
   case 4: NR_COPY_RUN(uint32_t); break;
   case 2: NR_COPY_RUN(uint16_t); break;
   default: NR_COPY_RUN(uint8_t); break;
   }
#undef NR_COPY_RUN
}

/* Runs the walk, cut into pieces of at most 16384 elements (so one long strided run splits over
 * threads too), in parallel when large and the destination has no self-overlap. Runs that are
 * plain memmoves go parallel past 512 KiB: a channel slice of 1.2 MB copies in 0.022 ms on 2
 * threads against 0.071 on one (PyTorch's copy_: 0.045; a fork/join costs more than that only
 * when other processes hold the cores). */
static void walk_copy(const walk *w, char *d, int32_t dt, const char *s, int32_t st)
{
   const int nd = w->nd;
   const int64_t inner = w->shape[nd - 1], esd = nr_dtype_size(dt), ess = nr_dtype_size(st);
   int64_t runs = 1;
   for (int i = 0; i < nd - 1; i++) runs *= w->shape[i];
   const int64_t piece = inner < 16384 ? inner : 16384, pieces = (inner + piece - 1) / piece;
   const bool moves = dt == st && w->sd[nd - 1] == 1 && w->ss[nd - 1] == 1;
   const bool par = (moves ? runs * inner * esd > (INT64_C(1) << 19) : runs * inner > 65536) && walk_dst_disjoint(w);
#pragma omp parallel for schedule(static) if (par)
   for (int64_t it = 0; it < runs * pieces; it++) {
      int64_t r = it / pieces, k0 = it % pieces * piece, od = k0 * w->sd[nd - 1], os = k0 * w->ss[nd - 1];
      for (int i = nd - 2; i >= 0; i--) {
         od += r % w->shape[i] * w->sd[i];
         os += r % w->shape[i] * w->ss[i];
         r /= w->shape[i];
      }
      const int64_t len = inner - k0 < piece ? inner - k0 : piece;
      copy_run(d + od * esd, dt, w->sd[nd - 1], s + os * ess, st, w->ss[nd - 1], len);
   }
}

nr_status nr_tensor_copy(nr_tensor *dst, const nr_tensor *src)
{
   NR_CHECK_T("dst", dst, -1, -1, -1, NULL);
   NR_CHECK_T("src", src, -1, -1, -1, NULL);
   if (nr_tensor_numel(dst) != nr_tensor_numel(src) || (dst->ndim == src->ndim && check_same_shape(__func__, dst, src)))
      return check_same_shape(__func__, dst, src);
   /* (an empty dst writes nothing: a size-0 dimension gives the ones before it stride 0) */
   for (int d = 0; d < dst->ndim && nr_tensor_numel(dst) > 0; d++)
      if (dst->stride[d] == 0 && dst->shape[d] > 1) {
         char dd[128];
         return NR_FAIL(NR_E_ARG, "dst %s repeats one element along dimension %d (stride 0), so several source "
                        "elements would land on it; copy into a contiguous tensor",
                        nr_tensor_describe(dst, dd, sizeof dd), d);
      }
   if (nr_tensor_numel(src) > 0) {
      int how;
      NR_TRY(copy_overlap(__func__, dst, src, &how));
      if (how == COPY_VIA_TEMP) return copy_via_temp(dst, src);
   }
   if (dst->device != NR_CPU || src->device != NR_CPU) {
#ifdef NR_WITH_CUDA
      return nr_cuda_copy(dst, src);
#else
      return NR_FAIL(NR_E_DEVICE, "this nrlua was built without CUDA");
#endif
   }
   int64_t n = nr_tensor_numel(src);
   if (n == 0) return NR_OK;
   bool contig = nr_tensor_is_contiguous(dst) && nr_tensor_is_contiguous(src);
   if (contig && dst->dtype == src->dtype) {
      if (dst->data != src->data) memmove(dst->data, src->data, (size_t)(n * nr_dtype_size(src->dtype)));
      return NR_OK;
   }
   if (contig && dst->dtype == NR_F32 && src->dtype == NR_U8) {
      float *o = dst->data;
      const uint8_t *s = src->data;
#pragma omp parallel for if (n > 65536)
      for (int64_t i = 0; i < n; i++) o[i] = s[i];
      return NR_OK;
   }
   if (contig && dst->dtype == NR_BF16 && src->dtype == NR_F32) {
      uint16_t *o = dst->data;
      const float *s = src->data;
#pragma omp parallel for if (n > 65536)
      for (int64_t i = 0; i < n; i++) o[i] = nr_f32_to_bf16(s[i]);
      return NR_OK;
   }
   if (contig && dst->dtype == NR_F32 && src->dtype == NR_BF16) {
      float *o = dst->data;
      const uint16_t *s = src->data;
#pragma omp parallel for if (n > 65536)
      for (int64_t i = 0; i < n; i++) o[i] = nr_bf16_to_f32(s[i]);
      return NR_OK;
   }
   /* strided: walk both views together; a reshaping copy (other shape, same numel) sees the
    * contiguous side with the other's shape, or goes through a contiguous temporary */
   int64_t rowmajor[8];
   const int64_t *sd = dst->stride, *ss = src->stride;
   const nr_tensor *shaped = dst;
   if (dst->ndim != src->ndim) {
      if (nr_tensor_is_contiguous(src)) {
         contiguous_strides(dst->ndim, dst->shape, rowmajor);
         ss = rowmajor;
      } else if (nr_tensor_is_contiguous(dst)) {
         contiguous_strides(src->ndim, src->shape, rowmajor);
         sd = rowmajor;
         shaped = src;
      } else {
         return copy_via_temp(dst, src);
      }
   }
   walk w;
   walk_plan(&w, shaped->ndim, shaped->shape, sd, ss);
   walk_copy(&w, dst->data, dst->dtype, src->data, src->dtype);
   return NR_OK;
}

nr_status nr_tensor_fill(nr_tensor *t, double value)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   if (t->device != NR_CPU) {
#ifdef NR_WITH_CUDA
      return nr_cuda_fill(t, value);
#else
      return NR_FAIL(NR_E_DEVICE, "this nrlua was built without CUDA");
#endif
   }
   const int64_t n = nr_tensor_numel(t);
   if (n == 0) return NR_OK;
   if (nr_tensor_is_contiguous(t) && ((value == 0.0 && !signbit(value)) || t->dtype == NR_U8)) { /* -0.0 keeps its sign */
      uint8_t byte = 0;
      if (t->dtype == NR_U8) store_double(&byte, NR_U8, 0, value); /* the strided fill's conversion */
      memset(t->data, byte, (size_t)(n * nr_dtype_size(t->dtype)));
      return NR_OK;
   }
   uint64_t one; /* the value converted once, copied from with stride 0 */
   store_double(&one, t->dtype, 0, value);
   walk w;
   walk_plan(&w, t->ndim, t->shape, t->stride, NULL);
   walk_copy(&w, t->data, t->dtype, (const char *)&one, t->dtype);
   return NR_OK;
}

/* ---- index select / copy ------------------------------------------------------------------- */

nr_status nr_index_geometry(const char *func, const nr_tensor *big, int32_t dim, const nr_tensor *index,
                            const nr_tensor *small, int64_t *outer, int64_t *len, int64_t *inner)
{
   NR_TRY(nr_check_tensor(func, "index", index, NR_I64, -1, 1, NULL));
   if (!nr_tensor_is_contiguous(index)) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "index must be contiguous");
   if (dim < 0 || dim >= big->ndim)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "dim %d out of range for a %d-d tensor", dim, big->ndim);
   char a[128], b[128];
   if (big->dtype != small->dtype || small->ndim != big->ndim)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "dtype or rank mismatch: %s vs %s",
                        nr_tensor_describe(big, a, sizeof a), nr_tensor_describe(small, b, sizeof b));
   for (int d = 0; d < big->ndim; d++)
      if (small->shape[d] != (d == dim ? index->shape[0] : big->shape[d]))
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "shape mismatch: %s vs %s with %lld indices on dim %d",
                           nr_tensor_describe(big, a, sizeof a), nr_tensor_describe(small, b, sizeof b),
                           (long long)index->shape[0], dim);
   /* element order: row-major, or channels-last (memory dims N, H, W, C) when either is */
   int64_t mem[8];
   int md = dim;
   for (int d = 0; d < big->ndim; d++) mem[d] = big->shape[d];
   if (nr_is_nhwc(big) || nr_is_nhwc(small)) {
      if (!nr_tensor_is_channels_last(big) || !nr_tensor_is_channels_last(small))
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                           "tensors must both be contiguous or both channels-last: %s vs %s",
                           nr_tensor_describe(big, a, sizeof a), nr_tensor_describe(small, b, sizeof b));
      static const int mem_pos[4] = {0, 3, 1, 2}; /* logical dim -> position in (N, H, W, C) */
      mem[0] = big->shape[0], mem[1] = big->shape[2], mem[2] = big->shape[3], mem[3] = big->shape[1];
      md = mem_pos[dim];
   } else if (!nr_tensor_is_contiguous(big) || !nr_tensor_is_contiguous(small)) {
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "tensors must be contiguous (or both channels-last): %s vs %s",
                        nr_tensor_describe(big, a, sizeof a), nr_tensor_describe(small, b, sizeof b));
   }
   *outer = *inner = 1;
   for (int d = 0; d < md; d++) *outer *= mem[d];
   for (int d = md + 1; d < big->ndim; d++) *inner *= mem[d];
   *len = mem[md];
   return NR_OK;
}

/* nr_index_geometry for the CPU ops, whose index must live on the CPU too, with its values
 * checked against len. */
static nr_status host_index_geometry(const char *func, const nr_tensor *big, int32_t dim, const nr_tensor *index,
                                     const nr_tensor *small, int64_t *outer, int64_t *len, int64_t *inner)
{
   NR_TRY(nr_check_tensor(func, "index", index, NR_I64, NR_CPU, 1, NULL));
   NR_TRY(nr_index_geometry(func, big, dim, index, small, outer, len, inner));
   const int64_t *ix = index->data;
   for (int64_t i = 0; i < index->shape[0]; i++)
      if (ix[i] < 0 || ix[i] >= *len)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "index %lld out of range 0..%lld (position %lld)",
                           (long long)ix[i], (long long)*len - 1, (long long)i);
   return NR_OK;
}

nr_status nr_tensor_index_select(const nr_tensor *src, int32_t dim, const nr_tensor *index, nr_tensor *out)
{
   NR_TRY(nr_check_no_overlap(__func__, "out", out, "src", src)); /* out is written while src is read */
   if (src) NR_ON_CUDA(src, nr_cuda_index_select(src, dim, index, out)); /* index on the CPU or the same GPU */
   NR_CHECK_T("src", src, -1, NR_CPU, -1, NULL);
   NR_CHECK_T("out", out, -1, NR_CPU, -1, NULL);
   int64_t outer, inner, s, k = index->shape[0];
   NR_TRY(host_index_geometry(__func__, src, dim, index, out, &outer, &s, &inner));
   size_t es = (size_t)nr_dtype_size(src->dtype);
   const int64_t *ix = index->data;
   const char *sp = src->data;
   char *op = out->data;
   for (int64_t o = 0; o < outer; o++)
      for (int64_t i = 0; i < k; i++)
         memcpy(op + ((o * k + i) * inner) * es, sp + ((o * s + ix[i]) * inner) * es, inner * es);
   return NR_OK;
}

nr_status nr_tensor_index_copy(nr_tensor *dst, int32_t dim, const nr_tensor *index, const nr_tensor *src)
{
   NR_TRY(nr_check_no_overlap(__func__, "dst", dst, "src", src)); /* dst is written while src is read */
   if (dst) NR_ON_CUDA(dst, nr_cuda_index_copy(dst, dim, index, src)); /* index on the CPU or the same GPU */
   NR_CHECK_T("dst", dst, -1, NR_CPU, -1, NULL);
   NR_CHECK_T("src", src, -1, NR_CPU, -1, NULL);
   int64_t outer, inner, s, k = index->shape[0];
   NR_TRY(host_index_geometry(__func__, dst, dim, index, src, &outer, &s, &inner));
   size_t es = (size_t)nr_dtype_size(dst->dtype);
   const int64_t *ix = index->data;
   const char *sp = src->data;
   char *dp = dst->data;
   for (int64_t o = 0; o < outer; o++)
      for (int64_t i = 0; i < k; i++)
         memcpy(dp + ((o * s + ix[i]) * inner) * es, sp + ((o * k + i) * inner) * es, inner * es);
   return NR_OK;
}

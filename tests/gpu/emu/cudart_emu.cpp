/* cudart_emu.cpp — the CUDA runtime of the emulator (see emu_internal.h): devices, device memory,
 * streams, events, copies, error state, and the scheduler that runs a kernel's threads as fibers.
 *
 * What it is: the cuda* entry points core/cuda/ calls, with the real signatures (the toolkit's
 * cuda_runtime_api.h), checking their arguments as the runtime documents; devices are arenas of
 * host address space (NR_EMU_DEVICES of them, default 2, NR_EMU_DEVICE_MEMORY bytes each,
 * default 4 GiB) that are inaccessible to host code outside device work.
 * What it is not: a model of timing or of concurrency. Asynchrony is emulated only as lateness:
 * copies and memsets wait in their stream's queue until something must see them, and the
 * collectives of the emulated NCCL (nccl_emu.c) until their peers have joined; kernels and
 * cuBLAS / cuDNN calls run when they are launched, after their stream's queue.
 * Invariants: fresh device memory (its first 64 MiB) is filled with the 16-bit pattern 0x7fc0 (NaN
 * as f32 and as bf16, huge as integers; positive, since LuaJIT reads a float NaN with the sign bit
 * and a payload as nil), so a result that depends on memory nobody wrote shows; a kernel runs with only its
 * own device's memory accessible, so it faults on another device's pointers, as without peer
 * access; threads of a block meet only at __syncthreads and the warp shuffles, and a barrier
 * that some live thread can never reach is reported as a deadlock (abort), not a hang.
 */
#include "emu_internal.h"

#include <cuda_runtime_api.h>

#include <execinfo.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <set>
#include <vector>

/* ---------------------------------------------------------------- diagnostics */

static char g_last_message[512];

extern "C" void nr_emu_vreport(const char *func, const char *fmt, va_list ap)
{
   char msg[400];
   vsnprintf(msg, sizeof msg, fmt, ap);
   snprintf(g_last_message, sizeof g_last_message, "%s: %s", func, msg);
   fprintf(stderr, "nrlua CUDA emulator: %s\n", g_last_message);
}

extern "C" void nr_emu_report(const char *func, const char *fmt, ...)
{
   va_list ap;
   va_start(ap, fmt);
   nr_emu_vreport(func, fmt, ap);
   va_end(ap);
}

extern "C" const char *nr_emu_last_message(void) { return g_last_message; }

[[noreturn]] static void fatal(const char *fmt, ...)
{
   va_list ap;
   va_start(ap, fmt);
   fprintf(stderr, "nrlua CUDA emulator: ");
   vfprintf(stderr, fmt, ap);
   fprintf(stderr, "\n");
   va_end(ap);
   void *frames[32];
   backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
   abort();
}

/* ---------------------------------------------------------------- devices and their memory */

enum { MAX_DEVICES = 8, ALIGN = 256, HUGE = 2 << 20 };

struct Device {
   char *base = nullptr;    /* reserved arena */
   size_t capacity = 0;     /* bytes a program may allocate (cudaMemGetInfo's total) */
   size_t high = 0;         /* arena bytes ever handed out: [base, base + high) is what opens */
   size_t in_use = 0;
   std::map<size_t, size_t> live; /* offset -> bytes, for span checks */
   std::map<size_t, size_t> free_runs; /* offset -> bytes, coalesced */
};

static std::recursive_mutex g_mutex; /* the emulator is one device queue: one caller at a time */
static Device g_dev[MAX_DEVICES];
static int g_ndev = -1;
static thread_local int t_device = 0;
static thread_local cudaError_t t_last_error = cudaSuccess;
static int g_open_depth = 0;   /* nr_emu_device_enter nesting */
static int g_open_device = -1; /* the one device a kernel may touch, -1: all */
static bool g_protect = true;

static size_t env_size(const char *name, size_t dflt)
{
   const char *s = getenv(name);
   if (!s || !*s) return dflt;
   char *end;
   unsigned long long v = strtoull(s, &end, 10);
   if (*end == 'G') v <<= 30;
   else if (*end == 'M') v <<= 20;
   return v ? (size_t)v : dflt;
}

static void install_fault_handler();

static void init_devices()
{
   if (g_ndev >= 0) return;
   g_ndev = (int)env_size("NR_EMU_DEVICES", 2);
   if (g_ndev > MAX_DEVICES) g_ndev = MAX_DEVICES;
   const char *p = getenv("NR_EMU_PROTECT");
   g_protect = !(p && strcmp(p, "0") == 0);
   const size_t cap = env_size("NR_EMU_DEVICE_MEMORY", (size_t)4 << 30);
   for (int d = 0; d < g_ndev; d++) {
      /* 2 MiB aligned and backed by huge pages where the kernel allows: mprotect's cost is per
       * page-table entry, and the arena changes protection twice per operation */
      void *m = mmap(nullptr, cap + HUGE, g_protect ? PROT_NONE : PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) fatal("cannot reserve %zu bytes of address space for cuda:%d", cap, d);
      char *base = (char *)(((uintptr_t)m + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
      madvise(base, cap, MADV_HUGEPAGE);
      g_dev[d].base = base;
      g_dev[d].capacity = cap;
      g_dev[d].free_runs[0] = cap;
   }
   install_fault_handler();
}

static int device_of(const void *p)
{
   for (int d = 0; d < g_ndev; d++)
      if ((const char *)p >= g_dev[d].base && (const char *)p < g_dev[d].base + g_dev[d].capacity) return d;
   return -1;
}

static void set_access(int device, int prot)
{
   if (!g_protect) return;
   for (int d = 0; d < g_ndev; d++) {
      if (device >= 0 && d != device && prot != PROT_NONE) continue;
      size_t bytes = (g_dev[d].high + HUGE - 1) & ~(size_t)(HUGE - 1);
      if (bytes && mprotect(g_dev[d].base, bytes, prot) != 0) fatal("mprotect of cuda:%d's arena failed", d);
   }
}

/* Opens device memory (device: only that one, -1: all) for the duration of emulated work. */
static void open_devices(int device)
{
   if (g_open_depth++ == 0) {
      g_open_device = device;
      set_access(device, PROT_READ | PROT_WRITE);
   }
}
static void close_devices()
{
   if (--g_open_depth == 0) {
      set_access(-1, PROT_NONE);
      g_open_device = -1;
   }
}

struct Stream;
static Stream *stream_of(cudaStream_t s, const char *func);
static void order_before(Stream *st);
static void flush_all();
extern "C" void nr_emu_device_enter(cudaStream_t stream)
{
   g_mutex.lock();
   init_devices();
   if (Stream *st = stream_of(stream, "cuBLAS / cuDNN call")) order_before(st);
   open_devices(-1);
}
extern "C" void nr_emu_device_leave(void)
{
   close_devices();
   g_mutex.unlock();
}

extern "C" int nr_emu_device_of(const void *p)
{
   std::lock_guard<std::recursive_mutex> lock(g_mutex);
   init_devices();
   return device_of(p);
}

extern "C" int nr_emu_current_device(void) { return t_device; }

extern "C" int nr_emu_is_device_span(int device, const void *p, size_t bytes)
{
   std::lock_guard<std::recursive_mutex> lock(g_mutex);
   init_devices();
   if (device < 0 || device >= g_ndev || device_of(p) != device) return 0;
   const Device &dv = g_dev[device];
   size_t off = (size_t)((const char *)p - dv.base);
   auto it = dv.live.upper_bound(off);
   if (it == dv.live.begin()) return 0;
   --it;
   return off + bytes <= it->first + it->second && (bytes > 0 || off <= it->first + it->second);
}

/* ---- the fault handler: names a fault on device memory (host code touching it, or a kernel
 * another device's); any other fault (a fiber's stack guard page, say) is left as it is */

static char g_altstack[1 << 16];
static void on_fault(int sig, siginfo_t *si, void *)
{
   char msg[256];
   int d = device_of(si->si_addr);
   if (d >= 0) {
      int n = snprintf(msg, sizeof msg,
                       "nrlua CUDA emulator: %s at %p, cuda:%d memory (offset %zu): host code dereferenced a "
                       "device pointer%s\n",
                       sig == SIGSEGV ? "segmentation fault" : "bus error", si->si_addr, d,
                       (size_t)((char *)si->si_addr - g_dev[d].base),
                       g_open_device >= 0 && d != g_open_device ? ", or a kernel read another GPU's memory" : "");
      if (write(2, msg, (size_t)n) < 0) {}
      void *frames[32];
      backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
   }
   signal(sig, SIG_DFL);
   raise(sig);
}

static void install_fault_handler()
{
   stack_t ss;
   ss.ss_sp = g_altstack;
   ss.ss_size = sizeof g_altstack;
   ss.ss_flags = 0;
   sigaltstack(&ss, nullptr);
   struct sigaction sa;
   memset(&sa, 0, sizeof sa);
   sa.sa_sigaction = on_fault;
   sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
   sigaction(SIGSEGV, &sa, nullptr);
   sigaction(SIGBUS, &sa, nullptr);
}

/* ---------------------------------------------------------------- errors */

static cudaError_t fail(cudaError_t e, const char *func, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static cudaError_t fail(cudaError_t e, const char *func, const char *fmt, ...)
{
   va_list ap;
   va_start(ap, fmt);
   nr_emu_vreport(func, fmt, ap);
   va_end(ap);
   t_last_error = e;
   return e;
}

extern "C" cudaError_t cudaGetLastError(void)
{
   cudaError_t e = t_last_error;
   t_last_error = cudaSuccess;
   return e;
}
extern "C" cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

extern "C" const char *cudaGetErrorName(cudaError_t e)
{
   switch (e) {
   case cudaSuccess: return "cudaSuccess";
   case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
   case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
   case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
   case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
   case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
   case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
   case cudaErrorNotReady: return "cudaErrorNotReady";
   case cudaErrorNoDevice: return "cudaErrorNoDevice";
   default: return "cudaErrorUnknown";
   }
}
extern "C" const char *cudaGetErrorString(cudaError_t e)
{
   switch (e) {
   case cudaSuccess: return "no error";
   case cudaErrorInvalidValue: return "invalid argument";
   case cudaErrorMemoryAllocation: return "out of memory";
   case cudaErrorInvalidConfiguration: return "invalid configuration argument";
   case cudaErrorInvalidDevice: return "invalid device ordinal";
   case cudaErrorInvalidDevicePointer: return "invalid device pointer";
   case cudaErrorInvalidResourceHandle: return "invalid resource handle";
   case cudaErrorNotReady: return "device not ready";
   case cudaErrorNoDevice: return "no CUDA-capable device is detected";
   default: return "unknown error";
   }
}

/* ---------------------------------------------------------------- devices */

#define LOCKED()                                                                                  \
   std::lock_guard<std::recursive_mutex> lock_(g_mutex);                                         \
   init_devices()

extern "C" cudaError_t cudaGetDeviceCount(int *count)
{
   LOCKED();
   if (!count) return fail(cudaErrorInvalidValue, __func__, "count is NULL");
   *count = g_ndev;
   return g_ndev ? cudaSuccess : cudaErrorNoDevice;
}

static bool valid_device(int d) { return d >= 0 && d < g_ndev; }

extern "C" cudaError_t cudaSetDevice(int device)
{
   LOCKED();
   if (!valid_device(device)) return fail(cudaErrorInvalidDevice, __func__, "device %d of %d", device, g_ndev);
   t_device = device;
   return cudaSuccess;
}
extern "C" cudaError_t cudaGetDevice(int *device)
{
   if (!device) return fail(cudaErrorInvalidValue, __func__, "device is NULL");
   *device = t_device;
   return cudaSuccess;
}

extern "C" cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device)
{
   LOCKED();
   if (!prop) return fail(cudaErrorInvalidValue, __func__, "prop is NULL");
   if (!valid_device(device)) return fail(cudaErrorInvalidDevice, __func__, "device %d of %d", device, g_ndev);
   memset(prop, 0, sizeof *prop);
   snprintf(prop->name, sizeof prop->name, "nrlua CUDA emulator (CPU)");
   prop->totalGlobalMem = g_dev[device].capacity;
   prop->major = 9;
   prop->minor = 0;
   prop->multiProcessorCount = 4;
   prop->warpSize = 32;
   prop->maxThreadsPerBlock = 1024;
   prop->sharedMemPerBlock = 48 << 10;
   return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device)
{
   LOCKED();
   if (!value) return fail(cudaErrorInvalidValue, __func__, "value is NULL");
   if (!valid_device(device)) return fail(cudaErrorInvalidDevice, __func__, "device %d of %d", device, g_ndev);
   switch (attr) {
   case cudaDevAttrMultiProcessorCount: *value = 4; return cudaSuccess;
   case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
   case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
   case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
   case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
   default: return fail(cudaErrorInvalidValue, __func__, "attribute %d is not emulated", (int)attr);
   }
}

extern "C" cudaError_t cudaRuntimeGetVersion(int *v)
{
   if (!v) return fail(cudaErrorInvalidValue, __func__, "NULL");
   *v = CUDART_VERSION;
   return cudaSuccess;
}
extern "C" cudaError_t cudaDriverGetVersion(int *v)
{
   if (!v) return fail(cudaErrorInvalidValue, __func__, "NULL");
   *v = CUDART_VERSION;
   return cudaSuccess;
}

/* ---------------------------------------------------------------- memory */

/* What fresh device memory holds (see the file comment); bytes is a multiple of ALIGN. Only the
 * first 64 MiB: beyond that (cuDNN search workspaces of up to 1 GiB) the pages stay untouched
 * zeros, which cost neither time nor memory. */
static void poison(char *p, size_t bytes)
{
   const size_t n = (bytes < ((size_t)64 << 20) ? bytes : ((size_t)64 << 20)) / 8;
   uint64_t *q = (uint64_t *)p; /* p is ALIGN-aligned */
   for (size_t i = 0; i < n; i++) q[i] = 0x7fc07fc07fc07fc0ull;
}

extern "C" cudaError_t cudaMalloc(void **ptr, size_t bytes)
{
   LOCKED();
   if (!ptr) return fail(cudaErrorInvalidValue, __func__, "ptr is NULL");
   *ptr = nullptr;
   if (bytes == 0) return cudaSuccess;
   Device &dv = g_dev[t_device];
   const size_t want = (bytes + ALIGN - 1) & ~(size_t)(ALIGN - 1);
   for (auto it = dv.free_runs.begin(); it != dv.free_runs.end(); ++it) {
      if (it->second < want) continue;
      const size_t off = it->first, run = it->second;
      dv.free_runs.erase(it);
      if (run > want) dv.free_runs[off + want] = run - want;
      dv.live[off] = want;
      dv.in_use += want;
      if (off + want > dv.high) dv.high = off + want;
      char *p = dv.base + off;
      if (g_open_depth > 0) { /* inside device work: open the new pages too */
         if (g_protect) mprotect(dv.base, (dv.high + HUGE - 1) & ~(size_t)(HUGE - 1), PROT_READ | PROT_WRITE);
         poison(p, want);
      } else {
         open_devices(t_device);
         poison(p, want);
         close_devices();
      }
      *ptr = p;
      return cudaSuccess;
   }
   /* the real runtime's message, with what the emulator knows */
   return fail(cudaErrorMemoryAllocation, __func__, "%zu bytes asked on cuda:%d, %zu of %zu in use", bytes, t_device,
               dv.in_use, dv.capacity);
}

extern "C" cudaError_t cudaFree(void *ptr)
{
   LOCKED();
   if (!ptr) return cudaSuccess;
   int d = device_of(ptr);
   if (d < 0) return fail(cudaErrorInvalidValue, __func__, "%p is not device memory", ptr);
   flush_all(); /* cudaFree synchronises the device */
   Device &dv = g_dev[d];
   size_t off = (size_t)((char *)ptr - dv.base);
   auto it = dv.live.find(off);
   if (it == dv.live.end()) return fail(cudaErrorInvalidValue, __func__, "%p is not the start of a live allocation", ptr);
   size_t bytes = it->second;
   dv.live.erase(it);
   dv.in_use -= bytes;
   if (bytes >= HUGE) madvise(dv.base + off, bytes, MADV_DONTNEED); /* give the pages back */
   auto next = dv.free_runs.lower_bound(off);
   if (next != dv.free_runs.end() && next->first == off + bytes) {
      bytes += next->second;
      dv.free_runs.erase(next);
   }
   auto prev = dv.free_runs.lower_bound(off);
   if (prev != dv.free_runs.begin()) {
      --prev;
      if (prev->first + prev->second == off) {
         prev->second += bytes;
         return cudaSuccess;
      }
   }
   dv.free_runs[off] = bytes;
   return cudaSuccess;
}

extern "C" cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total)
{
   LOCKED();
   if (!free_bytes || !total) return fail(cudaErrorInvalidValue, __func__, "NULL argument");
   *total = g_dev[t_device].capacity;
   *free_bytes = g_dev[t_device].capacity - g_dev[t_device].in_use;
   return cudaSuccess;
}

/* Pinned host buffers (start -> bytes): copies from and to them are truly asynchronous. */
static std::map<const char *, size_t> g_pinned;

static bool is_pinned(const void *p, size_t bytes)
{
   auto it = g_pinned.upper_bound((const char *)p);
   if (it == g_pinned.begin()) return false;
   --it;
   return (const char *)p + bytes <= it->first + it->second;
}

extern "C" cudaError_t cudaHostAlloc(void **ptr, size_t bytes, unsigned int flags)
{
   LOCKED();
   if (!ptr) return fail(cudaErrorInvalidValue, __func__, "ptr is NULL");
   if (flags & ~(unsigned)(cudaHostAllocPortable | cudaHostAllocMapped | cudaHostAllocWriteCombined))
      return fail(cudaErrorInvalidValue, __func__, "flags %#x", flags);
   void *p = nullptr;
   if (posix_memalign(&p, 4096, bytes ? bytes : 1) != 0)
      return fail(cudaErrorMemoryAllocation, __func__, "%zu bytes of pinned host memory", bytes);
   g_pinned[(const char *)p] = bytes ? bytes : 1;
   *ptr = p;
   return cudaSuccess;
}
extern "C" cudaError_t cudaFreeHost(void *ptr)
{
   LOCKED();
   if (!ptr) return cudaSuccess;
   if (!g_pinned.count((const char *)ptr)) return fail(cudaErrorInvalidValue, __func__, "%p was not from cudaHostAlloc", ptr);
   flush_all(); /* cudaFreeHost synchronises the device */
   g_pinned.erase((const char *)ptr);
   free(ptr);
   return cudaSuccess;
}

/* ---------------------------------------------------------------- streams and events
 * Asynchrony, as late as CUDA allows: a copy or memset queued on a stream runs only when
 * something must see it (a later operation on that stream, a synchronisation, an event the host
 * or another stream waits for), so a missing wait or a host buffer reused too early shows up as
 * stale data. Kernels and library calls run at once, after their stream's queue. The legacy
 * default stream (0) is ordered with every blocking stream of its device, both ways. */

struct Work {
   uint64_t seq;
   void *dst;
   const void *src;        /* NULL: a memset to value */
   std::vector<char> copy; /* a pageable host source, read when the copy was queued */
   size_t bytes;
   int value;
   nr_emu_async *async = nullptr; /* set: an operation of another emulated library (dst etc. unused) */
   bool async_started = false;    /* its start ran (it reads its input there) */
   bool poison = false;           /* a freed block's NaN pattern (nr_emu_poison_async) */
};
struct Stream {
   int device;
   bool blocking; /* ordered with the legacy default stream */
   uint64_t seq;  /* operations queued so far */
   std::vector<Work> queue;
};
struct Event {
   int device;
   Stream *stream; /* where it was last recorded; NULL: never (complete) */
   uint64_t seq;   /* the stream's operations it waits for */
};
static std::set<Stream *> g_streams;
static std::set<Event *> g_events;
static Stream g_legacy[MAX_DEVICES];

static Stream *stream_of(cudaStream_t s, const char *func)
{
   if (s == 0 || s == cudaStreamLegacy || s == cudaStreamPerThread) {
      Stream *st = &g_legacy[t_device];
      st->device = t_device;
      st->blocking = true;
      return st;
   }
   Stream *st = (Stream *)s;
   if (!g_streams.count(st)) {
      fail(cudaErrorInvalidResourceHandle, func, "stream %p was never created or was destroyed", (void *)s);
      return nullptr;
   }
   return st;
}
static bool is_legacy(const Stream *st) { return st >= g_legacy && st < g_legacy + MAX_DEVICES; }

/* Runs st's queued work with seq <= upto. An async operation (nr_emu_async) that cannot finish
 * yet stops the stream there unless wait (then it blocks until it can); returns whether all of it
 * ran. */
static bool flush(Stream *st, uint64_t upto = UINT64_MAX, bool wait = true)
{
   size_t n = 0;
   while (n < st->queue.size() && st->queue[n].seq <= upto) n++;
   if (!n) return true;
   open_devices(-1);
   size_t done = 0;
   for (; done < n; done++) {
      Work &w = st->queue[done];
      if (w.async) {
         if (!w.async_started) { /* the stream reached it: it reads its input now */
            w.async->start(w.async);
            w.async_started = true;
         }
         if (!w.async->finish(w.async, wait)) break;
         w.async->release(w.async);
      } else if (w.poison) {
         poison((char *)w.dst, w.bytes);
      } else if (w.src) {
         memmove(w.dst, w.src, w.bytes);
      } else if (!w.copy.empty()) {
         memcpy(w.dst, w.copy.data(), w.bytes);
      } else {
         memset(w.dst, w.value, w.bytes);
      }
   }
   close_devices();
   st->queue.erase(st->queue.begin(), st->queue.begin() + (ptrdiff_t)done);
   return done == n;
}

static void flush_device(int device)
{
   flush(&g_legacy[device]);
   for (Stream *st : g_streams)
      if (st->device == device) flush(st);
}
static void flush_all()
{
   for (int d = 0; d < g_ndev; d++) flush_device(d);
}

/* What must have run before new work on st may start: st's own queue, and the legacy stream's
 * ordering with the blocking streams. */
static void flush_peers(Stream *st);
static void order_before(Stream *st)
{
   flush(st);
   flush_peers(st);
}
/* The streams st is ordered after by the legacy default stream's rule. */
static void flush_peers(Stream *st)
{
   if (is_legacy(st)) {
      for (Stream *o : g_streams)
         if (o->device == st->device && o->blocking) flush(o);
   } else if (st->blocking) {
      flush(&g_legacy[st->device]);
   }
}

static void enqueue(Stream *st, Work w)
{
   order_before(st); /* earlier work of the streams it is ordered after runs first */
   w.seq = ++st->seq;
   st->queue.push_back(std::move(w));
}

/* An operation of another emulated library: it starts (reads its input) once the work it is
 * ordered after has run, as a kernel would: now, or, behind an earlier operation of the stream
 * still waiting for its peers, when a flush reaches it; enqueueing never waits for peers (as
 * NCCL's launches: a rank can queue a second collective while the first waits for a hung peer).
 * It finishes when a flush reaches it and its peers allow. */
extern "C" cudaError_t nr_emu_enqueue_async(cudaStream_t s, nr_emu_async *op)
{
   LOCKED();
   Stream *st = stream_of(s, "nr_emu_enqueue_async");
   if (!st) return cudaErrorInvalidResourceHandle;
   flush(st, UINT64_MAX, false);
   flush_peers(st);
   Work w{};
   w.async = op;
   if (st->queue.empty()) {
      open_devices(st->device);
      op->start(op);
      close_devices();
      w.async_started = true;
   }
   w.seq = ++st->seq;
   st->queue.push_back(std::move(w));
   return cudaSuccess;
}

/* A block the caching allocator took back: NaN from here on in stream order (its first MiB:
 * enough to show a read of a freed tensor, cheap enough for every free). */
extern "C" void nr_emu_poison_async(void *p, size_t bytes, cudaStream_t s)
{
   LOCKED();
   Stream *st = stream_of(s, "nr_emu_poison_async");
   if (!st || !nr_emu_is_device_span(st->device, p, bytes)) return;
   Work w{};
   w.dst = p;
   w.bytes = (bytes < ((size_t)1 << 20) ? bytes : ((size_t)1 << 20)) & ~(size_t)7;
   w.poison = true;
   enqueue(st, std::move(w));
}

extern "C" int nr_emu_stream_device(cudaStream_t s)
{
   LOCKED();
   Stream *st = stream_of(s, "nr_emu_stream_device");
   return st ? st->device : -1;
}

extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags)
{
   LOCKED();
   if (!s) return fail(cudaErrorInvalidValue, __func__, "stream is NULL");
   if (flags & ~(unsigned)cudaStreamNonBlocking) return fail(cudaErrorInvalidValue, __func__, "flags %#x", flags);
   Stream *st = new Stream{t_device, !(flags & cudaStreamNonBlocking), 0, {}};
   g_streams.insert(st);
   *s = (cudaStream_t)st;
   return cudaSuccess;
}
extern "C" cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
extern "C" cudaError_t cudaStreamDestroy(cudaStream_t s)
{
   LOCKED();
   Stream *st = (Stream *)s;
   if (!g_streams.count(st)) return fail(cudaErrorInvalidResourceHandle, __func__, "stream %p", (void *)s);
   flush(st); /* its work still completes */
   for (Event *e : g_events)
      if (e->stream == st) e->stream = nullptr;
   g_streams.erase(st);
   delete st;
   return cudaSuccess;
}
extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
   LOCKED();
   Stream *st = stream_of(s, __func__);
   if (!st) return cudaErrorInvalidResourceHandle;
   order_before(st);
   return cudaSuccess;
}
/* Pending work answers "not ready" once, and then has finished (an async operation: until its
 * peers have joined). */
extern "C" cudaError_t cudaStreamQuery(cudaStream_t s)
{
   LOCKED();
   Stream *st = stream_of(s, __func__);
   if (!st) return cudaErrorInvalidResourceHandle;
   bool pending = !st->queue.empty();
   if (!flush(st, UINT64_MAX, false)) return cudaErrorNotReady; /* an async operation waits for its peers */
   flush_peers(st);
   return pending ? cudaErrorNotReady : cudaSuccess;
}
extern "C" cudaError_t cudaDeviceSynchronize(void)
{
   LOCKED();
   flush_device(t_device);
   return cudaSuccess;
}

extern "C" cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags)
{
   LOCKED();
   if (!e) return fail(cudaErrorInvalidValue, __func__, "event is NULL");
   if (flags & ~(unsigned)(cudaEventBlockingSync | cudaEventDisableTiming | cudaEventInterprocess))
      return fail(cudaErrorInvalidValue, __func__, "flags %#x", flags);
   Event *ev = new Event{t_device, nullptr, 0};
   g_events.insert(ev);
   *e = (cudaEvent_t)ev;
   return cudaSuccess;
}
extern "C" cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
extern "C" cudaError_t cudaEventDestroy(cudaEvent_t e)
{
   LOCKED();
   Event *ev = (Event *)e;
   if (!g_events.erase(ev)) return fail(cudaErrorInvalidResourceHandle, __func__, "event %p", (void *)e);
   delete ev;
   return cudaSuccess;
}
static Event *event_ok(cudaEvent_t e, const char *func)
{
   Event *ev = (Event *)e;
   if (!g_events.count(ev)) {
      fail(cudaErrorInvalidResourceHandle, func, "event %p was never created or was destroyed", (void *)e);
      return nullptr;
   }
   return ev;
}
extern "C" cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
   LOCKED();
   Event *ev = event_ok(e, __func__);
   if (!ev) return cudaErrorInvalidResourceHandle;
   Stream *st = stream_of(s, __func__);
   if (!st) return cudaErrorInvalidResourceHandle;
   if (st->device != ev->device)
      return fail(cudaErrorInvalidResourceHandle, __func__, "event of cuda:%d recorded on a stream of cuda:%d", ev->device,
                  st->device);
   flush_peers(st); /* the other streams' work it is ordered after; its own stays queued */
   ev->stream = st;
   ev->seq = st->seq;
   return cudaSuccess;
}
static bool event_pending(const Event *ev)
{
   return ev->stream && !ev->stream->queue.empty() && ev->stream->queue.front().seq <= ev->seq;
}
extern "C" cudaError_t cudaEventQuery(cudaEvent_t e)
{
   LOCKED();
   Event *ev = event_ok(e, __func__);
   if (!ev) return cudaErrorInvalidResourceHandle;
   bool pending = event_pending(ev);
   if (ev->stream && !flush(ev->stream, ev->seq, false)) return cudaErrorNotReady;
   return pending ? cudaErrorNotReady : cudaSuccess;
}
extern "C" cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
   LOCKED();
   Event *ev = event_ok(e, __func__);
   if (!ev) return cudaErrorInvalidResourceHandle;
   if (ev->stream) flush(ev->stream, ev->seq);
   return cudaSuccess;
}
/* Later work on s waits for the event: the event's work runs now (no later than that). */
extern "C" cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags)
{
   LOCKED();
   Event *ev = event_ok(e, __func__);
   if (!ev || !stream_of(s, __func__)) return cudaErrorInvalidResourceHandle;
   if (flags != 0 && flags != cudaEventWaitDefault) return fail(cudaErrorInvalidValue, __func__, "flags %#x", flags);
   if (ev->stream) flush(ev->stream, ev->seq);
   return cudaSuccess;
}

/* ---------------------------------------------------------------- copies */

/* Checks that [p, p + bytes) is device memory or host memory as the copy kind says; returns the
 * device it is on (-1 host), or -2 after recording an error. */
static int check_side(const char *func, const char *what, const void *p, size_t bytes, bool device_side)
{
   int d = device_of(p);
   if (device_side) {
      if (d < 0) {
         fail(cudaErrorInvalidValue, func, "%s %p is host memory where the copy kind says device", what, p);
         return -2;
      }
      if (!nr_emu_is_device_span(d, p, bytes)) {
         fail(cudaErrorInvalidValue, func, "%s %p + %zu bytes runs past its cuda:%d allocation", what, p, bytes, d);
         return -2;
      }
      return d;
   }
   if (d >= 0) {
      fail(cudaErrorInvalidValue, func, "%s %p is cuda:%d memory where the copy kind says host", what, p, d);
      return -2;
   }
   return -1;
}

/* cudaMemcpy(Async): asynchronous only where CUDA is (device to device, or pinned host memory);
 * a pageable host source is read at once, a pageable host destination is written before the call
 * returns. sync: cudaMemcpy, which also waits for the copy. */
static cudaError_t copy(const char *func, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s,
                        bool sync)
{
   LOCKED();
   Stream *st = stream_of(s, func);
   if (!st) return cudaErrorInvalidResourceHandle;
   if (bytes == 0) return cudaSuccess;
   if (!dst || !src) return fail(cudaErrorInvalidValue, func, "NULL pointer");
   bool dst_dev, src_dev;
   if (kind == cudaMemcpyDefault) {
      dst_dev = device_of(dst) >= 0;
      src_dev = device_of(src) >= 0;
   } else {
      if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDeviceToDevice)
         return fail(cudaErrorInvalidMemcpyDirection, func, "kind %d", (int)kind);
      dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
      src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
   }
   if (check_side(func, "dst", dst, bytes, dst_dev) == -2) return cudaErrorInvalidValue;
   if (check_side(func, "src", src, bytes, src_dev) == -2) return cudaErrorInvalidValue;
   Work w{0, dst, src, {}, bytes, 0};
   if (!src_dev && !is_pinned(src, bytes)) { /* pageable source: staged by the call */
      w.copy.assign((const char *)src, (const char *)src + bytes);
      w.src = nullptr;
   }
   enqueue(st, std::move(w));
   if (sync || (!dst_dev && !is_pinned(dst, bytes))) order_before(st);
   return cudaSuccess;
}

extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
   return copy(__func__, dst, src, bytes, kind, 0, true);
}
extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s)
{
   return copy(__func__, dst, src, bytes, kind, s, false);
}
extern "C" cudaError_t cudaMemcpyPeerAsync(void *dst, int dst_device, const void *src, int src_device, size_t bytes,
                                           cudaStream_t s)
{
   LOCKED();
   if (!valid_device(dst_device) || !valid_device(src_device))
      return fail(cudaErrorInvalidDevice, __func__, "devices %d and %d of %d", dst_device, src_device, g_ndev);
   if (bytes && (!nr_emu_is_device_span(dst_device, dst, bytes) || !nr_emu_is_device_span(src_device, src, bytes)))
      return fail(cudaErrorInvalidValue, __func__, "dst %p (cuda:%d) or src %p (cuda:%d) is not %zu bytes of that device",
                  dst, dst_device, src, src_device, bytes);
   return copy(__func__, dst, src, bytes, cudaMemcpyDeviceToDevice, s, false);
}
extern "C" cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s)
{
   LOCKED();
   Stream *st = stream_of(s, __func__);
   if (!st) return cudaErrorInvalidResourceHandle;
   if (bytes == 0) return cudaSuccess;
   if (check_side(__func__, "dst", dst, bytes, true) == -2) return cudaErrorInvalidValue;
   enqueue(st, Work{0, dst, nullptr, {}, bytes, value});
   return cudaSuccess;
}
extern "C" cudaError_t cudaMemset(void *dst, int value, size_t bytes)
{
   cudaError_t e = cudaMemsetAsync(dst, value, bytes, 0);
   if (e == cudaSuccess) cudaDeviceSynchronize();
   return e;
}

/* ---------------------------------------------------------------- kernels: threads as fibers */

#include "cuda_emu_fiber.h"

namespace nr_emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

enum { STACK_BYTES = 128 << 10, PAGE = 4096 };

struct Thread {
   fiber f;
   char *stack; /* NULL until the thread starts; handed to the next thread when it finishes */
   bool done;
};

/* A barrier of `live` threads: the last to arrive, or the exit that leaves all live ones
 * arrived, opens it (a new generation). The block's (__syncthreads) and each warp's (shuffles). */
struct Barrier {
   int live, arrived;
   uint64_t gen;
};

struct Warp {
   Barrier bar;
   uint64_t slot[32];
   bool present[32];
};

static struct {
   const char *kernel;
   void (*thread_main)(void *);
   void *arg;
   std::vector<Thread> threads;
   std::vector<uint3> idx; /* threadIdx of each thread of a block (the same for every block) */
   std::vector<Warp> warps;
   std::vector<char *> free_stacks;
   Barrier block;
   uint64_t events; /* arrivals and exits: a pass of the scheduler without one is a deadlock */
   int current;
   fiber scheduler;
   /* the sweep: one fiber that calls the threads one after another (cheap for kernels that never
    * wait); the first thread that waits keeps the sweep's stack as its own */
   fiber sweep;
   char *sweep_stack;
   unsigned sweep_next, block_threads;
   bool sweep_taken;
} S;

static size_t g_stacks_mapped;

/* A stack for a starting thread: one a finished thread left, else a new mapping. Threads that
 * run to completion without waiting reuse one stack, which stays in cache. */
static char *take_stack()
{
   if (!S.free_stacks.empty()) {
      char *st = S.free_stacks.back();
      S.free_stacks.pop_back();
      return st;
   }
   char *m = (char *)mmap(nullptr, STACK_BYTES + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
   if (m == MAP_FAILED) fatal("cannot map a fiber stack (%zu mapped)", g_stacks_mapped);
   mprotect(m, PAGE, PROT_NONE); /* guard: an overflow faults */
   g_stacks_mapped++;
   return m + PAGE;
}

static void open_if_complete(Barrier &b)
{
   if (b.arrived > 0 && b.arrived == b.live) {
      b.arrived = 0;
      b.gen++;
   }
}

/* Bookkeeping of thread i's exit: a barrier the others wait at may now be complete. */
static void finish_thread(unsigned i)
{
   S.threads[i].done = true;
   S.events++;
   Warp &w = S.warps[i / 32];
   w.present[i % 32] = false;
   S.block.live--;
   w.bar.live--;
   open_if_complete(S.block);
   open_if_complete(w.bar);
}

/* A thread started on its own fiber (after the sweep stopped). */
static void thread_entry()
{
   const unsigned i = (unsigned)S.current;
   S.thread_main(S.arg);
   finish_thread(i);
   fiber_switch(&S.threads[i].f, &S.scheduler);
   fatal("a finished CUDA thread was resumed");
}

/* The sweep: runs threads sweep_next.. in order, each to its end, until one waits at a barrier
 * (yield_to_scheduler then makes this fiber that thread's); that thread ends the sweep when it
 * finishes, and the scheduler starts the rest on their own fibers. The order is the scheduler's,
 * so the result is the same as with a fiber per thread. */
static void sweep_entry()
{
   for (;;) {
      const unsigned i = S.sweep_next;
      if (i < S.block_threads && !S.sweep_taken) {
         S.sweep_next++;
         Thread &t = S.threads[i];
         t.stack = S.sweep_stack;
         S.current = (int)i;
         thread_idx = S.idx[i];
         S.thread_main(S.arg);
         finish_thread(i);
         if (!S.sweep_taken) {
            t.stack = nullptr; /* the stack goes on with the sweep */
            continue;
         }
         fiber_switch(&t.f, &S.scheduler); /* the thread that took the sweep is done */
      } else {
         fiber_switch(&S.sweep, &S.scheduler);
      }
      /* resumed only to start a new block's sweep */
   }
}

static void yield_to_scheduler()
{
   Thread &t = S.threads[(size_t)S.current];
   if (t.stack == S.sweep_stack) S.sweep_taken = true; /* this fiber is the thread's from now on */
   fiber_switch(&t.f, &S.scheduler);
}

static void arrive_and_wait(Barrier &b)
{
   const uint64_t gen = b.gen;
   S.events++;
   b.arrived++;
   open_if_complete(b);
   while (b.gen == gen) yield_to_scheduler();
}

void sync_block() { arrive_and_wait(S.block); }

uint64_t shfl_down(unsigned mask, uint64_t v, unsigned delta, int width)
{
   const int lane = S.current % 32;
   Warp &w = S.warps[(size_t)S.current / 32];
   if (!(mask >> lane & 1u))
      fatal("kernel %s: __shfl_down_sync by lane %d, which its mask %#x leaves out", S.kernel, lane, mask);
   if (width < 1 || width > 32 || (width & (width - 1)))
      fatal("kernel %s: __shfl_down_sync width %d is not a power of 2 up to 32", S.kernel, width);
   w.slot[lane] = v;
   arrive_and_wait(w.bar);
   const int src = lane + (int)delta;
   uint64_t out = v;
   if ((lane % width) + (int)delta < width && src < 32) {
      if (!w.present[src] || !(mask >> src & 1u))
         fatal("kernel %s: lane %d reads lane %d, which is not taking part in the shuffle (mask %#x)", S.kernel, lane,
               src, mask);
      out = w.slot[src];
   }
   arrive_and_wait(w.bar);
   return out;
}

/* Runs the threads of the current block in order, each until it finishes or waits at a barrier,
 * pass after pass until all have finished (a pass that changes nothing is a deadlock). */
static void run_block(unsigned n)
{
   if (S.threads.size() < n) S.threads.resize(n);
   const unsigned nwarps = (n + 31) / 32;
   if (S.warps.size() < nwarps) S.warps.resize(nwarps);
   for (unsigned i = 0; i < n; i++) {
      S.threads[i].stack = nullptr;
      S.threads[i].done = false;
   }
   for (unsigned w = 0; w < nwarps; w++) {
      Warp &wp = S.warps[w];
      wp.bar.live = (int)(n - 32 * w < 32 ? n - 32 * w : 32);
      wp.bar.arrived = 0;
      for (int l = 0; l < 32; l++) wp.present[l] = l < wp.bar.live;
   }
   S.block.live = (int)n;
   S.block.arrived = 0;
   /* the sweep first; a sweep fiber stays allocated for the next blocks unless a thread took it */
   if (!S.sweep_stack) {
      S.sweep_stack = take_stack();
      fiber_init(&S.sweep, S.sweep_stack, STACK_BYTES, sweep_entry);
   }
   S.sweep_next = 0;
   S.block_threads = n;
   S.sweep_taken = false;
   fiber_switch(&S.scheduler, &S.sweep);
   if (S.sweep_taken) S.sweep_stack = nullptr; /* owned by the thread that waited */
   while (S.block.live > 0) {
      const uint64_t before = S.events;
      const uint64_t gen_before = S.block.gen;
      for (unsigned i = 0; i < n; i++) {
         Thread &t = S.threads[i];
         if (t.done) continue;
         if (!t.stack) {
            t.stack = take_stack();
            fiber_init(&t.f, t.stack, STACK_BYTES, thread_entry);
         }
         S.current = (int)i;
         thread_idx = S.idx[i];
         fiber_switch(&S.scheduler, &t.f);
         if (t.done) S.free_stacks.push_back(t.stack);
      }
      if (S.block.live > 0 && S.events == before && S.block.gen == gen_before)
         fatal("kernel %s: deadlock in block (%u, %u, %u): %d of %d live threads wait at __syncthreads and the "
               "rest can never get there (a barrier under a condition that differs between threads?)",
               S.kernel, block_idx.x, block_idx.y, block_idx.z, S.block.arrived, S.block.live);
   }
}

void run_grid(const char *kernel, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
              void (*thread_main)(void *), void *arg)
{
   std::lock_guard<std::recursive_mutex> lock(g_mutex);
   init_devices();
   const uint64_t threads = (uint64_t)block.x * block.y * block.z;
   if (!grid.x || !grid.y || !grid.z || !threads || threads > 1024 || block.x > 1024 || block.y > 1024 ||
       block.z > 64 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || shmem > (48 << 10)) {
      fail(cudaErrorInvalidConfiguration, "kernel launch",
           "%s with grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of dynamic shared memory", kernel, grid.x, grid.y,
           grid.z, block.x, block.y, block.z, shmem);
      return;
   }
   Stream *st = stream_of(stream, kernel);
   if (!st) return;
   if (st->device != t_device) {
      fail(cudaErrorInvalidResourceHandle, "kernel launch", "%s on cuda:%d into a stream of cuda:%d", kernel, t_device,
           st->device);
      return;
   }
   order_before(st);
   if (S.thread_main) fatal("kernel %s launched from inside kernel %s", kernel, S.kernel);
   S.kernel = kernel;
   S.thread_main = thread_main;
   S.arg = arg;
   grid_dim = grid;
   block_dim = block;
   S.idx.resize(threads);
   for (unsigned i = 0; i < (unsigned)threads; i++)
      S.idx[i] = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
   open_devices(t_device);
   for (unsigned z = 0; z < grid.z; z++)
      for (unsigned y = 0; y < grid.y; y++)
         for (unsigned x = 0; x < grid.x; x++) {
            block_idx.x = x;
            block_idx.y = y;
            block_idx.z = z;
            run_block((unsigned)threads);
         }
   close_devices();
   S.thread_main = nullptr;
}
} // namespace nr_emu

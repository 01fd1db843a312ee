/* emu_internal.h — what the pieces of the CUDA emulator share (tests/gpu/emu/).
 *
 * What it is: the CUDA emulator runs the CUDA backend (core/cuda/) on a machine without a GPU,
 * for tests only: the .cu files are compiled as C++ (cuda_emu.h gives the device built-ins, each
 * CUDA thread a fiber), and the CUDA runtime, cuBLAS and cuDNN entry points the backend calls are
 * implemented here on the CPU (cudart_emu.cpp, cublas_emu.c, cudnn_emu.c), validating their
 * arguments as the real libraries document. A build with -DNR_CUDA_EMU=ON links these instead of
 * the NVIDIA libraries.
 * What it is not: a GPU, or a model of its timing or concurrency. Asynchrony is emulated as
 * lateness only (cudart_emu.cpp): a queued copy runs when something must see it, so a missing
 * stream wait shows as stale data; kernels and library calls run when launched.
 * Invariants: device memory lives in per-device arenas that are PROT_NONE except while emulated
 * device work runs (nr_emu_device_enter .. nr_emu_device_leave), so host code that dereferences a
 * device pointer faults, as it would with a real GPU, and the fault handler names the address.
 */
#ifndef NR_EMU_INTERNAL_H
#define NR_EMU_INTERNAL_H

#include <cuda_runtime_api.h>

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Makes device memory readable and writable for emulated library work on `stream` (the handle's),
 * after the work queued before it there and on the streams the legacy default stream orders it
 * with; nestable. */
void nr_emu_device_enter(cudaStream_t stream);
void nr_emu_device_leave(void);
/* 1 when [p, p + bytes) lies inside one live allocation of device `device` (bytes 0: p inside or
 * one past the end), else 0. */
int nr_emu_is_device_span(int device, const void *p, size_t bytes);
/* The device index of allocation p (a pointer inside one), or -1 for host memory. */
int nr_emu_device_of(const void *p);
/* The calling thread's current device (cudaSetDevice). */
int nr_emu_current_device(void);
/* A diagnostic on stderr: "nrlua CUDA emulator: <func>: <message>". For misuse that the real
 * library would reject, the entry point also returns the library's error status. */
void nr_emu_report(const char *func, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void nr_emu_vreport(const char *func, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* The last diagnostic, "<func>: <message>" (for cudnnGetLastErrorString). */
const char *nr_emu_last_message(void);

/* An operation of another emulated library that runs on a stream and may finish only when
 * something outside this process allows it (the emulated NCCL's collectives: their peers).
 * start runs when it is enqueued, after the work it is ordered after, with the stream's device
 * memory open (it reads its inputs then); finish runs when a flush of the stream reaches it, all
 * device memory open: it returns 1 once done (outputs written), 0 when it cannot finish yet
 * (only when wait is 0; with wait 1 it blocks until done); release frees it after it finished. A
 * stream with an unfinished operation answers "not ready" to queries of its later work. */
typedef struct nr_emu_async {
   void (*start)(struct nr_emu_async *op);
   int (*finish)(struct nr_emu_async *op, int wait);
   void (*release)(struct nr_emu_async *op);
} nr_emu_async;
cudaError_t nr_emu_enqueue_async(cudaStream_t stream, nr_emu_async *op);
/* Fills the first MiB of [p, p + bytes) with NaN once the work queued before on stream has run:
 * the CUDA backend's caching allocator calls it for each block it takes back (runtime.c), so a
 * kernel that reads a freed tensor, or a copy that lands in a block after its reuse was ordered,
 * shows. */
void nr_emu_poison_async(void *p, size_t bytes, cudaStream_t stream);
/* The device stream belongs to (-1 after recording cudaErrorInvalidResourceHandle). */
int nr_emu_stream_device(cudaStream_t stream);

/* ---- number formats of the emulated libraries (bf16 storage, TF32 tensor-core inputs) */
static inline float bf16_to_float(uint16_t h)
{
   uint32_t u = (uint32_t)h << 16;
   float f;
   memcpy(&f, &u, sizeof f);
   return f;
}

static inline uint16_t bf16_from_float(float f) /* round to nearest even; NaN stays a (quiet) NaN */
{
   uint32_t u;
   memcpy(&u, &f, sizeof u);
   if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
   u += 0x7fffu + ((u >> 16) & 1u);
   return (uint16_t)(u >> 16);
}

static inline float round_tf32(float f) /* 10 explicit mantissa bits, to nearest (ties away, as cvt.rna.tf32) */
{
   uint32_t u;
   memcpy(&u, &f, sizeof u);
   if ((u & 0x7f800000u) == 0x7f800000u) return f; /* inf, NaN */
   u = (u + 0x1000u) & 0xffffe000u;
   memcpy(&f, &u, sizeof f);
   return f;
}

#ifdef __cplusplus
}
#endif
#endif

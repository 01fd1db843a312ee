/* side.h — what the CUDA backend in libnr offers another library of the process that runs its
 * own GPU work (libnr_dist's NCCL side, core/dist/nccl.c): a stream of its own per GPU, ordered
 * with that GPU's compute stream by events.
 *
 * What it is: plain C over libnr's CUDA runtime, with streams and events as opaque pointers
 * (cudaStream_t, cudaEvent_t), so the caller includes no CUDA header and links no CUDA runtime.
 * Why: libnr links cudart statically; a second runtime linked into libnr_dist would be a second
 * copy of the runtime's state in one process (and a libcudart.so the GPU machine must provide).
 * NCCL, which links its own runtime privately, takes these streams as they are.
 * Invariants: a side stream is non-blocking (not ordered with the legacy default stream); its
 * work sees the compute stream's earlier work only after nr_cuda_side_after_compute, and the
 * compute stream sees the side stream's work only after nr_cuda_side_join. Errors name the CUDA
 * call and the device, as every nr_cuda_ function's do.
 */
#ifndef NR_CUDA_SIDE_H
#define NR_CUDA_SIDE_H

#include "../nr.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A new non-blocking stream on cuda:device_index, which also becomes this thread's current CUDA
 * device (a library that reads the current device, as ncclCommInitRank does, finds it). */
nr_status nr_cuda_side_stream_create(int32_t device_index, void **stream);
/* Waits for the stream's work, then destroys it. */
nr_status nr_cuda_side_stream_destroy(void *stream);
/* Later work on stream waits for the work queued so far on cuda:device_index's compute stream. */
nr_status nr_cuda_side_after_compute(int32_t device_index, void *stream);
/* A new event that completes when the work queued so far on stream has; *event for the calls below. */
nr_status nr_cuda_side_record(void *stream, void **event);
/* *done = 1 when the event has completed, 0 while its work runs; never waits. */
nr_status nr_cuda_side_query(void *event, int32_t *done);
/* Later work on cuda:device_index's compute stream waits for the event. */
nr_status nr_cuda_side_join(int32_t device_index, void *event);
void nr_cuda_side_event_destroy(void *event);

#ifdef __cplusplus
}
#endif
#endif

/* nccl.c — libnr_dist's GPU side: NCCL bootstrapped over MPI, allreduce and broadcast of CUDA
 * tensors on a communication stream.
 *
 * What it is: nr_dist_nccl_init (rank 0 draws the ncclUniqueId, MPI_Bcast hands it to every rank,
 * ncclCommInitRank on the rank's GPU), in-place allreduce/broadcast of contiguous f32/int64 CUDA
 * tensors. What it is not: the CPU path (dist.c) or bucketing (lua/nr/dist.lua).
 * Built only with NR_DIST_WITH_NCCL (CMake: CUDA on and nccl.h/libnccl found, or the CUDA
 * emulator's NCCL, tests/gpu/emu/nccl_emu.c); otherwise the same entry points fail with a message
 * saying how to get NCCL.
 *
 * Invariants
 *  - No CUDA runtime of its own: streams and events come from libnr's backend (core/cuda/side.h),
 *    whose runtime is linked into libnr statically; NCCL takes its streams as they are.
 *  - Ordering with compute: an allreduce makes the communication stream wait for the work queued
 *    so far on the GPU's compute stream, runs NCCL there and records a completion event;
 *    nr_dist_nccl_wait polls that event and then makes the compute stream wait for it, so Lua
 *    sees the result as with the CPU path, while buckets started during backward overlap with the
 *    kernels that follow them.
 *  - Waits poll the event and ncclCommGetAsyncError with the job's timeout; on a timeout or a
 *    NCCL error the communicator is aborted (ncclCommAbort) so no kernel spins forever.
 *  - NCCL's ring allreduce reduces each chunk once and copies it to every rank, so all ranks get
 *    the same bits; run to run it is reproducible for a fixed topology and NCCL_ALGO/NCCL_PROTO.
 */
#define _GNU_SOURCE
#include "dist_internal.h"

#include <stdio.h>
#include <stdlib.h>

#ifdef NR_DIST_WITH_NCCL

#include "cuda/side.h"

#include <nccl.h>

static ncclComm_t g_comm;
static void *g_stream; /* the communication stream (a cudaStream_t of libnr's runtime) */
static int g_device = -1;
/* Why the communicator was aborted (a timeout, an asynchronous NCCL error), or "". ncclCommAbort
 * frees the communicator: every later call fails with this instead of reaching NCCL (other
 * buckets still in flight are waited on or tested after the abort). */
static char g_aborted[256];

#define NCCL_TRY(call)                                                                          \
   do {                                                                                         \
      ncclResult_t r_ = (call);                                                                 \
      if (r_ != ncclSuccess)                                                                    \
         return NR_FAIL(NR_E_DEVICE, "%s: %s (%s)", #call, ncclGetErrorString(r_), ncclGetLastError(g_comm)); \
   } while (0)

typedef struct {
   void *done; /* completion event */
   double started;
} nccl_op;

int32_t nr_dist_has_nccl(void) { return 1; }
int32_t nr_dist_nccl_ready(void) { return g_device >= 0; }

static nr_status aborted(const char *func)
{
   return nr_fail_at(NR_E_DEVICE, func, __FILE__, __LINE__,
                     "the NCCL communicator of this rank was aborted after an earlier failure (%s); "
                     "the job cannot continue on GPUs", g_aborted);
}
#define NR_NOT_ABORTED()                           \
   do {                                            \
      if (g_aborted[0]) return aborted(__func__);  \
   } while (0)

/* Aborts the communicator for good (see g_aborted). Its stream is left as it is: work stuck in
 * a failed transfer may never end, and destroying the stream would wait for it. */
static void abort_comm(const char *why)
{
   snprintf(g_aborted, sizeof g_aborted, "%s", why);
   ncclCommAbort(g_comm);
   g_comm = NULL;
   g_stream = NULL;
   g_device = -1;
}

nr_status nr_dist_nccl_init(int32_t device_index)
{
   if (nr_dist_comm() == MPI_COMM_NULL) return NR_FAIL(NR_E_ARG, "call nr_dist_init before nr_dist_nccl_init");
   NR_NOT_ABORTED();
   if (g_device >= 0) {
      if (g_device == device_index) return NR_OK;
      return NR_FAIL(NR_E_ARG, "NCCL already set up on GPU %d, asked for GPU %d", g_device, device_index);
   }
   int count = nr_cuda_device_count();
   if (device_index < 0 || device_index >= count)
      return NR_FAIL(NR_E_DEVICE, "GPU %d does not exist (this machine has %d); use one rank per GPU", device_index, count);
   /* the stream first: it also makes the GPU current for ncclCommInitRank */
   void *stream = NULL;
   NR_TRY(nr_cuda_side_stream_create(device_index, &stream));
   int rank = nr_dist_rank(), size = nr_dist_size();
   ncclUniqueId id;
   nr_status st = NR_OK;
   ncclResult_t r = rank == 0 ? ncclGetUniqueId(&id) : ncclSuccess;
   if (r != ncclSuccess) st = NR_FAIL(NR_E_DEVICE, "ncclGetUniqueId: %s (%s)", ncclGetErrorString(r), ncclGetLastError(NULL));
   MPI_Request req;
   int rc = st ? MPI_SUCCESS : MPI_Ibcast(&id, (int)sizeof id, MPI_BYTE, 0, nr_dist_comm(), &req);
   if (!st && rc != MPI_SUCCESS) st = NR_FAIL(NR_E_INTERNAL, "MPI_Ibcast of the NCCL id failed (code %d)", rc);
   double t0 = MPI_Wtime();
   int64_t polls = 0;
   for (int flag = 0; !st && !flag;) {
      if (MPI_Test(&req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
         st = NR_FAIL(NR_E_INTERNAL, "MPI_Test failed");
         break;
      }
      double w = MPI_Wtime() - t0;
      if (!flag && nr_dist_timeout() > 0 && w > nr_dist_timeout())
         st = NR_FAIL(NR_E_INTERNAL, "broadcast of the NCCL id timed out after %.0f s on rank %d", w, rank);
      else if (!flag) nr_dist_backoff(w, ++polls);
   }
   if (!st && (r = ncclCommInitRank(&g_comm, size, id, rank)) != ncclSuccess)
      st = NR_FAIL(NR_E_DEVICE, "ncclCommInitRank(rank %d of %d, GPU %d): %s (%s)", rank, size, device_index,
                   ncclGetErrorString(r), ncclGetLastError(NULL));
   if (st) {
      nr_cuda_side_stream_destroy(stream);
      return st;
   }
   g_stream = stream;
   g_device = device_index;
   return NR_OK;
}

static nr_status check_tensor(const nr_tensor *t)
{
   NR_NOT_ABORTED();
   if (g_device < 0) return NR_FAIL(NR_E_ARG, "NCCL is not set up (nr.dist.init{device='cuda'} calls nr_dist_nccl_init)");
   if (t->device_index != g_device)
      return NR_FAIL(NR_E_ARG, "t lives on GPU %d but this rank's NCCL communicator uses GPU %d", t->device_index, g_device);
   return NR_OK;
}

/* Records the completion of the work queued on the communication stream into a new op. */
static nr_status new_op(nccl_op **out)
{
   nccl_op *o = calloc(1, sizeof *o);
   if (!o) return NR_FAIL(NR_E_OOM, "cannot allocate an NCCL operation");
   nr_status st = nr_cuda_side_record(g_stream, &o->done);
   if (st) {
      free(o);
      return st;
   }
   o->started = MPI_Wtime();
   *out = o;
   return NR_OK;
}

nr_status nr_dist_nccl_start(nr_tensor *t, int32_t op, double scale, void **token)
{
   NR_TRY(check_tensor(t));
   ncclDataType_t type = t->dtype == NR_F32 ? ncclFloat32 : ncclInt64;
   size_t n = (size_t)nr_tensor_numel(t);
   NR_TRY(nr_cuda_side_after_compute(g_device, g_stream));
   ncclRedOp_t rop = op == NR_DIST_MAX ? ncclMax : op == NR_DIST_MIN ? ncclMin : ncclSum;
   int custom = 0;
   if (op == NR_DIST_SUM && scale != 1.0 && t->dtype == NR_F32) {
      float s = (float)scale; /* pre-multiplied sum: sum over ranks of scale * x_r */
      NCCL_TRY(ncclRedOpCreatePreMulSum(&rop, &s, ncclFloat32, ncclScalarHostImmediate, g_comm));
      custom = 1;
   }
   ncclResult_t r = ncclAllReduce(t->data, t->data, n, type, rop, g_comm, (cudaStream_t)g_stream);
   if (custom) ncclRedOpDestroy(rop, g_comm);
   NCCL_TRY(r);
   nccl_op *o = NULL;
   NR_TRY(new_op(&o));
   *token = o;
   return NR_OK;
}

nr_status nr_dist_nccl_test(void *token, int32_t *done)
{
   nccl_op *o = token;
   NR_NOT_ABORTED();
   return nr_cuda_side_query(o->done, done);
}

nr_status nr_dist_nccl_wait(void *token, const char *what)
{
   nccl_op *o = token;
   int64_t polls = 0;
   for (;;) {
      NR_NOT_ABORTED();
      int32_t done = 0;
      NR_TRY(nr_cuda_side_query(o->done, &done));
      if (done) break;
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(g_comm, &async);
      double w = MPI_Wtime() - o->started;
      char why[200];
      if (async != ncclSuccess) {
         snprintf(why, sizeof why, "%s: NCCL reported %s on rank %d", what, ncclGetErrorString(async), nr_dist_rank());
         abort_comm(why);
         return NR_FAIL(NR_E_DEVICE, "%s", why);
      }
      if (nr_dist_timeout() > 0 && w > nr_dist_timeout()) {
         snprintf(why, sizeof why, "%s timed out after %.0f s on rank %d of %d", what, w, nr_dist_rank(), nr_dist_size());
         abort_comm(why);
         return NR_FAIL(NR_E_DEVICE, "%s (NCCL communicator aborted)", why);
      }
      nr_dist_backoff(w, ++polls);
   }
   return nr_cuda_side_join(g_device, o->done);
}

void nr_dist_nccl_release(void *token)
{
   nccl_op *o = token;
   if (!o) return;
   nr_cuda_side_event_destroy(o->done);
   free(o);
}

nr_status nr_dist_nccl_broadcast(nr_tensor *t, int32_t root)
{
   NR_TRY(check_tensor(t));
   size_t bytes = (size_t)nr_tensor_numel(t) * (size_t)nr_dtype_size(t->dtype);
   NR_TRY(nr_cuda_side_after_compute(g_device, g_stream));
   NCCL_TRY(ncclBroadcast(t->data, t->data, bytes, ncclUint8, root, g_comm, (cudaStream_t)g_stream));
   nccl_op *o = NULL;
   NR_TRY(new_op(&o));
   nr_status st = nr_dist_nccl_wait(o, "NCCL broadcast");
   nr_dist_nccl_release(o);
   return st;
}

void nr_dist_nccl_shutdown(void)
{
   if (g_device < 0) return;
   nr_cuda_side_stream_destroy(g_stream); /* waits for its work */
   ncclCommDestroy(g_comm);
   g_stream = NULL;
   g_device = -1;
}

#else /* no NCCL: the GPU entry points explain how to get it */

static nr_status no_nccl(const char *func)
{
   return nr_fail_at(NR_E_DEVICE, func, __FILE__, __LINE__,
                     "libnr_dist was built without NCCL: GPU tensors need a CUDA build "
                     "(cmake -DNR_CUDA=ON) with nccl.h and libnccl found; CPU tensors use MPI");
}

int32_t nr_dist_has_nccl(void) { return 0; }
int32_t nr_dist_nccl_ready(void) { return 0; }
nr_status nr_dist_nccl_init(int32_t device_index) { return no_nccl(__func__); }
nr_status nr_dist_nccl_start(nr_tensor *t, int32_t op, double scale, void **token) { return no_nccl(__func__); }
nr_status nr_dist_nccl_test(void *token, int32_t *done) { return no_nccl(__func__); }
nr_status nr_dist_nccl_wait(void *token, const char *what) { return no_nccl(__func__); }
void nr_dist_nccl_release(void *token) {}
nr_status nr_dist_nccl_broadcast(nr_tensor *t, int32_t root) { return no_nccl(__func__); }
void nr_dist_nccl_shutdown(void) {}

#endif

/* nccl_emu.c — the NCCL of the CUDA emulator: the collectives libnr_dist's GPU side
 * (core/dist/nccl.c) calls, between processes that each emulate their own GPUs, carried by MPI.
 *
 * What it is: ncclGetUniqueId / ncclCommInitRank / ncclCommDestroy / ncclCommAbort,
 * ncclAllReduce (sum, prod, max, min, avg and PreMulSum) and ncclBroadcast on emulated device
 * memory, with NCCL's argument checks (device buffers of the communicator's GPU, a stream of that
 * GPU, one GPU per rank: "Duplicate GPU detected", one unique id for all ranks) and its error
 * reporting (ncclGetLastError, ncclCommGetAsyncError). Built into libnr_dist in emulator builds
 * (-DNR_CUDA_EMU=ON) instead of linking libnccl; the device memory and streams are the
 * emulated runtime's in libnr (cudart_emu.cpp).
 * What it is not: NCCL's transports, algorithms or speed, or its exact rounding: a collective
 * gathers every rank's input (MPI_Iallgather) and each rank reduces them in rank order, so all
 * ranks get the same bits, as with NCCL, but not NCCL's bits.
 * Invariants: a collective is an operation of its stream (nr_emu_enqueue_async): it reads its
 * input once the stream's earlier work has run (at once, or behind a collective still waiting
 * for its peers when a flush reaches it), and writes its output when a flush of the
 * stream reaches it after every rank has joined; until then an event recorded after it answers
 * "not ready", so the host's polling loop (and its timeout) sees a peer that never comes, as with
 * NCCL's kernels. NCCL rank r is MPI_COMM_WORLD rank r. NR_EMU_NCCL_FAIL=k makes the k-th
 * collective fail in transport (ncclCommGetAsyncError reports it; the collective never ends). A communicator lives until it is
 * destroyed or aborted and its last queued collective has finished.
 */
#define _GNU_SOURCE
#include "emu_internal.h"

#include <mpi.h>
#include <nccl.h>

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { MAX_CUSTOM_OPS = 64 };
static const char ID_MAGIC[8] = "nremuID";

struct ncclComm {
   MPI_Comm mpi;
   int rank, nranks, device;
   int refs;                 /* the user's handle + queued collectives */
   int aborted;
   int released;             /* the user's handle is gone (destroyed or aborted) */
   ncclResult_t async_error; /* what ncclCommGetAsyncError reports */
   struct {
      int live;
      ncclDataType_t type;
      double scale;
   } custom[MAX_CUSTOM_OPS]; /* ncclRedOpCreatePreMulSum: op ncclNumOps + i */
};

static char g_last_error[512];

static ncclResult_t fail(ncclResult_t r, const char *func, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static ncclResult_t fail(ncclResult_t r, const char *func, const char *fmt, ...)
{
   va_list ap;
   va_start(ap, fmt);
   vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
   va_end(ap);
   nr_emu_report(func, "%s", g_last_error);
   return r;
}

/* NCCL frees a communicator in ncclCommDestroy / ncclCommAbort: a later call with it reads freed
 * memory. The emulator keeps it while collectives are queued, so such a call is caught here (as a
 * sanitizer would) instead of quietly working. */
static void check_live(const struct ncclComm *c, const char *func)
{
   if (c && c->released) {
      nr_emu_report(func, "the communicator was used after ncclCommDestroy / ncclCommAbort freed it");
      abort();
   }
}

static void release_comm(struct ncclComm *c)
{
   if (--c->refs > 0) return;
   if (!c->aborted) MPI_Comm_free(&c->mpi); /* an aborted one may have collectives in flight */
   free(c);
}

/* ---------------------------------------------------------------- errors */

const char *ncclGetErrorString(ncclResult_t r)
{
   switch (r) {
   case ncclSuccess: return "no error";
   case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
   case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
   case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
   case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
   case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
   case ncclRemoteError: return "remote process exited or there was a network error";
   case ncclInProgress: return "NCCL operation in progress";
   default: return "unknown result code";
   }
}

const char *ncclGetLastError(ncclComm_t comm) { return g_last_error; }

ncclResult_t ncclGetVersion(int *version)
{
   if (!version) return fail(ncclInvalidArgument, __func__, "version is NULL");
   *version = NCCL_VERSION_CODE;
   return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *async_error)
{
   check_live(comm, __func__);
   if (!comm || !async_error) return fail(ncclInvalidArgument, __func__, "comm or asyncError is NULL");
   *async_error = comm->async_error;
   return ncclSuccess;
}

/* ---------------------------------------------------------------- communicators */

ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
   if (!id) return fail(ncclInvalidArgument, __func__, "uniqueId is NULL");
   memset(id, 0, sizeof *id);
   memcpy(id->internal, ID_MAGIC, sizeof ID_MAGIC);
   struct timespec ts;
   clock_gettime(CLOCK_REALTIME, &ts);
   uint64_t parts[3] = {(uint64_t)getpid(), (uint64_t)ts.tv_sec, (uint64_t)ts.tv_nsec};
   memcpy(id->internal + sizeof ID_MAGIC, parts, sizeof parts);
   return ncclSuccess;
}

static uint64_t hash_bytes(const void *p, size_t n)
{
   uint64_t h = 1469598103934665603ull; /* FNV-1a */
   for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)p)[i]) * 1099511628211ull;
   return h;
}

ncclResult_t ncclCommInitRank(ncclComm_t *out, int nranks, ncclUniqueId id, int rank)
{
   if (!out) return fail(ncclInvalidArgument, __func__, "comm is NULL");
   *out = NULL;
   if (nranks < 1 || rank < 0 || rank >= nranks)
      return fail(ncclInvalidArgument, __func__, "rank %d of nranks %d", rank, nranks);
   if (memcmp(id.internal, ID_MAGIC, sizeof ID_MAGIC) != 0)
      return fail(ncclInvalidArgument, __func__, "rank %d: the unique id was not made by ncclGetUniqueId", rank);
   int inited = 0, world_size = 0, world_rank = 0;
   MPI_Initialized(&inited);
   if (!inited) return fail(ncclSystemError, __func__, "the emulated NCCL reaches its peers through MPI: MPI_Init first");
   MPI_Comm_size(MPI_COMM_WORLD, &world_size);
   MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
   if (world_size != nranks || world_rank != rank)
      return fail(ncclInvalidUsage, __func__, "the emulator maps NCCL rank r to MPI_COMM_WORLD rank r: rank %d of %d here "
                  "is MPI rank %d of %d", rank, nranks, world_rank, world_size);
   struct ncclComm *c = calloc(1, sizeof *c);
   if (!c) return fail(ncclSystemError, __func__, "out of host memory");
   c->rank = rank;
   c->nranks = nranks;
   c->device = nr_emu_current_device();
   c->refs = 1;
   if (MPI_Comm_dup(MPI_COMM_WORLD, &c->mpi) != MPI_SUCCESS) {
      free(c);
      return fail(ncclSystemError, __func__, "MPI_Comm_dup failed");
   }
   MPI_Comm_set_errhandler(c->mpi, MPI_ERRORS_RETURN);
   /* what NCCL's bootstrap checks: one id for all ranks, and one GPU per rank */
   struct { uint64_t id, host; int64_t device; } mine, *all = calloc((size_t)nranks, sizeof *all);
   char host[256] = {0};
   gethostname(host, sizeof host - 1);
   mine.id = hash_bytes(id.internal, sizeof id.internal);
   mine.host = hash_bytes(host, strlen(host));
   mine.device = c->device;
   if (!all || MPI_Allgather(&mine, (int)sizeof mine, MPI_BYTE, all, (int)sizeof mine, MPI_BYTE, c->mpi) != MPI_SUCCESS) {
      free(all);
      release_comm(c);
      return fail(ncclSystemError, __func__, "the bootstrap exchange (MPI_Allgather) failed");
   }
   ncclResult_t r = ncclSuccess;
   for (int i = 0; i < nranks && r == ncclSuccess; i++) {
      if (all[i].id != mine.id)
         r = fail(ncclInvalidUsage, __func__, "ranks %d and %d were given different unique ids", rank, i);
      for (int j = 0; j < i && r == ncclSuccess; j++)
         if (all[i].host == all[j].host && all[i].device == all[j].device)
            r = fail(ncclInvalidUsage, __func__, "Duplicate GPU detected : rank %d and rank %d both on CUDA device %d", j, i,
                     (int)all[i].device);
   }
   free(all);
   if (r != ncclSuccess) {
      release_comm(c);
      return r;
   }
   *out = c;
   return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm)
{
   if (!comm) return fail(ncclInvalidArgument, __func__, "comm is NULL");
   check_live(comm, __func__);
   comm->released = 1;
   release_comm(comm);
   return ncclSuccess;
}

/* Queued collectives finish at once without output, as NCCL's kernels are stopped. */
ncclResult_t ncclCommAbort(ncclComm_t comm)
{
   if (!comm) return ncclSuccess;
   check_live(comm, __func__);
   comm->aborted = comm->released = 1;
   release_comm(comm);
   return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count)
{
   check_live(comm, __func__);
   if (!comm || !count) return fail(ncclInvalidArgument, __func__, "comm or count is NULL");
   *count = comm->nranks;
   return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank)
{
   check_live(comm, __func__);
   if (!comm || !rank) return fail(ncclInvalidArgument, __func__, "comm or rank is NULL");
   *rank = comm->rank;
   return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device)
{
   check_live(comm, __func__);
   if (!comm || !device) return fail(ncclInvalidArgument, __func__, "comm or device is NULL");
   *device = comm->device;
   return ncclSuccess;
}

/* ---------------------------------------------------------------- reduction operators */

static size_t type_size(ncclDataType_t t)
{
   switch (t) {
   case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
   case ncclFloat16: case ncclBfloat16: return 2;
   case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
   case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
   default: return 0;
   }
}

/* The types this emulator reduces (every type broadcasts). */
static int reducible(ncclDataType_t t)
{
   return t == ncclInt8 || t == ncclUint8 || t == ncclInt32 || t == ncclUint32 || t == ncclInt64 || t == ncclUint64 ||
          t == ncclFloat32 || t == ncclFloat64;
}

ncclResult_t ncclRedOpCreatePreMulSum(ncclRedOp_t *op, void *scalar, ncclDataType_t datatype,
                                      ncclScalarResidence_t residence, ncclComm_t comm)
{
   check_live(comm, __func__);
   if (!op || !scalar || !comm) return fail(ncclInvalidArgument, __func__, "op, scalar or comm is NULL");
   if (!type_size(datatype)) return fail(ncclInvalidArgument, __func__, "datatype %d", (int)datatype);
   if (!reducible(datatype)) return fail(ncclInvalidArgument, __func__, "datatype %d is not emulated", (int)datatype);
   if (residence != ncclScalarHostImmediate)
      return fail(ncclInvalidArgument, __func__, "only ncclScalarHostImmediate scalars are emulated");
   double s;
   switch (datatype) {
   case ncclFloat32: s = *(const float *)scalar; break;
   case ncclFloat64: s = *(const double *)scalar; break;
   case ncclInt8: s = *(const int8_t *)scalar; break;
   case ncclUint8: s = *(const uint8_t *)scalar; break;
   case ncclInt32: s = *(const int32_t *)scalar; break;
   case ncclUint32: s = *(const uint32_t *)scalar; break;
   case ncclInt64: s = (double)*(const int64_t *)scalar; break;
   default: s = (double)*(const uint64_t *)scalar; break;
   }
   for (int i = 0; i < MAX_CUSTOM_OPS; i++)
      if (!comm->custom[i].live) {
         comm->custom[i].live = 1;
         comm->custom[i].type = datatype;
         comm->custom[i].scale = s;
         *op = (ncclRedOp_t)(ncclNumOps + i);
         return ncclSuccess;
      }
   return fail(ncclInvalidUsage, __func__, "more than %d live PreMulSum operators", MAX_CUSTOM_OPS);
}

ncclResult_t ncclRedOpDestroy(ncclRedOp_t op, ncclComm_t comm)
{
   check_live(comm, __func__);
   int i = (int)op - ncclNumOps;
   if (!comm || i < 0 || i >= MAX_CUSTOM_OPS || !comm->custom[i].live)
      return fail(ncclInvalidArgument, __func__, "op %d is not a live operator of this communicator", (int)op);
   comm->custom[i].live = 0;
   return ncclSuccess;
}

/* ---------------------------------------------------------------- collectives */

typedef struct {
   nr_emu_async base;
   struct ncclComm *comm;
   int broadcast;       /* else allreduce */
   const void *send;
   void *recv;
   size_t count, bytes;
   ncclDataType_t type;
   ncclRedOp_t op;      /* a built-in op; PreMulSum is ncclSum with premul */
   int premul;
   double scale;
   int root;
   char *stage;         /* this rank's input (a broadcast's buffer on every rank) */
   char *gathered;      /* allreduce: every rank's input, rank after rank */
   MPI_Request req;
   int failed;          /* the MPI side failed: async error, no output */
} collective;

/* NR_EMU_NCCL_FAIL=k: the k-th collective of this process fails in transport (a test of the
 * callers' async-error path; every rank given the same k fails the same collective). */
static int injected_failure(void)
{
   static long n, at = -1;
   if (at < 0) {
      const char *e = getenv("NR_EMU_NCCL_FAIL");
      at = e && *e ? strtol(e, NULL, 10) : 0;
   }
   return at > 0 && ++n == at;
}

static void coll_start(nr_emu_async *base)
{
   collective *c = (collective *)base;
   struct ncclComm *m = c->comm;
   if (m->aborted) return; /* queued behind a collective that never ended: it never runs */
   if (injected_failure()) {
      c->failed = 1;
      return;
   }
   c->stage = malloc(c->bytes ? c->bytes : 1);
   if (!c->broadcast) c->gathered = malloc(c->bytes * (size_t)m->nranks + 1);
   if (!c->stage || (!c->broadcast && !c->gathered)) {
      c->failed = 1;
      return;
   }
   int rc;
   if (c->broadcast) {
      if (m->rank == c->root) memcpy(c->stage, c->send, c->bytes);
      rc = MPI_Ibcast(c->stage, (int)c->bytes, MPI_BYTE, c->root, m->mpi, &c->req);
   } else {
      memcpy(c->stage, c->send, c->bytes);
      rc = MPI_Iallgather(c->stage, (int)c->bytes, MPI_BYTE, c->gathered, (int)c->bytes, MPI_BYTE, m->mpi, &c->req);
   }
   if (rc != MPI_SUCCESS) c->failed = 1;
}

/* recv[i] = op over ranks r (in rank order) of gathered[r][i] */
#define REDUCE(T)                                                                                            \
   do {                                                                                                      \
      const T *g = (const T *)c->gathered;                                                                   \
      T *y = (T *)c->recv;                                                                                   \
      for (size_t i = 0; i < c->count; i++) {                                                                \
         T acc = c->premul ? (T)(g[i] * (T)c->scale) : g[i];                                                 \
         for (int r = 1; r < n; r++) {                                                                       \
            T v = c->premul ? (T)(g[(size_t)r * c->count + i] * (T)c->scale) : g[(size_t)r * c->count + i]; \
            switch (c->op) {                                                                                 \
            case ncclProd: acc = (T)(acc * v); break;                                                        \
            case ncclMax: acc = v > acc ? v : acc; break;                                                    \
            case ncclMin: acc = v < acc ? v : acc; break;                                                    \
            default: acc = (T)(acc + v); break;                                                              \
            }                                                                                                \
         }                                                                                                   \
         y[i] = c->op == ncclAvg ? (T)(acc / (T)n) : acc;                                                    \
      }                                                                                                      \
   } while (0)

static void reduce(collective *c)
{
   int n = c->comm->nranks;
   switch (c->type) {
   case ncclInt8: REDUCE(int8_t); break;
   case ncclUint8: REDUCE(uint8_t); break;
   case ncclInt32: REDUCE(int32_t); break;
   case ncclUint32: REDUCE(uint32_t); break;
   case ncclInt64: REDUCE(int64_t); break;
   case ncclUint64: REDUCE(uint64_t); break;
   case ncclFloat32: REDUCE(float); break;
   default: REDUCE(double); break;
   }
}

/* A collective whose transport failed: as NCCL's kernel it never finishes, and the communicator
 * reports the error (ncclCommGetAsyncError) until it is aborted; a blocking wait cannot be
 * served that way here, so it gets a diagnostic and no output. */
static int failed(collective *c, ncclResult_t r, int wait, const char *why)
{
   c->comm->async_error = r;
   snprintf(g_last_error, sizeof g_last_error, "%s", why);
   if (!wait) return 0;
   nr_emu_report("NCCL collective", "%s; a synchronisation waited for it: it ends without output", why);
   return 1;
}

static int coll_finish(nr_emu_async *base, int wait)
{
   collective *c = (collective *)base;
   struct ncclComm *m = c->comm;
   if (m->aborted) return 1;
   if (c->failed) return failed(c, ncclSystemError, wait, "the emulated collective's MPI transfer failed");
   int done = 0;
   int rc = wait ? MPI_Wait(&c->req, MPI_STATUS_IGNORE) : MPI_Test(&c->req, &done, MPI_STATUS_IGNORE);
   if (rc != MPI_SUCCESS) {
      c->failed = 1;
      return failed(c, ncclRemoteError, wait, "the emulated collective's MPI transfer failed");
   }
   if (!wait && !done) return 0;
   if (c->broadcast) memcpy(c->recv, c->stage, c->bytes);
   else reduce(c);
   return 1;
}

static void coll_release(nr_emu_async *base)
{
   collective *c = (collective *)base;
   free(c->stage);
   free(c->gathered);
   release_comm(c->comm);
   free(c);
}

static ncclResult_t check_buffer(const char *func, const char *what, const void *p, size_t bytes, const struct ncclComm *m)
{
   if (!nr_emu_is_device_span(m->device, p, bytes))
      return fail(ncclInvalidArgument, func, "%s %p is not %zu bytes of device memory of the communicator's GPU (cuda:%d)",
                  what, p, bytes, m->device);
   return ncclSuccess;
}

static ncclResult_t enqueue(const char *func, collective *c, cudaStream_t stream)
{
   struct ncclComm *m = c->comm;
   check_live(m, func);
   ncclResult_t r = ncclSuccess;
   int sd = nr_emu_stream_device(stream);
   if (m->aborted) r = fail(ncclInvalidUsage, func, "the communicator was aborted");
   else if (sd != m->device)
      r = fail(ncclUnhandledCudaError, func, "the stream belongs to cuda:%d, the communicator to cuda:%d", sd, m->device);
   else if (c->bytes > (size_t)INT_MAX || (!c->broadcast && c->bytes * (size_t)m->nranks > (size_t)INT_MAX))
      r = fail(ncclInvalidArgument, func, "%zu bytes: the emulator moves at most 2 GiB per collective", c->bytes);
   else if (c->send && (!c->broadcast || m->rank == c->root)) r = check_buffer(func, "sendbuff", c->send, c->bytes, m);
   if (r == ncclSuccess) r = check_buffer(func, "recvbuff", c->recv, c->bytes, m);
   if (r != ncclSuccess) {
      free(c);
      return r;
   }
   c->base.start = coll_start;
   c->base.finish = coll_finish;
   c->base.release = coll_release;
   m->refs++;
   if (nr_emu_enqueue_async(stream, &c->base) != cudaSuccess) {
      m->refs--;
      free(c);
      return fail(ncclUnhandledCudaError, func, "the stream is not a live stream");
   }
   return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream)
{
   if (!comm) return fail(ncclInvalidArgument, __func__, "comm is NULL");
   if (!type_size(datatype)) return fail(ncclInvalidArgument, __func__, "datatype %d", (int)datatype);
   if (!reducible(datatype)) return fail(ncclInvalidArgument, __func__, "datatype %d is not emulated", (int)datatype);
   collective *c = calloc(1, sizeof *c);
   if (!c) return fail(ncclSystemError, __func__, "out of host memory");
   *c = (collective){.comm = comm, .send = sendbuff, .recv = recvbuff, .count = count,
                     .bytes = count * type_size(datatype), .type = datatype, .op = op};
   int i = (int)op - ncclNumOps;
   if (i >= 0) {
      if (i >= MAX_CUSTOM_OPS || !comm->custom[i].live) {
         free(c);
         return fail(ncclInvalidArgument, __func__, "op %d is not a live operator of this communicator", (int)op);
      }
      if (comm->custom[i].type != datatype) {
         free(c);
         return fail(ncclInvalidArgument, __func__, "op %d was created for datatype %d, used with %d", (int)op,
                     (int)comm->custom[i].type, (int)datatype);
      }
      c->op = ncclSum;
      c->premul = 1;
      c->scale = comm->custom[i].scale;
   } else if (op < ncclSum || op > ncclAvg) {
      free(c);
      return fail(ncclInvalidArgument, __func__, "op %d", (int)op);
   } else if (op == ncclAvg && datatype != ncclFloat32 && datatype != ncclFloat64) {
      free(c);
      return fail(ncclInvalidArgument, __func__, "ncclAvg of an integer type is not emulated");
   }
   if (!sendbuff) {
      free(c);
      return fail(ncclInvalidArgument, __func__, "sendbuff is NULL");
   }
   return enqueue(__func__, c, stream);
}

ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream)
{
   if (!comm) return fail(ncclInvalidArgument, __func__, "comm is NULL");
   if (!type_size(datatype)) return fail(ncclInvalidArgument, __func__, "datatype %d", (int)datatype);
   if (root < 0 || root >= comm->nranks) return fail(ncclInvalidArgument, __func__, "root %d of %d ranks", root, comm->nranks);
   if (comm->rank == root && !sendbuff) return fail(ncclInvalidArgument, __func__, "sendbuff is NULL on the root");
   collective *c = calloc(1, sizeof *c);
   if (!c) return fail(ncclSystemError, __func__, "out of host memory");
   *c = (collective){.comm = comm, .broadcast = 1, .send = sendbuff, .recv = recvbuff, .count = count,
                     .bytes = count * type_size(datatype), .type = datatype, .root = root};
   return enqueue(__func__, c, stream);
}

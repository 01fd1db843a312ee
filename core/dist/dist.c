/* dist.c — libnr_dist: data-parallel collectives over MPI for nrlua, and the job's failure policy.
 *
 * What it is: init/rank/size, barrier, in-place allreduce (ordered or MPI's own), broadcast of
 * tensors and bytes, allgather of doubles, tensor fingerprints, nonblocking allreduce handles
 * (gradient buckets started during backward), MPI_Abort on failure. CUDA tensors are handed to
 * core/dist/nccl.c. What it is not: bucketing, sharding or trainer logic (lua/nr/dist.lua).
 *
 * Invariants
 *  - One thread (the Lua thread) calls these functions; every rank calls the same collectives in
 *    the same order. MPI runs at MPI_THREAD_FUNNELED on a duplicate of MPI_COMM_WORLD whose
 *    errors return codes (turned into nr_status with MPI's message).
 *  - NR_DIST_ORDERED: the buffer is cut into N chunks of ceil(n/N); an all-to-all sends chunk k
 *    of every rank to rank k, which sums its chunk in rank order 0..N-1 in double, scales, and
 *    rounds to float once; an all-gather returns the chunks. Only data movement is left to MPI,
 *    so the result is bit-identical on every rank and from run to run, whatever algorithm MPI
 *    picks; each rank sends and receives 2(N-1)/N of the buffer, as a ring allreduce does.
 *  - Every wait polls with a deadline (nr_dist_timeout): a collective whose peers never arrive
 *    fails with a message naming it instead of hanging.
 *  - Exits: a process that exits with a non-zero status while MPI is up, or with any status in
 *    the middle of training (nr_dist_set_busy), calls MPI_Abort (from an on_exit handler), so
 *    mpirun ends every rank at once; a clean exit finalizes MPI. SIGTERM
 *    (what mpirun sends the survivors) prints which rank was stopped and why, then re-raises.
 *    nr_dist_abort is the only other way this library ends the process, and Lua asks for it.
 */
#define _GNU_SOURCE
#include "dist_internal.h"

#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int g_ready;      /* nr_dist_init succeeded */
static int g_finalized;  /* nr_dist_finalize ran */
static int g_owns_mpi;   /* we called MPI_Init (so we finalize it) */
static int g_rank, g_size = 1, g_local_rank, g_local_size = 1;
static double g_timeout = 1800.0;
static MPI_Comm g_world = MPI_COMM_NULL, g_local = MPI_COMM_NULL;
static char g_sigterm_msg[512];
static size_t g_sigterm_len;

MPI_Comm nr_dist_comm(void) { return g_world; }
double nr_dist_timeout(void) { return g_timeout; }

const char *nr_dist_mpi_error(int code, char *buf, int n)
{
   char text[MPI_MAX_ERROR_STRING];
   int len = 0, cls = 0;
   if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "MPI error %d", code);
   MPI_Error_class(code, &cls);
   snprintf(buf, (size_t)n, "%s (MPI error class %d)", text, cls);
   return buf;
}

#define MPI_TRY(call, what)                                                                     \
   do {                                                                                         \
      int mpi_rc_ = (call);                                                                     \
      if (mpi_rc_ != MPI_SUCCESS) {                                                             \
         char mpi_msg_[MPI_MAX_ERROR_STRING + 64];                                              \
         return NR_FAIL(NR_E_INTERNAL, "%s failed on rank %d of %d: %s", what, g_rank, g_size, \
                        nr_dist_mpi_error(mpi_rc_, mpi_msg_, (int)sizeof mpi_msg_));             \
      }                                                                                         \
   } while (0)

static nr_status need_ready(const char *func)
{
   if (!g_ready || g_finalized)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        g_finalized ? "nr.dist was finalized" : "nr.dist is not initialised (call nr.dist.init())");
   return NR_OK;
}

void nr_dist_backoff(double waited_s, int64_t polls)
{
   if (polls < 256) return;                 /* spin: a peer a few microseconds behind */
   if (waited_s < 0.01) { sched_yield(); return; }
   struct timespec ts = {0, waited_s < 1.0 ? 100000 : 1000000}; /* 0.1 ms, then 1 ms */
   nanosleep(&ts, NULL);
}

/* Waits for one MPI request with the deadline. */
static nr_status wait_request(MPI_Request *req, const char *what, double started)
{
   int64_t polls = 0;
   for (;;) {
      int flag = 0;
      MPI_TRY(MPI_Test(req, &flag, MPI_STATUS_IGNORE), what);
      if (flag) return NR_OK;
      double waited = MPI_Wtime() - started;
      if (g_timeout > 0 && waited > g_timeout)
         return NR_FAIL(NR_E_INTERNAL,
                        "%s timed out after %.0f s on rank %d of %d: another rank is stuck, died, or "
                        "called a different collective (set the limit with NR_DIST_TIMEOUT or "
                        "nr.dist.init{timeout=})", what, waited, g_rank, g_size);
      nr_dist_backoff(waited, ++polls);
   }
}

/* ---- failure policy -------------------------------------------------------------------- */

static void on_sigterm(int sig)
{
   if (g_sigterm_len) {
      ssize_t w = write(2, g_sigterm_msg, g_sigterm_len);
      (void)w;
   }
   signal(sig, SIG_DFL);
   raise(sig);
}

static int g_busy; /* nr_dist_set_busy: inside a training run, where every rank is needed */

void nr_dist_set_busy(int32_t busy) { g_busy = busy != 0; }

static void exit_hook(int status, void *arg)
{
   (void)arg;
   if (!g_ready || g_finalized) return;
   if (status != 0 || g_busy) {
      fprintf(stderr, "nrlua rank %d/%d: exiting with status %d %s; aborting every rank (MPI_Abort)\n", g_rank, g_size,
              status, status ? "while the job runs" : "in the middle of training (the other ranks wait for this one)");
      fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, status ? status : 1);
   }
   nr_dist_finalize();
}

void nr_dist_abort(int32_t code, const char *message)
{
   if (message && *message) {
      fprintf(stderr, "nrlua rank %d/%d: %s\n", g_rank, g_size, message);
      fflush(stderr);
   }
   int inited = 0, fin = 0;
   MPI_Initialized(&inited);
   MPI_Finalized(&fin);
   if (inited && !fin) MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
}

/* ---- setup ------------------------------------------------------------------------------ */

static double env_timeout(void)
{
   const char *e = getenv("NR_DIST_TIMEOUT");
   if (e && *e) {
      char *end;
      double v = strtod(e, &end);
      if (end != e && v >= 0) return v;
   }
   return 1800.0;
}

void nr_dist_set_timeout(double seconds) { g_timeout = seconds < 0 ? env_timeout() : seconds; }

nr_status nr_dist_init(double timeout_s)
{
   nr_dist_set_timeout(timeout_s);
   if (g_ready) return NR_OK;
   if (g_finalized) return NR_FAIL(NR_E_ARG, "nr.dist was finalized; MPI cannot be initialised twice");
   int inited = 0, fin = 0;
   MPI_Initialized(&inited);
   MPI_Finalized(&fin);
   if (fin) return NR_FAIL(NR_E_ARG, "MPI was already finalized in this process");
   if (!inited) {
      int provided = 0;
      int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
      if (rc != MPI_SUCCESS) return NR_FAIL(NR_E_INTERNAL, "MPI_Init_thread failed (code %d); launch with mpirun", rc);
      g_owns_mpi = 1;
   }
   MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
   MPI_TRY(MPI_Comm_dup(MPI_COMM_WORLD, &g_world), "MPI_Comm_dup");
   MPI_TRY(MPI_Comm_set_errhandler(g_world, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
   MPI_TRY(MPI_Comm_rank(g_world, &g_rank), "MPI_Comm_rank");
   MPI_TRY(MPI_Comm_size(g_world, &g_size), "MPI_Comm_size");
   MPI_TRY(MPI_Comm_split_type(g_world, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &g_local), "MPI_Comm_split_type");
   MPI_TRY(MPI_Comm_rank(g_local, &g_local_rank), "MPI_Comm_rank(local)");
   MPI_TRY(MPI_Comm_size(g_local, &g_local_size), "MPI_Comm_size(local)");
   char host[128] = "?";
   gethostname(host, sizeof host - 1);
   int k = snprintf(g_sigterm_msg, sizeof g_sigterm_msg,
                    "nrlua rank %d/%d (%s, pid %d): stopped by SIGTERM - the launcher ends every rank when "
                    "one fails or the job is cancelled; the failing rank's error is reported above\n",
                    g_rank, g_size, host, (int)getpid());
   g_sigterm_len = k > 0 ? (size_t)(k < (int)sizeof g_sigterm_msg ? k : (int)sizeof g_sigterm_msg - 1) : 0;
   /* (over nrlua's own, which makes a SIGTERM a Lua error at the next instruction: a rank waiting
    * in a collective runs none, and the launcher's SIGTERM must end it now; not over SIG_IGN) */
   struct sigaction old;
   if (sigaction(SIGTERM, NULL, &old) == 0 && old.sa_handler != SIG_IGN) {
      struct sigaction sa;
      memset(&sa, 0, sizeof sa);
      sa.sa_handler = on_sigterm;
      sigemptyset(&sa.sa_mask);
      sigaction(SIGTERM, &sa, NULL);
   }
   on_exit(exit_hook, NULL);
   g_ready = 1;
   return NR_OK;
}

int32_t nr_dist_initialized(void) { return g_ready && !g_finalized; }
int32_t nr_dist_rank(void) { return g_rank; }
int32_t nr_dist_size(void) { return g_size; }
int32_t nr_dist_local_rank(void) { return g_local_rank; }
int32_t nr_dist_local_size(void) { return g_local_size; }
double nr_dist_wtime(void)
{
   if (g_ready && !g_finalized) return MPI_Wtime();
   struct timespec ts;
   clock_gettime(CLOCK_MONOTONIC, &ts);
   return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- pending operations ------------------------------------------------------------------ */

enum { MAX_PENDING = 256 };

typedef struct {
   int used, phase;          /* see finish_phase */
   int32_t algo, op, dtype;
   double scale, started;
   void *data;               /* the tensor's elements (contiguous) */
   int64_t n, chunk;         /* elements; per-rank chunk (ordered) */
   MPI_Datatype type;
   MPI_Request req;
   void *send, *recv, *acc;  /* ordered scratch (acc: double sums), grow-only per slot */
   size_t send_cap, recv_cap, acc_cap;
   void *token;              /* NCCL in-flight operation */
   char what[96];
} pending;

static pending g_ops[MAX_PENDING];

static nr_status grow(void **buf, size_t *cap, size_t bytes)
{
   if (*cap >= bytes) return NR_OK;
   void *p = realloc(*buf, bytes);
   if (!p) return NR_FAIL(NR_E_OOM, "cannot allocate %zu bytes of reduction scratch", bytes);
   *buf = p;
   *cap = bytes;
   return NR_OK;
}

static MPI_Op mpi_op(int32_t op) { return op == NR_DIST_MAX ? MPI_MAX : op == NR_DIST_MIN ? MPI_MIN : MPI_SUM; }

/* Rank-order reduction of the chunk this rank owns, into send[rank * chunk ...]: element j is
 * ((x0[j] + x1[j]) + x2[j]) + ... in double (f32) or int64, ranks streamed one after another. */
static nr_status reduce_chunk(pending *p)
{
   int64_t c = p->chunk;
   if (p->dtype == NR_F32) {
      NR_TRY(grow(&p->acc, &p->acc_cap, (size_t)c * sizeof(double)));
      double *acc = p->acc;
      const float *in = p->recv;
      for (int64_t j = 0; j < c; j++) acc[j] = in[j];
      for (int r = 1; r < g_size; r++) {
         const float *x = in + (int64_t)r * c;
         if (p->op == NR_DIST_SUM)
            for (int64_t j = 0; j < c; j++) acc[j] += x[j];
         else if (p->op == NR_DIST_MAX)
            for (int64_t j = 0; j < c; j++) acc[j] = x[j] > acc[j] ? x[j] : acc[j];
         else
            for (int64_t j = 0; j < c; j++) acc[j] = x[j] < acc[j] ? x[j] : acc[j];
      }
      float *out = (float *)p->send + (int64_t)g_rank * c;
      double scale = p->op == NR_DIST_SUM ? p->scale : 1.0;
      for (int64_t j = 0; j < c; j++) out[j] = (float)(acc[j] * scale);
   } else {
      const int64_t *in = p->recv;
      int64_t *out = (int64_t *)p->send + (int64_t)g_rank * c;
      for (int64_t j = 0; j < c; j++) out[j] = in[j];
      for (int r = 1; r < g_size; r++) {
         const int64_t *x = in + (int64_t)r * c;
         for (int64_t j = 0; j < c; j++) {
            if (p->op == NR_DIST_SUM) out[j] += x[j];
            else if (p->op == NR_DIST_MAX) out[j] = x[j] > out[j] ? x[j] : out[j];
            else out[j] = x[j] < out[j] ? x[j] : out[j];
         }
      }
   }
   return NR_OK;
}

static void scale_in_place(pending *p)
{
   if (p->dtype != NR_F32 || p->op != NR_DIST_SUM || p->scale == 1.0) return;
   float *x = p->data;
   float s = (float)p->scale;
   for (int64_t i = 0; i < p->n; i++) x[i] *= s;
}

/* Phases of an operation: 1 = exchange in flight (all-to-all, or MPI's allreduce); 3 = the
 * all-to-all finished, the local reduction and the all-gather are still to start; 2 = all-gather
 * in flight; 0 = the result is in the tensor. Only nr_dist_wait moves 3 -> 2: every rank calls it
 * in the same order, so every rank starts the all-gathers in the same order (MPI matches
 * collectives by the order they start; nr_dist_test, called at times that differ between ranks,
 * only progresses transfers). */
static nr_status finish_phase(pending *p)
{
   size_t es = p->dtype == NR_F32 ? 4 : 8;
   if (p->phase == 1 && p->algo == NR_DIST_MPI) {
      scale_in_place(p);
      p->phase = 0;
   } else if (p->phase == 1) {
      p->phase = 3;
   } else if (p->phase == 2) {
      memcpy(p->data, p->send, (size_t)p->n * es);
      p->phase = 0;
   }
   return NR_OK;
}

static nr_status start_gather(pending *p)
{
   NR_TRY(reduce_chunk(p));
   p->phase = 2;
   MPI_TRY(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, p->send, (int)p->chunk, p->type, g_world, &p->req),
           "MPI_Iallgather");
   return NR_OK;
}

static nr_status start_op(pending *p, nr_tensor *t, int32_t op, int32_t algo, double scale)
{
   char d[256];
   p->algo = algo;
   p->op = op;
   p->dtype = t->dtype;
   p->scale = scale;
   p->data = t->data;
   p->n = nr_tensor_numel(t);
   p->started = MPI_Wtime();
   p->token = NULL;
   snprintf(p->what, sizeof p->what, "allreduce of %s", nr_tensor_describe(t, d, sizeof d));
   if (t->device == NR_CUDA) {
      if (algo != NR_DIST_NCCL)
         return NR_FAIL(NR_E_ARG, "t: %s is on a GPU; GPU tensors are reduced with NR_DIST_NCCL (stage through the host for the ordered algorithm)", d);
      NR_TRY(nr_dist_nccl_start(t, op, scale, &p->token));
      p->phase = 1;
      return NR_OK;
   }
   if (algo == NR_DIST_NCCL) return NR_FAIL(NR_E_ARG, "t: %s is on the CPU; NR_DIST_NCCL reduces GPU tensors", d);
   if (algo != NR_DIST_ORDERED && algo != NR_DIST_MPI) return NR_FAIL(NR_E_ARG, "unknown algorithm %d", algo);
   p->type = t->dtype == NR_F32 ? MPI_FLOAT : MPI_INT64_T;
   size_t es = t->dtype == NR_F32 ? 4 : 8;
   if (algo == NR_DIST_MPI) {
      if (p->n > INT_MAX) return NR_FAIL(NR_E_ARG, "t: %s has more than 2^31-1 elements; split it into buckets", d);
      MPI_TRY(MPI_Iallreduce(MPI_IN_PLACE, p->data, (int)p->n, p->type, mpi_op(op), g_world, &p->req), "MPI_Iallreduce");
      p->phase = 1;
      return NR_OK;
   }
   p->chunk = (p->n + g_size - 1) / g_size;
   if (p->chunk == 0) p->chunk = 1;
   if (p->chunk > INT_MAX) return NR_FAIL(NR_E_ARG, "t: %s is too large for one bucket; split it", d);
   size_t total = (size_t)p->chunk * (size_t)g_size * es;
   NR_TRY(grow(&p->send, &p->send_cap, total));
   NR_TRY(grow(&p->recv, &p->recv_cap, total));
   memcpy(p->send, p->data, (size_t)p->n * es);
   memset((char *)p->send + (size_t)p->n * es, 0, total - (size_t)p->n * es);
   MPI_TRY(MPI_Ialltoall(p->send, (int)p->chunk, p->type, p->recv, (int)p->chunk, p->type, g_world, &p->req),
           "MPI_Ialltoall");
   p->phase = 1;
   return NR_OK;
}

static nr_status check_reduce_args(nr_tensor *t, int32_t op, double scale)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   NR_CHECK_CONTIG("t", t);
   if (t->dtype != NR_F32 && t->dtype != NR_I64) {
      char d[256];
      return NR_FAIL(NR_E_ARG, "t: %s; allreduce takes f32 or int64 tensors", nr_tensor_describe(t, d, sizeof d));
   }
   if (op < NR_DIST_SUM || op > NR_DIST_MIN) return NR_FAIL(NR_E_ARG, "op: unknown reduction %d", op);
   if (t->dtype == NR_I64 && scale != 1.0) return NR_FAIL(NR_E_ARG, "scale: int64 tensors are reduced with scale 1, got %g", scale);
   return NR_OK;
}

nr_status nr_dist_allreduce_start(nr_tensor *t, int32_t op, int32_t algo, double scale, int32_t *handle)
{
   NR_TRY(need_ready(__func__));
   NR_TRY(check_reduce_args(t, op, scale));
   if (!handle) return NR_FAIL(NR_E_ARG, "handle: NULL");
   for (int i = 0; i < MAX_PENDING; i++) {
      if (!g_ops[i].used) {
         pending *p = &g_ops[i];
         p->used = 1;
         nr_status st = start_op(p, t, op, algo, scale);
         if (st != NR_OK) {
            p->used = 0;
            return st;
         }
         *handle = i + 1;
         return NR_OK;
      }
   }
   return NR_FAIL(NR_E_ARG, "more than %d reductions in flight; wait for some first", MAX_PENDING);
}

static nr_status get_op(const char *func, int32_t handle, pending **out)
{
   if (handle < 1 || handle > MAX_PENDING || !g_ops[handle - 1].used)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "handle %d is not a reduction in flight", handle);
   *out = &g_ops[handle - 1];
   return NR_OK;
}

nr_status nr_dist_test(int32_t handle, int32_t *done)
{
   pending *p = NULL;
   NR_TRY(get_op(__func__, handle, &p));
   *done = 0;
   if (p->token) return nr_dist_nccl_test(p->token, done);
   if (p->phase == 1 || p->phase == 2) {
      int flag = 0;
      MPI_TRY(MPI_Test(&p->req, &flag, MPI_STATUS_IGNORE), p->what);
      if (flag) NR_TRY(finish_phase(p));
   }
   *done = p->phase == 0;
   return NR_OK;
}

nr_status nr_dist_wait(int32_t handle)
{
   pending *p = NULL;
   NR_TRY(get_op(__func__, handle, &p));
   nr_status st = NR_OK;
   if (p->token) {
      st = nr_dist_nccl_wait(p->token, p->what);
      nr_dist_nccl_release(p->token);
      p->token = NULL;
   } else {
      while (p->phase != 0 && st == NR_OK) {
         if (p->phase == 3) {
            st = start_gather(p);
         } else {
            st = wait_request(&p->req, p->what, p->started);
            if (st == NR_OK) st = finish_phase(p);
         }
      }
   }
   if (st == NR_OK) p->used = 0; /* on failure the request is still in flight: the slot stays taken */
   return st;
}

nr_status nr_dist_allreduce(nr_tensor *t, int32_t op, int32_t algo, double scale)
{
   int32_t h = 0;
   NR_TRY(nr_dist_allreduce_start(t, op, algo, scale, &h));
   return nr_dist_wait(h);
}

/* ---- other collectives ------------------------------------------------------------------- */

nr_status nr_dist_barrier(void)
{
   NR_TRY(need_ready(__func__));
   MPI_Request req;
   MPI_TRY(MPI_Ibarrier(g_world, &req), "MPI_Ibarrier");
   return wait_request(&req, "barrier", MPI_Wtime());
}

nr_status nr_dist_broadcast_bytes(void *buf, int64_t len, int32_t root)
{
   NR_TRY(need_ready(__func__));
   if (root < 0 || root >= g_size) return NR_FAIL(NR_E_ARG, "root %d outside 0..%d", root, g_size - 1);
   if (len < 0 || (len > 0 && !buf)) return NR_FAIL(NR_E_ARG, "bad buffer (%lld bytes)", (long long)len);
   char what[96];
   snprintf(what, sizeof what, "broadcast of %lld bytes from rank %d", (long long)len, root);
   double started = MPI_Wtime();
   const int64_t piece = (int64_t)1 << 30;
   for (int64_t off = 0; off < len; off += piece) {
      int64_t k = len - off < piece ? len - off : piece;
      MPI_Request req;
      MPI_TRY(MPI_Ibcast((char *)buf + off, (int)k, MPI_BYTE, root, g_world, &req), "MPI_Ibcast");
      NR_TRY(wait_request(&req, what, started));
   }
   return NR_OK;
}

nr_status nr_dist_broadcast(nr_tensor *t, int32_t root)
{
   NR_TRY(need_ready(__func__));
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   NR_CHECK_CONTIG("t", t);
   if (t->device == NR_CUDA) return nr_dist_nccl_broadcast(t, root);
   return nr_dist_broadcast_bytes(t->data, nr_tensor_numel(t) * nr_dtype_size(t->dtype), root);
}

nr_status nr_dist_allgather_f64(const double *in, int32_t n, double *out)
{
   NR_TRY(need_ready(__func__));
   if (n < 0 || (n > 0 && (!in || !out))) return NR_FAIL(NR_E_ARG, "bad buffers (n = %d)", n);
   MPI_Request req;
   MPI_TRY(MPI_Iallgather(in, n, MPI_DOUBLE, out, n, MPI_DOUBLE, g_world, &req), "MPI_Iallgather");
   return wait_request(&req, "allgather of doubles", MPI_Wtime());
}

nr_status nr_dist_fingerprint(const nr_tensor *t, uint64_t *hash)
{
   NR_CHECK_T("t", t, -1, NR_CPU, -1, NULL);
   if (!hash) return NR_FAIL(NR_E_ARG, "hash: NULL");
   int es = nr_dtype_size(t->dtype);
   int64_t n = nr_tensor_numel(t);
   uint64_t h = 1469598103934665603ULL ^ (uint64_t)n;
   const unsigned char *base = t->data;
   int contig = nr_tensor_is_contiguous(t);
   for (int64_t i = 0; i < n; i++) {
      const unsigned char *e = base + (contig ? i : nr_linear_offset(t, i)) * es;
      uint64_t v = 0;
      memcpy(&v, e, (size_t)es);
      h ^= v;
      h *= 1099511628211ULL;
      h ^= h >> 29;
   }
   *hash = h;
   return NR_OK;
}

/* ---- teardown ---------------------------------------------------------------------------- */

nr_status nr_dist_finalize(void)
{
   if (!g_ready || g_finalized) return NR_OK;
   nr_dist_nccl_shutdown();
   g_finalized = 1;
   for (int i = 0; i < MAX_PENDING; i++) {
      free(g_ops[i].send);
      free(g_ops[i].recv);
      free(g_ops[i].acc);
      memset(&g_ops[i], 0, sizeof g_ops[i]);
   }
   if (g_local != MPI_COMM_NULL) MPI_Comm_free(&g_local);
   if (g_world != MPI_COMM_NULL) MPI_Comm_free(&g_world);
   if (g_owns_mpi) {
      int rc = MPI_Finalize();
      if (rc != MPI_SUCCESS) return NR_FAIL(NR_E_INTERNAL, "MPI_Finalize failed (code %d)", rc);
   }
   return NR_OK;
}

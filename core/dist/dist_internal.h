/* dist_internal.h — what core/dist/dist.c (MPI) and core/dist/nccl.c (NCCL) share inside
 * libnr_dist; not part of the FFI contract (the public declarations are the "distributed"
 * section of core/nr.h).
 *
 * Invariants: every blocking wait in libnr_dist goes through a polling loop bounded by
 * nr_dist_timeout() seconds, so a rank whose peer is stuck returns an error instead of hanging;
 * the NCCL side is bootstrapped over the MPI communicator (ncclGetUniqueId on rank 0, MPI_Bcast).
 */
#ifndef NR_DIST_INTERNAL_H
#define NR_DIST_INTERNAL_H

#include "internal.h"

#include <mpi.h>

/* The job's communicator (a duplicate of MPI_COMM_WORLD whose errors return codes). */
MPI_Comm nr_dist_comm(void);
/* Seconds a collective may wait before it fails (<= 0: forever). */
double nr_dist_timeout(void);
/* Sleeps or yields according to how long a wait has lasted (keeps oversubscribed cores free). */
void nr_dist_backoff(double waited_s, int64_t polls);
/* Formats an MPI error code as "MPI_ERR_...: text" into buf. */
const char *nr_dist_mpi_error(int code, char *buf, int n);

/* NCCL side (core/dist/nccl.c). Without NCCL compiled in, each returns NR_E_DEVICE with a
 * message saying how to build it. Tokens are in-flight operations on the communication stream. */
int32_t nr_dist_nccl_ready(void);
nr_status nr_dist_nccl_start(nr_tensor *t, int32_t op, double scale, void **token);
nr_status nr_dist_nccl_test(void *token, int32_t *done);
nr_status nr_dist_nccl_wait(void *token, const char *what);
void nr_dist_nccl_release(void *token);
nr_status nr_dist_nccl_broadcast(nr_tensor *t, int32_t root);
void nr_dist_nccl_shutdown(void);

#endif

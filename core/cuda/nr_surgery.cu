/* nr_surgery.cu — CUDA twin of nr_surgery_place (core/nr_ops.c): builds a resized tensor of a
 * Neural Rejuvenation surgery in one pass on the GPU.
 *
 * What it is: the argument checks and inverse maps come from nr_place_plan_build (host, shared
 * with the CPU path); the maps are copied to scratch slot 3 and one grid-stride kernel writes
 * every element of dst from the gathered block a, the new block b (given, or drawn from the same
 * counter-based normal generator as the CPU, nr_place_normal), or the fill value.
 * What it is not: index_select / index_copy (tensor_kernels.cu).
 * Invariants: the index tensors are CPU tensors (as on the CPU path); a, b and dst on one GPU;
 * work goes to that GPU's compute stream; nothing synchronises (the host maps are staged by
 * cudaMemcpyAsync from pageable memory, which copies them before returning).
 */
#include "cuda_common.h"
#include "nr_place.h"

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

namespace {

__global__ void k_place(float *dst, float fill, const float *a, int64_t arow, const float *b, int64_t brow,
                        int rnd, float b_std, uint64_t b_seed, const int64_t *inv, int64_t d0, int64_t d1,
                        int64_t inner, int64_t n)
{
   const int64_t *iar = inv, *ibr = inv + d0, *iac = inv + 2 * d0, *ibc = iac + d1;
   for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
      int64_t k = i % inner, rc = i / inner;
      int64_t c = rc % d1, r = rc / d1;
      int64_t x = iar[r], xc = iac[c];
      float v = fill;
      if (x >= 0 && xc >= 0) v = a[x * arow + xc * inner + k];
      else {
         int64_t y = ibr[r], yc = ibc[c];
         if (y >= 0 && yc >= 0) {
            int64_t e = y * brow + yc * inner + k;
            v = rnd ? b_std * nr_place_normal(b_seed, e) : b[e];
         }
      }
      dst[i] = v;
   }
}

/* Checks job j (dst on device_index when >= 0) and builds its plan; the caller frees it. */
nr_status plan_job(const char *func, const nr_place_job *j, int32_t device_index, nr_place_plan *p)
{
   NR_TRY(nr_check_tensor(func, "dst", j->dst, NR_F32, NR_CUDA, -1, NULL));
   if (device_index >= 0) NR_TRY(nr_cuda_check_on(func, "dst", j->dst, device_index));
   return nr_place_plan_build(func, p, j->dst, j->a, j->a_rows, j->a_cols, j->b, j->b_rows, j->b_cols, j->b_std);
}

/* Writes dst of a planned job: the maps to scratch slot 3, then one kernel. */
nr_status launch_job(const char *func, const nr_place_job *j, const nr_place_plan *p)
{
   int64_t n = p->d0 * p->d1 * p->inner;
   if (n == 0) return NR_OK;
   nr_cuda_ctx *ctx;
   NR_TRY(nr_cuda_ctx_get(j->dst->device_index, &ctx));
   void *scr = NULL;
   int64_t bytes = (2 * p->d0 + 2 * p->d1) * (int64_t)sizeof(int64_t);
   NR_TRY(nr_cuda_scratch(ctx, 3, bytes, &scr));
   /* staged: p->inv may be freed once this returns */
   NR_TRY(nr_cuda_upload(ctx, scr, p->inv, bytes));
   cudaError_t e;
   int64_t blocks = (n + 255) / 256;
   if (blocks > 65535LL * 16) blocks = 65535LL * 16;
   k_place<<<(unsigned)blocks, 256, 0, ctx->stream>>>(
       (float *)j->dst->data, j->fill, j->a ? (const float *)j->a->data : NULL, p->a_s1 * p->inner,
       j->b ? (const float *)j->b->data : NULL, p->b_l1 * p->inner, p->b_random, j->b_std, j->b_seed,
       (const int64_t *)scr, p->d0, p->d1, p->inner, n);
   e = cudaGetLastError();
   if (e != cudaSuccess) return nr_cuda_fail_rt(e, func, __FILE__, __LINE__, "kernel for %s", NR_DESC(j->dst));
   return NR_OK;
}

} // namespace

extern "C" {

nr_status nr_cuda_surgery_place(nr_tensor *dst, float fill, const nr_tensor *a, const nr_tensor *a_rows,
                                const nr_tensor *a_cols, const nr_tensor *b, const nr_tensor *b_rows,
                                const nr_tensor *b_cols, float b_std, uint64_t b_seed)
{
   nr_place_job j = {dst, a, a_rows, a_cols, b, b_rows, b_cols, fill, b_std, b_seed};
   nr_place_plan p;
   NR_TRY(plan_job("nr_surgery_place", &j, -1, &p));
   nr_status st = launch_job("nr_surgery_place", &j, &p);
   nr_place_plan_free(&p);
   return st;
}

/* All or nothing, as the CPU: every job is checked and planned before any dst is written. */
nr_status nr_cuda_surgery_place_many(const nr_place_job *jobs, int64_t n)
{
   if (n < 0 || (n > 0 && !jobs)) return NR_FAIL(NR_E_ARG, "jobs: expected an array of n >= 0 jobs");
   if (n == 0) return NR_OK;
   nr_place_plan *plans = (nr_place_plan *)calloc((size_t)n, sizeof *plans);
   if (!plans) return NR_FAIL(NR_E_OOM, "out of host memory for %lld surgery plans", (long long)n);
   char where[96];
   int64_t built = 0;
   nr_status st = NR_OK;
   for (; built < n && st == NR_OK; built++) {
      snprintf(where, sizeof where, "nr_surgery_place_many (job %lld)", (long long)built);
      st = plan_job(where, &jobs[built], jobs[0].dst ? jobs[0].dst->device_index : -1, &plans[built]);
      if (st != NR_OK) break;
   }
   for (int64_t i = 0; i < n && st == NR_OK; i++) {
      snprintf(where, sizeof where, "nr_surgery_place_many (job %lld)", (long long)i);
      st = launch_job(where, &jobs[i], &plans[i]);
   }
   for (int64_t i = 0; i < built; i++) nr_place_plan_free(&plans[i]);
   free(plans);
   return st;
}

} // extern "C"

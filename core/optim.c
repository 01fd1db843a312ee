/* optim.c — fused optimizer steps on the CPU (the CUDA backend mirrors them in core/cuda/).
 *
 * What it is: nr_sgd_step, one pass over a parameter that applies weight decay, momentum
 * (dampening 0, optionally Nesterov) and the update, with PyTorch's torch.optim.SGD semantics;
 * nr_sgd_step_many, the same for a list of parameters in one call (one kernel launch on CUDA).
 * What it is not: parameter groups, schedules or state bookkeeping (lua/nr/optim does those).
 * Invariants: elementwise and in float32 in the same order as PyTorch, so results do not depend
 * on the thread count; the first step's "buf = grad" is obtained from a zero-initialised buffer
 * (momentum * 0 + g == g exactly), so C needs no first-step flag.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static nr_status check_pair(const char *func, const char *name, const nr_tensor *t, const nr_tensor *param)
{
   NR_TRY(nr_check_tensor(func, name, t, NR_F32, param->device, param->ndim, param->shape));
   NR_TRY(nr_check_contiguous(func, name, t));
   return nr_check_same_device(func, param, t);
}

/* The checks of one step, on any device (func names the caller in messages). */
static nr_status sgd_check(const char *func, const nr_tensor *param, const nr_tensor *grad, const nr_tensor *buf,
                           float momentum, float weight_decay, int32_t nesterov)
{
   if (!param) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "param: NULL tensor");
   NR_TRY(nr_check_tensor(func, "param", param, NR_F32, -1, -1, NULL));
   NR_TRY(nr_check_contiguous(func, "param", param));
   if (!grad) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "grad: NULL tensor");
   NR_TRY(check_pair(func, "grad", grad, param));
   if (momentum != 0.0f) {
      if (!buf)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "momentum_buf: NULL tensor but momentum = %g",
                           (double)momentum);
      NR_TRY(check_pair(func, "momentum_buf", buf, param));
   }
   if (momentum < 0.0f)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "momentum must be >= 0, got %g", (double)momentum);
   if (weight_decay < 0.0f)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "weight_decay must be >= 0, got %g", (double)weight_decay);
   if (nesterov && momentum <= 0.0f)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "nesterov needs momentum > 0");
   return NR_OK;
}

/* The update of one parameter of n elements on the CPU (b NULL when momentum == 0). */
static void sgd_apply(float *restrict p, const float *restrict g, float *restrict b, int64_t n, float lr, float mu,
                      float wd, int32_t nesterov)
{
   const bool par = nr_parallel_worth(n, 4);
   if (!b) {
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; i++) {
         float d = g[i];
         if (wd != 0.0f) d = d + wd * p[i];
         p[i] = p[i] - lr * d;
      }
   } else if (nesterov) {
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; i++) {
         float d = g[i];
         if (wd != 0.0f) d = d + wd * p[i];
         float v = mu * b[i] + d;
         b[i] = v;
         d = d + mu * v;
         p[i] = p[i] - lr * d;
      }
   } else {
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; i++) {
         float d = g[i];
         if (wd != 0.0f) d = d + wd * p[i];
         float v = mu * b[i] + d;
         b[i] = v;
         p[i] = p[i] - lr * v;
      }
   }
}

nr_status nr_sgd_step(nr_tensor *param, const nr_tensor *grad, nr_tensor *momentum_buf, float lr,
                      float momentum, float weight_decay, int32_t nesterov)
{
   NR_TRY(sgd_check(__func__, param, grad, momentum_buf, momentum, weight_decay, nesterov));
   NR_ON_CUDA(param, nr_cuda_sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, nesterov));
   sgd_apply(param->data, grad->data, momentum != 0.0f ? momentum_buf->data : NULL, nr_tensor_numel(param), lr,
             momentum, weight_decay, nesterov);
   return NR_OK;
}

static nr_status check_many(const char *func, const nr_sgd_job *jobs, int64_t n, float momentum, float weight_decay,
                            int32_t nesterov)
{
   if (n < 0 || (n > 0 && !jobs))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "jobs: expected an array of n >= 0 jobs, got n = %lld",
                        (long long)n);
   char where[64];
   for (int64_t k = 0; k < n; k++) {
      snprintf(where, sizeof where, "%s (job %lld)", func, (long long)k);
      const nr_sgd_job *j = &jobs[k];
      NR_TRY(sgd_check(where, j->param, j->grad, j->momentum_buf, momentum, weight_decay, nesterov));
      if (k > 0) NR_TRY(nr_check_same_device(where, jobs[0].param, j->param));
   }
   return NR_OK;
}

nr_status nr_sgd_check_many(const nr_sgd_job *jobs, int64_t n, float momentum, float weight_decay, int32_t nesterov)
{
   return check_many(__func__, jobs, n, momentum, weight_decay, nesterov);
}

nr_status nr_sgd_step_many(const nr_sgd_job *jobs, int64_t n, float lr, float momentum, float weight_decay,
                           int32_t nesterov)
{
   NR_TRY(check_many(__func__, jobs, n, momentum, weight_decay, nesterov)); /* all before any is updated */
   if (n == 0) return NR_OK;
   NR_ON_CUDA(jobs[0].param, nr_cuda_sgd_step_many(jobs, n, lr, momentum, weight_decay, nesterov));
   for (int64_t k = 0; k < n; k++)
      sgd_apply(jobs[k].param->data, jobs[k].grad->data, momentum != 0.0f ? jobs[k].momentum_buf->data : NULL,
                nr_tensor_numel(jobs[k].param), lr, momentum, weight_decay, nesterov);
   return NR_OK;
}

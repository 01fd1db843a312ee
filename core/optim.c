/* optim.c — fused optimizer steps on the CPU (the CUDA backend mirrors them in core/cuda/).
 *
 * What it is: nr_sgd_step, one pass over a parameter that applies weight decay, momentum
 * (dampening 0, optionally Nesterov) and the update, with PyTorch's torch.optim.SGD semantics.
 * What it is not: parameter groups, schedules or state bookkeeping (lua/nr/optim does those).
 * Invariants: elementwise and in float32 in the same order as PyTorch, so results do not depend
 * on the thread count; the first step's "buf = grad" is obtained from a zero-initialised buffer
 * (momentum * 0 + g == g exactly), so C needs no first-step flag.
 */
#include "internal.h"

#include <string.h>

static nr_status check_pair(const char *func, const char *name, const nr_tensor *t, const nr_tensor *param)
{
   NR_TRY(nr_check_tensor(func, name, t, NR_F32, param->device, param->ndim, param->shape));
   NR_TRY(nr_check_contiguous(func, name, t));
   return NR_OK;
}

nr_status nr_sgd_step(nr_tensor *param, const nr_tensor *grad, nr_tensor *momentum_buf, float lr,
                      float momentum, float weight_decay, int32_t nesterov)
{
   if (!param) return NR_FAIL(NR_E_ARG, "param: NULL tensor");
   NR_ON_CUDA(param, nr_cuda_sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, nesterov));
   NR_CHECK_T("param", param, NR_F32, NR_CPU, -1, NULL);
   NR_CHECK_CONTIG("param", param);
   if (!grad) return NR_FAIL(NR_E_ARG, "grad: NULL tensor");
   NR_TRY(check_pair(__func__, "grad", grad, param));
   if (momentum != 0.0f) {
      if (!momentum_buf) return NR_FAIL(NR_E_ARG, "momentum_buf: NULL tensor but momentum = %g", (double)momentum);
      NR_TRY(check_pair(__func__, "momentum_buf", momentum_buf, param));
   }
   if (momentum < 0.0f) return NR_FAIL(NR_E_ARG, "momentum must be >= 0, got %g", (double)momentum);
   if (weight_decay < 0.0f) return NR_FAIL(NR_E_ARG, "weight_decay must be >= 0, got %g", (double)weight_decay);
   if (nesterov && momentum <= 0.0f) return NR_FAIL(NR_E_ARG, "nesterov needs momentum > 0");

   const int64_t n = nr_tensor_numel(param);
   float *restrict p = param->data;
   const float *restrict g = grad->data;
   float *restrict b = momentum != 0.0f ? momentum_buf->data : NULL;
   const float wd = weight_decay, mu = momentum;
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
   return NR_OK;
}

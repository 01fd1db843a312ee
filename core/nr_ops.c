/* nr_ops.c — Neural Rejuvenation primitives: liveliness masks from BN scales (γ) and the L1
 * subgradient on γ. Called every training step by lua/nr/rejuvenate, so they are O(C) loops with
 * no allocation.
 *
 * What it is: the CPU reference of the per-step NR hot paths (paper section 3.1). What it is not:
 * mask propagation through the model graph or the surgery (Lua, lua/nr/rejuvenate/), which run
 * once per check / rejuvenation on tables of a few thousand channels.
 * Invariants: a channel c is live iff |γ_c| >= threshold_rel * max|γ| and max|γ| >= abs_min; the
 * L1 step adds λ·sign(γ) with sign(0) = 0 (as torch.sign), so an exact zero is not pushed.
 */
#include "internal.h"

#include <math.h>

nr_status nr_bn_live_mask(const nr_tensor *gamma, nr_tensor *mask, float threshold_rel, float abs_min,
                          int64_t *live)
{
   NR_ON_CUDA(gamma, nr_cuda_bn_live_mask(gamma, mask, threshold_rel, abs_min, live));
   NR_CHECK_T("gamma", gamma, NR_F32, NR_CPU, 1, NULL);
   int64_t c = gamma->shape[0];
   int64_t mshape[1] = {c};
   NR_CHECK_T("mask", mask, NR_U8, NR_CPU, 1, mshape);
   if (!(threshold_rel >= 0.0f) || !(abs_min >= 0.0f))
      return NR_FAIL(NR_E_ARG, "threshold_rel (%g) and abs_min (%g) must be >= 0", (double)threshold_rel,
                     (double)abs_min);
   const float *g = (const float *)gamma->data;
   uint8_t *m = (uint8_t *)mask->data;
   int64_t gs = gamma->stride[0], ms = mask->stride[0];
   float gmax = 0.0f;
   for (int64_t i = 0; i < c; i++) {
      float a = fabsf(g[i * gs]);
      if (a > gmax) gmax = a;
   }
   int64_t n = 0;
   if (c == 0 || gmax < abs_min || !isfinite(gmax)) {
      for (int64_t i = 0; i < c; i++) m[i * ms] = 0;
   } else {
      float thr = threshold_rel * gmax;
      for (int64_t i = 0; i < c; i++) {
         uint8_t on = fabsf(g[i * gs]) >= thr;
         m[i * ms] = on;
         n += on;
      }
   }
   if (live) *live = n;
   return NR_OK;
}

nr_status nr_l1_sign_add(const nr_tensor *gamma, nr_tensor *grad, float lambda)
{
   NR_ON_CUDA(gamma, nr_cuda_l1_sign_add(gamma, grad, lambda));
   NR_CHECK_T("gamma", gamma, NR_F32, NR_CPU, 1, NULL);
   int64_t gshape[1] = {gamma->shape[0]};
   NR_CHECK_T("grad", grad, NR_F32, NR_CPU, 1, gshape);
   if (lambda == 0.0f) return NR_OK;
   const float *g = (const float *)gamma->data;
   float *d = (float *)grad->data;
   int64_t gs = gamma->stride[0], ds = grad->stride[0];
   for (int64_t i = 0; i < gshape[0]; i++) {
      float v = g[i * gs];
      d[i * ds] += v > 0.0f ? lambda : (v < 0.0f ? -lambda : 0.0f);
   }
   return NR_OK;
}

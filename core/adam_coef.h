/* adam_coef.h — the per-parameter scalars of one Adam / AdamW step, shared by the CPU update
 * (core/optim.c) and the CUDA one (core/cuda/nn_kernels.cu) so both compute them alike.
 * As PyTorch: the bias corrections and step size in double (Python floats), then rounded to the
 * tensor's float32 where they meet the tensors. */
#ifndef NR_ADAM_COEF_H
#define NR_ADAM_COEF_H

#include <math.h>
#include <stdint.h>

typedef struct nr_adam_coef {
   float neg_step_size;   /* -lr / (1 - beta1^step) */
   float bc2_sqrt;        /* sqrt(1 - beta2^step) */
   float one_minus_beta1, one_minus_beta2;
   float decay;           /* AdamW's factor on the parameter: 1 - lr * weight_decay (1 for Adam) */
} nr_adam_coef;

static inline nr_adam_coef nr_adam_coef_of(int64_t step, float lr, float beta1, float beta2, float weight_decay,
                                           int32_t decoupled)
{
   nr_adam_coef c;
   double bc1 = 1.0 - pow((double)beta1, (double)step), bc2 = 1.0 - pow((double)beta2, (double)step);
   c.neg_step_size = (float)(-((double)lr / bc1));
   c.bc2_sqrt = (float)sqrt(bc2);
   c.one_minus_beta1 = (float)(1.0 - (double)beta1);
   c.one_minus_beta2 = (float)(1.0 - (double)beta2);
   c.decay = decoupled ? (float)(1.0 - (double)lr * (double)weight_decay) : 1.0f;
   return c;
}

#endif

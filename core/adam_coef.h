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
   float beta1, beta2, one_minus_beta1, one_minus_beta2;
   float eps, l2;         /* l2: Adam's weight decay through the gradient (0 for AdamW) */
   float decay;           /* AdamW's factor on the parameter: 1 - lr * weight_decay (1 for Adam) */
} nr_adam_coef;

static inline nr_adam_coef nr_adam_coef_of(int64_t step, double lr, double beta1, double beta2, double eps,
                                           double weight_decay, int32_t decoupled)
{
   nr_adam_coef c;
   double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
   c.neg_step_size = (float)(-(lr / bc1));
   c.bc2_sqrt = (float)sqrt(bc2);
   c.beta1 = (float)beta1;
   c.beta2 = (float)beta2;
   c.one_minus_beta1 = (float)(1.0 - beta1);
   c.one_minus_beta2 = (float)(1.0 - beta2);
   c.eps = (float)eps;
   c.l2 = decoupled ? 0.0f : (float)weight_decay;
   c.decay = decoupled ? (float)(1.0 - lr * weight_decay) : 1.0f;
   return c;
}

#endif

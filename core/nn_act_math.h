/* nn_act_math.h — the elementwise activations of nr_activation_forward / _backward (NR_ACT_* in
 * core/nr.h), one float function each way, shared by the CPU loops (nn_act.c) and their CUDA
 * twins (cuda/nn_kernels.cu), so both devices compute the same formula in the same order.
 * The transcendental functions are NR_AM_EXP, _EXPM1, _TANH and _ERF: the math library's unless
 * the includer defines them first (nn_act.c: vec_math.h's, which its loops vectorize).
 * Formulas are PyTorch's (torch.nn.functional): GELU exact uses erf, GELU tanh its tanh form;
 * Hardswish x·relu6(x + 3)/6 and Hardsigmoid relu6(x + 3)/6 (computed as written: -inf gives
 * NaN and 3e38 inf, as PyTorch) with the derivatives of PyTorch's scalar (and CUDA) backward:
 * Hardswish x/3 + 1/2 on [-3, 3] (-0.5 at -3, 1.5 at 3), 0 below, 1 above; Hardsigmoid 1/6
 * strictly inside, 0 at the kinks. (PyTorch's vectorized CPU backward, taken for tensors of 8 or
 * more elements, gives 1 at 3 and NaN for a NaN: PyTorch differs from itself there.) ELU
 * alpha·(exp(x) - 1) for x <= 0. A NaN input gives a NaN output, and the gradient PyTorch's
 * scalar path gives: NaN (SiLU, GELU), dy (ELU, Hardswish) or 0 (Hardsigmoid).
 * `s` in the backward is what the kind saves: the forward output for tanh and ReLU6, the input
 * for the others (core/nr.h; lua/nr/nn/activation.lua's from_input). */
#ifndef NR_NN_ACT_MATH_H
#define NR_NN_ACT_MATH_H
#include <math.h>
#include <stdint.h>

#include "nr.h" /* NR_ACT_* */

#ifndef NR_AM_EXP
#define NR_AM_EXP expf
#define NR_AM_EXPM1 expm1f
#define NR_AM_TANH tanhf
#define NR_AM_ERF erff
#endif

#ifdef __CUDACC__
#define NR_ACT_FN __host__ __device__ static inline
#else
#define NR_ACT_FN static inline
#endif

/* the constants of the GELU forms: 1/sqrt(2), sqrt(2/pi), 2/sqrt(pi) * 1/sqrt(2) / 2 = 1/sqrt(2 pi) */
#define NR_ACT_SQRT1_2 0.70710678118654752f
#define NR_ACT_SQRT_2_PI 0.79788456080286536f
#define NR_ACT_INV_SQRT_2PI 0.39894228040143268f
#define NR_ACT_GELU_C 0.044715f

/* min(max(c, 0), 6), a NaN kept (neither test holds) */
NR_ACT_FN float nr_act_relu6(float c) { return c < 0.0f ? 0.0f : (c > 6.0f ? 6.0f : c); }

NR_ACT_FN float nr_act_sigmoid(float v) { return 1.0f / (1.0f + NR_AM_EXP(-v)); }

NR_ACT_FN float nr_act_forward(int32_t kind, float v, float alpha)
{
   switch (kind) {
   case NR_ACT_TANH: return NR_AM_TANH(v);
   case NR_ACT_RELU6: return nr_act_relu6(v);
   case NR_ACT_LEAKY_RELU: return v > 0.0f ? v : alpha * v;
   case NR_ACT_ELU: return v > 0.0f ? v : alpha * NR_AM_EXPM1(v);
   case NR_ACT_SILU: return v * nr_act_sigmoid(v);
   case NR_ACT_GELU: return 0.5f * v * (1.0f + NR_AM_ERF(v * NR_ACT_SQRT1_2));
   case NR_ACT_GELU_TANH: return 0.5f * v * (1.0f + NR_AM_TANH(NR_ACT_SQRT_2_PI * (v + NR_ACT_GELU_C * v * v * v)));
   case NR_ACT_HARDSWISH: return v * nr_act_relu6(v + 3.0f) / 6.0f; /* (-inf: NaN, as PyTorch) */
   default: return nr_act_relu6(v + 3.0f) / 6.0f; /* NR_ACT_HARDSIGMOID */
   }
}

/* dx from dy = d and the saved value s (output or input, see above) */
NR_ACT_FN float nr_act_backward(int32_t kind, float s, float d, float alpha)
{
   switch (kind) {
   case NR_ACT_TANH: return d * (1.0f - s * s);
   case NR_ACT_RELU6: return (s > 0.0f && s < 6.0f) ? d : 0.0f;
   case NR_ACT_LEAKY_RELU: return s > 0.0f ? d : alpha * d;
   case NR_ACT_ELU: return s <= 0.0f ? d * alpha * NR_AM_EXP(s) : d; /* NaN: d, as PyTorch */
   case NR_ACT_SILU: {
      const float sg = nr_act_sigmoid(s);
      return d * sg * (1.0f + s * (1.0f - sg));
   }
   case NR_ACT_GELU:
      return d * (0.5f * (1.0f + NR_AM_ERF(s * NR_ACT_SQRT1_2)) + s * NR_ACT_INV_SQRT_2PI * NR_AM_EXP(-0.5f * s * s));
   case NR_ACT_GELU_TANH: {
      const float s2 = s * s, t = NR_AM_TANH(NR_ACT_SQRT_2_PI * (s + NR_ACT_GELU_C * s2 * s));
      return d * (0.5f * (1.0f + t) + 0.5f * s * (1.0f - t * t) * NR_ACT_SQRT_2_PI * (1.0f + 3.0f * NR_ACT_GELU_C * s2));
   }
   case NR_ACT_HARDSWISH: return s < -3.0f ? 0.0f : (s <= 3.0f ? d * (s / 3.0f + 0.5f) : d);
   default: return (s > -3.0f && s < 3.0f) ? d / 6.0f : 0.0f; /* NR_ACT_HARDSIGMOID */
   }
}
#endif

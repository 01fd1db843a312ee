/* nn_rank.h — the order of logits for top-k accuracy, shared by the CPU metric (nn_loss.c) and its
 * CUDA twin (cuda/nn_kernels.cu): PyTorch's argmax / topk order, where NaN ranks above every
 * number (a model that outputs NaN scores as its argmax says, not as a hit) and ties go to the
 * lower class id. */
#ifndef NR_NN_RANK_H
#define NR_NN_RANK_H
#include <stdint.h>

#ifdef __CUDACC__
#define NR_RANK_FN __host__ __device__ static inline
#else
#define NR_RANK_FN static inline
#endif

/* Whether class j, logit v, ranks before the label y, logit sy. */
NR_RANK_FN int nr_ranks_before(float v, int64_t j, float sy, int64_t y)
{
   const int v_nan = v != v, y_nan = sy != sy;
   if (v_nan || y_nan) return v_nan && (!y_nan || j < y);
   return v > sy || (v == sy && j < y);
}

#endif

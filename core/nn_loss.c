/* nn_loss.c — softmax cross-entropy on the CPU, mean over the batch, with label smoothing
 * (nr_softmax_xent_* in core/nr.h; PyTorch's CrossEntropyLoss with reduction 'mean').
 * Invariants: labels are checked before anything is written, and a bad label is reported with
 * its value and position; softmax is computed stably (max subtracted) in float per row, the loss
 * is summed in double in row order, so results do not depend on the thread count; a loss term
 * weighted 0 by label_smoothing is skipped, so -inf logits (masks) give a finite loss.
 */
#include "nn_internal.h"
#include "nn_rank.h"

#include <math.h>

/* The range check of labels (N) int64 against k classes; errors are reported as func's. */
static nr_status class_ids(const char *func, const nr_tensor *labels, int64_t k)
{
   NR_ON_CUDA(labels, nr_cuda_check_class_ids(func, labels, k));
   const int64_t n = labels->shape[0], s = labels->stride[0];
   const int64_t *pl = labels->data;
   for (int64_t i = 0; i < n; i++)
      if (pl[i * s] < 0 || pl[i * s] >= k)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                           "labels[%lld] = %lld is outside 0..%lld (class ids are 0-based, %lld classes)", (long long)i,
                           (long long)pl[i * s], (long long)(k - 1), (long long)k);
   return NR_OK;
}

nr_status nr_check_class_ids(const nr_tensor *labels, int64_t num_classes)
{
   NR_CHECK_T("labels", labels, NR_I64, -1, 1, NULL);
   if (num_classes < 1) return NR_FAIL(NR_E_ARG, "num_classes must be at least 1, got %lld", (long long)num_classes);
   return class_ids(__func__, labels, num_classes);
}

/* logits: an activation (f32, or bf16 on CUDA); probs: always f32 (the loss is computed in f32).
 * The label range is checked here, before any dispatch, unless the caller vouches for it on a GPU. */
static nr_status xent_check(const char *func, const nr_tensor *logits_or_probs, const char *name, int32_t dtype,
                            const nr_tensor *labels, float ls, int32_t labels_checked)
{
   NR_TRY(nn_check(func, name, logits_or_probs, dtype, 2, NULL, NULL));
   int64_t ns[1] = {logits_or_probs->shape[0]};
   NR_TRY(nn_check(func, "labels", labels, NR_I64, 1, ns, logits_or_probs));
   if (!(ls >= 0.0f && ls <= 1.0f))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "label_smoothing must be in [0, 1], got %g", ls);
   if (logits_or_probs->shape[1] < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: need at least one class", name);
   if (labels_checked && labels->device != NR_CPU) return NR_OK;
   return class_ids(func, labels, logits_or_probs->shape[1]);
}

nr_status nr_softmax_xent_forward(const nr_tensor *logits, const nr_tensor *labels, nr_tensor *loss,
                                  nr_tensor *probs, float label_smoothing, int32_t labels_checked)
{
   NR_CHECK_T("logits", logits, NR_DTYPE_ACT, -1, 2, NULL);
   NR_CHECK_T("labels", labels, NR_I64, -1, 1, NULL);
   NR_TRY(xent_check(__func__, logits, "logits", NR_DTYPE_ACT, labels, label_smoothing, labels_checked));
   NN_CHECK("loss", loss, NR_F32, -1, NULL, logits);
   if (nr_tensor_numel(loss) != 1) return NR_FAIL(NR_E_ARG, "loss: expected one element, got %lld", (long long)nr_tensor_numel(loss));
   NN_CHECK("probs", probs, NR_F32, 2, logits->shape, logits);
   NR_ON_CUDA(logits, nr_cuda_softmax_xent_forward(logits, labels, loss, probs, label_smoothing));
   const int64_t n = logits->shape[0], k = logits->shape[1];
   const float *px = logits->data;
   const int64_t *pl = labels->data;
   float *pp = probs->data;
   double total = 0;
   const double ls = label_smoothing;
#pragma omp parallel for reduction(+ : total) schedule(static) if (nr_parallel_worth(n, 4 * k))
   for (int64_t i = 0; i < n; i++) {
      const float *x = px + i * k;
      float *p = pp + i * k;
      float mx = x[0];
      for (int64_t j = 1; j < k; j++) mx = x[j] > mx ? x[j] : mx;
      double se = 0, sx = 0; /* sum of exp(x - mx), sum of (x - mx) (in double: finite for any finite x) */
      for (int64_t j = 0; j < k; j++) {
         float e = expf(x[j] - mx);
         p[j] = e;
         se += e;
         sx += (double)x[j] - mx;
      }
      const double lse = log(se); /* log-sum-exp of (x - mx) */
      const float inv = (float)(1.0 / se);
      for (int64_t j = 0; j < k; j++) p[j] *= inv;
      /* -log p_label = lse - (x_label - mx); mean_k -log p_k = lse - sx / k */
      const double nll = lse - ((double)x[pl[i]] - mx);
      const double smooth = lse - sx / (double)k;
      /* a term whose weight is 0 is left out: smooth is +inf when a logit is -inf (a mask), and
       * 0 * inf would make a finite loss NaN (the CUDA kernel k_xent_f does the same) */
      total += (ls < 1.0 ? (1.0 - ls) * nll : 0.0) + (ls > 0.0 ? ls * smooth : 0.0);
   }
   ((float *)loss->data)[0] = n > 0 ? (float)(total / (double)n) : NAN;
   return NR_OK;
}

nr_status nr_softmax_xent_backward(const nr_tensor *probs, const nr_tensor *labels, nr_tensor *dlogits,
                                   float label_smoothing, float scale, int32_t labels_checked)
{
   NR_CHECK_T("probs", probs, NR_F32, -1, 2, NULL);
   NR_CHECK_T("labels", labels, NR_I64, -1, 1, NULL);
   NR_TRY(xent_check(__func__, probs, "probs", NR_F32, labels, label_smoothing, labels_checked));
   NN_CHECK("dlogits", dlogits, NR_DTYPE_ACT, 2, probs->shape, NULL); /* f32 or bf16, as the logits */
   NR_TRY(nr_check_same_device(__func__, probs, dlogits));
   NR_ON_CUDA(probs, nr_cuda_softmax_xent_backward(probs, labels, dlogits, label_smoothing, scale));
   const int64_t n = probs->shape[0], k = probs->shape[1];
   if (n == 0) return NR_OK;
   const float *pp = probs->data;
   const int64_t *pl = labels->data;
   float *pd = dlogits->data;
   const float s = scale / (float)n, off = label_smoothing / (float)k, on = 1.0f - label_smoothing;
#pragma omp parallel for if (nr_parallel_worth(n, k))
   for (int64_t i = 0; i < n; i++) {
      const float *p = pp + i * k;
      float *d = pd + i * k;
      for (int64_t j = 0; j < k; j++) d[j] = s * (p[j] - off);
      d[pl[i]] -= s * on;
   }
   return NR_OK;
}

nr_status nr_batch_metrics_add(const nr_tensor *logits, const nr_tensor *labels, const nr_tensor *loss,
                               nr_tensor *acc)
{
   NR_CHECK_T("logits", logits, NR_DTYPE_ACT, -1, 2, NULL);
   NN_CHECK("logits", logits, NR_DTYPE_ACT, 2, NULL, NULL);
   int64_t ns[1] = {logits->shape[0]};
   NN_CHECK("labels", labels, NR_I64, 1, ns, logits);
   if (loss) {
      NN_CHECK("loss", loss, NR_F32, -1, NULL, logits);
      if (nr_tensor_numel(loss) != 1) return NR_FAIL(NR_E_ARG, "loss: expected one element, got %lld", (long long)nr_tensor_numel(loss));
   }
   int64_t four[1] = {4};
   NN_CHECK("acc", acc, NR_F32, 1, four, logits);
   NR_ON_CUDA(logits, nr_cuda_batch_metrics_add(logits, labels, loss, acc));
   const int64_t n = logits->shape[0], k = logits->shape[1];
   const float *px = logits->data;
   const int64_t *pl = labels->data;
   int64_t h1 = 0, h5 = 0;
   for (int64_t i = 0; i < n; i++) {
      const int64_t y = pl[i];
      if (y < 0 || y >= k) continue;
      const float *x = px + i * k, sy = x[y];
      int64_t above = 0; /* classes ranked before the label */
      for (int64_t j = 0; j < k && above < 5; j++) above += nr_ranks_before(x[j], j, sy, y);
      h1 += above == 0;
      h5 += above < 5;
   }
   float *a = acc->data;
   if (loss) a[0] += ((const float *)loss->data)[0] * (float)n;
   a[1] += (float)h1;
   a[2] += (float)h5;
   a[3] += (float)n;
   return NR_OK;
}

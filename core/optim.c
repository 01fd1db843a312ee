/* optim.c — fused optimizer steps on the CPU (the CUDA backend mirrors them in core/cuda/).
 *
 * What it is: nr_sgd_step, one pass over a parameter that applies weight decay, momentum
 * (dampening 0, optionally Nesterov) and the update, with PyTorch's torch.optim.SGD semantics;
 * nr_sgd_step_many, the same for a list of parameters in one call (one kernel launch on CUDA);
 * nr_adam_step_many, Adam and AdamW (torch.optim.Adam / AdamW) in one pass per parameter;
 * nr_clip_grad_norm, gradient clipping by the norm of all gradients (torch.nn.utils.clip_grad_norm_).
 * What it is not: parameter groups, schedules or state bookkeeping (lua/nr/optim does those).
 * Invariants: elementwise and in float32 in the same order as PyTorch, so results do not depend
 * on the thread count; the first step's "buf = grad" is obtained from a zero-initialised buffer
 * (momentum * 0 + g == g exactly), so C needs no first-step flag.
 */
#include "internal.h"
#include "adam_coef.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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

/* The checks of a batch of n jobs of job_size bytes, each starting with its parameter (nr_sgd_job,
 * nr_adam_job): n sane, check_one(where, job, settings) on each, where naming the job, and every
 * parameter on the first one's device. */
typedef nr_status (*job_check_fn)(const char *where, const void *job, const void *settings);

static nr_status check_jobs(const char *func, const void *jobs, int64_t n, size_t job_size, job_check_fn check_one,
                            const void *settings)
{
   if (n < 0 || (n > 0 && !jobs))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "jobs: expected an array of n >= 0 jobs, got n = %lld",
                        (long long)n);
   char where[64];
   const char *base = jobs;
   for (int64_t k = 0; k < n; k++) {
      snprintf(where, sizeof where, "%s (job %lld)", func, (long long)k);
      const void *job = base + (size_t)k * job_size;
      NR_TRY(check_one(where, job, settings));
      if (k > 0) NR_TRY(nr_check_same_device(where, *(nr_tensor *const *)base, *(nr_tensor *const *)job));
   }
   return NR_OK;
}

typedef struct sgd_settings {
   float momentum, weight_decay;
   int32_t nesterov;
} sgd_settings;

static nr_status sgd_check_job(const char *where, const void *job, const void *settings)
{
   const nr_sgd_job *j = job;
   const sgd_settings *s = settings;
   return sgd_check(where, j->param, j->grad, j->momentum_buf, s->momentum, s->weight_decay, s->nesterov);
}

static nr_status check_many(const char *func, const nr_sgd_job *jobs, int64_t n, float momentum, float weight_decay,
                            int32_t nesterov)
{
   const sgd_settings s = {momentum, weight_decay, nesterov};
   return check_jobs(func, jobs, n, sizeof *jobs, sgd_check_job, &s);
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

/* ---------------------------------------------------------------- Adam / AdamW */

static nr_status adam_check(const char *func, const nr_adam_job *j, double lr, double beta1, double beta2, double eps,
                            double weight_decay)
{
   if (!j->param) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "param: NULL tensor");
   NR_TRY(nr_check_tensor(func, "param", j->param, NR_F32, -1, -1, NULL));
   NR_TRY(nr_check_contiguous(func, "param", j->param));
   const nr_tensor *pairs[4] = {j->grad, j->exp_avg, j->exp_avg_sq, j->max_exp_avg_sq};
   const char *names[4] = {"grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
   for (int i = 0; i < 4; i++) {
      if (i == 3 && !pairs[i]) break; /* (amsgrad off) */
      if (!pairs[i]) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: NULL tensor", names[i]);
      NR_TRY(check_pair(func, names[i], pairs[i], j->param));
   }
   if (j->step < 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "step must be >= 1 (counting this one), got %lld",
                        (long long)j->step);
   const double fmax = 3.4028234663852886e38; /* each meets the tensors as a float */
   if (!(lr >= 0.0 && lr <= fmax) || !(weight_decay >= 0.0 && weight_decay <= fmax) || !(eps >= 0.0 && eps <= fmax))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "lr, eps and weight_decay must be finite floats >= 0, got %g, %g, %g", lr, eps, weight_decay);
   if (!(beta1 >= 0.0 && (float)beta1 < 1.0f) || !(beta2 >= 0.0 && (float)beta2 < 1.0f))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "betas must be in [0, 1) (as floats), got %.9g, %.9g", beta1,
                        beta2);
   return NR_OK;
}

typedef struct adam_settings {
   double lr, beta1, beta2, eps, weight_decay;
} adam_settings;

static nr_status adam_check_job(const char *where, const void *job, const void *settings)
{
   const adam_settings *s = settings;
   return adam_check(where, job, s->lr, s->beta1, s->beta2, s->eps, s->weight_decay);
}

static nr_status adam_check_many(const char *func, const nr_adam_job *jobs, int64_t n, double lr, double beta1,
                                 double beta2, double eps, double weight_decay)
{
   const adam_settings s = {lr, beta1, beta2, eps, weight_decay};
   return check_jobs(func, jobs, n, sizeof *jobs, adam_check_job, &s);
}

nr_status nr_adam_check_many(const nr_adam_job *jobs, int64_t n, double lr, double beta1, double beta2, double eps,
                             double weight_decay)
{
   return adam_check_many(__func__, jobs, n, lr, beta1, beta2, eps, weight_decay);
}

/* Elements [lo, hi) of one parameter's update in PyTorch's order of operations
 * (torch/optim/adam.py, adamw.py, _single_tensor_*): the L2 term or the decoupled decay, the two
 * moments, then addcdiv. Cloned for AVX2 (the sqrt and divisions vectorize: this file is built
 * with -fno-math-errno, exp_avg_sq is never negative). */
NR_SIMD_CLONES
static void adam_range(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                       float *restrict vmax, int64_t lo, int64_t hi, nr_adam_coef c)
{
   for (int64_t i = lo; i < hi; i++) {
      float d = g[i];
      float pi = p[i];
      if (c.l2 != 0.0f) d = d + c.l2 * pi;
      pi = pi * c.decay;
      float mi = m[i] * c.beta1 + d * c.one_minus_beta1;
      float vi = v[i] * c.beta2 + c.one_minus_beta2 * d * d;
      m[i] = mi;
      v[i] = vi;
      if (vmax) { /* amsgrad: the running maximum (torch.maximum: a NaN wins) */
         const float mx = vmax[i];
         vi = (vi > mx || vi != vi) ? vi : mx;
         vmax[i] = vi;
      }
      p[i] = pi + c.neg_step_size * (mi / (sqrtf(vi) / c.bc2_sqrt + c.eps));
   }
}

enum { ADAM_BLOCK = 1 << 14 };

static void adam_apply(float *p, const float *g, float *m, float *v, float *vmax, int64_t n, nr_adam_coef c)
{
   const int64_t nblocks = (n + ADAM_BLOCK - 1) / ADAM_BLOCK;
#pragma omp parallel for schedule(static) if (nblocks > 1 && nr_parallel_worth(n, 8))
   for (int64_t b = 0; b < nblocks; b++) {
      int64_t lo = b * ADAM_BLOCK, hi = lo + ADAM_BLOCK < n ? lo + ADAM_BLOCK : n;
      adam_range(p, g, m, v, vmax, lo, hi, c);
   }
}

nr_status nr_adam_step_many(const nr_adam_job *jobs, int64_t n, double lr, double beta1, double beta2, double eps,
                            double weight_decay, int32_t decoupled)
{
   NR_TRY(adam_check_many(__func__, jobs, n, lr, beta1, beta2, eps, weight_decay)); /* all before any is updated */
   if (n == 0) return NR_OK;
   NR_ON_CUDA(jobs[0].param, nr_cuda_adam_step_many(jobs, n, lr, beta1, beta2, eps, weight_decay, decoupled));
   for (int64_t k = 0; k < n; k++) {
      const nr_adam_job *j = &jobs[k];
      nr_adam_coef c = nr_adam_coef_of(j->step, lr, beta1, beta2, eps, weight_decay, decoupled);
      adam_apply(j->param->data, j->grad->data, j->exp_avg->data, j->exp_avg_sq->data,
                 j->max_exp_avg_sq ? j->max_exp_avg_sq->data : NULL, nr_tensor_numel(j->param), c);
   }
   return NR_OK;
}

/* ---------------------------------------------------------------- gradient clipping */

/* The gradients cut into chunks of CLIP_CHUNK elements: chunk sums and maxima are combined in
 * chunk order, so the norm does not depend on the thread count. */
enum { CLIP_CHUNK = 1 << 16 };

static nr_status clip_check(const char *func, nr_tensor *const *grads, int64_t n, const nr_tensor *total,
                            double max_norm, int32_t norm_type)
{
   if (n < 0 || (n > 0 && !grads))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "grads: expected an array of n >= 0 tensors, got n = %lld",
                        (long long)n);
   if (!(max_norm > 0))
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "max_norm must be > 0, got %g", max_norm);
   if (norm_type != 2 && norm_type != 0)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "norm_type must be 2 or 0 (the largest |g|), got %d",
                        norm_type);
   NR_TRY(nr_check_tensor(func, "total", total, NR_F32, -1, -1, NULL));
   if (nr_tensor_numel(total) != 1)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "total must hold one element, got %lld",
                        (long long)nr_tensor_numel(total));
   char where[64];
   for (int64_t k = 0; k < n; k++) {
      snprintf(where, sizeof where, "%s (grads[%lld])", func, (long long)k);
      NR_TRY(nr_check_tensor(where, "grad", grads[k], NR_F32, -1, -1, NULL));
      NR_TRY(nr_check_contiguous(where, "grad", grads[k]));
      NR_TRY(nr_check_same_device(where, total, grads[k]));
   }
   return NR_OK;
}

/* Sum of squares (norm_type 2) or largest |g| (a NaN wins) of p[0..len). */
NR_SIMD_CLONES
static double chunk_norm(const float *restrict p, int64_t len, int32_t norm_type)
{
   if (norm_type == 2) {
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < len; i++) s += (double)p[i] * (double)p[i];
      return s;
   }
   float m = 0;
   int nan = 0;
   for (int64_t i = 0; i < len; i++) {
      const float a = fabsf(p[i]);
      m = a > m ? a : m;
      nan |= a != a;
   }
   return nan ? (double)NAN : (double)m;
}

NR_SIMD_CLONES
static void chunk_scale(float *restrict p, int64_t len, float k)
{
   for (int64_t i = 0; i < len; i++) p[i] *= k;
}

nr_status nr_clip_grad_norm(nr_tensor *const *grads, int64_t n, nr_tensor *total, double max_norm, int32_t norm_type)
{
   NR_TRY(clip_check(__func__, grads, n, total, max_norm, norm_type));
   NR_ON_CUDA(total, nr_cuda_clip_grad_norm(grads, n, total, max_norm, norm_type));
   int64_t nchunks = 0;
   for (int64_t k = 0; k < n; k++) nchunks += (nr_tensor_numel(grads[k]) + CLIP_CHUNK - 1) / CLIP_CHUNK;
   double *part = malloc((size_t)(nchunks > 0 ? nchunks : 1) * sizeof *part);
   int64_t *where = malloc((size_t)(nchunks > 0 ? nchunks : 1) * 2 * sizeof *where); /* (tensor, first element) */
   if (!part || !where) {
      free(part);
      free(where);
      return NR_FAIL(NR_E_OOM, "out of host memory for %lld gradient chunks", (long long)nchunks);
   }
   for (int64_t k = 0, c = 0; k < n; k++)
      for (int64_t at = 0; at < nr_tensor_numel(grads[k]); at += CLIP_CHUNK, c++) where[2 * c] = k, where[2 * c + 1] = at;
#pragma omp parallel for schedule(static) if (nr_parallel_worth(nchunks, CLIP_CHUNK))
   for (int64_t c = 0; c < nchunks; c++) {
      const nr_tensor *g = grads[where[2 * c]];
      const int64_t at = where[2 * c + 1], m = nr_tensor_numel(g);
      part[c] = chunk_norm((const float *)g->data + at, m - at < CLIP_CHUNK ? m - at : CLIP_CHUNK, norm_type);
   }
   double acc = 0;
   for (int64_t c = 0; c < nchunks; c++) {
      if (norm_type == 2) acc += part[c];
      else if (part[c] != part[c] || part[c] > acc) acc = part[c]; /* a NaN wins */
   }
   const float tot = (float)(norm_type == 2 ? sqrt(acc) : acc);
   *(float *)total->data = tot;
   /* PyTorch: clip_coef = max_norm / (total + 1e-6), which Tensor.__rtruediv__ computes as
    * reciprocal(total + 1e-6) * max_norm in float; clamp(max = 1) keeps a NaN (so an inf total
    * under an inf max_norm gives NaN gradients, as there); a scale of 1 changes nothing */
   float coef = (1.0f / (tot + 1e-6f)) * (float)max_norm;
   if (coef > 1.0f) coef = 1.0f;
   if (coef != 1.0f) {
#pragma omp parallel for schedule(static) if (nr_parallel_worth(nchunks, CLIP_CHUNK))
      for (int64_t c = 0; c < nchunks; c++) {
         const nr_tensor *g = grads[where[2 * c]];
         const int64_t at = where[2 * c + 1], m = nr_tensor_numel(g);
         chunk_scale((float *)g->data + at, m - at < CLIP_CHUNK ? m - at : CLIP_CHUNK, coef);
      }
   }
   free(part);
   free(where);
   return NR_OK;
}

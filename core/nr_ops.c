/* nr_ops.c — Neural Rejuvenation primitives: liveliness masks from BN scales (γ) and the L1
 * subgradient on γ, called every training step by lua/nr/rejuvenate (O(C) loops with no
 * allocation); and nr_surgery_place, the one-pass gather + fill that builds every resized tensor
 * of a rejuvenation (weights, BN vectors, momentum buffers).
 *
 * What it is: the CPU reference of the per-step NR hot paths (paper section 3.1). What it is not:
 * mask propagation through the model graph or the surgery (Lua, lua/nr/rejuvenate/), which run
 * once per check / rejuvenation on tables of a few thousand channels.
 * Invariants: a channel c is live iff |γ_c| >= threshold_rel * max|γ| and max|γ| >= abs_min; the
 * L1 step adds λ·sign(γ) with sign(0) = 0 (as torch.sign), so an exact zero is not pushed.
 */
#include "nn_internal.h"
#include "cuda/nr_place.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

nr_status nr_bn_live_mask(const nr_tensor *gamma, nr_tensor *mask, float threshold_rel, float abs_min,
                          int64_t *live)
{
   if (gamma) NR_ON_CUDA(gamma, nr_cuda_bn_live_mask(gamma, mask, threshold_rel, abs_min, live));
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
   if (gamma) NR_ON_CUDA(gamma, nr_cuda_l1_sign_add(gamma, grad, lambda));
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

/* ---- NR-CA cross attention ------------------------------------------------------------------ */

/* The tensors of one cross-attention call: contiguous activations of t[0]'s shape, dtype and
 * device (the layer kernels' checks). */
static nr_status ca_check(const char *func, const char *const *names, const nr_tensor *const *t, int n)
{
   for (int i = 0; i < n; i++) {
      NR_TRY(nn_check(func, names[i], t[i], NR_DTYPE_ACT, -1, NULL, i ? t[0] : NULL));
      if (i) NR_TRY(nn_check_same_shape(func, names[0], t[0], names[i], t[i]));
   }
   return NR_OK;
}

nr_status nr_cross_attention_forward(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, nr_tensor *gate)
{
   static const char *const names[] = {"a", "b", "out", "gate"};
   const nr_tensor *t[] = {a, b, out, gate};
   NR_TRY(ca_check(__func__, names, t, 4));
   NR_ON_CUDA(a, nr_cuda_cross_attention_forward(a, b, out, gate));
   const int64_t n = nr_tensor_numel(a);
   const float *pa = a->data, *pb = b->data;
   float *po = out->data, *ps = gate->data;
#pragma omp parallel for if (n > 65536)
   for (int64_t i = 0; i < n; i++) {
      const float av = pa[i], s = 1.0f / (1.0f + expf(-av));
      ps[i] = s;
      po[i] = av + 2.0f * s * pb[i];
   }
   return NR_OK;
}

nr_status nr_cross_attention_backward(const nr_tensor *gate, const nr_tensor *b, const nr_tensor *g, nr_tensor *da,
                                      nr_tensor *db)
{
   static const char *const names[] = {"gate", "b", "g", "da", "db"};
   const nr_tensor *t[] = {gate, b, g, da, db};
   NR_TRY(ca_check(__func__, names, t, 5));
   NR_ON_CUDA(g, nr_cuda_cross_attention_backward(gate, b, g, da, db));
   const int64_t n = nr_tensor_numel(g);
   const float *ps = gate->data, *pb = b->data, *pg = g->data;
   float *pda = da->data, *pdb = db->data;
#pragma omp parallel for if (n > 65536)
   for (int64_t i = 0; i < n; i++) {
      const float s = ps[i], gv = pg[i], bv = pb[i];
      pda[i] = gv * (1.0f + 2.0f * s * (1.0f - s) * bv);
      pdb[i] = 2.0f * s * gv;
   }
   return NR_OK;
}

/* ---- surgery placement ------------------------------------------------------------------------
 * One pass per resized tensor (lua/nr/rejuvenate/surgery.lua): dst is written exactly once,
 * element by element, from the gathered survivor block a, the new block b, or the fill value, so
 * the surgery needs no zero-filled temporaries, no index_select / index_copy chains and no second
 * copy of the momentum. The argument checks and the inverse maps are shared with the CUDA twin
 * (core/cuda/nr_surgery.cu) through nr_place_plan_build. */

static nr_status place_index(const char *func, const char *name, const nr_tensor *ix, int pairs, int64_t *len)
{
   if (!ix) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: index tensor is NULL", name);
   int64_t want2[2] = {2, -1};
   NR_TRY(nr_check_tensor(func, name, ix, NR_I64, NR_CPU, pairs ? 2 : 1, pairs ? want2 : NULL));
   NR_TRY(nr_check_contiguous(func, name, ix));
   *len = pairs ? ix->shape[1] : ix->shape[0];
   return NR_OK;
}

/* Checks that t matches dst in dims from..ndim-1 (the "inner" dims of the view). */
static nr_status place_same_inner(const char *func, const char *name, const nr_tensor *t, const nr_tensor *dst, int from)
{
   char got[256], want[256];
   bool ok = t->ndim == dst->ndim;
   for (int d = from; ok && d < dst->ndim; d++) ok = t->shape[d] == dst->shape[d];
   if (ok) return NR_OK;
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                     "%s: must match dst in its dimensions after the first %d (dst %s), got %s", name, from,
                     nr_tensor_describe(dst, want, sizeof want), nr_tensor_describe(t, got, sizeof got));
}

/* Inverse map: inv[dst position] <- source (pairs: row 0 = sources in [0, src_n), row 1 =
 * destinations in [0, dst_n)) or i (plain list of destinations). Duplicated destinations fail. */
static nr_status place_invert(const char *func, const char *name, const nr_tensor *ix, int pairs, int64_t src_n,
                              int64_t dst_n, int64_t *inv)
{
   const int64_t *p = (const int64_t *)ix->data;
   int64_t k = pairs ? ix->shape[1] : ix->shape[0];
   const int64_t *dsts = pairs ? p + k : p;
   for (int64_t i = 0; i < k; i++) {
      int64_t s = pairs ? p[i] : i, d = dsts[i];
      if (pairs && (s < 0 || s >= src_n))
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: source position %lld out of range 0..%lld (entry %lld)",
                           name, (long long)s, (long long)src_n - 1, (long long)i);
      if (d < 0 || d >= dst_n)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                           "%s: destination position %lld out of range 0..%lld (entry %lld)", name, (long long)d,
                           (long long)dst_n - 1, (long long)i);
      if (inv[d] >= 0)
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: destination position %lld appears twice", name,
                           (long long)d);
      inv[d] = s;
   }
   return NR_OK;
}

/* A source block (a or b): f32, on dst's device, contiguous, and with dst's sizes from dimension
 * `from` on. */
static nr_status place_operand(const char *func, const char *name, const nr_tensor *t, const nr_tensor *dst, int from)
{
   NR_TRY(nr_check_tensor(func, name, t, NR_F32, -1, -1, NULL));
   NR_TRY(nr_check_same_device(func, dst, t));
   NR_TRY(nr_check_contiguous(func, name, t));
   return place_same_inner(func, name, t, dst, from);
}

void nr_place_plan_free(nr_place_plan *p)
{
   free(p->inv);
   p->inv = NULL;
}

nr_status nr_place_plan_build(const char *func, nr_place_plan *p, const nr_tensor *dst, const nr_tensor *a,
                              const nr_tensor *ar, const nr_tensor *ac, const nr_tensor *b, const nr_tensor *br,
                              const nr_tensor *bc, float b_std)
{
   memset(p, 0, sizeof *p);
   NR_TRY(nr_check_tensor(func, "dst", dst, NR_F32, -1, -1, NULL));
   NR_TRY(nr_check_contiguous(func, "dst", dst));
   if (dst->ndim < 1) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "dst: needs at least 1 dimension");
   int cols = ac != NULL || bc != NULL;
   if (cols && dst->ndim < 2)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "column maps given but dst has %d dimension (dim 1 cannot be remapped)", dst->ndim);
   int from = cols ? 2 : 1;
   p->d0 = dst->shape[0];
   p->d1 = cols ? dst->shape[1] : 1;
   p->inner = 1;
   for (int d = from; d < dst->ndim; d++) p->inner *= dst->shape[d];
   int64_t ka = 0, la = 0, kb = 0, lb = 0;
   if (a) {
      NR_TRY(place_operand(func, "a", a, dst, from));
      NR_TRY(place_index(func, "a_rows", ar, 1, &ka));
      if (cols) NR_TRY(place_index(func, "a_cols", ac, 1, &la));
      p->a_s1 = cols ? a->shape[1] : 1;
   } else if (ar || ac) {
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "a_rows / a_cols given without a");
   }
   if (b) {
      NR_TRY(place_operand(func, "b", b, dst, from));
      NR_TRY(place_index(func, "b_rows", br, 0, &kb));
      if (cols) NR_TRY(place_index(func, "b_cols", bc, 0, &lb));
      if (b->shape[0] != kb || (cols && b->shape[1] != lb)) {
         char got[256];
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                           "b: expected %lld rows%s%lld%s (the lengths of b_rows%s), got %s", (long long)kb,
                           cols ? " x " : "", cols ? (long long)lb : 0LL, cols ? " columns" : "",
                           cols ? " / b_cols" : "", nr_tensor_describe(b, got, sizeof got));
      }
      p->b_l1 = cols ? b->shape[1] : 1;
   } else if (br) {
      /* a random block: b_rows (and b_cols) give its place, b_std its scale */
      NR_TRY(place_index(func, "b_rows", br, 0, &kb));
      if (cols) NR_TRY(place_index(func, "b_cols", bc, 0, &lb));
      if (!(b_std >= 0.0f) || !isfinite(b_std))
         return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "b_std must be finite and >= 0, got %g", (double)b_std);
      p->b_l1 = cols ? lb : 1;
      p->b_random = 1;
   } else if (bc) {
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "b_cols given without b_rows");
   }
   (void)la;
   (void)lb;
   int64_t n = 2 * p->d0 + 2 * p->d1;
   p->inv = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
   if (!p->inv) return nr_fail_at(NR_E_OOM, func, __FILE__, __LINE__, "out of host memory (index maps)");
   for (int64_t i = 0; i < n; i++) p->inv[i] = -1;
   int64_t *inv_ar = p->inv, *inv_br = p->inv + p->d0, *inv_ac = p->inv + 2 * p->d0, *inv_bc = inv_ac + p->d1;
   nr_status st = NR_OK;
   if (a) {
      st = place_invert(func, "a_rows", ar, 1, a->shape[0], p->d0, inv_ar);
      if (st == NR_OK && cols) st = place_invert(func, "a_cols", ac, 1, a->shape[1], p->d1, inv_ac);
      if (st == NR_OK && !cols && p->d1 > 0) inv_ac[0] = 0;
   }
   if (st == NR_OK && (b || p->b_random)) {
      st = place_invert(func, "b_rows", br, 0, 0, p->d0, inv_br);
      if (st == NR_OK && cols) st = place_invert(func, "b_cols", bc, 0, 0, p->d1, inv_bc);
      if (st == NR_OK && !cols && p->d1 > 0) inv_bc[0] = 0;
   }
   if (st == NR_OK && a && (b || p->b_random)) {
      int64_t r = -1, c = -1;
      for (int64_t i = 0; i < p->d0 && r < 0; i++)
         if (inv_ar[i] >= 0 && inv_br[i] >= 0) r = i;
      for (int64_t i = 0; i < p->d1 && c < 0; i++)
         if (inv_ac[i] >= 0 && inv_bc[i] >= 0) c = i;
      if (r >= 0 && c >= 0)
         st = nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "blocks a and b overlap (both write dst row %lld%s%lld)",
                         (long long)r, cols ? ", column " : "", cols ? (long long)c : 0LL);
   }
   if (st != NR_OK) nr_place_plan_free(p);
   return st;
}

/* out[0, n) <- std * elements [e0, e0 + n) of the random block, two per Box-Muller draw. */
static void normal_run(float *out, uint64_t seed, int64_t e0, int64_t n, float std)
{
   int64_t i = 0;
   float z0, z1;
   if (n > 0 && (e0 & 1)) {
      out[i++] = std * nr_place_normal(seed, e0);
   }
   for (; i + 1 < n; i += 2) {
      nr_place_normal2(seed, (e0 + i) >> 1, &z0, &z1);
      out[i] = std * z0;
      out[i + 1] = std * z1;
   }
   if (i < n) out[i] = std * nr_place_normal(seed, e0 + i);
}

/* Rows [r0, r1) of one job; scratch: b_l1 * inner floats when the b block is random. */
static void place_rows(const nr_place_job *j, const nr_place_plan *p, int64_t r0, int64_t r1, float *scratch)
{
   const int64_t d0 = p->d0, d1 = p->d1, inner = p->inner, rowlen = d1 * inner;
   const int64_t *inv_ar = p->inv, *inv_br = p->inv + d0, *inv_ac = p->inv + 2 * d0, *inv_bc = inv_ac + d1;
   const float *ap = j->a ? (const float *)j->a->data : NULL, *bp = j->b ? (const float *)j->b->data : NULL;
   const int64_t arow = p->a_s1 * inner, brow = p->b_l1 * inner;
   const float fill = j->fill;
   const bool zero = fill == 0.0f && !signbit(fill);
   float *dp = (float *)j->dst->data;
   for (int64_t r = r0; r < r1; r++) {
      float *drow = dp + r * rowlen;
      const int64_t ya = inv_ar[r], yb = inv_br[r];
      const float *sa = ya >= 0 ? ap + ya * arow : NULL;
      const float *sb = NULL;
      if (yb >= 0) {
         if (p->b_random) {
            /* the block's row yb, drawn once (each block element lands in exactly one place) */
            normal_run(scratch, j->b_seed, yb * brow, brow, j->b_std);
            sb = scratch;
         } else {
            sb = bp + yb * brow;
         }
      }
      if (!sa && !sb) {
         if (zero) memset(drow, 0, (size_t)rowlen * sizeof(float));
         else
            for (int64_t i = 0; i < rowlen; i++) drow[i] = fill;
         continue;
      }
      if (inner == 1) {
         for (int64_t c = 0; c < d1; c++) {
            int64_t x = sa ? inv_ac[c] : -1, y = sb ? inv_bc[c] : -1;
            drow[c] = x >= 0 ? sa[x] : (y >= 0 ? sb[y] : fill);
         }
         continue;
      }
      for (int64_t c = 0; c < d1; c++) {
         float *d = drow + c * inner;
         int64_t x = sa ? inv_ac[c] : -1, y = sb ? inv_bc[c] : -1;
         if (x >= 0) memcpy(d, sa + x * inner, (size_t)inner * sizeof(float));
         else if (y >= 0) memcpy(d, sb + y * inner, (size_t)inner * sizeof(float));
         else if (zero) memset(d, 0, (size_t)inner * sizeof(float));
         else
            for (int64_t i = 0; i < inner; i++) d[i] = fill;
      }
   }
}

/* Every job in one OpenMP region: the rows of all jobs are cut into chunks of about PLACE_CHUNK
 * elements, handed out dynamically (a rejuvenation is hundreds of tensors of very different sizes;
 * one region instead of one per tensor also spares a barrier per tensor when the cores are
 * shared with other processes). single: the name for a one-job call's messages, else NULL. */
enum { PLACE_CHUNK = 1 << 16 };

static nr_status place_many(const char *single, const nr_place_job *jobs, int64_t n)
{
   if (n < 0 || (n > 0 && !jobs))
      return NR_FAIL(NR_E_ARG, "jobs: expected an array of n >= 0 jobs, got n = %lld%s", (long long)n,
                     jobs ? "" : " and NULL");
   if (n == 0) return NR_OK;
   nr_place_plan *plans = calloc((size_t)n, sizeof *plans);
   if (!plans) return NR_FAIL(NR_E_OOM, "out of host memory (%lld jobs)", (long long)n);
   nr_status st = NR_OK;
   int64_t built = 0, items = 0, total = 0;
   char where[96];
   for (int64_t i = 0; i < n && st == NR_OK; i++) {
      const char *fn = single;
      if (!fn) {
         snprintf(where, sizeof where, "nr_surgery_place_many (job %lld)", (long long)i);
         fn = where;
      }
      const nr_place_job *j = &jobs[i];
      st = nr_check_tensor(fn, "dst", j->dst, NR_F32, NR_CPU, -1, NULL);
      if (st == NR_OK) st = nr_place_plan_build(fn, &plans[i], j->dst, j->a, j->a_rows, j->a_cols, j->b, j->b_rows,
                                                j->b_cols, j->b_std);
      if (st == NR_OK) {
         built = i + 1;
         int64_t rowlen = plans[i].d1 * plans[i].inner, per = rowlen > 0 ? (PLACE_CHUNK + rowlen - 1) / rowlen : 1;
         items += (plans[i].d0 + per - 1) / per;
         total += plans[i].d0 * rowlen;
      }
   }
   int64_t *item = NULL;
   if (st == NR_OK && items > 0) {
      item = malloc((size_t)items * 3 * sizeof(int64_t));
      if (!item) st = NR_FAIL(NR_E_OOM, "out of host memory (%lld work items)", (long long)items);
   }
   if (st == NR_OK && items > 0) {
      int64_t k = 0;
      for (int64_t i = 0; i < n; i++) {
         int64_t rowlen = plans[i].d1 * plans[i].inner, per = rowlen > 0 ? (PLACE_CHUNK + rowlen - 1) / rowlen : 1;
         for (int64_t r = 0; r < plans[i].d0; r += per) {
            item[3 * k] = i;
            item[3 * k + 1] = r;
            item[3 * k + 2] = r + per < plans[i].d0 ? r + per : plans[i].d0;
            k++;
         }
      }
      int64_t scratch_n = 1; /* the longest random block row */
      for (int64_t i = 0; i < n; i++)
         if (plans[i].b_random && plans[i].b_l1 * plans[i].inner > scratch_n) scratch_n = plans[i].b_l1 * plans[i].inner;
      int failed = 0;
#pragma omp parallel if (nr_parallel_worth(items, total / items))
      {
         float *scratch = malloc((size_t)scratch_n * sizeof(float));
         if (!scratch) {
#pragma omp atomic write
            failed = 1;
         }
#pragma omp for schedule(dynamic, 1)
         for (int64_t t = 0; t < items; t++)
            if (scratch) place_rows(&jobs[item[3 * t]], &plans[item[3 * t]], item[3 * t + 1], item[3 * t + 2], scratch);
         free(scratch);
      }
      if (failed) st = NR_FAIL(NR_E_OOM, "out of host memory (a row of %lld floats)", (long long)scratch_n);
   }
   free(item);
   for (int64_t i = 0; i < built; i++) nr_place_plan_free(&plans[i]);
   free(plans);
   return st;
}

nr_status nr_surgery_place_many(const nr_place_job *jobs, int64_t n)
{
   if (n > 0 && jobs && jobs[0].dst) NR_ON_CUDA(jobs[0].dst, nr_cuda_surgery_place_many(jobs, n));
   return place_many(NULL, jobs, n);
}

nr_status nr_surgery_place(nr_tensor *dst, float fill, const nr_tensor *a, const nr_tensor *a_rows,
                           const nr_tensor *a_cols, const nr_tensor *b, const nr_tensor *b_rows,
                           const nr_tensor *b_cols, float b_std, uint64_t b_seed)
{
   if (dst) NR_ON_CUDA(dst, nr_cuda_surgery_place(dst, fill, a, a_rows, a_cols, b, b_rows, b_cols, b_std, b_seed));
   nr_place_job j = {dst, a, a_rows, a_cols, b, b_rows, b_cols, fill, b_std, b_seed};
   return place_many(__func__, &j, 1);
}

/* nn_depthwise.c — depthwise convolution (groups == Cin == Cout) on the CPU: forward (with the
 * folded BN/ReLU epilogue), backward-data and backward-weight, for any kernel size, stride,
 * padding and dilation. Called by core/nn_conv.c, which owns the argument checks.
 *
 * How: each plane is handled in its zero-padded polyphase form. For stride (sh, sw) the padded
 * plane (H + 2ph, W + 2pw) splits into sh*sw phases; phase (a, b) holds padded row a + sh*r,
 * column b + sw*c at (r, c), rows wq floats apart. Output (oh, ow) of tap (i, j) then reads
 * phase (i*dh % sh, j*dw % sw) at oh*wq + ow + (i*dh / sh)*wq + (j*dw / sw): for every tap the
 * whole output plane is one contiguous run t = oh*wq + ow (the columns ow >= wo are computed and
 * dropped), so the loops vectorize with no border cases, strided or not. Backward-data is the
 * forward of dy with the rotated kernels at stride 1 and otherwise scatters dy into phases tap by
 * tap and folds them back into dx; backward-weight is one dot product per tap over the plane. The 3x3 kernels (MobileNet's) read all nine taps in one pass.
 * The per-plane loops are compiled twice (x86-64-v3: AVX2 + FMA, and the baseline target) and
 * picked for this CPU when the library loads.
 * Invariants: nothing allocated per call (per-thread scratch, nn_internal.h); the weight
 * gradient of a channel sums its samples in order in double, so results do not depend on the
 * thread count.
 */
#include "nn_internal.h"

#include <math.h>
#include <string.h>

typedef struct {
   int64_t hq, wq;   /* rows of one phase and its row pitch */
   int64_t phase;    /* floats per phase: hq*wq plus the slack the dropped columns read */
   int64_t nphase;   /* sh * sw */
   int64_t L;        /* ho * wq: positions computed per output plane */
} dw_layout;

static dw_layout dw_make_layout(const conv_geom *g)
{
   dw_layout q;
   q.hq = (g->h + 2 * g->ph + g->sh - 1) / g->sh;
   q.wq = (g->w + 2 * g->pw + g->sw - 1) / g->sw;
   q.phase = q.hq * q.wq + (g->kw - 1) * g->dw / g->sw + 1;
   q.nphase = g->sh * g->sw;
   q.L = g->ho * q.wq;
   return q;
}

/* Where tap (i, j) starts in the phase buffer. */
static inline int64_t dw_tap(const conv_geom *g, const dw_layout *q, int64_t i, int64_t j)
{
   const int64_t ii = i * g->dh, jj = j * g->dw;
   return ((ii % g->sh) * g->sw + jj % g->sw) * q->phase + (ii / g->sh) * q->wq + jj / g->sw;
}

/* Copies a plane into the interior of its phases (to_phase) or back out of them. Only the
 * interior is touched, so a zeroed border stays zero. */
NR_SIMD_CLONES
static void dw_move(float *ph, float *plane, const conv_geom *g, const dw_layout *q, bool to_phase)
{
   for (int64_t r = 0; r < g->h; r++) {
      const int64_t R = r + g->ph;
      float *row = ph + (R % g->sh) * g->sw * q->phase + (R / g->sh) * q->wq, *pr = plane + r * g->w;
      if (g->sw == 2) { /* even columns to one phase, odd ones to the other, in one pass */
         float *restrict de = row + (g->pw % 2) * q->phase + g->pw / 2;
         float *restrict dd = row + ((g->pw + 1) % 2) * q->phase + (g->pw + 1) / 2;
         const int64_t half = g->w / 2;
         if (to_phase)
            for (int64_t k = 0; k < half; k++) de[k] = pr[2 * k], dd[k] = pr[2 * k + 1];
         else
            for (int64_t k = 0; k < half; k++) pr[2 * k] = de[k], pr[2 * k + 1] = dd[k];
         if (g->w % 2) {
            if (to_phase) de[half] = pr[2 * half];
            else pr[2 * half] = de[half];
         }
         continue;
      }
      for (int64_t b = 0; b < g->sw; b++) {
         const int64_t c0 = ((b - g->pw) % g->sw + g->sw) % g->sw; /* first column landing in phase b */
         float *d = row + b * q->phase + (c0 + g->pw) / g->sw;
         if (to_phase)
            for (int64_t c = c0, k = 0; c < g->w; c += g->sw, k++) d[k] = pr[c];
         else
            for (int64_t c = c0, k = 0; c < g->w; c += g->sw, k++) pr[c] = d[k];
      }
   }
}

/* acc[t] = bias + sum over taps of w * phase[t + tap], t < L. */
NR_SIMD_CLONES
static void dw_plane_forward(const float *ph, float *restrict acc, const float *wc, float bias, const conv_geom *g,
                             const dw_layout *q)
{
   const int64_t L = q->L;
   if (g->kh == 3 && g->kw == 3) {
      const float *s[9];
      for (int64_t i = 0; i < 3; i++)
         for (int64_t j = 0; j < 3; j++) s[i * 3 + j] = ph + dw_tap(g, q, i, j);
      const float w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6], w7 = wc[7],
                  w8 = wc[8];
      const float *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3], *s4 = s[4], *s5 = s[5], *s6 = s[6], *s7 = s[7],
                  *s8 = s[8];
#pragma omp simd
      for (int64_t t = 0; t < L; t++)
         acc[t] = bias + w0 * s0[t] + w1 * s1[t] + w2 * s2[t] + w3 * s3[t] + w4 * s4[t] + w5 * s5[t] + w6 * s6[t] +
                  w7 * s7[t] + w8 * s8[t];
      return;
   }
   for (int64_t t = 0; t < L; t++) acc[t] = bias;
   for (int64_t i = 0; i < g->kh; i++)
      for (int64_t j = 0; j < g->kw; j++) {
         const float wv = wc[i * g->kw + j], *src = ph + dw_tap(g, q, i, j);
#pragma omp simd
         for (int64_t t = 0; t < L; t++) acc[t] += wv * src[t];
      }
}

/* phases = sum over taps of w * dyq shifted to the tap (dyq: dy with row pitch wq, zero in the
 * dropped columns). */
NR_SIMD_CLONES
static void dw_plane_backward_data(float *ph, const float *restrict dyq, const float *wc, const conv_geom *g,
                                   const dw_layout *q)
{
   const int64_t L = q->L;
   memset(ph, 0, sizeof(float) * (size_t)(q->nphase * q->phase));
   for (int64_t i = 0; i < g->kh; i++)
      for (int64_t j = 0; j < g->kw; j++) {
         const float wv = wc[i * g->kw + j];
         float *restrict dst = ph + dw_tap(g, q, i, j);
#pragma omp simd
         for (int64_t t = 0; t < L; t++) dst[t] += wv * dyq[t];
      }
}

/* sums[tap] += dot(dyq, phase shifted to the tap) for every tap. */
NR_SIMD_CLONES
static void dw_plane_weight(const float *ph, const float *restrict dyq, double *sums, const conv_geom *g,
                            const dw_layout *q)
{
   const int64_t L = q->L;
   if (g->kh == 3 && g->kw == 3) {
      const float *s0 = ph + dw_tap(g, q, 0, 0), *s1 = ph + dw_tap(g, q, 0, 1), *s2 = ph + dw_tap(g, q, 0, 2),
                  *s3 = ph + dw_tap(g, q, 1, 0), *s4 = ph + dw_tap(g, q, 1, 1), *s5 = ph + dw_tap(g, q, 1, 2),
                  *s6 = ph + dw_tap(g, q, 2, 0), *s7 = ph + dw_tap(g, q, 2, 1), *s8 = ph + dw_tap(g, q, 2, 2);
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8)
      for (int64_t t = 0; t < L; t++) {
         const float d = dyq[t];
         a0 += d * s0[t], a1 += d * s1[t], a2 += d * s2[t], a3 += d * s3[t], a4 += d * s4[t];
         a5 += d * s5[t], a6 += d * s6[t], a7 += d * s7[t], a8 += d * s8[t];
      }
      sums[0] += a0, sums[1] += a1, sums[2] += a2, sums[3] += a3, sums[4] += a4;
      sums[5] += a5, sums[6] += a6, sums[7] += a7, sums[8] += a8;
      return;
   }
   for (int64_t i = 0; i < g->kh; i++)
      for (int64_t j = 0; j < g->kw; j++) {
         const float *src = ph + dw_tap(g, q, i, j);
         float a = 0;
#pragma omp simd reduction(+ : a)
         for (int64_t t = 0; t < L; t++) a += dyq[t] * src[t];
         sums[i * g->kw + j] += a;
      }
}

/* dyq <- dy plane with row pitch wq (the dropped columns keep the zeros they were given). */
static void dw_pitch(const float *dyp, float *dyq, const conv_geom *g, const dw_layout *q)
{
   for (int64_t oh = 0; oh < g->ho; oh++) memcpy(dyq + oh * q->wq, dyp + oh * g->wo, sizeof(float) * g->wo);
}

/* This thread's phase buffer (nn_scratch slot 0) and a buffer of L floats (slot 1), each zeroed
 * once when asked (the padding of the phases and the dropped columns of a pitched dy must stay
 * zero; only interiors are rewritten per plane). False when an allocation failed. */
static bool dw_buffers(const dw_layout *q, float **ph, float **aux, bool zero_ph, bool zero_aux)
{
   *ph = nn_scratch(0, (size_t)(q->nphase * q->phase));
   *aux = nn_scratch(1, (size_t)q->L);
   if (!*ph || !*aux) return false;
   if (zero_ph) memset(*ph, 0, sizeof(float) * (size_t)(q->nphase * q->phase));
   if (zero_aux) memset(*aux, 0, sizeof(float) * (size_t)q->L);
   return true;
}

static nr_status dw_oom(const char *what, const dw_layout *q)
{
   return NR_FAIL(NR_E_OOM, "no memory for the depthwise %s buffers (%lld floats per thread)", what,
                  (long long)(q->nphase * q->phase + q->L));
}

/* ---- exact fallbacks for non-finite values. The fast loops multiply the padding's zeros and
 * run over whole pitched rows (the dropped columns pair zeros with real values): 0 * inf or
 * 0 * NaN there would put a NaN into outputs, taps and positions that no real (output, tap) pair
 * reaches. The few channels where a non-finite value can meet such a zero are computed again
 * over the real pairs only, giving PyTorch's result (a diverging run is rare; finite data never
 * takes these paths). */

enum { DW_FORWARD, DW_DATA, DW_WEIGHT };

/* One plane over its real (output, tap) pairs only: every output (oh, ow) and tap (i, j) whose
 * input position (ih, iw) lies inside the plane. DW_FORWARD: out (y) = bias + sum w * x;
 * DW_DATA: out (dx) = sum w * dy; DW_WEIGHT: sums[tap] += dy * x (in double). */
static void dw_plane_exact(int mode, const float *xp, const float *dyp, float *out, const float *wc, float bias,
                           double *sums, const conv_geom *g)
{
   if (mode == DW_DATA) memset(out, 0, sizeof(float) * (size_t)(g->h * g->w));
   for (int64_t oh = 0; oh < g->ho; oh++)
      for (int64_t ow = 0; ow < g->wo; ow++) {
         const int64_t o = oh * g->wo + ow;
         float acc = bias;
         for (int64_t i = 0; i < g->kh; i++) {
            const int64_t ih = oh * g->sh - g->ph + i * g->dh;
            if (ih < 0 || ih >= g->h) continue;
            for (int64_t j = 0; j < g->kw; j++) {
               const int64_t iw = ow * g->sw - g->pw + j * g->dw, t = i * g->kw + j, at = ih * g->w + iw;
               if (iw < 0 || iw >= g->w) continue;
               if (mode == DW_FORWARD) acc += wc[t] * xp[at];
               else if (mode == DW_DATA) out[at] += wc[t] * dyp[o];
               else sums[t] += (double)dyp[o] * xp[at];
            }
         }
         if (mode == DW_FORWARD) out[o] = acc;
      }
}

/* Whether channel c's kernel holds an inf or NaN: the one way the fast forward and
 * backward-data loops meet a non-finite value with a padding or dropped-column zero (x's and
 * dy's zeros of the padding and the pitch multiply w; a finite w times a zero adds nothing). */
static bool dw_kernel_finite(const float *w, int64_t c, int64_t kk)
{
   bool finite = true;
   for (int64_t t = 0; t < kk; t++) finite = finite && isfinite(w[c * kk + t]);
   return finite;
}

nr_status nn_dw_forward(const float *x, float *y, const float *w, const float *b, const conv_geom *g,
                        const nn_epilogue *epi)
{
   const dw_layout q = dw_make_layout(g);
   const int64_t nc = g->n * g->cin, kk = g->kh * g->kw;
   bool oom = false;
#pragma omp parallel if (nr_parallel_worth(nc, g->p * kk))
   {
      float *ph, *acc;
      const bool ok = dw_buffers(&q, &ph, &acc, true, false);
      if (!ok) {
#pragma omp atomic write
         oom = true;
      }
#pragma omp for schedule(static)
      for (int64_t p = 0; p < nc; p++) {
         if (!ok) continue;
         const int64_t c = p % g->cin;
         float *yp = y + p * g->p;
         dw_move(ph, (float *)(x + p * g->h * g->w), g, &q, true);
         dw_plane_forward(ph, acc, w + c * kk, b ? b[c] : 0.0f, g, &q);
         for (int64_t oh = 0; oh < g->ho; oh++) memcpy(yp + oh * g->wo, acc + oh * q.wq, sizeof(float) * g->wo);
         if (epi) nn_epilogue_plane(epi, c, yp, g->p);
      }
   }
   if (oom) return dw_oom("forward", &q);
   for (int64_t c = 0; c < g->cin; c++) {
      if (dw_kernel_finite(w, c, kk)) continue;
      for (int64_t n = 0; n < g->n; n++) {
         const int64_t p = n * g->cin + c;
         dw_plane_exact(DW_FORWARD, x + p * g->h * g->w, NULL, y + p * g->p, w + c * kk, b ? b[c] : 0.0f, NULL, g);
         if (epi) nn_epilogue_plane(epi, c, y + p * g->p, g->p);
      }
   }
   return NR_OK;
}

static nr_status dw_backward_data_fast(const float *dy, float *dx, const float *w, const conv_geom *g)
{
   /* stride 1: dx is the forward of dy with every kernel rotated by 180 degrees and padding
    * (k - 1) * d - p (needs p <= (k - 1) * d: "same" and "valid" convs), which gathers all taps
    * in one pass instead of scattering tap by tap */
   if (g->sh == 1 && g->sw == 1 && g->ph <= (g->kh - 1) * g->dh && g->pw <= (g->kw - 1) * g->dw) {
      const int64_t kk = g->kh * g->kw;
      float *wf = nn_scratch(2, (size_t)(g->cin * kk));
      if (!wf) return NR_FAIL(NR_E_OOM, "no memory for the rotated depthwise kernels (%lld floats)", (long long)(g->cin * kk));
      for (int64_t c = 0; c < g->cin; c++)
         for (int64_t t = 0; t < kk; t++) wf[c * kk + t] = w[c * kk + kk - 1 - t];
      conv_geom t = *g;
      t.h = g->ho, t.w = g->wo, t.ho = g->h, t.wo = g->w, t.p = g->h * g->w;
      t.ph = (g->kh - 1) * g->dh - g->ph, t.pw = (g->kw - 1) * g->dw - g->pw;
      return nn_dw_forward(dy, dx, wf, NULL, &t, NULL);
   }
   const dw_layout q = dw_make_layout(g);
   const int64_t nc = g->n * g->cin, kk = g->kh * g->kw;
   bool oom = false;
#pragma omp parallel if (nr_parallel_worth(nc, g->p * kk))
   {
      float *ph, *dyq;
      const bool ok = dw_buffers(&q, &ph, &dyq, false, true);
      if (!ok) {
#pragma omp atomic write
         oom = true;
      }
#pragma omp for schedule(static)
      for (int64_t p = 0; p < nc; p++) {
         if (!ok) continue;
         dw_pitch(dy + p * g->p, dyq, g, &q);
         dw_plane_backward_data(ph, dyq, w + (p % g->cin) * kk, g, &q);
         dw_move(ph, dx + p * g->h * g->w, g, &q, false);
      }
   }
   return oom ? dw_oom("backward-data", &q) : NR_OK;
}

nr_status nn_dw_backward_data(const float *dy, float *dx, const float *w, const conv_geom *g)
{
   NR_TRY(dw_backward_data_fast(dy, dx, w, g));
   const int64_t kk = g->kh * g->kw;
   for (int64_t c = 0; c < g->cin; c++) {
      if (dw_kernel_finite(w, c, kk)) continue;
      for (int64_t n = 0; n < g->n; n++) {
         const int64_t p = n * g->cin + c;
         dw_plane_exact(DW_DATA, NULL, dy + p * g->p, dx + p * g->h * g->w, w + c * kk, 0.0f, NULL, g);
      }
   }
   return NR_OK;
}

nr_status nn_dw_backward_weight(const float *x, const float *dy, float *dw, const conv_geom *g, float scale,
                                float acc)
{
   const dw_layout q = dw_make_layout(g);
   const int64_t kk = g->kh * g->kw;
   bool oom = false;
#pragma omp parallel if (nr_parallel_worth(g->cin, g->n * g->p * kk))
   {
      float *ph, *dyq;
      double *sums = (double *)nn_scratch(2, (size_t)(2 * kk));
      const bool ok = sums && dw_buffers(&q, &ph, &dyq, true, true);
      if (!ok) {
#pragma omp atomic write
         oom = true;
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < g->cin; c++) {
         if (!ok) continue;
         for (int64_t t = 0; t < kk; t++) sums[t] = 0;
         bool finite = true;
         for (int64_t n = 0; n < g->n; n++) {
            const int64_t p = n * g->cin + c;
            dw_move(ph, (float *)(x + p * g->h * g->w), g, &q, true);
            dw_pitch(dy + p * g->p, dyq, g, &q);
            dw_plane_weight(ph, dyq, sums, g, &q);
         }
         /* a non-finite sum may hold 0 * inf from the padding or a dropped column (a finite one
          * cannot) */
         for (int64_t t = 0; t < kk; t++) finite = finite && isfinite(sums[t]);
         if (!finite) {
            for (int64_t t = 0; t < kk; t++) sums[t] = 0;
            for (int64_t n = 0; n < g->n; n++) {
               const int64_t p = n * g->cin + c;
               dw_plane_exact(DW_WEIGHT, x + p * g->h * g->w, dy + p * g->p, NULL, NULL, 0.0f, sums, g);
            }
         }
         float *o = dw + c * kk;
         for (int64_t t = 0; t < kk; t++) o[t] = (acc == 0 ? 0.0f : acc * o[t]) + (float)(scale * sums[t]);
      }
   }
   return oom ? dw_oom("weight-gradient", &q) : NR_OK;
}

/* test_perf_conv.c — the oneDNN convolution fast path (core/perf_dnnl_conv.c) against the layer
 * kernels' reference (nr_conv2d_*, core/nn_conv.c): forward (with and without bias), backward-data,
 * backward-weights with the scale/acc rule (dw = acc * dw + scale * grad, db likewise), for dense,
 * grouped and depthwise convolutions, strides, padding, dilation and odd sizes, in the oneDNN modes
 * (blocked layout with reorders, and plain NCHW). A case oneDNN does not take
 * (NR_PERF_UNHANDLED) is skipped and counted; a build without oneDNN skips everything.
 * Tolerance: |a - b| <= 1e-4 * (1 + max |reference|) (fp32 sums in a different order); the first
 * differing element is printed. Also checks that repeated calls reuse the cached primitives
 * (no tensor allocations) and that mode "never" leaves every call to the caller.
 */
#include "nr.h"
#include "perf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int failures = 0, handled = 0, skipped = 0;

typedef struct {
   int n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, dh, dw, g, bias;
} geom;

static nr_tensor *rnd(int nd, int64_t a, int64_t b, int64_t c, int64_t d)
{
   int64_t s[4] = {a, b, c, d};
   nr_tensor *t = nr_tensor_new(NR_F32, NR_CPU, nd, s);
   nr_rng_normal(t, 0, 1);
   return t;
}

static void compare(const char *what, const geom *G, int mode, const nr_tensor *ref, const nr_tensor *got)
{
   const float *r = ref->data, *o = got->data;
   int64_t n = nr_tensor_numel(ref);
   float mx = 0;
   for (int64_t i = 0; i < n; i++) mx = fmaxf(mx, fabsf(r[i]));
   for (int64_t i = 0; i < n; i++)
      if (!(fabsf(r[i] - o[i]) <= 1e-4f * (1 + mx))) {
         fprintf(stderr, "%s mode %d, %dx%dx%dx%d -> %d k%dx%d s%d,%d p%d,%d d%d,%d g%d bias%d: element %lld: "
                         "reference %.7g, oneDNN %.7g (max |ref| %.3g)\n",
                 what, mode, G->n, G->cin, G->h, G->w, G->cout, G->kh, G->kw, G->sh, G->sw, G->ph, G->pw, G->dh,
                 G->dw, G->g, G->bias, (long long)i, r[i], o[i], mx);
         failures++;
         return;
      }
}

static void copy(nr_tensor *dst, const nr_tensor *src) { nr_tensor_copy(dst, src); }

static void run(const geom *G, int mode)
{
   int ho = (G->h + 2 * G->ph - G->dh * (G->kh - 1) - 1) / G->sh + 1;
   int wo = (G->w + 2 * G->pw - G->dw * (G->kw - 1) - 1) / G->sw + 1;
   nr_tensor *x = rnd(4, G->n, G->cin, G->h, G->w), *w = rnd(4, G->cout, G->cin / G->g, G->kh, G->kw);
   nr_tensor *b = G->bias ? rnd(1, G->cout, 0, 0, 0) : NULL;
   nr_tensor *y0 = rnd(4, G->n, G->cout, ho, wo), *y1 = rnd(4, G->n, G->cout, ho, wo);
   nr_tensor *dy = rnd(4, G->n, G->cout, ho, wo);
   nr_tensor *dx0 = rnd(4, G->n, G->cin, G->h, G->w), *dx1 = rnd(4, G->n, G->cin, G->h, G->w);
   nr_tensor *dw0 = rnd(4, G->cout, G->cin / G->g, G->kh, G->kw), *dw1 = rnd(4, G->cout, G->cin / G->g, G->kh, G->kw);
   nr_tensor *db0 = G->bias ? rnd(1, G->cout, 0, 0, 0) : NULL, *db1 = G->bias ? rnd(1, G->cout, 0, 0, 0) : NULL;
   copy(dw1, dw0);
   if (G->bias) copy(db1, db0);
   /* the reference runs with the fast path off (nn_conv.c may call it), the fast path in `mode` */
#define REF(call) (nr_perf_conv_set_mode(2), (call))
#define FAST(call) (nr_perf_conv_set_mode(mode), (call))

   if (REF(nr_conv2d_forward(x, y0, w, b, G->sh, G->sw, G->ph, G->pw, G->dh, G->dw, G->g)) != NR_OK) {
      fprintf(stderr, "reference forward failed: %s\n", nr_last_error());
      failures++;
   }
   nr_status s = FAST(nr_perf_conv2d_forward(x, y1, w, b, G->sh, G->sw, G->ph, G->pw, G->dh, G->dw, G->g));
   if (s == NR_PERF_UNHANDLED) skipped++;
   else if (s != NR_OK) fprintf(stderr, "forward: %s\n", nr_last_error()), failures++;
   else handled++, compare("forward", G, mode, y0, y1);

   REF(nr_conv2d_backward_data(dy, dx0, w, G->sh, G->sw, G->ph, G->pw, G->dh, G->dw, G->g));
   s = FAST(nr_perf_conv2d_backward_data(dy, dx1, w, G->sh, G->sw, G->ph, G->pw, G->dh, G->dw, G->g));
   if (s == NR_PERF_UNHANDLED) skipped++;
   else if (s != NR_OK) fprintf(stderr, "backward_data: %s\n", nr_last_error()), failures++;
   else handled++, compare("backward_data", G, mode, dx0, dx1);

   /* accumulate (acc 1) a scaled gradient twice: exercises the fold and the cached primitive */
   for (int rep = 0; rep < 2; rep++) {
      REF(nr_conv2d_backward_weight(x, dy, dw0, db0, G->sh, G->sw, G->ph, G->pw, G->dh, G->dw, G->g, 0.5f, 1.0f));
      int64_t a0 = nr_memory_alloc_count(NR_CPU);
      s = FAST(nr_perf_conv2d_backward_weight(x, dy, dw1, db1, G->sh, G->sw, G->ph, G->pw, G->dh, G->dw, G->g, 0.5f,
                                              1.0f));
      if (s == NR_OK && rep == 1 && nr_memory_alloc_count(NR_CPU) != a0) {
         fprintf(stderr, "backward_weight allocated tensor storage on a repeated call\n");
         failures++;
      }
      if (s == NR_PERF_UNHANDLED) {
         skipped++;
         break;
      }
      if (s != NR_OK) {
         fprintf(stderr, "backward_weight: %s\n", nr_last_error());
         failures++;
         break;
      }
      handled++;
   }
   if (s == NR_OK) {
      compare("backward_weight dw", G, mode, dw0, dw1);
      if (G->bias) compare("backward_weight db", G, mode, db0, db1);
   }
#undef REF
#undef FAST
   nr_tensor *all[] = {x, w, b, y0, y1, dy, dx0, dx1, dw0, dw1, db0, db1};
   for (size_t i = 0; i < sizeof all / sizeof *all; i++) nr_tensor_free(all[i]);
}

int main(void)
{
   nr_set_num_threads(2);
   nr_rng_seed(3);
   static const geom CASES[] = {
      /* n cin h w cout kh kw sh sw ph pw dh dw g bias */
      {2, 16, 8, 8, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0},  /* dense 3x3, the auto path */
      {3, 16, 9, 7, 8, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1},   /* stride 2, odd sizes, bias */
      {2, 3, 11, 11, 8, 5, 3, 2, 1, 2, 0, 1, 1, 1, 1},  /* first layer, rectangular kernel */
      {2, 8, 10, 10, 8, 3, 3, 1, 1, 2, 2, 2, 2, 1, 0},  /* dilation 2 */
      {2, 8, 6, 6, 12, 3, 3, 1, 1, 1, 1, 1, 1, 2, 1},   /* groups 2 */
      {2, 8, 9, 9, 8, 3, 3, 2, 2, 1, 1, 1, 1, 8, 0},    /* depthwise stride 2 */
      {2, 16, 8, 8, 32, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0},  /* 1x1 */
      {2, 8, 9, 9, 8, 2, 2, 2, 2, 0, 0, 1, 1, 1, 0},    /* drops the last row/column */
   };
   for (int mode = 1; mode <= 3; mode += 2)
      for (size_t i = 0; i < sizeof CASES / sizeof *CASES; i++) run(&CASES[i], mode);

   /* mode 2 ("never"): every call is left to the caller */
   nr_perf_conv_set_mode(2);
   nr_tensor *x = rnd(4, 1, 16, 4, 4), *w = rnd(4, 16, 16, 3, 3), *y = rnd(4, 1, 16, 4, 4);
   if (nr_perf_conv2d_forward(x, y, w, NULL, 1, 1, 1, 1, 1, 1, 1) != NR_PERF_UNHANDLED) {
      fprintf(stderr, "mode 2 handled a forward\n");
      failures++;
   }
   nr_tensor_free(x), nr_tensor_free(w), nr_tensor_free(y);
   nr_perf_conv_set_mode(0);

   printf("perf conv: %d calls checked against the reference, %d left to the caller, %d failures\n", handled, skipped,
          failures);
   if (handled == 0) { /* oneDNN is part of every build: a run that checked nothing is a failure */
      fprintf(stderr, "perf conv: no call was handled by the oneDNN path, so nothing was checked\n");
      return 1;
   }
   return failures ? 1 : 0;
}

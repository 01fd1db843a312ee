/* conv_layers.c — per-layer-shape timing of the two CPU convolution paths, interleaved:
 * the layer kernels' im2col + OpenBLAS (nr_conv2d_*, core/nn_conv.c) against oneDNN
 * (nr_perf_conv2d_*, core/perf_dnnl_conv.c, blocked layout with reorders, and plain NCHW),
 * forward, backward-data and backward-weights, at the benchmark models' shapes.
 *
 *   gcc -O2 -std=gnu11 -Icore bench/conv_layers.c -Lbuild-perf -lnr -Wl,-rpath,$PWD/build-perf -o build-perf/conv_layers
 *   build-perf/conv_layers [threads=2] [reps=5] [filter substring]
 *
 * Prints per shape and direction the median ms of each path (reps rounds, the paths alternating
 * within a round so that machine load hits them alike), the ratio im2col/oneDNN, and the largest
 * absolute difference between the outputs (a check that both compute the same thing).
 * Not a test (no thresholds); bench/README.md records what it showed.
 */
#include "nr.h"
#include "perf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
   const char *name;
   int n, cin, h, w, cout, k, s, p, g;
} shape;

static const shape SHAPES[] = {
   {"vgg c1 3-64@32", 64, 3, 32, 32, 64, 3, 1, 1, 1},
   {"vgg 64-64@32", 64, 64, 32, 32, 64, 3, 1, 1, 1},
   {"vgg 64-128@32", 64, 64, 32, 32, 128, 3, 1, 1, 1},
   {"vgg 128-128@32", 64, 128, 32, 32, 128, 3, 1, 1, 1},
   {"vgg 128-256@16", 64, 128, 16, 16, 256, 3, 1, 1, 1},
   {"vgg 256-256@16", 64, 256, 16, 16, 256, 3, 1, 1, 1},
   {"vgg 256-512@16", 64, 256, 16, 16, 512, 3, 1, 1, 1},
   {"vgg 512-512@16", 64, 512, 16, 16, 512, 3, 1, 1, 1},
   {"vgg 512-512@8", 64, 512, 8, 8, 512, 3, 1, 1, 1},
   {"res 64-128s2@32", 64, 64, 32, 32, 128, 3, 2, 1, 1},
   {"res 1x1 64-128s2@32", 64, 64, 32, 32, 128, 1, 2, 0, 1},
   {"res 128-128@16", 64, 128, 16, 16, 128, 3, 1, 1, 1},
   {"res 256-256@8", 64, 256, 8, 8, 256, 3, 1, 1, 1},
   {"res 512-512@4", 64, 512, 4, 4, 512, 3, 1, 1, 1},
   {"mb stem 3-8s2@128", 32, 3, 128, 128, 8, 3, 2, 1, 1},
   {"mb dw8@64", 32, 8, 64, 64, 8, 3, 1, 1, 8},
   {"mb pw 8-16@64", 32, 8, 64, 64, 16, 1, 1, 0, 1},
   {"mb dw16s2@64", 32, 16, 64, 64, 16, 3, 2, 1, 16},
   {"mb pw 16-32@32", 32, 16, 32, 32, 32, 1, 1, 0, 1},
   {"mb dw32@32", 32, 32, 32, 32, 32, 3, 1, 1, 32},
   {"mb pw 32-64@16", 32, 32, 16, 16, 64, 1, 1, 0, 1},
   {"mb dw64@16", 32, 64, 16, 16, 64, 3, 1, 1, 64},
   {"mb pw 64-128@8", 32, 64, 8, 8, 128, 1, 1, 0, 1},
   {"mb dw128@8", 32, 128, 8, 8, 128, 3, 1, 1, 128},
   {"mb pw 128-128@8", 32, 128, 8, 8, 128, 1, 1, 0, 1},
   {"mb pw 256-256@4", 32, 256, 4, 4, 256, 1, 1, 0, 1},
   {"fm 1-32@28", 64, 1, 28, 28, 32, 3, 1, 1, 1},
   {"fm 32-64@14", 64, 32, 14, 14, 64, 3, 1, 1, 1},
};

static double now(void)
{
   struct timespec t;
   clock_gettime(CLOCK_MONOTONIC, &t);
   return t.tv_sec + t.tv_nsec * 1e-9;
}

static nr_tensor *rnd(int64_t a, int64_t b, int64_t c, int64_t d)
{
   int64_t s[4] = {a, b, c, d};
   nr_tensor *t = nr_tensor_new(NR_F32, NR_CPU, 4, s);
   nr_rng_normal(t, 0, 1);
   return t;
}

static float maxdiff(const nr_tensor *a, const nr_tensor *b)
{
   const float *pa = a->data, *pb = b->data;
   float m = 0;
   for (int64_t i = 0; i < nr_tensor_numel(a); i++) m = fmaxf(m, fabsf(pa[i] - pb[i]));
   return m;
}

static int cmpd(const void *a, const void *b)
{
   double x = *(const double *)a, y = *(const double *)b;
   return x < y ? -1 : x > y;
}

static double med(double *v, int n)
{
   qsort(v, n, sizeof *v, cmpd);
   return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#define CHECK(call)                                                                                 \
   do {                                                                                             \
      nr_status s_ = (call);                                                                        \
      if (s_ != NR_OK) {                                                                            \
         fprintf(stderr, "%s: %s\n", #call, nr_last_error());                                       \
         exit(1);                                                                                   \
      }                                                                                             \
   } while (0)

int main(int argc, char **argv)
{
   int threads = argc > 1 ? atoi(argv[1]) : 2, reps = argc > 2 ? atoi(argv[2]) : 5;
   const char *filter = argc > 3 ? argv[3] : NULL;
   nr_set_num_threads(threads);
   nr_rng_seed(1);
   printf("%-22s %-5s %9s %9s %9s %7s %7s %9s\n", "shape", "dir", "im2col", "dnnl", "dnnl_pl", "i/d", "i/dpl",
          "maxdiff");
   double tot[3][3] = {{0}};
   for (size_t si = 0; si < sizeof SHAPES / sizeof *SHAPES; si++) {
      const shape *S = &SHAPES[si];
      if (filter && !strstr(S->name, filter)) continue;
      int ho = (S->h + 2 * S->p - S->k) / S->s + 1, wo = (S->w + 2 * S->p - S->k) / S->s + 1;
      nr_tensor *x = rnd(S->n, S->cin, S->h, S->w), *w = rnd(S->cout, S->cin / S->g, S->k, S->k);
      nr_tensor *y0 = rnd(S->n, S->cout, ho, wo), *y1 = rnd(S->n, S->cout, ho, wo);
      nr_tensor *dy = rnd(S->n, S->cout, ho, wo);
      nr_tensor *dx0 = rnd(S->n, S->cin, S->h, S->w), *dx1 = rnd(S->n, S->cin, S->h, S->w);
      nr_tensor *dw0 = rnd(S->cout, S->cin / S->g, S->k, S->k), *dw1 = rnd(S->cout, S->cin / S->g, S->k, S->k);
      double t[3][3][64];
      int r = reps > 64 ? 64 : reps;
      float diff[3] = {0};
      for (int it = -1; it < r; it++) { /* it == -1: warm-up (primitive creation) */
         for (int path = 0; path < 3; path++) {
            if (path > 0) nr_perf_conv_set_mode(path == 1 ? 1 : 3);
            nr_tensor *y = path ? y1 : y0, *dx = path ? dx1 : dx0, *dwt = path ? dw1 : dw0;
            double t0 = now();
            if (path == 0) CHECK(nr_conv2d_forward(x, y, w, NULL, S->s, S->s, S->p, S->p, 1, 1, S->g));
            else CHECK(nr_perf_conv2d_forward(x, y, w, NULL, S->s, S->s, S->p, S->p, 1, 1, S->g));
            double t1 = now();
            if (path == 0) CHECK(nr_conv2d_backward_data(dy, dx, w, S->s, S->s, S->p, S->p, 1, 1, S->g));
            else CHECK(nr_perf_conv2d_backward_data(dy, dx, w, S->s, S->s, S->p, S->p, 1, 1, S->g));
            double t2 = now();
            if (path == 0)
               CHECK(nr_conv2d_backward_weight(x, dy, dwt, NULL, S->s, S->s, S->p, S->p, 1, 1, S->g, 1, 0));
            else
               CHECK(nr_perf_conv2d_backward_weight(x, dy, dwt, NULL, S->s, S->s, S->p, S->p, 1, 1, S->g, 1, 0));
            double t3 = now();
            if (it >= 0) t[path][0][it] = t1 - t0, t[path][1][it] = t2 - t1, t[path][2][it] = t3 - t2;
            if (path > 0 && it == r - 1) {
               diff[0] = fmaxf(diff[0], maxdiff(y0, y1));
               diff[1] = fmaxf(diff[1], maxdiff(dx0, dx1));
               diff[2] = fmaxf(diff[2], maxdiff(dw0, dw1) / (float)(S->n * ho * wo) * 100.0f);
            }
         }
      }
      static const char *DIR[3] = {"fwd", "bwd_d", "bwd_w"};
      for (int d = 0; d < 3; d++) {
         double m[3];
         for (int p = 0; p < 3; p++) m[p] = med(t[p][d], r), tot[p][d] += m[p];
         printf("%-22s %-5s %9.2f %9.2f %9.2f %7.2f %7.2f %9.2g\n", S->name, DIR[d], m[0] * 1e3, m[1] * 1e3,
                m[2] * 1e3, m[0] / m[1], m[0] / m[2], diff[d]);
      }
      fflush(stdout);
      nr_tensor *all[] = {x, w, y0, y1, dy, dx0, dx1, dw0, dw1};
      for (size_t i = 0; i < sizeof all / sizeof *all; i++) nr_tensor_free(all[i]);
   }
   printf("%-22s %-5s %9.1f %9.1f %9.1f\n", "TOTAL", "all", (tot[0][0] + tot[0][1] + tot[0][2]) * 1e3,
          (tot[1][0] + tot[1][1] + tot[1][2]) * 1e3, (tot[2][0] + tot[2][1] + tot[2][2]) * 1e3);
   return 0;
}

/* test_vec_math.c — the accuracy of core/vec_math.h's exp, expm1, tanh and erf against the
 * double-precision math library, over every 257th float bit pattern (16.7 M values of each sign
 * and exponent) and the special values; then the same sweep through the library's own
 * vectorized loops (nr_activation_forward: tanh, and ELU with alpha 1, which is expm1 below 0),
 * as compiled for this CPU. Bounds: exp 1.5 ulp, expm1 2.5 ulp, tanh 3 ulp (of the result),
 * erf 5e-7 absolute. Prints the worst case of each and exits non-zero past a bound. */
#include "nr.h"
#include "vec_math.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int failures = 0;
#define CHECK(cond, ...)                                                 \
   do {                                                                  \
      if (!(cond)) {                                                     \
         fprintf(stderr, "%s:%d: check failed: ", __FILE__, __LINE__);   \
         fprintf(stderr, __VA_ARGS__);                                   \
         fprintf(stderr, "\n");                                          \
         failures++;                                                     \
      }                                                                  \
   } while (0)

/* one unit in the last place of float r (the smallest denormal's below FLT_MIN) */
static double ulp_of(double r)
{
   const float f = (float)fabs(r);
   if (f < FLT_MIN) return (double)nextafterf(0.0f, 1.0f);
   return (double)nextafterf(f, INFINITY) - (double)f;
}

typedef struct {
   const char *name;
   double worst;
   float at;
} worst_case;

static void note(worst_case *w, double err, float x)
{
   if (err > w->worst) {
      w->worst = err;
      w->at = x;
   }
}

static void report(const worst_case *w, double bound, const char *unit)
{
   printf("%-14s worst %.3g %s at x = %.9g (bound %g)\n", w->name, w->worst, unit, (double)w->at, bound);
   CHECK(w->worst <= bound, "%s: %.3g %s at x = %.9g, past %g", w->name, w->worst, unit, (double)w->at, bound);
}

enum { STRIDE = 257 };

static void sweep_scalar(void)
{
   worst_case e = {"exp", 0, 0}, m = {"expm1", 0, 0}, t = {"tanh", 0, 0}, f = {"erf", 0, 0};
   for (uint64_t u = 0; u < 0x100000000ull; u += STRIDE) {
      const float x = nr_vm_bits_to_float((uint32_t)u);
      if (x != x) continue;
      const double d = x;
      /* exp: normal results only (below FLT_MIN they are flushed to 0, as documented) */
      if (d > -87.33 && d < 88.72) note(&e, fabs(nr_vexpf(x) - exp(d)) / ulp_of(exp(d)), x);
      if (d < 88.72) note(&m, fabs(nr_vexpm1f(x) - expm1(d)) / ulp_of(expm1(d)), x);
      note(&t, fabs(nr_vtanhf(x) - tanh(d)) / ulp_of(tanh(d)), x);
      note(&f, fabs(nr_verff(x) - erf(d)), x);
   }
   report(&e, 1.5, "ulp");
   report(&m, 2.5, "ulp");
   report(&t, 3.0, "ulp");
   report(&f, 5e-7, "abs");
}

static void special_values(void)
{
   const float nan = NAN, inf = INFINITY;
   CHECK(isnan(nr_vexpf(nan)) && isnan(nr_vexpm1f(nan)) && isnan(nr_vtanhf(nan)) && isnan(nr_verff(nan)),
         "a NaN gives NaN");
   CHECK(nr_vexpf(inf) == inf && nr_vexpf(-inf) == 0.0f, "exp(+-inf) = %g, %g", nr_vexpf(inf), nr_vexpf(-inf));
   CHECK(nr_vexpm1f(inf) == inf && nr_vexpm1f(-inf) == -1.0f, "expm1(+-inf) = %g, %g", nr_vexpm1f(inf), nr_vexpm1f(-inf));
   CHECK(nr_vtanhf(inf) == 1.0f && nr_vtanhf(-inf) == -1.0f, "tanh(+-inf) = %g, %g", nr_vtanhf(inf), nr_vtanhf(-inf));
   CHECK(nr_verff(inf) == 1.0f && nr_verff(-inf) == -1.0f, "erf(+-inf) = %g, %g", nr_verff(inf), nr_verff(-inf));
   /* the ends of exp's range: the largest finite result, the first overflowing input, the flush */
   CHECK(isfinite(nr_vexpf(88.72f)) && nr_vexpf(88.72f) > 3.3e38f, "exp(88.72) = %g", nr_vexpf(88.72f));
   CHECK(nr_vexpf(88.73f) == inf, "exp(88.73) = %g", nr_vexpf(88.73f));
   CHECK(nr_vexpf(-87.3f) > 0.0f && nr_vexpf(-200.0f) == 0.0f, "exp(-87.3) = %g, exp(-200) = %g", nr_vexpf(-87.3f),
         nr_vexpf(-200.0f));
   /* signs of zeros and odd symmetry */
   CHECK(signbit(nr_vtanhf(-0.0f)) && nr_vtanhf(-0.0f) == 0.0f && signbit(nr_verff(-0.0f)), "tanh, erf of -0 are -0");
   CHECK(nr_vtanhf(-0.3f) == -nr_vtanhf(0.3f) && nr_verff(-2.0f) == -nr_verff(2.0f), "tanh, erf are odd");
   CHECK(nr_vexpf(0.0f) == 1.0f && nr_vexpm1f(0.0f) == 0.0f && nr_vexpm1f(1e-30f) == 1e-30f, "exp(0), expm1(0), expm1(tiny)");
}

/* The library's loops (vectorized, the clone this CPU runs) against the double references. */
static void sweep_library(void)
{
   const int64_t n = (int64_t)(0x100000000ull / STRIDE) + 1;
   nr_tensor *x = nr_tensor_new(NR_F32, NR_CPU, 1, &n), *y = nr_tensor_new(NR_F32, NR_CPU, 1, &n);
   CHECK(x && y, "allocating %lld floats", (long long)n);
   if (!x || !y) return;
   float *px = x->data, *py = y->data;
   for (int64_t i = 0; i < n; i++) {
      const float v = nr_vm_bits_to_float((uint32_t)((uint64_t)i * STRIDE));
      px[i] = v != v ? 0.0f : v;
   }
   worst_case t = {"tanh (loop)", 0, 0}, m = {"ELU<0 (loop)", 0, 0};
   CHECK(nr_activation_forward(x, y, NR_ACT_TANH, 0.0f) == NR_OK, "tanh: %s", nr_last_error());
   for (int64_t i = 0; i < n; i++) note(&t, fabs(py[i] - tanh((double)px[i])) / ulp_of(tanh((double)px[i])), px[i]);
   CHECK(nr_activation_forward(x, y, NR_ACT_ELU, 1.0f) == NR_OK, "ELU: %s", nr_last_error());
   for (int64_t i = 0; i < n; i++)
      if (px[i] <= 0.0f) note(&m, fabs(py[i] - expm1((double)px[i])) / ulp_of(expm1((double)px[i])), px[i]);
   report(&t, 3.0, "ulp");
   report(&m, 2.5, "ulp");
   nr_tensor_free(x);
   nr_tensor_free(y);
}

int main(void)
{
   sweep_scalar();
   special_values();
   sweep_library();
   if (failures) {
      fprintf(stderr, "test_vec_math: %d failure(s)\n", failures);
      return 1;
   }
   printf("test_vec_math: all checks passed\n");
   return 0;
}

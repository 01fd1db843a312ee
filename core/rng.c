/* rng.c — the global generator: xoshiro256** seeded by splitmix64.
 * Invariant: draws happen in element order on one thread, so a seed reproduces every tensor
 * exactly whatever the thread count. Normal draws use Box-Muller in double precision. */
#include "internal.h"

#include <math.h>

static uint64_t g_state[4] = {0x9e3779b97f4a7c15ull, 0xbf58476d1ce4e5b9ull, 0x94d049bb133111ebull, 1};

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t nr_rng_next(void)
{
   uint64_t *s = g_state;
   uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
   s[2] ^= s[0];
   s[3] ^= s[1];
   s[1] ^= s[2];
   s[0] ^= s[3];
   s[2] ^= t;
   s[3] = rotl(s[3], 45);
   return result;
}

void nr_rng_seed(uint64_t seed)
{
   for (int i = 0; i < 4; i++) {
      uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      g_state[i] = z ^ (z >> 31);
   }
}

void nr_rng_get_state(uint64_t *state4)
{
   for (int i = 0; i < 4; i++) state4[i] = g_state[i];
}
void nr_rng_set_state(const uint64_t *state4)
{
   for (int i = 0; i < 4; i++) g_state[i] = state4[i];
}

/* Uniform double in [0, 1) with 53 random bits. */
static inline double uniform01(void) { return (double)(nr_rng_next() >> 11) * 0x1.0p-53; }

/* Fills through a contiguous host staging copy when t is on a device or strided; a bf16 tensor
 * through an f32 one (the same draws as f32, then rounded). */
/* One uniform draw in [a, b) for the target dtype: float32's rounding of a + (b - a)·u can land on
 * b (u within 2^-25 of 1), and bfloat16's (8 bits) often does, so a draw that rounds to b or
 * past it becomes the largest value of the dtype below b (PyTorch's rand is half-open too). */
static float uniform_draw(double a, double b, int bf16)
{
   float v = (float)(a + (b - a) * uniform01());
   if (bf16) {
      float r = nr_bf16_to_f32(nr_f32_to_bf16(v));
      if (r >= (float)b && b > a) {
         uint16_t h = nr_f32_to_bf16((float)b);
         /* the bf16 just below b (b > 0: one step down in magnitude; b <= 0: one step up) */
         h = (float)b > 0 ? (uint16_t)(h - 1) : (float)b < 0 ? (uint16_t)(h + 1) : (uint16_t)0x8001;
         const float below = nr_bf16_to_f32(h);
         /* a range narrower than one bfloat16 step holds none: a, rounded */
         return below < (float)a ? nr_bf16_to_f32(nr_f32_to_bf16((float)a)) : below;
      }
      return r;
   }
   if (v >= (float)b && b > a) {
      v = nextafterf((float)b, -INFINITY);
      if (v < (float)a) v = (float)a; /* a range narrower than one float step */
   }
   return v;
}

static nr_status fill_with(nr_tensor *t, int kind, double a, double b)
{
   int64_t n = nr_tensor_numel(t);
   nr_tensor *host = t;
   bool staged = t->device != NR_CPU || !nr_tensor_is_contiguous(t) || t->dtype == NR_BF16;
   if (staged) {
      host = nr_tensor_new(t->dtype == NR_BF16 ? NR_F32 : t->dtype, NR_CPU, t->ndim, t->shape);
      if (!host) return NR_E_OOM;
   }
   if (host->dtype == NR_F32) {
      float *p = host->data;
      if (kind == 0) {
         const int bf16 = t->dtype == NR_BF16;
         for (int64_t i = 0; i < n; i++) p[i] = uniform_draw(a, b, bf16);
      }
      else if (kind == 1) {
         for (int64_t i = 0; i < n; i += 2) {
            double u1 = uniform01(), u2 = uniform01();
            double r = sqrt(-2.0 * log(1.0 - u1));
            p[i] = (float)(a + b * r * cos(2 * M_PI * u2));
            if (i + 1 < n) p[i + 1] = (float)(a + b * r * sin(2 * M_PI * u2));
         }
      } else
         for (int64_t i = 0; i < n; i++) p[i] = uniform01() < a ? 1.0f : 0.0f;
   } else {
      /* integers: lo + k, in unsigned 64-bit arithmetic (wraps, never overflows; a double sum
       * would round k past 2^53 to even); bounds are whole and within int64 (nr_rng_uniform) */
      const uint64_t lo = kind == 0 ? (uint64_t)(int64_t)a : 0;
      const uint64_t hi = kind == 0 ? (b >= 0x1p63 ? (uint64_t)1 << 63 : (uint64_t)(int64_t)b) : 0;
      const uint64_t span = hi - lo; /* 0 only for the full 2^64 range */
      for (int64_t i = 0; i < n; i++) {
         int64_t v;
         if (kind == 0) v = (int64_t)(lo + (span ? nr_rng_next() % span : nr_rng_next()));
         else v = uniform01() < a ? 1 : 0;
         if (host->dtype == NR_I64) ((int64_t *)host->data)[i] = v;
         else ((uint8_t *)host->data)[i] = (uint8_t)v;
      }
   }
   nr_status st = NR_OK;
   if (staged) {
      st = nr_tensor_copy(t, host);
      nr_tensor_free(host);
   }
   return st;
}

nr_status nr_rng_uniform(nr_tensor *t, double lo, double hi)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   if (!(hi >= lo)) return NR_FAIL(NR_E_ARG, "empty range [%g, %g)", lo, hi);
   if (t->dtype != NR_F32 && t->dtype != NR_BF16) {
      if (!(hi > lo)) return NR_FAIL(NR_E_ARG, "empty integer range [%g, %g)", lo, hi);
      /* whole numbers an int64 holds (hi itself may be 2^63: it is never drawn) */
      if (lo != floor(lo) || hi != floor(hi) || lo < -0x1p63 || hi > 0x1p63)
         return NR_FAIL(NR_E_ARG, "integer range [%g, %g) needs whole bounds within int64", lo, hi);
      if (t->dtype == NR_U8 && (lo < 0 || hi > 256))
         return NR_FAIL(NR_E_ARG, "uint8 range [%g, %g) reaches outside 0..255", lo, hi);
   }
   return fill_with(t, 0, lo, hi);
}

nr_status nr_rng_normal(nr_tensor *t, double mean, double std)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   if (t->dtype != NR_F32 && t->dtype != NR_BF16)
      return NR_FAIL(NR_E_ARG, "normal draws need an f32 or bf16 tensor, got %s", nr_dtype_name(t->dtype));
   if (!(std >= 0)) return NR_FAIL(NR_E_ARG, "std must be >= 0, got %g", std);
   return fill_with(t, 1, mean, std);
}

nr_status nr_rng_bernoulli(nr_tensor *t, double p)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   if (t->dtype == NR_I64) return NR_FAIL(NR_E_ARG, "bernoulli needs an f32 or uint8 tensor");
   if (!(p >= 0 && p <= 1)) return NR_FAIL(NR_E_ARG, "probability %g outside [0, 1]", p);
   return fill_with(t, 2, p, 0);
}

nr_status nr_rng_permutation(nr_tensor *out)
{
   NR_CHECK_T("out", out, NR_I64, NR_CPU, 1, NULL);
   NR_CHECK_CONTIG("out", out);
   int64_t n = out->shape[0], *p = out->data;
   for (int64_t i = 0; i < n; i++) p[i] = i;
   for (int64_t i = n - 1; i > 0; i--) {
      int64_t j = (int64_t)(nr_rng_next() % (uint64_t)(i + 1)), tmp = p[i];
      p[i] = p[j];
      p[j] = tmp;
   }
   return NR_OK;
}

/* test_tensor.c — C unit tests of the tensor core: allocation accounting, views and reference
 * counting, strided copies with dtype conversion, error messages on bad arguments, npy round
 * trip, atomic writes. Prints the first failing check and exits non-zero. */
#include "nr.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
#define CHECK(cond)                                                                             \
   do {                                                                                         \
      if (!(cond)) {                                                                            \
         fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
                 nr_last_error());                                                              \
         failures++;                                                                            \
      }                                                                                         \
   } while (0)

static void test_alloc_and_views(void)
{
   int64_t before = nr_memory_in_use(NR_CPU);
   int64_t shape[2] = {3, 4};
   nr_tensor *t = nr_tensor_new(NR_F32, NR_CPU, 2, shape);
   CHECK(t != NULL);
   CHECK(nr_tensor_numel(t) == 12);
   CHECK(nr_memory_in_use(NR_CPU) >= before + 48);
   for (int i = 0; i < 12; i++) CHECK(nr_tensor_set(t, i, i) == NR_OK);
   /* transpose view */
   int64_t vs[2] = {4, 3}, vst[2] = {1, 4};
   nr_tensor *v = nr_tensor_view(t, 2, vs, vst, 0);
   CHECK(v != NULL);
   CHECK(!nr_tensor_is_contiguous(v));
   double x = -1;
   CHECK(nr_tensor_get(v, 1, &x) == NR_OK && x == 4); /* v[0][1] = t[1][0] */
   /* the storage survives the first view's release */
   nr_tensor_free(t);
   CHECK(nr_tensor_get(v, 11, &x) == NR_OK && x == 11);
   /* a contiguous copy with conversion to int64 */
   nr_tensor *c = nr_tensor_new(NR_I64, NR_CPU, 2, vs);
   CHECK(nr_tensor_copy(c, v) == NR_OK);
   CHECK(((int64_t *)c->data)[1] == 4);
   nr_tensor_free(c);
   nr_tensor_free(v);
   CHECK(nr_memory_in_use(NR_CPU) == before);
   /* views outside the storage are refused */
   nr_tensor *u = nr_tensor_new(NR_F32, NR_CPU, 2, shape);
   int64_t bad[2] = {3, 5}, st[2] = {4, 1};
   CHECK(nr_tensor_view(u, 2, bad, st, 0) == NULL);
   CHECK(strstr(nr_last_error(), "outside its storage") != NULL);
   nr_tensor_free(u);
}

static void test_errors(void)
{
   int64_t s1[1] = {3}, s2[1] = {4};
   nr_tensor *a = nr_tensor_new(NR_F32, NR_CPU, 1, s1), *b = nr_tensor_new(NR_F32, NR_CPU, 1, s2);
   CHECK(nr_binary(a, b, a, NR_OP_ADD) == NR_E_ARG);
   CHECK(strstr(nr_last_error(), "nr_binary") != NULL);
   CHECK(strstr(nr_last_error(), "(3)") != NULL && strstr(nr_last_error(), "(4)") != NULL);
   CHECK(nr_binary(a, a, a, 99) == NR_E_ARG);
   CHECK(nr_tensor_get(a, 3, NULL) == NR_E_ARG);
   int64_t neg[1] = {-2};
   CHECK(nr_tensor_new(NR_F32, NR_CPU, 1, neg) == NULL);
   CHECK(nr_tensor_new(7, NR_CPU, 1, s1) == NULL);
   CHECK(nr_matmul(a, b, a, 0, 0, 1, 0) == NR_E_ARG);
   CHECK(nr_npy_load("/nonexistent/x.npy") == NULL);
   CHECK(strstr(nr_last_error(), "/nonexistent/x.npy") != NULL);
   nr_tensor_free(a);
   nr_tensor_free(b);
}

static void test_npy_and_atomic(void)
{
   const char *path = "test_tensor_roundtrip.npy";
   int64_t shape[3] = {2, 3, 5};
   nr_tensor *t = nr_tensor_new(NR_F32, NR_CPU, 3, shape);
   nr_rng_seed(3);
   CHECK(nr_rng_normal(t, 0, 1) == NR_OK);
   CHECK(nr_npy_save(t, path) == NR_OK);
   nr_tensor *u = nr_npy_load(path);
   CHECK(u != NULL && u->ndim == 3 && u->shape[2] == 5);
   if (u) CHECK(memcmp(t->data, u->data, 30 * sizeof(float)) == 0);
   nr_tensor_free(u);
   nr_tensor_free(t);
   /* a corrupt file is a format error, not a crash */
   CHECK(nr_file_write_atomic(path, "\x93NUMPX", 6) == NR_OK);
   CHECK(nr_npy_load(path) == NULL);
   CHECK(strstr(nr_last_error(), "bad magic") != NULL);
   remove(path);
}

static void test_rng(void)
{
   int64_t shape[1] = {1000};
   nr_tensor *a = nr_tensor_new(NR_F32, NR_CPU, 1, shape), *b = nr_tensor_new(NR_F32, NR_CPU, 1, shape);
   nr_rng_seed(42);
   nr_rng_uniform(a, -1, 1);
   uint64_t st[4];
   nr_rng_get_state(st);
   nr_rng_uniform(b, -1, 1);
   nr_rng_set_state(st);
   nr_tensor *c = nr_tensor_new(NR_F32, NR_CPU, 1, shape);
   nr_rng_uniform(c, -1, 1);
   CHECK(memcmp(b->data, c->data, 4000) == 0);
   double mean = 0;
   for (int i = 0; i < 1000; i++) {
      float v = ((float *)a->data)[i];
      CHECK(v >= -1 && v < 1);
      mean += v;
   }
   CHECK(fabs(mean / 1000) < 0.1);
   nr_tensor_free(a);
   nr_tensor_free(b);
   nr_tensor_free(c);
}

int main(void)
{
   test_alloc_and_views();
   test_errors();
   test_npy_and_atomic();
   test_rng();
   if (failures) {
      fprintf(stderr, "%d check(s) failed\n", failures);
      return 1;
   }
   printf("test_tensor: all checks passed\n");
   return 0;
}

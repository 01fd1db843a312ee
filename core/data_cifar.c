/* data_cifar.c — CIFAR-10 and CIFAR-100 in their binary formats, loaded fully at open.
 *
 * CIFAR-10: data_batch_1..5.bin (train) or test_batch.bin (test); records of 1 label byte and
 * 3072 pixel bytes (R plane, G plane, B plane, each 32x32 row-major). CIFAR-100: train.bin /
 * test.bin; records of a coarse label byte, a fine label byte and 3072 pixel bytes.
 * Invariants: every file's size is a whole number of records and every label is in range, else
 * the open fails naming the file; pixels stay planar (C, H, W) per sample in memory.
 */
#include "data_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int file_exists(const char *p)
{
   struct stat st;
   return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

nr_dataset *nr_dataset_open_cifar(const char *root, int32_t kind, int32_t train, int32_t coarse)
{
   if (!root || (kind != 10 && kind != 100)) {
      NR_FAIL(NR_E_ARG, "kind must be 10 or 100 and root set");
      return NULL;
   }
   const char *sub = kind == 10 ? "cifar-10-batches-bin" : "cifar-100-binary";
   const char *names10[5] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                             "data_batch_5.bin"};
   const char *test10[1] = {"test_batch.bin"};
   const char *train100[1] = {"train.bin"};
   const char *test100[1] = {"test.bin"};
   const char **names = kind == 10 ? (train ? names10 : test10) : (train ? train100 : test100);
   int nfiles = kind == 10 && train ? 5 : 1;
   int lbytes = kind == 10 ? 1 : 2;
   int64_t rec = lbytes + 3072;
   /* the folder: root itself or root/<sub> */
   char dir[2048], path[4096];
   snprintf(dir, sizeof dir, "%s", root);
   snprintf(path, sizeof path, "%s/%s", dir, names[0]);
   if (!file_exists(path)) {
      snprintf(dir, sizeof dir, "%s/%s", root, sub);
      snprintf(path, sizeof path, "%s/%s", dir, names[0]);
      if (!file_exists(path)) {
         NR_FAIL(NR_E_IO, "CIFAR-%d not found: no %s in %s or %s/%s (expected the binary version: %s%s; "
                 "download cifar-%d-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it "
                 "and point --data at the folder)", kind, names[0], root, root, sub,
                 kind == 10 ? "data_batch_1..5.bin, test_batch.bin" : "train.bin, test.bin", "", kind);
         return NULL;
      }
   }
   int64_t sizes[5], total = 0;
   for (int k = 0; k < nfiles; k++) {
      snprintf(path, sizeof path, "%s/%s", dir, names[k]);
      struct stat st;
      if (stat(path, &st) != 0) {
         NR_FAIL(NR_E_IO, "CIFAR-%d: missing %s: %s", kind, path, strerror(errno));
         return NULL;
      }
      if (!S_ISREG(st.st_mode)) {
         NR_FAIL(NR_E_IO, "CIFAR-%d: %s is a %s, not a CIFAR binary file", kind, path,
                 S_ISDIR(st.st_mode) ? "directory" : "special file");
         return NULL;
      }
      if (st.st_size == 0 || st.st_size % rec != 0) {
         NR_FAIL(NR_E_FORMAT, "%s: size %lld bytes is not a whole number of %lld-byte records (truncated or not "
                 "CIFAR-%d binary)", path, (long long)st.st_size, (long long)rec, kind);
         return NULL;
      }
      sizes[k] = st.st_size / rec;
      total += sizes[k];
   }
   nr_dataset *ds = nr_dataset_alloc();
   if (!ds) return NULL;
   ds->kind = NR_DS_MEMORY;
   ds->n = total;
   ds->classes = kind == 10 ? 10 : coarse ? 20 : 100;
   ds->channels = 3;
   ds->height = ds->width = 32;
   ds->sample_bytes = 3072;
   ds->sy = 32;
   ds->sx = 1;
   ds->sc = 1024;
   snprintf(ds->root, sizeof ds->root, "%s", dir);
   ds->pixels = malloc((size_t)(total * 3072));
   ds->labels = malloc((size_t)total * sizeof(int32_t));
   unsigned char *buf = malloc((size_t)rec * 1024);
   FILE *f = NULL;
   if (!ds->pixels || !ds->labels || !buf) {
      NR_FAIL(NR_E_OOM, "out of memory for %lld CIFAR images", (long long)total);
      goto fail;
   }
   int64_t i = 0;
   for (int k = 0; k < nfiles; k++) {
      snprintf(path, sizeof path, "%s/%s", dir, names[k]);
      f = fopen(path, "rb");
      if (!f) {
         NR_FAIL(NR_E_IO, "cannot open %s: %s", path, strerror(errno));
         goto fail;
      }
      int64_t left = sizes[k], r = 0;
      while (left > 0) {
         int64_t m = left < 1024 ? left : 1024;
         if (fread(buf, (size_t)rec, (size_t)m, f) != (size_t)m) {
            NR_FAIL(NR_E_IO, "%s: read failed at record %lld: %s", path, (long long)r,
                    ferror(f) ? strerror(errno) : "unexpected end of file");
            goto fail;
         }
         for (int64_t j = 0; j < m; j++, r++, i++) {
            const unsigned char *p = buf + j * rec;
            int label = kind == 10 ? p[0] : coarse ? p[0] : p[1];
            /* CIFAR-100: both label bytes are checked, the one not used too (a record whose other
             * byte is out of range is damaged, or not CIFAR-100) */
            const int other = kind == 100 ? (coarse ? p[1] : p[0]) : 0, other_max = coarse ? 99 : 19;
            if (label >= ds->classes || other > other_max) {
               const int bad_used = label >= ds->classes;
               NR_FAIL(NR_E_FORMAT, "%s: record %lld has %slabel %d, out of range 0..%d (is this CIFAR-%d?)", path,
                       (long long)r, kind == 100 ? ((coarse == bad_used) ? "coarse " : "fine ") : "",
                       bad_used ? label : other, bad_used ? ds->classes - 1 : other_max, kind);
               goto fail;
            }
            ds->labels[i] = label;
            memcpy(ds->pixels + i * 3072, p + lbytes, 3072);
         }
         left -= m;
      }
      fclose(f);
      f = NULL;
   }
   free(buf);
   return ds;
fail:
   if (f) fclose(f);
   free(buf);
   nr_dataset_free(ds);
   return NULL;
}

/* data_idx.c — IDX files (MNIST, Fashion-MNIST), gzipped or raw, read through zlib.
 *
 * Format: big-endian magic 0x00000803 (uint8, 3 dims: N, H, W) for images and 0x00000801
 * (uint8, 1 dim: N) for labels, then the bytes. gzread passes raw files through unchanged.
 * Invariants: the whole file is loaded at open; the image and label counts must agree and every
 * label must lie in 0..classes-1, else the open fails naming the file and the offending value.
 */
#include "data_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

/* zlib's message without the "path: " prefix gzerror adds. */
static const char *gz_message(gzFile f, const char *path)
{
   int zerr;
   const char *msg = gzerror(f, &zerr);
   if (zerr == Z_ERRNO) return strerror(errno);
   size_t n = strlen(path);
   if (!strncmp(msg, path, n) && msg[n] == ':' && msg[n + 1] == ' ') return msg + n + 2;
   return msg;
}

/* Reads exactly n bytes; a short read is a truncated or corrupt file, named in the message.
 * The last GZ_TAIL bytes are read on their own: a request that small goes through zlib's own
 * buffer, which decompresses on to the gzip stream's end (checking its CRC and length) or runs
 * into the file's end ("unexpected end of file", seen by check_end). A large request is
 * decompressed straight into buf and stops once buf is full, so a file cut inside its gzip
 * trailer (or its last deflate bytes) ended exactly there, and read as a clean end: data
 * damaged and cut loaded silently. */
enum { GZ_TAIL = 4096 };
static nr_status gz_read_exact(gzFile f, void *buf, size_t n, const char *path, const char *what)
{
   size_t got = 0;
   while (got < n) {
      const size_t left = n - got, want = left > GZ_TAIL ? left - GZ_TAIL : left;
      unsigned chunk = (unsigned)(want > (1u << 30) ? (1u << 30) : want);
      int r = gzread(f, (char *)buf + got, chunk);
      if (r < 0) return NR_FAIL(NR_E_FORMAT, "%s: corrupt gzip data while reading %s: %s", path, what, gz_message(f, path));
      if (r == 0) {
         int zerr;
         gzerror(f, &zerr);
         if (zerr != Z_OK && zerr != Z_STREAM_END)
            return NR_FAIL(NR_E_FORMAT, "%s: truncated or corrupt gzip file while reading %s (%zu of %zu bytes): %s",
                           path, what, got, n, gz_message(f, path));
         return NR_FAIL(NR_E_FORMAT, "%s: file is truncated: expected %zu bytes of %s, only %zu present", path, n, what, got);
      }
      got += (size_t)r;
   }
   return NR_OK;
}

static uint32_t be32(const unsigned char *p)
{
   return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* After the data: reading on must hit a clean end (this also verifies the gzip CRC). */
static nr_status check_end(gzFile f, const char *path)
{
   unsigned char extra;
   int r = gzread(f, &extra, 1);
   if (r < 0) return NR_FAIL(NR_E_FORMAT, "%s: corrupt gzip data: %s", path, gz_message(f, path));
   if (r > 0) return NR_FAIL(NR_E_FORMAT, "%s: file is longer than its header says (trailing bytes)", path);
   /* a clean end says Z_OK; a gzip stream cut before its trailer (CRC and length) ends with
    * "unexpected end of file" (set by gz_read_exact's last read), which gzread reports as 0 bytes
    * read */
   int err = Z_OK;
   gzerror(f, &err);
   if (err != Z_OK) return NR_FAIL(NR_E_FORMAT, "%s: truncated or corrupt gzip data: %s", path, gz_message(f, path));
   return NR_OK;
}

/* Opens an IDX file and checks its magic; dims[ndim] <- the sizes. */
static gzFile idx_open(const char *path, uint32_t magic, int ndim, int64_t *dims)
{
   /* a directory opened as a gzip stream failed as "corrupt gzip data", and opening a FIFO would
    * wait for a writer forever */
   struct stat sb;
   if (stat(path, &sb) == 0 && !S_ISREG(sb.st_mode)) {
      NR_FAIL(NR_E_IO, "%s is %s, not an IDX file", path, S_ISDIR(sb.st_mode) ? "a directory" : "not a regular file");
      return NULL;
   }
   gzFile f = gzopen(path, "rb");
   if (!f) {
      NR_FAIL(NR_E_IO, "cannot open %s: %s", path, errno ? strerror(errno) : "zlib could not open it");
      return NULL;
   }
   gzbuffer(f, 1 << 18);
   unsigned char head[16];
   if (gz_read_exact(f, head, 4, path, "the header")) goto fail;
   uint32_t m = be32(head);
   if (m != magic) {
      NR_FAIL(NR_E_FORMAT, "%s: bad magic number 0x%08x (expected 0x%08x, an IDX %s file)", path, m, magic,
              magic == 0x803 ? "uint8 image (N, H, W)" : "uint8 label (N)");
      goto fail;
   }
   if (gz_read_exact(f, head, (size_t)ndim * 4, path, "the header")) goto fail;
   for (int d = 0; d < ndim; d++) {
      dims[d] = be32(head + 4 * d);
      if (dims[d] > (1 << 30)) {
         NR_FAIL(NR_E_FORMAT, "%s: implausible size %lld in dimension %d of the header", path, (long long)dims[d], d);
         goto fail;
      }
   }
   return f;
fail:
   gzclose(f);
   return NULL;
}

nr_dataset *nr_dataset_open_idx(const char *images_path, const char *labels_path, int32_t classes)
{
   if (!images_path || !labels_path) {
      NR_FAIL(NR_E_ARG, "paths must not be NULL");
      return NULL;
   }
   int64_t idims[3], ldims[1];
   nr_dataset *ds = NULL;
   gzFile fl = NULL, fi = idx_open(images_path, 0x803, 3, idims);
   if (!fi) return NULL;
   fl = idx_open(labels_path, 0x801, 1, ldims);
   if (!fl) goto fail;
   if (idims[0] != ldims[0]) {
      NR_FAIL(NR_E_FORMAT, "%s holds %lld images but %s holds %lld labels (the counts must agree)", images_path,
              (long long)idims[0], labels_path, (long long)ldims[0]);
      goto fail;
   }
   if ((double)idims[0] * idims[1] * idims[2] > 64.0 * (1ll << 30)) {
      NR_FAIL(NR_E_FORMAT, "%s: header claims %lld images of %lldx%lld (over 64 GiB): corrupt header?", images_path,
              (long long)idims[0], (long long)idims[1], (long long)idims[2]);
      goto fail;
   }
   {
      /* the header's claim against what the file can hold (deflate expands at most ~1032:1):
       * a corrupt header is said as such, before gigabytes are allocated for it */
      struct stat sb;
      double claim = (double)idims[0] * idims[1] * idims[2] + 16;
      if (stat(images_path, &sb) == 0 && claim > (gzdirect(fi) ? (double)sb.st_size : 1100.0 * sb.st_size + 1e6)) {
         NR_FAIL(NR_E_FORMAT, "%s: header claims %lld images of %lldx%lld (%.0f bytes) but the file (%lld bytes%s) "
                 "cannot hold them: truncated file or corrupt header", images_path, (long long)idims[0],
                 (long long)idims[1], (long long)idims[2], claim, (long long)sb.st_size, gzdirect(fi) ? "" : ", gzip");
         goto fail;
      }
   }
   if (idims[1] == 0 || idims[2] == 0) {
      NR_FAIL(NR_E_FORMAT, "%s: empty image size %lldx%lld", images_path, (long long)idims[1], (long long)idims[2]);
      goto fail;
   }
   ds = nr_dataset_alloc();
   if (!ds) goto fail;
   int64_t n = idims[0], h = idims[1], w = idims[2];
   ds->kind = NR_DS_MEMORY;
   ds->n = n;
   ds->channels = 1;
   ds->height = (int32_t)h;
   ds->width = (int32_t)w;
   ds->sample_bytes = h * w;
   ds->sy = w;
   ds->sx = 1;
   ds->sc = 0;
   ds->pixels = malloc((size_t)(n * h * w) + 1);
   ds->labels = malloc((size_t)n * sizeof(int32_t) + 1);
   uint8_t *raw = malloc((size_t)n + 1);
   if (!ds->pixels || !ds->labels || !raw) {
      free(raw);
      NR_FAIL(NR_E_OOM, "out of memory for %lld images of %lldx%lld", (long long)n, (long long)h, (long long)w);
      goto fail;
   }
   if (gz_read_exact(fi, ds->pixels, (size_t)(n * h * w), images_path, "the pixels") ||
       gz_read_exact(fl, raw, (size_t)n, labels_path, "the labels")) {
      free(raw);
      goto fail;
   }
   int32_t maxl = 0;
   for (int64_t i = 0; i < n; i++) {
      if (classes > 0 && raw[i] >= classes) {
         NR_FAIL(NR_E_FORMAT, "%s: label %d of sample %lld is out of range 0..%d", labels_path, raw[i], (long long)i,
                 classes - 1);
         free(raw);
         goto fail;
      }
      ds->labels[i] = raw[i];
      if (raw[i] > maxl) maxl = raw[i];
   }
   free(raw);
   if (check_end(fi, images_path) || check_end(fl, labels_path)) goto fail;
   ds->classes = classes > 0 ? classes : maxl + 1;
   snprintf(ds->root, sizeof ds->root, "%s", images_path);
   gzclose(fi);
   gzclose(fl);
   return ds;
fail:
   if (fi) gzclose(fi);
   if (fl) gzclose(fl);
   nr_dataset_free(ds);
   return NULL;
}

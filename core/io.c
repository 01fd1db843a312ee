/* io.c — NumPy .npy load/save, atomic file writes, atomic folder replacement and single-writer
 * locks.
 * Atomic write: data goes to "<path>.tmp.<pid>", is fsync'd, renamed over path, and the
 * directory is fsync'd, so a crash leaves either the old file or the new one, never a torn one. */
#define _GNU_SOURCE /* renameat2 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>
#include <zlib.h>

static nr_status write_all(int fd, const void *bytes, int64_t len, const char *path)
{
   const char *p = bytes;
   while (len > 0) {
      ssize_t w = write(fd, p, (size_t)(len > (1 << 30) ? (1 << 30) : len));
      if (w < 0) {
         if (errno == EINTR) continue;
         return NR_FAIL(NR_E_IO, "writing %s: %s", path, strerror(errno));
      }
      p += w;
      len -= w;
   }
   return NR_OK;
}

/* Makes a rename in path's folder durable. */
static void fsync_parent(const char *path)
{
   char dir[4096];
   snprintf(dir, sizeof dir, "%s", path);
   int dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
   if (dfd >= 0) {
      fsync(dfd);
      close(dfd);
   }
}

/* Writes header then body (either may be empty) atomically to path. */
static nr_status write_atomic2(const char *path, const void *head, int64_t head_len, const void *body,
                               int64_t body_len)
{
   if (!path || !*path) return NR_FAIL(NR_E_ARG, "empty path");
   char tmp[4096];
   snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
   int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
   if (fd < 0) return NR_FAIL(NR_E_IO, "cannot create %s: %s", tmp, strerror(errno));
   nr_status st = write_all(fd, head, head_len, tmp);
   if (!st) st = write_all(fd, body, body_len, tmp);
   if (!st && fsync(fd) != 0) st = NR_FAIL(NR_E_IO, "fsync %s: %s", tmp, strerror(errno));
   if (close(fd) != 0 && !st) st = NR_FAIL(NR_E_IO, "close %s: %s", tmp, strerror(errno));
   if (!st && rename(tmp, path) != 0) st = NR_FAIL(NR_E_IO, "rename %s -> %s: %s", tmp, path, strerror(errno));
   if (st) {
      unlink(tmp);
      return st;
   }
   fsync_parent(path);
   return NR_OK;
}

nr_status nr_file_write_atomic(const char *path, const void *bytes, int64_t len)
{
   if (len < 0 || (len > 0 && !bytes)) return NR_FAIL(NR_E_ARG, "bad buffer");
   return write_atomic2(path, bytes, len, NULL, 0);
}

/* Puts the folder `staged` at `target`, replacing a folder already there in one step: the two are
 * exchanged (renameat2 RENAME_EXCHANGE), so `target` names a complete folder at every moment,
 * and the old one ends up at `staged` for the caller to remove. A file system without the
 * exchange (EINVAL, ENOSYS) gets two renames: the old folder to `staged`.old, the new one in. */
nr_status nr_dir_replace(const char *staged, const char *target)
{
   if (!staged || !*staged || !target || !*target) return NR_FAIL(NR_E_ARG, "empty path");
   if (rename(staged, target) == 0) { /* no folder at target, or an empty one */
      fsync_parent(target);
      return NR_OK;
   }
   if (errno != EEXIST && errno != ENOTEMPTY)
      return NR_FAIL(NR_E_IO, "rename %s -> %s: %s", staged, target, strerror(errno));
   if (renameat2(AT_FDCWD, staged, AT_FDCWD, target, RENAME_EXCHANGE) == 0) {
      fsync_parent(target);
      return NR_OK;
   }
   if (errno != EINVAL && errno != ENOSYS)
      return NR_FAIL(NR_E_IO, "exchanging %s and %s: %s", staged, target, strerror(errno));
   char old[4096];
   snprintf(old, sizeof old, "%s.old", staged);
   if (rename(target, old) != 0) return NR_FAIL(NR_E_IO, "rename %s -> %s: %s", target, old, strerror(errno));
   if (rename(staged, target) != 0) {
      int e = errno;
      rename(old, target); /* put the old one back */
      return NR_FAIL(NR_E_IO, "rename %s -> %s: %s", staged, target, strerror(e));
   }
   fsync_parent(target);
   if (rename(old, staged) != 0) return NR_FAIL(NR_E_IO, "rename %s -> %s: %s", old, staged, strerror(errno));
   return NR_OK;
}

nr_status nr_file_lock(const char *path, int32_t *fd, int64_t *holder)
{
   if (holder) *holder = -1;
   if (!fd) return NR_FAIL(NR_E_ARG, "fd is NULL");
   *fd = -1;
   if (!path || !*path) return NR_FAIL(NR_E_ARG, "empty path");
   int f = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
   if (f < 0) return NR_FAIL(NR_E_IO, "cannot open %s: %s", path, strerror(errno));
   int rc;
   while ((rc = flock(f, LOCK_EX | LOCK_NB)) != 0 && errno == EINTR) {}
   if (rc != 0) {
      int e = errno;
      long long pid = 0;
      if (e == ENOLCK || e == ENOSYS || e == EOPNOTSUPP || e == EINVAL) {
         /* a file system without flock (NFS without a lock daemon, Lustre mounted noflock) */
         close(f);
         if (holder) *holder = -2;
         return NR_FAIL(NR_E_IO, "cannot lock %s: %s (the file system does not support locks)", path, strerror(e));
      }
      if (e == EWOULDBLOCK) {
         char buf[32] = {0};
         if (pread(f, buf, sizeof buf - 1, 0) > 0) pid = strtoll(buf, NULL, 10);
      }
      close(f);
      if (e != EWOULDBLOCK) return NR_FAIL(NR_E_IO, "cannot lock %s: %s", path, strerror(e));
      if (holder) *holder = pid > 0 ? pid : 0;
      if (pid > 0) return NR_FAIL(NR_E_IO, "%s is locked by process %lld", path, pid);
      return NR_FAIL(NR_E_IO, "%s is locked by another process", path);
   }
   char buf[32];
   int n = snprintf(buf, sizeof buf, "%lld\n", (long long)getpid());
   if (ftruncate(f, 0) != 0 || pwrite(f, buf, (size_t)n, 0) != n) {
      int e = errno;
      close(f);
      return NR_FAIL(NR_E_IO, "writing %s: %s", path, strerror(e));
   }
   *fd = f;
   return NR_OK;
}

void nr_file_unlock(int32_t fd)
{
   if (fd >= 0) close(fd);
}

static const char *npy_descr(int32_t dtype)
{
   return dtype == NR_F32 ? "<f4" : dtype == NR_I64 ? "<i8" : "|u1";
}

nr_status nr_npy_save(const nr_tensor *t, const char *path)
{
   NR_CHECK_T("t", t, -1, -1, -1, NULL);
   if (t->dtype == NR_BF16)
      return NR_FAIL(NR_E_ARG, "%s: .npy has no bfloat16; save t:float() instead", path);
   /* a contiguous host copy (also handles device tensors and strided views) */
   nr_tensor *host = nr_tensor_new(t->dtype, NR_CPU, t->ndim, t->shape);
   if (!host) return NR_E_OOM;
   nr_status st = nr_tensor_copy(host, t);
   if (st) {
      nr_tensor_free(host);
      return st;
   }
   char header[1024];
   int k = snprintf(header, sizeof header, "{'descr': '%s', 'fortran_order': False, 'shape': (", npy_descr(t->dtype));
   for (int d = 0; d < t->ndim; d++) k += snprintf(header + k, sizeof header - k, "%lld,%s", (long long)t->shape[d], d + 1 < t->ndim ? " " : "");
   k += snprintf(header + k, sizeof header - k, "), }");
   /* pad with spaces so magic(6)+version(2)+len(2)+header+'\n' is a multiple of 64 */
   int total = 10 + k + 1;
   int pad = (64 - total % 64) % 64;
   char buf[1200];
   memcpy(buf, "\x93NUMPY\x01\x00", 8);
   uint16_t hl = (uint16_t)(k + pad + 1);
   buf[8] = (char)(hl & 0xff);
   buf[9] = (char)(hl >> 8);
   memcpy(buf + 10, header, (size_t)k);
   memset(buf + 10 + k, ' ', (size_t)pad);
   buf[10 + k + pad] = '\n';
   st = write_atomic2(path, buf, 10 + k + pad + 1, host->data, nr_tensor_numel(host) * nr_dtype_size(host->dtype));
   nr_tensor_free(host);
   return st;
}

/* The value of 'key' in a .npy header dict (numpy writes {'descr': '<f4', 'fortran_order': False,
 * 'shape': (2, 3), }): the first character after the key's colon and any spaces, or NULL. */
static const char *npy_field(const char *header, const char *key)
{
   char quoted[32];
   snprintf(quoted, sizeof quoted, "'%s'", key);
   const char *at = strstr(header, quoted);
   if (!at) return NULL;
   at += strlen(quoted);
   while (*at == ' ') at++;
   if (*at++ != ':') return NULL;
   while (*at == ' ') at++;
   return at;
}

nr_tensor *nr_npy_load(const char *path)
{
   FILE *f = fopen(path, "rb");
   if (!f) {
      NR_FAIL(NR_E_IO, "cannot open %s: %s", path, strerror(errno));
      return NULL;
   }
   unsigned char magic[10];
   nr_tensor *t = NULL;
   char *header = NULL;
   if (fread(magic, 1, 10, f) != 10 || memcmp(magic, "\x93NUMPY", 6) != 0) {
      NR_FAIL(NR_E_FORMAT, "%s: not a .npy file (bad magic)", path);
      goto done;
   }
   uint32_t hlen = magic[8] | (magic[9] << 8);
   if (magic[6] >= 2) {
      unsigned char more[2];
      if (fread(more, 1, 2, f) != 2) {
         NR_FAIL(NR_E_FORMAT, "%s: truncated header", path);
         goto done;
      }
      hlen |= ((uint32_t)more[0] << 16) | ((uint32_t)more[1] << 24);
   }
   if (hlen > 65536) {
      NR_FAIL(NR_E_FORMAT, "%s: header length %u is implausible", path, hlen);
      goto done;
   }
   header = calloc(1, hlen + 1);
   if (!header || fread(header, 1, hlen, f) != hlen) {
      NR_FAIL(NR_E_FORMAT, "%s: truncated header", path);
      goto done;
   }
   /* Each key's value is read where the key is (a substring search elsewhere in the header read
    * 'fortran_order':True without numpy's space as C order, and a '<f4' anywhere as the dtype). */
   const char *descr = npy_field(header, "descr"), *order = npy_field(header, "fortran_order");
   const char *open_p = npy_field(header, "shape");
   int32_t dtype;
   if (!descr || !order || !open_p || *open_p != '(') {
      NR_FAIL(NR_E_FORMAT, "%s: header %s lacks 'descr', 'fortran_order' or 'shape'", path, header);
      goto done;
   }
   if (!strncmp(descr, "'<f4'", 5)) dtype = NR_F32;
   else if (!strncmp(descr, "'<i8'", 5)) dtype = NR_I64;
   else if (!strncmp(descr, "'|u1'", 5) || !strncmp(descr, "'<u1'", 5)) dtype = NR_U8;
   else {
      NR_FAIL(NR_E_FORMAT, "%s: unsupported dtype in header %s (nrlua reads <f4, <i8, |u1)", path, header);
      goto done;
   }
   if (strncmp(order, "False", 5) != 0) {
      NR_FAIL(NR_E_FORMAT, "%s: Fortran-ordered arrays are not supported", path);
      goto done;
   }
   int64_t shape[8];
   int ndim = 0;
   const char *p = open_p + 1;
   while (*p && *p != ')') {
      while (*p == ' ' || *p == ',') p++;
      if (*p == ')') break;
      char *end;
      long long v = strtoll(p, &end, 10);
      if (end == p || v < 0 || ndim == 8) {
         NR_FAIL(NR_E_FORMAT, "%s: bad shape in header", path);
         goto done;
      }
      if (v > NR_MAX_NUMEL) { /* no tensor has such a dimension, even an empty one */
         NR_FAIL(NR_E_FORMAT, "%s: bad shape in header: size %lld of dimension %d is more than 2^40", path, v, ndim + 1);
         goto done;
      }
      shape[ndim++] = v;
      p = end;
   }
   /* The data the header promises must be in the file before memory is taken for it: a corrupt
    * or truncated header (shape (4000000000,) over 16 bytes) would allocate gigabytes first and
    * then fail as "out of host memory" on a small machine. */
   long here = ftell(f);
   if (here < 0 || fseek(f, 0, SEEK_END) != 0) {
      NR_FAIL(NR_E_IO, "%s: cannot seek: %s", path, strerror(errno));
      goto done;
   }
   uint64_t have = (uint64_t)(ftell(f) - here), need = nr_dtype_size(dtype);
   fseek(f, here, SEEK_SET);
   for (int d = 0; d < ndim; d++)
      if (shape[d] == 0) need = 0;
   for (int d = 0; d < ndim && need > 0 && need <= have; d++)
      need = (uint64_t)shape[d] > have / need ? have + 1 : need * (uint64_t)shape[d];
   if (need > have) {
      char dims[160];
      int len = 0;
      for (int d = 0; d < ndim && len < (int)sizeof dims - 24; d++)
         len += snprintf(dims + len, sizeof dims - (size_t)len, "%s%lld", d ? ", " : "", (long long)shape[d]);
      NR_FAIL(NR_E_FORMAT, "%s: truncated data: the header's shape (%s) needs more than the %llu bytes after it", path,
              dims, (unsigned long long)have);
      goto done;
   }
   t = nr_tensor_new(dtype, NR_CPU, ndim, shape);
   if (!t) goto done;
   size_t bytes = (size_t)(nr_tensor_numel(t) * nr_dtype_size(dtype));
   if (fread(t->data, 1, bytes, f) != bytes) {
      NR_FAIL(NR_E_FORMAT, "%s: truncated data (expected %zu bytes)", path, bytes);
      nr_tensor_free(t);
      t = NULL;
   }
done:
   free(header);
   fclose(f);
   return t;
}

nr_status nr_file_crc32(const char *path, uint32_t *crc)
{
   if (!path || !crc) return NR_FAIL(NR_E_ARG, "path or crc is NULL");
   FILE *f = fopen(path, "rb");
   if (!f) return NR_FAIL(NR_E_IO, "cannot open %s: %s", path, strerror(errno));
   unsigned char buf[1 << 16];
   uLong c = crc32(0L, Z_NULL, 0);
   size_t n;
   while ((n = fread(buf, 1, sizeof buf, f)) > 0) c = crc32(c, buf, (uInt)n);
   int failed = ferror(f);
   fclose(f);
   if (failed) return NR_FAIL(NR_E_IO, "cannot read %s", path);
   *crc = (uint32_t)c;
   return NR_OK;
}

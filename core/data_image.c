/* data_image.c — PNG (libpng simplified API) and JPEG (libjpeg-turbo's TurboJPEG API) decoding
 * and encoding: the per-sample decoder of image folders and nr_image_read / nr_image_write_*.
 *
 * Invariants: the format is recognised by content (magic bytes), not by extension; decoded
 * pixels are HWC uint8 in the decoder's grow-only buffers (no allocation per image once they
 * are large enough); PNG samples are the stored values (gAMA / sRGB chunks ignored, as PIL;
 * palettes and low bit depths expanded; 16-bit samples give their high byte, as PIL does for
 * 16-bit colour — PIL clips 16-bit grey to 255 instead, which is not copied; libpng's classic
 * API, whose simplified API would convert 16-bit and gAMA-tagged files to sRGB); conversions follow PIL
 * (alpha dropped, not composited; RGB -> gray with
 * ITU-R 601 luma; Adobe CMYK -> RGB); a truncated JPEG (libjpeg's warning "Premature end of
 * JPEG file": the rest of the picture would silently be grey) is an error naming the file, as
 * PIL's "image file is truncated"; libjpeg's other warnings (extraneous bytes, a damaged entropy
 * segment in a complete file) pass, as in PIL, so one damaged image in a dataset of millions does
 * not end a run. TurboJPEG reports only the first warning of a decode, and a fatal error after
 * a warning as a warning: only libjpeg's own warning messages pass (jpeg_warning), and a decode
 * that warned must end with the file's EOI marker (jpeg_has_eoi). A PNG whose image data fails
 * its zlib check is an error too. Errors fail naming the file. Thread-safe: one decoder per
 * thread.
 */
#include "data_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>

/* Pillow's decompression-bomb limit (DecompressionBombError past 2 x 89478485 pixels): a header
 * claiming more is refused, as a PyTorch user's loader would, before its buffers are allocated */
#define NR_MAX_PIXELS 178956970ll

nr_status nr_data_grow(void **buf, size_t *cap, size_t n)
{
   if (n <= *cap) return NR_OK;
   size_t want = n + n / 4 + 4096;
   void *p = realloc(*buf, want);
   if (!p) return NR_FAIL(NR_E_OOM, "out of memory (%zu bytes)", want);
   *buf = p;
   *cap = want;
   return NR_OK;
}

void nr_decoder_release(nr_decoder *d)
{
   if (d->tj) tjDestroy(d->tj);
   free(d->file);
   free(d->pix);
   free(d->aux);
   memset(d, 0, sizeof *d);
}

/* An encoded image larger than this is refused before it is read: a valid one of NR_MAX_PIXELS
 * pixels takes at most about 4 bytes a pixel (an uncompressed RGBA PNG) plus its headers. */
#define NR_MAX_IMAGE_FILE (8 * NR_MAX_PIXELS)

/* The format of an encoded image from its first bytes: 1 PNG, 2 JPEG, 0 neither. */
static int image_magic(const uint8_t *b, size_t n)
{
   if (n >= 8 && !memcmp(b, "\x89PNG\r\n\x1a\n", 8)) return 1;
   if (n >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff) return 2;
   return 0;
}

static nr_status not_an_image(const char *path, const uint8_t *b, size_t n)
{
   return NR_FAIL(NR_E_FORMAT, "%s: undecodable image: not a PNG or JPEG file (first bytes %02x %02x %02x %02x)", path,
                  n > 0 ? b[0] : 0, n > 1 ? b[1] : 0, n > 2 ? b[2] : 0, n > 3 ? b[3] : 0);
}

static nr_status read_file(nr_decoder *d, const char *path, size_t *size)
{
   /* O_NONBLOCK: opening a FIFO named like an image would wait for a writer forever; this way
    * it opens at once and fstat below refuses it (no effect on regular files) */
   int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
   FILE *f = fd >= 0 ? fdopen(fd, "rb") : NULL;
   if (!f) {
      nr_status st = NR_FAIL(NR_E_IO, "cannot open %s: %s", path, strerror(errno));
      if (fd >= 0) close(fd);
      return st;
   }
   nr_status st = NR_OK;
   struct stat sb;
   long len = -1;
   /* fopen succeeds on a directory, whose "size" from ftell is LONG_MAX on some filesystems */
   if (fstat(fileno(f), &sb) != 0) st = NR_FAIL(NR_E_IO, "cannot stat %s: %s", path, strerror(errno));
   else if (S_ISDIR(sb.st_mode)) st = NR_FAIL(NR_E_IO, "%s is a directory, not an image file", path);
   else if (!S_ISREG(sb.st_mode)) st = NR_FAIL(NR_E_IO, "%s is not a regular file, not an image file", path);
   else if (sb.st_size > NR_MAX_IMAGE_FILE)
      st = NR_FAIL(NR_E_FORMAT, "%s: %lld bytes, too large for an image file (at most %lld)", path,
                   (long long)sb.st_size, (long long)NR_MAX_IMAGE_FILE);
   if (st) {
      fclose(f);
      return st;
   }
   if (fseek(f, 0, SEEK_END) == 0) len = ftell(f);
   /* the first bytes say whether it is an image at all before a large file is read whole */
   uint8_t head[8];
   size_t nh = 0;
   if (len > 0 && fseek(f, 0, SEEK_SET) == 0) nh = fread(head, 1, sizeof head, f);
   if (len < 0 || fseek(f, 0, SEEK_SET) != 0) st = NR_FAIL(NR_E_IO, "cannot read %s: %s", path, strerror(errno));
   else if (len == 0) st = NR_FAIL(NR_E_FORMAT, "%s: empty file, not an image", path);
   else if (!image_magic(head, nh)) st = not_an_image(path, head, nh);
   else if (!(st = nr_data_grow((void **)&d->file, &d->file_cap, (size_t)len)) &&
            fread(d->file, 1, (size_t)len, f) != (size_t)len)
      st = NR_FAIL(NR_E_IO, "cannot read %s: %s", path, strerror(errno));
   fclose(f);
   *size = (size_t)len;
   return st;
}

/* Converts n pixels from sc channels (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) to dc (1, 3, 4). */
static void convert_pixels(const uint8_t *s, int sc, uint8_t *o, int dc, int64_t n)
{
   for (int64_t i = 0; i < n; i++, s += sc, o += dc) {
      uint8_t r, g, b, a = sc == 2 ? s[1] : sc == 4 ? s[3] : 255;
      if (sc <= 2) r = g = b = s[0];
      else r = s[0], g = s[1], b = s[2];
      if (dc == 1) o[0] = sc <= 2 ? r : (uint8_t)((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16);
      else {
         o[0] = r, o[1] = g, o[2] = b;
         if (dc == 4) o[3] = a;
      }
   }
}

/* libpng reads from the file in memory; its errors end in png_longjmp with the message kept. */
typedef struct {
   const uint8_t *p;
   size_t n, at;
   char *msg, *msg_end; /* the decoder's png_error: not in decode_png's frame, which longjmp leaves */
} png_src;

static void png_read_mem(png_structp png, png_bytep out, png_size_t len)
{
   png_src *s = png_get_io_ptr(png);
   if (len > s->n - s->at) png_error(png, "the file ends before the image does (truncated)");
   memcpy(out, s->p + s->at, len);
   s->at += len;
}

static void png_on_error(png_structp png, png_const_charp msg)
{
   png_src *s = png_get_error_ptr(png);
   snprintf(s->msg, (size_t)(s->msg_end - s->msg), "%s", msg);
   png_longjmp(png, 1);
}

/* Warnings are ancillary-chunk trouble (the pixels are fine, as PIL reads them), except a failed
 * zlib check of the image data: libpng downgrades it to a warning when it comes after the last
 * row, but the pixels then decoded from a damaged stream (kept as the error that ends decode_png). */
static void png_on_warning(png_structp png, png_const_charp msg)
{
   png_src *s = png_get_error_ptr(png);
   if (strstr(msg, "data check") && !s->msg[0])
      snprintf(s->msg, (size_t)(s->msg_end - s->msg), "corrupt image data (%s)", msg);
}

static nr_status decode_png(nr_decoder *d, const char *path, size_t size, int32_t want, nr_img *out)
{
   d->png_error[0] = 0;
   png_src src = {d->file, size, 0, d->png_error, d->png_error + sizeof d->png_error};
   png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, png_on_error, png_on_warning);
   png_infop info = png ? png_create_info_struct(png) : NULL;
   if (!info) {
      png_destroy_read_struct(&png, NULL, NULL);
      return NR_FAIL(NR_E_OOM, "%s: out of memory for libpng", path);
   }
   png_bytep *volatile rows = NULL;
   if (setjmp(png_jmpbuf(png))) {
      free(rows);
      png_destroy_read_struct(&png, &info, NULL);
      return NR_FAIL(NR_E_FORMAT, "%s: undecodable PNG: %s", path, d->png_error);
   }
   png_set_read_fn(png, &src, png_read_mem);
   png_read_info(png, info);
   png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
   int64_t npix = (int64_t)w * h;
   if (npix <= 0 || npix > NR_MAX_PIXELS) {
      png_destroy_read_struct(&png, &info, NULL);
      return NR_FAIL(NR_E_FORMAT, "%s: undecodable PNG: header gives size %ux%u (corrupt, or over %lld pixels)", path,
                     w, h, NR_MAX_PIXELS);
   }
   png_set_strip_16(png); /* the high byte, as PIL */
   png_set_expand(png);   /* palette -> RGB, gray < 8 bits -> 8, tRNS -> alpha */
   png_set_interlace_handling(png);
   png_read_update_info(png, info);
   int sc = png_get_channels(png, info);
   if (sc < 1 || sc > 4 || png_get_rowbytes(png, info) != (png_size_t)w * sc) {
      png_destroy_read_struct(&png, &info, NULL);
      return NR_FAIL(NR_E_FORMAT, "%s: undecodable PNG: unexpected layout (%d channels)", path, sc);
   }
   int dc = want ? want : sc == 2 ? 1 : sc;
   uint8_t **dst = sc == dc ? &d->pix : &d->aux;
   size_t *cap = sc == dc ? &d->pix_cap : &d->aux_cap;
   nr_status st = nr_data_grow((void **)dst, cap, (size_t)(npix * sc));
   if (!st && !(rows = malloc(sizeof(png_bytep) * h))) st = NR_FAIL(NR_E_OOM, "%s: out of memory", path);
   if (st) {
      png_destroy_read_struct(&png, &info, NULL);
      return st;
   }
   for (png_uint_32 y = 0; y < h; y++) rows[y] = *dst + (size_t)y * w * sc;
   png_read_image(png, rows);
   free(rows);
   rows = NULL;
   png_destroy_read_struct(&png, &info, NULL);
   if (d->png_error[0]) return NR_FAIL(NR_E_FORMAT, "%s: undecodable PNG: %s", path, d->png_error); /* png_on_warning */
   if (sc != dc) {
      NR_TRY(nr_data_grow((void **)&d->pix, &d->pix_cap, (size_t)(npix * dc)));
      convert_pixels(d->aux, sc, d->pix, dc, npix);
   }
   *out = (nr_img){d->pix, (int32_t)h, (int32_t)w, dc, (int64_t)w * dc, dc, 1, 0, 0};
   return NR_OK;
}

/* Whether libjpeg's warning msg says the file ended before the image did (JWRN_JPEG_EOF). */
static int jpeg_truncated(const char *msg) { return strstr(msg, "Premature end of JPEG file") != NULL; }

/* Whether msg is one of libjpeg's warnings (its JWRN_* messages): the decode went on. TurboJPEG
 * reports a fatal error that follows an earlier warning as a warning too, with the fatal
 * message (a progressive file cut inside a table between scans: "Bogus Huffman table
 * definition", nothing decoded), so any other message is an error. */
static int jpeg_warning(const char *msg)
{
   static const char *const known[] = {
      "Corrupt JPEG data",                  /* extraneous bytes, premature end of segment, bad codes, RST */
      "Premature end of JPEG file",         /* the caller's truncation check comes first */
      "Inconsistent progression sequence",  /* JWRN_BOGUS_PROGRESSION */
      "Invalid SOS parameters for sequential JPEG",
      "Unknown Adobe color transform code", /* JWRN_ADOBE_XFORM */
      "Warning: unknown JFIF revision",     /* JWRN_JFIF_MAJOR */
      "Warning: thumbnail image size does not match data length",
      "Application transferred too many scanlines",
   };
   for (size_t i = 0; i < sizeof known / sizeof *known; i++)
      if (strncmp(msg, known[i], strlen(known[i])) == 0) return 1;
   return 0;
}

/* Whether the file ends with its image: an EOI marker (FF D9) after the last scan's SOS (FF DA).
 * Entropy-coded data stuffs every FF (FF 00), so neither marker can occur inside a scan, and an
 * embedded thumbnail's EOI comes before the first SOS. Asked only when a decode warned: a later
 * "Premature end of JPEG file" is not reported after a first warning. */
static int jpeg_has_eoi(const uint8_t *p, size_t n)
{
   size_t sos = 0;
   for (size_t i = n; i-- > 1;)
      if (p[i - 1] == 0xFF && p[i] == 0xDA) {
         sos = i;
         break;
      }
   for (size_t i = sos + 1; i < n; i++)
      if (p[i - 1] == 0xFF && p[i] == 0xD9) return 1;
   return 0;
}

/* cfg != NULL: decode reduced by the smallest of 1/2, 1/4, 1/8 that is >= nr_aug_min_scale. */
static nr_status decode_jpeg(nr_decoder *d, const char *path, size_t size, int32_t want,
                             const nr_loader_config *cfg, uint64_t key, nr_img *out)
{
   if (!d->tj && !(d->tj = tjInitDecompress())) return NR_FAIL(NR_E_INTERNAL, "tjInitDecompress failed");
   int w = 0, h = 0, subsamp = -1, cs = -1;
   if (tjDecompressHeader3(d->tj, d->file, (unsigned long)size, &w, &h, &subsamp, &cs) != 0) {
      /* a warning in the header (stray bytes before a marker, as PIL reads) leaves the sizes
       * read, and so does a sampling TurboJPEG has no name for (libjpeg decodes it) */
      const char *msg = tjGetErrorStr2(d->tj);
      const int go_on = w > 0 && h > 0 && cs >= 0 &&
                        ((tjGetErrorCode(d->tj) == TJERR_WARNING && jpeg_warning(msg) && !jpeg_truncated(msg)) ||
                         strstr(msg, "Could not determine subsampling type") != NULL);
      if (!go_on) return NR_FAIL(NR_E_FORMAT, "%s: undecodable JPEG: %s", path, msg);
   }
   int64_t npix = (int64_t)w * h;
   if (w <= 0 || h <= 0 || npix > NR_MAX_PIXELS)
      return NR_FAIL(NR_E_FORMAT, "%s: undecodable JPEG: header gives size %dx%d (truncated, corrupt, or over %lld pixels)",
                     path, w, h, NR_MAX_PIXELS);
   const int full_w = w, full_h = h;
   if (cfg) {
      double need = nr_aug_min_scale(cfg, key, h, w);
      int nf = 0;
      tjscalingfactor *sf = tjGetScalingFactors(&nf), best = {1, 1};
      for (int i = 0; sf && i < nf; i++) {
         double f = (double)sf[i].num / sf[i].denom;
         /* only 1/2, 1/4, 1/8: libjpeg-turbo's SIMD reduced IDCTs; 3/8, 5/8, ... are slower
          * than the full decode */
         if (sf[i].num == 1 && f <= 1.0 && f >= need && f < (double)best.num / best.denom) best = sf[i];
      }
      w = TJSCALED(w, best);
      h = TJSCALED(h, best);
      npix = (int64_t)w * h;
   }
   int cmyk = cs == TJCS_CMYK || cs == TJCS_YCCK;
   int sc = cs == TJCS_GRAY ? 1 : cmyk ? 4 : 3;
   int pf = cs == TJCS_GRAY ? TJPF_GRAY : cmyk ? TJPF_CMYK : TJPF_RGB;
   int nat = cmyk ? 3 : sc;
   int dc = want ? want : nat;
   int direct = !cmyk && sc == dc;
   uint8_t **dst = direct ? &d->pix : &d->aux;
   size_t *cap = direct ? &d->pix_cap : &d->aux_cap;
   NR_TRY(nr_data_grow((void **)dst, cap, (size_t)(npix * sc)));
   if (tjDecompress2(d->tj, d->file, (unsigned long)size, *dst, w, w * sc, h, pf, 0) != 0) {
      int warning = tjGetErrorCode(d->tj) == TJERR_WARNING;
      const char *msg = tjGetErrorStr2(d->tj);
      if (jpeg_truncated(msg) || (warning && jpeg_warning(msg) && !jpeg_has_eoi(d->file, size)))
         return NR_FAIL(NR_E_FORMAT, "%s: truncated JPEG: libjpeg: %s", path,
                        jpeg_truncated(msg) ? msg : "Premature end of JPEG file (after an earlier warning)");
      if (!warning || !jpeg_warning(msg)) return NR_FAIL(NR_E_FORMAT, "%s: undecodable JPEG: %s", path, msg);
   }
   if (cmyk) { /* Adobe CMYK is stored inverted: R = C * K / 255 */
      uint8_t *p = d->aux;
      for (int64_t i = 0; i < npix; i++, p += 4) {
         int k = p[3];
         uint8_t r = (uint8_t)((p[0] * k + 127) / 255), g = (uint8_t)((p[1] * k + 127) / 255),
                 b = (uint8_t)((p[2] * k + 127) / 255);
         p[0] = r, p[1] = g, p[2] = b, p[3] = 255;
      }
      sc = 4; /* now RGBA */
   }
   if (!direct) {
      NR_TRY(nr_data_grow((void **)&d->pix, &d->pix_cap, (size_t)(npix * dc)));
      convert_pixels(d->aux, sc, d->pix, dc, npix);
   }
   *out = (nr_img){d->pix, h, w, dc, (int64_t)w * dc, dc, 1, full_h, full_w};
   return NR_OK;
}

/* A TurboJPEG handle that failed mid-decode keeps libjpeg's state: the next file it decodes
 * would fail too (with a wrong message naming a good file). It is dropped and made anew. */
static nr_status decode_jpeg_or_reset(nr_decoder *d, const char *path, size_t size, int32_t want,
                                      const nr_loader_config *cfg, uint64_t key, nr_img *out)
{
   nr_status st = decode_jpeg(d, path, size, want, cfg, key, out);
   if (st && d->tj) {
      tjDestroy(d->tj);
      d->tj = NULL;
   }
   return st;
}

static nr_status decode_file(nr_decoder *d, const char *path, int32_t channels, const nr_loader_config *cfg,
                             uint64_t key, nr_img *out)
{
   if (channels != 0 && channels != 1 && channels != 3 && channels != 4)
      return NR_FAIL(NR_E_ARG, "channels must be 0, 1, 3 or 4, got %d", channels);
   size_t size = 0;
   NR_TRY(read_file(d, path, &size));
   switch (image_magic(d->file, size)) {
   case 1: return decode_png(d, path, size, channels, out);
   case 2: return decode_jpeg_or_reset(d, path, size, channels, cfg, key, out);
   default: return not_an_image(path, d->file, size);
   }
}

nr_status nr_image_decode_file(nr_decoder *d, const char *path, int32_t channels, nr_img *out)
{
   return decode_file(d, path, channels, NULL, 0, out);
}

nr_status nr_image_decode_file_fast(nr_decoder *d, const char *path, int32_t channels, const nr_loader_config *cfg,
                                    uint64_t key, nr_img *out)
{
   return decode_file(d, path, channels, cfg, key, out);
}

nr_tensor *nr_image_read(const char *path, int32_t channels)
{
   if (!path) {
      NR_FAIL(NR_E_ARG, "path is NULL");
      return NULL;
   }
   nr_decoder d = {0};
   nr_img im;
   nr_tensor *t = NULL;
   if (nr_image_decode_file(&d, path, channels, &im) == NR_OK) {
      int64_t shape[3] = {im.c, im.h, im.w};
      t = nr_tensor_new(NR_U8, NR_CPU, 3, shape);
      if (t) {
         uint8_t *o = t->data;
         for (int c = 0; c < im.c; c++)
            for (int64_t i = 0; i < (int64_t)im.h * im.w; i++) *o++ = im.p[i * im.c + c];
      }
   }
   nr_decoder_release(&d);
   return t;
}

/* HWC copy of a uint8 (C, H, W) tensor; caller frees. */
static uint8_t *to_hwc(const nr_tensor *img, const int *allowed, const char *fmt)
{
   if (nr_check_tensor("nr_image_write", "img", img, NR_U8, NR_CPU, 3, NULL)) return NULL;
   int c = (int)img->shape[0], ok = 0;
   for (int i = 0; allowed[i]; i++) ok |= allowed[i] == c;
   if (!ok || img->shape[1] <= 0 || img->shape[2] <= 0 || img->shape[1] > 65535 || img->shape[2] > 65535) {
      NR_FAIL(NR_E_ARG, "img: cannot write a %s of %lld channels, %lldx%lld", fmt, (long long)img->shape[0],
              (long long)img->shape[1], (long long)img->shape[2]);
      return NULL;
   }
   int64_t h = img->shape[1], w = img->shape[2];
   uint8_t *buf = malloc((size_t)(c * h * w));
   if (!buf) {
      NR_FAIL(NR_E_OOM, "out of memory");
      return NULL;
   }
   const uint8_t *p = img->data;
   for (int64_t y = 0; y < h; y++)
      for (int64_t x = 0; x < w; x++)
         for (int k = 0; k < c; k++)
            buf[(y * w + x) * c + k] = p[k * img->stride[0] + y * img->stride[1] + x * img->stride[2]];
   return buf;
}

nr_status nr_image_write_png(const nr_tensor *img, const char *path)
{
   static const int allowed[] = {1, 3, 4, 0};
   uint8_t *buf = to_hwc(img, allowed, "PNG");
   if (!buf) return nr_fail_wrap(NR_E_ARG, __func__);
   int c = (int)img->shape[0];
   png_image im;
   memset(&im, 0, sizeof im);
   im.version = PNG_IMAGE_VERSION;
   im.width = (png_uint_32)img->shape[2];
   im.height = (png_uint_32)img->shape[1];
   im.format = c == 1 ? PNG_FORMAT_GRAY : c == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_RGBA;
   png_alloc_size_t len = 0;
   nr_status st = NR_OK;
   if (!png_image_write_to_memory(&im, NULL, &len, 0, buf, 0, NULL)) {
      st = NR_FAIL(NR_E_INTERNAL, "%s: libpng: %s", path, im.message);
   } else {
      void *mem = malloc(len);
      if (!mem) st = NR_FAIL(NR_E_OOM, "out of memory");
      else if (!png_image_write_to_memory(&im, mem, &len, 0, buf, 0, NULL))
         st = NR_FAIL(NR_E_INTERNAL, "%s: libpng: %s", path, im.message);
      else st = nr_file_write_atomic(path, mem, (int64_t)len);
      free(mem);
   }
   free(buf);
   return st;
}

nr_status nr_image_write_jpeg(const nr_tensor *img, const char *path, int32_t quality)
{
   static const int allowed[] = {1, 3, 0};
   if (quality < 1 || quality > 100) return NR_FAIL(NR_E_ARG, "quality must be in 1..100, got %d", quality);
   uint8_t *buf = to_hwc(img, allowed, "JPEG");
   if (!buf) return nr_fail_wrap(NR_E_ARG, __func__);
   int c = (int)img->shape[0], w = (int)img->shape[2], h = (int)img->shape[1];
   tjhandle tj = tjInitCompress();
   nr_status st = NR_OK;
   unsigned char *jpeg = NULL;
   unsigned long len = 0;
   if (!tj) st = NR_FAIL(NR_E_INTERNAL, "tjInitCompress failed");
   else if (tjCompress2(tj, buf, w, w * c, h, c == 1 ? TJPF_GRAY : TJPF_RGB, &jpeg, &len,
                        c == 1 ? TJSAMP_GRAY : TJSAMP_420, quality, 0) != 0)
      st = NR_FAIL(NR_E_INTERNAL, "%s: TurboJPEG: %s", path, tjGetErrorStr2(tj));
   else st = nr_file_write_atomic(path, jpeg, (int64_t)len);
   if (jpeg) tjFree(jpeg);
   if (tj) tjDestroy(tj);
   free(buf);
   return st;
}

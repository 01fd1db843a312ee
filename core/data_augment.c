/* data_augment.c — per-sample augmentation in C: random-resized crop, bilinear resize, center
 * crop, random crop with zero padding, horizontal flip, channel replication / luma, and the
 * conversion to normalised f32 (C, H, W).
 *
 * Invariants: the result is a pure function of (config, source image, key): all randomness is
 * drawn, in a fixed order (crop box, crop offset, flip), from a generator seeded by key, never
 * from the global RNG. Resampling is PIL's BILINEAR (triangle filter widened by the scale when
 * downsampling, i.e. antialiased; pixel centres at +0.5), rounded to uint8 as PIL does, so the
 * numbers match torchvision's PIL pipeline closely. Crops are windows over the current image:
 * pixels outside it are zero before normalisation, which is what padding means. Scratch buffers
 * grow only, so steady state does not allocate.
 */
#include "data_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void nr_aug_release(nr_aug_scratch *s)
{
   free(s->img);
   free(s->tmp);
   free(s->bounds);
   free(s->weights);
   free(s->plane);
   memset(s, 0, sizeof *s);
}

/* PIL's precompute_coeffs for the bilinear (triangle) filter on the input span [in0, in0 + len)
 * (a crop: taps never leave it, as PIL's crop() then resize()), for outputs first..first+count-1
 * of out_size: output first+i reads input positions bounds[2i] .. bounds[2i] + bounds[2i+1] - 1
 * with weights k[i * ksize + j]. Positions are absolute. */
static void coeffs(int in0, int len, int out_size, int first, int count, int32_t *bounds, float *k, int ksize)
{
   double scale = (double)len / out_size;
   double filterscale = scale < 1.0 ? 1.0 : scale;
   double support = filterscale, ss = 1.0 / filterscale;
   for (int xx = 0; xx < count; xx++) {
      double center = (xx + first + 0.5) * scale; /* relative to in0 */
      int xmin = (int)(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      int xmax = (int)(center + support + 0.5);
      if (xmax > len) xmax = len;
      xmax -= xmin;
      if (xmax > ksize) xmax = ksize;
      double ww = 0;
      float *kk = k + (size_t)xx * ksize;
      for (int x = 0; x < xmax; x++) {
         double t = fabs((x + xmin - center + 0.5) * ss);
         double w = t < 1.0 ? 1.0 - t : 0.0;
         kk[x] = (float)w;
         ww += w;
      }
      for (int x = 0; x < xmax; x++) kk[x] = ww != 0 ? (float)(kk[x] / ww) : 0.0f;
      if (xmax <= 0) { /* degenerate: nearest pixel */
         xmin = (int)center;
         if (xmin >= len) xmin = len - 1;
         if (xmin < 0) xmin = 0;
         xmax = 1;
         kk[0] = 1.0f;
      }
      bounds[2 * xx] = in0 + xmin;
      bounds[2 * xx + 1] = xmax;
   }
}

/* Resamples the box (x0, y0, bw, bh) of *cur to full_h x full_w and keeps the window of
 * oh x ow outputs starting at (top, left), into s->img; *cur <- the window (HWC). */
static nr_status resample(nr_img *cur, int x0, int y0, int bw, int bh, int full_h, int full_w, int top, int left,
                          int oh, int ow, nr_aug_scratch *s)
{
   int c = cur->c;
   double fsx = (double)bw / full_w, fsy = (double)bh / full_h;
   int kx = (int)ceil(fsx < 1 ? 1 : fsx) * 2 + 1, ky = (int)ceil(fsy < 1 ? 1 : fsy) * 2 + 1;
   NR_TRY(nr_data_grow((void **)&s->bounds, &s->bounds_cap, sizeof(int32_t) * 2 * (size_t)(ow + oh)));
   NR_TRY(nr_data_grow((void **)&s->weights, &s->weights_cap, sizeof(float) * ((size_t)ow * kx + (size_t)oh * ky)));
   int32_t *bx = s->bounds, *by = s->bounds + 2 * ow;
   float *wx = s->weights, *wy = s->weights + (size_t)ow * kx;
   coeffs(x0, bw, full_w, left, ow, bx, wx, kx);
   coeffs(y0, bh, full_h, top, oh, by, wy, ky);
   int ylo = by[0], yhi = by[2 * (oh - 1)] + by[2 * (oh - 1) + 1];
   for (int i = 0; i < oh; i++) {
      if (by[2 * i] < ylo) ylo = by[2 * i];
      if (by[2 * i] + by[2 * i + 1] > yhi) yhi = by[2 * i] + by[2 * i + 1];
   }
   int rows = yhi - ylo;
   NR_TRY(nr_data_grow((void **)&s->tmp, &s->tmp_cap, sizeof(float) * (size_t)(rows + 1) * ow * c));
   NR_TRY(nr_data_grow((void **)&s->img, &s->img_cap, (size_t)oh * ow * c));
   /* horizontal pass: rows ylo..yhi-1 -> tmp (rows, ow, c) */
   const int64_t sx = cur->sx, sc = cur->sc;
   for (int y = 0; y < rows; y++) {
      const uint8_t *row = cur->p + (int64_t)(y + ylo) * cur->sy;
      float *t = s->tmp + (size_t)y * ow * c;
      for (int xx = 0; xx < ow; xx++, t += c) {
         const float *k = wx + (size_t)xx * kx;
         const uint8_t *p = row + (int64_t)bx[2 * xx] * sx;
         int n = bx[2 * xx + 1];
         if (c == 1) {
            float a = 0;
            for (int j = 0; j < n; j++) a += k[j] * p[j * sx];
            t[0] = a;
         } else if (c == 3) {
            float a0 = 0, a1 = 0, a2 = 0;
            for (int j = 0; j < n; j++, p += sx) {
               a0 += k[j] * p[0];
               a1 += k[j] * p[sc];
               a2 += k[j] * p[2 * sc];
            }
            t[0] = a0, t[1] = a1, t[2] = a2;
         } else {
            for (int ch = 0; ch < c; ch++) {
               float a = 0;
               for (int j = 0; j < n; j++) a += k[j] * p[j * sx + ch * sc];
               t[ch] = a;
            }
         }
      }
   }
   /* vertical pass: tmp -> img (oh, ow, c), rounded and clamped to uint8; rows accumulate
    * contiguously (vectorisable) into acc, the row after tmp's last */
   int rowlen = ow * c;
   float *acc = s->tmp + (size_t)rows * rowlen;
   for (int yy = 0; yy < oh; yy++) {
      const float *k = wy + (size_t)yy * ky;
      int ymin = by[2 * yy] - ylo, n = by[2 * yy + 1];
      const float *t0 = s->tmp + (size_t)ymin * rowlen;
      const float k0 = k[0];
      for (int i = 0; i < rowlen; i++) acc[i] = k0 * t0[i];
      for (int j = 1; j < n; j++) {
         const float kj = k[j];
         const float *tj = t0 + (size_t)j * rowlen;
         for (int i = 0; i < rowlen; i++) acc[i] += kj * tj[i];
      }
      uint8_t *o = s->img + (size_t)yy * rowlen;
      for (int i = 0; i < rowlen; i++) {
         float v = acc[i] + 0.5f;
         o[i] = (uint8_t)(v <= 0.0f ? 0 : v >= 255.0f ? 255 : (int)v);
      }
   }
   *cur = (nr_img){s->img, oh, ow, c, (int64_t)ow * c, c, 1, 0, 0};
   return NR_OK;
}

/* torchvision's RandomResizedCrop.get_params. */
static void rrc_box(nr_drng *r, int h, int w, const nr_loader_config *cfg, int *x0, int *y0, int *bw, int *bh)
{
   double area = (double)h * w;
   double lr0 = log(cfg->ratio_lo), lr1 = log(cfg->ratio_hi);
   for (int attempt = 0; attempt < 10; attempt++) {
      double target = area * (cfg->scale_lo + (cfg->scale_hi - cfg->scale_lo) * nr_drng_uniform(r));
      double ar = exp(lr0 + (lr1 - lr0) * nr_drng_uniform(r));
      int cw = (int)nearbyint(sqrt(target * ar)), ch = (int)nearbyint(sqrt(target / ar));
      if (cw > 0 && cw <= w && ch > 0 && ch <= h) {
         *y0 = (int)nr_drng_below(r, h - ch + 1);
         *x0 = (int)nr_drng_below(r, w - cw + 1);
         *bw = cw;
         *bh = ch;
         return;
      }
   }
   double in_ratio = (double)w / h;
   int cw = w, ch = h;
   if (in_ratio < cfg->ratio_lo) ch = (int)nearbyint(w / cfg->ratio_lo);
   else if (in_ratio > cfg->ratio_hi) cw = (int)nearbyint(h * cfg->ratio_hi);
   if (ch < 1) ch = 1;
   if (cw < 1) cw = 1;
   *y0 = (h - ch) / 2;
   *x0 = (w - cw) / 2;
   *bw = cw;
   *bh = ch;
}

void nr_aug_resize_dims(const nr_loader_config *cfg, int64_t h, int64_t w, int64_t *oh, int64_t *ow)
{
   *oh = cfg->resize_h;
   *ow = cfg->resize_w;
   if (*ow <= 0) { /* shorter side to resize_h, as torchvision's Resize(int) */
      if (h <= w) *ow = *oh * w / h;
      else *ow = *oh, *oh = *ow * h / w;
   }
}

double nr_aug_min_scale(const nr_loader_config *cfg, uint64_t key, int32_t h, int32_t w)
{
   if (h <= 0 || w <= 0) return 1.0;
   if (cfg->random_resized_crop > 0) {
      nr_drng r = {key};
      int x0, y0, bw, bh;
      rrc_box(&r, h, w, cfg, &x0, &y0, &bw, &bh);
      double fx = (double)cfg->random_resized_crop / bw, fy = (double)cfg->random_resized_crop / bh;
      return fx > fy ? fx : fy;
   }
   if (cfg->resize_h > 0) {
      int64_t oh, ow;
      nr_aug_resize_dims(cfg, h, w, &oh, &ow);
      double fx = (double)ow / w, fy = (double)oh / h;
      return fx > fy ? fx : fy;
   }
   return 1.0;
}

/* The output window over the augmented picture: output row y reads row wy + y, columns
 * [x0, x1) of the output read the picture from element offset `first` of that row (reversed
 * when flipped); everything else is outside and reads as zero. */
typedef struct window {
   int wy, out_h, out_w, x0, x1, flip, luma;
   int64_t first;
} window;

/* Plane (out_h, out_w) of bytes from the picture's channel `plane` (its first channel when luma:
 * ITU-R 601 luma of RGB, as PIL's convert('L')). */
static void window_plane(const nr_img *cur, const uint8_t *plane, const window *w, uint8_t *out)
{
   const int n = w->x1 - w->x0;
   const int64_t sx = cur->sx;
   for (int y = 0; y < w->out_h; y++) {
      uint8_t *o = out + (size_t)y * w->out_w;
      int yy = w->wy + y;
      if (yy < 0 || yy >= cur->h) {
         memset(o, 0, (size_t)w->out_w);
         continue;
      }
      memset(o, 0, (size_t)w->x0);
      memset(o + w->x1, 0, (size_t)(w->out_w - w->x1));
      if (n == 0) continue;
      const uint8_t *q = plane + (int64_t)yy * cur->sy + w->first;
      uint8_t *d = o + w->x0;
      if (w->luma) {
         const int64_t g = cur->sc, bl = 2 * cur->sc;
         for (int k = 0; k < n; k++, q += sx) d[k] = (uint8_t)((q[0] * 19595 + q[g] * 38470 + q[bl] * 7471 + 32768) >> 16);
      } else if (sx == 1) {
         memcpy(d, q, (size_t)n);
      } else {
         for (int k = 0; k < n; k++) d[k] = q[k * sx];
      }
      if (w->flip)
         for (int i = 0, j = n - 1; i < j; i++, j--) {
            uint8_t t = d[i];
            d[i] = d[j];
            d[j] = t;
         }
   }
}

/* o[k] = p[k] * scale + bias: the one place on the CPU where bytes become normalised f32 (the
 * loader and nr_images_normalize both call it). Multiply and add round separately (no fused
 * multiply-add, as the GPU kernel), so a batch has the same bits on every CPU and on a GPU. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void bytes_to_f32(const uint8_t *p, int64_t n, float scale, float bias, float *o)
{
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
   for (int64_t k = 0; k < n; k++) o[k] = (float)p[k] * scale + bias;
}

/* Offset of a centred window of S in a side of n, as torchvision's center_crop: round((n - S) / 2)
 * with Python's ties to even when S <= n; a larger window pads floor((S - n) / 2) before. */
static int center_offset(int n, int S)
{
   if (S <= n) return (int)nearbyint((n - S) / 2.0);
   return -((S - n) / 2);
}

nr_status nr_aug_apply(const nr_loader_config *cfg, const nr_img *src, uint64_t key, int32_t out_c,
                       int32_t out_h, int32_t out_w, nr_aug_scratch *s, void *out, const char *path)
{
   nr_drng r = {key};
   nr_img cur = *src;
   if (cur.h <= 0 || cur.w <= 0) return NR_FAIL(NR_E_FORMAT, "%s: empty image", path);
   /* boxes and resize targets come from the picture's full size (see nr_img.full_h) */
   const int fh = cur.full_h > 0 ? cur.full_h : cur.h, fw = cur.full_w > 0 ? cur.full_w : cur.w;
   if (cfg->random_resized_crop > 0) {
      int x0, y0, bw, bh, S = cfg->random_resized_crop;
      rrc_box(&r, fh, fw, cfg, &x0, &y0, &bw, &bh);
      if (fh != cur.h || fw != cur.w) { /* map the box onto the reduced decode */
         double sx = (double)cur.w / fw, sy = (double)cur.h / fh;
         int nx0 = (int)nearbyint(x0 * sx), ny0 = (int)nearbyint(y0 * sy);
         int nbw = (int)nearbyint(bw * sx), nbh = (int)nearbyint(bh * sy);
         x0 = nx0 < cur.w - 1 ? nx0 : cur.w - 1;
         y0 = ny0 < cur.h - 1 ? ny0 : cur.h - 1;
         bw = nbw < 1 ? 1 : nbw > cur.w - x0 ? cur.w - x0 : nbw;
         bh = nbh < 1 ? 1 : nbh > cur.h - y0 ? cur.h - y0 : nbh;
      }
      NR_TRY(resample(&cur, x0, y0, bw, bh, S, S, 0, 0, S, S, s));
   } else if (cfg->resize_h > 0) {
      int64_t oh64, ow64;
      nr_aug_resize_dims(cfg, fh, fw, &oh64, &ow64);
      /* only the crop's window of a resize is made, so its full size need only fit int */
      if (oh64 > INT32_MAX || ow64 > INT32_MAX)
         return NR_FAIL(NR_E_ARG, "%s: resize %d of this %dx%d image gives %lldx%lld, over 2^31 - 1 a side", path,
                        cfg->resize_h, fh, fw, (long long)oh64, (long long)ow64);
      const int oh = (int)oh64, ow = (int)ow64;
      if (oh != cur.h || ow != cur.w) {
         int S = cfg->center_crop;
         if (S > 0 && S <= oh && S <= ow) { /* resample only the center crop's window */
            int top = center_offset(oh, S), left = center_offset(ow, S);
            NR_TRY(resample(&cur, 0, 0, cur.w, cur.h, oh, ow, top, left, S, S, s));
         } else {
            NR_TRY(resample(&cur, 0, 0, cur.w, cur.h, oh, ow, 0, 0, oh, ow, s));
         }
      }
   }
   /* crops: a window (wx, wy, ww, wh) over cur; outside cur reads as zero */
   int wx = 0, wy = 0, ww = cur.w, wh = cur.h;
   if (cfg->center_crop > 0) {
      int S = cfg->center_crop;
      wy += center_offset(wh, S);
      wx += center_offset(ww, S);
      wh = ww = S;
   }
   if (cfg->crop > 0 || cfg->pad > 0) {
      int Sh = cfg->crop > 0 ? cfg->crop : wh, Sw = cfg->crop > 0 ? cfg->crop : ww, p = cfg->pad;
      /* positions of the crop in the padded picture; int64 as a guard (sides <= NR_AUG_MAX_SIDE) */
      int64_t rh = (int64_t)wh + 2 * (int64_t)p - Sh + 1, rw = (int64_t)ww + 2 * (int64_t)p - Sw + 1;
      if (rh < 1 || rw < 1) /* torchvision's RandomCrop refuses it too (pad_if_needed aside) */
         return NR_FAIL(NR_E_ARG, "%s: crop %dx%d is larger than the image (%dx%d, padded by %d): lower crop or raise pad",
                        path, Sh, Sw, wh, ww, p);
      int i = rh > 1 ? (int)nr_drng_below(&r, rh) : 0;
      int j = rw > 1 ? (int)nr_drng_below(&r, rw) : 0;
      wy += i - p;
      wx += j - p;
      wh = Sh;
      ww = Sw;
   }
   if (wh != out_h || ww != out_w)
      return NR_FAIL(NR_E_FORMAT, "%s: sample is %dx%d after augmentation but the batch is %dx%d (samples differ in "
                     "size: use random_resized_crop, center_crop, crop or an exact resize = {h, w})",
                     path, wh, ww, out_h, out_w);
   int flip = cfg->flip && (nr_drng_next(&r) >> 63);
   int mode = cur.c == out_c || (cur.c == 4 && out_c == 3) ? 0 : cur.c == 1 ? 1 : 2;
   if (out_c == 4 && cur.c != 4) return NR_FAIL(NR_E_ARG, "%s: cannot make 4 channels from %d", path, cur.c);
   /* output column x reads column xx = wx + x (flipped: wx + out_w - 1 - x); [x0, x1) is in range */
   window w = {.wy = wy, .out_h = out_h, .out_w = out_w, .flip = flip, .luma = mode == 2};
   if (!flip) w.x0 = -wx, w.x1 = cur.w - wx;
   else w.x0 = wx + out_w - cur.w, w.x1 = wx + out_w;
   if (w.x0 < 0) w.x0 = 0;
   if (w.x0 > out_w) w.x0 = out_w; /* the window lies wholly beside the picture (pad > crop) */
   if (w.x1 > out_w) w.x1 = out_w;
   if (w.x1 < w.x0) w.x1 = w.x0;
   w.first = flip ? (int64_t)(wx + out_w - w.x1) * cur.sx : (int64_t)(wx + w.x0) * cur.sx;
   /* each plane is made as bytes (in the batch itself with output_u8, else in scratch), then
    * normalised to f32; replicated grey makes its plane once */
   const size_t plane_len = (size_t)out_h * out_w;
   uint8_t *bytes = cfg->output_u8 ? out : NULL;
   if (!bytes) NR_TRY(nr_data_grow((void **)&s->plane, &s->plane_cap, plane_len));
   float sc0 = 0, b0 = 0;
   for (int c = 0; c < out_c; c++) {
      uint8_t *pb = bytes ? bytes + c * plane_len : s->plane;
      if (c == 0 || mode != 1) window_plane(&cur, cur.p + (mode == 0 ? c * cur.sc : 0), &w, pb);
      else if (bytes) memcpy(pb, bytes, plane_len); /* replicated grey */
      if (bytes) continue;
      float sc, b;
      nr_norm_affine(cfg->normalize ? cfg->mean : NULL, cfg->std, c, &sc, &b);
      float *oc = (float *)out + c * plane_len;
      if (c == 0) sc0 = sc, b0 = b;
      if (c > 0 && mode == 1 && sc == sc0 && b == b0) memcpy(oc, out, plane_len * sizeof(float));
      else bytes_to_f32(pb, (int64_t)plane_len, sc, b, oc); /* pb still holds grey's plane in mode 1 */
   }
   return NR_OK;
}

nr_status nr_images_normalize(const nr_tensor *src, const float *mean, const float *std, nr_tensor *dst)
{
   NR_CHECK_T("src", src, NR_U8, -1, 4, NULL);
   NR_CHECK_CONTIG("src", src);
   NR_CHECK_T("dst", dst, -1, src->device, 4, src->shape);
   if (dst->dtype != NR_F32 && dst->dtype != NR_BF16)
      return NR_FAIL(NR_E_ARG, "dst: expected f32 or bf16, got %s", nr_dtype_name(dst->dtype));
   if (!nr_tensor_is_contiguous(dst) && !nr_tensor_is_channels_last(dst))
      return NR_FAIL(NR_E_ARG, "dst: expected a contiguous or channels-last tensor");
   NR_TRY(nr_check_same_device(__func__, src, dst));
   if ((mean == NULL) != (std == NULL)) return NR_FAIL(NR_E_ARG, "mean and std must both be given or both be NULL");
   const int64_t B = src->shape[0], C = src->shape[1], H = src->shape[2], W = src->shape[3];
   if (C > 4) return NR_FAIL(NR_E_ARG, "src: at most 4 channels, got %lld", (long long)C);
   float scale[4], bias[4];
   for (int c = 0; c < C; c++) {
      if (std && !(std[c] > 0 && isfinite(std[c]))) return NR_FAIL(NR_E_ARG, "std[%d] must be > 0 and finite, got %g", c + 1, std[c]);
      if (mean && !isfinite(mean[c])) return NR_FAIL(NR_E_ARG, "mean[%d] must be finite, got %g", c + 1, mean[c]);
      nr_norm_affine(mean, std, c, &scale[c], &bias[c]);
   }
   NR_ON_CUDA(src, nr_cuda_images_normalize(src, scale, bias, dst));
   const int64_t planes = B * C, hw = H * W;
   const uint8_t *ps = src->data;
   const int direct = dst->dtype == NR_F32 && nr_tensor_is_contiguous(dst);
   nr_status st = NR_OK;
#pragma omp parallel if (nr_parallel_worth(planes, hw))
   {
      /* a row at a time through scratch when dst is bf16 or channels-last */
      float *row = direct ? NULL : malloc(sizeof(float) * (size_t)W);
      if (!direct && !row) {
#pragma omp atomic write
         st = NR_E_OOM;
      }
#pragma omp for schedule(static)
      for (int64_t p = 0; p < planes; p++) {
         const int64_t n = p / C, c = p % C;
         const uint8_t *sp = ps + p * hw;
         if (direct) {
            bytes_to_f32(sp, hw, scale[c], bias[c], (float *)dst->data + p * hw);
            continue;
         }
         if (!row) continue;
         for (int64_t y = 0; y < H; y++) {
            bytes_to_f32(sp + y * W, W, scale[c], bias[c], row);
            const int64_t o = n * dst->stride[0] + c * dst->stride[1] + y * dst->stride[2], sw = dst->stride[3];
            if (dst->dtype == NR_F32)
               for (int64_t x = 0; x < W; x++) ((float *)dst->data)[o + x * sw] = row[x];
            else
               for (int64_t x = 0; x < W; x++) ((uint16_t *)dst->data)[o + x * sw] = nr_f32_to_bf16(row[x]);
         }
      }
      free(row);
   }
   if (st) return NR_FAIL(NR_E_OOM, "out of memory for a row of %lld floats", (long long)W);
   return NR_OK;
}

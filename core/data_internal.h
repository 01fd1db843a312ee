/* data_internal.h — shared by the data pipeline files (core/data_*.c); not part of the FFI.
 *
 * What it is: the dataset struct, the image view every stage works on, the per-thread decoder
 * and augmentation scratch, and the counter-based random generator that makes augmentation a
 * pure function of (seed, epoch, sample index).
 * Invariants: an nr_img never owns its pixels (it views the dataset's memory or a decoder's
 * scratch, valid until that decoder decodes again); scratch buffers only grow; nothing here
 * touches the global RNG (nr_rng_*), so loader output does not depend on thread count or timing.
 */
#ifndef NR_DATA_INTERNAL_H
#define NR_DATA_INTERNAL_H

#include "internal.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* A strided uint8 image: pixel (y, x, c) is p[y * sy + x * sx + c * sc]. c is 1, 3 or 4.
 * full_h, full_w: the size of the stored picture when it was decoded reduced (JPEG DCT scaling,
 * fast_decode), so crop boxes and resize targets are computed on the full size; 0 = (h, w). */
typedef struct nr_img {
   const uint8_t *p;
   int32_t h, w, c;
   int64_t sy, sx, sc;
   int32_t full_h, full_w;
} nr_img;

enum { NR_DS_MEMORY = 0, NR_DS_FILES = 1 };

struct nr_dataset {
   atomic_int refs;
   int32_t kind;       /* NR_DS_MEMORY (IDX, CIFAR) or NR_DS_FILES (image folders) */
   int64_t n;          /* samples */
   int32_t classes, channels, height, width; /* height = width = 0 for image folders */
   int32_t *labels;    /* (n) class ids */
   /* NR_DS_MEMORY: sample i at pixels + i * sample_bytes, strides sy, sx, sc (CHW or HW) */
   uint8_t *pixels;
   int64_t sample_bytes, sy, sx, sc;
   /* NR_DS_FILES: NUL-separated strings in arenas, offsets per entry */
   char *paths;
   int64_t *path_off;  /* (n) */
   char *names;
   int64_t *name_off;  /* (classes) */
   char root[1024];
};

/* Per-thread decoding state (a turbojpeg handle and grow-only buffers). */
typedef struct nr_decoder {
   void *tj;           /* tjhandle, created on first JPEG */
   uint8_t *file;      /* file bytes */
   size_t file_cap;
   uint8_t *pix;       /* decoded HWC pixels */
   size_t pix_cap;
   uint8_t *aux;       /* conversions (CMYK, alpha drop) */
   size_t aux_cap;
   char png_error[200]; /* libpng's message, kept outside decode_png's frame (it longjmps) */
} nr_decoder;

void nr_decoder_release(nr_decoder *d);
/* Grows *buf to at least n bytes (contents not kept). */
nr_status nr_data_grow(void **buf, size_t *cap, size_t n);
/* Decodes a PNG or JPEG file (by content, not extension) to HWC uint8 in d->pix.
 * channels: 0 = as stored (1, 3 or 4), else 1, 3 or 4 (converted). Errors name the path. */
nr_status nr_image_decode_file(nr_decoder *d, const char *path, int32_t channels, nr_img *out);
/* The same, but a JPEG is decoded at the smallest DCT scaling (1, 1/2, 1/4, 1/8) that still gives the
 * augmentation of cfg, keyed by key, at least its output resolution (nr_aug_min_scale). */
nr_status nr_image_decode_file_fast(nr_decoder *d, const char *path, int32_t channels, const nr_loader_config *cfg,
                                    uint64_t key, nr_img *out);
/* Sample i of ds as an image view (decoding into d for image folders). */
nr_status nr_dataset_sample(const nr_dataset *ds, int64_t i, nr_decoder *d, nr_img *out);
nr_dataset *nr_dataset_alloc(void);
void nr_dataset_retain(nr_dataset *ds);

/* ---- counter-based randomness (splitmix64) */
static inline uint64_t nr_mix64(uint64_t z)
{
   z += 0x9e3779b97f4a7c15ull;
   z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
   z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
   return z ^ (z >> 31);
}
/* Key for stream `tag` (1 = epoch shuffle, 2 = sample augmentation) of (seed, epoch, index). */
static inline uint64_t nr_data_key(uint64_t seed, uint64_t tag, int64_t epoch, int64_t index)
{
   uint64_t k = nr_mix64(seed ^ (tag * 0xd1b54a32d192ed03ull));
   k = nr_mix64(k ^ (uint64_t)epoch);
   return nr_mix64(k ^ (uint64_t)index);
}
typedef struct nr_drng { uint64_t s; } nr_drng;
static inline uint64_t nr_drng_next(nr_drng *r)
{
   r->s += 0x9e3779b97f4a7c15ull;
   uint64_t z = r->s;
   z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
   z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
   return z ^ (z >> 31);
}
/* Uniform in [0, 1). */
static inline double nr_drng_uniform(nr_drng *r) { return (double)(nr_drng_next(r) >> 11) * 0x1.0p-53; }
/* Integer in [0, n), n >= 1. */
static inline int64_t nr_drng_below(nr_drng *r, int64_t n)
{
   return (int64_t)(((unsigned __int128)nr_drng_next(r) * (uint64_t)n) >> 64);
}

/* ---- augmentation (core/data_augment.c) */
typedef struct nr_aug_scratch {
   uint8_t *img;       /* resampled HWC image */
   size_t img_cap;
   float *tmp;         /* horizontal pass */
   size_t tmp_cap;
   int32_t *bounds;    /* (2 * out) per axis */
   size_t bounds_cap;
   float *weights;
   size_t weights_cap;
   uint8_t *plane;     /* one output plane as bytes, before normalisation */
   size_t plane_cap;
} nr_aug_scratch;
void nr_aug_release(nr_aug_scratch *s);
/* The largest output side (and pad, crop, resize option) the augmentation takes: sides, windows
 * and their sums then fit int with room to spare (no overflow in crop or pad arithmetic). */
#define NR_AUG_MAX_SIDE (1 << 20)
/* Output size of cfg's shorter-side (resize_w == 0) or exact resize of an h x w picture, in
 * int64: a shorter-side resize of a very long picture can exceed int (checked by the callers). */
void nr_aug_resize_dims(const nr_loader_config *cfg, int64_t h, int64_t w, int64_t *oh, int64_t *ow);
/* The smallest factor by which an h x w picture may be shrunk before nr_aug_apply(cfg, key)
 * without resampling it up: 1 when no resize or random-resized crop applies. */
double nr_aug_min_scale(const nr_loader_config *cfg, uint64_t key, int32_t h, int32_t w);
/* Applies cfg's augmentation to src with randomness from key and writes the sample into out as
 * (C, H, W), C = out_c, H = out_h, W = out_w: normalised f32, or uint8 bytes when
 * cfg->output_u8. path names src in errors. */
nr_status nr_aug_apply(const nr_loader_config *cfg, const nr_img *src, uint64_t key, int32_t out_c,
                       int32_t out_h, int32_t out_w, nr_aug_scratch *s, void *out, const char *path);
/* The normalisation of channel c as an affine map of the byte value, v * scale + bias:
 * (v / 255 - mean[c]) / std[c], or v / 255 when mean is NULL. Every consumer (the loader, and
 * nr_images_normalize on the CPU and on the GPU) takes its coefficients from here. */
static inline void nr_norm_affine(const float *mean, const float *std, int c, float *scale, float *bias)
{
   if (mean) {
      *scale = 1.0f / (255.0f * std[c]);
      *bias = -mean[c] / std[c];
   } else {
      *scale = 1.0f / 255.0f;
      *bias = 0.0f;
   }
}

#endif

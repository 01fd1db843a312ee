/* data_loader.c — the batch loader: worker pthreads decode and augment samples into a ring of
 * batch buffers that the consumer (the Lua training loop) receives in order.
 *
 * Protocol (all under one mutex): workers claim runs of consecutive sample positions of the
 * epoch (never crossing a batch); batch b lives in slot b % nslots and may be claimed only once
 * the consumer has released batch b - nslots (it releases a batch by asking for the next one),
 * so at most nslots - 1 batches are in flight while the consumer holds one. A slot is ready when
 * all its samples are written or one of them failed; the first failure stops all claiming and
 * the consumer gets its message (naming the file) when it reaches that batch. Starting an epoch
 * or freeing the loader first stops claiming and waits until no worker is busy.
 * Reproducibility: the order is a permutation drawn from (seed, epoch) and each sample's
 * augmentation from (seed, epoch, dataset index) (data_internal.h), so output is independent of
 * thread count and scheduling. Buffers are allocated once; steady state does not allocate.
 */
#include "data_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct slot {
   nr_tensor *x, *y;    /* (batch, C, H, W) f32 (uint8 with output_u8), (batch) int64 */
   int64_t batch;       /* batch id held, -1 none */
   int32_t count, done; /* samples in the batch, samples written */
   nr_status failed;    /* first failure's status, 0 none */
   char err[1536];
} slot;

struct nr_loader {
   nr_dataset *ds;
   nr_loader_config cfg;
   int32_t out_c, out_h, out_w, chunk;
   int64_t samples;     /* per epoch for this shard */
   int64_t used;        /* samples delivered per epoch (drop_last trims) */
   int64_t nbatches;
   int64_t *order;      /* (samples) dataset indices of the current epoch */
   int64_t *perm;       /* (n) scratch for the permutation */
   int32_t nslots;
   slot *slots;
   pthread_t *threads;
   int32_t nthreads;
   pthread_mutex_t mu;
   pthread_cond_t work_cv, ready_cv, idle_cv;
   int active, halt, shutdown, holding;
   int32_t busy;
   uint64_t gen;
   int64_t epoch, next_pos, released, delivered;
};

/* dst (samples) <- this shard's order for epoch; perm: n scratch. */
static void compute_order(const nr_loader *l, int64_t epoch, int64_t *perm, int64_t *dst)
{
   int64_t n = l->ds->n;
   for (int64_t i = 0; i < n; i++) perm[i] = i;
   if (l->cfg.shuffle && n > 1) {
      nr_drng r = {nr_data_key(l->cfg.seed, 1, epoch, 0)};
      for (int64_t i = n - 1; i > 0; i--) {
         int64_t j = nr_drng_below(&r, i + 1), t = perm[i];
         perm[i] = perm[j];
         perm[j] = t;
      }
   }
   /* DistributedSampler: pad to a multiple of size by wrapping, rank takes rank, rank+size, ... */
   int64_t size = l->cfg.shard_size, rank = l->cfg.shard_rank;
   for (int64_t k = 0; k < l->samples; k++) dst[k] = perm[(rank + k * size) % n];
}

static int can_claim(const nr_loader *l)
{
   return l->active && !l->halt && l->next_pos < l->used &&
          l->next_pos / l->cfg.batch < l->released + l->nslots;
}

static void *worker(void *arg)
{
   nr_loader *l = arg;
   nr_decoder dec = {0};
   nr_aug_scratch scratch = {0};
   const int64_t B = l->cfg.batch, chw = (int64_t)l->out_c * l->out_h * l->out_w;
   char where[1200];
   pthread_mutex_lock(&l->mu);
   for (;;) {
      while (!l->shutdown && !can_claim(l)) pthread_cond_wait(&l->work_cv, &l->mu);
      if (l->shutdown) break;
      int64_t p0 = l->next_pos, b = p0 / B, bstart = b * B;
      int64_t bend = bstart + B < l->used ? bstart + B : l->used;
      int64_t p1 = p0 + l->chunk < bend ? p0 + l->chunk : bend;
      l->next_pos = p1;
      slot *s = &l->slots[b % l->nslots];
      if (p0 == bstart) {
         s->batch = b;
         s->count = (int32_t)(bend - bstart);
         s->done = 0;
         s->failed = 0;
         s->err[0] = 0;
      }
      l->busy++;
      uint64_t gen = l->gen;
      int64_t epoch = l->epoch;
      pthread_mutex_unlock(&l->mu);

      nr_status st = NR_OK;
      char *xs = s->x->data;
      const size_t sample_bytes = (size_t)chw * (size_t)nr_dtype_size(s->x->dtype);
      int64_t *ys = s->y->data;
      for (int64_t p = p0; p < p1 && !st; p++) {
         int64_t idx = l->order[p], j = p - bstart;
         nr_img im;
         const char *path = nr_dataset_path(l->ds, idx);
         if (!path) {
            snprintf(where, sizeof where, "sample %lld of %s", (long long)idx, l->ds->root);
            path = where;
         }
         uint64_t key = nr_data_key(l->cfg.seed, 2, epoch, idx);
         if (l->ds->kind == NR_DS_FILES && l->cfg.fast_decode)
            st = nr_image_decode_file_fast(&dec, path, 3, &l->cfg, key, &im);
         else
            st = nr_dataset_sample(l->ds, idx, &dec, &im);
         if (!st) st = nr_aug_apply(&l->cfg, &im, key, l->out_c, l->out_h, l->out_w, &scratch, xs + (size_t)j * sample_bytes, path);
         ys[j] = l->ds->labels[idx];
      }

      pthread_mutex_lock(&l->mu);
      l->busy--;
      if (gen == l->gen) {
         if (st) {
            if (!s->failed) {
               s->failed = st;
               snprintf(s->err, sizeof s->err, "%s", nr_last_error());
            }
            l->halt = 1;
         }
         s->done += (int32_t)(p1 - p0);
         if (s->done == s->count || s->failed) pthread_cond_broadcast(&l->ready_cv);
      }
      if (l->busy == 0) pthread_cond_broadcast(&l->idle_cv);
   }
   pthread_mutex_unlock(&l->mu);
   nr_decoder_release(&dec);
   nr_aug_release(&scratch);
   return NULL;
}

/* Output size for the config (int64: a shorter-side resize of a long picture can exceed int),
 * or 0 when it varies per sample. */
static void output_size(const nr_loader_config *c, const nr_dataset *ds, int64_t *h, int64_t *w)
{
   int64_t H = ds->height, W = ds->width;
   if (c->random_resized_crop > 0) H = W = c->random_resized_crop;
   else if (c->resize_h > 0 && (c->resize_w > 0 || (H > 0 && W > 0))) nr_aug_resize_dims(c, H, W, &H, &W);
   if (c->center_crop > 0) H = W = c->center_crop;
   if (c->crop > 0) H = W = c->crop;
   *h = H;
   *w = W;
}

static void stop_workers(nr_loader *l)
{
   pthread_mutex_lock(&l->mu);
   l->shutdown = 1;
   pthread_cond_broadcast(&l->work_cv);
   pthread_mutex_unlock(&l->mu);
   for (int32_t i = 0; i < l->nthreads; i++) pthread_join(l->threads[i], NULL);
   l->nthreads = 0;
}

void nr_loader_free(nr_loader *l)
{
   if (!l) return;
   stop_workers(l);
   if (l->slots)
      for (int32_t i = 0; i < l->nslots; i++) {
         nr_tensor_free(l->slots[i].x);
         nr_tensor_free(l->slots[i].y);
      }
   free(l->slots);
   free(l->threads);
   free(l->order);
   free(l->perm);
   pthread_mutex_destroy(&l->mu);
   pthread_cond_destroy(&l->work_cv);
   pthread_cond_destroy(&l->ready_cv);
   pthread_cond_destroy(&l->idle_cv);
   nr_dataset_free(l->ds);
   free(l);
}

nr_loader *nr_loader_new(nr_dataset *ds, const nr_loader_config *cfg)
{
   if (!ds || !cfg) {
      NR_FAIL(NR_E_ARG, "dataset and config must not be NULL");
      return NULL;
   }
   nr_loader_config c = *cfg;
#define BAD(...) do { NR_FAIL(NR_E_ARG, __VA_ARGS__); return NULL; } while (0)
   if (c.batch < 1) BAD("batch must be >= 1, got %d", c.batch);
   if (c.threads < 1 || c.threads > NR_LOADER_MAX_THREADS)
      BAD("threads must be in 1..%d, got %d", NR_LOADER_MAX_THREADS, c.threads);
   if (c.prefetch < 1 || c.prefetch > 1024) BAD("prefetch must be in 1..1024, got %d", c.prefetch);
   if (c.shard_size < 1 || c.shard_rank < 0 || c.shard_rank >= c.shard_size)
      BAD("shard rank %d must lie in 0..size-1 (size %d)", c.shard_rank, c.shard_size);
   const struct { const char *name; int32_t v; } sizes[] = {{"pad", c.pad}, {"crop", c.crop},
      {"random_resized_crop", c.random_resized_crop}, {"resize (height)", c.resize_h}, {"resize (width)", c.resize_w},
      {"center_crop", c.center_crop}};
   for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
      if (sizes[i].v < 0 || sizes[i].v > NR_AUG_MAX_SIDE)
         BAD("augmentation %s must be in 0..%d, got %d", sizes[i].name, NR_AUG_MAX_SIDE, sizes[i].v);
   /* scale / ratio {0, 0} (a zeroed config): the defaults; anything else must be a valid range */
   if (c.scale_lo == 0 && c.scale_hi == 0) c.scale_lo = 0.08f, c.scale_hi = 1.0f;
   if (c.ratio_lo == 0 && c.ratio_hi == 0) c.ratio_lo = 3.0f / 4.0f, c.ratio_hi = 4.0f / 3.0f;
   if (!(c.scale_lo > 0 && c.scale_lo <= c.scale_hi && c.scale_hi <= 1))
      BAD("random_resized_crop: scale (%g, %g) must satisfy 0 < lo <= hi <= 1 (area fractions)", c.scale_lo,
          c.scale_hi);
   if (!(c.ratio_lo > 0 && c.ratio_lo <= c.ratio_hi && isfinite(c.ratio_hi)))
      BAD("random_resized_crop: ratio (%g, %g) must satisfy 0 < lo <= hi < inf (aspect ratios w/h)", c.ratio_lo,
          c.ratio_hi);
   if (c.flip != 0 && c.flip != 1) BAD("flip must be 0 or 1, got %d", c.flip);
   int32_t oc = c.channels ? c.channels : ds->channels;
   if (!(oc == ds->channels || (ds->channels == 1 && oc == 3) || (ds->channels == 3 && oc == 1)))
      BAD("channels: cannot make %d channels from the dataset's %d (1 -> 3 and 3 -> 1 are supported)", oc,
          ds->channels);
   if (c.normalize)
      for (int i = 0; i < oc; i++)
         if (!(c.std[i] > 0 && isfinite(c.std[i])) || !isfinite(c.mean[i]))
            BAD("normalize: channel %d needs a finite mean and a finite std > 0, got mean %g, std %g", i + 1,
                c.mean[i], c.std[i]);
   int64_t oh, ow;
   output_size(&c, ds, &oh, &ow);
   if (oh <= 0 || ow <= 0)
      BAD("the samples of %s differ in size, so batches need a fixed output size: set random_resized_crop, "
          "center_crop, crop or resize = {h, w}", ds->root);
   if (oh > NR_AUG_MAX_SIDE || ow > NR_AUG_MAX_SIDE)
      BAD("resize %d of the %dx%d samples of %s gives %lldx%lld, over the limit of %d a side", c.resize_h, ds->height,
          ds->width, ds->root, (long long)oh, (long long)ow, NR_AUG_MAX_SIDE);
#undef BAD
   nr_loader *l = calloc(1, sizeof *l);
   if (!l) {
      NR_FAIL(NR_E_OOM, "out of memory");
      return NULL;
   }
   pthread_mutex_init(&l->mu, NULL);
   pthread_cond_init(&l->work_cv, NULL);
   pthread_cond_init(&l->ready_cv, NULL);
   pthread_cond_init(&l->idle_cv, NULL);
   nr_dataset_retain(ds);
   l->ds = ds;
   l->cfg = c;
   l->out_c = oc;
   l->out_h = (int32_t)oh; /* <= NR_AUG_MAX_SIDE */
   l->out_w = (int32_t)ow;
   int64_t n = ds->n;
   l->samples = n == 0 ? 0 : (n + c.shard_size - 1) / c.shard_size;
   l->nbatches = c.drop_last ? l->samples / c.batch : (l->samples + c.batch - 1) / c.batch;
   l->used = c.drop_last ? l->nbatches * c.batch : l->samples;
   int64_t chunk = c.batch / (4 * c.threads);
   l->chunk = (int32_t)(chunk < 1 ? 1 : chunk > 16 ? 16 : chunk);
   l->nslots = c.prefetch + 1;
   l->order = malloc(sizeof(int64_t) * (size_t)(l->samples + 1));
   l->perm = malloc(sizeof(int64_t) * (size_t)(n + 1));
   l->slots = calloc((size_t)l->nslots, sizeof(slot));
   l->threads = calloc((size_t)c.threads, sizeof(pthread_t));
   if (!l->order || !l->perm || !l->slots || !l->threads) {
      NR_FAIL(NR_E_OOM, "out of memory");
      nr_loader_free(l);
      return NULL;
   }
   int64_t xs[4] = {c.batch, oc, oh, ow}, ys[1] = {c.batch};
   for (int32_t i = 0; i < l->nslots; i++) {
      l->slots[i].batch = -1;
      l->slots[i].x = nr_tensor_new(c.output_u8 ? NR_U8 : NR_F32, NR_CPU, 4, xs);
      l->slots[i].y = nr_tensor_new(NR_I64, NR_CPU, 1, ys);
      if (!l->slots[i].x || !l->slots[i].y) {
         nr_fail_wrap(NR_E_OOM, __func__);
         nr_loader_free(l);
         return NULL;
      }
   }
   for (int32_t i = 0; i < c.threads; i++) {
      if (pthread_create(&l->threads[i], NULL, worker, l) != 0) {
         NR_FAIL(NR_E_INTERNAL, "cannot start worker thread %d of %d", i + 1, c.threads);
         nr_loader_free(l);
         return NULL;
      }
      l->nthreads = i + 1;
   }
   return l;
}

void nr_loader_output_shape(const nr_loader *l, int64_t *shape4)
{
   shape4[0] = l->cfg.batch;
   shape4[1] = l->out_c;
   shape4[2] = l->out_h;
   shape4[3] = l->out_w;
}
int64_t nr_loader_samples(const nr_loader *l) { return l->samples; }
int64_t nr_loader_nbatches(const nr_loader *l) { return l->nbatches; }
int32_t nr_loader_nslots(const nr_loader *l) { return l->nslots; }

nr_tensor *nr_loader_buffer(nr_loader *l, int32_t slot_i, int32_t which)
{
   if (!l || slot_i < 0 || slot_i >= l->nslots || which < 0 || which > 1) {
      NR_FAIL(NR_E_ARG, "no buffer %d/%d", slot_i, which);
      return NULL;
   }
   return which == 0 ? l->slots[slot_i].x : l->slots[slot_i].y;
}

nr_status nr_loader_indices(const nr_loader *l, int64_t epoch, nr_tensor *out)
{
   int64_t shape[1] = {l->samples};
   NR_CHECK_T("out", out, NR_I64, NR_CPU, 1, shape);
   NR_CHECK_CONTIG("out", out);
   if (l->samples == 0) return NR_OK;
   int64_t *perm = malloc(sizeof(int64_t) * (size_t)l->ds->n);
   if (!perm) return NR_FAIL(NR_E_OOM, "out of memory");
   compute_order(l, epoch, perm, out->data);
   free(perm);
   return NR_OK;
}

nr_status nr_loader_start(nr_loader *l, int64_t epoch)
{
   if (!l) return NR_FAIL(NR_E_ARG, "loader is NULL");
   if (epoch < 1) return NR_FAIL(NR_E_ARG, "epoch must be >= 1 (1-based), got %lld", (long long)epoch);
   pthread_mutex_lock(&l->mu);
   l->halt = 1;
   l->gen++;
   while (l->busy > 0) pthread_cond_wait(&l->idle_cv, &l->mu);
   if (l->samples > 0) compute_order(l, epoch, l->perm, l->order);
   for (int32_t i = 0; i < l->nslots; i++) l->slots[i].batch = -1;
   l->epoch = epoch;
   l->next_pos = l->released = l->delivered = 0;
   l->holding = 0;
   l->active = 1;
   l->halt = 0;
   pthread_cond_broadcast(&l->work_cv);
   pthread_mutex_unlock(&l->mu);
   return NR_OK;
}

nr_status nr_loader_next(nr_loader *l, int32_t *slot_out, int32_t *count)
{
   if (!l || !slot_out || !count) return NR_FAIL(NR_E_ARG, "NULL argument");
   *count = 0;
   *slot_out = -1;
   pthread_mutex_lock(&l->mu);
   if (!l->active) {
      pthread_mutex_unlock(&l->mu);
      return NR_OK;
   }
   if (l->holding) {
      l->released++;
      l->holding = 0;
      pthread_cond_broadcast(&l->work_cv);
   }
   if (l->delivered >= l->nbatches) {
      l->active = 0;
      pthread_mutex_unlock(&l->mu);
      return NR_OK;
   }
   int64_t b = l->delivered;
   slot *s = &l->slots[b % l->nslots];
   while (!(s->batch == b && (s->done == s->count || s->failed))) pthread_cond_wait(&l->ready_cv, &l->mu);
   if (s->failed) {
      nr_status st = s->failed;
      char msg[sizeof s->err];
      memcpy(msg, s->err, sizeof msg);
      l->active = 0;
      l->halt = 1;
      pthread_mutex_unlock(&l->mu);
      return NR_FAIL(st, "batch %lld of epoch %lld: %s", (long long)b + 1, (long long)l->epoch, msg);
   }
   l->delivered++;
   l->holding = 1;
   *slot_out = (int32_t)(b % l->nslots);
   *count = s->count;
   pthread_mutex_unlock(&l->mu);
   return NR_OK;
}

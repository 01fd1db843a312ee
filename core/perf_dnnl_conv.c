/* perf_dnnl_conv.c — 2-d convolution through oneDNN (the library PyTorch uses for CPU convs), as
 * an optional fast path behind nr_conv2d_* (core/perf.h).
 *
 * How: one oneDNN primitive per (direction, geometry), created at the first call and cached for
 * the life of the process. Tensors stay NCHW (nrlua's layout); oneDNN picks its own layout
 * (format "any": nChw8c blocks on AVX2) and the cached reorders convert the operands on the way
 * in and out. The blocked operands, the scratchpad and the weight-gradient temporaries of every
 * entry live in one shared, grow-only arena (each entry knows its offsets): they are only needed
 * during a call, so memory is the largest entry's need, not the sum over all layers (this took
 * VGG-19 training from ~0.9 GiB of per-layer copies to one layer's worth). The weight gradient
 * is computed into a plain temporary and folded into dw with the caller's scale / acc rule.
 * Not here: the layer kernels' own im2col path (core/nn_conv.c, the fallback and reference),
 * CUDA (core/cuda/). Without oneDNN (NR_WITH_DNNL undefined) every call returns
 * NR_PERF_UNHANDLED.
 * Invariants: single caller thread (the cache and the arena have no lock); cache entries and the
 * arena are never freed while the process lives (bounded by the number of distinct conv shapes, at most
 * CACHE_MAX; beyond that a call is NR_PERF_UNHANDLED); nothing is counted in nr_memory_*.
 */
#include "internal.h"
#include "perf.h"

#include <stdlib.h>
#include <string.h>

/* mode: 0 auto, 1 oneDNN (blocked layout, reorders), 2 never, 3 oneDNN on plain NCHW, 4 never but
 * the layer kernels' own fast paths (Winograd) wherever they apply. */
static int g_mode = -1;

static int conv_mode(void)
{
   if (g_mode < 0) {
      const char *e = getenv("NR_CONV");
      g_mode = 0;
      if (e && !strcmp(e, "dnnl")) g_mode = 1;
      else if (e && !strcmp(e, "im2col")) g_mode = 2;
      else if (e && !strcmp(e, "dnnl_plain")) g_mode = 3;
      else if (e && !strcmp(e, "own")) g_mode = 4;
   }
   return g_mode;
}

int nr_perf_conv_mode(void) { return conv_mode(); }

int nr_perf_conv_set_mode(int mode)
{
   int old = conv_mode();
   g_mode = mode < 0 || mode > 4 ? 0 : mode;
   return old;
}

#ifndef NR_WITH_DNNL

int nr_perf_dnnl_wide(void) { return 0; }

nr_status nr_perf_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                                 int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                 int32_t dil_h, int32_t dil_w, int32_t groups)
{
   return NR_PERF_UNHANDLED;
}
nr_status nr_perf_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w, int32_t stride_h,
                                       int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h,
                                       int32_t dil_w, int32_t groups)
{
   return NR_PERF_UNHANDLED;
}
nr_status nr_perf_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw, nr_tensor *db,
                                         int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                         int32_t dil_h, int32_t dil_w, int32_t groups, float scale, float acc)
{
   return NR_PERF_UNHANDLED;
}

#else

#include <dnnl.h>

#define DNNL_TRY(call)                                                                          \
   do {                                                                                         \
      dnnl_status_t s_ = (call);                                                                \
      if (s_ != dnnl_success) return NR_FAIL(NR_E_INTERNAL, "oneDNN: %s failed (status %d)", #call, (int)s_); \
   } while (0)

enum { KIND_FWD = 0, KIND_BWD_DATA = 1, KIND_BWD_WEIGHTS = 2 };
enum { MAX_ARGS = 4, CACHE_MAX = 512 };

/* One operand of a primitive: the user's plain NCHW view and the primitive's own layout. */
typedef struct {
   int arg;                   /* DNNL_ARG_* */
   int out;                   /* 1: written by the primitive */
   dnnl_memory_t user;        /* plain layout, handle set per call */
   dnnl_memory_t inner;       /* the primitive's layout; == user when no reorder */
   dnnl_primitive_t reorder;  /* user -> inner (in) or inner -> user (out); NULL when same */
   size_t off;                /* inner's storage in the arena (when inner != user) */
} operand;

typedef struct {
   int64_t key[16];
   dnnl_primitive_t prim;
   operand ops[MAX_ARGS];
   int nops;
   dnnl_memory_t scratch;
   size_t scratch_off;
   size_t tmp_w_off, tmp_b_off; /* bwd weights: plain gradients before the scale/acc fold */
   size_t arena_need;           /* bytes of arena this entry uses */
} entry;

static dnnl_engine_t g_engine;
static dnnl_stream_t g_stream;
static entry *g_cache[CACHE_MAX];
static int g_ncache;

int nr_perf_dnnl_wide(void)
{
   static int wide = -1;
   if (wide < 0) {
      const dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
      wide = (isa & dnnl_cpu_isa_avx512_core) == dnnl_cpu_isa_avx512_core;
   }
   return wide;
}

static nr_status init_engine(void)
{
   if (g_engine) return NR_OK;
   DNNL_TRY(dnnl_engine_create(&g_engine, dnnl_cpu, 0));
   DNNL_TRY(dnnl_stream_create(&g_stream, g_engine, dnnl_stream_default_flags));
   return NR_OK;
}

static void *alloc_bytes(size_t n)
{
   void *p = NULL;
   if (posix_memalign(&p, 64, n ? n : 64)) return NULL;
   return p;
}

/* The shared arena: grown (never shrunk) to the largest entry's need before that entry runs. */
static char *g_arena;
static size_t g_arena_size;

static nr_status arena_reserve(size_t need)
{
   if (need <= g_arena_size) return NR_OK;
   char *p = alloc_bytes(need);
   if (!p) return NR_FAIL(NR_E_OOM, "no memory for the oneDNN workspace (%zu bytes)", need);
   free(g_arena);
   g_arena = p, g_arena_size = need;
   return NR_OK;
}

/* Reserves n bytes at the end of entry e's arena layout (64-byte aligned); returns the offset. */
static size_t arena_take(entry *e, size_t n)
{
   size_t off = e->arena_need;
   e->arena_need += (n + 63) & ~(size_t)63;
   return off;
}

/* Plain descriptors: data (N, C, H, W) nchw; weights oihw, or goihw (G, O/G, I/G, KH, KW). */
static void plain_data_md(dnnl_memory_desc_t *md, int64_t n, int64_t c, int64_t h, int64_t w)
{
   dnnl_dims_t d = {n, c, h, w};
   dnnl_memory_desc_init_by_tag(md, 4, d, dnnl_f32, dnnl_nchw);
}
static void plain_weights_md(dnnl_memory_desc_t *md, const nr_tensor *w, int32_t groups)
{
   if (groups == 1) {
      dnnl_dims_t d = {w->shape[0], w->shape[1], w->shape[2], w->shape[3]};
      dnnl_memory_desc_init_by_tag(md, 4, d, dnnl_f32, dnnl_oihw);
   } else {
      dnnl_dims_t d = {groups, w->shape[0] / groups, w->shape[1], w->shape[2], w->shape[3]};
      dnnl_memory_desc_init_by_tag(md, 5, d, dnnl_f32, dnnl_goihw);
   }
}
static void any_like(dnnl_memory_desc_t *out, const dnnl_memory_desc_t *plain)
{
   dnnl_memory_desc_init_by_tag(out, plain->ndims, plain->dims, dnnl_f32, dnnl_format_tag_any);
}

/* Sets up operand o for argument `arg`: user plain md vs the primitive's md `inner_md`. */
static nr_status make_operand(entry *e, operand *o, int arg, int out, const dnnl_memory_desc_t *user_md,
                              const dnnl_memory_desc_t *inner_md)
{
   o->arg = arg, o->out = out;
   DNNL_TRY(dnnl_memory_create(&o->user, user_md, g_engine, DNNL_MEMORY_NONE));
   if (dnnl_memory_desc_equal(user_md, inner_md)) {
      o->inner = o->user;
      return NR_OK;
   }
   o->off = arena_take(e, dnnl_memory_desc_get_size(inner_md));
   DNNL_TRY(dnnl_memory_create(&o->inner, inner_md, g_engine, DNNL_MEMORY_NONE));
   dnnl_primitive_desc_t rpd;
   if (out) DNNL_TRY(dnnl_reorder_primitive_desc_create(&rpd, inner_md, g_engine, user_md, g_engine, NULL));
   else DNNL_TRY(dnnl_reorder_primitive_desc_create(&rpd, user_md, g_engine, inner_md, g_engine, NULL));
   DNNL_TRY(dnnl_primitive_create(&o->reorder, rpd));
   dnnl_primitive_desc_destroy(rpd);
   return NR_OK;
}

static nr_status finish_entry(entry *e, dnnl_primitive_desc_t pd)
{
   const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
   if (smd && dnnl_memory_desc_get_size(smd) > 0) {
      e->scratch_off = arena_take(e, dnnl_memory_desc_get_size(smd));
      DNNL_TRY(dnnl_memory_create(&e->scratch, smd, g_engine, DNNL_MEMORY_NONE));
   }
   DNNL_TRY(dnnl_primitive_create(&e->prim, pd));
   return NR_OK;
}

static dnnl_primitive_attr_t user_scratch_attr(void)
{
   dnnl_primitive_attr_t attr = NULL;
   if (dnnl_primitive_attr_create(&attr) != dnnl_success) return NULL;
   dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
   return attr;
}

typedef struct {
   int kind;
   int64_t n, cin, h, w, cout, kh, kw, ho, wo;
   int32_t sh, sw, ph, pw, dh, dw, groups, bias, plain;
} conv_key;

static void make_key(const conv_key *k, int64_t key[16])
{
   int64_t v[16] = {k->kind, k->n, k->cin, k->h, k->w, k->cout, k->kh, k->kw,
                    ((int64_t)k->sh << 32) | (uint32_t)k->sw, ((int64_t)k->ph << 32) | (uint32_t)k->pw,
                    ((int64_t)k->dh << 32) | (uint32_t)k->dw, k->groups, k->bias, k->plain, k->ho, k->wo};
   memcpy(key, v, sizeof v);
}

static entry *lookup(const conv_key *k)
{
   int64_t key[16];
   make_key(k, key);
   for (int i = 0; i < g_ncache; i++)
      if (!memcmp(g_cache[i]->key, key, sizeof key)) return g_cache[i];
   return NULL;
}

/* Builds the primitive for k (x: data (N, Cin, H, W), w: weights). */
static nr_status build(const conv_key *k, const nr_tensor *w, entry **out)
{
   *out = NULL;
   if (g_ncache >= CACHE_MAX) return NR_PERF_UNHANDLED;
   NR_TRY(init_engine());
   dnnl_memory_desc_t src_p, dst_p, wei_p, bias_p, src_a, dst_a, wei_a, bias_a;
   plain_data_md(&src_p, k->n, k->cin, k->h, k->w);
   plain_data_md(&dst_p, k->n, k->cout, k->ho, k->wo);
   plain_weights_md(&wei_p, w, k->groups);
   dnnl_dims_t bd = {k->cout};
   dnnl_memory_desc_init_by_tag(&bias_p, 1, bd, dnnl_f32, dnnl_a);
   if (k->plain) {
      src_a = src_p, dst_a = dst_p, wei_a = wei_p;
   } else {
      any_like(&src_a, &src_p), any_like(&dst_a, &dst_p), any_like(&wei_a, &wei_p);
   }
   bias_a = bias_p;
   dnnl_dims_t strides = {k->sh, k->sw}, dil = {k->dh - 1, k->dw - 1}, pl = {k->ph, k->pw};
   /* right padding so that the output size matches: (ho - 1) * s + span - h - pl */
   dnnl_dims_t pr = {(k->ho - 1) * k->sh + (k->kh - 1) * k->dh + 1 - k->h - k->ph,
                     (k->wo - 1) * k->sw + (k->kw - 1) * k->dw + 1 - k->w - k->pw};
   dnnl_convolution_desc_t fwd_d, d;
   /* a geometry oneDNN does not describe (e.g. negative right padding) is left to the caller */
   if (dnnl_dilated_convolution_forward_desc_init(&fwd_d, dnnl_forward_training, dnnl_convolution_direct, &src_a,
                                                  &wei_a, k->bias ? &bias_a : NULL, &dst_a, strides, dil, pl,
                                                  pr) != dnnl_success)
      return NR_PERF_UNHANDLED;
   dnnl_primitive_attr_t attr = user_scratch_attr();
   if (!attr) return NR_FAIL(NR_E_INTERNAL, "oneDNN: cannot create a primitive attribute");
   dnnl_primitive_desc_t fwd_pd = NULL, pd = NULL;
   dnnl_status_t st = dnnl_primitive_desc_create(&fwd_pd, &fwd_d, attr, g_engine, NULL);
   if (st != dnnl_success) {
      dnnl_primitive_attr_destroy(attr);
      return NR_PERF_UNHANDLED;
   }
   if (k->kind == KIND_FWD) {
      pd = fwd_pd, fwd_pd = NULL;
   } else {
      if (k->kind == KIND_BWD_DATA)
         st = dnnl_dilated_convolution_backward_data_desc_init(&d, dnnl_convolution_direct, &src_a, &wei_a, &dst_a,
                                                               strides, dil, pl, pr);
      else
         st = dnnl_dilated_convolution_backward_weights_desc_init(&d, dnnl_convolution_direct, &src_a, &wei_a,
                                                                  k->bias ? &bias_a : NULL, &dst_a, strides, dil,
                                                                  pl, pr);
      if (st == dnnl_success) st = dnnl_primitive_desc_create(&pd, &d, attr, g_engine, fwd_pd);
      dnnl_primitive_desc_destroy(fwd_pd);
      if (st != dnnl_success) {
         dnnl_primitive_attr_destroy(attr);
         return NR_PERF_UNHANDLED;
      }
   }
   dnnl_primitive_attr_destroy(attr);
   entry *e = calloc(1, sizeof *e);
   if (!e) {
      dnnl_primitive_desc_destroy(pd);
      return NR_FAIL(NR_E_OOM, "no memory for a oneDNN cache entry");
   }
   nr_status s = NR_OK;
#define Q(what) dnnl_primitive_desc_query_md(pd, what, 0)
   if (k->kind == KIND_FWD) {
      e->nops = k->bias ? 4 : 3;
      if (s == NR_OK) s = make_operand(e, &e->ops[0], DNNL_ARG_SRC, 0, &src_p, Q(dnnl_query_src_md));
      if (s == NR_OK) s = make_operand(e, &e->ops[1], DNNL_ARG_WEIGHTS, 0, &wei_p, Q(dnnl_query_weights_md));
      if (s == NR_OK) s = make_operand(e, &e->ops[2], DNNL_ARG_DST, 1, &dst_p, Q(dnnl_query_dst_md));
      if (s == NR_OK && k->bias) s = make_operand(e, &e->ops[3], DNNL_ARG_BIAS, 0, &bias_p, &bias_p);
   } else if (k->kind == KIND_BWD_DATA) {
      e->nops = 3;
      if (s == NR_OK) s = make_operand(e, &e->ops[0], DNNL_ARG_DIFF_DST, 0, &dst_p, Q(dnnl_query_diff_dst_md));
      if (s == NR_OK) s = make_operand(e, &e->ops[1], DNNL_ARG_WEIGHTS, 0, &wei_p, Q(dnnl_query_weights_md));
      if (s == NR_OK) s = make_operand(e, &e->ops[2], DNNL_ARG_DIFF_SRC, 1, &src_p, Q(dnnl_query_diff_src_md));
   } else {
      e->nops = k->bias ? 4 : 3;
      if (s == NR_OK) s = make_operand(e, &e->ops[0], DNNL_ARG_SRC, 0, &src_p, Q(dnnl_query_src_md));
      if (s == NR_OK) s = make_operand(e, &e->ops[1], DNNL_ARG_DIFF_DST, 0, &dst_p, Q(dnnl_query_diff_dst_md));
      if (s == NR_OK) s = make_operand(e, &e->ops[2], DNNL_ARG_DIFF_WEIGHTS, 1, &wei_p, Q(dnnl_query_diff_weights_md));
      if (s == NR_OK && k->bias) s = make_operand(e, &e->ops[3], DNNL_ARG_DIFF_BIAS, 1, &bias_p, &bias_p);
      /* plain temporaries for the scale/acc fold */
      if (s == NR_OK) {
         e->tmp_w_off = arena_take(e, dnnl_memory_desc_get_size(&wei_p));
         e->tmp_b_off = arena_take(e, sizeof(float) * (size_t)k->cout);
      }
   }
#undef Q
   if (s == NR_OK) s = finish_entry(e, pd);
   dnnl_primitive_desc_destroy(pd);
   if (s != NR_OK) return s; /* the partial entry leaks; this happens only on OOM / library errors */
   g_cache[g_ncache++] = e;
   *out = e;
   return NR_OK;
}

static nr_status get_entry(const conv_key *k, const nr_tensor *w, entry **e)
{
   *e = lookup(k);
   if (*e) return NR_OK;
   nr_status s = build(k, w, e);
   if (s != NR_OK) return s;
   make_key(k, (*e)->key);
   return NR_OK;
}

/* Runs entry e with the user pointers ptrs[i] for e->ops[i]. */
static nr_status execute(entry *e, void *const *ptrs)
{
   dnnl_exec_arg_t args[MAX_ARGS + 1];
   int na = 0;
   NR_TRY(arena_reserve(e->arena_need));
   if (e->scratch) DNNL_TRY(dnnl_memory_set_data_handle(e->scratch, g_arena + e->scratch_off));
   for (int i = 0; i < e->nops; i++) {
      operand *o = &e->ops[i];
      DNNL_TRY(dnnl_memory_set_data_handle(o->user, ptrs[i]));
      if (o->inner != o->user) DNNL_TRY(dnnl_memory_set_data_handle(o->inner, g_arena + o->off));
      if (o->reorder && !o->out) {
         dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, o->user}, {DNNL_ARG_TO, o->inner}};
         DNNL_TRY(dnnl_primitive_execute(o->reorder, g_stream, 2, ra));
      }
      args[na].arg = o->arg, args[na].memory = o->inner, na++;
   }
   if (e->scratch) args[na].arg = DNNL_ARG_SCRATCHPAD, args[na].memory = e->scratch, na++;
   DNNL_TRY(dnnl_primitive_execute(e->prim, g_stream, na, args));
   for (int i = 0; i < e->nops; i++) {
      operand *o = &e->ops[i];
      if (o->reorder && o->out) {
         dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, o->inner}, {DNNL_ARG_TO, o->user}};
         DNNL_TRY(dnnl_primitive_execute(o->reorder, g_stream, 2, ra));
      }
   }
   DNNL_TRY(dnnl_stream_wait(g_stream));
   return NR_OK;
}

/* Whether oneDNN takes this convolution in the current mode; fills plain.
 * auto (bench/README.md has the per-shape measurements behind it): oneDNN's blocked kernels for
 * dense (groups 1) convolutions with a spatial kernel: the forward for any number of input
 * channels (AVX2: 1.1-1.4x faster than im2col + OpenBLAS with >= 16; 1.2-4.5x on 1-8-channel
 * first layers) and backward-data from 16 input channels (below, 0.5-1.2x: the first layers'
 * input gradient is im2col's); with AVX-512 kernels (nr_perf_dnnl_wide) also their weight
 * gradients (1.05-1.1x of a step; on AVX2 oneDNN's were 0.75-0.9x of im2col's, the extra
 * reorders of x and dy). The layer kernels everywhere else: 1x1 convs (no im2col there; oneDNN
 * measured no gain even with AVX-512) and depthwise (the direct kernels win by 2-4x). */
static bool wanted(int kind, int64_t n, int64_t cin, int64_t kk, int32_t groups, int32_t *plain)
{
   int mode = conv_mode();
   if (mode == 2 || mode == 4 || n < 1) return false;
   *plain = mode == 3;
   if (mode == 1 || mode == 3) return true;
   if (groups != 1 || kk == 1) return false;
   if (kind == KIND_BWD_WEIGHTS) return nr_perf_dnnl_wide();
   return kind == KIND_FWD || cin >= 16;
}

static void fill_key(conv_key *k, int kind, const nr_tensor *x, const nr_tensor *w, const nr_tensor *y,
                     int32_t sh, int32_t sw, int32_t ph, int32_t pw, int32_t dh, int32_t dw, int32_t groups,
                     int32_t bias, int32_t plain)
{
   memset(k, 0, sizeof *k);
   k->kind = kind;
   k->n = x->shape[0], k->cin = x->shape[1], k->h = x->shape[2], k->w = x->shape[3];
   k->cout = w->shape[0], k->kh = w->shape[2], k->kw = w->shape[3];
   k->ho = y->shape[2], k->wo = y->shape[3];
   k->sh = sh, k->sw = sw, k->ph = ph, k->pw = pw, k->dh = dh, k->dw = dw, k->groups = groups;
   k->bias = bias, k->plain = plain;
}

nr_status nr_perf_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                                 int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                 int32_t dil_h, int32_t dil_w, int32_t groups)
{
   int32_t plain = 0;
   if (x->device != NR_CPU || !wanted(KIND_FWD, x->shape[0], x->shape[1], w->shape[2] * w->shape[3], groups, &plain)) return NR_PERF_UNHANDLED;
   conv_key k;
   fill_key(&k, KIND_FWD, x, w, y, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, b != NULL, plain);
   entry *e;
   nr_status s = get_entry(&k, w, &e);
   if (s != NR_OK) return s;
   void *ptrs[4] = {x->data, w->data, y->data, b ? b->data : NULL};
   return execute(e, ptrs);
}

nr_status nr_perf_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w, int32_t stride_h,
                                       int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h,
                                       int32_t dil_w, int32_t groups)
{
   int32_t plain = 0;
   if (dy->device != NR_CPU || !wanted(KIND_BWD_DATA, dx->shape[0], dx->shape[1], w->shape[2] * w->shape[3], groups, &plain)) return NR_PERF_UNHANDLED;
   conv_key k;
   fill_key(&k, KIND_BWD_DATA, dx, w, dy, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, 0, plain);
   entry *e;
   nr_status s = get_entry(&k, w, &e);
   if (s != NR_OK) return s;
   void *ptrs[3] = {dy->data, w->data, dx->data};
   return execute(e, ptrs);
}

nr_status nr_perf_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw, nr_tensor *db,
                                         int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                         int32_t dil_h, int32_t dil_w, int32_t groups, float scale, float acc)
{
   int32_t plain = 0;
   if (x->device != NR_CPU || !wanted(KIND_BWD_WEIGHTS, x->shape[0], x->shape[1], dw->shape[2] * dw->shape[3], groups, &plain)) return NR_PERF_UNHANDLED;
   conv_key k;
   fill_key(&k, KIND_BWD_WEIGHTS, x, dw, dy, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, db != NULL, plain);
   entry *e;
   nr_status s = get_entry(&k, dw, &e);
   if (s != NR_OK) return s;
   /* gradients land in the entry's plain temporaries, then dw = acc * dw + scale * tmp */
   NR_TRY(arena_reserve(e->arena_need));
   float *tmp_w = (float *)(g_arena + e->tmp_w_off), *tmp_b = (float *)(g_arena + e->tmp_b_off);
   void *ptrs[4] = {x->data, dy->data, tmp_w, tmp_b};
   NR_TRY(execute(e, ptrs));
   const int64_t nw = nr_tensor_numel(dw);
   float *pw = dw->data;
   const float *tw = tmp_w;
   if (acc == 0.0f && scale == 1.0f) {
      memcpy(pw, tw, sizeof(float) * (size_t)nw);
   } else {
#pragma omp parallel for schedule(static) if (nr_parallel_worth(nw, 2))
      for (int64_t i = 0; i < nw; i++) pw[i] = (acc == 0.0f ? 0.0f : acc * pw[i]) + scale * tw[i];
   }
   if (db) {
      float *pb = db->data;
      for (int64_t i = 0; i < k.cout; i++) pb[i] = (acc == 0.0f ? 0.0f : acc * pb[i]) + scale * tmp_b[i];
   }
   return NR_OK;
}

#endif

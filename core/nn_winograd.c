/* nn_winograd.c — 3x3 stride-1 convolution forward and backward-data by Winograd F(2x2, 3x3)
 * on the CPU, for layers with 128 or more channels (nn_winograd_applies).
 *
 * How: the output is cut into 2x2 tiles; for each tile and channel the 4x4 input patch d becomes
 * V = B^T d B, each 3x3 kernel g becomes U = G g G^T (once per call), and for each of the 16
 * positions xi of the 4x4 transform the products over input channels are one matrix product
 * M_xi (Cout x tiles) = U_xi (Cout x Cin) V_xi (Cin x tiles); the output tile is A^T M A. That is
 * 16 multiplies per tile and channel pair instead of 36. Tiles are processed in blocks of
 * WINO_TILES per thread so V and M stay in cache; the 16 products of a block go through
 * nr_sgemm's narrow kernel (single-threaded inside the parallel loop). Both transforms run a tile
 * row at a time, vectorized over its tiles (AVX2 clones).
 * Backward-data is the same pipeline on dy with the kernels transposed and rotated.
 * Not here: strides, dilation, groups, the weight gradient (core/nn_conv.c's other paths).
 * Invariants: per-thread scratch only (nn_scratch slots 0 and 1; the transformed weights in the
 * calling thread's slot 2, shared read-only); results differ from the direct convolution by
 * float rounding only (the transforms use 0.5 and +-1 coefficients). Non-finite inputs: an inf
 * reaches the same outputs, but the transforms' differences (inf - inf) turn some of them NaN
 * where the direct convolution gives inf (oneDNN's Winograd does the same); NaN stays NaN.
 */
#include "nn_internal.h"

#include <string.h>

enum { WINO_TILES = 64 }; /* tiles per block: the narrow product's widest */

/* U[xi][o][c] = (G g G^T)[xi] for every kernel g = w[o][c] (3x3), w (cout, cin, 3, 3). With
 * flip, the product's output channels are w's inputs: U[xi][c][o] from w[o][c] rotated by 180
 * degrees (the backward-data pass as a forward convolution of dy). */
static void wino_weights(const float *w, float *u, int64_t cout, int64_t cin, bool flip)
{
   const int64_t oc = cout * cin;
#pragma omp parallel for schedule(static) if (oc > 4096)
   for (int64_t q = 0; q < oc; q++) {
      const float *w9 = w + q * 9;
      float g[9];
      for (int i = 0; i < 9; i++) g[i] = flip ? w9[8 - i] : w9[i];
      const int64_t dst = flip ? (q % cin) * cout + q / cin : q;
      float t[4][3]; /* G g: rows 4, cols 3 */
      for (int j = 0; j < 3; j++) {
         const float g0 = g[j], g1 = g[3 + j], g2 = g[6 + j];
         t[0][j] = g0;
         t[1][j] = 0.5f * (g0 + g1 + g2);
         t[2][j] = 0.5f * (g0 - g1 + g2);
         t[3][j] = g2;
      }
      for (int i = 0; i < 4; i++) { /* (G g) G^T */
         const float a = t[i][0], b = t[i][1], c = t[i][2];
         u[(i * 4 + 0) * oc + dst] = a;
         u[(i * 4 + 1) * oc + dst] = 0.5f * (a + b + c);
         u[(i * 4 + 2) * oc + dst] = 0.5f * (a - b + c);
         u[(i * 4 + 3) * oc + dst] = c;
      }
   }
}

/* Floats of per-thread row scratch the transforms need (after the block's V). */
static int64_t wino_rowbuf(int64_t tw) { return 4 * (2 * tw + 4) + 8 * (tw + 2) + 4 * WINO_TILES; }

/* The run of tiles of one tile row that starts at block offset k (tile t0 + k) and stays inside
 * the block of nt tiles: image n, tile row ty, first tile column tx0, length run. */
typedef struct {
   int64_t n, ty, tx0, run;
} wino_span;

static inline wino_span wino_span_at(int64_t t0, int64_t k, int64_t nt, int64_t th, int64_t tw)
{
   const int64_t t = t0 + k;
   wino_span r;
   r.n = t / (th * tw), r.ty = (t % (th * tw)) / tw, r.tx0 = t % tw;
   r.run = tw - r.tx0 < nt - k ? tw - r.tx0 : nt - k;
   return r;
}

/* V[xi][c][k] = (B^T d B)[xi] for the tiles t0..t0+nt-1 of the whole batch (tile index
 * (n*th + ty)*tw + tx), a tile row at a time and vectorized over its tiles: the four input rows
 * of a tile row are combined (B^T) over their full width, split into even and odd columns, and
 * B then takes neighbouring even/odd entries, so every loop runs over contiguous floats. */
NR_SIMD_CLONES
static void wino_input(const float *x, float *v, float *rb, const conv_geom *g, int64_t th, int64_t tw, int64_t t0,
                       int64_t nt)
{
   const int64_t plane = g->h * g->w, xstride = g->cin * WINO_TILES, pw2 = 2 * tw + 4, hw2 = tw + 2;
   float *d = rb, *eo = rb + 4 * pw2; /* d: 4 padded rows; eo: E0..E3, O0..O3 */
   for (int64_t k = 0; k < nt;) {
      const wino_span sp = wino_span_at(t0, k, nt, th, tw);
      const int64_t n = sp.n, tx0 = sp.tx0, run = sp.run;
      const int64_t r0 = 2 * sp.ty - g->ph, j0 = 2 * tx0, j1 = 2 * (tx0 + run) + 2; /* padded columns used */
      for (int64_t c = 0; c < g->cin; c++) {
         const float *xp = x + (n * g->cin + c) * plane;
         for (int i = 0; i < 4; i++) { /* d_i[j] = x[r0 + i][j - pw], zero outside */
            float *di = d + i * pw2;
            const int64_t r = r0 + i;
            for (int64_t j = j0; j < j1; j++) di[j] = 0.0f;
            if (r < 0 || r >= g->h) continue;
            int64_t a = j0 - g->pw < 0 ? 0 : j0 - g->pw, e = j1 - g->pw > g->w ? g->w : j1 - g->pw;
            for (int64_t q = a; q < e; q++) di[q + g->pw] = xp[r * g->w + q];
         }
         const float *d0 = d, *d1 = d + pw2, *d2 = d + 2 * pw2, *d3 = d + 3 * pw2;
         float *E0 = eo, *E1 = eo + hw2, *E2 = eo + 2 * hw2, *E3 = eo + 3 * hw2;
         float *O0 = eo + 4 * hw2, *O1 = eo + 5 * hw2, *O2 = eo + 6 * hw2, *O3 = eo + 7 * hw2;
         for (int64_t u = tx0; u <= tx0 + run; u++) { /* B^T over rows, split even / odd columns */
            const int64_t je = 2 * u, jo = 2 * u + 1;
            E0[u] = d0[je] - d2[je], O0[u] = d0[jo] - d2[jo];
            E1[u] = d1[je] + d2[je], O1[u] = d1[jo] + d2[jo];
            E2[u] = d2[je] - d1[je], O2[u] = d2[jo] - d1[jo];
            E3[u] = d1[je] - d3[je], O3[u] = d1[jo] - d3[jo];
         }
         float *vo = v + c * WINO_TILES + k - tx0;
         const float *E[4] = {E0, E1, E2, E3}, *O[4] = {O0, O1, O2, O3};
         for (int i = 0; i < 4; i++) { /* then B over columns */
            const float *Ei = E[i], *Oi = O[i];
            float *v0 = vo + (4 * i + 0) * xstride, *v1 = vo + (4 * i + 1) * xstride, *v2 = vo + (4 * i + 2) * xstride,
                  *v3 = vo + (4 * i + 3) * xstride;
            for (int64_t tx = tx0; tx < tx0 + run; tx++) {
               v0[tx] = Ei[tx] - Ei[tx + 1];
               v1[tx] = Oi[tx] + Ei[tx + 1];
               v2[tx] = Ei[tx + 1] - Oi[tx];
               v3[tx] = Oi[tx] - Oi[tx + 1];
            }
         }
      }
      k += run;
   }
}

/* y tiles t0..t0+nt-1 = A^T M A (+ bias) from M[xi][o][k], a tile row at a time, vectorized over
 * its tiles; the two output columns of each tile are interleaved on the store. */
NR_SIMD_CLONES
static void wino_output(const float *m, float *y, float *rb, const float *bias, const conv_geom *g, int64_t th,
                        int64_t tw, int64_t t0, int64_t nt)
{
   const int64_t ostride = g->cout * WINO_TILES;
   float *q00 = rb, *q01 = rb + WINO_TILES, *q10 = rb + 2 * WINO_TILES, *q11 = rb + 3 * WINO_TILES;
   for (int64_t k = 0; k < nt;) {
      const wino_span sp = wino_span_at(t0, k, nt, th, tw);
      const int64_t n = sp.n, run = sp.run, r0 = 2 * sp.ty, c0 = 2 * sp.tx0;
      const int64_t full = (g->wo - c0) / 2 < run ? (g->wo - c0) / 2 : run;
      for (int64_t o = 0; o < g->cout; o++) {
         const float *a = m + o * WINO_TILES + k, b0 = bias ? bias[o] : 0.0f;
         for (int64_t e = 0; e < run; e++) {
            const float a00 = a[e], a01 = a[ostride + e], a02 = a[2 * ostride + e], a03 = a[3 * ostride + e];
            const float a10 = a[4 * ostride + e], a11 = a[5 * ostride + e], a12 = a[6 * ostride + e],
                        a13 = a[7 * ostride + e];
            const float a20 = a[8 * ostride + e], a21 = a[9 * ostride + e], a22 = a[10 * ostride + e],
                        a23 = a[11 * ostride + e];
            const float a30 = a[12 * ostride + e], a31 = a[13 * ostride + e], a32 = a[14 * ostride + e],
                        a33 = a[15 * ostride + e];
            const float s00 = a00 + a10 + a20, s01 = a01 + a11 + a21, s02 = a02 + a12 + a22, s03 = a03 + a13 + a23;
            const float s10 = a10 - a20 - a30, s11 = a11 - a21 - a31, s12 = a12 - a22 - a32, s13 = a13 - a23 - a33;
            q00[e] = s00 + s01 + s02 + b0, q01[e] = s01 - s02 - s03 + b0;
            q10[e] = s10 + s11 + s12 + b0, q11[e] = s11 - s12 - s13 + b0;
         }
         float *y0 = y + (n * g->cout + o) * g->p + r0 * g->wo + c0, *y1 = y0 + g->wo;
         const bool row1 = r0 + 1 < g->ho;
         for (int64_t e = 0; e < full; e++) y0[2 * e] = q00[e], y0[2 * e + 1] = q01[e];
         if (row1)
            for (int64_t e = 0; e < full; e++) y1[2 * e] = q10[e], y1[2 * e + 1] = q11[e];
         if (full < run) { /* odd width: the last tile has one column */
            y0[2 * full] = q00[full];
            if (row1) y1[2 * full] = q10[full];
         }
      }
      k += run;
   }
}

/* Where Winograd beats the other paths (bench/README.md, batch 64, interleaved in one process):
 * 1.5-1.7x oneDNN's direct kernel on 512-channel layers, 1.3x on 128 channels at 16x16 and 32x32,
 * 1.08x at 8x8; slower at 64 channels and below (0.7-0.8x: the transforms cost more than the
 * multiplies they save), so: both channel counts >= 128. Needs 3x3, stride 1, no dilation, one
 * group, padding <= 2 (the backward-data pass pads by 2 - p). */
bool nn_winograd_applies(const conv_geom *g)
{
   return g->groups == 1 && g->kh == 3 && g->kw == 3 && g->sh == 1 && g->sw == 1 && g->dh == 1 && g->dw == 1 &&
          g->ph <= 2 && g->pw <= 2 && g->cin >= 128 && g->cout >= 128;
}

/* The tile pipeline for x (n, g->cin, h, w) -> y (n, g->cout, ho, wo) with the transformed
 * weights u; epi as in nn_winograd_forward. */
static nr_status wino_run(const float *x, float *y, const float *u, const float *b, const conv_geom *g,
                          const nn_epilogue *epi)
{
   const int64_t th = (g->ho + 1) / 2, tw = (g->wo + 1) / 2, tiles = g->n * th * tw;
   const int64_t blocks = (tiles + WINO_TILES - 1) / WINO_TILES;
   bool oom = false;
#pragma omp parallel
   {
      const int64_t nv = 16 * g->cin * WINO_TILES;
      float *v = nn_scratch(0, (size_t)(nv + wino_rowbuf(tw))), *m = nn_scratch(1, (size_t)(16 * g->cout * WINO_TILES));
      if (!v || !m) {
#pragma omp atomic write
         oom = true;
      }
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; blk++) {
         if (!v || !m) continue;
         const int64_t t0 = blk * WINO_TILES, nt = t0 + WINO_TILES <= tiles ? WINO_TILES : tiles - t0;
         if (nt < WINO_TILES) /* the last block: keep old scratch (maybe NaN) out of the unused columns */
            for (int64_t r = 0; r < 16 * g->cin; r++) memset(v + r * WINO_TILES + nt, 0, sizeof(float) * (WINO_TILES - nt));
         wino_input(x, v, v + nv, g, th, tw, t0, nt);
         for (int xi = 0; xi < 16; xi++)
            nr_sgemm(false, false, g->cout, WINO_TILES, g->cin, 1.0f, u + xi * g->cout * g->cin, g->cin,
                     v + xi * g->cin * WINO_TILES, WINO_TILES, 0.0f, m + xi * g->cout * WINO_TILES, WINO_TILES);
         wino_output(m, y, v + nv, b, g, th, tw, t0, nt);
      }
   }
   if (oom) return NR_FAIL(NR_E_OOM, "no memory for the Winograd tile buffers");
   if (epi) nn_epilogue_all(epi, y, g->n * g->cout, g->cout, g->p);
   return NR_OK;
}

static float *wino_weight_buffer(const conv_geom *g)
{
   return nn_scratch(2, (size_t)(16 * g->cout * g->cin));
}

nr_status nn_winograd_forward(const float *x, float *y, const float *w, const float *b, const conv_geom *g,
                              const nn_epilogue *epi)
{
   float *u = wino_weight_buffer(g);
   if (!u) return NR_FAIL(NR_E_OOM, "no memory for the Winograd weights (%lld floats)", (long long)(16 * g->cout * g->cin));
   wino_weights(w, u, g->cout, g->cin, false);
   return wino_run(x, y, u, b, g, epi);
}

/* dx = the stride-1 forward of dy with the kernels transposed (Cin <-> Cout) and rotated, padding
 * 2 - p. */
nr_status nn_winograd_backward_data(const float *dy, float *dx, const float *w, const conv_geom *g)
{
   float *u = wino_weight_buffer(g);
   if (!u) return NR_FAIL(NR_E_OOM, "no memory for the Winograd weights (%lld floats)", (long long)(16 * g->cout * g->cin));
   wino_weights(w, u, g->cout, g->cin, true);
   conv_geom t = *g;
   t.cin = g->cout, t.cout = g->cin, t.cg = g->og, t.og = g->cg;
   t.h = g->ho, t.w = g->wo, t.ho = g->h, t.wo = g->w, t.p = g->h * g->w;
   t.ph = 2 - g->ph, t.pw = 2 - g->pw;
   return wino_run(dy, dx, u, NULL, &t, NULL);
}

/* nn_winograd.c — 3x3 stride-1 convolution forward and backward-data by Winograd F(2x2, 3x3)
 * on the CPU, for layers with many channels (nn_winograd_applies).
 *
 * How: the output is cut into 2x2 tiles; for each tile and channel the 4x4 input patch d becomes
 * V = B^T d B, each 3x3 kernel g becomes U = G g G^T (once per call), and for each of the 16
 * positions xi of the 4x4 transform the products over input channels are one matrix product
 * M_xi (Cout x tiles) = U_xi (Cout x Cin) V_xi (Cin x tiles); the output tile is A^T M A. That is
 * 16 multiplies per tile and channel pair instead of 36. Tiles are processed in blocks of
 * WINO_TILES per thread so V and M stay in cache; the 16 products of a block go through
 * nr_sgemm's narrow kernel (single-threaded inside the parallel loop).
 * Backward-data is the same pipeline on dy with the kernels transposed and rotated.
 * Not here: strides, dilation, groups, the weight gradient (core/nn_conv.c's other paths).
 * Invariants: per-thread scratch only (nn_scratch slots 0 and 1; the transformed weights in the
 * calling thread's slot 2, shared read-only); results differ from the direct convolution by
 * float rounding only (the transforms use 0.5 and +-1 coefficients).
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

/* V[xi][c][k] for the tiles t0..t0+nt-1 of the whole batch (tile index = (n*th + ty)*tw + tx). */
NR_SIMD_CLONES
static void wino_input(const float *x, float *v, const conv_geom *g, int64_t th, int64_t tw, int64_t t0,
                       int64_t nt)
{
   const int64_t per_img = th * tw, plane = g->h * g->w, cstride = WINO_TILES, xstride = g->cin * WINO_TILES;
   for (int64_t k = 0; k < nt; k++) {
      const int64_t t = t0 + k, n = t / per_img, ty = (t % per_img) / tw, tx = t % tw;
      const int64_t r0 = 2 * ty - g->ph, c0 = 2 * tx - g->pw;
      const bool inside = r0 >= 0 && c0 >= 0 && r0 + 4 <= g->h && c0 + 4 <= g->w;
      for (int64_t c = 0; c < g->cin; c++) {
         const float *xp = x + (n * g->cin + c) * plane;
         float d[4][4];
         if (inside) {
            for (int i = 0; i < 4; i++)
               for (int j = 0; j < 4; j++) d[i][j] = xp[(r0 + i) * g->w + c0 + j];
         } else {
            for (int i = 0; i < 4; i++)
               for (int j = 0; j < 4; j++) {
                  const int64_t r = r0 + i, cc = c0 + j;
                  d[i][j] = r >= 0 && r < g->h && cc >= 0 && cc < g->w ? xp[r * g->w + cc] : 0.0f;
               }
         }
         float s[4][4]; /* B^T d */
         for (int j = 0; j < 4; j++) {
            s[0][j] = d[0][j] - d[2][j];
            s[1][j] = d[1][j] + d[2][j];
            s[2][j] = d[2][j] - d[1][j];
            s[3][j] = d[1][j] - d[3][j];
         }
         float *vo = v + c * cstride + k;
         for (int i = 0; i < 4; i++) { /* (B^T d) B */
            vo[(i * 4 + 0) * xstride] = s[i][0] - s[i][2];
            vo[(i * 4 + 1) * xstride] = s[i][1] + s[i][2];
            vo[(i * 4 + 2) * xstride] = s[i][2] - s[i][1];
            vo[(i * 4 + 3) * xstride] = s[i][1] - s[i][3];
         }
      }
   }
}

/* y tiles t0..t0+nt-1 = A^T M A (+ bias), from M[xi][o][k]. */
NR_SIMD_CLONES
static void wino_output(const float *m, float *y, const float *bias, const conv_geom *g, int64_t th, int64_t tw,
                        int64_t t0, int64_t nt)
{
   const int64_t per_img = th * tw, ostride = g->cout * WINO_TILES;
   for (int64_t k = 0; k < nt; k++) {
      const int64_t t = t0 + k, n = t / per_img, ty = (t % per_img) / tw, tx = t % tw;
      const int64_t r0 = 2 * ty, c0 = 2 * tx;
      const bool full = r0 + 2 <= g->ho && c0 + 2 <= g->wo;
      for (int64_t o = 0; o < g->cout; o++) {
         const float *mo = m + o * WINO_TILES + k;
         float a[4][4], s[2][4];
         for (int xi = 0; xi < 16; xi++) a[xi / 4][xi % 4] = mo[xi * ostride];
         for (int j = 0; j < 4; j++) { /* A^T M */
            s[0][j] = a[0][j] + a[1][j] + a[2][j];
            s[1][j] = a[1][j] - a[2][j] - a[3][j];
         }
         const float b0 = bias ? bias[o] : 0.0f;
         float out[2][2];
         for (int i = 0; i < 2; i++) { /* (A^T M) A */
            out[i][0] = s[i][0] + s[i][1] + s[i][2] + b0;
            out[i][1] = s[i][1] - s[i][2] - s[i][3] + b0;
         }
         float *yp = y + (n * g->cout + o) * g->p + r0 * g->wo + c0;
         if (full) {
            yp[0] = out[0][0], yp[1] = out[0][1], yp[g->wo] = out[1][0], yp[g->wo + 1] = out[1][1];
         } else {
            for (int i = 0; i < 2; i++)
               for (int j = 0; j < 2; j++)
                  if (r0 + i < g->ho && c0 + j < g->wo) yp[i * g->wo + j] = out[i][j];
         }
      }
   }
}

/* Where Winograd beats the other paths (bench/README.md, batch 64, interleaved in one process):
 * 1.4-1.7x oneDNN's direct kernel on 512-channel layers (4x4..16x16 maps) and 256 on 8x8, 1.06x
 * on 256 at 16x16, even at 128 channels and slower below (its transforms cost more than the
 * multiplies they save), so: both channel counts >= 256. Needs 3x3, stride 1, no dilation, one
 * group, padding <= 2 (the backward-data pass pads by 2 - p). */
bool nn_winograd_applies(const conv_geom *g)
{
   return g->groups == 1 && g->kh == 3 && g->kw == 3 && g->sh == 1 && g->sw == 1 && g->dh == 1 && g->dw == 1 &&
          g->ph <= 2 && g->pw <= 2 && g->cin >= 256 && g->cout >= 256;
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
      float *v = nn_scratch(0, (size_t)(16 * g->cin * WINO_TILES)), *m = nn_scratch(1, (size_t)(16 * g->cout * WINO_TILES));
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
         wino_input(x, v, g, th, tw, t0, nt);
         for (int xi = 0; xi < 16; xi++)
            nr_sgemm(false, false, g->cout, WINO_TILES, g->cin, 1.0f, u + xi * g->cout * g->cin, g->cin,
                     v + xi * g->cin * WINO_TILES, WINO_TILES, 0.0f, m + xi * g->cout * WINO_TILES, WINO_TILES);
         wino_output(m, y, b, g, th, tw, t0, nt);
      }
   }
   if (oom) return NR_FAIL(NR_E_OOM, "no memory for the Winograd tile buffers");
   if (epi) {
      const int64_t nc = g->n * g->cout;
#pragma omp parallel for if (nr_parallel_worth(nc, g->p))
      for (int64_t q = 0; q < nc; q++) nn_epilogue_plane(epi, q % g->cout, y + q * g->p, g->p);
   }
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

/* perf.h — optional fast paths for layer kernels (core/perf_*.c); not part of the FFI contract.
 *
 * What it is: entry points that a layer kernel (core/nn_conv.c) calls after its own argument
 * checks and device dispatch, with its own arguments. Each returns NR_OK when it computed the
 * result, NR_PERF_UNHANDLED when the case is not covered (build without oneDNN, a geometry or
 * mode it does not take) so that the caller runs its own CPU code, or another nr_status on a real
 * failure (the message is set).
 * What it is not: argument checking (callers have done it: f32, CPU, contiguous, shapes agree).
 * Invariants: results match the caller's reference kernels to float rounding; no tensor
 * allocation per call (primitives and their scratch are cached per shape and grow only); calls
 * come from one thread at a time (the Lua thread), as all nr_* kernels do.
 * NR_CONV selects the backend at the first call: "auto" (default), "dnnl" (oneDNN for every conv
 * it takes), "im2col" (never handled: the layer kernels' own im2col + OpenBLAS path), "own" (never
 * handled, Winograd wherever it applies).
 */
#ifndef NR_PERF_H
#define NR_PERF_H

#include "nr.h"

enum { NR_PERF_UNHANDLED = -1 };

/* Same arguments and semantics as nr_conv2d_forward / _backward_data / _backward_weight. */
nr_status nr_perf_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w, const nr_tensor *b,
                                 int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                 int32_t dil_h, int32_t dil_w, int32_t groups);
nr_status nr_perf_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w, int32_t stride_h,
                                       int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t dil_h,
                                       int32_t dil_w, int32_t groups);
nr_status nr_perf_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw, nr_tensor *db,
                                         int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w,
                                         int32_t dil_h, int32_t dil_w, int32_t groups, float scale, float acc);

/* Backend selection (for benchmarks and tests): 0 = auto, 1 = oneDNN wherever it applies, 2 =
 * never (im2col), 3 = oneDNN on plain NCHW, 4 = never, but the layer kernels' own Winograd
 * wherever it applies (NR_CONV=own). Overrides NR_CONV. Returns the previous mode. Auto lets
 * core/nn_conv.c pick Winograd only where oneDNN runs AVX2 kernels (nr_perf_dnnl_wide() == 0). */
int nr_perf_conv_set_mode(int mode);
int nr_perf_conv_mode(void);
/* 1 when oneDNN runs its 512-bit (AVX-512) kernels on this CPU. */
int nr_perf_dnnl_wide(void);

#endif

/* cudnn_emu.c — the cuDNN entry points of the CUDA backend (core/cuda/conv.c, runtime.c), on the CPU.
 *
 * What it is: the cuDNN 9 legacy convolution API as the backend calls it (handles, 4-d tensor, filter
 * and convolution descriptors; forward, backward data and backward filter with alpha/beta; the
 * Find*Ex / Get*_v7 algorithm searches and workspace queries), validating arguments as the cuDNN
 * documentation describes and failing the way cuDNN does (BAD_PARAM / NOT_SUPPORTED), with a
 * diagnostic through nr_emu_report that cudnnGetLastErrorString also returns.
 * Numerics: a double-precision reference of what the GPU computes (im2col and OpenBLAS's dgemm per
 * sample and group, checked against PyTorch to 5e-8 relative in fp32). BFLOAT16 data is read as bf16
 * and written rounded to nearest even; FLOAT data under a math type that permits tensor cores
 * (everything but CUDNN_FMA_MATH, see the cuDNN docs of cudnnMathType_t: on Ampere and later
 * CUDNN_DEFAULT_MATH and the tensor-op math types permit TF32, CUDNN_FMA_MATH does not) has both
 * multiplicands rounded to TF32 first, the worst case the real library may pick.
 * What it is not: cuDNN. Only NCHW / NHWC packed tensors, FLOAT and BFLOAT16 data with FLOAT
 * compute (FLOAT_CONFIG, PSEUDO_BFLOAT16_CONFIG), 2-d convolutions; the algorithms are a fixed
 * menu (at least two per direction, one needing a shape-dependent workspace, plus one listed as
 * NOT_SUPPORTED) and all compute the same result; timings in perf results are made up.
 * Invariants: every call runs to completion before it returns; device memory is touched only
 * between nr_emu_device_enter and nr_emu_device_leave, after every span was checked to lie in an
 * allocation of the current device; an output is never read when beta == 0; an algorithm writes
 * the whole workspace it claims (so an undersized or aliased buffer shows up); Find* overwrites its
 * output buffer with NaNs, as the docs allow ("arbitrary values"). The only global state is the
 * per-thread last error message.
 */
#include <cudnn.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu_internal.h"

#include <cblas.h>

/* ---- diagnostics */

static _Thread_local char g_last_error[1024];

/* Reports "func: message" (nr_emu_report and cudnnGetLastErrorString) and returns st. */
__attribute__((format(printf, 3, 4))) static cudnnStatus_t fail(cudnnStatus_t st, const char *func, const char *fmt, ...)
{
   va_list ap;
   va_start(ap, fmt);
   nr_emu_vreport(func, fmt, ap);
   va_end(ap);
   snprintf(g_last_error, sizeof g_last_error, "%s", nr_emu_last_message());
   return st;
}

const char *CUDNNWINAPI cudnnGetErrorString(cudnnStatus_t status)
{
   switch (status) {
#define NAME(s) case s: return #s
   NAME(CUDNN_STATUS_SUCCESS);
   NAME(CUDNN_STATUS_NOT_INITIALIZED);
   NAME(CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH);
   NAME(CUDNN_STATUS_SERIALIZATION_VERSION_MISMATCH);
   NAME(CUDNN_STATUS_DEPRECATED);
   NAME(CUDNN_STATUS_LICENSE_ERROR);
   NAME(CUDNN_STATUS_RUNTIME_IN_PROGRESS);
   NAME(CUDNN_STATUS_RUNTIME_FP_OVERFLOW);
   NAME(CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED);
   NAME(CUDNN_STATUS_BAD_PARAM);
   NAME(CUDNN_STATUS_BAD_PARAM_NULL_POINTER);
   NAME(CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER);
   NAME(CUDNN_STATUS_BAD_PARAM_NOT_FINALIZED);
   NAME(CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND);
   NAME(CUDNN_STATUS_BAD_PARAM_SIZE_INSUFFICIENT);
   NAME(CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH);
   NAME(CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH);
   NAME(CUDNN_STATUS_NOT_SUPPORTED);
   NAME(CUDNN_STATUS_NOT_SUPPORTED_SHAPE);
   NAME(CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE);
   NAME(CUDNN_STATUS_NOT_SUPPORTED_LAYOUT);
   NAME(CUDNN_STATUS_INTERNAL_ERROR);
   NAME(CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED);
   NAME(CUDNN_STATUS_EXECUTION_FAILED);
#undef NAME
   default: return "CUDNN_STATUS_UNKNOWN";
   }
}

/* cuDNN 9: the last error message of the calling thread; retrieving it clears it. */
void CUDNNWINAPI cudnnGetLastErrorString(char *message, size_t max_size)
{
   if (!message || max_size == 0) return;
   snprintf(message, max_size, "%s", g_last_error);
   g_last_error[0] = '\0';
}

size_t CUDNNWINAPI cudnnGetVersion(void) { return CUDNN_VERSION; }


/* ---- objects */

enum { HANDLE_MAGIC = 0x644e4e48, TENSOR_MAGIC = 0x644e4e54, FILTER_MAGIC = 0x644e4e46, CONV_MAGIC = 0x644e4e43 };

struct cudnnContext {
   uint32_t magic;
   int device; /* current when the handle was created: cuDNN assumes it stays the handle's device */
   cudaStream_t stream;
};

struct cudnnTensorStruct {
   uint32_t magic;
   int set;
   cudnnTensorFormat_t format;
   cudnnDataType_t dtype;
   int n, c, h, w;
};

struct cudnnFilterStruct {
   uint32_t magic;
   int set;
   cudnnTensorFormat_t format; /* NCHW: KCRS, NHWC: KRSC */
   cudnnDataType_t dtype;
   int k, c, h, w; /* c: input channels per group */
};

struct cudnnConvolutionStruct {
   uint32_t magic;
   int set;
   int pad_h, pad_w, u, v, dil_h, dil_w;
   cudnnConvolutionMode_t mode;
   cudnnDataType_t compute;
   int groups;
   cudnnMathType_t math;
};

static const char *dtype_name(cudnnDataType_t t)
{
   switch (t) {
   case CUDNN_DATA_FLOAT: return "FLOAT";
   case CUDNN_DATA_DOUBLE: return "DOUBLE";
   case CUDNN_DATA_HALF: return "HALF";
   case CUDNN_DATA_BFLOAT16: return "BFLOAT16";
   case CUDNN_DATA_INT8: return "INT8";
   case CUDNN_DATA_INT32: return "INT32";
   default: return "another data type";
   }
}

static size_t dtype_size(cudnnDataType_t t) { return t == CUDNN_DATA_BFLOAT16 ? 2 : 4; }

/* Valid enumerants of the emulated types, and the subset the emulator computes with. */
static int dtype_valid(cudnnDataType_t t) { return (int)t >= CUDNN_DATA_FLOAT && (int)t <= CUDNN_DATA_COMPLEX_FP64; }
static int format_valid(cudnnTensorFormat_t f) { return (int)f >= CUDNN_TENSOR_NCHW && (int)f <= CUDNN_TENSOR_NCHW_VECT_C; }

/* The checks of cudnnSetTensor4dDescriptor and cudnnSetFilter4dDescriptor (same rules). */
static cudnnStatus_t check_4d(const char *func, cudnnTensorFormat_t format, cudnnDataType_t dtype, const char *names,
                              const int d[4])
{
   if (!format_valid(format)) return fail(CUDNN_STATUS_BAD_PARAM, func, "format %d is not a cudnnTensorFormat_t", (int)format);
   if (!dtype_valid(dtype)) return fail(CUDNN_STATUS_BAD_PARAM, func, "dataType %d is not a cudnnDataType_t", (int)dtype);
   for (int i = 0; i < 4; i++)
      if (d[i] <= 0)
         return fail(CUDNN_STATUS_BAD_PARAM, func, "dimensions %s = (%d, %d, %d, %d): all must be positive", names, d[0],
                     d[1], d[2], d[3]);
   if ((int64_t)d[0] * d[1] * d[2] * d[3] > INT32_MAX)
      return fail(CUDNN_STATUS_NOT_SUPPORTED, func, "(%d, %d, %d, %d) exceeds 2^31 - 1 elements", d[0], d[1], d[2], d[3]);
   if (format == CUDNN_TENSOR_NCHW_VECT_C)
      return fail(CUDNN_STATUS_NOT_SUPPORTED, func, "the emulator implements the NCHW and NHWC formats only");
   if (dtype != CUDNN_DATA_FLOAT && dtype != CUDNN_DATA_BFLOAT16)
      return fail(CUDNN_STATUS_NOT_SUPPORTED, func, "dataType %s: the emulator implements FLOAT and BFLOAT16 only",
                  dtype_name(dtype));
   return CUDNN_STATUS_SUCCESS;
}

/* ---- handles and descriptors */

cudnnStatus_t CUDNNWINAPI cudnnCreate(cudnnHandle_t *handle)
{
   if (!handle) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "handle is NULL");
   struct cudnnContext *h = calloc(1, sizeof *h);
   if (!h) return fail(CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED, __func__, "out of host memory");
   h->magic = HANDLE_MAGIC;
   h->device = nr_emu_current_device();
   *handle = h;
   return CUDNN_STATUS_SUCCESS;
}

static int handle_ok(cudnnHandle_t h) { return h && h->magic == HANDLE_MAGIC; }

cudnnStatus_t CUDNNWINAPI cudnnDestroy(cudnnHandle_t handle)
{
   if (!handle_ok(handle)) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "handle is NULL or not a live cuDNN handle");
   handle->magic = 0;
   free(handle);
   return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnSetStream(cudnnHandle_t handle, cudaStream_t streamId)
{
   if (!handle_ok(handle)) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "handle is NULL or not a live cuDNN handle");
   handle->stream = streamId;
   return CUDNN_STATUS_SUCCESS;
}

/* Create / destroy of the three descriptor kinds (destroying NULL is a no-op, as in cuDNN). */
#define DESCRIPTOR_LIFECYCLE(create, destroy, type, magic_value)                                     \
   cudnnStatus_t CUDNNWINAPI create(type *desc)                                                     \
   {                                                                                                \
      if (!desc) return fail(CUDNN_STATUS_BAD_PARAM, #create, "the descriptor pointer is NULL");    \
      *desc = calloc(1, sizeof **desc);                                                             \
      if (!*desc) return fail(CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED, #create, "out of host memory"); \
      (*desc)->magic = magic_value;                                                                 \
      return CUDNN_STATUS_SUCCESS;                                                                  \
   }                                                                                                \
   cudnnStatus_t CUDNNWINAPI destroy(type desc)                                                     \
   {                                                                                                \
      if (!desc) return CUDNN_STATUS_SUCCESS;                                                       \
      if (desc->magic != magic_value) return fail(CUDNN_STATUS_BAD_PARAM, #destroy, "not a live descriptor"); \
      desc->magic = 0;                                                                              \
      free(desc);                                                                                   \
      return CUDNN_STATUS_SUCCESS;                                                                  \
   }
DESCRIPTOR_LIFECYCLE(cudnnCreateTensorDescriptor, cudnnDestroyTensorDescriptor, cudnnTensorDescriptor_t, TENSOR_MAGIC)
DESCRIPTOR_LIFECYCLE(cudnnCreateFilterDescriptor, cudnnDestroyFilterDescriptor, cudnnFilterDescriptor_t, FILTER_MAGIC)
DESCRIPTOR_LIFECYCLE(cudnnCreateConvolutionDescriptor, cudnnDestroyConvolutionDescriptor, cudnnConvolutionDescriptor_t,
                     CONV_MAGIC)
#undef DESCRIPTOR_LIFECYCLE

cudnnStatus_t CUDNNWINAPI cudnnSetTensor4dDescriptor(cudnnTensorDescriptor_t tensorDesc, cudnnTensorFormat_t format,
                                                     cudnnDataType_t dataType, int n, int c, int h, int w)
{
   if (!tensorDesc || tensorDesc->magic != TENSOR_MAGIC)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "tensorDesc is NULL or not a live tensor descriptor");
   const int d[4] = {n, c, h, w};
   cudnnStatus_t st = check_4d(__func__, format, dataType, "(n, c, h, w)", d);
   if (st) return st;
   tensorDesc->format = format;
   tensorDesc->dtype = dataType;
   tensorDesc->n = n, tensorDesc->c = c, tensorDesc->h = h, tensorDesc->w = w;
   tensorDesc->set = 1;
   return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnGetTensor4dDescriptor(const cudnnTensorDescriptor_t tensorDesc, cudnnDataType_t *dataType,
                                                     int *n, int *c, int *h, int *w, int *nStride, int *cStride,
                                                     int *hStride, int *wStride)
{
   if (!tensorDesc || tensorDesc->magic != TENSOR_MAGIC || !tensorDesc->set)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "tensorDesc is NULL, not a live tensor descriptor, or not set");
   if (!dataType || !n || !c || !h || !w || !nStride || !cStride || !hStride || !wStride)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "an output pointer is NULL");
   const struct cudnnTensorStruct *t = tensorDesc;
   *dataType = t->dtype;
   *n = t->n, *c = t->c, *h = t->h, *w = t->w;
   if (t->format == CUDNN_TENSOR_NHWC) {
      *nStride = t->h * t->w * t->c, *hStride = t->w * t->c, *wStride = t->c, *cStride = 1;
   } else {
      *nStride = t->c * t->h * t->w, *cStride = t->h * t->w, *hStride = t->w, *wStride = 1;
   }
   return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnSetFilter4dDescriptor(cudnnFilterDescriptor_t filterDesc, cudnnDataType_t dataType,
                                                     cudnnTensorFormat_t format, int k, int c, int h, int w)
{
   if (!filterDesc || filterDesc->magic != FILTER_MAGIC)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "filterDesc is NULL or not a live filter descriptor");
   const int d[4] = {k, c, h, w};
   cudnnStatus_t st = check_4d(__func__, format, dataType, "(k, c, h, w)", d);
   if (st) return st;
   filterDesc->format = format;
   filterDesc->dtype = dataType;
   filterDesc->k = k, filterDesc->c = c, filterDesc->h = h, filterDesc->w = w;
   filterDesc->set = 1;
   return CUDNN_STATUS_SUCCESS;
}

static int conv_desc_ok(cudnnConvolutionDescriptor_t d) { return d && d->magic == CONV_MAGIC; }

/* A new convolution descriptor has group count 1 and CUDNN_DEFAULT_MATH, as in cuDNN. */
cudnnStatus_t CUDNNWINAPI cudnnSetConvolution2dDescriptor(cudnnConvolutionDescriptor_t convDesc, int pad_h, int pad_w,
                                                          int u, int v, int dilation_h, int dilation_w,
                                                          cudnnConvolutionMode_t mode, cudnnDataType_t computeType)
{
   if (!conv_desc_ok(convDesc))
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "convDesc is NULL or not a live convolution descriptor");
   if (pad_h < 0 || pad_w < 0) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "padding %d x %d is negative", pad_h, pad_w);
   if (u <= 0 || v <= 0) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "stride %d x %d is not positive", u, v);
   if (dilation_h <= 0 || dilation_w <= 0)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "dilation %d x %d is not positive", dilation_h, dilation_w);
   if (mode != CUDNN_CONVOLUTION && mode != CUDNN_CROSS_CORRELATION)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "mode %d is not a cudnnConvolutionMode_t", (int)mode);
   if (!dtype_valid(computeType))
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "computeType %d is not a cudnnDataType_t", (int)computeType);
   struct cudnnConvolutionStruct *d = convDesc;
   d->pad_h = pad_h, d->pad_w = pad_w, d->u = u, d->v = v, d->dil_h = dilation_h, d->dil_w = dilation_w;
   d->mode = mode;
   d->compute = computeType;
   if (!d->groups) d->groups = 1; /* unless cudnnSetConvolutionGroupCount came first (math: calloc'd DEFAULT) */
   d->set = 1;
   return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnSetConvolutionGroupCount(cudnnConvolutionDescriptor_t convDesc, int groupCount)
{
   if (!conv_desc_ok(convDesc))
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "convDesc is NULL or not a live convolution descriptor");
   if (groupCount < 1) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "groupCount %d is not positive", groupCount);
   convDesc->groups = groupCount;
   return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnSetConvolutionMathType(cudnnConvolutionDescriptor_t convDesc, cudnnMathType_t mathType)
{
   if (!conv_desc_ok(convDesc))
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "convDesc is NULL or not a live convolution descriptor");
   if ((int)mathType < CUDNN_DEFAULT_MATH || (int)mathType > CUDNN_FMA_MATH)
      return fail(CUDNN_STATUS_BAD_PARAM, __func__, "mathType %d is not a cudnnMathType_t", (int)mathType);
   convDesc->math = mathType;
   return CUDNN_STATUS_SUCCESS;
}

/* ---- the convolution problem */

/* Directions, and the roles of the three buffers named as in the forward: x (input), w (filter),
 * y (output); backward data computes x from (w, y), backward filter w from (x, y). */
enum { DIR_FWD, DIR_BWD_DATA, DIR_BWD_FILTER, NDIRS };
enum { ROLE_X, ROLE_W, ROLE_Y, NROLES };

typedef struct {
   const char *names[NROLES]; /* the API's names for x, w, y */
   int out;                   /* the role written */
   int algo_count;            /* the cuDNN enum's ..._ALGO_COUNT */
   /* documented statuses (cuDNN 8/9 API reference of each function): an output channel count not a
    * multiple of the group count; output dimensions other than cudnnGetConvolution2dForwardOutputDim's */
   cudnnStatus_t groups_status, dims_status;
} dir_info;

static const dir_info k_dirs[NDIRS] = {
   [DIR_FWD] = {{"x", "w", "y"}, ROLE_Y, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, CUDNN_STATUS_BAD_PARAM, CUDNN_STATUS_NOT_SUPPORTED},
   [DIR_BWD_DATA] = {{"dx", "w", "dy"}, ROLE_X, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, CUDNN_STATUS_NOT_SUPPORTED,
                     CUDNN_STATUS_BAD_PARAM},
   [DIR_BWD_FILTER] = {{"x", "dw", "dy"}, ROLE_W, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, CUDNN_STATUS_BAD_PARAM,
                       CUDNN_STATUS_BAD_PARAM},
};

/* One call's arguments in the forward's roles (data pointers NULL for queries). */
typedef struct {
   cudnnHandle_t handle;
   const struct cudnnTensorStruct *xd, *yd;
   const struct cudnnFilterStruct *wd;
   const struct cudnnConvolutionStruct *cd;
   void *p[NROLES];
} conv_args;

/* A 4-d operand: canonical dims (N, C, H, W) or (K, C, R, S), stored NCHW/KCRS or NHWC/KRSC. */
typedef struct {
   int64_t d[4];
   cudnnTensorFormat_t fmt;
} layout4;

typedef struct {
   int64_t n, c, h, w, k, r, s, ho, wo;
   int64_t groups, cpg, kpg; /* input and output channels per group */
   int64_t ph, pw, sh, sw, dh, dw;
   int flip; /* CUDNN_CONVOLUTION: the filter is applied rotated by 180 degrees */
   cudnnDataType_t dtype;
   cudnnMathType_t math;
   int tf32; /* FLOAT data whose multiplicands may be rounded to TF32 */
   layout4 op[NROLES];
} conv_geom;

static int64_t numel(const layout4 *l) { return l->d[0] * l->d[1] * l->d[2] * l->d[3]; }

static int64_t storage_offset(const layout4 *l, int64_t a, int64_t b, int64_t y, int64_t x)
{
   const int64_t *d = l->d;
   return l->fmt == CUDNN_TENSOR_NHWC ? ((a * d[2] + y) * d[3] + x) * d[1] + b : ((a * d[1] + b) * d[2] + y) * d[3] + x;
}

static cudnnStatus_t check_tensor_desc(const char *func, const char *name, const struct cudnnTensorStruct *t)
{
   if (!t) return fail(CUDNN_STATUS_BAD_PARAM, func, "%sDesc is NULL", name);
   if (t->magic != TENSOR_MAGIC || !t->set)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "%sDesc is not a live tensor descriptor that was set", name);
   return CUDNN_STATUS_SUCCESS;
}

/* Output size of the forward convolution (shared by cudnnGetConvolution2dForwardOutputDim and
 * every check of a convolution): ho = 1 + (h + 2 pad - ((r - 1) dil + 1)) / stride. */
static cudnnStatus_t output_dims(const char *func, const char *xname, const char *wname,
                                 const struct cudnnConvolutionStruct *cd, const struct cudnnTensorStruct *xd,
                                 const struct cudnnFilterStruct *wd, int out[4])
{
   cudnnStatus_t st = check_tensor_desc(func, xname, xd);
   if (st) return st;
   if (!wd) return fail(CUDNN_STATUS_BAD_PARAM, func, "%sDesc is NULL", wname);
   if (wd->magic != FILTER_MAGIC || !wd->set)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "%sDesc is not a live filter descriptor that was set", wname);
   if (!cd) return fail(CUDNN_STATUS_BAD_PARAM, func, "convDesc is NULL");
   if (cd->magic != CONV_MAGIC || !cd->set)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "convDesc is not a live convolution descriptor that was set");
   if ((int64_t)wd->c * cd->groups != xd->c)
      return fail(CUDNN_STATUS_BAD_PARAM, func,
                  "%s has %d channels but the filter %d per group x %d groups = %lld (filter c is per group)", xname,
                  xd->c, wd->c, cd->groups, (long long)wd->c * cd->groups);
   const int64_t eh = (int64_t)(wd->h - 1) * cd->dil_h + 1, ew = (int64_t)(wd->w - 1) * cd->dil_w + 1;
   const int64_t ih = xd->h + 2LL * cd->pad_h, iw = xd->w + 2LL * cd->pad_w;
   if (eh > ih || ew > iw)
      return fail(CUDNN_STATUS_BAD_PARAM, func,
                  "the dilated filter (%lld x %lld) is larger than the padded input (%lld x %lld)", (long long)eh,
                  (long long)ew, (long long)ih, (long long)iw);
   out[0] = xd->n;
   out[1] = wd->k;
   out[2] = (int)(1 + (ih - eh) / cd->u);
   out[3] = (int)(1 + (iw - ew) / cd->v);
   return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolution2dForwardOutputDim(const cudnnConvolutionDescriptor_t convDesc,
                                                                const cudnnTensorDescriptor_t inputTensorDesc,
                                                                const cudnnFilterDescriptor_t filterDesc, int *n,
                                                                int *c, int *h, int *w)
{
   int d[4] = {0};
   cudnnStatus_t st = output_dims(__func__, "inputTensor", "filter", convDesc, inputTensorDesc, filterDesc, d);
   if (st) return st;
   if (!n || !c || !h || !w) return fail(CUDNN_STATUS_BAD_PARAM, __func__, "an output pointer is NULL");
   *n = d[0], *c = d[1], *h = d[2], *w = d[3];
   return CUDNN_STATUS_SUCCESS;
}

/* The handle is live and its device (current at cudnnCreate) is current now. */
static cudnnStatus_t check_handle(const char *func, cudnnHandle_t h)
{
   if (!handle_ok(h)) return fail(CUDNN_STATUS_BAD_PARAM, func, "handle is NULL or not a live cuDNN handle");
   const int cur = nr_emu_current_device();
   if (cur != h->device)
      return fail(CUDNN_STATUS_EXECUTION_FAILED, func,
                  "the handle was created on device %d but device %d is current (a cuDNN handle stays on its device)",
                  h->device, cur);
   return CUDNN_STATUS_SUCCESS;
}

/* All checks of a convolution's descriptors (the documented BAD_PARAM / NOT_SUPPORTED cases);
 * fills g. */
static cudnnStatus_t check_problem(const char *func, int dir, const conv_args *a, conv_geom *g)
{
   const dir_info *di = &k_dirs[dir];
   const char *xn = di->names[ROLE_X], *wn = di->names[ROLE_W], *yn = di->names[ROLE_Y];
   cudnnStatus_t st = check_handle(func, a->handle);
   if (st) return st;
   int od[4] = {0};
   st = output_dims(func, xn, wn, a->cd, a->xd, a->wd, od);
   if (st) return st;
   st = check_tensor_desc(func, yn, a->yd);
   if (st) return st;
   const struct cudnnTensorStruct *xd = a->xd, *yd = a->yd;
   const struct cudnnFilterStruct *wd = a->wd;
   const struct cudnnConvolutionStruct *cd = a->cd;
   if (xd->dtype != wd->dtype || xd->dtype != yd->dtype)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "data types differ: %s %s, %s %s, %s %s", xn, dtype_name(xd->dtype), wn,
                  dtype_name(wd->dtype), yn, dtype_name(yd->dtype));
   if (cd->compute != CUDNN_DATA_FLOAT)
      return fail(CUDNN_STATUS_NOT_SUPPORTED, func,
                  "%s data with compute type %s: the supported configurations here are FLOAT_CONFIG and "
                  "PSEUDO_BFLOAT16_CONFIG (compute type FLOAT)",
                  dtype_name(xd->dtype), dtype_name(cd->compute));
   if (wd->k % cd->groups)
      return fail(di->groups_status, func, "%d output channels are not a multiple of the group count %d", wd->k,
                  cd->groups);
   if (yd->n != od[0] || yd->c != od[1] || yd->h != od[2] || yd->w != od[3])
      return fail(di->dims_status, func, "%sDesc is (%d, %d, %d, %d), the convolution gives (%d, %d, %d, %d)", yn, yd->n,
                  yd->c, yd->h, yd->w, od[0], od[1], od[2], od[3]);
   *g = (conv_geom){.n = xd->n, .c = xd->c, .h = xd->h, .w = xd->w, .k = wd->k, .r = wd->h, .s = wd->w,
                    .ho = od[2], .wo = od[3], .groups = cd->groups, .cpg = wd->c, .kpg = wd->k / cd->groups,
                    .ph = cd->pad_h, .pw = cd->pad_w, .sh = cd->u, .sw = cd->v, .dh = cd->dil_h, .dw = cd->dil_w,
                    .flip = cd->mode == CUDNN_CONVOLUTION, .dtype = xd->dtype, .math = cd->math,
                    .tf32 = xd->dtype == CUDNN_DATA_FLOAT && cd->math != CUDNN_FMA_MATH};
   g->op[ROLE_X] = (layout4){{g->n, g->c, g->h, g->w}, xd->format};
   g->op[ROLE_W] = (layout4){{g->k, g->cpg, g->r, g->s}, wd->format};
   g->op[ROLE_Y] = (layout4){{g->n, g->k, g->ho, g->wo}, yd->format};
   return CUDNN_STATUS_SUCCESS;
}

/* ---- algorithms: a fixed menu per direction; all compute the same thing */

typedef enum { WS_NONE, WS_OFFSETS, WS_GROUP_FILTER, WS_FILTER, WS_FILTER_SPLITS } ws_kind;

typedef struct {
   int algo;
   cudnnDeterminism_t det;
   int tensor_op; /* a tensor-core kernel: reports CUDNN_TENSOR_OP_MATH when the math type allows */
   ws_kind ws;
} algo_info;

enum { MAX_ALGOS = 3 };
/* In the order the searches rank them (the first needs a workspace, so callers' handling of one
 * is exercised; backward filter leads with a non-deterministic one, so a caller asking for
 * determinism must skip it). */
static const algo_info k_algos[NDIRS][MAX_ALGOS] = {
   [DIR_FWD] = {{CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, CUDNN_DETERMINISTIC, 1, WS_OFFSETS},
                {CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, CUDNN_DETERMINISTIC, 0, WS_NONE}},
   [DIR_BWD_DATA] = {{CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, CUDNN_DETERMINISTIC, 1, WS_GROUP_FILTER},
                     {CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, CUDNN_NON_DETERMINISTIC, 0, WS_NONE}},
   [DIR_BWD_FILTER] = {{CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, CUDNN_NON_DETERMINISTIC, 1, WS_FILTER_SPLITS},
                       {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, CUDNN_DETERMINISTIC, 1, WS_FILTER},
                       {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, CUDNN_NON_DETERMINISTIC, 0, WS_NONE}},
};
static const int k_nalgos[NDIRS] = {2, 2, 3};
/* Listed by the searches with status NOT_SUPPORTED (callers must look at the status). */
static const int k_unsupported[NDIRS] = {CUDNN_CONVOLUTION_FWD_ALGO_FFT, CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
                                         CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT};

/* Workspace bytes of an algorithm: shape-dependent sizes of what such a kernel would stage. */
static size_t workspace_bytes(ws_kind kind, const conv_geom *g)
{
   const size_t filter = (size_t)(g->k * g->cpg * g->r * g->s);
   switch (kind) {
   case WS_NONE: return 0;
   case WS_OFFSETS: return sizeof(int32_t) * (size_t)(g->cpg * g->r * g->s + g->ho * g->wo); /* tap and pixel offsets */
   case WS_GROUP_FILTER: return sizeof(float) * (size_t)(g->kpg * g->cpg * g->r * g->s); /* one group's filter, transposed */
   case WS_FILTER: return sizeof(float) * filter;                                         /* an fp32 partial dw */
   case WS_FILTER_SPLITS: return sizeof(float) * filter * (size_t)(g->n < 4 ? g->n : 4); /* partial dw of <= 4 splits */
   }
   return 0;
}

static cudnnMathType_t algo_math(const conv_geom *g, const algo_info *ai)
{
   if (g->math == CUDNN_FMA_MATH) return CUDNN_FMA_MATH;
   return ai->tensor_op ? CUDNN_TENSOR_OP_MATH : g->math;
}

static cudnnStatus_t lookup_algo(const char *func, int dir, int algo, const algo_info **out)
{
   if (algo < 0 || algo >= k_dirs[dir].algo_count)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "algo %d is not a valid algorithm enumerant", algo);
   for (int i = 0; i < k_nalgos[dir]; i++)
      if (k_algos[dir][i].algo == algo) {
         *out = &k_algos[dir][i];
         return CUDNN_STATUS_SUCCESS;
      }
   char menu[64] = "";
   for (int i = 0; i < k_nalgos[dir]; i++)
      snprintf(menu + strlen(menu), sizeof menu - strlen(menu), "%s%d", i ? ", " : "", k_algos[dir][i].algo);
   return fail(CUDNN_STATUS_NOT_SUPPORTED, func, "algo %d does not support this problem (the emulator offers %s)", algo,
               menu);
}

/* ---- buffers */

static int overlaps(const void *a, size_t na, const void *b, size_t nb)
{
   const uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
   return na && nb && pa < pb + nb && pb < pa + na;
}

/* [p, p + bytes) is device memory of the current device, aligned to align. */
static cudnnStatus_t check_span(const char *func, const char *name, const void *p, size_t bytes, size_t align)
{
   if (!p) return fail(CUDNN_STATUS_BAD_PARAM, func, "%s is NULL", name);
   if ((uintptr_t)p % align)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "%s (%p) is not aligned to its %zu-byte elements", name, p, align);
   const int dev = nr_emu_current_device();
   if (nr_emu_is_device_span(dev, p, bytes)) return CUDNN_STATUS_SUCCESS;
   const int owner = nr_emu_device_of(p);
   if (owner < 0)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "%s (%p, %zu bytes) is not device memory", name, p, bytes);
   if (owner != dev)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "%s (%p) is memory of device %d but device %d is current", name, p, owner,
                  dev);
   return fail(CUDNN_STATUS_BAD_PARAM, func, "%s (%p, %zu bytes) runs past the end of its allocation", name, p, bytes);
}

static size_t role_bytes(const conv_geom *g, int role) { return (size_t)numel(&g->op[role]) * dtype_size(g->dtype); }

/* The three data buffers and the workspace range used (ws_used bytes, 0: none): device memory of
 * the current device, aligned, the output disjoint from the inputs, the workspace from all. */
static cudnnStatus_t check_buffers(const char *func, int dir, const conv_args *a, const conv_geom *g, const void *ws,
                                   size_t ws_used)
{
   const dir_info *di = &k_dirs[dir];
   for (int r = 0; r < NROLES; r++) {
      cudnnStatus_t st = check_span(func, di->names[r], a->p[r], role_bytes(g, r), dtype_size(g->dtype));
      if (st) return st;
   }
   for (int r = 0; r < NROLES; r++) {
      if (r != di->out && overlaps(a->p[di->out], role_bytes(g, di->out), a->p[r], role_bytes(g, r)))
         return fail(CUDNN_STATUS_BAD_PARAM, func, "%s overlaps %s: cuDNN convolutions do not run in place",
                     di->names[di->out], di->names[r]);
   }
   if (!ws_used) return CUDNN_STATUS_SUCCESS;
   cudnnStatus_t st = check_span(func, "workSpace", ws, ws_used, 1);
   if (st) return st;
   for (int r = 0; r < NROLES; r++)
      if (overlaps(ws, ws_used, a->p[r], role_bytes(g, r)))
         return fail(CUDNN_STATUS_BAD_PARAM, func, "workSpace (%zu bytes used) overlaps %s", ws_used, di->names[r]);
   return CUDNN_STATUS_SUCCESS;
}

/* ---- the arithmetic */

static void load(const layout4 *l, const void *p, cudnnDataType_t dt, int tf32, double *out)
{
   int64_t i = 0;
   for (int64_t a = 0; a < l->d[0]; a++)
      for (int64_t b = 0; b < l->d[1]; b++)
         for (int64_t y = 0; y < l->d[2]; y++)
            for (int64_t x = 0; x < l->d[3]; x++) {
               const int64_t off = storage_offset(l, a, b, y, x);
               float v = dt == CUDNN_DATA_BFLOAT16 ? bf16_to_float(((const uint16_t *)p)[off]) : ((const float *)p)[off];
               out[i++] = tf32 ? round_tf32(v) : v;
            }
}

/* p <- alpha * acc + beta * p (beta == 0: p is not read), rounded to the data type. */
static void store(const layout4 *l, void *p, cudnnDataType_t dt, const double *acc, float alpha, float beta)
{
   int64_t i = 0;
   for (int64_t a = 0; a < l->d[0]; a++)
      for (int64_t b = 0; b < l->d[1]; b++)
         for (int64_t y = 0; y < l->d[2]; y++)
            for (int64_t x = 0; x < l->d[3]; x++) {
               const int64_t off = storage_offset(l, a, b, y, x);
               double v = (double)alpha * acc[i++];
               if (dt == CUDNN_DATA_BFLOAT16) {
                  uint16_t *q = p;
                  if (beta != 0.0f) v += (double)beta * bf16_to_float(q[off]);
                  q[off] = bf16_from_float((float)v);
               } else {
                  float *q = p;
                  if (beta != 0.0f) v += (double)beta * q[off];
                  q[off] = (float)v;
               }
            }
}

/* im2col of sample n, group grp: col[(cc, r, s), (oh, ow)] = x[n, grp * cpg + cc, ih, iw], zero where
 * (ih, iw) falls in the padding; the filter taps are taken rotated for CUDNN_CONVOLUTION. With
 * add_back, the reverse (col2im): x[...] += col[...]. */
static void im2col(const conv_geom *g, double *X, int64_t n, int64_t grp, double *col, int add_back)
{
   const int64_t P = g->ho * g->wo;
   for (int64_t cc = 0; cc < g->cpg; cc++) {
      double *const xc = &X[(n * g->c + grp * g->cpg + cc) * g->h * g->w];
      for (int64_t r = 0; r < g->r; r++)
         for (int64_t s = 0; s < g->s; s++) {
            const int64_t tr = g->flip ? g->r - 1 - r : r, ts = g->flip ? g->s - 1 - s : s;
            double *const row = &col[((cc * g->r + r) * g->s + s) * P];
            for (int64_t oh = 0; oh < g->ho; oh++) {
               const int64_t ih = oh * g->sh - g->ph + tr * g->dh;
               for (int64_t ow = 0; ow < g->wo; ow++) {
                  const int64_t iw = ow * g->sw - g->pw + ts * g->dw;
                  const int inside = ih >= 0 && ih < g->h && iw >= 0 && iw < g->w;
                  if (add_back) {
                     if (inside) xc[ih * g->w + iw] += row[oh * g->wo + ow];
                  } else {
                     row[oh * g->wo + ow] = inside ? xc[ih * g->w + iw] : 0.0;
                  }
               }
            }
         }
   }
}

/* The convolution on canonical NCHW / KCRS arrays as products per sample and group (double
 * precision, OpenBLAS): with K = cpg * r * s and P = ho * wo, forward y_g (kpg x P) = w_g (kpg x K)
 * col (K x P); backward data col = w_g^T dy_g, scattered back by col2im; backward filter
 * dw_g += dy_g col^T. The output array starts at zero. */
static int conv_gemm(const conv_geom *g, int out, double *const arr[NROLES])
{
   double *const X = arr[ROLE_X], *const W = arr[ROLE_W], *const Y = arr[ROLE_Y];
   const int64_t K = g->cpg * g->r * g->s, P = g->ho * g->wo;
   double *col = malloc((size_t)(K * P > 0 ? K * P : 1) * sizeof(double));
   if (!col) return 0;
   for (int64_t n = 0; n < g->n; n++)
      for (int64_t grp = 0; grp < g->groups; grp++) {
         double *const wg = &W[grp * g->kpg * K], *const yg = &Y[(n * g->k + grp * g->kpg) * P];
         if (out == ROLE_X) {
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)K, (int)P, (int)g->kpg, 1.0, wg, (int)K, yg, (int)P,
                        0.0, col, (int)P);
            im2col(g, X, n, grp, col, 1);
            continue;
         }
         im2col(g, X, n, grp, col, 0);
         if (out == ROLE_Y)
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)g->kpg, (int)P, (int)K, 1.0, wg, (int)K, col,
                        (int)P, 0.0, yg, (int)P);
         else
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)g->kpg, (int)K, (int)P, 1.0, yg, (int)P, col, (int)P,
                        1.0, wg, (int)K);
      }
   free(col);
   return 1;
}

/* Runs direction dir on checked buffers: reads the inputs, fills the workspace used, writes the
 * output as alpha * result + beta * output. */
static cudnnStatus_t compute(const char *func, int dir, const conv_args *a, const conv_geom *g, void *ws,
                             size_t ws_used, float alpha, float beta)
{
   const int out = k_dirs[dir].out;
   double *arr[NROLES];
   int ok = 1;
   for (int r = 0; r < NROLES; r++) ok &= (arr[r] = calloc((size_t)numel(&g->op[r]), sizeof(double))) != NULL;
   if (ok) {
      nr_emu_device_enter(a->handle->stream);
      for (int r = 0; r < NROLES; r++)
         if (r != out) load(&g->op[r], a->p[r], g->dtype, g->tf32, arr[r]);
      if (ws_used) memset(ws, 0xa5, ws_used);
      ok = conv_gemm(g, out, arr);
      if (ok) store(&g->op[out], a->p[out], g->dtype, arr[out], alpha, beta);
      nr_emu_device_leave();
   }
   for (int r = 0; r < NROLES; r++) free(arr[r]);
   return ok ? CUDNN_STATUS_SUCCESS : fail(CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED, func, "out of host memory");
}

/* A scaling factor: a host float (FLOAT and BFLOAT16 data scale in float). */
static cudnnStatus_t read_scale(const char *func, const char *name, const void *p, float *out)
{
   if (!p) return fail(CUDNN_STATUS_BAD_PARAM, func, "%s is NULL", name);
   if (nr_emu_device_of(p) >= 0)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "%s points to device memory; cuDNN reads scaling factors from the host",
                  name);
   memcpy(out, p, sizeof *out);
   return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t run_conv(const char *func, int dir, const conv_args *a, int algo, void *ws, size_t ws_size,
                              const void *alpha, const void *beta)
{
   conv_geom g;
   const algo_info *ai;
   float al, be;
   cudnnStatus_t st = check_problem(func, dir, a, &g);
   if (!st) st = read_scale(func, "alpha", alpha, &al);
   if (!st) st = read_scale(func, "beta", beta, &be);
   if (!st) st = lookup_algo(func, dir, algo, &ai);
   if (st) return st;
   const size_t need = workspace_bytes(ai->ws, &g);
   if (need && !ws)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "algo %d needs a %zu-byte workspace but workSpace is NULL", algo, need);
   if (need > ws_size)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "algo %d needs a %zu-byte workspace but workSpaceSizeInBytes is %zu",
                  algo, need, ws_size);
   st = check_buffers(func, dir, a, &g, ws, need);
   return st ? st : compute(func, dir, a, &g, ws, need, al, be);
}

static cudnnStatus_t workspace_size(const char *func, int dir, const conv_args *a, int algo, size_t *size)
{
   conv_geom g;
   const algo_info *ai;
   cudnnStatus_t st = check_problem(func, dir, a, &g);
   if (!st && !size) st = fail(CUDNN_STATUS_BAD_PARAM, func, "sizeInBytes is NULL");
   if (!st) st = lookup_algo(func, dir, algo, &ai);
   if (!st) *size = workspace_bytes(ai->ws, &g);
   return st;
}

/* ---- algorithm searches */

typedef struct {
   int algo;
   cudnnStatus_t status;
   float time;
   size_t memory;
   cudnnDeterminism_t det;
   cudnnMathType_t math;
} perf_row;

enum { MAX_ROWS = MAX_ALGOS + 1 };

/* The search result: algorithms whose workspace fits ws_limit first (fastest first), then those
 * that do not (status NOT_SUPPORTED: not run), then one that does not support the problem; at most
 * max rows. */
static int list_algos(int dir, const conv_geom *g, size_t ws_limit, perf_row rows[MAX_ROWS], int max)
{
   int n = 0;
   for (int pass = 0; pass < 2; pass++)
      for (int i = 0; i < k_nalgos[dir]; i++) {
         const algo_info *ai = &k_algos[dir][i];
         const size_t need = workspace_bytes(ai->ws, g);
         const int fits = need <= ws_limit;
         if (fits != (pass == 0)) continue;
         rows[n] = (perf_row){ai->algo, fits ? CUDNN_STATUS_SUCCESS : CUDNN_STATUS_NOT_SUPPORTED,
                              fits ? 0.125f * (float)(n + 1) : -1.0f, need, ai->det, algo_math(g, ai)};
         n++;
      }
   rows[n++] = (perf_row){k_unsupported[dir], CUDNN_STATUS_NOT_SUPPORTED, -1.0f, 0, CUDNN_NON_DETERMINISTIC, g->math};
   return n < max ? n : max;
}

/* Find*Ex (measure: validates and writes the buffers, limited to the workspace given) and
 * Get*_v7 (heuristics: descriptors only, no limit). */
static cudnnStatus_t search(const char *func, int dir, const conv_args *a, int measure, void *ws, size_t ws_size,
                            int requested, int *returned, int have_results, perf_row rows[MAX_ROWS])
{
   conv_geom g;
   cudnnStatus_t st = check_problem(func, dir, a, &g);
   if (st) return st;
   if (requested < 1) return fail(CUDNN_STATUS_BAD_PARAM, func, "requestedAlgoCount %d is not positive", requested);
   if (!returned || !have_results)
      return fail(CUDNN_STATUS_BAD_PARAM, func, "returnedAlgoCount or perfResults is NULL");
   if (!ws) ws_size = 0; /* a NULL workspace counts as 0 bytes */
   if (measure) {
      st = check_buffers(func, dir, a, &g, ws, ws_size);
      if (st) return st;
   }
   const int n = list_algos(dir, &g, measure ? ws_size : SIZE_MAX, rows, requested);
   if (measure) { /* the trial runs: the output holds arbitrary values (NaN), workspaces were used */
      size_t used = 0;
      for (int i = 0; i < n; i++)
         if (rows[i].status == CUDNN_STATUS_SUCCESS && rows[i].memory > used) used = rows[i].memory;
      const int out = k_dirs[dir].out;
      nr_emu_device_enter(a->handle->stream);
      memset(a->p[out], 0xff, role_bytes(&g, out));
      if (used) memset(ws, 0xa5, used);
      nr_emu_device_leave();
   }
   *returned = n;
   return CUDNN_STATUS_SUCCESS;
}

/* The three perf-result types have the same members. */
#define EXPORT_PERF(dst, rows, n)                                                                  \
   for (int i_ = 0; i_ < (n); i_++) {                                                             \
      memset(&(dst)[i_], 0, sizeof(dst)[i_]);                                                     \
      (dst)[i_].algo = (rows)[i_].algo;                                                           \
      (dst)[i_].status = (rows)[i_].status;                                                       \
      (dst)[i_].time = (rows)[i_].time;                                                           \
      (dst)[i_].memory = (rows)[i_].memory;                                                       \
      (dst)[i_].determinism = (rows)[i_].det;                                                     \
      (dst)[i_].mathType = (rows)[i_].math;                                                       \
   }

/* ---- entry points: forward (x, w -> y) */

cudnnStatus_t CUDNNWINAPI cudnnConvolutionForward(cudnnHandle_t handle, const void *alpha,
                                                  const cudnnTensorDescriptor_t xDesc, const void *x,
                                                  const cudnnFilterDescriptor_t wDesc, const void *w,
                                                  const cudnnConvolutionDescriptor_t convDesc,
                                                  cudnnConvolutionFwdAlgo_t algo, void *workSpace,
                                                  size_t workSpaceSizeInBytes, const void *beta,
                                                  const cudnnTensorDescriptor_t yDesc, void *y)
{
   const conv_args a = {.handle = handle, .xd = xDesc, .yd = yDesc, .wd = wDesc, .cd = convDesc,
                        .p = {(void *)x, (void *)w, y}};
   return run_conv(__func__, DIR_FWD, &a, (int)algo, workSpace, workSpaceSizeInBytes, alpha, beta);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionForwardWorkspaceSize(cudnnHandle_t handle, const cudnnTensorDescriptor_t xDesc,
                                                                  const cudnnFilterDescriptor_t wDesc,
                                                                  const cudnnConvolutionDescriptor_t convDesc,
                                                                  const cudnnTensorDescriptor_t yDesc,
                                                                  cudnnConvolutionFwdAlgo_t algo, size_t *sizeInBytes)
{
   const conv_args a = {.handle = handle, .xd = xDesc, .yd = yDesc, .wd = wDesc, .cd = convDesc,
                        .p = {NULL, NULL, NULL}};
   return workspace_size(__func__, DIR_FWD, &a, (int)algo, sizeInBytes);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionForwardAlgorithm_v7(cudnnHandle_t handle, const cudnnTensorDescriptor_t srcDesc,
                                                                 const cudnnFilterDescriptor_t filterDesc,
                                                                 const cudnnConvolutionDescriptor_t convDesc,
                                                                 const cudnnTensorDescriptor_t destDesc,
                                                                 const int requestedAlgoCount, int *returnedAlgoCount,
                                                                 cudnnConvolutionFwdAlgoPerf_t *perfResults)
{
   const conv_args a = {.handle = handle, .xd = srcDesc, .yd = destDesc, .wd = filterDesc, .cd = convDesc,
                        .p = {NULL, NULL, NULL}};
   perf_row rows[MAX_ROWS];
   cudnnStatus_t st = search(__func__, DIR_FWD, &a, 0, NULL, 0, requestedAlgoCount, returnedAlgoCount,
                             perfResults != NULL, rows);
   if (!st) EXPORT_PERF(perfResults, rows, *returnedAlgoCount);
   return st;
}

cudnnStatus_t CUDNNWINAPI cudnnFindConvolutionForwardAlgorithmEx(
   cudnnHandle_t handle, const cudnnTensorDescriptor_t xDesc, const void *x, const cudnnFilterDescriptor_t wDesc,
   const void *w, const cudnnConvolutionDescriptor_t convDesc, const cudnnTensorDescriptor_t yDesc, void *y,
   const int requestedAlgoCount, int *returnedAlgoCount, cudnnConvolutionFwdAlgoPerf_t *perfResults, void *workSpace,
   size_t workSpaceSizeInBytes)
{
   const conv_args a = {.handle = handle, .xd = xDesc, .yd = yDesc, .wd = wDesc, .cd = convDesc,
                        .p = {(void *)x, (void *)w, y}};
   perf_row rows[MAX_ROWS];
   cudnnStatus_t st = search(__func__, DIR_FWD, &a, 1, workSpace, workSpaceSizeInBytes, requestedAlgoCount,
                             returnedAlgoCount, perfResults != NULL, rows);
   if (!st) EXPORT_PERF(perfResults, rows, *returnedAlgoCount);
   return st;
}

/* ---- backward data (w, dy -> dx) */

cudnnStatus_t CUDNNWINAPI cudnnConvolutionBackwardData(cudnnHandle_t handle, const void *alpha,
                                                       const cudnnFilterDescriptor_t wDesc, const void *w,
                                                       const cudnnTensorDescriptor_t dyDesc, const void *dy,
                                                       const cudnnConvolutionDescriptor_t convDesc,
                                                       cudnnConvolutionBwdDataAlgo_t algo, void *workSpace,
                                                       size_t workSpaceSizeInBytes, const void *beta,
                                                       const cudnnTensorDescriptor_t dxDesc, void *dx)
{
   const conv_args a = {.handle = handle, .xd = dxDesc, .yd = dyDesc, .wd = wDesc, .cd = convDesc,
                        .p = {dx, (void *)w, (void *)dy}};
   return run_conv(__func__, DIR_BWD_DATA, &a, (int)algo, workSpace, workSpaceSizeInBytes, alpha, beta);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardDataWorkspaceSize(cudnnHandle_t handle,
                                                                       const cudnnFilterDescriptor_t wDesc,
                                                                       const cudnnTensorDescriptor_t dyDesc,
                                                                       const cudnnConvolutionDescriptor_t convDesc,
                                                                       const cudnnTensorDescriptor_t dxDesc,
                                                                       cudnnConvolutionBwdDataAlgo_t algo,
                                                                       size_t *sizeInBytes)
{
   const conv_args a = {.handle = handle, .xd = dxDesc, .yd = dyDesc, .wd = wDesc, .cd = convDesc,
                        .p = {NULL, NULL, NULL}};
   return workspace_size(__func__, DIR_BWD_DATA, &a, (int)algo, sizeInBytes);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardDataAlgorithm_v7(cudnnHandle_t handle,
                                                                      const cudnnFilterDescriptor_t filterDesc,
                                                                      const cudnnTensorDescriptor_t diffDesc,
                                                                      const cudnnConvolutionDescriptor_t convDesc,
                                                                      const cudnnTensorDescriptor_t gradDesc,
                                                                      const int requestedAlgoCount,
                                                                      int *returnedAlgoCount,
                                                                      cudnnConvolutionBwdDataAlgoPerf_t *perfResults)
{
   const conv_args a = {.handle = handle, .xd = gradDesc, .yd = diffDesc, .wd = filterDesc, .cd = convDesc,
                        .p = {NULL, NULL, NULL}};
   perf_row rows[MAX_ROWS];
   cudnnStatus_t st = search(__func__, DIR_BWD_DATA, &a, 0, NULL, 0, requestedAlgoCount, returnedAlgoCount,
                             perfResults != NULL, rows);
   if (!st) EXPORT_PERF(perfResults, rows, *returnedAlgoCount);
   return st;
}

cudnnStatus_t CUDNNWINAPI cudnnFindConvolutionBackwardDataAlgorithmEx(
   cudnnHandle_t handle, const cudnnFilterDescriptor_t wDesc, const void *w, const cudnnTensorDescriptor_t dyDesc,
   const void *dy, const cudnnConvolutionDescriptor_t convDesc, const cudnnTensorDescriptor_t dxDesc, void *dx,
   const int requestedAlgoCount, int *returnedAlgoCount, cudnnConvolutionBwdDataAlgoPerf_t *perfResults,
   void *workSpace, size_t workSpaceSizeInBytes)
{
   const conv_args a = {.handle = handle, .xd = dxDesc, .yd = dyDesc, .wd = wDesc, .cd = convDesc,
                        .p = {dx, (void *)w, (void *)dy}};
   perf_row rows[MAX_ROWS];
   cudnnStatus_t st = search(__func__, DIR_BWD_DATA, &a, 1, workSpace, workSpaceSizeInBytes, requestedAlgoCount,
                             returnedAlgoCount, perfResults != NULL, rows);
   if (!st) EXPORT_PERF(perfResults, rows, *returnedAlgoCount);
   return st;
}

/* ---- backward filter (x, dy -> dw) */

cudnnStatus_t CUDNNWINAPI cudnnConvolutionBackwardFilter(cudnnHandle_t handle, const void *alpha,
                                                         const cudnnTensorDescriptor_t xDesc, const void *x,
                                                         const cudnnTensorDescriptor_t dyDesc, const void *dy,
                                                         const cudnnConvolutionDescriptor_t convDesc,
                                                         cudnnConvolutionBwdFilterAlgo_t algo, void *workSpace,
                                                         size_t workSpaceSizeInBytes, const void *beta,
                                                         const cudnnFilterDescriptor_t dwDesc, void *dw)
{
   const conv_args a = {.handle = handle, .xd = xDesc, .yd = dyDesc, .wd = dwDesc, .cd = convDesc,
                        .p = {(void *)x, dw, (void *)dy}};
   return run_conv(__func__, DIR_BWD_FILTER, &a, (int)algo, workSpace, workSpaceSizeInBytes, alpha, beta);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardFilterWorkspaceSize(cudnnHandle_t handle,
                                                                         const cudnnTensorDescriptor_t xDesc,
                                                                         const cudnnTensorDescriptor_t dyDesc,
                                                                         const cudnnConvolutionDescriptor_t convDesc,
                                                                         const cudnnFilterDescriptor_t gradDesc,
                                                                         cudnnConvolutionBwdFilterAlgo_t algo,
                                                                         size_t *sizeInBytes)
{
   const conv_args a = {.handle = handle, .xd = xDesc, .yd = dyDesc, .wd = gradDesc, .cd = convDesc,
                        .p = {NULL, NULL, NULL}};
   return workspace_size(__func__, DIR_BWD_FILTER, &a, (int)algo, sizeInBytes);
}

cudnnStatus_t CUDNNWINAPI cudnnGetConvolutionBackwardFilterAlgorithm_v7(cudnnHandle_t handle,
                                                                        const cudnnTensorDescriptor_t srcDesc,
                                                                        const cudnnTensorDescriptor_t diffDesc,
                                                                        const cudnnConvolutionDescriptor_t convDesc,
                                                                        const cudnnFilterDescriptor_t gradDesc,
                                                                        const int requestedAlgoCount,
                                                                        int *returnedAlgoCount,
                                                                        cudnnConvolutionBwdFilterAlgoPerf_t *perfResults)
{
   const conv_args a = {.handle = handle, .xd = srcDesc, .yd = diffDesc, .wd = gradDesc, .cd = convDesc,
                        .p = {NULL, NULL, NULL}};
   perf_row rows[MAX_ROWS];
   cudnnStatus_t st = search(__func__, DIR_BWD_FILTER, &a, 0, NULL, 0, requestedAlgoCount, returnedAlgoCount,
                             perfResults != NULL, rows);
   if (!st) EXPORT_PERF(perfResults, rows, *returnedAlgoCount);
   return st;
}

cudnnStatus_t CUDNNWINAPI cudnnFindConvolutionBackwardFilterAlgorithmEx(
   cudnnHandle_t handle, const cudnnTensorDescriptor_t xDesc, const void *x, const cudnnTensorDescriptor_t dyDesc,
   const void *y, const cudnnConvolutionDescriptor_t convDesc, const cudnnFilterDescriptor_t dwDesc, void *dw,
   const int requestedAlgoCount, int *returnedAlgoCount, cudnnConvolutionBwdFilterAlgoPerf_t *perfResults,
   void *workSpace, size_t workSpaceSizeInBytes)
{
   const conv_args a = {.handle = handle, .xd = xDesc, .yd = dyDesc, .wd = dwDesc, .cd = convDesc,
                        .p = {(void *)x, dw, (void *)y}};
   perf_row rows[MAX_ROWS];
   cudnnStatus_t st = search(__func__, DIR_BWD_FILTER, &a, 1, workSpace, workSpaceSizeInBytes, requestedAlgoCount,
                             returnedAlgoCount, perfResults != NULL, rows);
   if (!st) EXPORT_PERF(perfResults, rows, *returnedAlgoCount);
   return st;
}

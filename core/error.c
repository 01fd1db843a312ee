/* error.c — thread-local error messages and argument checks.
 * Invariant: a failing nr_* call leaves exactly one message here, "func: what (file:line)". */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static _Thread_local char g_error[2048];
static _Thread_local nr_status g_status; /* the code of that failure */

const char *nr_last_error(void) { return g_error[0] ? g_error : "no error"; }
nr_status nr_last_status(void) { return g_error[0] ? g_status : NR_OK; }
void nr_clear_error(void) { g_error[0] = 0; }
const char *nr_version(void) { return "0.1.0"; }
int32_t nr_has_cuda(void)
{
#ifdef NR_WITH_CUDA
   return 1;
#else
   return 0;
#endif
}

nr_status nr_fail_at(nr_status code, const char *func, const char *file, int line,
                     const char *fmt, ...)
{
   char msg[1536];
   va_list ap;
   va_start(ap, fmt);
   vsnprintf(msg, sizeof msg, fmt, ap);
   va_end(ap);
   const char *base = strrchr(file, '/');
   snprintf(g_error, sizeof g_error, "%s: %s (%s:%d)", func, msg, base ? base + 1 : file, line);
   g_status = code;
   return code;
}

nr_status nr_fail_wrap(nr_status code, const char *func)
{
   char inner[sizeof g_error];
   memcpy(inner, g_error, sizeof inner);
   snprintf(g_error, sizeof g_error, "%s: %s", func, inner);
   g_status = code;
   return code;
}

const char *nr_dtype_name(int32_t dtype)
{
   switch (dtype) {
   case NR_F32: return "f32";
   case NR_I64: return "int64";
   case NR_U8: return "uint8";
   case NR_BF16: return "bf16";
   default: return "?dtype";
   }
}

const char *nr_tensor_describe(const nr_tensor *t, char *buf, size_t n)
{
   if (!t) {
      snprintf(buf, n, "nil");
      return buf;
   }
   int k = snprintf(buf, n, "%s %s (", nr_dtype_name(t->dtype), t->device == NR_CUDA ? "cuda" : "cpu");
   for (int d = 0; d < t->ndim && k < (int)n; d++)
      k += snprintf(buf + k, n - k, d ? ", %lld" : "%lld", (long long)t->shape[d]);
   if (k < (int)n) snprintf(buf + k, n - k, nr_is_nhwc(t) ? ") channels-last" : ")");
   return buf;
}

nr_status nr_check_tensor(const char *func, const char *name, const nr_tensor *t, int32_t dtype,
                          int32_t device, int32_t ndim, const int64_t *shape)
{
   char got[256], want[256];
   if (!t) return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: tensor is NULL", name);
   bool dtype_ok = dtype == NR_DTYPE_ACT ? (t->dtype == NR_F32 || (t->dtype == NR_BF16 && t->device == NR_CUDA))
                                         : (dtype < 0 || t->dtype == dtype);
   bool ok = dtype_ok && (device < 0 || t->device == device) && (ndim < 0 || t->ndim == ndim);
   if (ok && shape && ndim >= 0)
      for (int d = 0; d < ndim; d++)
         if (shape[d] >= 0 && shape[d] != t->shape[d]) ok = false;
   if (ok) return NR_OK;
   if (t->dtype == NR_BF16 && t->device == NR_CPU && dtype == NR_DTYPE_ACT)
      return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                        "%s: bf16 tensors compute on CUDA only; this one is on the CPU (%s): convert it with "
                        ":float() or move it with :cuda()",
                        name, nr_tensor_describe(t, got, sizeof got));
   int k = snprintf(want, sizeof want, "%s %s",
                    dtype == NR_DTYPE_ACT ? "f32 (or bf16 on cuda)" : dtype < 0 ? "any" : nr_dtype_name(dtype),
                    device < 0 ? "any-device" : device == NR_CUDA ? "cuda" : "cpu");
   if (ndim >= 0) {
      k += snprintf(want + k, sizeof want - k, " (");
      for (int d = 0; d < ndim; d++) {
         if (shape && shape[d] >= 0)
            k += snprintf(want + k, sizeof want - k, d ? ", %lld" : "%lld", (long long)shape[d]);
         else
            k += snprintf(want + k, sizeof want - k, d ? ", *" : "*");
      }
      snprintf(want + k, sizeof want - k, ")");
   }
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s: expected %s, got %s", name, want,
                     nr_tensor_describe(t, got, sizeof got));
}

nr_status nr_check_same_device(const char *func, const nr_tensor *a, const nr_tensor *b)
{
   if (a->device == b->device && a->device_index == b->device_index) return NR_OK;
   char da[128], db[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "tensors on different devices: %s and %s",
                     nr_tensor_describe(a, da, sizeof da), nr_tensor_describe(b, db, sizeof db));
}

nr_status nr_check_same_dtype(const char *func, const char *an, const nr_tensor *a, const char *bn,
                              const nr_tensor *b)
{
   if (a->dtype == b->dtype) return NR_OK;
   char da[128], db[128];
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__, "%s (%s) and %s (%s) must have one dtype", an,
                     nr_tensor_describe(a, da, sizeof da), bn, nr_tensor_describe(b, db, sizeof db));
}

nr_status nr_check_contiguous(const char *func, const char *name, const nr_tensor *t)
{
   if (nr_tensor_is_contiguous(t)) return NR_OK;
   return nr_fail_at(NR_E_ARG, func, __FILE__, __LINE__,
                     "%s: expected a contiguous tensor (call :contiguous() first)", name);
}

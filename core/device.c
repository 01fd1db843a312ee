/* device.c — the CUDA runtime API of core/nr.h (section cuda) in a build without CUDA.
 *
 * What it is: answers for a library built without the CUDA backend: no devices, nothing cached,
 * and a clear NR_E_DEVICE error from every call that needs a GPU, so Lua code (nr.cuda.*) and
 * tests work unchanged on CPU-only machines.
 * What it is not: the CUDA implementation, which lives in core/cuda/runtime.c and replaces all
 * of this when NR_WITH_CUDA is defined.
 * Invariants: nothing here allocates or touches global state.
 */
#include "internal.h"

#ifndef NR_WITH_CUDA

static const char k_no_cuda[] = "this nrlua was built without CUDA";

int32_t nr_cuda_device_count(void) { return 0; }
int32_t nr_cuda_available(void) { return 0; }
const char *nr_cuda_unavailable_reason(void) { return k_no_cuda; }
int32_t nr_cuda_current_device(void) { return 0; }
const char *nr_cuda_device_name(int32_t device_index)
{
   (void)device_index;
   return NULL;
}
int64_t nr_cuda_memory_cached(int32_t device_index)
{
   (void)device_index;
   return 0;
}
void nr_cuda_set_allow_tf32(int32_t allow) { (void)allow; }
int32_t nr_cuda_get_allow_tf32(void) { return 0; }
void nr_cuda_set_deterministic(int32_t on) { (void)on; }
int32_t nr_cuda_get_deterministic(void) { return 0; }
void nr_cuda_set_conv_max_elements(int64_t n) { (void)n; }
int64_t nr_cuda_get_conv_max_elements(void) { return INT32_MAX; }
int64_t nr_cuda_conv_plan_count(void) { return 0; }
/* Nothing is queued and nothing is cached without CUDA: both succeed trivially. */
nr_status nr_cuda_synchronize(void) { return NR_OK; }
nr_status nr_cuda_empty_cache(void) { return NR_OK; }

nr_status nr_cuda_prefetch(nr_tensor *dst, const nr_tensor *src, int64_t *ticket)
{
   (void)dst;
   (void)src;
   if (ticket) *ticket = 0;
   return NR_FAIL(NR_E_DEVICE, "%s", k_no_cuda);
}
nr_status nr_cuda_prefetch_wait(int32_t device_index, int64_t ticket)
{
   (void)ticket;
   return NR_FAIL(NR_E_DEVICE, "cuda:%d: %s", device_index, k_no_cuda);
}

nr_status nr_cuda_versions(int32_t *v)
{
   for (int i = 0; v && i < 6; i++) v[i] = 0;
   return NR_FAIL(NR_E_DEVICE, "%s", k_no_cuda);
}

nr_status nr_cuda_set_device(int32_t device_index)
{
   return NR_FAIL(NR_E_DEVICE, "cannot select cuda:%d: %s", device_index, k_no_cuda);
}

nr_status nr_cuda_mem_info(int32_t device_index, int64_t *free_bytes, int64_t *total_bytes)
{
   if (free_bytes) *free_bytes = 0;
   if (total_bytes) *total_bytes = 0;
   return NR_FAIL(NR_E_DEVICE, "cuda:%d: %s", device_index, k_no_cuda);
}

#else
/* The CUDA build defines these in core/cuda/runtime.c; keep this translation unit non-empty. */
typedef int nr_device_c_unused_t;
#endif

-- nr.cuda — the GPU runtime as seen from Lua: availability, devices, synchronisation, memory.
--
-- What it is: thin wrappers over core/nr.h's "cuda" section. Every function works on a machine
-- without a GPU and in a library built without CUDA (available() is false, device_count() is 0,
-- memory() reports zeros, synchronize() and empty_cache() do nothing).
-- What it is not: tensor placement (t:cuda(), t:to('cuda') in nr.tensor) or kernels (core/cuda/).
-- Invariants: device indices are 0-based here as in CUDA ("cuda:0"); C errors become Lua errors
-- through nr.check, naming the function.
local nrffi = require 'nr.ffi'
local check = require 'nr.check'
local ffi, C = nrffi.ffi, nrffi.C

local M = {}

-- true when tensors can live on a GPU (built with CUDA and at least one device visible).
function M.available() return C.nr_cuda_available() == 1 end

-- Why available() is false ("this nrlua was built without CUDA", "cudaGetDeviceCount: ..."),
-- or nil when it is true.
function M.unavailable_reason()
   if M.available() then return nil end
   return ffi.string(C.nr_cuda_unavailable_reason())
end

-- 1 when the library was compiled with the CUDA backend (even if no GPU is present now).
function M.built() return C.nr_has_cuda() == 1 end

function M.device_count() return tonumber(C.nr_cuda_device_count()) end

-- Selects the GPU for new tensors created with device = 'cuda' (0-based index).
function M.set_device(i)
   check.int(i, 'nr.cuda.set_device', 'i', 0)
   check.status(C.nr_cuda_set_device(i), 'nr.cuda.set_device')
end

function M.current_device() return tonumber(C.nr_cuda_current_device()) end

-- Library versions as CUDA encodes them: {runtime = 13000, driver = (0 without one), cudnn =
-- loaded, cudnn_built = compiled against, cublas = loaded (major * 10000 + minor * 100 + patch),
-- cublas_built}; nil in a build without CUDA. Needs no GPU.
function M.versions()
   local v = ffi.new('int32_t[6]')
   if C.nr_cuda_versions(v) ~= 0 then return nil end
   return {runtime = v[0], driver = v[1], cudnn = v[2], cudnn_built = v[3], cublas = v[4], cublas_built = v[5]}
end

-- Device name ("NVIDIA H100 80GB HBM3"), or nil.
function M.device_name(i)
   local p = C.nr_cuda_device_name(i or M.current_device())
   if p == nil then return nil end
   return ffi.string(p)
end

-- Waits for all queued GPU work; raises asynchronous GPU errors here.
function M.synchronize() check.status(C.nr_cuda_synchronize(), 'nr.cuda.synchronize') end

-- Returns cached device blocks to the driver.
function M.empty_cache() check.status(C.nr_cuda_empty_cache(), 'nr.cuda.empty_cache') end

-- TF32 tensor cores for convolutions and matmuls (faster, ~1e-3 relative error); off by default.
function M.set_allow_tf32(on) C.nr_cuda_set_allow_tf32(on and 1 or 0) end
function M.allow_tf32() return C.nr_cuda_get_allow_tf32() == 1 end

-- Deterministic cuDNN convolution algorithms only (as torch.backends.cudnn.deterministic): a GPU
-- run with the same seed and data order gives the same bits; off by default (any algorithm).
function M.set_deterministic(on) C.nr_cuda_set_deterministic(on and 1 or 0) end
function M.deterministic() return C.nr_cuda_get_deterministic() == 1 end
-- The largest activation (elements) one cuDNN convolution call takes; larger batches run as
-- several calls on slices of their samples. Default (and nil) 2^31 - 1, cuDNN's 32-bit limit.
function M.set_conv_max_elements(n)
   -- checked before the FFI: a table was a raw "cannot convert 'table' to 'int64_t'", NaN undefined
   if n ~= nil then check.int(n, 'nr.cuda.set_conv_max_elements', 'n', 0) end
   C.nr_cuda_set_conv_max_elements(n or 0)
end
function M.conv_max_elements() return tonumber(C.nr_cuda_get_conv_max_elements()) end
-- Convolution plans made so far (distinct shapes; each ran cuDNN's algorithm search once).
function M.conv_plans() return tonumber(C.nr_cuda_conv_plan_count()) end

-- One GPU's memory, as torch.cuda.memory_allocated / max_memory_allocated / memory_reserved
-- report it: {in_use, peak, allocations, cached, free, total} in bytes for cuda:device (default
-- the current GPU): tensor storage in use, its peak since start or reset_peak_memory, allocations
-- made, blocks the caching allocator holds, and the driver's free and total (nil without a GPU).
-- nr.memory().cuda has the first three summed over all GPUs.
local function gpu_index(device, fname)
   if device == nil then return M.current_device() end
   check.int(device, fname, 'device', 0, nil, 3) -- errors name the caller's line
   local n = M.device_count()
   -- without a GPU, cuda:0 answers zeros (as every nr.cuda function works there)
   if device >= math.max(n, 1) then error(string.format('%s: no device cuda:%d (%d visible)', fname, device, n), 3) end
   return device
end

function M.memory(device)
   local dev = gpu_index(device, 'nr.cuda.memory')
   local v = ffi.new('int64_t[3]')
   check.status(C.nr_memory_of_gpu(dev, v, v + 1, v + 2), 'nr.cuda.memory')
   local out = {
      in_use = tonumber(v[0]), peak = tonumber(v[1]), allocations = tonumber(v[2]),
      cached = tonumber(C.nr_cuda_memory_cached(dev)),
   }
   if M.available() then
      local fr, tot = ffi.new('int64_t[1]'), ffi.new('int64_t[1]')
      if C.nr_cuda_mem_info(dev, fr, tot) == 0 then
         out.free, out.total = tonumber(fr[0]), tonumber(tot[0])
      end
   end
   return out
end

-- Starts cuda:device's peak (default the current GPU) again from what is in use now.
function M.reset_peak_memory(device)
   C.nr_memory_reset_peak_of_gpu(gpu_index(device, 'nr.cuda.reset_peak_memory'))
end

return M

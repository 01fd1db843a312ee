-- tests/dist/gpu.lua — nr.dist on GPUs (NCCL), one GPU per rank: collectives on CUDA tensors
-- (allreduce sum / mean / max / min of f32 and int64, sizes 1 .. 100003, strided views, the same
-- bits on every rank; broadcast; the host-staged algorithms), and k SGD steps of a conv net on
-- N ranks' GPUs against one process that trains on the combined batch (GradReducer over NCCL,
-- with and without overlap).
-- Needs as many GPUs as ranks. tests/gpu/emu/run.sh runs it on the CUDA emulator, whose NCCL
-- carries the collectives over MPI (each rank emulates its own GPUs: rank r takes cuda:r).
-- Run: mpirun -np 2 nrlua tests/dist/gpu.lua
local nr = require 'nr'
local dist = require 'nr.dist'
local H = require 'tests.dist.common'

if not nr.cuda.available() then H.fail('no GPU: %s', nr.cuda.unavailable_reason()) end
local rank, size = dist.init{timeout = 120, device = 'cuda'}
if not dist.active() then H.fail('expected an MPI launch with more than one rank (size %d)', size) end
if not dist.has_nccl() then H.fail('libnr_dist was built without NCCL') end
local gpu = rank % nr.cuda.device_count()
if nr.cuda.current_device() ~= gpu then H.fail('rank %d is on cuda:%d, expected cuda:%d', rank, nr.cuda.current_device(), gpu) end
local DEV = 'cuda:' .. gpu


for _, algo in ipairs({'nccl', 'ordered'}) do H.check_allreduce(algo, DEV) end -- ordered: staged through the host
H.pass('allreduce of CUDA tensors')

-- a strided view is reduced through a contiguous copy and written back into the view
local m = nr.tensor({{1, 2, 3}, {4, 5, 6}}):mul(rank + 1):to(DEV)
dist.allreduce(m:t(), {op = 'sum'})
local want, got = size * (size + 1) / 2, m:cpu():totable()
for i = 1, 2 do for j = 1, 3 do
   if got[i][j] ~= ((i - 1) * 3 + j) * want then H.fail('strided allreduce: [%d][%d] = %g', i, j, got[i][j]) end
end end
H.pass('allreduce of a strided CUDA view')

-- NCCL gives every rank the same bits, also where the sum depends on the order
nr.manual_seed(100 + rank)
local r = nr.randn({4097}):mul(1e3):to(DEV)
dist.allreduce(r, {op = 'mean'})
local rc = r:cpu()
local rows = dist.allgather_numbers({tonumber(rc:sum()), rc:get(1), rc:get(4097)})
for k = 2, #rows do for j = 1, 3 do
   if rows[k][j] ~= rows[1][j] then H.fail('rank %d got different bits (%.17g vs %.17g)', k - 1, rows[k][j], rows[1][j]) end
end end
H.pass('NCCL allreduce is bit-identical across ranks')

local b = nr.full({5, 3}, rank + 10):to(DEV)
dist.broadcast(b, size - 1)
for _, x in ipairs(b:cpu():reshape(15):totable()) do
   if x ~= size - 1 + 10 then H.fail('broadcast from rank %d: got %g', size - 1, x) end
end
local bi = nr.tensor({rank, rank * 2, -rank}, {dtype = 'int64'}):to(DEV)
dist.broadcast(bi, 0)
if bi:cpu():get(2) ~= 0 then H.fail('int64 broadcast: %s', tostring(bi:cpu())) end
H.pass('broadcast of CUDA tensors')

-- a tensor on another GPU than the rank's communicator is refused with its name
if nr.cuda.device_count() > 1 then
   local other = nr.zeros({4}):to('cuda:' .. (gpu + 1) % nr.cuda.device_count())
   local okw, errw = pcall(dist.allreduce, other, {op = 'sum'})
   if okw or not tostring(errw):find('GPU', 1, true) then H.fail('allreduce of another GPU\'s tensor: %s', tostring(errw)) end
   H.pass('a tensor on another GPU is refused')
end

-- k SGD steps on N ranks' GPUs == one process on the combined batch (the reference trains on
-- this rank's GPU too); GradReducer reduces the CUDA gradients with NCCL
local conv = function(classes) return H.convnet(2, classes) end
H.equivalence('conv on GPUs, NCCL', conv, {3, 8, 8}, {device = DEV, tol = 1e-4, bucket_mb = 0.001})
H.equivalence('conv on GPUs, NCCL, overlap', conv, {3, 8, 8}, {device = DEV, tol = 1e-4, bucket_mb = 0.001, overlap = true})

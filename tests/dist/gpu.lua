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

-- value of element i (0-based) on rank r: exact in float32
local function val(r, i) return (r + 1) * 0.5 + (i % 7) - 3 end

local function expected(op, i)
   local acc
   for r = 0, size - 1 do
      local v = val(r, i)
      if acc == nil then acc = v
      elseif op == 'max' then acc = math.max(acc, v)
      elseif op == 'min' then acc = math.min(acc, v)
      else acc = acc + v end
   end
   if op == 'mean' then acc = acc / size end
   return acc
end

local function filled(n, dtype)
   local t = nr.empty({n}, {dtype = dtype})
   local p = t:data()
   for i = 0, n - 1 do p[i] = dtype == 'int64' and (rank + 1) * 3 + (i % 5) or val(rank, i) end
   return t:to(DEV)
end

for _, algo in ipairs({'nccl', 'ordered'}) do -- ordered: staged through the host
   for _, n in ipairs({1, 3, 1000, 100003}) do
      for _, op in ipairs({'sum', 'mean', 'max', 'min'}) do
         local t = filled(n, 'float32')
         dist.allreduce(t, {op = op, algo = algo})
         if not t:is_cuda() then H.fail('allreduce moved the tensor to %s', t:device()) end
         local p = t:cpu():data()
         for i = 0, n - 1 do
            local e = expected(op, i)
            if math.abs(p[i] - e) > 1e-6 * math.max(1, math.abs(e)) then
               H.fail('allreduce %s %s n=%d: element %d is %.9g, expected %.9g', algo, op, n, i + 1, p[i], e)
            end
         end
      end
   end
   local t = filled(17, 'int64')
   dist.allreduce(t, {op = 'sum', algo = algo})
   local p = t:cpu():data()
   for i = 0, 16 do
      local e = 0
      for r = 0, size - 1 do e = e + (r + 1) * 3 + (i % 5) end
      if p[i] ~= e then H.fail('int64 allreduce %s: element %d is %s, expected %d', algo, i + 1, tostring(p[i]), e) end
   end
end
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
local STEPS, BATCH, CLASSES = 4, 16, 5
local per = BATCH / size
local function equivalence(name, opts)
   nr.manual_seed(7)
   local X, Y = nr.randn({STEPS * BATCH, 3, 8, 8}), nr.randint(0, CLASSES, {STEPS * BATCH})
   local crit = nr.nn.CrossEntropyLoss()
   local cfg = {lr = 0.1, momentum = 0.9, weight_decay = 5e-4, nesterov = true}
   local model = H.convnet(2, CLASSES):to(DEV)
   local opt = nr.optim.SGD(model, cfg)
   local reducer = dist.GradReducer(model, {bucket_mb = 0.001, overlap = opts.overlap})
   local ref, ref_opt
   if rank == 0 then
      ref = H.convnet(2, CLASSES):to(DEV)
      ref_opt = nr.optim.SGD(ref, cfg)
   end
   for step = 1, STEPS do
      local first = (step - 1) * BATCH
      local x = X:narrow(1, first + rank * per + 1, per):contiguous():to(DEV)
      local y = Y:narrow(1, first + rank * per + 1, per):contiguous():to(DEV)
      local out = model:forward(x)
      crit:forward(out, y)
      model:zeroGradParameters()
      model:backward(x, crit:backward(out, y))
      reducer:reduce()
      opt:step()
      if ref then
         local xa = X:narrow(1, first + 1, BATCH):contiguous():to(DEV)
         local ya = Y:narrow(1, first + 1, BATCH):contiguous():to(DEV)
         local o = ref:forward(xa)
         crit:forward(o, ya)
         ref:zeroGradParameters()
         ref:backward(xa, crit:backward(o, ya))
         ref_opt:step()
      end
   end
   local fp = dist.assert_same(model, name .. ': replicas after ' .. STEPS .. ' steps', {optimizer = opt})
   if rank == 0 then
      local worst = 0
      local mine, theirs = model:namedParameters(), ref:namedParameters()
      for i, e in ipairs(mine) do
         if not e.param:is_cuda() then H.fail('%s: %s left the GPU', name, e.name) end
         worst = math.max(worst, H.compare(e.param:cpu(), theirs[i].param:cpu(), 1e-4, name .. ' ' .. e.name))
      end
      print(string.format('%s: %d ranks x %d samples vs 1 x %d on %s, %d steps, %d buckets (%d started during backward): ' ..
         'max relative difference %.3g (tolerance 1e-4), replicas identical (%s)', name, size, per, BATCH, DEV, STEPS,
         #reducer.buckets, reducer.started_in_backward, worst, fp))
      if opts.overlap and reducer.started_in_backward == 0 then H.fail('%s: no bucket started during backward', name) end
   end
   reducer:unhook()
   H.pass(name)
end
equivalence('conv on GPUs, NCCL', {})
equivalence('conv on GPUs, NCCL, overlap', {overlap = true})

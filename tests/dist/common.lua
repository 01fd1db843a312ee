-- tests/dist/common.lua — helpers for the scripts that tests/lua/dist_spec.lua runs under
-- `mpirun -np 2` (each script is also runnable by hand: mpirun -np 2 nrlua tests/dist/NAME.lua).
-- A failed check raises an error naming the rank; the process then exits non-zero and libnr_dist
-- aborts the whole job, so the spec sees a non-zero status. Success prints "PASS <what> rank r".
local nr = require 'nr'
local dist = require 'nr.dist'

local M = {}

function M.fail(fmt, ...)
   error(string.format('FAIL rank %d: ' .. fmt, dist.rank(), ...), 2)
end

function M.pass(what)
   print(string.format('PASS %s rank %d/%d', what, dist.rank(), dist.size()))
   io.stdout:flush()
end

-- Relative difference of two tensors (same shape): max|a - b| / max|b|, i.e. relative to the
-- tensor's scale (entries near zero are not judged by their own tiny size). Fails above tol,
-- naming the element with the largest difference.
function M.compare(a, b, tol, what)
   local x, y = a:contiguous(), b:contiguous()
   local n = x:numel()
   if n ~= y:numel() then M.fail('%s: %d vs %d elements', what, n, y:numel()) end
   local pa, pb = x:data(), y:data()
   local scale, diff, at = 0, 0, 0
   for i = 0, n - 1 do
      scale = math.max(scale, math.abs(pb[i]))
      local d = math.abs(pa[i] - pb[i])
      if d ~= d then d = math.huge end -- NaN on either side: the worst difference (">" skipped it)
      if d > diff then diff, at = d, i end
   end
   local rel = diff / math.max(scale, 1e-30)
   if rel > tol then
      M.fail('%s: max|a-b| / max|b| = %.3g > %.1g (element %d: %.9g vs %.9g)', what, rel, tol, at + 1, pa[at], pb[at])
   end
   return rel
end

-- A small MLP without BatchNorm (so a split batch and the combined batch see the same math).
function M.mlp(seed, din, hidden, classes)
   nr.manual_seed(seed)
   return nr.nn.Sequential{
      nr.nn.Linear(din, hidden), nr.nn.ReLU(),
      nr.nn.Linear(hidden, hidden), nr.nn.ReLU(),
      nr.nn.Linear(hidden, classes),
   }
end

-- A small conv net without BatchNorm (input (N, 3, 8, 8)).
function M.convnet(seed, classes)
   nr.manual_seed(seed)
   return nr.nn.Sequential{
      nr.nn.Conv2d(3, 8, 3, {padding = 1}), nr.nn.ReLU(),
      nr.nn.Conv2d(8, 8, 3, {padding = 1, stride = 2}), nr.nn.ReLU(),
      nr.nn.GlobalAvgPool2d(),
      nr.nn.Linear(8, classes),
   }
end

-- The same with BatchNorm after each conv (for synchronized BatchNorm).
function M.convnet_bn(seed, classes)
   nr.manual_seed(seed)
   return nr.nn.Sequential{
      nr.nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
      nr.nn.Conv2d(8, 8, 3, {padding = 1, stride = 2, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
      nr.nn.GlobalAvgPool2d(),
      nr.nn.Linear(8, classes),
   }
end

-- ---- allreduce data: element i (0-based) of rank r's tensor, exact in float32 ----------------
function M.val(r, i) return (r + 1) * 0.5 + (i % 7) - 3 end

-- What op ('sum', 'mean', 'max', 'min') over `size` ranks gives for element i.
function M.expected(op, i, size)
   local acc
   for r = 0, size - 1 do
      local v = M.val(r, i)
      if acc == nil then acc = v
      elseif op == 'max' then acc = math.max(acc, v)
      elseif op == 'min' then acc = math.min(acc, v)
      else acc = acc + v end
   end
   if op == 'mean' then acc = acc / size end
   return acc
end

-- Rank r's tensor of n elements (float32: M.val; int64: (r + 1) * 3 + i % 5), on device.
function M.filled(n, dtype, r, device)
   local t = nr.empty({n}, {dtype = dtype})
   local p = t:data()
   for i = 0, n - 1 do p[i] = dtype == 'int64' and (r + 1) * 3 + (i % 5) or M.val(r, i) end
   return device and t:to(device) or t
end

-- dist.allreduce with algo on rank tensors made by M.filled (on device, default the CPU): f32 sum,
-- mean, max and min for sizes 1, 3, 1000, 100003 (smaller than the ranks, not divisible by them),
-- int64 sums (exact); the result stays on the tensor's device.
function M.check_allreduce(algo, device)
   local rank, size = dist.rank(), dist.size()
   local function result(t, what)
      if t:device() ~= (device or 'cpu') then M.fail('%s: the result moved to %s', what, t:device()) end
      return t:cpu():data()
   end
   for _, n in ipairs({1, 3, 1000, 100003}) do
      for _, op in ipairs({'sum', 'mean', 'max', 'min'}) do
         local what = string.format('allreduce %s %s n=%d', algo, op, n)
         local t = M.filled(n, 'float32', rank, device)
         dist.allreduce(t, {op = op, algo = algo})
         local p = result(t, what)
         for i = 0, n - 1 do
            local e = M.expected(op, i, size)
            if math.abs(p[i] - e) > 1e-6 * math.max(1, math.abs(e)) then
               M.fail('%s: element %d is %.9g, expected %.9g', what, i + 1, p[i], e)
            end
         end
      end
   end
   local t = M.filled(17, 'int64', rank, device)
   dist.allreduce(t, {op = 'sum', algo = algo})
   local p = result(t, 'int64 allreduce ' .. algo)
   for i = 0, 16 do
      local e = 0
      for r = 0, size - 1 do e = e + (r + 1) * 3 + (i % 5) end
      if p[i] ~= e then M.fail('int64 allreduce %s: element %d is %s, expected %d', algo, i + 1, tostring(p[i]), e) end
   end
end

-- One SGD step on (x, y): forward, loss, backward, the reducer's allreduce (when given), step.
function M.step(model, crit, opt, x, y, reducer)
   local out = model:forward(x)
   crit:forward(out, y)
   model:zeroGradParameters()
   model:backward(x, crit:backward(out, y))
   if reducer then reducer:reduce() end
   opt:step()
end

-- ---- k SGD steps on N ranks == one process on the combined batch --------------------------
-- The combined batch of every step (16 samples) is the same on every rank; rank r trains on rows
-- r*16/N+1 .. (r+1)*16/N of it; the loss is the batch mean, so the combined gradient is the
-- average of the ranks' gradients. Rank 0 also trains a reference copy of the model (same seed)
-- on the whole batch, on the same device, and compares every parameter and buffer within
-- opts.tol (max|a - b| / max|b|, default 1e-5); every rank's replica must be bit-identical.
-- opts: device (default CPU), tol, sync_bn, and the GradReducer's bucket_mb, algo, overlap.
function M.equivalence(name, make_model, input_shape, opts)
   local rank, size = dist.rank(), dist.size()
   local STEPS, BATCH, CLASSES = 5, 16, 5
   if BATCH % size ~= 0 then M.fail('the combined batch %d must divide by the %d ranks', BATCH, size) end
   local per, tol = BATCH / size, opts.tol or 1e-5
   local function on(t) return opts.device and t:to(opts.device) or t end
   nr.manual_seed(7)
   local shape = {STEPS * BATCH}
   for _, s in ipairs(input_shape) do shape[#shape + 1] = s end
   local X = nr.randn(shape)
   local Y = nr.randint(0, CLASSES, {STEPS * BATCH})
   local crit = nr.nn.CrossEntropyLoss()
   local cfg = {lr = 0.1, momentum = 0.9, weight_decay = 5e-4, nesterov = true}

   local model = on(make_model(CLASSES))
   if opts.sync_bn then
      local _, n = dist.sync_batchnorm(model)
      if n == 0 then M.fail('%s: no BatchNorm2d converted', name) end
   end
   local opt = nr.optim.SGD(model, cfg)
   local reducer = dist.GradReducer(model, {bucket_mb = opts.bucket_mb, algo = opts.algo, overlap = opts.overlap})
   local ref, ref_opt
   if rank == 0 then
      ref = on(make_model(CLASSES))
      ref_opt = nr.optim.SGD(ref, cfg)
   end
   for step = 1, STEPS do
      local first = (step - 1) * BATCH
      M.step(model, crit, opt, on(X:narrow(1, first + rank * per + 1, per):contiguous()),
         on(Y:narrow(1, first + rank * per + 1, per):contiguous()), reducer)
      if ref then
         M.step(ref, crit, ref_opt, on(X:narrow(1, first + 1, BATCH):contiguous()),
            on(Y:narrow(1, first + 1, BATCH):contiguous()))
      end
   end
   local fp = dist.assert_same(model, name .. ': replicas after ' .. STEPS .. ' steps', {optimizer = opt})
   if rank == 0 then
      local worst = 0
      local mine, theirs = model:namedParameters(), ref:namedParameters()
      for i, e in ipairs(mine) do
         if e.param:device() ~= (opts.device or 'cpu') then M.fail('%s: %s is on %s', name, e.name, e.param:device()) end
         worst = math.max(worst, M.compare(e.param:cpu(), theirs[i].param:cpu(), tol, name .. ' ' .. e.name))
      end
      local bm, bt = model:namedBuffers(), ref:namedBuffers()
      for i, e in ipairs(bm) do -- BN running statistics (synchronized BN: the combined batch's)
         worst = math.max(worst, M.compare(e.tensor:cpu(), bt[i].tensor:cpu(), tol, name .. ' ' .. e.name))
      end
      print(string.format('%s: %d ranks x %d samples vs 1 x %d%s, %d steps, %d buckets (%s; %d started during backward): ' ..
         'max relative difference %.3g (tolerance %g), replicas identical (%s)', name, size, per, BATCH,
         opts.device and (' on ' .. opts.device) or '', STEPS, #reducer.buckets, reducer:layout(),
         reducer.started_in_backward, worst, tol, fp))
      if opts.overlap and reducer.started_in_backward == 0 then M.fail('%s: no bucket started during backward', name) end
   end
   reducer:unhook()
   M.pass(name)
end

return M

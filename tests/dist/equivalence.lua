-- tests/dist/equivalence.lua — (b) k SGD steps data-parallel on N ranks give the weights of one
-- process that trains on the combined batch, within 1e-5 relative.
--
-- Setup: the combined batch of every step (16 samples) is the same on every rank; rank r trains
-- on rows r*16/N+1 .. (r+1)*16/N of it; the loss is the batch mean, so the combined gradient is
-- the average of the ranks' gradients. Rank 0 also trains a reference copy of the model (same
-- seed) on the whole batch in one process, and compares. Models have no BatchNorm (per-rank
-- batch statistics differ from the combined batch's). Reduction order (ordered algorithm): for
-- every gradient element, sum over ranks in rank order 0..N-1 in double, times 1/N, rounded to
-- float once; the remaining differences are float32 rounding inside each rank's batch sums.
-- Tolerance: max|a - b| / max|b| <= 1e-5 for every parameter tensor (reported: the largest seen).
-- Variants: MLP and conv net; ordered (bucketed, tiny buckets so there are several), ordered with
-- overlap (buckets started from per-module backward hooks), and MPI_Allreduce; and a conv net
-- WITH BatchNorm made synchronized (nr.dist.sync_batchnorm), compared against plain BatchNorm on
-- the combined batch, running statistics included.
-- Run: mpirun -np 2 nrlua tests/dist/equivalence.lua
local nr = require 'nr'
local dist = require 'nr.dist'
local H = require 'tests.dist.common'

local rank, size = dist.init{timeout = 60}
local STEPS, BATCH, CLASSES = 5, 16, 5
if BATCH % size ~= 0 then H.fail('the combined batch %d must divide by the %d ranks', BATCH, size) end
local per = BATCH / size

local function run(name, make_model, input_shape, opts)
   -- data: STEPS combined batches, identical on every rank
   nr.manual_seed(7)
   local shape = {STEPS * BATCH}
   for _, s in ipairs(input_shape) do shape[#shape + 1] = s end
   local X = nr.randn(shape)
   local Y = nr.randint(0, CLASSES, {STEPS * BATCH})
   local crit = nr.nn.CrossEntropyLoss()
   local cfg = {lr = 0.1, momentum = 0.9, weight_decay = 5e-4, nesterov = true}

   local model = make_model()
   if opts.sync_bn then
      local _, n = dist.sync_batchnorm(model)
      if n == 0 then H.fail('%s: no BatchNorm2d converted', name) end
   end
   local opt = nr.optim.SGD(model, cfg)
   local reducer = dist.GradReducer(model, {bucket_mb = opts.bucket_mb, algo = opts.algo, overlap = opts.overlap})
   local ref, ref_opt
   if rank == 0 then
      ref = make_model()
      ref_opt = nr.optim.SGD(ref, cfg)
   end
   for step = 1, STEPS do
      local first = (step - 1) * BATCH
      local x = X:narrow(1, first + rank * per + 1, per):contiguous()
      local y = Y:narrow(1, first + rank * per + 1, per):contiguous()
      local out = model:forward(x)
      crit:forward(out, y)
      model:zeroGradParameters()
      model:backward(x, crit:backward(out, y))
      reducer:reduce()
      opt:step()
      if ref then
         local xa = X:narrow(1, first + 1, BATCH):contiguous()
         local ya = Y:narrow(1, first + 1, BATCH):contiguous()
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
         worst = math.max(worst, H.compare(e.param, theirs[i].param, 1e-5, name .. ' ' .. e.name))
      end
      local bm, bt = model:namedBuffers(), ref:namedBuffers()
      for i, e in ipairs(bm) do -- BN running statistics (synchronized BN: the combined batch's)
         worst = math.max(worst, H.compare(e.tensor, bt[i].tensor, 1e-5, name .. ' ' .. e.name))
      end
      print(string.format('%s: %d ranks x %d samples vs 1 x %d, %d steps, %d buckets (%s; %d started during backward): ' ..
         'max relative difference %.3g (tolerance 1e-5), replicas identical (%s)',
         name, size, per, BATCH, STEPS, #reducer.buckets, reducer:layout(), reducer.started_in_backward, worst, fp))
      if opts.overlap and reducer.started_in_backward == 0 then H.fail('%s: no bucket started during backward', name) end
   end
   reducer:unhook()
   H.pass(name)
end

local mlp = function() return H.mlp(1, 20, 32, CLASSES) end
local conv = function() return H.convnet(2, CLASSES) end
run('mlp ordered', mlp, {20}, {bucket_mb = 0.002})
run('mlp ordered overlap', mlp, {20}, {bucket_mb = 0.002, overlap = true})
run('mlp MPI_Allreduce', mlp, {20}, {algo = 'mpi'})
run('conv ordered', conv, {3, 8, 8}, {bucket_mb = 0.001, overlap = true})
run('conv+BN synchronized', function() return H.convnet_bn(3, CLASSES) end, {3, 8, 8}, {sync_bn = true, overlap = true, bucket_mb = 0.001})

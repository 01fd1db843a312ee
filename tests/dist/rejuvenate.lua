-- tests/dist/rejuvenate.lua — (d) after a rejuvenation every rank holds identical weights.
--
-- A conv net with BatchNorm trains a few steps data-parallel (each rank on its own data, so the
-- BN running statistics differ per rank). Then a rejuvenation is done the distributed way:
--   1. the decision (which channels of the conv/BN survive) is taken on rank 0 only
--      (nr.dist.decide) from |γ| and rank 0's random draw, and broadcast;
--   2. every rank applies the same surgery: index_select on conv weight (dim 1), BN γ, β and
--      running statistics, the classifier's input columns, and the momentum buffers; then
--      "rejuvenates" the cut channels back with freshly initialised weights, drawn from a
--      generator seeded differently on each rank (so the ranks now hold different weights —
--      checked, to show the next step matters);
--   3. nr.dist.broadcast_model(model, {optimizer = opt}) copies rank 0's parameters, buffers and
--      momentum to every rank; nr.dist.assert_same then checks bit-identity of all of them;
--   4. training goes on (the gradient reducer notices the new tensors and rebuilds its buckets)
--      and the replicas stay identical.
-- When nr.rejuvenate is available, the same is checked with the real NR step (rank-0 decision
-- via nr.dist.decide is the NR code's job; here the broadcast makes all ranks agree regardless).
-- Run: mpirun -np 2 nrlua tests/dist/rejuvenate.lua
local nr = require 'nr'
local dist = require 'nr.dist'
local H = require 'tests.dist.common'

local rank, size = dist.init{timeout = 60}
local C0, CLASSES = 8, 5
local model, opt, reducer -- the current model, optimizer and gradient reducer (train() uses them)

nr.manual_seed(5)
local conv = nr.nn.Conv2d(3, C0, 3, {padding = 1, bias = false})
local bn = nr.nn.BatchNorm2d(C0)
local fc = nr.nn.Linear(C0, CLASSES)
model = nr.nn.Sequential{conv, bn, nr.nn.ReLU(), nr.nn.GlobalAvgPool2d(), fc}
opt = nr.optim.SGD(model, {lr = 0.05, momentum = 0.9})
local crit = nr.nn.CrossEntropyLoss()
reducer = dist.GradReducer(model, {overlap = true})
dist.broadcast_model(model, {optimizer = opt})

local function train(steps, seed)
   nr.manual_seed(seed + rank) -- each rank its own data
   for _ = 1, steps do
      H.step(model, crit, opt, nr.randn({6, 3, 8, 8}), nr.randint(0, CLASSES, {6}), reducer)
   end
end

train(3, 100)
-- parameters agree (same averaged gradients); BN running statistics are per rank until merged
local ok_before = pcall(dist.assert_same, model, 'before merging buffers')
if ok_before then H.fail('expected per-rank BN running statistics to differ before sync_buffers') end
dist.sync_buffers(model)
dist.assert_same(model, 'after 3 steps', {optimizer = opt})
H.pass('training keeps replicas identical')

-- 1. the decision, on rank 0 only
local plan = dist.decide(function()
   local g = bn.weight:abs():totable()
   local order = {}
   for i = 1, #g do order[i] = i - 1 end
   table.sort(order, function(a, b) return g[a + 1] > g[b + 1] end)
   nr.manual_seed(os.time()) -- rank 0's own randomness: the others could never reproduce it
   local drop = order[#order - math.floor(nr.rand({1}):get(1) * 2)]
   local keep = {}
   for _, c in ipairs(order) do if c ~= drop and #keep < C0 - 3 then keep[#keep + 1] = c end end
   table.sort(keep)
   return {keep = keep, lambda = 1e-4}
end)
if #plan.keep ~= C0 - 3 or plan.lambda ~= 1e-4 then H.fail('decide returned a bad plan') end

-- 2. the surgery, the same on every rank, then rejuvenation with per-rank random weights
local keep = nr.tensor(plan.keep, {dtype = 'int64'})
local function cut(m, field, dim)
   local old = m[field]
   local new = old:index_select(dim, keep)
   local st = opt:state_of(old)
   m[field] = new
   if st and st.momentum then opt:set_state_of(new, {momentum = st.momentum:index_select(dim, keep)}) end
   return new
end
local function grow(m, field, dim, total, fill)
   local old = m[field]
   local shape = old:shape()
   shape[dim] = total
   local new = nr.empty(shape)
   fill(new)
   new:narrow(dim, 1, old:size(dim)):copy(old)
   local st = opt:state_of(old)
   m[field] = new
   if st and st.momentum then
      local mom = nr.zeros(shape)
      mom:narrow(dim, 1, old:size(dim)):copy(st.momentum)
      opt:set_state_of(new, {momentum = mom})
   end
end
nr.manual_seed(1000 + rank) -- different on every rank on purpose
local function randn(t) t:copy(nr.randn(t:shape()):mul(0.1)) end
local function ones(t) t:fill(1) end
local function zeros(t) t:fill(0) end
cut(conv, 'weight', 1); grow(conv, 'weight', 1, C0, randn)
for _, f in ipairs({'weight', 'bias', 'running_mean', 'running_var'}) do cut(bn, f, 1) end
grow(bn, 'weight', 1, C0, ones); grow(bn, 'bias', 1, C0, zeros)
grow(bn, 'running_mean', 1, C0, zeros); grow(bn, 'running_var', 1, C0, ones)
cut(fc, 'weight', 2); grow(fc, 'weight', 2, C0, randn)
conv.gradWeight = nr.zeros(conv.weight:shape())
bn.gradWeight, bn.gradBias = nr.zeros({C0}), nr.zeros({C0})
fc.gradWeight = nr.zeros(fc.weight:shape())
opt:refresh()
local fps = dist.allgather_numbers({tonumber(dist.fingerprint(model):sub(1, 8), 16)})
if size > 1 and fps[1][1] == fps[2][1] then H.fail('ranks should differ before the broadcast (test is vacuous)') end

-- 3. rank 0's weights everywhere
dist.broadcast_model(model, {optimizer = opt})
local fp = dist.assert_same(model, 'after rejuvenation', {optimizer = opt})
if rank == 0 then print(string.format('after rejuvenation (kept %d of %d channels, %d re-initialised): all %d ranks hold fingerprint %s',
   #plan.keep, C0, C0 - #plan.keep, size, fp)) end
H.pass('identical weights after a manual rejuvenation')

-- 4. training goes on with the new tensors; replicas stay identical
local rebuilds = reducer.rebuilds
train(3, 200)
dist.sync_buffers(model)
dist.assert_same(model, 'after training past the rejuvenation', {optimizer = opt})
if reducer.rebuilds ~= rebuilds + 1 then H.fail('the reducer did not rebuild its buckets after surgery (%d -> %d)', rebuilds, reducer.rebuilds) end
H.pass('replicas identical after training past the rejuvenation')

-- 5. the real Neural Rejuvenation step (nr.rejuvenate), its decisions taken on rank 0: the
-- reallocation policy runs inside nr.dist.decide (what nr.dist.attach does for recipe.nr), the
-- surgery runs everywhere, the fresh channels are drawn from per-rank generators, and the
-- broadcast makes every rank hold rank 0's result.
local rej = require 'nr.rejuvenate' -- a plain require: a failure to load fails the test
do
   local pol = require 'nr.rejuvenate.policy'
   nr.manual_seed(5)
   local m2 = nr.nn.Sequential{nr.nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
      nr.nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
      nr.nn.GlobalAvgPool2d(), nr.nn.Linear(8, CLASSES)}
   model, opt = m2, nr.optim.SGD(m2, {lr = 0.05, momentum = 0.9})
   reducer:unhook()
   reducer = dist.GradReducer(model)
   dist.broadcast_model(model, {optimizer = opt})
   train(2, 300)
   local bns = model:findModules('BatchNorm2d')
   for _, c in ipairs({1, 4, 6}) do bns[1].weight:set(c, 0) end -- dead channels, the same on every rank
   bns[2].weight:set(2, 0)
   dist.sync_buffers(model)
   dist.assert_same(model, 'before nr.rejuvenate', {optimizer = opt})
   local calls = 0
   local policy = {reallocate = function(layers, budget)
      return dist.decide(function(l, b) calls = calls + 1; return pol.reallocate(l, b) end, layers, budget)
   end}
   nr.manual_seed(2000 + rank) -- the fresh channels differ per rank until the broadcast
   local rep = rej.rejuvenate(model, {input_shape = {3, 8, 8}, optimizer = opt, policy = policy})
   if calls ~= (rank == 0 and 1 or 0) then H.fail('the reallocation ran %d times on rank %d (expected on rank 0 only)', calls, rank) end
   local f2 = dist.allgather_numbers({tonumber(dist.fingerprint(model):sub(1, 8), 16)})
   if size > 1 and f2[1][1] == f2[2][1] then H.fail('fresh channels should differ per rank before the broadcast') end
   dist.broadcast_model(model, {optimizer = opt})
   local fp2 = dist.assert_same(model, 'after nr.rejuvenate', {optimizer = opt})
   if rank == 0 then
      print(string.format('after nr.rejuvenate (r_params %.3f -> %.3f, %d -> %d parameters): all %d ranks hold fingerprint %s',
         rep.before.r_params, rep.after.r_params, rep.before.params_all, rep.after.params_all, size, fp2))
   end
   H.pass('identical weights after nr.rejuvenate')
   train(2, 400)
   dist.sync_buffers(model)
   dist.assert_same(model, 'after training past nr.rejuvenate', {optimizer = opt})
   H.pass('replicas identical after training past nr.rejuvenate')
end

-- 6. AdamW's state: moments and the per-parameter step count. A rank whose step counts differ
-- is caught by assert_same (the numbers are in the fingerprint); a rank without state (as after
-- a resume where rank 0 loaded the checkpoint) gets rank 0's moments and steps by the broadcast.
do
   opt = nr.optim.AdamW(model, {lr = 1e-3})
   dist.broadcast_model(model, {optimizer = opt})
   train(3, 500)
   dist.sync_buffers(model)
   dist.assert_same(model, 'after 3 AdamW steps', {optimizer = opt})
   local p = model:namedParameters()[1].param
   if rank == 1 then
      local st = opt:state_of(p)
      st.step = 99
      opt:set_state_of(p, st)
   end
   local ok, err = pcall(dist.assert_same, model, 'with a step count changed on rank 1', {optimizer = opt})
   if size > 1 and (ok or not tostring(err):find('.step', 1, true)) then
      H.fail('assert_same did not name the differing step count: %s', tostring(err))
   end
   if rank ~= 0 then
      for _, e in ipairs(model:namedParameters()) do opt:set_state_of(e.param, nil) end
   end
   dist.broadcast_model(model, {optimizer = opt})
   dist.assert_same(model, 'after broadcasting AdamW state', {optimizer = opt})
   if opt:state_of(p).step ~= 3 then H.fail('rank %d: step %s after the broadcast, expected 3', rank, tostring(opt:state_of(p).step)) end
   train(2, 600)
   dist.sync_buffers(model)
   dist.assert_same(model, 'after training on with AdamW', {optimizer = opt})
   H.pass('AdamW moments and step counts identical on every rank, also after a broadcast to ranks without state')
end

-- tests/dist/train_nr.lua OUT — nr.train + Neural Rejuvenation, data-parallel.
--
-- A small conv net with BatchNorm on Fashion-MNIST (2 epochs x 6 steps of 64 samples in total).
-- Channels 1-3 of the first conv are dead (weights and γ zero, identical on every rank), and the
-- recipe's policy rejuvenates at the end of epoch 1. nr.train attaches nr.dist first (it wraps
-- recipe.nr.policy so every decision runs on rank 0 inside nr.dist.decide), then nr.rejuvenate.
-- Checks: the policy functions ran on rank 0 only; the rejuvenation happened (architecture
-- changed); nr.dist's epoch_end found all replicas bit-identical after it; only rank 0 logged it.
-- With a second argument 'steps' the check runs every 2 steps (lambda.dt = 2) and the policy
-- rejuvenates at step 4, mid-epoch 1: the surgery then happens in after_step, and nr.dist's
-- after_step broadcast must follow it before the next forward; a hook after both checks that
-- every rank holds the same parameters right then (the new weights are drawn differently on
-- each rank, so only the broadcast makes them agree).
-- Run: mpirun -np 2 nrlua tests/dist/train_nr.lua /tmp/run_nr [steps]
local nr = require 'nr'
local dist = require 'nr.dist'
local train = require 'nr.train'

local out = assert(arg[1], 'usage: train_nr.lua OUT [steps]')
local by_steps = arg[2] == 'steps'
local root = os.getenv('NR_FASHION') or '/usr/share/datasets/fashion-mnist'
-- NR_DIST_TEST_DEVICE=cuda: each rank trains on its GPU (tests/gpu/emu/run.sh, on the emulator)
local DEVICE = os.getenv('NR_DIST_TEST_DEVICE') or 'cpu'
local rank, size = dist.init{timeout = 120}

local calls = {when = 0}
local recipe = {
   name = 'dist-nr-test',
   model = function()
      nr.manual_seed(4)
      return nr.nn.Sequential{
         nr.nn.Conv2d(1, 8, 3, {padding = 1, stride = 2, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
         nr.nn.Conv2d(8, 8, 3, {padding = 1, stride = 2, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
         nr.nn.GlobalAvgPool2d(), nr.nn.Linear(8, 10)}
   end,
   data = {dataset = 'fashion-mnist', root = root, batch = 64 / size, train_batches = 6, val_batches = 2, threads = 1},
   optim = {name = 'sgd', lr = 0.05, momentum = 0.9, weight_decay = 0},
   schedule = false, epochs = 2, seed = 1, device = DEVICE, out = out, log_every = 3,
   nr = {target = 0.5, input_shape = {1, 28, 28}, lambda = {mode = 'constant', value = 0, dt = by_steps and 2 or nil},
         policy = {when = function(ctx)
            calls.when = calls.when + 1
            if by_steps then return ctx.step == 4 and ctx.rejuvenations == 0 end
            return ctx.epoch == 1 and ctx.rejuvenations == 0
         end,
         -- new weights that differ by rank until nr.dist broadcasts rank 0's model
         init = by_steps and function(_, shape) return nr.full(shape, 0.01 * (rank + 1)) end or nil}},
   hooks = {train_begin = function(t) -- dead channels, the same on every rank (after nr.dist's broadcast)
      local conv, bn = t.model.modules[1], t.model.modules[2]
      for c = 1, 3 do
         conv.weight:narrow(1, c, 1):zero()
         bn.weight:set(c, 0)
      end
      -- added now, so it runs after every after_step hook (NR's check, then nr.dist's broadcast)
      t:add_hook('after_step', function(tt)
         if by_steps and tt.step == 4 then
            local sums = {}
            for _, e in ipairs(tt.model:namedParameters()) do sums[#sums + 1] = e.param:sum() end
            local rows = dist.allgather_numbers(sums)
            for r = 2, #rows do
               for k = 1, #sums do
                  assert(rows[r][k] == rows[1][k], 'rank ' .. (r - 1) .. ' differs from rank 0 right after the surgery')
               end
            end
         end
      end)
   end},
}
local tr = train.new(recipe)
local ctl = tr.nr
local before = tr.model.modules[1].out_channels
local summary = tr:run()
local after = tr.model.modules[1].out_channels
local all_calls = dist.allgather_numbers({calls.when})
if rank == 0 then
   for r = 2, #all_calls do assert(all_calls[r][1] == 0, 'policy.when ran on rank ' .. (r - 1)) end
   assert(all_calls[1][1] >= 1, 'policy.when never ran on rank 0')
   assert(ctl.rejuvenations == 1, 'no rejuvenation happened')
   print(string.format('RESULT ranks=%d rejuvenations=%d first conv %d -> %d channels, policy.when calls per rank: %s, top1 %.2f',
      size, ctl.rejuvenations, before, after, table.concat((function() local t = {} for i, r in ipairs(all_calls) do t[i] = r[1] end return t end)(), ' '),
      summary.final_top1 or -1))
end

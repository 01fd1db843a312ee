-- tests/dist/train.lua OUT EPOCHS [RESUME] — nr.train made data-parallel by nr.dist.attach.
--
-- Trains a small MLP (no BatchNorm) on Fashion-MNIST: 64 samples per step in total, i.e. 64 / N
-- per rank, 8 steps per epoch, evaluation on 4 x 64 samples; writes the run into OUT. Run with
-- 1 and with 2 ranks, the checkpoints must agree within 1e-5 (the loader's shard is strided over
-- the epoch's permutation, so the ranks' batches of a step are exactly the 1-process batch).
-- RESUME: a run folder to continue (written with any number of ranks).
-- nr.train attaches nr.dist itself (M.new), so this is an ordinary nr.train run.
-- Run: mpirun -np 2 nrlua tests/dist/train.lua /tmp/run2 2
local nr = require 'nr'
local dist = require 'nr.dist'
local train = require 'nr.train'

local out, epochs, resume = arg[1], tonumber(arg[2] or '2'), arg[3]
assert(out and epochs, 'usage: train.lua OUT EPOCHS [RESUME]')
local root = os.getenv('NR_FASHION') or '/usr/share/datasets/fashion-mnist'
-- NR_DIST_TEST_DEVICE=cuda: each rank trains on its GPU (tests/gpu/emu/run.sh, on the emulator)
local DEVICE = os.getenv('NR_DIST_TEST_DEVICE') or 'cpu'

local rank, size = dist.init{timeout = 120}
local recipe = {
   name = 'dist-test',
   model = function()
      nr.manual_seed(3)
      return nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(784, 64), nr.nn.ReLU(), nr.nn.Linear(64, 10)}
   end,
   data = {dataset = 'fashion-mnist', root = root, batch = 64 / size, train_batches = 8, val_batches = 4, threads = 1},
   optim = {name = 'sgd', lr = 0.05, momentum = 0.9, weight_decay = 5e-4},
   schedule = false, -- constant LR: a run stopped after epoch k and resumed equals an uninterrupted one
   epochs = epochs, seed = 1, device = DEVICE, out = out, resume = resume, log_every = 4,
}
local tr = train.new(recipe)
assert(tr.world_size == size and tr.rank == rank, 'nr.train did not attach nr.dist')
local summary = tr:run()
if rank == 0 then
   print(string.format('RESULT ranks=%d steps=%d top1=%.4f loss=%.6f images_per_s=%.0f', size, summary.steps,
      summary.final_top1 or -1, summary.final_loss or -1, summary.images_per_s))
end

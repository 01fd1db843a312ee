-- tests/dist/mismatch.lua MODE — ranks given different recipes fail on every rank before the
-- first training step, with a message that names the field and both values (they used to crash
-- inside MPI: SIGSEGV, SIGABRT or MPI_ERR_TRUNCATE, or fail an epoch later naming a symptom).
--   batches  data.train_batches 3 on rank 0, 5 on rank 1
--   lr       optim.lr 0.01 vs 0.02
--   batch    data.batch 8 vs 16
--   loader   the same recipe, but rank 1's ready-made loader has more batches: the steps per
--            epoch differ (caught at train_begin)
--   same     the recipes differ only in per-rank fields (out, threads, progress, dist.timeout): trains
-- Every rank catches nr.train's error, prints it and exits 0.
-- Run: mpirun -np 2 nrlua tests/dist/mismatch.lua batches
local nr = require 'nr'
local dist = require 'nr.dist'
local train = require 'nr.train'

local mode = arg and arg[1] or 'batches'
local rank = dist.init{timeout = 30}
local x, y = nr.randn({256, 8}), nr.randint(0, 3, {256})
local sink = {write = function() end, flush = function() end}
local nrows = (mode == 'loader' and rank == 1) and 256 or 128
local recipe = {
   model = function() nr.manual_seed(1); return nr.nn.Sequential{nr.nn.Linear(8, 16), nr.nn.ReLU(), nr.nn.Linear(16, 3)} end,
   data = {train = train.memory_loader(x:narrow(1, 1, nrows), y:narrow(1, 1, nrows), {batch = 8}),
           val = train.memory_loader(x, y, {batch = 64})},
   optim = {lr = 0.01}, epochs = 1, device = 'cpu', out = os.tmpname() .. '_mismatch_run', threads = rank + 1,
   progress = {stream = sink, tty = false}, dist = {timeout = 30 + rank},
}
if mode == 'batches' then recipe.data.train_batches = rank == 0 and 3 or 5
elseif mode == 'lr' then recipe.optim.lr = rank == 0 and 0.01 or 0.02
elseif mode == 'batch' then recipe.data.batch = rank == 0 and 8 or 16
end
local ok, err = pcall(train.train, recipe)
io.stdout:write(string.format('rank %d: nr.train %s\n', rank, ok and 'finished' or ('failed: ' .. tostring(err))))
io.stdout:flush()
os.exit(0)

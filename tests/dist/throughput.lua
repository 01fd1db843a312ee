-- tests/dist/throughput.lua [BATCH] [STEPS] — training throughput data-parallel, and the cost of
-- the gradient allreduce. Synthetic CIFAR-sized data (no loader cost), a small conv net with
-- BatchNorm (about 0.3 M parameters), BATCH samples per rank (default 64), STEPS timed steps after
-- 3 warm-up steps. Prints, on rank 0, images/s for the job, ms per step, and the ms of the step
-- spent in the gradient reduction, then a sweep of allreduce sizes (ordered vs MPI_Allreduce).
-- Not part of the spec (timings); docs/DISTRIBUTED.md quotes its output.
-- Run: mpirun -np 2 -x NR_THREADS=1 nrlua tests/dist/throughput.lua
local nr = require 'nr'
local dist = require 'nr.dist'

local B, STEPS = tonumber(arg[1] or '64'), tonumber(arg[2] or '20')
local rank, size = dist.init{force = true}

nr.manual_seed(1)
local function block(cin, cout, stride)
   return {nr.nn.Conv2d(cin, cout, 3, {padding = 1, stride = stride, bias = false}), nr.nn.BatchNorm2d(cout), nr.nn.ReLU()}
end
local layers = {}
for _, b in ipairs({block(3, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1)}) do
   for _, m in ipairs(b) do layers[#layers + 1] = m end
end
layers[#layers + 1] = nr.nn.GlobalAvgPool2d()
layers[#layers + 1] = nr.nn.Linear(128, 10)
local model = nr.nn.Sequential(layers)
local crit = nr.nn.CrossEntropyLoss()
local opt = nr.optim.SGD(model, {lr = 0.01, momentum = 0.9})
local reducer = dist.GradReducer(model, {bucket_mb = tonumber(os.getenv('BUCKET_MB') or '25'), overlap = os.getenv('OVERLAP') == '1'})
dist.broadcast_model(model, {optimizer = opt})
nr.manual_seed(10 + rank)
local x = nr.randn({B, 3, 32, 32})
local y = nr.randint(0, 10, {B})

local t_reduce = 0
local function step()
   local out = model:forward(x)
   crit:forward(out, y)
   model:zeroGradParameters()
   model:backward(x, crit:backward(out, y))
   local t0 = dist.time()
   reducer:reduce()
   t_reduce = t_reduce + dist.time() - t0
   opt:step()
end
for _ = 1, 3 do step() end
dist.barrier()
t_reduce = 0
local t0 = dist.time()
for _ = 1, STEPS do step() end
dist.barrier()
local dt = dist.time() - t0
local per = dist.allreduce_numbers({t_reduce / STEPS}, 'max')[1]
if rank == 0 then
   print(string.format('TRAIN ranks=%d threads/rank=%d batch/rank=%d params=%d grad_MB=%.2f buckets=%d: %.0f images/s, %.1f ms/step, reduction %.2f ms/step',
      size, nr.get_num_threads(), B, model:nParameters(), model:nParameters() * 4 / 1048576, #reducer.buckets,
      size * B * STEPS / dt, 1000 * dt / STEPS, 1000 * per))
end

if size > 1 then
   for _, n in ipairs({1024, 65536, 1048576, 4194304}) do
      local t = nr.randn({n})
      for _, algo in ipairs({'ordered', 'mpi'}) do
         local reps = n >= 1048576 and 10 or 50
         dist.allreduce(t, {algo = algo})
         dist.barrier()
         local s = dist.time()
         for _ = 1, reps do dist.allreduce(t, {algo = algo}) end
         local e = dist.allreduce_numbers({(dist.time() - s) / reps}, 'max')[1]
         if rank == 0 then
            print(string.format('ALLREDUCE ranks=%d %8.2f MB %-7s %8.3f ms  algbw %7.2f GB/s  busbw %7.2f GB/s', size, n * 4 / 1e6, algo,
               e * 1000, n * 4 / e / 1e9, n * 4 / e / 1e9 * 2 * (size - 1) / size))
         end
      end
   end
end

-- tests/dist/failure.lua MODE — (c) a rank that fails ends the whole job within bounded time,
-- with a clear error, and nothing hangs. Rank 0 keeps reducing gradients-sized tensors; rank 1:
--   kill   sends itself SIGKILL after 3 steps (mpirun notices the death and stops the others)
--   error  raises a Lua error after 3 steps (exit status 1 -> MPI_Abort from libnr_dist's exit hook)
--   hang   stops calling collectives (sleeps); rank 0's collective times out after 3 s and fails
--   exit0  inside nr.train, calls os.exit(0) at step 4 (a clean status, but mid-training: the exit
--          hook aborts the job instead of finalizing MPI while rank 0 waits in a reduction)
--   caught every rank's nr.train raises at step 2 and the script handles it and ends normally:
--          a clean job (the error took the mid-training mark with it), status 0
-- DEVICE (optional second argument, kill / error / hang): 'cuda' reduces a tensor on each rank's
-- GPU through NCCL instead (a hang then times out in NCCL's wait, which aborts the communicator).
-- The spec checks the status is non-zero, the time is bounded and the messages name the ranks.
-- Run: mpirun -np 2 nrlua tests/dist/failure.lua kill [cuda]
local ffi = require 'ffi'
local nr = require 'nr'
local dist = require 'nr.dist'

ffi.cdef[[
int getpid(void);
int kill(int pid, int sig);
int usleep(unsigned int usec);
]]

local mode = arg and arg[1] or 'kill'
local device = arg and arg[2] or 'cpu'
local rank = dist.init{timeout = (mode == 'exit0' or mode == 'caught') and 60 or 3, device = device}
if mode == 'exit0' or mode == 'caught' then
   local train = require 'nr.train'
   local x, y = nr.randn({256, 8}), nr.randint(0, 3, {256})
   local sink = {write = function() end, flush = function() end}
   local ok, err = pcall(train.train, {
      model = function() nr.manual_seed(1); return nr.nn.Sequential{nr.nn.Linear(8, 16), nr.nn.ReLU(), nr.nn.Linear(16, 3)} end,
      data = {train = train.memory_loader(x, y, {batch = 8}), val = train.memory_loader(x, y, {batch = 64})},
      optim = {lr = 0.01}, epochs = 100, device = 'cpu', out = os.tmpname() .. '_failure_run',
      progress = {stream = sink, tty = false},
      hooks = {after_step = function(t)
         if mode == 'caught' and t.step == 2 then error('user stop condition', 0) end
         if mode == 'exit0' and rank == 1 and t.step == 4 then
            io.stdout:write('rank 1: simulating failure "exit0" at step 4\n')
            io.stdout:flush()
            os.exit(0)
         end
      end},
   })
   io.stdout:write(string.format('rank %d: nr.train %s\n', rank, ok and 'finished' or ('failed (' .. tostring(err) .. '), handled')))
   io.stdout:flush()
   os.exit(0)
end
local t = nr.ones({100000}):to(device == 'cuda' and 'cuda:' .. nr.cuda.current_device() or 'cpu')
-- on GPUs, two collectives in flight per step (as GradReducer's buckets): when the first one's
-- wait fails and aborts the communicator, the second one's wait must fail at once, naming the
-- abort, without touching the freed communicator
local reduce = function() dist.allreduce(t, {op = 'mean'}) end
if device == 'cuda' then
   local C = dist.lib()
   local t2 = t:clone()
   local h1, h2 = ffi.new('int32_t[1]'), ffi.new('int32_t[1]')
   local function err() return ffi.string(C.nr_last_error()) end
   reduce = function()
      assert(C.nr_dist_allreduce_start(t.c, 0, 2, 0.5, h1) == 0, err())
      assert(C.nr_dist_allreduce_start(t2.c, 0, 2, 0.5, h2) == 0, err())
      if C.nr_dist_wait(h1[0]) ~= 0 then
         local first = err()
         local t0 = dist.time()
         local second = C.nr_dist_wait(h2[0]) ~= 0 and err() or 'the second wait succeeded'
         io.stdout:write(string.format('rank %d: second collective after the abort (%.1f s): %s\n', rank, dist.time() - t0, second))
         io.stdout:flush()
         error(first, 0)
      end
      assert(C.nr_dist_wait(h2[0]) == 0, err())
   end
end
for step = 1, 1000000 do
   if rank == 1 and step == 4 then
      io.stdout:write(string.format('rank 1: simulating failure "%s" at step %d\n', mode, step))
      io.stdout:flush()
      if mode == 'kill' then
         ffi.C.kill(ffi.C.getpid(), 9)
      elseif mode == 'error' then
         error('simulated failure on rank 1 at step ' .. step)
      elseif mode == 'hang' then
         for _ = 1, 600 do ffi.C.usleep(100000) end
      end
   end
   reduce()
   if step % 1000 == 0 then ffi.C.usleep(1000) end
end

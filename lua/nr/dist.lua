-- nr.dist — data-parallel training across processes, GPUs and machines (MPI on CPU, NCCL on GPU).
--
--   mpirun -np 4 nrlua recipes/NAME.lua        every rank trains on its shard of the data; the
--                                               gradients are averaged; rank 0 writes the run
--
-- What it is: init/rank/size, collectives on tensors (allreduce, broadcast) and Lua values
-- (broadcast_object, decide, allreduce_numbers), the bucketed gradient reducer (GradReducer,
-- optionally overlapped with backward), broadcast_model / sync_buffers / assert_same for replica
-- consistency, synchronized BatchNorm (sync_batchnorm), and attach(trainer), which wires all of
-- this into nr.train through its hooks. docs/DISTRIBUTED.md is the guide.
-- What it is not: the C collectives (core/dist/*.c, library libnr_dist, loaded here from beside
-- libnr and only when the process was started by an MPI launcher, so plain runs never load MPI).
-- Invariants:
--   * Outside an MPI launch (or with size 1) every function works and does nothing costly:
--     rank 0, size 1, allreduce(mean) is the identity, decide(fn) is fn().
--   * Every rank calls the same collectives in the same order; a failing collective raises an
--     error naming the rank, and a process that exits with a non-zero status aborts the whole
--     job (MPI_Abort), so no rank waits forever; waits are also bounded by the timeout.
--   * Gradients are averaged with the ordered algorithm by default on CPU: per element, the sum
--     over ranks is taken in rank order 0..N-1 in double and rounded once, so every rank gets the
--     same bits and replicas never drift apart; on GPU NCCL's ring allreduce is used.
--   * Decisions that must agree (NR's utilization, λ, which channels to cut) are taken on rank 0
--     and broadcast (decide); after any change of the model's parameter tensors the parameters,
--     buffers and optimizer state of rank 0 are broadcast before the next forward.
local ffi = require 'ffi'
local nrffi = require 'nr.ffi'
local check = require 'nr.check'
local T = require 'nr.tensor'

local M = {}

local D -- libnr_dist, once MPI is up
local S = {mode = nil, rank = 0, size = 1, local_rank = 0, local_size = 1, algo = 'ordered', device = 'cpu'}

local ALGOS = {ordered = 0, mpi = 1, nccl = 2}
local OPS = {sum = 0, mean = 0, max = 1, min = 2}

-- Environment variables that MPI launchers (Open MPI, MPICH/Hydra, PMIx, MVAPICH) set.
local LAUNCH_VARS = {'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE', 'PMIX_RANK', 'MV2_COMM_WORLD_SIZE', 'MPI_LOCALNRANKS'}

-- True when this process was started by an MPI launcher (or NR_DIST=1 forces MPI).
function M.launched()
   if os.getenv('NR_DIST') == '1' then return true end
   if os.getenv('NR_DIST') == '0' then return false end
   for _, v in ipairs(LAUNCH_VARS) do
      local x = os.getenv(v)
      if x and x ~= '' then return true end
   end
   return false
end

-- Raises when this process runs under an MPI launcher but nr.dist.init has not run: every
-- collective would act as the single process it is not (each rank its own rank 0 of 1).
local function need_init(fname)
   if S.mode == nil and M.launched() then
      error(fname .. ': this process was started by an MPI launcher; call nr.dist.init() first (before it, '
         .. 'every rank acts as rank 0 of 1 and no collective reaches the others)', 3)
   end
end

-- ---- loading libnr_dist --------------------------------------------------------------------

local function candidates()
   local c = {}
   local env = os.getenv('NRLUA_DIST_LIB')
   if env and env ~= '' then c[#c + 1] = env end
   local dir = type(nrffi.libpath) == 'string' and nrffi.libpath:match('^(.*)/[^/]*$')
   if dir then c[#c + 1] = dir .. '/libnr_dist.so' end
   c[#c + 1] = nrffi.home .. '/build/libnr_dist.so'
   c[#c + 1] = 'nr_dist'
   return c
end

local function load_lib()
   if D then return D end
   local tried = {}
   for _, path in ipairs(candidates()) do
      -- global: Open MPI's plugins resolve MPI symbols from the global namespace
      local ok, lib = pcall(ffi.load, path, true)
      if ok then
         D = lib
         M.libpath = path
         return D
      end
      tried[#tried + 1] = path .. ' (' .. tostring(lib) .. ')'
   end
   error('nr.dist: cannot load libnr_dist; tried ' .. table.concat(tried, ', ') ..
      '; it is built beside libnr when CMake finds MPI (apt install libopenmpi-dev), or set NRLUA_DIST_LIB', 0)
end

local function where() return string.format('rank %d/%d', S.rank, S.size) end

local function ok(st, fname, level)
   if st ~= 0 then
      error(string.format('%s (%s): %s', fname, where(), ffi.string(nrffi.C.nr_last_error())), (level or 2) + 1)
   end
end

-- ---- setup -----------------------------------------------------------------------------------

-- This rank's GPU: local_rank modulo the visible devices (all GPUs visible: rank i on a machine
-- takes GPU i; one GPU per process through CUDA_VISIBLE_DEVICES: GPU 0). Also returns nr.cuda.
local function gpu_of_rank()
   local okc, cuda = pcall(require, 'nr.cuda')
   if not okc or type(cuda) ~= 'table' then return S.local_rank, nil end
   local n = type(cuda.device_count) == 'function' and cuda.device_count() or 0
   return n > 0 and S.local_rank % n or S.local_rank, cuda
end

-- nr.dist.init{timeout = s, algo = 'ordered'|'mpi', device = 'cpu'|'cuda', force = bool}
--   -> rank, size. Idempotent. Under an MPI launcher (or force) MPI starts; otherwise this is a
-- single process (rank 0 of 1) and MPI is never loaded. timeout: seconds a collective may wait
-- (default $NR_DIST_TIMEOUT or 1800; 0 waits forever). device 'cuda': NCCL on this rank's GPU,
-- local_rank modulo the visible GPUs (also made nr.cuda's current device).
-- A timeout in seconds: a finite number >= 0 (0: wait forever). NaN turned the hang timeout off
-- without a word and a negative value silently meant the default.
local function check_timeout(v, fname, what)
   if v == nil then return end
   if not (type(v) == 'number' and v >= 0 and v < math.huge) then
      error(string.format('%s: %s must be a finite number of seconds >= 0 (0: wait forever), got %s', fname, what,
         check.show(v)), 3)
   end
end

function M.init(opts)
   opts = check.options(opts, {timeout = true, algo = true, device = true, force = true}, 'nr.dist.init')
   check_timeout(opts.timeout, 'nr.dist.init', 'timeout')
   if opts.algo then
      check.arg(opts.algo == 'ordered' or opts.algo == 'mpi', 'nr.dist.init', 'algo must be "ordered" or "mpi", got %s', tostring(opts.algo))
      S.algo = opts.algo
   end
   if S.mode == nil then
      if opts.force or M.launched() then
         load_lib()
         ok(D.nr_dist_init(opts.timeout or -1), 'nr.dist.init')
         S.mode = 'mpi'
         S.rank, S.size = D.nr_dist_rank(), D.nr_dist_size()
         S.local_rank, S.local_size = D.nr_dist_local_rank(), D.nr_dist_local_size()
      else
         S.mode = 'local'
      end
   elseif opts.timeout and D then
      D.nr_dist_set_timeout(opts.timeout)
   end
   if opts.device and opts.device ~= 'cpu' and S.device == 'cpu' and S.mode == 'mpi' then
      check.arg(tostring(opts.device):match('^cuda'), 'nr.dist.init', 'device must be "cpu" or "cuda", got %s', tostring(opts.device))
      local gpu, cuda = gpu_of_rank()
      if cuda and type(cuda.set_device) == 'function' then cuda.set_device(gpu) end
      if D.nr_dist_nccl_init(gpu) ~= 0 then
         -- NCCL needs a GPU of its own per rank: say which one this rank took and why
         local visible = cuda and type(cuda.device_count) == 'function' and cuda.device_count() or 0
         error(string.format('nr.dist.init (%s): %s [this rank took cuda:%d: local rank %d of %d on this host, %d GPU%s ' ..
            'visible; NCCL needs one GPU per rank]', where(), ffi.string(nrffi.C.nr_last_error()), gpu, S.local_rank,
            S.local_size, visible, visible == 1 and '' or 's'), 2)
      end
      S.device, S.gpu = 'cuda', gpu
   end
   return S.rank, S.size
end

-- libnr_dist's FFI namespace (core/nr.h's nr_dist_* entry points), nil before MPI is up: for
-- tests and for code that drives the started collectives (nr_dist_allreduce_start) itself.
function M.lib() return D end
function M.initialized() return S.mode ~= nil end
function M.active() return S.mode == 'mpi' and S.size > 1 end
function M.rank() return S.rank end
function M.size() return S.size end
function M.local_rank() return S.local_rank end
function M.local_size() return S.local_size end
function M.is_main() return S.rank == 0 end
function M.has_nccl() return S.mode == 'mpi' and D.nr_dist_has_nccl() == 1 end

-- Wall-clock seconds (monotonic).
function M.time()
   if D then return D.nr_dist_wtime() end
   return require('nr.progress').now()
end

function M.set_timeout(seconds)
   check_timeout(seconds, 'nr.dist.set_timeout', 'seconds')
   check.type(seconds, 'number', 'nr.dist.set_timeout', 'seconds')
   if D then D.nr_dist_set_timeout(seconds) end
end

function M.barrier()
   need_init('nr.dist.barrier')
   if S.mode == 'mpi' then ok(D.nr_dist_barrier(), 'nr.dist.barrier') end
end

-- Prints "nrlua rank r/N: message" and ends every rank of the job (MPI_Abort). Outside MPI it
-- raises the message as an error.
function M.abort(message, code)
   message = tostring(message or 'aborted')
   if S.mode == 'mpi' then
      io.stdout:flush()
      D.nr_dist_abort(code or 1, message)
   end
   error(message, 2)
end

-- Runs fn(...) and, if it raises, prints the error with the rank and aborts the whole job.
function M.guard(fn, ...)
   local res = {xpcall(fn, debug.traceback, ...)}
   if not res[1] then M.abort(res[2], 1) end
   return unpack(res, 2, table.maxn(res))
end

-- ---- collectives on tensors ----------------------------------------------------------------

local function algo_for(t, algo)
   if t:is_cuda() then
      if algo == 'ordered' or algo == 'mpi' then return ALGOS[algo], true end -- staged through the host
      return ALGOS.nccl, false
   end
   algo = algo or S.algo
   check.arg(ALGOS[algo] and algo ~= 'nccl', 'nr.dist.allreduce', 'algo %s is not usable for CPU tensors (ordered, mpi)', tostring(algo))
   return ALGOS[algo], false
end

-- Every rank's list (the same length on every rank) as rows, rank 0 first; fname names the
-- caller in errors (a timeout says which collective a rank waited in).
local function gather_rows(list, fname)
   local n = #list
   local inb = ffi.new('double[?]', math.max(n, 1))
   local out = ffi.new('double[?]', math.max(n, 1) * S.size)
   for i = 1, n do inb[i - 1] = list[i] end
   ok(D.nr_dist_allgather_f64(inb, n, out), fname)
   local res = {}
   for r = 0, S.size - 1 do
      local row = {}
      for i = 1, n do row[i] = out[r * n + i - 1] end
      res[r + 1] = row
   end
   return res
end

local DTYPE_CODE = {float32 = 0, int64 = 1}

-- The reduction of allreduce, without its agreement check (SyncBN and sync_buffers reduce
-- tensors whose sizes agree by construction, every step).
local function reduce(t, op, algo_name)
   if S.mode ~= 'mpi' or S.size == 1 then return t end
   local algo, stage = algo_for(t, algo_name)
   local x = t
   if stage then x = t:cpu() elseif not t:is_contiguous() then x = t:clone() end
   local scale = (op == 'mean') and 1 / S.size or 1
   ok(D.nr_dist_allreduce(x.c, OPS[op], algo, scale), 'nr.dist.allreduce')
   if x ~= t then t:copy(x) end
   return t
end

-- t <- op over ranks of t, in place. opts: op = 'sum' | 'mean' (default) | 'max' | 'min',
-- algo = 'ordered' | 'mpi' (CPU) | 'nccl' (GPU; 'ordered' on a GPU tensor stages through the host).
-- Every rank's tensor must have the same number of elements and dtype: checked first (one small
-- collective), so a mismatch is the same error on every rank (it truncated on one rank and gave
-- another garbage). The checks of a run on N ranks hold in one process too.
function M.allreduce(t, opts)
   check.arg(T.is_tensor(t), 'nr.dist.allreduce', 'expected a tensor, got %s', type(t))
   opts = check.options(opts, {op = true, algo = true}, 'nr.dist.allreduce')
   local op = opts.op or 'mean'
   check.arg(OPS[op] ~= nil, 'nr.dist.allreduce', 'op must be sum, mean, max or min, got %s', tostring(op))
   local code = DTYPE_CODE[t:dtype()]
   check.arg(code ~= nil, 'nr.dist.allreduce', 'takes float32 or int64 tensors, got %s', t:dtype())
   check.arg(not (code == 1 and op == 'mean'), 'nr.dist.allreduce',
      'an int64 tensor takes op sum, max or min (its mean would not be an integer)')
   need_init('nr.dist.allreduce')
   if S.mode ~= 'mpi' or S.size == 1 then return t end
   local rows = gather_rows({t:numel(), code}, 'nr.dist.allreduce')
   for r = 2, #rows do
      if rows[r][1] ~= rows[1][1] or rows[r][2] ~= rows[1][2] then
         local parts = {}
         for q, row in ipairs(rows) do
            parts[q] = string.format('rank %d %d elements (%s)', q - 1, row[1], row[2] == 1 and 'int64' or 'float32')
         end
         error('nr.dist.allreduce: the ranks\' tensors differ: ' .. table.concat(parts, ', '), 2)
      end
   end
   return reduce(t, op, opts.algo)
end

-- t <- root's t, in place (same shape and dtype on every rank).
function M.broadcast(t, root)
   check.arg(T.is_tensor(t), 'nr.dist.broadcast', 'expected a tensor, got %s', type(t))
   root = root or 0
   need_init('nr.dist.broadcast')
   check.arg(type(root) == 'number' and root >= 0 and root < S.size and root == math.floor(root), 'nr.dist.broadcast',
      'root %s outside 0..%d', tostring(root), S.size - 1)
   if S.mode ~= 'mpi' or S.size == 1 then return t end
   local x = t:is_contiguous() and t or t:clone()
   if x:is_cuda() and not M.has_nccl() then x = x:cpu() end
   ok(D.nr_dist_broadcast(x.c, root), 'nr.dist.broadcast')
   if x ~= t then t:copy(x) end
   return t
end

-- ---- collectives on Lua values -------------------------------------------------------------

-- Every rank's list of numbers: {[1] = rank 0's list, [2] = rank 1's, ...}.
function M.allgather_numbers(list)
   check.type(list, 'table', 'nr.dist.allgather_numbers', 'list')
   local n = #list
   for i = 1, n do
      check.arg(type(list[i]) == 'number', 'nr.dist.allgather_numbers', 'list[%d] is a %s, not a number', i, type(list[i]))
   end
   need_init('nr.dist.allgather_numbers')
   if S.mode ~= 'mpi' or S.size == 1 then return {{unpack(list)}} end
   -- the lengths first: lists of different lengths misread each other's numbers on some ranks and
   -- truncated on others; now every rank raises the same error
   local lens = gather_rows({n}, 'nr.dist.allgather_numbers')
   for r = 2, #lens do
      if lens[r][1] ~= lens[1][1] then
         local parts = {}
         for q, row in ipairs(lens) do parts[q] = string.format('rank %d %d', q - 1, row[1]) end
         error('nr.dist.allgather_numbers: the ranks\' lists differ in length: ' .. table.concat(parts, ', '), 0)
      end
   end
   return gather_rows(list, 'nr.dist.allgather_numbers')
end

-- Element-wise reduction of a list of numbers over ranks, in rank order (deterministic).
-- op: 'sum', 'mean' (default), 'max', 'min'.
function M.allreduce_numbers(list, op)
   op = op or 'mean'
   check.arg(OPS[op] ~= nil, 'nr.dist.allreduce_numbers', 'op must be sum, mean, max or min, got %s', tostring(op))
   local rows = M.allgather_numbers(list)
   local out = {}
   for i = 1, #list do
      local acc = rows[1][i]
      for r = 2, #rows do
         local v = rows[r][i]
         if op == 'max' then acc = math.max(acc, v) elseif op == 'min' then acc = math.min(acc, v) else acc = acc + v end
      end
      out[i] = op == 'mean' and acc / #rows or acc
   end
   return out
end

-- Deterministic text for plain Lua values (numbers, strings, booleans, nested tables).
local function serialize(v, seen, path)
   local tv = type(v)
   if tv == 'number' then
      if v ~= v then return '(0/0)' end
      if v == math.huge then return '(1/0)' end
      if v == -math.huge then return '(-1/0)' end
      return string.format('%.17g', v)
   elseif tv == 'string' then
      return string.format('%q', v)
   elseif tv == 'boolean' or tv == 'nil' then
      return tostring(v)
   elseif tv == 'table' then
      if T.is_tensor(v) then
         error('nr.dist.broadcast_object: ' .. path .. ' is a tensor; broadcast tensors with nr.dist.broadcast', 0)
      end
      if seen[v] then error('nr.dist.broadcast_object: ' .. path .. ' is a cycle', 0) end
      seen[v] = true
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = k end
      table.sort(keys, function(a, b)
         local ta, tb = type(a), type(b)
         if ta ~= tb then return ta < tb end
         if ta == 'number' or ta == 'string' then return a < b end
         return tostring(a) < tostring(b)
      end)
      local parts = {}
      for _, k in ipairs(keys) do
         parts[#parts + 1] = '[' .. serialize(k, seen, path) .. ']=' .. serialize(v[k], seen, path .. '.' .. tostring(k))
      end
      seen[v] = nil
      return '{' .. table.concat(parts, ',') .. '}'
   end
   error('nr.dist.broadcast_object: ' .. path .. ' is a ' .. tv .. ' (only numbers, strings, booleans and tables travel)', 0)
end
M._serialize = serialize

-- Root's value of obj (plain Lua data), on every rank; the other ranks' obj is ignored.
function M.broadcast_object(obj, root)
   root = root or 0
   need_init('nr.dist.broadcast_object')
   if S.mode ~= 'mpi' or S.size == 1 then
      serialize(obj, {}, 'object') -- what would not travel on N ranks is refused in one process too
      return obj
   end
   -- the root's text, or its error: a value that cannot travel is the same error on every rank
   -- (a negative length carries it), not a timeout on the others
   local text, failed = '', false
   if S.rank == root then
      local okay, res = pcall(serialize, obj, {}, 'object')
      text, failed = okay and ('return ' .. res) or tostring(res), not okay
   end
   -- (out-parameters are fresh per call: see nr.tensor's double1)
   local len_buf = ffi.new('int64_t[1]', failed and -#text or #text)
   ok(D.nr_dist_broadcast_bytes(len_buf, 8, root), 'nr.dist.broadcast_object')
   local n = tonumber(len_buf[0])
   local bad = n < 0
   n = math.abs(n)
   local buf = ffi.new('uint8_t[?]', math.max(n, 1))
   if S.rank == root then ffi.copy(buf, text, n) end
   ok(D.nr_dist_broadcast_bytes(buf, n, root), 'nr.dist.broadcast_object')
   if bad then error(ffi.string(buf, n) .. (S.rank ~= root and (' (on rank ' .. root .. ')') or ''), 2) end
   if S.rank == root then return obj end
   local chunk, err = loadstring(ffi.string(buf, n), '=broadcast')
   if not chunk then error('nr.dist.broadcast_object: cannot read rank ' .. root .. "'s value: " .. tostring(err), 2) end
   setfenv(chunk, {})
   return chunk()
end

-- Runs fn(...) on rank 0 only and returns its results on every rank (plain Lua data). This is
-- how decisions that must agree are made (NR's utilization, λ, which channels to keep). If fn
-- raises on rank 0, every rank raises the same error, so no rank is left waiting.
function M.decide(fn, ...)
   check.type(fn, 'function', 'nr.dist.decide', 'fn')
   need_init('nr.dist.decide')
   if S.mode ~= 'mpi' or S.size == 1 then return fn(...) end
   local payload
   if S.rank == 0 then
      local res = {pcall(fn, ...)}
      local n = table.maxn(res)
      if res[1] then
         local vals = {}
         for i = 2, n do vals[i - 1] = res[i] end
         payload = {ok = true, n = n - 1, values = vals}
         local sok, err = pcall(serialize, payload, {}, 'result')
         if not sok then payload = {ok = false, err = tostring(err)} end
      else
         payload = {ok = false, err = tostring(res[2])}
      end
   end
   payload = M.broadcast_object(payload, 0)
   if not payload.ok then error('nr.dist.decide: the decision failed on rank 0: ' .. payload.err, 2) end
   return unpack(payload.values, 1, payload.n)
end

-- ---- model state: broadcast and consistency --------------------------------------------------

local function sorted_keys(t)
   local ks = {}
   for k in pairs(t) do ks[#ks + 1] = k end
   table.sort(ks)
   return ks
end

-- {name, t = tensor, param?, key?} for every parameter, buffer and (optionally) optimizer state
-- tensor; an optimizer's number state (Adam's per-parameter step) as {name, v = number, param, key}.
local function state_tensors(model, optimizer)
   local out = {}
   for _, e in ipairs(model:namedParameters()) do out[#out + 1] = {name = e.name, t = e.param} end
   for _, e in ipairs(model:namedBuffers()) do out[#out + 1] = {name = e.name, t = e.tensor} end
   if optimizer and optimizer.state_of then
      for _, e in ipairs(model:namedParameters()) do
         local st = optimizer:state_of(e.param)
         if st then
            for _, k in ipairs(sorted_keys(st)) do
               local v = st[k]
               if T.is_tensor(v) then
                  out[#out + 1] = {name = 'optim:' .. e.name .. '.' .. k, t = v, param = e.param, key = k, pname = e.name}
               elseif type(v) == 'number' then
                  out[#out + 1] = {name = 'optim:' .. e.name .. '.' .. k, v = v, param = e.param, key = k, pname = e.name}
               end
            end
         end
      end
   end
   return out
end

local function describe_entry(e) return string.format('%s %s [%s]', e.name, e.t:dtype(), table.concat(e.t:shape(), ' x ')) end

-- Rank root's parameters and buffers (and optimizer state with opts.optimizer) copied to every
-- rank, in place. The structures must agree (names, shapes, dtypes): if not, every rank raises an
-- error naming the first difference. Optimizer state that only root has is created elsewhere;
-- its numbers (Adam's step) are root's everywhere.
function M.broadcast_model(model, opts)
   check.arg(type(model) == 'table' and type(model.namedParameters) == 'function', 'nr.dist.broadcast_model', 'model must be an nr.nn module')
   opts = check.options(opts, {root = true, optimizer = true}, 'nr.dist.broadcast_model')
   local root = opts.root or 0
   need_init('nr.dist.broadcast_model')
   if S.mode ~= 'mpi' or S.size == 1 then return model end
   local mine = state_tensors(model, nil)
   local sig = {}
   for i, e in ipairs(mine) do sig[i] = describe_entry(e) end
   local opt_sig = {}
   if opts.optimizer then
      for _, e in ipairs(state_tensors(model, opts.optimizer)) do
         if e.key then opt_sig[#opt_sig + 1] = {name = e.name, pname = e.pname, key = e.key, shape = e.t and e.t:shape(), value = e.v} end
      end
   end
   local theirs = M.broadcast_object({sig = sig, opt = opt_sig}, root)
   local problem = 0
   local msg
   if #theirs.sig ~= #sig then
      problem, msg = 1, string.format('rank %d has %d tensors, rank %d has %d', S.rank, #sig, root, #theirs.sig)
   else
      for i = 1, #sig do
         if sig[i] ~= theirs.sig[i] then
            problem, msg = 1, string.format('rank %d has %s where rank %d has %s', S.rank, sig[i], root, theirs.sig[i])
            break
         end
      end
   end
   local flags = M.allgather_numbers({problem})
   for r = 1, #flags do
      if flags[r][1] ~= 0 then
         error(string.format('nr.dist.broadcast_model (%s): the models differ in structure (first: rank %d): %s', where(), r - 1,
            msg or 'see that rank\'s error'), 2)
      end
   end
   for _, e in ipairs(mine) do M.broadcast(e.t, root) end
   if opts.optimizer then
      local params = {}
      for _, e in ipairs(model:namedParameters()) do params[e.name] = e.param end
      -- state that root does not have is dropped here
      local on_root = {}
      for _, o in ipairs(theirs.opt) do on_root[o.pname] = true end
      for name, p in pairs(params) do
         if not on_root[name] and opts.optimizer:state_of(p) then opts.optimizer:set_state_of(p, nil) end
      end
      for _, o in ipairs(theirs.opt) do
         if o.shape then
            local p = params[o.pname]
            local st = opts.optimizer:state_of(p) or {}
            local t = st[o.key]
            if not t then
               t = T.zeros(o.shape, {device = p:device()})
               st[o.key] = t
               opts.optimizer:set_state_of(p, st)
               t = opts.optimizer:state_of(p)[o.key]
            end
            M.broadcast(t, root)
         end
      end
      -- numbers after the tensors (a state is kept only with its buffers)
      for _, o in ipairs(theirs.opt) do
         if o.value ~= nil then
            local p = params[o.pname]
            local st = opts.optimizer:state_of(p)
            st[o.key] = o.value
            opts.optimizer:set_state_of(p, st)
         end
      end
   end
   return model
end

-- Makes the buffers (BatchNorm running statistics) agree on every rank: mode 'mean' (default)
-- averages float buffers over ranks (ordered: the same bits everywhere) and broadcasts the
-- others from rank 0; mode 'broadcast' copies rank 0's. Each rank's BatchNorm normalises with its
-- own batch statistics while training (per-rank BN); only the running estimates are merged.
function M.sync_buffers(model, mode)
   mode = mode or 'mean'
   check.arg(mode == 'mean' or mode == 'broadcast', 'nr.dist.sync_buffers', 'mode must be "mean" or "broadcast", got %s', tostring(mode))
   need_init('nr.dist.sync_buffers')
   if S.mode ~= 'mpi' or S.size == 1 then return model end
   for _, e in ipairs(model:namedBuffers()) do
      if mode == 'mean' and e.tensor:dtype() == 'float32' then
         reduce(e.tensor, 'mean', 'ordered')
      else
         M.broadcast(e.tensor, 0)
      end
   end
   return model
end


local have_lib -- libnr_dist loadable (for hashing without MPI running)

local function fingerprint_of(t)
   local x = t:is_cuda() and t:cpu() or t
   if have_lib == nil then have_lib = D ~= nil or (pcall(load_lib)) end
   if not have_lib then
      -- no libnr_dist (built without MPI): the same hash in Lua, over 32-bit words
      local c = x:contiguous()
      local n, es = c:numel(), ({float32 = 4, int64 = 8, uint8 = 1})[c:dtype()]
      local p = ffi.cast('uint8_t *', c:data()) -- (c:data() keeps c alive while p is reachable)
      local hi, lo = 0x12345, n % 4294967296
      for i = 0, n * es - 1 do
         lo = (lo * 31 + p[i]) % 4294967296
         hi = (hi * 37 + lo) % 4294967296
      end
      return hi, lo
   end
   local hash_buf = ffi.new('uint64_t[1]')
   ok(D.nr_dist_fingerprint(x.c, hash_buf), 'nr.dist.fingerprint', 3)
   local h = hash_buf[0]
   -- two exact halves (doubles hold 53 bits)
   return tonumber(h / 4294967296ULL), tonumber(h % 4294967296ULL)
end

-- An entry's hash pair: a tensor's fingerprint, a number itself (a whole step count < 2^32).
local function entry_hash(e)
   if e.t then return fingerprint_of(e.t) end
   return e.v % 4294967296, 0
end

-- Hex fingerprint of a model's parameters and buffers (and optimizer state) on this rank.
function M.fingerprint(model, optimizer)
   local hi, lo = 0, 0
   for _, e in ipairs(state_tensors(model, optimizer)) do
      local a, b = entry_hash(e)
      hi = (hi * 31 + a) % 4294967296
      lo = (lo * 37 + b + #e.name) % 4294967296
   end
   return string.format('%08x%08x', hi, lo)
end

-- Raises on every rank unless all ranks hold bit-identical parameters and buffers (and optimizer
-- state with opts.optimizer); the message names the first differing tensor. Returns the
-- fingerprint. what: a label for the message ("after rejuvenation 2").
function M.assert_same(model, what, opts)
   opts = opts or {}
   local fp = M.fingerprint(model, opts.optimizer)
   if S.mode ~= 'mpi' or S.size == 1 then return fp end
   local hi, lo = tonumber(fp:sub(1, 8), 16), tonumber(fp:sub(9, 16), 16)
   local rows = M.allgather_numbers({hi, lo})
   local bad = {}
   for r = 2, #rows do
      if rows[r][1] ~= rows[1][1] or rows[r][2] ~= rows[1][2] then bad[#bad + 1] = r - 1 end
   end
   if #bad == 0 then return fp end
   -- find the first tensor that differs (per-tensor hashes, gathered)
   local entries = state_tensors(model, opts.optimizer)
   local mine = {}
   for _, e in ipairs(entries) do
      local a, b = entry_hash(e)
      mine[#mine + 1] = a
      mine[#mine + 1] = b
   end
   local all = M.allgather_numbers(mine)
   local first = '?'
   for i = 1, #entries do
      for r = 2, #all do
         if all[r][2 * i - 1] ~= all[1][2 * i - 1] or all[r][2 * i] ~= all[1][2 * i] then first = entries[i].name; break end
      end
      if first ~= '?' then break end
   end
   error(string.format('nr.dist.assert_same (%s)%s: ranks %s hold different weights than rank 0 (first difference: %s)',
      where(), what and (' ' .. what) or '', table.concat(bad, ', '), first), 2)
end

-- ---- synchronized BatchNorm -------------------------------------------------------------------
--
-- By default each rank's BatchNorm2d normalises with its own batch's statistics (per-rank BN;
-- running estimates merged by sync_buffers). nr.dist.sync_batchnorm(model) turns every
-- BatchNorm2d into a synchronized one: in training, the per-channel mean and variance are those
-- of the whole step's batch over all ranks (two collectives: Σx and the count, then Σ(x-mean)²,
-- exact two-pass variance), and backward combines Σdy and Σdy·x̂ over ranks, so N ranks compute
-- what one process computes on the combined batch. Evaluation uses the running statistics as
-- usual. The modules keep their type name (BatchNorm2d: NR, counting and checkpoints see no
-- difference) and their tensors; extra() shows "sync". Cost: 3 small allreduces (2C+1, C, 2C
-- numbers) per BN layer per step, and a few temporaries the size of the input.

local SyncBN

local function syncbn_class()
   if SyncBN then return SyncBN end
   local class = require 'nr.class'
   local BN = require('nr.nn.batchnorm').BatchNorm2d
   SyncBN = class('BatchNorm2d', BN)
   SyncBN.dist_sync = true
   SyncBN.__tostring = BN.__tostring
   SyncBN.__call = BN.__call

   function SyncBN:extra() return BN.extra(self) .. ' sync' end

   -- (C) numbers -> (1, C, 1, 1) tensor on device
   local function bcast4(list, device)
      local t = T.tensor(list):reshape(1, #list, 1, 1)
      if device ~= 'cpu' then t = t:to(device) end
      return t
   end
   -- per-channel sums of a (N, C, H, W) tensor, summed over ranks: a Lua list of C numbers,
   -- plus extra numbers appended to the same collective
   local function channel_sums(t, extra)
      local c = t:size(2)
      local s = t:sum(1):sum(3):sum(4):reshape(c)
      local buf = T.empty({c + #extra})
      buf:narrow(1, 1, c):copy(s)
      for i, v in ipairs(extra) do buf:set(c + i, v) end
      reduce(buf, 'sum', 'ordered')
      return buf:totable()
   end

   function SyncBN:updateOutput(x)
      if not self.train or S.mode ~= 'mpi' or S.size == 1 then
         self._sync = false
         return BN.updateOutput(self, x)
      end
      check.arg(T.is_tensor(x) and x:dim() == 4 and x:size(2) == self.num_features, 'SyncBatchNorm2d',
         'expected input (N, %d, H, W), got %s', self.num_features, T.is_tensor(x) and x:describe() or type(x))
      self._sync = true
      -- no fused ReLU here: the parent Sequential then runs the ReLU module itself
      self._fuse_relu, self._relu_fused = nil, false
      local c, dev, dtype = self.num_features, x:device(), x:dtype()
      x = x:float() -- statistics and normalisation in f32 (a bf16 input is converted; f32 is x itself)
      local s1 = channel_sums(x, {x:size(1) * x:size(3) * x:size(4)})
      local m = s1[c + 1]
      local mean = {}
      for i = 1, c do mean[i] = s1[i] / m end
      local mean4 = bcast4(mean, dev)
      local xc = x:sub(mean4)
      local s2 = channel_sums(xc:square(), {})
      local gamma = self.weight and self.weight:cpu():totable()
      local beta = self.bias and self.bias:cpu():totable()
      local invstd, scale, shift, var, uvar = {}, {}, {}, {}, {}
      for i = 1, c do
         var[i] = s2[i] / m
         uvar[i] = m > 1 and s2[i] / (m - 1) or var[i]
         invstd[i] = 1 / math.sqrt(var[i] + self.eps)
         scale[i] = (gamma and gamma[i] or 1) * invstd[i]
         shift[i] = beta and beta[i] or 0
      end
      local mom = self.momentum
      self.running_mean:mul_(1 - mom):add_(T.tensor(mean):to(self.running_mean:device()):mul_(mom))
      self.running_var:mul_(1 - mom):add_(T.tensor(uvar):to(self.running_var:device()):mul_(mom))
      self._xc, self._invstd4, self._scale4, self._count = xc, bcast4(invstd, dev), bcast4(scale, dev), m
      self.output = xc:mul(self._scale4):add_(bcast4(shift, dev)):to(dev, dtype)
      return self.output
   end

   function SyncBN:updateGradInput(x, gradOutput)
      if not self._sync then return BN.updateGradInput(self, x, gradOutput) end
      local c, dev, m = self.num_features, x:device(), self._count
      local g = gradOutput:float():contiguous()
      local xhat = self._xc:mul(self._invstd4)
      local gx = g:mul(xhat)
      -- local contributions to dβ, dγ (the gradient reducer averages them over ranks)
      self._dbeta = g:sum(1):sum(3):sum(4):reshape(c)
      self._dgamma = gx:sum(1):sum(3):sum(4):reshape(c)
      local c2 = T.empty({2 * c})
      c2:narrow(1, 1, c):copy(self._dbeta)
      c2:narrow(1, c + 1, c):copy(self._dgamma)
      reduce(c2, 'sum', 'ordered')
      local v = c2:totable()
      local a, b = {}, {}
      for i = 1, c do a[i], b[i] = v[i] / m, v[c + i] / m end
      -- dx = γ invstd (dy - mean(dy) - x̂ mean(dy x̂)), means over the whole step's batch
      local dx = g:sub(bcast4(a, dev)):sub_(xhat:mul_(bcast4(b, dev))):mul_(self._scale4)
      self.gradInput = dx:to(dev, gradOutput:dtype())
      return dx
   end

   -- synchronized: the two-step backward above (BN's one-pass gradients() is per-rank only)
   function SyncBN:gradients(x, gradOutput, scale)
      if not self._sync then return BN.gradients(self, x, gradOutput, scale) end
      return require('nr.nn.module').gradients(self, x, gradOutput, scale)
   end

   function SyncBN:accGradParameters(x, gradOutput, scale)
      if not self._sync then return BN.accGradParameters(self, x, gradOutput, scale) end
      if not self.weight then return end
      self.gradWeight:add_(self._dgamma:mul(scale or 1))
      self.gradBias:add_(self._dbeta:mul(scale or 1))
   end
   return SyncBN
end

-- Turns every BatchNorm2d of model into a synchronized one (in place; the same tensors, the
-- same type name). Returns model and the number converted. Needs every rank to run every BN
-- layer's forward and backward in the same order (always true for data-parallel replicas).
function M.sync_batchnorm(model)
   check.arg(type(model) == 'table' and type(model.listModules) == 'function', 'nr.dist.sync_batchnorm', 'model must be an nr.nn module')
   local cls = syncbn_class()
   local BN = require('nr.nn.batchnorm').BatchNorm2d
   local n = 0
   for _, m in ipairs(model:listModules()) do
      if getmetatable(m) == BN then
         setmetatable(m, cls)
         n = n + 1
      end
   end
   return model, n
end

-- ---- gradient reduction in buckets ---------------------------------------------------------
--
-- The gradients are packed, in reverse parameter order (the order backward completes them), into
-- flat bucket buffers of at most bucket_mb MiB; each bucket is reduced with one collective and
-- unpacked. overlap = true starts a bucket as soon as the backward of every module it holds has
-- run (per-module hooks installed on the leaf modules), so communication runs while backward
-- continues; the buckets are then finished in after_backward. Without overlap every bucket is
-- started in after_backward and they are waited in order (each bucket's copy-out overlaps the
-- next ones' transfers). The layout is rebuilt when the model's parameters change (surgery).

local Reducer = {}
Reducer.__index = Reducer

local HOOKED = setmetatable({}, {__mode = 'k'}) -- module -> reducer (weak: clones are not hooked)


-- nr.dist.GradReducer(model, {bucket_mb = 25, algo = 'ordered'|'mpi'|'nccl', overlap = false,
-- average = true})
function M.GradReducer(model, opts)
   check.arg(type(model) == 'table' and type(model.namedParameters) == 'function', 'nr.dist.GradReducer', 'model must be an nr.nn module')
   opts = check.options(opts, {bucket_mb = true, algo = true, overlap = true, average = true}, 'nr.dist.GradReducer')
   local self = setmetatable({model = model, bucket_bytes = math.floor((opts.bucket_mb or 25) * 1048576),
                              algo = opts.algo, overlap = opts.overlap and true or false,
                              average = opts.average ~= false, rebuilds = 0, started_in_backward = 0}, Reducer)
   check.arg(self.bucket_bytes > 0, 'nr.dist.GradReducer', 'bucket_mb must be > 0')
   self:build()
   return self
end

function Reducer:build()
   local named = self.model:namedParameters()
   local buckets, cur = {}, nil
   local entries = {}
   for i = #named, 1, -1 do
      local e = named[i]
      local g = e.grad
      if g then
         check.arg(g:is_contiguous(), 'nr.dist.GradReducer', 'gradient of %s is not contiguous', e.name)
         local key = g:device() .. ':' .. g:dtype()
         local bytes = g:numel() * 4
         if not cur or cur.key ~= key or (cur.bytes + bytes > self.bucket_bytes and #cur.slots > 0) then
            cur = {key = key, bytes = 0, numel = 0, slots = {}, device = g:device(), dtype = g:dtype()}
            buckets[#buckets + 1] = cur
         end
         local gfield = e.field == 'weight' and 'gradWeight' or e.field == 'bias' and 'gradBias' or nil
         local slot = {name = e.name, grad = g, param = e.param, module = e.module, field = e.field, gfield = gfield,
                       offset = cur.numel, n = g:numel(), bucket = cur}
         cur.slots[#cur.slots + 1] = slot
         cur.numel = cur.numel + slot.n
         cur.bytes = cur.bytes + bytes
         entries[#entries + 1] = slot
      end
   end
   for bi, b in ipairs(buckets) do
      b.index = bi
      b.flat = T.empty({math.max(b.numel, 1)}, {device = b.device, dtype = b.dtype})
      b.algo, b.stage = ALGOS.ordered, false
      if S.mode == 'mpi' then b.algo, b.stage = algo_for(b.flat, self.algo) end
      if b.stage then b.host = T.empty({math.max(b.numel, 1)}, {dtype = b.dtype}) end
      for _, s in ipairs(b.slots) do s.view = b.flat:narrow(1, s.offset + 1, s.n):view(s.grad:shape()) end
   end
   self.buckets, self.entries = buckets, entries
   self.by_module = {}
   for _, s in ipairs(entries) do
      if s.module then
         local l = self.by_module[s.module] or {}
         l[#l + 1] = s
         self.by_module[s.module] = l
      end
   end
   self.rebuilds = self.rebuilds + 1
   self:_reset()
   if self.overlap then
      -- a gradient two modules add to (weight tying: a twin, or a weight assigned to two layers)
      -- may be sent when the first one's backward ends, before the other has added its part
      local holder = {}
      for _, m in ipairs(self.model:listModules()) do
         if not m.modules then
            local _, grads = m:parameters()
            for _, g in ipairs(grads) do
               if holder[g] and holder[g] ~= m then
                  error(string.format('nr.dist.GradReducer: overlap needs each gradient written by one layer, but %s '
                     .. 'and %s share one (weight tying); use overlap = false', holder[g]:path(), m:path()), 0)
               end
               holder[g] = m
            end
         end
      end
      self:_hook()
   end
end

-- Layout summary, the same on every rank for the same model.
function Reducer:layout()
   local parts = {}
   for _, b in ipairs(self.buckets) do parts[#parts + 1] = string.format('%s:%d/%d', b.key, b.numel, #b.slots) end
   return table.concat(parts, ' ')
end

-- True when the model's parameters or gradients are no longer the tensors the buckets hold
-- (surgery replaces tensors, and may replace whole modules).
function Reducer:stale()
   local named = self.model:namedParameters()
   local k = 0
   for i = #named, 1, -1 do
      local e = named[i]
      if e.grad then
         k = k + 1
         local s = self.entries[k]
         if not s or s.param ~= e.param or s.grad ~= e.grad or not T.same_shape(s.grad:shape(), s.param:shape()) then return true end
      end
   end
   return k ~= #self.entries
end

function Reducer:_reset()
   for _, b in ipairs(self.buckets) do
      b.remaining = #b.slots
      b.handle = nil
      for _, s in ipairs(b.slots) do s.ready = false end
   end
   self.broken = false
end

function Reducer:_hook()
   for mod in pairs(self.by_module) do
      HOOKED[mod] = self
      if rawget(mod, 'backward') == nil then
         local cls_backward = getmetatable(mod).backward
         rawset(mod, 'backward', function(m, x, g, scale)
            local gi = cls_backward(m, x, g, scale)
            local r = HOOKED[m]
            if r then r:_ready(m) end
            return gi
         end)
      end
   end
end

-- Removes the per-module hooks (the model is then as before).
function Reducer:unhook()
   for mod in pairs(self.by_module or {}) do
      if HOOKED[mod] == self then
         HOOKED[mod] = nil
         rawset(mod, 'backward', nil)
      end
   end
end

function Reducer:_start(b)
   for _, s in ipairs(b.slots) do s.view:copy(s.grad) end
   local x = b.stage and b.host:copy(b.flat) or b.flat
   local scale = self.average and 1 / S.size or 1
   local handle_buf = ffi.new('int32_t[1]')
   ok(D.nr_dist_allreduce_start(x.c, OPS.sum, b.algo, scale, handle_buf), 'nr.dist.GradReducer', 3)
   b.handle = handle_buf[0]
end

-- Called by the per-module hook when m's backward has run (its gradients are complete).
function Reducer:_ready(m)
   if self.broken or S.mode ~= 'mpi' or S.size == 1 then return end
   for _, s in ipairs(self.by_module[m] or {}) do
      if s.module[s.gfield] ~= s.grad or s.module[s.field] ~= s.param then
         self.broken = true -- surgery since the layout was built: after_backward rebuilds
         return
      end
      if s.ready then
         error(string.format('nr.dist.GradReducer: %s received gradients twice in one backward; ' ..
            'overlap needs each module used once per step (use overlap = false)', s.name), 0)
      end
      s.ready = true
      s.bucket.remaining = s.bucket.remaining - 1
   end
   -- buckets start in index order on every rank (MPI collectives must match)
   for _, b in ipairs(self.buckets) do
      if b.handle then
         ok(D.nr_dist_test(b.handle, ffi.new('int32_t[1]')), 'nr.dist.GradReducer', 3) -- progress transfers
      elseif b.remaining == 0 then
         self:_start(b)
         self.started_in_backward = self.started_in_backward + 1
      else
         break
      end
   end
end

-- Averages (or sums, average = false) the gradients over ranks, in place. Call once per step,
-- after backward and before the optimizer step.
function Reducer:reduce()
   need_init('nr.dist.GradReducer:reduce')
   if S.mode ~= 'mpi' or S.size == 1 then return end
   if self.broken or self:stale() then
      for _, b in ipairs(self.buckets) do
         if b.handle then ok(D.nr_dist_wait(b.handle), 'nr.dist.GradReducer') end
      end
      self:unhook()
      self:build()
      local rows = M.allgather_numbers({#self.entries, #self.buckets, self.buckets[1] and self.buckets[1].numel or 0})
      for r = 2, #rows do
         if rows[r][1] ~= rows[1][1] or rows[r][2] ~= rows[1][2] or rows[r][3] ~= rows[1][3] then
            error(string.format('nr.dist.GradReducer (%s): rank %d has a different model than rank 0 after a change ' ..
               '(%d vs %d gradients); structural changes must be decided on rank 0 (nr.dist.decide)', where(), r - 1,
               rows[r][1], rows[1][1]), 2)
         end
      end
   end
   for _, b in ipairs(self.buckets) do
      if not b.handle then self:_start(b) end
   end
   for _, b in ipairs(self.buckets) do
      ok(D.nr_dist_wait(b.handle), 'nr.dist.GradReducer')
      b.handle = nil
      if b.stage then b.flat:copy(b.host) end
      for _, s in ipairs(b.slots) do s.grad:copy(s.view) end
   end
   self:_reset()
end

-- ---- trainer integration ---------------------------------------------------------------------

-- Ready-made loaders (recipe.data.train: anything with nbatches() and epoch(e)) are sharded by
-- batches: rank r takes batches r, r + N, r + 2N, ... of the same epoch order, whole and equal
-- ones only (Sharded:nbatches below), so the N batches of a step form the combined batch.
local Sharded = {}
Sharded.__index = Sharded

function M.shard_loader(inner, rank, size)
   check.arg(type(inner) == 'table' and type(inner.nbatches) == 'function' and type(inner.epoch) == 'function',
      'nr.dist.shard_loader', 'expected a loader (nbatches(), epoch(e))')
   return setmetatable({inner = inner, rank = rank or S.rank, nranks = size or S.size, dist_sharded = true}, Sharded)
end

-- Whether a loader's last batch may hold fewer samples than the others (an unknown loader: may).
local function last_batch_short(l)
   local b = tonumber(l.batch)
   local n = (type(l.samples) == 'function' and l:samples()) or (T.is_tensor(l.x) and l.x:size(1)) or nil
   if not b or not n then return true end
   return l:nbatches() * b > n
end

-- Whole, equal batches only, the same count on every rank: each step's gradient is then the mean
-- over ranks of equally sized batch means, i.e. the combined batch's. A short last batch would
-- weigh its few samples like a full batch's, and batches past a multiple of the ranks would
-- leave some ranks without one, so both are skipped (self:skipped() says how many).
function Sharded:nbatches()
   local usable = self.inner:nbatches() - (last_batch_short(self.inner) and 1 or 0)
   return math.floor(math.max(0, usable) / self.nranks)
end
function Sharded:skipped() return self.inner:nbatches() - self:nbatches() * self.nranks end

function Sharded:epoch(e)
   local it, nb, taken, seen = self.inner:epoch(e), self:nbatches(), 0, 0
   return function()
      while taken < nb do
         local x, y = it()
         if x == nil then return nil end
         seen = seen + 1
         if (seen - 1) % self.nranks == self.rank then
            taken = taken + 1
            return x, y
         end
      end
      return nil
   end
end

-- A uint8 batch finished as the inner loader does it (nr.data's output = 'uint8').
function Sharded:normalize(x, out)
   check.arg(type(self.inner.normalize) == 'function', 'nr.dist.shard_loader', 'the inner loader has no normalize(x, out)')
   return self.inner:normalize(x, out)
end

local NULL_STREAM = require('nr.progress').NULL_STREAM

-- ---- recipe agreement ------------------------------------------------------------------------

-- Recipe fields that are each rank's own and may differ: folders, the device index, output
-- streams, thread counts, the wait bound, and what attach itself sets per rank.
local RANK_LOCAL = {out = true, resume = true, overwrite = true, device = true, device_resolved = true,
                    progress = true, threads = true, hooks = true, model_built = true, name = true,
                    ['data.shard'] = true, ['data.root'] = true, ['data.threads'] = true, ['dist.timeout'] = true}
M.RANK_LOCAL = RANK_LOCAL

-- The resolved recipe as a flat, sorted list of {path, text}: numbers to 17 digits, modules by
-- type and size, functions, loaders and other objects by kind only (they cannot be compared).
function M.recipe_fingerprint(rc)
   local flat = {}
   local function show(v)
      local tv = type(v)
      -- (NaN and -0 print differently from run to run or from 0: shown by what they are)
      if tv == 'number' then return v ~= v and 'nan' or v == 0 and '0' or string.format('%.17g', v) end
      if tv == 'string' then return string.format('%q', v) end
      if tv == 'table' and type(v.forward) == 'function' then
         local okn, n = pcall(v.nParameters, v)
         local okt, ty = pcall(v.typename, v)
         return string.format('<module %s, %s parameters>', okt and tostring(ty) or '?', okn and tostring(n) or '?')
      end
      if tv == 'table' and T.is_tensor(v) then return '<tensor ' .. table.concat(v:shape(), 'x') .. '>' end
      if tv == 'table' and (type(v.nbatches) == 'function' or type(v.write) == 'function') then return '<object>' end
      if tv == 'table' then return nil end -- walked
      if tv == 'function' or tv == 'userdata' or tv == 'cdata' then return '<' .. tv .. '>' end
      return tostring(v)
   end
   local function walk(v, path, seen)
      if path ~= '' and RANK_LOCAL[path] then return end
      local text = show(v)
      if text then flat[#flat + 1] = {path, text}; return end
      if seen[v] then flat[#flat + 1] = {path, '<cycle>'}; return end
      seen[v] = true
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = k end
      table.sort(keys, function(a, b)
         if type(a) == type(b) and (type(a) == 'number' or type(a) == 'string') then return a < b end
         return type(a) < type(b)
      end)
      if #keys == 0 then flat[#flat + 1] = {path, '{}'} end
      for _, k in ipairs(keys) do
         walk(v[k], path == '' and tostring(k) or (path .. '.' .. tostring(k)), seen)
      end
      seen[v] = nil
   end
   walk(rc, '', {})
   return flat
end

-- Fails on every rank, with the same message, when some rank's text differs; bad is this
-- rank's message or nil. The first rank (in rank order) that differs tells the others.
local function fail_together(bad, fname)
   local rows = M.allgather_numbers({bad and 1 or 0})
   for r, row in ipairs(rows) do
      if row[1] ~= 0 then
         local msg = M.broadcast_object(bad or '', r - 1)
         error(string.format('%s (%s): %s', fname, where(), msg), 0)
      end
   end
end

-- Every rank's resolved recipe must equal rank 0's, except the per-rank fields (RANK_LOCAL).
-- Raises on every rank, naming the first differing field and both values.
function M.assert_same_recipe(rc)
   if not M.active() then return end
   local mine = M.recipe_fingerprint(rc or {})
   local theirs = M.broadcast_object(mine, 0)
   local bad
   if S.rank ~= 0 then
      local a, b = {}, {}
      local paths, seen = {}, {}
      for _, e in ipairs(theirs) do a[e[1]] = e[2]; if not seen[e[1]] then seen[e[1]] = true; paths[#paths + 1] = e[1] end end
      for _, e in ipairs(mine) do b[e[1]] = e[2]; if not seen[e[1]] then seen[e[1]] = true; paths[#paths + 1] = e[1] end end
      table.sort(paths)
      local exempt = {}
      for k in pairs(RANK_LOCAL) do exempt[#exempt + 1] = k end
      table.sort(exempt)
      for _, p in ipairs(paths) do
         if a[p] ~= b[p] then
            bad = string.format('the ranks train different recipes: rank %d has %s = %s where rank 0 has %s = %s ' ..
               '(every rank must get the same recipe and flags, except %s)',
               S.rank, p, b[p] or 'nothing', p, a[p] or 'nothing', table.concat(exempt, ', '))
            break
         end
      end
   end
   fail_together(bad, 'nr.dist.attach')
end

-- list of {what, number}: every rank must hold the same numbers; raises on every rank otherwise,
-- naming the first that differs and the ranks' values.
function M.assert_same_numbers(list, fname)
   if not M.active() then return end
   local nums = {}
   for i, e in ipairs(list) do nums[i] = e[2] end
   local rows = M.allgather_numbers(nums)
   for i, e in ipairs(list) do
      local vals, differ = {}, false
      for r, row in ipairs(rows) do
         vals[r] = string.format('rank %d: %.17g', r - 1, row[i])
         if row[i] ~= rows[1][i] and not (row[i] ~= row[i] and rows[1][i] ~= rows[1][i]) then differ = true end
      end
      if differ then
         error(string.format('%s (%s): the ranks disagree on %s (%s); every rank must run the same number of steps',
            fname or 'nr.dist', where(), e[1], table.concat(vals, ', ')), 0)
      end
   end
end

-- nr.dist.attach(trainer [, opts]): makes nr.train data-parallel when the process was started by
-- an MPI launcher; with one process it only sets tr.rank = 0, tr.world_size = 1, tr.is_main =
-- true and loads nothing. nr.train's M.new calls it (once; later calls return at once) after
-- the hook lists exist and before the model, the data and NR are built.
-- opts (default recipe.dist): timeout, algo ('ordered' | 'mpi'), bucket_mb (25), overlap (false),
-- check_every (epochs between replica checks, 1; 0 = never), buffers ('mean' | 'broadcast'),
-- sync_bn (false: per-rank BatchNorm; true: synchronized BatchNorm, see sync_batchnorm).
-- What it does, all through the trainer's hooks and instance fields:
--   * data: recipe.data.shard = {rank, size}: each rank reads its shard of every epoch's
--     permutation (seed, epoch), training and validation; ready-made loaders are sharded by batch;
--   * train_begin: NCCL on GPU local_rank when the trainer is on CUDA; rank 0's parameters,
--     buffers and optimizer state are broadcast (also after --resume, with any number of ranks);
--   * after_backward: gradients averaged (GradReducer: buckets, ordered reduction);
--   * epoch_begin / after_step: if the parameters were replaced (NR surgery), rank 0's model and
--     optimizer state are broadcast before the next forward;
--   * evaluate: BN running statistics merged (sync_buffers), then the shards' results combined
--     (weighted by samples), so every rank sees the global validation numbers;
--   * train_epoch: loss / top-1 combined over ranks, images summed (images/s is the job's);
--   * epoch_end: replicas checked bit-identical (assert_same);
--   * rank 0 alone prints, logs (metrics.jsonl) and writes checkpoints; the other ranks' run
--     files go to <out>/ranks/<r>/ (a recipe.json copy), never over rank 0's.
function M.attach(tr, opts)
   check.arg(type(tr) == 'table' and type(tr.add_hook) == 'function', 'nr.dist.attach', 'expected a trainer (nr.train)')
   if rawget(tr, 'dist_attached') then return tr end -- once per trainer
   tr.dist_attached = true
   local rc = tr.recipe or {}
   opts = opts or rc.dist or {}
   check.arg(type(opts) == 'table', 'nr.dist.attach', 'recipe.dist must be a table, got %s', type(opts))
   opts = check.options(opts, {timeout = true, algo = true, bucket_mb = true, overlap = true, check_every = true,
                               buffers = true, enabled = true, sync_bn = true}, 'nr.dist.attach')
   check_timeout(opts.timeout, 'nr.dist.attach', 'dist.timeout')
   if opts.check_every ~= nil then check.int(opts.check_every, 'nr.dist.attach', 'dist.check_every (0: never)', 0) end
   if opts.enabled == false then
      tr.rank, tr.world_size, tr.is_main = 0, 1, true
      return tr
   end
   local rank, size = M.init({timeout = opts.timeout, algo = opts.algo})
   tr.rank, tr.world_size, tr.is_main = rank, size, rank == 0
   if size == 1 then return tr end
   tr.dist = M
   -- every rank must train the same recipe: ranks that differ in, say, the number of batches
   -- call different collectives and crash inside MPI (or fail an epoch later naming a symptom)
   M.assert_same_recipe(rc)

   -- GPU: one rank per GPU, chosen by the rank on this machine (before the model moves there); a
   -- GPU named in the recipe ('cuda:N') would put every rank on the same one
   if type(tr.device) == 'string' and tr.device:match('^cuda:%d+$') then
      error(string.format("nr.dist.attach: device = %q names one GPU for all %d ranks; use device = 'cuda' (each rank " ..
         'takes the GPU of its local rank)', tr.device, size), 0)
   end
   if nrffi.C.nr_has_cuda() == 1 then
      local gpu, cuda = gpu_of_rank()
      if cuda and type(cuda.available) == 'function' and cuda.available() and type(cuda.set_device) == 'function' then
         cuda.set_device(gpu)
      end
   end

   -- data: every rank its shard
   local data = rc.data
   if type(data) == 'table' then
      if tr.train_loader and not data.shard and not (tr.train_loader.dist_sharded) then
         error('nr.dist.attach: the trainer built its data before attach; call nr.dist.attach(tr) in nr.train ' ..
            'before the loaders are made (or set recipe.data.shard = {rank =, size =})', 2)
      end
      if data.train and not data.train.dist_sharded then
         data.train = M.shard_loader(data.train, rank, size)
         if data.train:nbatches() < 1 then
            error(string.format('nr.dist.attach: the ready-made training loader gives %d batches, not one whole batch '
               .. 'for each of %d ranks (a short last batch is not used): use smaller batches or fewer ranks',
               data.train.inner:nbatches(), size), 0)
         end
      elseif not data.train and data.shard == nil then
         data.shard = {rank = rank, size = size}
      end
   end
   local val_sharded = type(data) == 'table' and data.train == nil

   -- NR: every decision (when to rejuvenate, λ, the new widths, rescaling) is taken on rank 0 and
   -- broadcast, by running recipe.nr's policy functions (or the defaults) inside nr.dist.decide;
   -- the surgery then runs on every rank and rank 0's weights are broadcast before the next step
   local nrc = rc.nr
   if type(nrc) == 'table' and nrc.enabled ~= false then
      local okp, pol = pcall(require, 'nr.rejuvenate.policy')
      if okp and type(pol) == 'table' then
         local user = nrc.policy or {}
         local wrapped = {}
         for k, v in pairs(user) do wrapped[k] = v end
         for _, k in ipairs({'when', 'lambda', 'reallocate', 'rescale'}) do
            local fn = user[k] or pol[k]
            if type(fn) == 'function' then wrapped[k] = function(...) return M.decide(fn, ...) end end
         end
         nrc.policy = wrapped
      end
   end

   -- one voice: rank 0 prints and logs
   if rank ~= 0 then
      if tr.progress then tr.progress.stream, tr.progress.tty = NULL_STREAM, false
      else rc.progress = {stream = NULL_STREAM, tty = false} end
      tr.log = function() end
      tr.save_checkpoint = function() return nil end
   end
   local base_run = getmetatable(tr) and getmetatable(tr).run
   if base_run then
      tr.run = function(self, ...)
         -- the run folder is rank 0's; the others keep their files in <out>/ranks/<r>
         local out0 = M.broadcast_object(self.out, 0)
         if rank ~= 0 then
            local own = self.out
            self.out = out0 .. '/ranks/' .. rank
            require('nr.checkpoint').mkdirs(self.out)
            if own ~= out0 then os.remove(own) end -- the empty folder M.new made under another date
         end
         -- a run that raises never reaches train_end: the busy mark goes with the error, so a
         -- script that handles it decides how this rank ends (an unhandled one exits non-zero)
         local res = {pcall(base_run, self, ...)}
         if not res[1] then
            D.nr_dist_set_busy(0)
            error(res[2], 0)
         end
         return unpack(res, 2, table.maxn(res))
      end
   end

   local reducer
   local function new_reducer(t)
      if reducer then reducer:unhook() end
      reducer = M.GradReducer(t.model, {bucket_mb = opts.bucket_mb, algo = opts.algo, overlap = opts.overlap})
   end
   -- the parameter tensors themselves: surgery replaces them
   local last_params
   local function changed(model)
      local named = model:namedParameters()
      if not last_params or #named ~= #last_params then return true end
      for i, e in ipairs(named) do if e.param ~= last_params[i] then return true end end
      return false
   end
   local function sync_model(t)
      if opts.sync_bn then M.sync_batchnorm(t.model) end -- also the BN layers surgery created
      M.broadcast_model(t.model, {optimizer = t.optimizer})
      last_params = {}
      for i, e in ipairs(t.model:namedParameters()) do last_params[i] = e.param end
   end
   local function sync_if_changed(t)
      if changed(t.model) then sync_model(t) end
   end

   local step_hooked = false
   -- from here to train_end every rank is needed: an exit, even os.exit(0), ends the whole job
   -- at once instead of leaving the others in a collective until the timeout
   tr:add_hook('train_begin', function() D.nr_dist_set_busy(1) end)
   tr:add_hook('train_end', function() D.nr_dist_set_busy(0) end)
   tr:add_hook('train_begin', function(t)
      -- the number of steps must agree before the first one: a rank with fewer batches would
      -- leave the others waiting in a gradient reduction (a data set of another size, a loader)
      M.assert_same_numbers({
         {'steps per epoch (iters_per_epoch)', t.iters_per_epoch or 0},
         {'planned epochs', type(t.planned_epochs) == 'function' and t:planned_epochs() or rc.epochs or 0},
         {'epochs already done (resume)', t.epoch or 0},
      }, 'nr.dist.attach')
      if t.device and tostring(t.device):match('^cuda') then M.init({device = 'cuda'}) end
      sync_model(t)
      new_reducer(t)
      -- registered now, after every hook attached after nr.dist (NR's Δt-step check, which may
      -- rejuvenate in after_step): the broadcast then follows the surgery, before the next forward
      if not step_hooked then
         t:add_hook('after_step', sync_if_changed)
         step_hooked = true
      end
      if rank == 0 then
         -- the training loader's own batch (ready-made loaders have theirs; data.batch is the default)
         local tl = t.train_loader
         local inner = type(tl) == 'table' and getmetatable(tl) == Sharded and tl.inner or tl
         local batch = type(inner) == 'table' and type(inner.batch) == 'number' and inner.batch
            or type(data) == 'table' and data.batch
         t:print(string.format('nr.dist: %d ranks (%d on this machine), %s reduction, buckets of %g MiB%s, %s BatchNorm%s',
            size, S.local_size, t.device and tostring(t.device):match('^cuda') and 'NCCL' or (opts.algo or S.algo),
            opts.bucket_mb or 25, opts.overlap and ', overlapped with backward' or '',
            opts.sync_bn and 'synchronized' or 'per-rank',
            batch and string.format(', batch %d per rank = %d per step', batch, batch * size) or ''))
         local sl = t.train_loader
         if type(sl) == 'table' and getmetatable(sl) == Sharded and sl:skipped() > 0 then
            t:print(string.format('nr.dist: the ready-made training loader gives %d batches; %d ranks train on %d whole '
               .. 'batches each per epoch and skip the other %d (a short last batch, or ones past a multiple of the '
               .. 'ranks); recipe.data with a dataset shards by sample instead', sl.inner:nbatches(), size,
               sl:nbatches(), sl:skipped()))
         end
      end
   end)
   tr:add_hook('epoch_begin', sync_if_changed)
   tr:add_hook('after_backward', function(t)
      if not reducer then sync_model(t); new_reducer(t) else sync_if_changed(t) end
      reducer:reduce()
   end)
   local check_every = opts.check_every or 1
   tr:add_hook('epoch_end', function(t, info)
      sync_if_changed(t) -- a hook before this one may have changed the model
      M.sync_buffers(t.model, opts.buffers or 'mean')
      local e = (type(info) == 'table' and info.epoch) or t.epoch or 0
      if check_every > 0 and e % check_every == 0 then
         M.assert_same(t.model, 'at the end of epoch ' .. tostring(e), {optimizer = t.optimizer})
      end
   end)

   -- global metrics: the trainer's own methods, wrapped on this instance
   local cls = getmetatable(tr)
   if cls and cls.train_epoch then
      local base = cls.train_epoch
      tr.train_epoch = function(self, epoch)
         local r = base(self, epoch)
         local n = r.images or 0
         local rows = M.allgather_numbers({n, (r.loss or 0) * n, (r.top1 or 0) * n, r.time or 0})
         local tn, tl, t1, tt = 0, 0, 0, 0
         for _, row in ipairs(rows) do
            tn, tl, t1, tt = tn + row[1], tl + row[2], t1 + row[3], math.max(tt, row[4])
         end
         r.images, r.time = tn, tt
         if tn > 0 then r.loss, r.top1 = tl / tn, t1 / tn end
         return r
      end
   end
   if cls and cls.evaluate then
      local base = cls.evaluate
      tr.evaluate = function(self, loader)
         M.sync_buffers(self.model, opts.buffers or 'mean')
         local r = base(self, loader)
         local n = r and r.n or 0
         local s = M.allreduce_numbers({n, n > 0 and r.loss * n or 0, n > 0 and r.top1 * n or 0, n > 0 and r.top5 * n or 0}, 'sum')
         if s[1] == 0 then return nil end
         return {loss = s[2] / s[1], top1 = s[3] / s[1], top5 = s[4] / s[1], n = val_sharded and s[1] or s[1] / size}
      end
   end
   return tr
end

M.Reducer = Reducer
return M

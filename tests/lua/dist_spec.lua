-- nr.dist: data-parallel training. The multi-process checks launch `mpirun -np 2` on this machine
-- (shared memory, and TCP over the loopback interface for the equivalence run) and read the
-- scripts' output; each script is in tests/dist/ and says what it checks:
--   (a) collectives.lua   allreduce / broadcast / decide correctness on every rank
--   (b) equivalence.lua   k SGD steps on 2 ranks == 1 process with the combined batch (1e-5 rel.)
--   (c) failure.lua       a killed / failing / hung rank ends the job, non-zero, within 30 s
--   (d) rejuvenate.lua    identical weights on all ranks after a rejuvenation (surgery); AdamW state
--   (e) train.lua         nr.train + nr.dist.attach: 2 ranks == 1 process, checkpoints compared
--   (f) train.lua         --resume from a checkpoint written with another number of ranks
--   (g) train_nr.lua      nr.train + NR: policy decisions on rank 0 only, replicas identical
--   (h) mismatch.lua      ranks given different recipes fail together before the first step
-- Single-process behaviour (no launcher: no MPI loaded, collectives are identities) is checked
-- in this process. The spec exits 77 (skipped) when mpirun or libnr_dist is missing.
local nr = require 'nr'
local nrffi = require 'nr.ffi'
local ffi = require 'ffi'

pcall(ffi.cdef, 'int getpid(void);')
local util = require 'tests.lua.spec_util'
local sh = util.run

local NRLUA = util.nrlua()
local libdir = (nrffi.libpath or ''):match('^(.*)/[^/]*$') or (nrffi.home .. '/build')
local have_mpirun = select(2, sh('command -v mpirun >/dev/null')) == 0
local have_lib = io.open(libdir .. '/libnr_dist.so') ~= nil
if not have_mpirun or not have_lib then
   io.stderr:write(string.format('dist_spec: skipped (%s)\n', not have_mpirun and 'mpirun not found' or
      ('no libnr_dist.so beside ' .. tostring(nrffi.libpath) .. '; CMake builds it when MPI is found')))
   os.exit(77)
end

local ROOT = (sh('id -u')):match('^0') ~= nil
-- Open MPI refuses root unless told; oversubscribe: 2 ranks may exceed the cores given to us
local MPIRUN = 'env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun' ..
   (ROOT and ' --allow-run-as-root' or '') .. ' --oversubscribe -x NR_THREADS=1 -x NRLUA_HOME=' .. nrffi.home
local SHM = ' --mca btl self,vader --mca btl_vader_single_copy_mechanism none'
local TCP = ' --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo'

-- Runs a tests/dist script on np ranks; returns output, exit status, seconds.
local function mpirun(script, np, transport, args, limit)
   local cmd = string.format('cd %s && s=$(date +%%s%%N); timeout %d %s%s -np %d %s tests/dist/%s %s; rc=$?; ' ..
      'e=$(date +%%s%%N); echo "::ms=$(( (e - s) / 1000000 ))"; (exit $rc)',
      nrffi.home, limit or 120, MPIRUN, transport or SHM, np or 2, NRLUA, script, args or '')
   local out, rc = sh(cmd)
   local ms = tonumber(out:match('::ms=(%d+)'))
   return out, rc, ms and ms / 1000
end

local function count(out, pat)
   local n = 0
   for _ in out:gmatch(pat) do n = n + 1 end
   return n
end

describe('nr.dist in one process (no launcher)', function()
   local dist = require 'nr.dist'

   it('is rank 0 of 1 and does not load MPI', function()
      local saved = os.getenv('OMPI_COMM_WORLD_SIZE')
      assert.is_nil(saved, 'this spec must not itself run under mpirun')
      local rank, size = dist.init()
      assert.equal(0, rank)
      assert.equal(1, size)
      assert.is_false(dist.active())
      local f = io.open('/proc/' .. ffi.C.getpid() .. '/maps')
      local maps = f:read('*a')
      f:close()
      assert.is_nil(maps:match('libmpi'), 'libmpi is mapped in a plain run')
   end)

   it('makes collectives identities and decide a plain call', function()
      local t = nr.tensor({1, 2, 3})
      dist.allreduce(t, {op = 'mean'})
      dist.broadcast(t, 0)
      assert.same({1, 2, 3}, t:totable())
      assert.same({4, 5}, {dist.decide(function(a) return a, 5 end, 4)})
      assert.same({{7}}, dist.allgather_numbers({7}))
      -- what N ranks refuse, one process refuses too
      for _, c in ipairs({
         {function() dist.allreduce(nr.tensor({1}, {dtype = 'uint8'})) end, 'takes float32 or int64 tensors, got uint8'},
         {function() dist.allreduce(nr.tensor({1}, {dtype = 'int64'})) end, 'an int64 tensor takes op sum, max or min'},
         {function() dist.broadcast(nr.tensor({1}), 5) end, 'root 5 outside 0..0'},
         {function() dist.broadcast_object({f = print}) end, 'object.f is a function'},
      }) do
         local okc, ec = pcall(c[1])
         assert.is_false(okc)
         assert.truthy(tostring(ec):find(c[2], 1, true), tostring(ec))
      end
      assert.equal(3, dist.allreduce(nr.tensor({3}, {dtype = 'int64'}), {op = 'sum'}):get(1))
      local m = nr.nn.Sequential{nr.nn.Linear(3, 2)}
      local r = dist.GradReducer(m)
      r:reduce()
      dist.broadcast_model(m)
      assert.matches('^%x+$', dist.assert_same(m))
      -- overlap sends a gradient when its module's backward ends: a module placed twice (its twin
      -- adds to the shared gradient later) is refused, with the two places named
      local lin = nr.nn.Linear(3, 3)
      local tied = nr.nn.Sequential{lin, nr.nn.ReLU(), lin}
      local ok, e = pcall(dist.GradReducer, tied, {overlap = true})
      assert.is_false(ok)
      assert.truthy(tostring(e):find('overlap needs each gradient written by one layer, but 0 and 2 share one', 1, true),
         tostring(e))
      dist.GradReducer(tied):reduce()
      -- one ReLU at two places shares no gradient: overlap is fine
      local relu = nr.nn.ReLU()
      dist.GradReducer(nr.nn.Sequential{nr.nn.Linear(3, 3), relu, nr.nn.Linear(3, 3), relu}, {overlap = true})
   end)

   it('shards a ready-made loader into whole, equal batches, the same count on every rank', function()
      local train = require 'nr.train'
      local function shards(n, drop_last)
         local x, y = nr.randn({n, 3}), nr.zeros({n}, {dtype = 'int64'})
         local inner = train.memory_loader(x, y, {batch = 8, drop_last = drop_last})
         local out = {}
         for r = 0, 1 do
            local sl = dist.shard_loader(inner, r, 2)
            local sizes = {}
            for bx in sl:epoch(1) do sizes[#sizes + 1] = bx:size(1) end
            assert.equal(sl:nbatches(), #sizes)
            out[r + 1] = sizes
            out.skipped = sl:skipped()
         end
         return out
      end
      assert.same({{8, 8}, {8, 8}, skipped = 0}, shards(32))
      assert.same({{8}, {8}, skipped = 2}, shards(27))          -- 8, 8, 8, 3: the short batch and one more skipped
      assert.same({{8}, {8}, skipped = 1}, shards(27, true))    -- drop_last: 3 whole batches, one left over
      assert.same({{8, 8}, {8, 8}, skipped = 1}, shards(40))    -- 5 batches over 2 ranks
   end)

   it('attaches to a trainer as rank 0 of 1 and shards nothing', function()
      local hooks = {}
      local tr = {recipe = {data = {batch = 4}}, add_hook = function(self, name, fn) hooks[#hooks + 1] = name end}
      dist.attach(tr)
      assert.equal(0, tr.rank)
      assert.equal(1, tr.world_size)
      assert.is_true(tr.is_main)
      assert.is_nil(tr.recipe.data.shard)
      assert.same({}, hooks)
   end)

   it('rejects a timeout that is not a finite number >= 0 and a check_every that is not an integer >= 0', function()
      local function attach(opts)
         local tr = {recipe = {}, add_hook = function() end}
         local ok, err = pcall(dist.attach, tr, opts)
         return ok, tostring(err)
      end
      for _, bad in ipairs({0 / 0, -5, math.huge, 'x'}) do
         local ok, err = attach({timeout = bad})
         assert.is_false(ok, 'timeout ' .. tostring(bad))
         assert.matches('dist.timeout must be a finite number of seconds >= 0 (0: wait forever), got ' ..
            require('nr.check').show(bad), err, 1, true)
         ok, err = pcall(dist.init, {timeout = bad})
         assert.is_false(ok, 'init timeout ' .. tostring(bad))
         assert.matches('nr.dist.init: timeout must be a finite number', tostring(err), 1, true)
         ok, err = pcall(dist.set_timeout, bad)
         assert.is_false(ok, 'set_timeout ' .. tostring(bad))
      end
      for _, bad in ipairs({-1, 1.5, 0 / 0, 'x'}) do
         local ok, err = attach({check_every = bad})
         assert.is_false(ok, 'check_every ' .. tostring(bad))
         assert.matches('dist.check_every (0: never) must be a non-negative integer, got ' .. require('nr.check').show(bad), err, 1, true)
      end
      assert.is_true((attach({timeout = 0, check_every = 0})))
      assert.is_true((attach({timeout = 2.5, check_every = 3})))
   end)

   it('fingerprints the resolved recipe without the per-rank fields', function()
      local function fp(rc)
         local t = {}
         for _, e in ipairs(dist.recipe_fingerprint(rc)) do t[#t + 1] = e[1] .. '=' .. e[2] end
         return table.concat(t, ' ')
      end
      local a = fp({out = 'runs/a', threads = 1, device = 'cuda:0', optim = {lr = 0.1}, data = {batch = 8, root = '/x'},
                    dist = {timeout = 3, check_every = 1}, model = function() end})
      local b = fp({out = 'runs/b', threads = 4, device = 'cuda:1', optim = {lr = 0.1}, data = {batch = 8, root = '/y'},
                    dist = {timeout = 9, check_every = 1}, model = function() end})
      assert.equal(a, b)
      assert.equal('data.batch=8 dist.check_every=1 model=<function> optim.lr=0.10000000000000001', a)
      assert.are_not.equal(a, fp({optim = {lr = 0.1}, data = {batch = 16}, dist = {check_every = 1}, model = function() end}))
   end)

   it('serializes decisions deterministically and rejects tensors', function()

      assert.equal('{["a"]=1,["b"]={[1]=2,[2]=3}}', dist._serialize({b = {2, 3}, a = 1}, {}, 'x'))
      assert.has_error(function() dist._serialize({t = nr.zeros({1})}, {}, 'x') end)
   end)
end)

describe('nr.dist under mpirun -np 2', function()
   it('(a) reduces and broadcasts correctly on every rank', function()
      local out, rc = mpirun('collectives.lua', 2)
      assert.equal(0, rc, out)
      assert.equal(18, count(out, 'PASS [^\n]* rank %d/2'), out)
   end)

   it('(b) 2 ranks x 8 samples give the weights of 1 process x 16 samples within 1e-5 (TCP loopback; MLP, conv, conv+synchronized BN)', function()
      local out, rc = mpirun('equivalence.lua', 2, TCP)
      assert.equal(0, rc, out)
      assert.equal(10, count(out, 'PASS [^\n]* rank %d/2'), out)
      for line in out:gmatch('[^\n]*max relative difference[^\n]*') do print('      ' .. line) end
   end)

   -- A2: ranks with different recipes crashed inside Open MPI (SIGSEGV, SIGABRT, MPI_ERR_TRUNCATE)
   -- or failed an epoch later naming a symptom; now every rank fails before the first step
   for _, c in ipairs({
      {'batches', 'rank 1 has data.train_batches = 5 where rank 0 has data.train_batches = 3'},
      {'lr', 'rank 1 has optim.lr = 0.02 where rank 0 has optim.lr = 0.01'},
      {'batch', 'rank 1 has data.batch = 16 where rank 0 has data.batch = 8'},
      {'loader', 'the ranks disagree on steps per epoch (iters_per_epoch) (rank 0: 8, rank 1: 16)'},
   }) do
      it('(h) ranks given different recipes (' .. c[1] .. ') all fail before the first step, naming the field', function()
         local out, rc = mpirun('mismatch.lua', 2, SHM, c[1], 60)
         assert.equal(0, rc, out)
         for r = 0, 1 do
            assert.is_truthy(out:find('rank ' .. r .. ': nr.train failed: nr.dist.attach (rank ' .. r .. '/2): ', 1, true), out)
         end
         assert.equal(2, count(out, c[2]:gsub('%p', '%%%0')), out)
      end)
   end
   it('(h) ranks whose recipes differ only in per-rank fields (out, threads, progress, timeout) train', function()
      local out, rc = mpirun('mismatch.lua', 2, SHM, 'same', 60)
      assert.equal(0, rc, out)
      assert.equal(2, count(out, 'nr.train finished'), out)
   end)

   it('(c) an nr.train error every rank handles ends the job cleanly (status 0, no abort)', function()
      local out, rc = mpirun('failure.lua', 2, SHM, 'caught', 60)
      assert.equal(0, rc, out)
      assert.equal(2, count(out, 'nr.train failed %(user stop condition%), handled'), out)
      assert.is_nil(out:find('MPI_Abort', 1, true), out)
   end)

   for _, mode in ipairs({'kill', 'error', 'hang', 'exit0'}) do
      it('(c) a rank that fails (' .. mode .. ') ends the whole job with an error within 30 s', function()
         local out, rc, secs = mpirun('failure.lua', 2, SHM, mode, 60)
         assert.is_true(rc ~= 0, 'the job succeeded: ' .. out)
         assert.is_true(rc ~= 124, 'the job hung until timeout(1) killed it: ' .. out)
         assert.is_true(secs < 30, string.format('took %.1f s', secs))
         if mode == 'kill' then
            assert.matches('rank 1 .*exited on signal 9', out)
            assert.matches('nrlua rank 0/2 [^\n]*stopped by SIGTERM', out)
         elseif mode == 'error' then
            assert.matches('simulated failure on rank 1', out)
            assert.matches('nrlua rank 1/2: exiting with status 1[^\n]*MPI_Abort', out)
            assert.matches('nrlua rank 0/2 [^\n]*stopped by SIGTERM', out)
         elseif mode == 'hang' then
            assert.matches('nr.dist.allreduce %(rank 0/2%)[^\n]*timed out after 3 s', out)
            assert.matches('nrlua rank 1/2 [^\n]*stopped by SIGTERM', out)
         else -- exit0: a clean status mid-training still ends the job at once (the timeout is 60 s)
            assert.matches('nrlua rank 1/2: exiting with status 0 in the middle of training', out)
            assert.is_true(secs < 15, string.format('took %.1f s', secs))
         end
         print(string.format('      %s: status %d after %.1f s', mode, rc, secs))
      end)
   end

   local fashion = os.getenv('NR_FASHION') or '/usr/share/datasets/fashion-mnist'
   local have_fashion = io.open(fashion .. '/train-images-idx3-ubyte.gz') ~= nil
   local tmp = (os.getenv('NR_TEST_TMP') or '/tmp') .. '/dist_spec_' .. ffi.C.getpid()
   local function run_train(np, dir, epochs, resume)
      local out, rc
      if np == 1 then
         out, rc = sh(string.format('cd %s && NR_THREADS=1 %s tests/dist/train.lua %s %d %s', nrffi.home, NRLUA, dir, epochs, resume or ''))
      else
         out, rc = mpirun('train.lua', np, SHM, string.format('%s %d %s', dir, epochs, resume or ''))
      end
      assert.equal(0, rc, out)
      return out
   end
   local function compare(a, b)
      local out, rc = sh(string.format('cd %s && %s tests/dist/compare_runs.lua %s %s 1e-5', nrffi.home, NRLUA, a, b))
      assert.equal(0, rc, out)
      print('      ' .. out:match('SAME[^\n]*'))
   end

   local train_it = have_fashion and it or pending
   train_it('(e) nr.train on 2 ranks x 32 gives the checkpoint of 1 process x 64 (Fashion-MNIST MLP)', function()
      os.execute('rm -rf ' .. tmp .. ' && mkdir -p ' .. tmp)
      run_train(1, tmp .. '/r1', 2)
      local out = run_train(2, tmp .. '/r2', 2)
      assert.matches('nr.dist: 2 ranks', out)
      assert.equal(1, count(out, 'RESULT'), 'only rank 0 reports')
      compare(tmp .. '/r2', tmp .. '/r1')
      local f = io.open(tmp .. '/r2/ranks/1/recipe.json')
      assert.is_truthy(f, 'rank 1 keeps its files apart from rank 0\'s')
      f:close()
   end)

   train_it('(f) --resume works with a different number of ranks (2 -> 1 and 1 -> 2)', function()
      run_train(2, tmp .. '/rs', 1)
      local out = run_train(1, tmp .. '/rs', 2, tmp .. '/rs')
      assert.matches('resumed from', out)
      compare(tmp .. '/rs', tmp .. '/r1')
      run_train(1, tmp .. '/rt', 1)
      out = run_train(2, tmp .. '/rt', 2, tmp .. '/rt')
      assert.matches('resumed from', out)
      compare(tmp .. '/rt', tmp .. '/r1')
      os.execute('rm -rf ' .. tmp)
   end)

   train_it('(g) nr.train with Neural Rejuvenation: decisions on rank 0, replicas identical after it', function()
      os.execute('mkdir -p ' .. tmp)
      local out, rc = mpirun('train_nr.lua', 2, SHM, tmp .. '/nr')
      os.execute('rm -rf ' .. tmp)
      assert.equal(0, rc, out)
      assert.matches('RESULT ranks=2 rejuvenations=1 first conv 8 %-> %d+ channels, policy.when calls per rank: %d+ 0', out)
      print('      ' .. out:match('RESULT[^\n]*'))
      -- Δt in steps: the surgery runs in after_step, and the broadcast follows it at once
      os.execute('mkdir -p ' .. tmp)
      out, rc = mpirun('train_nr.lua', 2, SHM, tmp .. '/nr_steps steps')
      os.execute('rm -rf ' .. tmp)
      assert.equal(0, rc, out)
      assert.matches('RESULT ranks=2 rejuvenations=1 first conv 8 %-> %d+ channels', out)
   end)

   it('(d) all ranks hold identical weights after a rejuvenation', function()
      local out, rc = mpirun('rejuvenate.lua', 2)
      assert.equal(0, rc, out)
      assert.equal(12, count(out, 'PASS [^\n]* rank %d/2'), out)
      print('      ' .. (out:match('after rejuvenation[^\n]*') or ''))
      print('      ' .. (out:match('after nr%.rejuvenate[^\n]*') or ''))
   end)
end)

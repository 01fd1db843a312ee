-- nr.train: a small convnet trained from Lua on synthetic separable images reaches >= 99%
-- accuracy; progress output when not a terminal (plain lines, no carriage returns); the run
-- folder (recipe.json, metrics.jsonl, checkpoint/); hooks and registered states; the schedule
-- hold; and exact resume: a run stopped after epoch 2 and resumed reaches bit-identical weights
-- to an uninterrupted run (CPU, same thread count). Runs in a few seconds on 2 cores.
local nr = require 'nr'
local ck = require 'nr.checkpoint'
local train = require 'nr.train'

local TMP = (os.getenv('NR_TEST_TMP') or '/tmp') .. '/nr_train_spec_' .. tostring(os.time()) .. '_' .. tostring(math.random(1e6))
ck.mkdirs(TMP)

-- 4 classes of 1x8x8 images: class k has a bright 3x3 blob in quadrant k, plus noise.
local function synthetic(n, seed)
   nr.manual_seed(seed)
   local x = nr.randn({n, 1, 8, 8}):mul_(0.3)
   local y = nr.empty({n}, {dtype = 'int64'})
   local xp, yp = x:data(), y:data()
   for i = 0, n - 1 do
      local k = i % 4
      yp[i] = k
      local r0, c0 = (k < 2) and 1 or 4, (k % 2 == 0) and 1 or 4
      for r = r0, r0 + 2 do for c = c0, c0 + 2 do xp[i * 64 + r * 8 + c] = xp[i * 64 + r * 8 + c] + 1.5 end end
   end
   return x, y
end

local function convnet()
   local nn = nr.nn
   return nn.Sequential{
      nn.Conv2d(1, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
   }
end

-- A stream that records what is written (stands in for a log file).
local function sink()
   local s = {parts = {}}
   function s:write(...) for _, v in ipairs({...}) do self.parts[#self.parts + 1] = tostring(v) end end
   function s:flush() end
   function s:text() return table.concat(self.parts) end
   return s
end

local X, Y = synthetic(256, 7)

local function recipe(out, extra)
   local r = {
      name = 'spec', model = convnet,
      data = {train = train.memory_loader(X, Y, {batch = 32, shuffle = true, seed = 3}),
              val = train.memory_loader(X, Y, {batch = 64})},
      optim = {lr = 0.05, momentum = 0.9, nesterov = true, weight_decay = 1e-4},
      schedule = {name = 'cosine', warmup = 0.5},
      epochs = 4, seed = 11, out = out, log_every = 4,
      progress = {stream = sink(), tty = false},
   }
   for k, v in pairs(extra or {}) do r[k] = v end
   return r
end

local function weights_of(dir)
   local r = ck.load(dir)
   return r.weights, r.state
end

local function first_difference(a, b)
   for name, t in pairs(a) do
      local u = b[name]
      if not u then return name .. ' missing' end
      local n = t:numel()
      if n ~= u:numel() then return name .. ': sizes differ' end
      local p, q = t:data(), u:data()
      for i = 0, n - 1 do
         if p[i] ~= q[i] then return string.format('%s[%d]: %.9g vs %.9g', name, i, tonumber(p[i]), tonumber(q[i])) end
      end
   end
end

describe('nr.train', function()
   local summary_a

   it('trains a convnet on separable synthetic data to >= 99% accuracy', function()
      local r = recipe(TMP .. '/a')
      local summary = nr.train(r)
      summary_a = summary
      assert(summary.final_top1 >= 99, 'final top-1 ' .. tostring(summary.final_top1))
      assert.equal(summary.final_top1, summary.best_top1)
      assert(summary.images_per_s > 0 and summary.time_s > 0)
      assert.equal(32, summary.steps)
   end)

   it('prints plain progress lines when not on a terminal', function()
      local r = recipe(TMP .. '/p', {epochs = 1})
      local s = r.progress.stream
      nr.train(r)
      local text = s:text()
      assert.is_nil(text:find('\r', 1, true), 'no carriage returns in a log')
      assert.is_nil(text:find('\27', 1, true), 'no escape sequences in a log')
      local steps = {}
      for i in text:gmatch('epoch 1/1 step (%d+)/8 loss %d+%.%d+ acc %d+%.%d+%% %d+ img/s eta %d+:%d+\n') do steps[#steps + 1] = tonumber(i) end
      assert.same({4, 8}, steps)
      assert.truthy(text:find('epoch 1/1  train loss %d+%.%d+ top1 %d+%.%d+%%  |  val loss %d+%.%d+ top1 %d+%.%d+%% top5 100%.00%%'))
      assert.truthy(text:find('done: top1', 1, true))
      -- without evaluation (no data.val; --data.val_split off) the summary line said "top1 -% (best -% at epoch nil)"
      r = recipe(TMP .. '/p_noval', {epochs = 1})
      r.data.val = nil
      nr.train(r)
      text = r.progress.stream:text()
      assert.truthy(text:find('done: no evaluation, ', 1, true), text)
      assert.is_nil(text:find('nil', 1, true), text)
   end)

   it('writes recipe.json, metrics.jsonl and a checkpoint into the run folder', function()
      local dir = TMP .. '/a'
      local rj = ck.json_decode(ck.read_file(dir .. '/recipe.json'))
      assert.equal('spec', rj.name)
      assert.equal(0.05, rj.optim.lr)
      assert.equal('cpu', rj.device_resolved)
      assert.equal(32, rj.data.batch)          -- the ready-made loaders' batch sizes, not the defaults
      assert.equal(64, rj.data.eval_batch)
      local kinds, epochs = {}, {}
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         local rec = ck.json_decode(line)
         kinds[rec.kind] = (kinds[rec.kind] or 0) + 1
         if rec.kind == 'epoch' then epochs[#epochs + 1] = rec end
         if rec.kind == 'step' then assert(rec.lr and rec.loss and rec.top1 and rec.images_per_s and rec.step and rec.time) end
      end
      assert.equal(4, kinds.epoch)
      assert.equal(8, kinds.step)
      assert.equal(1, kinds.summary)
      assert(epochs[4].val.top1 >= 99 and epochs[4].val.top5 == 100 and epochs[4].train.loss < epochs[1].train.loss)
      local w, st = weights_of(dir)
      assert.same({8, 1, 3, 3}, w['0.weight']:shape())
      assert.truthy(w['1.running_mean'])
      assert.equal(4, st.epoch); assert.equal(32, st.step)
      assert.same({8, 1, 3, 3}, st.architecture.shapes['0.weight'])
      assert.truthy(st.optimizer.params['0.weight'].momentum)
   end)

   it('calls hooks with the documented info, saves registered states and honours schedule_hold', function()
      local r = recipe(TMP .. '/h', {epochs = 2})
      local seen, lrs = {}, {}
      local tr = train.new(r)
      tr:add_hook('train_begin', function(t) seen[#seen + 1] = 'train_begin'; assert.equal(0, t.step) end)
      tr:add_hook('after_backward', function(t, info)
         if t.step == 1 then
            seen[#seen + 1] = 'after_backward'
            assert(type(info.loss) == 'number' and info.batch == 32)
         end
      end)
      tr:add_hook('after_step', function(t) lrs[#lrs + 1] = t.optimizer.config.lr end)
      tr:add_hook('epoch_end', function(t, info)
         seen[#seen + 1] = 'epoch_end ' .. info.epoch
         assert(info.train.loss and info.train.top1 and info.val.top1 and info.val.top5 and info.val.loss)
         t.schedule_hold = true   -- hold from now on
      end)
      tr:add_hook('train_end', function(t, s) seen[#seen + 1] = 'train_end'; assert.truthy(s.final_top1) end)
      local saved = {}
      tr:register_state('probe', {save = function() return {widths = {8, 4}} end, load = function(t) saved = t end, before_weights = true})
      assert.has_error(function() tr:add_hook('after_everything', function() end) end)
      tr:run()
      assert.same({'train_begin', 'after_backward', 'epoch_end 1', 'epoch_end 2', 'train_end'}, seen)
      -- epoch 2 ran while held: its LR stays at the value the schedule had after epoch 1
      for i = 10, 16 do assert.equal(lrs[9], lrs[i]) end
      assert.equal(1, tr.schedule.epoch)
      local _, st = weights_of(TMP .. '/h')
      assert.same({widths = {8, 4}}, st.states.probe)
      assert.is_true(st.schedule_hold)
      -- a resumed trainer hands the state back to its loader
      local r2 = recipe(TMP .. '/h', {epochs = 2, resume = TMP .. '/h'})
      local tr2 = train.new(r2)
      tr2:register_state('probe', {save = function() return {} end, load = function(t) saved = t end, before_weights = true})
      tr2:run()
      assert.same({widths = {8, 4}}, saved)
      -- (its 2 epochs are done: said, not a silent "done")
      assert.truthy(r2.progress.stream:text():find('the run has trained 2 epochs, which covers the 2 planned: nothing to '
         .. 'train', 1, true), r2.progress.stream:text())
      assert.is_true(tr2.schedule_hold)
   end)

   it('resuming with another recipe whose model does not fit names the run\'s recipe', function()
      local dir = TMP .. '/other_recipe'
      nr.train(recipe(dir, {name = 'first', epochs = 1}))
      local wider = function()
         local nn = nr.nn
         return nn.Sequential{nn.Conv2d(1, 6, 3, {padding = 1, bias = false}), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(6 * 4 * 4, 4)}
      end
      local ok, err = pcall(nr.train, recipe(dir, {name = 'second', model = wider, epochs = 2, resume = dir}))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('in the checkpoint but [6 x 1 x 3 x 3] in the model (the run was made by the recipe '
         .. 'named "first", this one is "second": resume it with the recipe file that made it)', 1, true), err)
   end)

   it('resumes exactly: stopped after epoch 2 and resumed equals uninterrupted, bit for bit', function()
      local dir = TMP .. '/b'
      local r = recipe(dir, {hooks = {epoch_begin = function(_, info)
         if info.epoch == 3 then error('simulated kill before epoch 3', 0) end
      end}})
      local ok, err = pcall(nr.train, r)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('simulated kill', 1, true))
      -- a crash during the next save leaves debris that must not matter
      ck.mkdirs(dir .. '/checkpoint/step-00000024')
      local f = io.open(dir .. '/checkpoint/step-00000024/model.safetensors.tmp.1', 'wb'); f:write('xx'); f:close()
      nr.manual_seed(999)  -- the resumed run must not depend on the global generator's state
      local summary = nr.train(recipe(dir, {resume = dir}))
      assert.equal(32, summary.steps)
      local wa = weights_of(TMP .. '/a')
      local wb = weights_of(dir)
      local d = first_difference(wa, wb)
      assert(d == nil, 'resumed run differs from the uninterrupted one: ' .. tostring(d))
      assert.equal(summary_a.final_top1, summary.final_top1)
      -- metrics: one epoch record per epoch, no duplicates from the interrupted run
      local n = 0
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         if ck.json_decode(line).kind == 'epoch' then n = n + 1 end
      end
      assert.equal(4, n)
   end)

   it('resumes AdamW exactly (its moments and per-parameter steps go through the checkpoint)', function()
      local adamw = {name = 'adamw', lr = 2e-3, weight_decay = 1e-2}
      local whole = nr.train(recipe(TMP .. '/adamw_a', {optim = adamw, epochs = 2}))
      local dir = TMP .. '/adamw_b'
      local ok, err = pcall(nr.train, recipe(dir, {optim = adamw, epochs = 2, hooks = {epoch_begin = function(_, info)
         if info.epoch == 2 then error('simulated kill before epoch 2', 0) end
      end}}))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('simulated kill', 1, true))
      local _, st = weights_of(dir)
      assert.equal('adamw', st.optimizer.name)
      local any = next(st.optimizer.params)
      assert.equal(8, st.optimizer.params[any].step)   -- 256 samples / 32 per batch, one epoch
      local summary = nr.train(recipe(dir, {optim = adamw, epochs = 2, resume = dir}))
      assert.equal(16, summary.steps)
      local d = first_difference(weights_of(TMP .. '/adamw_a'), weights_of(dir))
      assert(d == nil, 'resumed run differs from the uninterrupted one: ' .. tostring(d))
      assert.equal(whole.final_top1, summary.final_top1)
   end)

   -- Held epochs extend the run (tr.extend_held, the generic mechanism NR switches on): a hook
   -- holds the schedule during epochs 1-2 of a 3-epoch recipe (warm-up off, so the held LR is the
   -- base LR).
   local function hold_first(n) return function(t, info) t.schedule_hold = info.epoch <= n end end
   local function extend(t) t.extend_held = true end
   local function lr_log(list) return function(t) list[#list + 1] = t.optimizer.config.lr end end
   local function held_recipe(out, extra)
      local r = recipe(out, {epochs = 3, schedule = {name = 'cosine', warmup = 0}})
      for k, v in pairs(extra or {}) do r[k] = v end
      return r
   end
   local function epoch_records(dir)
      local out = {}
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         local rec = ck.json_decode(line)
         if rec.kind == 'epoch' then out[#out + 1] = rec end
      end
      return out
   end

   it('held epochs extend the run by exactly their number and the schedule completes', function()
      local plain = {}
      local sp = nr.train(held_recipe(TMP .. '/x0', {hooks = {after_step = lr_log(plain)}}))
      assert.equal(3, sp.epochs); assert.equal(24, sp.steps); assert.equal(0, sp.held_epochs)
      local lrs = {}
      local r = held_recipe(TMP .. '/x', {hooks = {epoch_begin = hold_first(2), after_step = lr_log(lrs)}})
      local s = r.progress.stream
      local tr = train.new(r)
      tr.extend_held = true   -- as nr.rejuvenate.attach does
      local summary = tr:run()
      assert.equal(5, summary.epochs); assert.equal(40, summary.steps)
      assert.equal(2, summary.held_epochs); assert.equal(3, summary.schedule_epochs)
      assert.is_nil(summary.capped)
      assert.equal(5, tr.epoch); assert.equal(2, tr.held_epochs); assert.equal(3, tr.schedule.epoch)
      -- held: the base LR; then exactly the LRs of the un-held 3-epoch run, to its end
      assert.equal(40, #lrs)
      for i = 1, 16 do assert.equal(0.05, lrs[i]) end
      for i = 1, 24 do assert.equal(plain[i], lrs[16 + i]) end
      -- the planned total as it grows: epoch 1 ends at 3 + 1, epoch 2 at 3 + 2
      local recs = epoch_records(TMP .. '/x')
      assert.equal(5, #recs)
      local planned, held = {}, {}
      for i, rec in ipairs(recs) do planned[i], held[i] = rec.epochs_planned, rec.held or false end
      assert.same({4, 5, 5, 5, 5}, planned)
      assert.same({true, true, false, false, false}, held)
      local text = s:text()
      assert.truthy(text:find('epoch 1/4 step 8/8 ', 1, true))          -- projected while held
      assert.truthy(text:find('epoch 1/4 (+1 held)  train loss', 1, true))
      assert.truthy(text:find('epoch 2/5 (+2 held)  train loss', 1, true))
      assert.truthy(text:find('epoch 5/5 %(%+2 held%)  train loss %d+%.%d+ top1 %d+%.%d+%%  |  val loss %d'))
      assert.truthy(text:find('3 (+ held ones, at most 6) epochs of 8 steps', 1, true))
      -- the checkpoint records the held epochs
      local _, st = weights_of(TMP .. '/x')
      assert.equal(5, st.epoch); assert.equal(40, st.step); assert.equal(2, st.trainer.held_epochs)
      assert.equal(3, st.schedule.epoch)
   end)

   it('refuses a fresh run into a folder holding a run; overwrite replaces it; the user\'s own files stay', function()
      local dir = TMP .. '/again'
      local r = held_recipe(dir, {epochs = 1})
      nr.train(r)
      ck.write_atomic(dir .. '/notes.txt', 'mine')
      local ok, e = pcall(nr.train, held_recipe(dir, {epochs = 1}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find(dir .. ' already holds a run (checkpoint/best, checkpoint/latest, checkpoint/step-'
         , 1, true), tostring(e))
      assert.truthy(tostring(e):find('--resume ' .. dir .. ' continues it', 1, true))
      local s = nr.train(held_recipe(dir, {epochs = 1, overwrite = true}))
      assert.equal(1, s.epochs)
      assert.equal(1, #epoch_records(dir))                       -- the old run's records went
      assert.equal('mine', ck.read_file(dir .. '/notes.txt'))
      local steps = 0
      for _, name in ipairs(ck.list(dir .. '/checkpoint')) do if name:match('^step%-') then steps = steps + 1 end end
      assert.equal(1, steps)
      -- only the run's own files go: a user's folder with a report.html or a checkpoint/ of other
      -- things is not a run, and a linked checkpoint/ keeps what it points to
      local user = TMP .. '/userdir'
      ck.mkdirs(user .. '/checkpoint/mine')
      ck.write_atomic(user .. '/report.html', 'my report')
      ck.write_atomic(user .. '/checkpoint/mine/model.pt', 'x')
      nr.train(held_recipe(user, {epochs = 1}))                     -- not refused: not a run folder
      ck.write_atomic(user .. '/checkpoint/mine/model.pt', 'x')
      nr.train(held_recipe(user, {epochs = 1, overwrite = true}))
      assert.equal('x', ck.read_file(user .. '/checkpoint/mine/model.pt'))
      local shared, linked = TMP .. '/shared_ckpts', TMP .. '/linked'
      ck.mkdirs(shared .. '/other_experiment')
      ck.write_atomic(shared .. '/other_experiment/model.pt', 'y')
      ck.mkdirs(linked)
      os.execute(string.format('ln -s %q %q', shared, linked .. '/checkpoint'))
      nr.train(held_recipe(linked, {epochs = 1}))
      nr.train(held_recipe(linked, {epochs = 1, overwrite = true}))
      assert.equal('y', ck.read_file(shared .. '/other_experiment/model.pt'))
      assert.is_true(ck.is_link(linked .. '/checkpoint'))
   end)

   it('resume into another folder (--resume A --out B): refused where B holds another run, unless overwrite', function()
      local a, b, c = TMP .. '/fork_a', TMP .. '/fork_b', TMP .. '/fork_c'
      nr.train(held_recipe(a, {epochs = 1}))
      nr.train(held_recipe(b, {epochs = 1, seed = 5}))
      local ok, e = pcall(nr.train, held_recipe(b, {epochs = 2, resume = a}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find(b .. ' already holds a run', 1, true), tostring(e))
      assert.equal(1, #epoch_records(b))                          -- B untouched
      assert.equal(b .. '/checkpoint/step-00000008', (ck.find(b)))
      -- overwrite: B holds A's run up to its checkpoint and the continuation (B's own run went);
      -- an empty folder is simply a new run's, with A's history too (it started with none)
      local a_epoch1 = epoch_records(a)[1]
      local s = nr.train(held_recipe(b, {epochs = 2, resume = a, overwrite = true}))
      assert.equal(16, s.steps)
      assert.is_false(ck.is_dir(b .. '/checkpoint/step-00000008'))
      local recs = epoch_records(b)
      assert.equal(2, #recs); assert.same(a_epoch1, recs[1]); assert.equal(2, recs[2].epoch)
      assert.equal(16, nr.train(held_recipe(c, {epochs = 2, resume = a})).steps)
      recs = epoch_records(c)
      assert.equal(2, #recs); assert.same(a_epoch1, recs[1]); assert.equal(2, recs[2].epoch)
      assert.equal(1, #epoch_records(a))                          -- A itself is untouched
      -- the run's own folder by another spelling is the run itself, not another folder
      assert.equal(16, nr.train(held_recipe(a .. '/', {epochs = 2, resume = a .. '/../fork_a'})).steps)
      -- a fork refused because A's weights do not fit leaves nothing of A in D: a new run goes there
      local d = TMP .. '/fork_d'
      local other = function() return nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(64, 4)} end
      ok, e = pcall(nr.train, held_recipe(d, {epochs = 2, resume = a, model = other}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('does not match the model', 1, true), tostring(e))
      assert.is_false(ck.exists(d .. '/metrics.jsonl'))
      assert.equal(8, nr.train(held_recipe(d, {epochs = 1})).steps)
   end)

   it('one writer per run folder: while another process writes into it, a run, --overwrite and --resume are refused', function()
      local util = require 'tests.lua.spec_util'
      local dir = TMP .. '/busy'
      nr.train(held_recipe(dir, {epochs = 1}))       -- finished: its lock is released (the holder below gets it)
      local metrics = ck.read_file(dir .. '/metrics.jsonl')
      -- a second nrlua holds the folder's lock as a running training does, until told to stop
      local script = TMP .. '/hold_lock.lua'
      ck.write_atomic(script, [[
local ck = require 'nr.checkpoint'
local dir = arg[1]
local h = assert(ck.lock(dir .. '/.nrlua.lock'))
ck.write_atomic(dir .. '/holder.ready', 'ready')
local t0 = os.time()
while not ck.exists(dir .. '/holder.stop') and os.time() - t0 < 60 do os.execute('sleep 0.05') end
h:release()
]])
      os.execute(string.format('%s %s %s > %s/holder.log 2>&1 &', util.nrlua(), script, dir, TMP))
      local t0 = os.time()
      while not ck.exists(dir .. '/holder.ready') and os.time() - t0 < 30 do os.execute('sleep 0.05') end
      assert.truthy(ck.exists(dir .. '/holder.ready'), ck.read_file(TMP .. '/holder.log'))
      local pid = tonumber(ck.read_file(dir .. '/.nrlua.lock'))
      for _, extra in ipairs({{epochs = 1}, {epochs = 1, overwrite = true}, {epochs = 2, resume = dir}}) do
         local ok, e = pcall(nr.train, held_recipe(dir, extra))
         assert.is_false(ok)
         assert.equal(string.format('nr.train: %s is in use by another run (process %d): wait for it to end, or give '
            .. 'another --out', dir, pid), e)
      end
      assert.equal(metrics, ck.read_file(dir .. '/metrics.jsonl'))   -- nothing touched
      ck.write_atomic(dir .. '/holder.stop', 'stop')
      local free
      t0 = os.time()
      repeat
         free = ck.lock(dir .. '/.nrlua.lock')
         if not free then os.execute('sleep 0.05') end
      until free or os.time() - t0 > 30
      assert.truthy(free, 'the holder ended')
      free:release()
      assert.equal(2, nr.train(held_recipe(dir, {epochs = 2, resume = dir})).epochs)
   end)

   it('checkpoint/best holds the best evaluation also when checkpoint_every skips its epoch', function()
      local dir = TMP .. '/best_every'
      -- a validation set the model can only partly fit: its top-1 goes up and down between epochs
      local vx, vy = synthetic(64, 9)
      local flip = vy:data()
      for i = 0, 63, 3 do flip[i] = (flip[i] + 1) % 4 end
      local s = nr.train(recipe(dir, {epochs = 5, checkpoint_every = 4, lr = nil,
         data = {train = train.memory_loader(X, Y, {batch = 32, shuffle = true, seed = 3}),
                 val = train.memory_loader(vx, vy, {batch = 64})}}))
      local best_epoch, best = nil, -1
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         local rec = ck.json_decode(line)
         if rec.kind == 'epoch' and rec.val.top1 > best then best, best_epoch = rec.val.top1, rec.epoch end
      end
      assert.equal(best_epoch, s.best_epoch)
      local saved = ck.load(dir .. '/checkpoint/' .. ck.read_file(dir .. '/checkpoint/best'):match('[^\n]+'))
      assert.equal(best_epoch, saved.state.epoch)
   end)

   it('resumed from an earlier checkpoint, checkpoint/best names this run\'s best, not the abandoned epochs\'', function()
      local dir = TMP .. '/best_resume'
      local function fresh(extra) return recipe(dir, extra) end
      nr.train(fresh({epochs = 4, keep = 10}))
      local ckdir = dir .. '/checkpoint'
      local function named(p) return (ck.read_file(ckdir .. '/' .. p) or ''):match('step%-%d+') end
      local at2 = ck.load(ckdir .. '/step-00000016').state
      assert.equal(2, at2.epoch)
      -- the first run's best lies after epoch 2 (written here as if its last epoch had been the best)
      ck.write_atomic(ckdir .. '/best', 'step-00000032\n')
      -- continued from epoch 2 without learning: epochs 3-4 do not beat epoch 2's best and re-save
      -- step-24 and step-32 with other weights
      local s = nr.train(fresh({epochs = 4, keep = 10, resume = ckdir .. '/step-00000016',
                                optim = {lr = 1e-12, momentum = 0}}))
      assert.equal(at2.trainer.best_epoch, s.best_epoch)
      local best = ck.load(ckdir .. '/' .. named('best')).state
      assert.equal(s.best_epoch, best.epoch)
      assert.equal(at2.trainer.best_checkpoint, named('best'))
      -- nr.checkpoint.resumed alone: a later best without a recorded one is removed, an earlier one kept
      ck.write_atomic(ckdir .. '/best', 'step-00000032\n')
      assert.is_nil(ck.resumed(ckdir, 16, nil))
      assert.is_nil(named('best'))
      ck.write_atomic(ckdir .. '/best', 'step-00000008\n')
      assert.equal('step-00000008', ck.resumed(ckdir, 16, nil))
      assert.equal('step-00000016', ck.resumed(ckdir, 24, 'step-00000016'))
      assert.equal('step-00000016', named('best'))
   end)

   it('a failed epoch gives the model its input gradient back (a hook\'s error)', function()
      local calls = 0
      local r = recipe(TMP .. '/hookerr', {epochs = 1, hooks = {after_backward = function()
         calls = calls + 1
         if calls == 3 then error('hook boom', 0) end
      end}})
      local model = convnet()
      r.model = model
      local ok, err = pcall(train.train, r)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('hook boom', 1, true))
      local x = nr.randn({4, 1, 8, 8})
      model:forward(x)
      local gi = model:backward(x, nr.ones({4, 4}))
      assert.is_truthy(gi, 'backward returned nil: the input gradient stayed off')
      assert.same({4, 1, 8, 8}, gi:shape())
   end)

   it('an evaluation counts a shard\'s own samples only (the repeats that pad a shard are left out)', function()
      local tr = train.new(recipe(TMP .. '/eval_unique', {}))
      local vx, vy = synthetic(6, 5)
      local whole = tr:evaluate(train.memory_loader(vx:narrow(1, 1, 5), vy:narrow(1, 1, 5), {batch = 4}))
      local padded = train.memory_loader(vx, vy, {batch = 4})    -- 5 samples + 1 repeat
      padded.unique_samples = function() return 5 end
      local got = tr:evaluate(padded)
      assert.equal(5, got.n)
      assert.equal(whole.top1, got.top1)
      assert.is_true(math.abs(whole.loss - got.loss) <= 1e-6 * math.abs(whole.loss))
   end)

   it('resuming with a schedule the run did not have is refused (it would start mid-run)', function()
      local dir = TMP .. '/sched_add'
      nr.train(recipe(dir, {epochs = 2, schedule = false}))
      local ok, e = pcall(nr.train, recipe(dir, {epochs = 4, resume = dir}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('was trained without a schedule; resuming with schedule "cosine" would start it '
         .. 'from its first epoch at epoch 3', 1, true), tostring(e))
      assert.equal(4, nr.train(recipe(dir, {epochs = 4, resume = dir, schedule = false})).epochs)
   end)

   it('a file system without locks: the run goes on, and says the folder is not guarded', function()
      -- flock failing with ENOSYS (Lustre mounted noflock, NFS without a lock daemon), by a preload
      local util = require 'tests.lua.spec_util'
      local shim_c, shim = TMP .. '/noflock.c', TMP .. '/noflock.so'
      ck.write_atomic(shim_c, '#include <errno.h>\nint flock(int fd, int op) { (void)fd; (void)op; errno = ENOSYS; return -1; }\n')
      local _, rc = util.run(string.format('cc -shared -fPIC -o %s %s', shim, shim_c))
      assert.equal(0, rc, 'cc could not build the flock shim')
      local script = TMP .. '/nolock_run.lua'
      ck.write_atomic(script, string.format([[
local nr = require 'nr'
local train = require 'nr.train'
local x, y = nr.randn({32, 4}), nr.zeros({32}, {dtype = 'int64'})
local s = nr.train{name = 'nolock', model = function() return nr.nn.Sequential{nr.nn.Linear(4, 2)} end,
   data = {train = train.memory_loader(x, y, {batch = 16}), val = train.memory_loader(x, y, {batch = 16})},
   optim = {lr = 0.1}, epochs = 1, out = %q}
print('epochs', s.epochs)
]], TMP .. '/nolock'))
      -- (a sanitizer build's runtime must come first in the preload list)
      local exe = util.nrlua()
      local asan = util.run(string.format("ldd %s | awk '/libasan/ {print $3}'", exe)):match('%S+')
      local preload = asan and (asan .. ':' .. shim) or shim
      local out, code = util.run(string.format('LD_PRELOAD=%s %s %s', preload, exe, script))
      assert.equal(0, code, out)
      assert.truthy(out:find('is on a file system without file locks', 1, true), out)
      assert.truthy(out:find('epochs\t1', 1, true), out)
   end)

   it('refuses a seed or thread count that would wrap at the FFI', function()
      for _, c in ipairs({{{seed = 1.5}, 'seed'}, {{seed = -1}, 'seed'}, {{threads = 2 ^ 31}, 'threads'},
                          {{threads = -2}, 'threads'}}) do
         local ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_' .. c[2], c[1]))
         assert.is_false(ok)
         assert.truthy(tostring(e):find('nr.train: ' .. c[2] .. ' must be', 1, true), tostring(e))
      end
      -- counts out of range, and empty folder names (--out '' wrote the run into the current folder)
      for _, c in ipairs({{{epochs = 1e300}, 'epochs must be an integer in %[1, 2%^31 %- 1%]'},
                          {{checkpoint_every = -1}, 'checkpoint_every must be'}, {{log_every = 0}, 'log_every must be'},
                          {{keep = 0}, 'keep must be'}, {{out = ''}, 'out is an empty folder name'},
                          {{out = 5}, 'out must be a folder name %(a string%), got 5'},
                          {{resume = true}, 'resume must be a folder name %(a string%), got true'},
                          {{name = '../../x'}, 'name must be a plain folder name %(no /%), got "%.%./%.%./x"'}}) do
         local ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_count', c[1]))
         assert.is_false(ok)
         assert.truthy(tostring(e):find('nr.train: ' .. c[2]), tostring(e))
      end
      -- a near miss of a field nr.train reads, or a flag alias at the top, is an error (it trained with
      -- the default after a note on the console); other extra fields are the recipe's own and pass
      for _, c in ipairs({{{epoch = 5}, 'recipe.epoch is not a field nr.train reads (did you mean epochs?); as it is, '
                             .. 'the run would train with epochs at its default'},
                          {{lr = 9}, 'recipe.lr is not a field nr.train reads (did you mean optim.lr?)'},
                          -- other frameworks' names (learning_rate trained at optim.lr's default)
                          {{learning_rate = 9}, 'recipe.learning_rate is not a field nr.train reads (did you mean optim.lr?)'},
                          {{batch_size = 4}, 'recipe.batch_size is not a field nr.train reads (did you mean data.batch?)'}}) do
         local r = held_recipe(TMP .. '/typo', {epochs = 1, progress = {stream = sink(), tty = false}})
         for k, v in pairs(c[1]) do r[k] = v end
         local ok, e = pcall(nr.train, r)
         assert.is_false(ok)
         assert.truthy(tostring(e):find(c[2], 1, true), tostring(e))
      end
      local out = sink()
      nr.train(held_recipe(TMP .. '/typo_own', {epochs = 1, width = 2, progress = {stream = out, tty = false}}))
      assert.falsy(out:text():find('recipe.width', 1, true))
      -- an unknown dataset is named first (not as a split it cannot open); data.size within the loader's limit
      for _, c in ipairs({{{dataset = 'foo'}, 'nr.train: unknown dataset "foo" (fashion-mnist'},
                          {{dataset = 'fashion-mnist', size = 2 ^ 21}, 'nr.train: data.size must be an integer in'}}) do
         local ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_data', {data = c[1]}))
         assert.is_false(ok)
         assert.truthy(tostring(e):find(c[2], 1, true), tostring(e))
      end
      -- a split the dataset lacks: where it looked ("in nil" before) and no advice to install the dataset
      -- (scripts/test.sh installs Debian's dataset-fashion-mnist: without it this check would not run)
      assert(ck.exists('/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz'), 'dataset-fashion-mnist is not installed')
      do
         local ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_split', {data = {dataset = 'fashion-mnist', train_split = 'valid'}}))
         assert.is_false(ok)
         assert.truthy(tostring(e):find('cannot open the valid split of fashion-mnist in its default folder: nr.data.dataset: '
            .. 'split must be train or test, got "valid"', 1, true), tostring(e))
         assert.falsy(tostring(e):find('To get it', 1, true), tostring(e))
      end
      -- an augment table without a word on normalisation (it replaces the default whole: the run
      -- trained on unnormalised inputs); with one it builds
      do
         local ok, e = pcall(train.new, held_recipe(TMP .. '/aug', {data = {dataset = 'fashion-mnist', augment = {flip = true}}}))
         assert.is_false(ok)
         assert.truthy(tostring(e):find("data.augment replaces the dataset's default augmentation (for training "
            .. '{normalize = true}), normalisation included: say normalize = true', 1, true), tostring(e))
         -- a run that trained so is evaluated (and resumed) as it was: its recipe.json holds it
         assert.is_truthy(train.new(held_recipe(TMP .. '/aug_eval', {data = {dataset = 'fashion-mnist', augment = {flip = true},
            train_batches = 1, val_batches = 1}}), true))
         local tr = train.new(held_recipe(TMP .. '/aug', {data = {dataset = 'fashion-mnist', augment = {flip = true, normalize = false},
            train_batches = 1, val_batches = 1}}))
         local x = tr.train_loader:epoch(1)()
         assert.is_true(x:min() >= 0 and x:max() <= 1)   -- unnormalised, as asked
      end
      -- sections of the wrong type are named (they failed inside the trainer as raw Lua errors)
      for _, c in ipairs({{{loss = 5}, 'recipe.loss must be a table, got 5'}, {{optim = 'sgd'}, 'recipe.optim must be a table'},
                          {{data = {train = {}}}, 'recipe.data.train must be a loader'},
                          {{data = {train = train.memory_loader(X, Y), val = train.memory_loader(X:narrow(1, 1, 0), Y:narrow(1, 1, 0))}},
                           'the evaluation data (recipe.data.val, a ready-made loader) is empty: it gives 0 batches'},
                          -- data fields of the wrong type (root = true: a raw Lua error in nr.checkpoint)
                          {{data = {root = true}}, 'recipe.data.root must be a string, got true'},
                          {{data = {dataset = 5}}, 'recipe.data.dataset must be a string, got 5'},
                          {{data = {drop_last = 'yes'}}, 'recipe.data.drop_last must be a boolean, got "yes"'},
                          -- a misspelt loss option trained without label smoothing, silently
                          {{loss = {label_smooth = 0.1}}, 'recipe.loss has no option "label_smooth" (options: label_smoothing)'},
                          {{nr = {policy = 'x'}}, 'recipe.nr.policy must be a table of functions, got "x"'}}) do
         local ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_table', c[1]))
         assert.is_false(ok)
         assert.truthy(tostring(e):find('nr.train: ' .. c[2], 1, true), tostring(e))
      end
      local r = held_recipe(TMP .. '/bad_val', {})
      r.data.val_batches = 0
      local okv, ev = pcall(nr.train, r)
      assert.is_false(okv)
      assert.truthy(tostring(ev):find('nr.train: data.val_batches must be', 1, true), tostring(ev))
      assert.equal(os.getenv('HOME') .. '/x', train.expand_path('~/x', 'out'))
      assert.equal('~nouser/x', train.expand_path('~nouser/x', 'out'))
      -- what the library says about the recipe comes without a position inside lua/nr (nrlua then
      -- prints no traceback); an error in the recipe's own code keeps its position
      local ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_lr', {optim = {lr = -1, momentum = 0.9}}))
      assert.is_false(ok)
      assert.equal('nr.optim.SGD: config.lr must be a finite number >= 0, got -1', e)
      -- the zoo's refusals too (a misspelt model option came with models/vgg.lua:N and a traceback)
      ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_zoo', {model = {name = 'vgg', depht = 19, dataset = 'cifar10'}}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('^nr%.models%.vgg: unknown option "depht"'), tostring(e))
      ok, e = pcall(nr.train, held_recipe(TMP .. '/bad_model', {model = function() local m = nil; return m.x end}))
      assert.is_false(ok)
      assert.truthy(e:find('^[^\n]*train_spec%.lua:%d+: attempt to index'), e)
   end)

   it('resume: a missing folder is an error; a finished run resumed reports its final evaluation', function()
      local ok, e = pcall(nr.train, held_recipe(TMP .. '/fin', {epochs = 1, resume = TMP .. '/no-such-run'}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('resume: no run folder ' .. TMP .. '/no-such-run', 1, true))
      assert.is_false(ck.is_dir(TMP .. '/no-such-run'))
      local s1 = nr.train(held_recipe(TMP .. '/fin', {epochs = 1}))
      local s2 = nr.train(held_recipe(TMP .. '/fin', {epochs = 1, resume = TMP .. '/fin'}))
      assert.is_number(s1.final_top1)
      assert.equal(s1.final_top1, s2.final_top1); assert.equal(s1.final_loss, s2.final_loss)
   end)

   it('a warm-up runs while held (then the LR holds at its end); an epoch ending inside it is not held', function()
      local lrs = {}
      local r = held_recipe(TMP .. '/w', {schedule = {name = 'cosine', warmup = 0.5},
                                          hooks = {epoch_begin = hold_first(2), after_step = lr_log(lrs)}})
      local tr = train.new(r)
      tr.extend_held = true
      local summary = tr:run()
      -- steps 1-4: the warm-up from 0 (warmup_start) up; then the post-warm-up LR (base) while held
      assert.equal(0, lrs[1])
      for i = 2, 4 do assert.is_true(lrs[i] > lrs[i - 1] and lrs[i] < 0.05) end
      for i = 5, 16 do assert.equal(0.05, lrs[i]) end
      assert.equal(2, summary.held_epochs); assert.equal(5, summary.epochs); assert.equal(3, tr.schedule.epoch)
      -- released, the schedule goes on from half way into its first epoch: it decays at every step,
      -- across its epoch ends inside the trainer's epochs (it stood still for half an epoch at each
      -- end before), and the half epoch the warm-up ran while held ends the run at the final LR
      for i = 18, 36 do assert.is_true(lrs[i] < lrs[i - 1], 'step ' .. i .. ': ' .. lrs[i] .. ' after ' .. lrs[i - 1]) end
      for i = 37, 40 do assert.is_true(lrs[i] < 1e-12) end
      -- a warm-up longer than the first held epoch: that epoch is a schedule epoch
      local r2 = held_recipe(TMP .. '/w2', {schedule = {name = 'cosine', warmup = 1.5}, hooks = {epoch_begin = hold_first(2)}})
      local tr2 = train.new(r2)
      tr2.extend_held = true
      local s2 = tr2:run()
      assert.equal(1, s2.held_epochs); assert.equal(4, s2.epochs); assert.equal(3, tr2.schedule.epoch)
   end)

   it('a hold released mid-epoch (a Δt-steps check): that epoch counts as held and the whole schedule still runs', function()
      local plain = {}
      nr.train(held_recipe(TMP .. '/m0', {hooks = {after_step = lr_log(plain)}}))
      local lrs = {}
      local release = function(t) if t.step == 12 then t.schedule_hold = false end end
      local r = held_recipe(TMP .. '/m', {hooks = {epoch_begin = hold_first(2), after_step = {release, lr_log(lrs)}}})
      local tr = train.new(r)
      tr.extend_held = true
      local summary = tr:run()
      assert.equal(2, summary.held_epochs); assert.equal(5, summary.epochs); assert.equal(3, tr.schedule.epoch)
      for i = 1, 12 do assert.equal(0.05, lrs[i]) end                 -- held until the release at step 12
      assert.equal(40, #lrs)
      for i = 1, 24 do assert.equal(plain[i], lrs[16 + i]) end        -- then the whole schedule, from its start
      -- released inside a warm-up (which runs while held): nothing stood still, nothing rewinds
      local wplain, wlrs = {}, {}
      local wr = {name = 'cosine', warmup = 1}
      nr.train(held_recipe(TMP .. '/mw0', {schedule = wr, hooks = {after_step = lr_log(wplain)}}))
      local wt = train.new(held_recipe(TMP .. '/mw', {schedule = wr,
         hooks = {train_begin = function(t0) t0.schedule_hold = true end, after_step = {function(t0)
            if t0.step == 6 then t0.schedule_hold = false end
         end, lr_log(wlrs)}}}))
      wt.extend_held = true
      local ws = wt:run()
      assert.equal(0, ws.held_epochs); assert.equal(3, ws.epochs)
      assert.same(wplain, wlrs)
      -- without extend_held (a fixed epoch count) a release is not rewound either: the schedule
      -- keeps the steps it ran
      local fl = {}
      local ft = train.new(held_recipe(TMP .. '/mf', {hooks = {epoch_begin = hold_first(1), after_step = {function(t0)
         if t0.step == 2 then t0.schedule_hold = false end
      end, lr_log(fl)}}}))
      local fs = ft:run()
      assert.equal(0, fs.held_epochs); assert.equal(3, fs.epochs); assert.equal(3, ft.schedule.epoch)
   end)

   it('without extend_held a held schedule does not lengthen the run; without a hold extend_held changes nothing', function()
      local summary = nr.train(held_recipe(TMP .. '/y', {hooks = {epoch_begin = hold_first(2)}}))
      assert.equal(3, summary.epochs); assert.equal(24, summary.steps); assert.equal(2, summary.held_epochs)
      local _, st = weights_of(TMP .. '/y')
      assert.equal(1, st.schedule.epoch)
      -- extend_held with no hold: bit-identical to the plain run of the previous test
      local s2 = nr.train(held_recipe(TMP .. '/z', {hooks = {train_begin = extend}}))
      assert.equal(3, s2.epochs); assert.equal(24, s2.steps); assert.equal(0, s2.held_epochs)
      local d = first_difference(weights_of(TMP .. '/x0'), weights_of(TMP .. '/z'))
      assert(d == nil, 'extend_held without a hold changed the run: ' .. tostring(d))
   end)

   it('max_epochs caps a run whose schedule stays held (default 2 x epochs)', function()
      local r = held_recipe(TMP .. '/c', {max_epochs = 5, hooks = {train_begin = extend, epoch_begin = hold_first(100)}})
      local s = r.progress.stream
      local tr = train.new(r)
      local summary = tr:run()
      assert.equal(5, summary.epochs); assert.equal(40, summary.steps); assert.equal(5, summary.held_epochs)
      assert.is_true(summary.capped)
      assert.equal(0, tr.schedule.epoch)
      local text = s:text()
      assert.truthy(text:find('epoch 5/5 (+5 held, max 5)', 1, true))
      assert.truthy(text:find('note: stopped at max_epochs = 5 with 5 held epochs; the schedule ran 0 of its 3 epochs', 1, true))
      local sd = nr.train(held_recipe(TMP .. '/c2', {hooks = {train_begin = extend, epoch_begin = hold_first(100)}}))
      assert.equal(6, sd.epochs); assert.equal(48, sd.steps); assert.is_true(sd.capped)
      -- epochs 2, held 1: the cap is not reached
      local s3 = nr.train(held_recipe(TMP .. '/c3', {epochs = 2, max_epochs = 3, hooks = {train_begin = extend, epoch_begin = hold_first(1)}}))
      assert.equal(3, s3.epochs); assert.is_nil(s3.capped)
      assert.has_error(function() train.new(held_recipe(TMP .. '/c4', {max_epochs = 2})) end)
   end)

   it('resume: a state.json with impossible epoch or step values is damaged, not a run to continue', function()
      local dir = TMP .. '/dmg'
      nr.train(held_recipe(dir, {epochs = 1}))
      local latest = ck.find(dir)
      local st = ck.json_decode(ck.read_file(latest .. '/state.json'))
      st.epoch, st.step = 1e300, -5
      ck.write_atomic(latest .. '/state.json', ck.json_encode(st))
      local ok, e = pcall(nr.train, held_recipe(dir, {epochs = 2, resume = dir}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('state.json is damaged: epoch 1e+300, step -5', 1, true), tostring(e))
      st.epoch, st.step, st.optimizer = 1, 8, 'garbage'
      ck.write_atomic(latest .. '/state.json', ck.json_encode(st))
      ok, e = pcall(nr.train, held_recipe(dir, {epochs = 2, resume = dir}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('state.json is damaged: optimizer must be a table, got "garbage"', 1, true), tostring(e))
   end)

   it('resume: a run stopped before its first checkpoint starts again; damaged checkpoints are refused', function()
      local ref = nr.train(held_recipe(TMP .. '/early_ref', {epochs = 1}))
      -- what a run killed in its first epoch leaves: its recipe and its first records, no checkpoint
      local dir = TMP .. '/early'
      ck.mkdirs(dir)
      ck.write_atomic(dir .. '/recipe.json', '{}\n')
      ck.write_atomic(dir .. '/metrics.jsonl', '{"kind":"run","event":"begin"}\n{"kind":"step","epoch":1,"iter":4}\n')
      local out = sink()
      local s = nr.train(held_recipe(dir, {epochs = 1, resume = dir, progress = {stream = out, tty = false}}))
      assert.truthy(out:text():find('no checkpoint in ' .. dir .. ' yet', 1, true), out:text())
      assert.equal(ref.final_top1, s.final_top1); assert.equal(ref.final_loss, s.final_loss)
      local runs = {}
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         local rec = ck.json_decode(line)
         if rec.kind == 'run' then runs[#runs + 1] = rec end
      end
      assert.equal(1, #runs); assert.equal('begin', runs[1].event); assert.equal(1, runs[1].epochs) -- the old records went
      -- a folder with no run, or a run resumed into another --out, is refused and nothing is removed
      local empty, other = TMP .. '/early_empty', TMP .. '/early_other'
      ck.mkdirs(empty)
      ck.write_atomic(empty .. '/notes.txt', 'mine')
      local ok0, e0 = pcall(nr.train, held_recipe(empty, {epochs = 1, resume = empty}))
      assert.is_false(ok0)
      assert.truthy(tostring(e0):find('cannot resume ' .. empty .. ': it holds no run', 1, true), tostring(e0))
      nr.train(held_recipe(other, {epochs = 1}))
      ck.write_atomic(empty .. '/metrics.jsonl', '{"kind":"run","event":"begin"}\n')
      local ok1, e1 = pcall(nr.train, held_recipe(other, {epochs = 1, resume = empty}))
      assert.is_false(ok1)
      assert.truthy(tostring(e1):find('a run restarts only in its own folder', 1, true), tostring(e1))
      assert.equal(1, #epoch_records(other))                     -- the finished run is untouched
      assert.equal('mine', ck.read_file(empty .. '/notes.txt'))
      -- a checkpoint that exists but is damaged is not thrown away: an error naming --overwrite
      local latest = ck.find(dir)
      ck.write_atomic(latest .. '/state.json', 'garbage')
      local ok, e = pcall(nr.train, held_recipe(dir, {epochs = 1, resume = dir}))
      assert.is_false(ok)
      assert.truthy(tostring(e):find('nr.train: cannot resume ' .. dir .. ': ', 1, true), tostring(e))
      assert.truthy(tostring(e):find('--overwrite starts the run again from the beginning', 1, true), tostring(e))
   end)

   it('resume: a run whose first checkpoint was cut short (no state.json: killed, a full disk) starts again', function()
      local ref = nr.train(held_recipe(TMP .. '/cut_ref', {epochs = 1}))
      -- what a full disk (or a kill) during the first save leaves: the step folder without state.json
      local dir = TMP .. '/cut'
      ck.mkdirs(dir .. '/checkpoint/step-00000008')
      ck.write_atomic(dir .. '/recipe.json', '{}\n')
      ck.write_atomic(dir .. '/metrics.jsonl', '{"kind":"run","event":"begin"}\n{"kind":"epoch","epoch":1,"step":8}\n')
      ck.write_atomic(dir .. '/checkpoint/step-00000008/model.safetensors', 'half')
      local out = sink()
      local s = nr.train(held_recipe(dir, {epochs = 1, resume = dir, progress = {stream = out, tty = false}}))
      assert.truthy(out:text():find('no checkpoint in ' .. dir .. ' yet', 1, true), out:text())
      assert.equal(ref.final_top1, s.final_top1); assert.equal(ref.final_loss, s.final_loss)
      assert.equal(1, #epoch_records(dir))                       -- the cut run's records went
      assert.equal(TMP .. '/cut/checkpoint/step-00000008', (ck.find(dir)))
   end)

   it('resume into another folder from a damaged checkpoint names the damage, not "drop --out"', function()
      local dir = TMP .. '/crc_src'
      nr.train(held_recipe(dir, {epochs = 1}))
      local step = ck.find(dir)
      -- one bit flipped on disk: the CRC-32 check refuses the only checkpoint
      local bytes = ck.read_file(step .. '/model.safetensors')
      local at = #bytes - 3
      ck.write_atomic(step .. '/model.safetensors', bytes:sub(1, at - 1) .. string.char((bytes:byte(at) + 1) % 256) .. bytes:sub(at + 1))
      for _, resume in ipairs({dir, step}) do
         local ok, err = pcall(nr.train, held_recipe(TMP .. '/crc_dst', {epochs = 2, resume = resume}))
         assert.is_false(ok)
         err = tostring(err)
         assert.truthy(err:find('CRC-32', 1, true), err)
         -- a restart in the run's own folder would not help: the checkpoint exists, it is damaged
         assert.is_nil(err:find('drop --out', 1, true), err)
      end
   end)

   it('a checkpoint write that fails (a full disk) says so, removes its folder and keeps the previous one', function()
      local dir = TMP .. '/full'
      local sts = require 'nr.safetensors'
      local save = sts.save
      local r = held_recipe(dir, {epochs = 2})
      r.hooks = {epoch_begin = function(_, info)
         if info.epoch == 2 then
            sts.save = function(path, ...)
               if path:match('state%.safetensors$') then
                  error('/x/nr/safetensors.lua:112: nr.safetensors.save: writing ' .. path .. '.tmp.1: No space left on device', 0)
               end
               return save(path, ...)
            end
         end
      end}
      local ok, err = pcall(nr.train, r)
      sts.save = save
      assert.is_false(ok)
      err = tostring(err)
      assert.truthy(err:find('nr.train: cannot write the checkpoint of epoch 2 (step 16) into ' .. dir .. '/checkpoint: '
         .. 'nr.safetensors.save: writing ' .. dir .. '/checkpoint/step-00000016/state.safetensors.tmp.1: No space left', 1, true), err)
      assert.truthy(err:find('The last complete checkpoint, ' .. dir .. '/checkpoint/step-00000008, is intact: --resume '
         .. dir .. ' continues from it.', 1, true), err)
      assert.is_false(ck.is_dir(dir .. '/checkpoint/step-00000016'))   -- its space is free again
      assert.equal(dir .. '/checkpoint/step-00000008', (ck.find(dir)))
      local s = nr.train(held_recipe(dir, {epochs = 2, resume = dir}))
      assert.equal(16, s.steps)
   end)

   it('resumes exactly across the extension: killed while held and after it, bit for bit', function()
      for _, kill in ipairs({2, 4}) do
         local dir = TMP .. '/xr' .. kill
         local hooks = {train_begin = extend, epoch_begin = {hold_first(2), function(_, info)
            if info.epoch == kill then error('simulated kill before epoch ' .. kill, 0) end
         end}}
         local ok, err = pcall(nr.train, held_recipe(dir, {hooks = hooks}))
         assert.is_false(ok)
         assert.truthy(tostring(err):find('simulated kill', 1, true))
         local _, st = weights_of(dir)
         assert.equal(kill - 1, st.epoch); assert.equal(math.min(kill - 1, 2), st.trainer.held_epochs)
         nr.manual_seed(999)
         local summary = nr.train(held_recipe(dir, {resume = dir, hooks = {train_begin = extend, epoch_begin = hold_first(2)}}))
         assert.equal(5, summary.epochs); assert.equal(40, summary.steps); assert.equal(2, summary.held_epochs)
         local d = first_difference(weights_of(TMP .. '/x'), weights_of(dir))
         assert(d == nil, 'resumed run (killed before epoch ' .. kill .. ') differs: ' .. tostring(d))
         local _, st2 = weights_of(dir)
         assert.equal(3, st2.schedule.epoch)
         assert.equal(5, #epoch_records(dir))
      end
   end)

   it('builds loaders from recipe.data for a real dataset (Fashion-MNIST, when installed)', function()
      local root = '/usr/share/datasets/fashion-mnist'
      if not ck.exists(root .. '/train-images-idx3-ubyte.gz') then pending('dataset-fashion-mnist is not installed'); return end
      local function run(output)
         local out = TMP .. '/fm-' .. tostring(output)
         local s = nr.train{
            model = function() return nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(784, 10)} end,
            data = {dataset = 'fashion-mnist', root = root, batch = 64, threads = 1, train_batches = 3, val_batches = 1,
                    eval_batch = 100, output = output},
            optim = {lr = 0.05}, epochs = 2, out = out, progress = {stream = sink(), tty = false},
         }
         return s, weights_of(out)
      end
      local s, w = run(nil)
      assert.equal(6, s.steps)
      assert(s.final_top1 > 20, 'a linear model learns something in 6 steps: ' .. tostring(s.final_top1))
      -- loaders handing out bytes, finished by the trainer (the default on a GPU), train the same bits
      local s8, w8 = run('uint8')
      assert.is_nil(first_difference(w, w8))
      assert.equal(s.final_loss, s8.final_loss)
      assert.equal(s.final_top1, s8.final_top1)
   end)

   it('recipe.data: an unknown key is an error; drop_last reaches the training loader', function()
      local root = '/usr/share/datasets/fashion-mnist'
      if not ck.exists(root .. '/train-images-idx3-ubyte.gz') then pending('dataset-fashion-mnist is not installed'); return end
      local function data_recipe(data)
         data.dataset, data.root, data.threads = 'fashion-mnist', root, 1
         return {model = function() return nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(784, 10)} end, data = data,
                 epochs = 1, out = TMP .. '/dk', progress = {stream = sink(), tty = false}}
      end
      local ok, err = pcall(train.new, data_recipe({bacth = 7}))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('recipe.data has no option "bacth"', 1, true))
      assert.equal(9, train.new(data_recipe({batch = 7000})).iters_per_epoch)              -- 60000 / 7000 = 8.6
      assert.equal(8, train.new(data_recipe({batch = 7000, drop_last = true})).iters_per_epoch)
      -- a batch past the split with drop_last: no step at all, said as such (the schedule said "got 0")
      local ok2, err2 = pcall(train.new, data_recipe({batch = 70000, drop_last = true}))
      assert.is_false(ok2)
      assert.truthy(tostring(err2):find('the train split of fashion-mnist gives no batch per epoch: 60000 samples, batch 70000 '
         .. 'with drop_last', 1, true), tostring(err2))
   end)

   it('a zoo model that does not fit the data is refused before the run (classes, sample size)', function()
      local root = '/usr/share/datasets/fashion-mnist'
      if not ck.exists(root .. '/train-images-idx3-ubyte.gz') then pending('dataset-fashion-mnist is not installed'); return end
      local function try(model, dir, size)
         local ok, err = pcall(nr.train, {model = model, epochs = 1, out = TMP .. '/' .. dir, progress = {stream = sink(), tty = false},
            data = {dataset = 'fashion-mnist', root = root, batch = 8, threads = 1, train_batches = 1, val_batches = 1, size = size}})
         assert.is_false(ok)
         assert.is_false(ck.exists(TMP .. '/' .. dir .. '/metrics.jsonl'))  -- nothing of a run was written
         return tostring(err)
      end
      local e = try({name = 'mobilenet', width = 0.25, classes = 5, input = 32}, 'fit1')
      assert.truthy(e:find('the model has 5 outputs but the fashion-mnist dataset has 10 classes (--model.classes 10)', 1, true), e)
      -- VGG-16's pool head is sized for its input (224): 112 x 112 samples cannot pass it
      e = try({name = 'vgg', depth = 16, classes = 10}, 'fit2', 112)
      assert.truthy(e:find("the model does not take the data's samples (3 x 112 x 112)", 1, true), e)
   end)

   it("the user's own model is checked against the dataset's classes: before the run where its shapes can be computed, "
      .. "else at its first forward (more outputs trained silently)", function()
      local root = '/usr/share/datasets/fashion-mnist'
      if not ck.exists(root .. '/train-images-idx3-ubyte.gz') then pending('dataset-fashion-mnist is not installed'); return end
      local function run(k, dir, opaque)
         return pcall(nr.train, {model = function()
               local m = nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(784, k)}
               if opaque == 'error' then m.modules[2].outputShape = function() error('no shapes here') end end
               if opaque == 'default' then -- a module with Module's default outputShape (the identity): not trusted
                  local r = nr.nn.ReLU()
                  r.outputShape = require('nr.nn.module').outputShape
                  m:add(r)
               end
               return m
            end,
            epochs = 1, out = TMP .. '/' .. dir, progress = {stream = sink(), tty = false},
            data = {dataset = 'fashion-mnist', root = root, batch = 8, threads = 1, train_batches = 1, val_batches = 1}})
      end
      for _, c in ipairs({{12, false}, {4, false}, {12, 'error'}, {12, 'default'}}) do
         local k, opaque = c[1], c[2]
         local dir = 'own' .. k .. (opaque or '')
         local ok, err = run(k, dir, opaque)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(string.format('the model gives %d outputs per sample but the fashion-mnist dataset has '
            .. '10 classes: its last layer should have 10 outputs (class ids 0..9)', k), 1, true), err)
         -- with computable shapes nothing of a run was written (a rerun needs no --overwrite)
         assert.equal(opaque ~= false, ck.exists(TMP .. '/' .. dir .. '/metrics.jsonl'), dir)
      end
      assert.is_true((run(10, 'own10')))
      assert.is_true((run(10, 'own10error', 'error')))
   end)

   it("loader threads: the recipe's, else nr.data's default on the CPU and the host's free cores on a GPU", function()
      local C = require('nr.ffi').C
      assert.equal(3, train.data_threads({threads = 3}, 'cuda'))
      assert.equal(3, train.data_threads({threads = 3}, 'cpu'))
      local env = tonumber(os.getenv('NR_DATA_THREADS') or '')
      if env and env >= 1 then -- the environment decides everywhere
         assert.equal(math.floor(env), train.data_threads({}, 'cpu'))
         assert.equal(math.floor(env), train.data_threads({}, 'cuda'))
         return
      end
      assert.equal(2, train.data_threads({}, 'cpu'))
      local avail, online = C.nr_cpu_available(), C.nr_cpu_online()
      assert.is_true(avail >= 1 and online >= avail)
      assert.equal(math.max(2, math.min(32, avail - 1)), train.data_threads({}, 'cuda'))
      -- four ranks on this machine: a quarter each
      local saved = package.loaded['nr.dist']
      package.loaded['nr.dist'] = {local_size = function() return 4 end}
      local ok, got = pcall(train.data_threads, {}, 'cuda:0')
      package.loaded['nr.dist'] = saved
      assert.is_true(ok, tostring(got))
      assert.equal(math.max(2, math.min(32, math.floor(math.min(avail, online) / 4) - 1)), got)
   end)

   it('explains a missing dataset and how to get it', function()
      local ok, err = pcall(nr.train, {model = convnet, data = {dataset = 'fashion-mnist', root = TMP .. '/no-such-dir'},
                                       epochs = 1, out = TMP .. '/m', progress = {stream = sink(), tty = false}})
      assert.is_false(ok)
      assert.truthy(tostring(err):find('apt-get install dataset-fashion-mnist', 1, true))
      assert.truthy(tostring(err):find('--data', 1, true))
   end)

   it('clip_grad_norm scales the gradients after the after_backward hooks, and the step uses them', function()
      local function norm(list)
         local s = 0
         for _, g in ipairs(list) do s = s + g:square():sum() end
         return math.sqrt(s)
      end
      local before, moved, after, seen, lrs, w0 = {}, {}, {}, {}, {}, nil
      -- plain SGD: a step moves the weights by lr times the gradient it used
      local r = recipe(TMP .. '/clip', {epochs = 1, clip_grad_norm = 0.05, optim = {lr = 0.05, momentum = 0, weight_decay = 0},
         hooks = {
            after_backward = function(t)
               local params, grads = t.model:parameters()
               before[#before + 1] = norm(grads)
               w0 = {}
               for i, p in ipairs(params) do w0[i] = p:clone() end
            end,
            after_step = function(t)
               local params, grads = t.model:parameters()
               local d = {}
               for i, p in ipairs(params) do d[i] = p:sub(w0[i]) end
               moved[#moved + 1], after[#after + 1] = norm(d), norm(grads)
               lrs[#lrs + 1], seen[#seen + 1] = t.optimizer.config.lr, t.grad_norm:item()
            end}})
      nr.train(r)
      assert.equal(8, #before)
      for i = 1, #before do
         local want = math.min(before[i], 0.05)
         assert(math.abs(seen[i] - before[i]) <= 1e-5 * before[i], 'step ' .. i .. ': the norm reported')
         assert(math.abs(after[i] - want) <= 1e-4 * want, string.format('step %d: %g after, %g before', i, after[i], before[i]))
         assert(math.abs(moved[i] - lrs[i] * want) <= 1e-3 * lrs[i] * want,
            string.format('step %d moved the weights by %g, not lr x %g', i, moved[i], want))
      end
      assert.is_true(before[1] > 0.05, 'the gradients were not large enough to be clipped')
      local ok, err = pcall(nr.train, recipe(TMP .. '/clip_bad', {clip_grad_norm = -1}))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('clip_grad_norm must be a number > 0 (or nil: no clipping), got -1', 1, true), err)
   end)

   it('evaluate (--eval): a run\'s best checkpoint on the evaluation split, writing nothing', function()
      local where = TMP .. '/eval_out'
      local res = train.evaluate(recipe(where), TMP .. '/a')
      assert.are.equal(summary_a.best_top1, res.top1)
      assert.are.equal(256, res.n)
      assert.truthy(res.weights:match('/a/checkpoint/step%-%d+/model%.safetensors$'), res.weights)
      assert.is_false(ck.is_dir(where))
      local function refused(r, path, want)
         local ok, err = pcall(train.evaluate, r, path)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(want, 1, true), tostring(err))
      end
      refused(recipe(where), TMP .. '/none', 'nr.train.evaluate: cannot open ' .. TMP .. '/none')
      refused(recipe(where, {data = {dataset = 'fashion-mnist', val_split = false}}), TMP .. '/a',
         'the recipe evaluates on no split (data.val_split off)')
      refused(recipe(where, {model = function() return nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(64, 4)} end}),
         TMP .. '/a', 'does not match the model')
   end)

   it('init: a new run starts from given weights, skip leaves layers as built, a resumed run does not read them again', function()
      local src = ck.load_weights(convnet(), TMP .. '/a') -- the first test's run: its best checkpoint
      local file = TMP .. '/init_src.safetensors'
      ck.save_weights(src, file)
      local function params(m)
         local out = {}
         for _, e in ipairs(m:namedParameters()) do out[e.name] = e.param:clone() end
         return out
      end
      local at_start, built
      local function capture(t) at_start = params(t.model) end
      local function model() local m = convnet(); built = params(m); return m end
      local out = sink()
      nr.train(recipe(TMP .. '/init', {epochs = 1, init = TMP .. '/a', hooks = {train_begin = capture},
         progress = {stream = out, tty = false}}))
      assert.is_nil(first_difference(params(src), at_start))
      assert.truthy(out:text():find('initialized from ' .. TMP .. '/a\n', 1, true), out:text())
      -- the classifier (module 5) left as the model function built it, the rest from the file
      nr.train(recipe(TMP .. '/init_skip', {epochs = 1, model = model, init = {path = file, skip = {'5'}},
         hooks = {train_begin = capture}}))
      for name, t in pairs(params(src)) do
         local want = name:match('^5%.') and built[name] or t
         assert.is_nil(first_difference({[name] = want}, {[name] = at_start[name]}), name)
      end
      assert.is_true(first_difference({w = src:get(6).weight}, {w = at_start['5.weight']}) ~= nil)
      -- killed in epoch 2, then resumed after the init file is gone: the checkpoint is what it reads
      local dir = TMP .. '/init_resume'
      local ok = pcall(nr.train, recipe(dir, {epochs = 2, init = file, hooks = {epoch_begin = function(_, info)
         if info.epoch == 2 then error('killed') end
      end}}))
      assert.is_false(ok)
      os.remove(file)
      local summary = nr.train(recipe(dir, {epochs = 2, init = file, resume = dir}))
      assert.equal(16, summary.steps)
      -- what is wrong with an init is said before the run trains
      local function refused(init, want)
         local okr, err = pcall(nr.train, recipe(TMP .. '/init_bad', {epochs = 1, init = init, overwrite = true}))
         assert.is_false(okr)
         assert.truthy(tostring(err):find(want, 1, true), tostring(err))
      end
      refused(file, 'nr.train: init: cannot open ' .. file .. ': No such file or directory')
      refused({path = TMP .. '/a', skipp = {'5'}}, 'init has no field "skipp" (fields: path, names, skip)')
      refused({path = TMP .. '/a', skip = {'9'}}, 'nr.train: init: skip names 9, which holds no parameter or buffer of the model (modules that do: 0, 1, 5)')
      refused({path = TMP .. '/a', names = 'torchvision'}, 'nr.train: init: not a model nr.models built')
      refused(5, 'init must be a path or a table {path = ..., names = ..., skip = ...}, got 5')
      local m = convnet()
      m:get(2).weight:narrow(1, 1, 4):zero()
      nr.rejuvenate(m, {input_shape = {1, 8, 8}})
      ck.save_weights(m, file)
      refused(file, "holds a rejuvenated model's weights (layers resized or split), which a freshly built model does not fit")
      -- with --overwrite, init is read before the folder is cleared: a failing one leaves the old
      -- run, and the run being replaced can be its own init
      local keep = TMP .. '/init_keep'
      nr.train(recipe(keep, {epochs = 1}))
      local ok2 = pcall(nr.train, recipe(keep, {epochs = 1, overwrite = true, init = {path = TMP .. '/a', skip = {'9'}}}))
      assert.is_false(ok2)
      assert.truthy(ck.find(keep), 'the old run is gone')
      local own = ck.load_weights(convnet(), keep)
      nr.train(recipe(keep, {epochs = 1, overwrite = true, init = keep, hooks = {train_begin = capture}}))
      assert.is_nil(first_difference(params(own), at_start))
   end)

   it('evaluate (--eval) of a weights file inside a run reads the run\'s recipe.json, as of its step folder', function()
      local R = require 'nr.recipe'
      local nn = nr.nn
      -- the model's width is a recipe field: only the run's recipe.json builds a model its weights fit
      local function wide(rc)
         return nn.Sequential{nn.Conv2d(1, rc.width, 3, {padding = 1, bias = false}), nn.BatchNorm2d(rc.width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(rc.width * 4 * 4, 4)}
      end
      local run = TMP .. '/eval_wide'
      nr.train(recipe(run, {epochs = 1, model = wide, width = 12}))
      local base = recipe(TMP .. '/eval_cli', {epochs = 1, model = wide, width = 8})
      local step = ck.find(run)
      for _, path in ipairs({step, step .. '/model.safetensors', run .. '/checkpoint/best'}) do
         local ok, res = pcall(R.evaluate, base, R.apply(base, {'--eval', path}), {'--eval', path})
         assert.is_true(ok, path .. ': ' .. tostring(res))
         assert.are.equal(step .. '/model.safetensors', res.weights)
      end
   end)

   it('stops at the step whose loss is not finite, before that step changes the weights', function()
      local model
      local r = recipe(TMP .. '/nan', {epochs = 1, hooks = {after_step = function(t)
         model = t.model
         if t.step == 3 then t.model:get(6).weight:fill(0 / 0) end
      end}})
      local ok, err = pcall(nr.train, r)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('the loss is nan at step 4 of epoch 1 (lr ', 1, true), err)
      local w = model:get(1).weight:contiguous()
      for i = 1, w:numel() do assert(w:get(i) == w:get(i), 'step 4 reached the first layer\'s weights') end
   end)

   it('stops when the last step of an epoch made the weights NaN: no evaluation, no checkpoint of them', function()
      local dir = TMP .. '/nan_last'
      -- epoch 2's last step (8 steps of 32) diverges: its loss was finite, no later step reads one
      local r = recipe(dir, {epochs = 3, hooks = {after_step = function(t)
         if t.step == 16 then t.model:get(6).bias:fill(0 / 0) end
      end}})
      local ok, err = pcall(nr.train, r)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('the run diverged in epoch 2: parameter 5.bias holds NaN or inf after step 16', 1, true), err)
      assert.truthy(tostring(err):find('the last checkpoint is ' .. dir .. '/checkpoint/step-00000008', 1, true), err)
      -- latest and best stay at epoch 1's weights, which load
      assert.equal('step-00000008', (ck.read_file(dir .. '/checkpoint/latest'):gsub('%s+$', '')))
      assert.equal('step-00000008', (ck.read_file(dir .. '/checkpoint/best'):gsub('%s+$', '')))
      assert.is_nil(ck.exists(dir .. '/checkpoint/step-00000016') or nil)
      local loaded = ck.load(dir)
      for name, t in pairs(loaded.weights) do assert.is_true(t:all_finite(), name) end
   end)

   it('memory_loader checks its batch and seed (batch 0 was named by the schedule as inf iterations)', function()
      for _, c in ipairs({{{batch = 0}, 'batch must be an integer in [1, 2^31 - 1], got 0'},
                          {{batch = 1.5}, 'batch must be an integer in [1, 2^31 - 1], got 1.5'},
                          {{seed = -1}, 'seed must be a non-negative integer'}}) do
         local ok, e = pcall(train.memory_loader, X, Y, c[1])
         assert.is_false(ok)
         assert.truthy(tostring(e):find('nr.train.memory_loader: ' .. c[2], 1, true), tostring(e))
      end
   end)

   it('names a label outside the classes before anything is computed with it', function()
      local y = Y:clone()
      y:set(37, 4)
      local r = recipe(TMP .. '/lab', {epochs = 1, data = {train = train.memory_loader(X, y, {batch = 32})}})
      local ok, err = pcall(nr.train, r)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('labels[4] = 4 is outside 0..3', 1, true), err)
   end)

   it('device batches: a limit, prefetch buffers reused and sliced for a short last batch', function()
      local tr = train.new(recipe(TMP .. '/feed', {epochs = 1}))
      local loader = train.memory_loader(X:narrow(1, 1, 70), Y:narrow(1, 1, 70), {batch = 32})
      local sizes = {}
      for xd, yd, bn, checked in tr:device_batches(loader, 1, 2) do
         sizes[#sizes + 1] = bn
         assert.equal(bn, xd:size(1)); assert.equal(bn, yd:size(1)); assert.is_false(checked)
      end
      assert.same({32, 32}, sizes)  -- the limit stops it before the short third batch
      -- the prefetch helper (here without a GPU it copies at once): a buffer is reused while the
      -- batch fits, a shorter batch is a leading slice of it, a wider one gets a new buffer
      local a, full = train.prefetch(X:narrow(1, 1, 32), nil, 'cpu')
      assert.is_nil(a.ticket)
      local b, full2 = train.prefetch(X:narrow(1, 33, 6), full, 'cpu')
      assert.equal(full, full2); assert.equal(6, b.t:size(1)); assert.is_true(b.t:same_storage(full))
      assert.equal(X:get(32 * 64 + 1), b.t:get(1))
      local _, full3 = train.prefetch(nr.zeros({40, 1, 8, 8}), full, 'cpu')
      assert.are_not.equal(full, full3)
      -- the C entry points refuse CPU destinations and unknown tickets instead of crashing
      local C, ffi = require('nr.ffi').C, require('nr.ffi').ffi
      local tk = ffi.new('int64_t[1]')
      assert.are_not.equal(0, C.nr_cuda_prefetch(nr.zeros({4}).c, nr.zeros({4}).c, tk))
      local msg = ffi.string(C.nr_last_error())
      assert.truthy(msg:find(nr.cuda.built() and 'dst' or 'built without CUDA', 1, true), msg)
      assert.are_not.equal(0, C.nr_cuda_prefetch_wait(0, 1))
   end)

   it('the metrics meter sums on the device and reads back only when asked (as on a GPU)', function()
      local meter = train.meter('cpu', true)
      meter.host = false          -- the GPU policy: no read until one is due
      assert.is_false(meter:due())
      local crit = nr.nn.CrossEntropyLoss()
      nr.manual_seed(3)
      local want_loss, want_hits, want_n = 0, 0, 0
      for step = 1, 3 do
         local x = nr.randn({10, 4})
         local y = nr.tensor({0, 1, 2, 3, 0, 1, 2, 3, 0, step % 4}, {dtype = 'int64'})
         meter:add(x, y, crit:loss_tensor(x, y), step)
         want_loss, want_n = want_loss + crit:forward(x, y) * 10, want_n + 10
         for i = 1, 10 do
            local best = 1
            for j = 2, 4 do if x:get((i - 1) * 4 + j) > x:get((i - 1) * 4 + best) then best = j end end
            if best - 1 == y:get(i) then want_hits = want_hits + 1 end
         end
      end
      assert.equal(0, meter.n)   -- nothing read yet
      assert.equal(30, meter.pending)
      meter:read('a test')
      assert.equal(30, meter.n); assert.equal(want_hits, meter.top1); assert.equal(30, meter.top5)
      assert.is_true(math.abs(meter.loss - want_loss) < 1e-4 * want_loss)
      local w = meter:take_window()
      assert.equal(30, w.n); assert.equal(100 * want_hits / 30, w.top1)
      assert.equal(0, meter:take_window().n)
      -- a non-finite loss is reported with the steps it could have come from
      local x = nr.randn({2, 4})
      local yy = nr.tensor({0, 1}, {dtype = 'int64'})
      meter:add(x, yy, crit:loss_tensor(x, yy), 4)
      meter:add(x, yy, nr.tensor({0 / 0}), 5)
      meter:add(x, yy, crit:loss_tensor(x, yy), 6)
      local ok, err = pcall(meter.read, meter, 'epoch 2', 0.5)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('the loss is nan at a step from 4 to 6 of epoch 2 (lr 0.5)', 1, true), err)
      -- an evaluation's meter (not strict) sums a NaN loss instead of raising
      local ev = train.meter('cpu')
      ev:add(x, yy, nr.tensor({0 / 0}), 1)
      ev:read('the evaluation')
      assert.is_true(ev.loss ~= ev.loss and ev.n == 2)
      -- the device sums start over after a reset
      meter:reset()
      assert.equal(0, meter.acc:get(4))
      -- NaN logits rank above every number (PyTorch's argmax / topk): a NaN model is not 100% right
      local nan = 0 / 0
      local logits = nr.tensor({
         {nan, nan, nan, nan, nan, nan},       -- label 0: the first NaN is the argmax, a hit
         {nan, nan, nan, nan, nan, nan},       -- label 3: three NaNs before it, a top-5 hit only
         {1, nan, 9, 2, 3, 4},                 -- label 2: the NaN ranks first, a top-5 hit only
         {1, 5, 5, 2, nan, nan},               -- label 2: class 1 ties it and two NaNs lead, a top-5 hit
         {1, 2, 3, 4, 5, 6},                   -- label 5: a plain hit
      })
      local labels = nr.tensor({0, 3, 2, 2, 5}, {dtype = 'int64'})
      local m2 = train.meter('cpu')
      m2:add(logits, labels, nr.tensor({0}), 1)
      m2:read('NaN logits')
      assert.equal(2, m2.top1)
      assert.equal(5, m2.top5)
      local m3 = train.meter('cpu')
      m3:add(nr.tensor({{nan, nan, nan, nan, nan, nan, nan}}), nr.tensor({6}, {dtype = 'int64'}), nr.tensor({0}), 1)
      m3:read('NaN logits')
      assert.equal(0, m3.top1)
      assert.equal(0, m3.top5)                -- six NaNs before it
   end)

   it('a long run keeps no per-step Lua state: the tables the trainer reaches stay the same from epoch to epoch', function()
      -- every table reachable from the trainer (keys, values), counted at each epoch's end
      local function reachable(root)
         local seen, n, stack = {}, 0, {root}
         while #stack > 0 do
            local t = table.remove(stack)
            if not seen[t] then
               seen[t], n = true, n + 1
               for k, v in pairs(t) do
                  if type(k) == 'table' then stack[#stack + 1] = k end
                  if type(v) == 'table' then stack[#stack + 1] = v end
               end
            end
         end
         return n
      end
      local counts = {}
      -- log_every = 1 and an evaluation every epoch: a record per step (a list of every record grew by
      -- one table per step for the whole run)
      train.train(recipe(TMP .. '/soak', {epochs = 6, log_every = 1, eval_every = 1,
         hooks = {epoch_end = function(tr) counts[#counts + 1] = reachable(tr) end}}))
      assert.equal(6, #counts)
      for e = 3, 6 do assert.equal(counts[2], counts[e], 'epoch ' .. e .. ': ' .. table.concat(counts, ' ')) end
   end)

   it('a finished run is not kept alive: its trainer and model are collected once the caller drops them', function()
      -- train.running (what a Ctrl-C names) held the last trainer, with its model, optimizer state and loaders
      -- (their threads and batch buffers), after nr.train had returned
      local alive = setmetatable({}, {__mode = 'k'})
      local function run()
         local _, tr = train.train(recipe(TMP .. '/dropped', {epochs = 1}))
         alive[tr], alive[tr.model] = 'trainer', 'model'
      end
      run()
      collectgarbage(); collectgarbage()
      local left = {}
      for _, what in pairs(alive) do left[#left + 1] = what end
      assert.same({}, left)
      assert.is_nil(train.running)
   end)

   it("a run removes the temp files a kill inside an atomic write left in its folder (not the user's)", function()
      local dir = TMP .. '/stale'
      ck.mkdirs(dir)
      local stale = {'recipe.json.tmp.4242', 'metrics.jsonl.tmp.4243'}
      for _, n in ipairs(stale) do ck.write_atomic(dir .. '/' .. n, '{"half": ') end
      ck.write_atomic(dir .. '/notes.txt.tmp.7', 'mine')
      train.train(recipe(dir, {epochs = 1}))
      for _, n in ipairs(stale) do assert.is_false(ck.exists(dir .. '/' .. n), n) end
      assert.is_true(ck.exists(dir .. '/notes.txt.tmp.7'))
      -- and on --resume, whose trim of metrics.jsonl is such a write
      for _, n in ipairs(stale) do ck.write_atomic(dir .. '/' .. n, '{"half": ') end
      train.train(recipe(dir, {epochs = 2, resume = dir}))
      for _, n in ipairs(stale) do assert.is_false(ck.exists(dir .. '/' .. n), n) end
   end)

   it('cleans up', function()
      ck.remove_tree(TMP)
   end)
end)

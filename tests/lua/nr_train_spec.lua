-- Neural Rejuvenation inside nr.train: a real short run on a Fashion-MNIST subset (synthetic data
-- when the dataset is not installed, or with NR_TEST_SYNTHETIC=1) with the adaptive λ checked
-- every few steps.
--
-- Checks: λ starts at 0 and only rises; r reaches T_r within the paper's bound of
-- (1 - T_r)/Δr + O(1) intervals; rejuvenation fires once, resets λ to 0, releases the schedule
-- hold, logs a {kind = 'nr', event = 'rejuvenate'} record with per-layer widths; the held epochs
-- lengthen the run; training goes on with a finite loss; and the checkpoint of the rejuvenated model (NR-CA, split layers) is
-- rebuilt from the recipe and loaded with identical outputs.
local nr = require 'nr'
local nn = nr.nn

local FMNIST = '/usr/share/datasets/fashion-mnist'

local function have_fmnist()
   if os.getenv('NR_TEST_SYNTHETIC') == '1' then return false end
   local f = io.open(FMNIST .. '/train-images-idx3-ubyte.gz', 'rb')
   if f then f:close() return true end
   return false
end

local fixtures = require 'tests.lua.nr_zoo'
local model, synthetic = fixtures.small_net, fixtures.synthetic

local function tmpdir(name)
   local base = os.getenv('NR_TEST_TMP') or '/tmp'
   local d = string.format('%s/nr_train_spec_%s_%d', base, name, os.time())
   os.execute('mkdir -p ' .. d)
   return d
end

local function recipe(out, nrcfg)
   local r = {
      name = 'nr_train_spec', model = model, classes = 10,
      optim = {name = 'sgd', lr = 0.05, momentum = 0.9, weight_decay = 1e-4},
      schedule = {name = 'cosine', warmup = 0},
      epochs = 3, seed = 1, device = 'cpu', out = out, log_every = 10,
      progress = {stream = io.open('/dev/null', 'w')},
      nr = nrcfg,
   }
   if have_fmnist() then
      r.data = {dataset = 'fashion-mnist', root = FMNIST, batch = 64, threads = 1, train_batches = 32, val_batches = 2}
   else
      local x, y = synthetic(2560, 5)
      local vx, vy = synthetic(256, 6)
      local train = require 'nr.train'
      r.data = {train = train.memory_loader(x, y, {batch = 64, shuffle = true, seed = 1}),
                val = train.memory_loader(vx, vy, {batch = 128})}
   end
   return r
end

describe('nr.rejuvenate.attach in nr.train', function()
   local T_r, dr = 0.5, 0.01
   local nrcfg = {
      target = T_r, budget = 1.0, constraint = 'params', scheme = 'CA', rescale = true, times = 1,
      -- no input_shape: attach reads it from the trainer's loader
      threshold = 0.05,   -- a short run: γ oscillate around 0 with amplitude ~ lr·λ/(1 - momentum)
      lambda = {mode = 'adaptive', init = 0, dt = 4, dr = dr, dl = 4e-3},
   }
   local out = tmpdir('run')
   local tr, summary

   it('reaches T_r within the bound, rejuvenates once, keeps training', function()
      local train = require 'nr.train'
      local rc = recipe(out, nrcfg)
      rc.progress = {stream = assert(io.open(out .. '.console', 'w'))}
      tr = train.new(rc)
      assert.is_true(tr.schedule_hold == false)
      summary = tr:run()
      rc.progress.stream:close()
      local ctl = tr.nr
      assert.are.equal(1, ctl.rejuvenations)
      local rep = ctl.reports[1]
      local intervals = #rep.r_history
      local bound = (1 - T_r) / dr
      print(string.format('  rejuvenated at step %d after %d intervals (bound %.0f + O(1)); lambda reached %.3g',
         rep.step, intervals, bound, rep.lambda_history[#rep.lambda_history]))
      print(string.format('  r_params %.3f -> %.3f, cost %d vs target %d (%.2f%%), alpha %.3f (sqrt %.3f)',
         rep.before.r_params, rep.after.r_params, rep.cost, rep.target_cost, 100 * rep.cost_error, rep.alpha, rep.alpha_sqrt))
      assert.is_true(intervals <= bound)
      assert.is_true(rep.before.r_params < T_r)
      assert.is_true(rep.after.r_params > 0.99)
      assert.is_true(math.abs(rep.cost_error) < 0.05)   -- a tiny net: widths of a few channels
      -- λ: starts at 0, never decreases before the rejuvenation, reset after
      assert.are.equal(0, rep.lambda_history[1])
      for i = 2, #rep.lambda_history do assert.is_true(rep.lambda_history[i] >= rep.lambda_history[i - 1]) end
      assert.are.equal(0, ctl.lambda)
      assert.is_false(tr.schedule_hold)
      -- the epochs up to the rejuvenation's (released mid-epoch by the Δt-steps check, so held
      -- too) lengthened the run (cap 2 x 3)
      local held = math.ceil(rep.step / tr.iters_per_epoch)
      print(string.format('  %d held epochs: the run trained %d epochs (3 schedule epochs)', tr.held_epochs, summary.epochs))
      assert.are.equal(held, tr.held_epochs)
      assert.are.equal(math.min(3 + held, 6), summary.epochs)
      assert.are.equal(summary.epochs * tr.iters_per_epoch, summary.steps)
      assert.are.equal(summary.epochs - held, tr.schedule.epoch)
      assert.is_true(summary.final_loss == summary.final_loss and summary.final_loss < 10)
      -- a split (CA) layer is in the model
      assert.is_true(#tr.model:findModules('NRConv2d') > 0)
      -- the log has the rejuvenation record with every layer's widths
      local f = assert(io.open(out .. '/metrics.jsonl'))
      local text = f:read('*a')
      f:close()
      local ck = require 'nr.checkpoint'
      local found
      for line in text:gmatch('[^\n]+') do
         local r = ck.json_decode(line)
         if r.kind == 'nr' and r.event == 'rejuvenate' then found = r end
      end
      assert.is_truthy(found)
      assert.is_true(#found.layers >= 3)
      assert.is_truthy(found.layers[1].width_after)
      assert.is_truthy(found.alpha and found.alpha_sqrt and found.lambda_history)
      -- the sizes the report shows, and the default reallocation's info (its α)
      assert.equal(tr.model:nParameters(), found.model_params)
      assert.is_true(found.size_after.params > 0 and found.size_before.flops > 0)
      assert.equal(found.alpha, found.policy_info.alpha)
      -- the LR after the rejuvenation (mid-epoch: Δt in steps): held to the end of that epoch, then
      -- the schedule from where the hold kept it, never rising again (released at once, the cosine
      -- ran for the rest of the epoch and went back up where the release had found it)
      local lrs = {}
      for l in text:gmatch('[^\n]+') do
         local r = ck.json_decode(l)
         if r.kind == 'step' and r.step > rep.step then lrs[#lrs + 1] = {step = r.step, lr = r.lr} end
      end
      assert.is_true(#lrs >= 4)
      for i, e in ipairs(lrs) do
         if e.step <= held * tr.iters_per_epoch then assert.are.equal(0.05, e.lr) end
         if i > 1 then assert.is_true(e.lr <= lrs[i - 1].lr, 'the LR rose at step ' .. e.step) end
      end
      assert.is_true(lrs[#lrs].lr < 0.05)
      -- the console: a line for the rejuvenation, r and λ on the epoch lines while NR sparsifies
      f = assert(io.open(out .. '.console'))
      local console = f:read('*a')
      f:close()
      local line = console:match('nr: rejuvenation 1 in epoch %d+, step ' .. rep.step .. ' %(CA%)[^\n]*')
      assert.is_truthy(line, console)
      assert.truthy(line:find(string.format('r_params %.3f -> %.3f, alpha %.3g', rep.before.r_params, rep.after.r_params,
         rep.alpha), 1, true), line)
      assert.truthy(console:find('eta [%d:]+  |  nr r_params 0%.%d+ %(target 0%.5%) lambda '), console)
   end)

   it('a checkpoint of the rejuvenated model is rebuilt from the recipe and loaded', function()
      assert.is_truthy(tr)
      local train = require 'nr.train'
      local fresh = train.new(recipe(out, nrcfg))
      fresh:load_checkpoint(out)
      assert.are.equal(#tr.model:findModules('NRConv2d'), #fresh.model:findModules('NRConv2d'))
      tr.model:evaluate()
      fresh.model:evaluate()
      local x = nr.randn({3, 1, 28, 28})
      local a = tr.model:forward(x):clone()
      local b = fresh.model:forward(x)
      assert.is_true(a:sub(b):abs():max() <= 1e-5 * math.max(1, a:abs():max()))
      assert.are.equal(1, fresh.nr.rejuvenations)
      -- without a trainer: the checkpoint's model.safetensors records the layer sizes, so a
      -- freshly built model loads it (nr.checkpoint.load_weights)
      local ck = require 'nr.checkpoint'
      local bare = ck.load_weights(model(), ck.find(out) .. '/model.safetensors')
      bare:evaluate()
      assert.are.equal(0, a:sub(bare:forward(x)):abs():max())
      -- `--eval out`: the best checkpoint, rebuilt and evaluated, gives the run's best evaluation
      local res = train.evaluate(recipe(out, nrcfg), out)
      assert.are.equal(summary.best_top1, res.top1)
      assert.truthy(res.weights:find(out .. '/checkpoint/step-', 1, true), res.weights)
   end)
end)

-- The schedule held while sparsifying lengthens the run by the held epochs (nr.extend_epochs,
-- default on), at most max_epochs (default 2 x epochs), and a run resumed across the extension
-- equals an uninterrupted one bit for bit. Tiny synthetic data (8 steps of 32 per epoch); the
-- rejuvenation is forced at the end of epoch 3 (policy.when) so the epoch counts are exact:
-- epochs 1-3 end held (the epoch_end check releases the hold after the epoch was counted).
describe('held schedule epochs extend nr.train', function()
   local train = require 'nr.train'
   local ck = require 'nr.checkpoint'
   -- channels 1-3 of each conv start dead (weights and γ zero: they stay zero), so the forced
   -- rejuvenation changes the architecture (NR-CA splits the second conv)
   local function tiny()
      local net = nn.Sequential{
         nn.Conv2d(1, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
         nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
         nn.GlobalAvgPool2d(), nn.Linear(8, 10)}
      for _, i in ipairs({1, 5}) do
         for c = 1, 3 do
            net.modules[i].weight:narrow(1, c, 1):zero()
            net.modules[i + 1].weight:set(c, 0)
         end
      end
      return net
   end
   local X, Y = synthetic(256, 9)
   local VX, VY = synthetic(64, 10)
   local function rc(out, extra, nrextra)
      local lr_seen = {}
      local r = {
         name = 'nr_extend_spec', model = tiny,
         data = {train = train.memory_loader(X, Y, {batch = 32, shuffle = true, seed = 2}),
                 val = train.memory_loader(VX, VY, {batch = 64})},
         optim = {name = 'sgd', lr = 0.05, momentum = 0.9, weight_decay = 1e-4},
         schedule = {name = 'cosine', warmup = 0},
         epochs = 2, seed = 3, device = 'cpu', out = out, log_every = 4,
         progress = {stream = io.open('/dev/null', 'w')},
         hooks = {after_step = function(t) lr_seen[#lr_seen + 1] = t.optimizer.config.lr end},
         nr = {target = 0.5, scheme = 'CA', rescale = true, threshold = 0.05, input_shape = {1, 28, 28},
               lambda = {mode = 'constant', value = 2e-3, dt = 'epoch'},
               policy = {when = function(ctx) return ctx.epoch >= 3 and ctx.rejuvenations == 0 end}},
      }
      for k, v in pairs(extra or {}) do r[k] = v end
      for k, v in pairs(nrextra or {}) do r.nr[k] = v end
      return r, lr_seen
   end
   local function epochs_logged(dir)
      local n = 0
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         if ck.json_decode(line).kind == 'epoch' then n = n + 1 end
      end
      return n
   end
   local base = tmpdir('extend')

   it('measures costs at the data\'s sample shape; a model with nothing to resize, a `when` without return: errors', function()
      -- nr_info.input_size 56 (as a zoo model built for other images) but 28x28 data: the data's FLOPs
      local r = rc(base .. '/shape', {epochs = 1, model = function()
         local m = tiny()
         m.nr_info = {input_size = 56, input_channels = 1}
         return m
      end}, {constraint = 'flops', policy = {when = function(ctx) return ctx.rejuvenations == 0 end}})
      r.nr.input_shape = nil
      local tr = train.new(r)
      tr:run()
      local at28, at56 = nr.utilization(tiny(), {1, 28, 28}), nr.utilization(tiny(), {1, 56, 56})
      assert.are.equal(at28.flops_all, tr.nr.reports[1].before.flops_all)
      assert.is_true(at56.flops_all > at28.flops_all)
      local function refused(rr, want, at_run)
         local ok, err = pcall(function() local t = train.new(rr); if at_run then t:run() end end)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(want, 1, true), tostring(err))
      end
      refused(rc(base .. '/mlp', {model = function()
         return nn.Sequential{nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)}
      end}), 'the model has no channels Neural Rejuvenation can resize')
      -- refused while the trainer was built: no empty run folder left behind
      assert.is_false(nr.checkpoint.is_dir(base .. '/mlp'))
      refused(rc(base .. '/when', {epochs = 1}, {policy = {when = function() end}}),
         'policy.when: must return true or false, got nil (a function that ends without return gives nil)', true)
   end)

   it('runs epochs + held epochs: 2 schedule epochs after 3 held ones, the schedule completes', function()
      local r, lrs = rc(base .. '/a', {max_epochs = 6})
      local tr = train.new(r)
      assert.is_true(tr.extend_held)
      local s = tr:run()
      assert.are.equal(1, tr.nr.rejuvenations)
      assert.are.equal(3, tr.nr.reports[1].epoch)
      assert.are.equal(5, s.epochs); assert.are.equal(40, s.steps); assert.are.equal(3, s.held_epochs)
      assert.is_nil(s.capped)
      local rep = tr.nr.reports[1]
      assert.are.equal(5, rep.layers[1].live); assert.are.equal(5, rep.layers[2].live)
      assert.is_true(rep.layers[1].width_after > 5 and #tr.model:findModules('NRConv2d') == 1)
      assert.are.equal(2, tr.schedule.epoch)
      assert.are.equal(5, epochs_logged(base .. '/a'))
      -- held at the base LR for 24 steps, then one whole cosine schedule of 2 epochs
      for i = 1, 24 do assert.are.equal(0.05, lrs[i]) end
      assert.are.equal(0.05, lrs[25])
      assert.is_true(lrs[40] < 0.05 * 0.01)
   end)

   it('the default cap is 2 x epochs; extend_epochs = false keeps the epoch count', function()
      local tr = train.new((rc(base .. '/cap')))
      local s = tr:run()
      assert.are.equal(4, s.epochs); assert.are.equal(3, s.held_epochs); assert.is_true(s.capped)
      assert.are.equal(1, tr.schedule.epoch)
      local tr2 = train.new((rc(base .. '/off', nil, {extend_epochs = false})))
      assert.is_false(tr2.extend_held)
      local s2 = tr2:run()
      assert.are.equal(2, s2.epochs); assert.are.equal(16, s2.steps); assert.are.equal(2, s2.held_epochs)
      assert.are.equal(0, tr2.nr.rejuvenations)        -- the forced rejuvenation (epoch 3) never came
      assert.are.equal(0, tr2.schedule.epoch)
      assert.has_error(function() train.new((rc(base .. '/bad', nil, {extend_epochs = 'yes'}))) end)
   end)

   it('active_epochs: the epoch after the last active one trains with its schedule running (not held)', function()
      local tr = train.new((rc(base .. '/active', {max_epochs = 6},
         {active_epochs = 1, policy = {when = function() return false end}})))
      local s = tr:run()
      -- epoch 1 held (sparsifying), epochs 2-3 the whole 2-epoch schedule; the hold used to last
      -- through epoch 2 as well (released only at the check that found NR inactive)
      assert.are.equal(1, s.held_epochs); assert.are.equal(3, s.epochs)
      assert.are.equal(2, tr.schedule.epoch)
      assert.are.equal(0, tr.nr.lambda)
   end)

   it('resumed with NR off or under another constraint: the checkpoint\'s model, no hold, the budget measured again', function()
      -- after the rejuvenation (run a, NR-CA): --nr off still rebuilds the split model
      local off = train.new((rc(base .. '/a', {nr = false})))
      off:load_checkpoint(base .. '/a')
      assert.are.equal(1, #off.model:findModules('NRConv2d'))
      assert.is_false(off.schedule_hold)
      -- under another constraint after a rejuvenation: refused (C was a parameter count)
      local flops = train.new((rc(base .. '/a', nil, {constraint = 'flops'})))
      local ok, err = pcall(flops.load_checkpoint, flops, base .. '/a')
      assert.is_false(ok)
      assert.truthy(tostring(err):find('rejuvenated under constraint params; resuming it under flops', 1, true), err)
      -- rejuvenations to go with kept generations under a scheme that would change the function:
      -- refused at the resume, not epochs later at the next rejuvenation
      local other = train.new((rc(base .. '/a', nil, {scheme = 'NR', generations = 'keep', times = 2})))
      ok, err = pcall(other.load_checkpoint, other, base .. '/a')
      assert.is_false(ok)
      assert.truthy(tostring(err):find("(resuming a run rejuvenated 1 time(s)): scheme 'NR' with generations = 'keep' on a "
         .. "model rejuvenated with scheme 'CA'", 1, true), err)
      local same = train.new((rc(base .. '/a', nil, {generations = 'keep', times = 2})))
      same:load_checkpoint(base .. '/a')
      assert.are.equal(1, same.nr.rejuvenations)
      -- in the λ phase (epoch 1 held): NR off releases the hold; flops measures C again
      local dir = base .. '/lam'
      local r = rc(dir, {max_epochs = 6})
      r.hooks.epoch_begin = function(_, info) if info.epoch == 2 then error('simulated kill', 0) end end
      assert.is_false((pcall(train.train, r)))
      local held = train.new((rc(dir, {resume = dir})))
      held:load_checkpoint(dir)
      assert.is_true(held.schedule_hold)
      local free = train.new((rc(dir, {nr = false})))
      free:load_checkpoint(dir)
      assert.is_false(free.schedule_hold)
      local tf = train.new((rc(dir, {max_epochs = 3, resume = dir}, {constraint = 'flops'})))
      tf:load_checkpoint(dir)
      assert.is_nil(tf.nr.C)
      assert.are.equal(nr.utilization(tf.model, {1, 28, 28}).flops_all,
         (function() tf:call('train_begin', {}); return tf.nr.C end)())
   end)

   it('a constant λ needs its value', function()
      local ok, err = pcall(train.new, (rc(base .. '/const', nil, {lambda = {mode = 'constant', dt = 'epoch'}})))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('lambda.mode "constant" needs lambda.value', 1, true), err)
   end)

   it('a run killed while held or after the rejuvenation resumes to the same weights, bit for bit', function()
      local ref = ck.load(base .. '/a').weights
      for _, kill in ipairs({3, 5}) do
         local dir = base .. '/k' .. kill
         local r = rc(dir, {max_epochs = 6})
         r.hooks.epoch_begin = function(_, info) if info.epoch == kill then error('simulated kill', 0) end end
         local ok, err = pcall(train.train, r)
         assert.is_false(ok)
         assert.is_truthy(tostring(err):find('simulated kill', 1, true))
         nr.manual_seed(123)
         local tr = train.new((rc(dir, {max_epochs = 6, resume = dir})))
         local s = tr:run()
         assert.are.equal(5, s.epochs); assert.are.equal(40, s.steps); assert.are.equal(3, s.held_epochs)
         assert.are.equal(1, tr.nr.rejuvenations)
         assert.are.equal(5, epochs_logged(dir))
         local got = ck.load(dir).weights
         for name, t in pairs(ref) do
            local u = got[name]
            assert.is_truthy(u, name .. ' missing after resume (killed before epoch ' .. kill .. ')')
            assert.are.same(t:shape(), u:shape())
            assert.are.equal(0, t:sub(u):abs():max(), name .. ' differs (killed before epoch ' .. kill .. ')')
         end
      end
   end)

   it('under AdamW too: its remapped moments and step counts go through the checkpoint (resumed bit for bit)', function()
      local adamw = {optim = {name = 'adamw', lr = 2e-3, weight_decay = 1e-2}, max_epochs = 6}
      local whole = train.new((rc(base .. '/aw', adamw)))
      whole:run()
      assert.are.equal(1, whole.nr.rejuvenations)
      local some = whole.model:findModules('NRConv2d')[1].blocks[1].conv.weight
      assert.are.equal(40, whole.optimizer:state_of(some).step)   -- carried through the surgery at step 24
      local ref = ck.load(base .. '/aw').weights
      local dir = base .. '/awk'
      local r = rc(dir, adamw)
      r.hooks.epoch_begin = function(_, info) if info.epoch == 5 then error('simulated kill', 0) end end
      assert.is_false((pcall(train.train, r)))
      local tr = train.new((rc(dir, {optim = adamw.optim, max_epochs = 6, resume = dir})))
      tr:run()
      local got = ck.load(dir).weights
      for name, t in pairs(ref) do
         assert.are.equal(0, t:sub(got[name]):abs():max(), name .. ' differs after the resume')
      end
      os.execute('rm -rf ' .. base)
   end)
end)

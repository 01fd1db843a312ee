-- nr.schedule: values of step/multistep, cosine, linear and warm-up at known positions
-- (tolerance 1e-12, closed forms as torch.optim.lr_scheduler's), per-iteration granularity,
-- state round trip, and errors for bad configurations.
local nr = require 'nr'
local S = nr.schedule

local function near(a, b) return math.abs(a - b) <= 1e-12 * math.max(1, math.abs(b)) end
local function assert_near(want, got, what)
   assert(near(got, want), string.format('%s: got %.15g, want %.15g', what or 'value', got, want))
end

describe('nr.schedule', function()
   it('step: ×gamma at milestones (torch MultiStepLR convention)', function()
      local s = S.build({name = 'step', milestones = {2, 4}, gamma = 0.1}, {base_lr = 1, epochs = 6})
      local want = {1, 1, 0.1, 0.1, 0.01, 0.01}
      for e = 1, 6 do
         assert_near(want[e], s:lr(), 'epoch ' .. e)
         for _ = 1, 3 do s:step() end   -- iterations do not change a per-epoch schedule
         assert_near(want[e], s:lr(), 'epoch ' .. e .. ' after iterations')
         s:next_epoch()
      end
      local ss = S.step{base_lr = 0.5, step_size = 3, gamma = 0.5, epochs = 9}
      assert_near(0.5, ss:at(2)); assert_near(0.25, ss:at(3)); assert_near(0.125, ss:at(6.5))
      -- default milestones at 50% / 75%
      local d = S.build({name = 'step'}, {base_lr = 1, epochs = 8})
      assert.same({4, 6}, d.milestones)
      -- none before the first epoch ends: a 1-epoch run keeps its LR (was {0, 0}: base x gamma^2)
      assert.same({}, S.build({name = 'step'}, {base_lr = 1, epochs = 1}).milestones)
      -- over 2 epochs 50% and 75% both round to epoch 1: one cut there, not two at once
      assert.same({1}, S.build({name = 'step'}, {base_lr = 1, epochs = 2}).milestones)
      assert.same({1, 2}, S.build({name = 'step'}, {base_lr = 1, epochs = 3}).milestones)
      -- the step schedules' settings given to another schedule: an error (they were ignored)
      for _, k in ipairs({'milestones', 'step_size', 'gamma'}) do
         local ok, err = pcall(S.build, {name = 'cosine', [k] = k == 'milestones' and {3} or 2}, {base_lr = 1, epochs = 4})
         assert.is_false(ok)
         assert.truthy(tostring(err):find(k .. " is a setting of the step schedules (name = 'step' or 'multistep'), not of cosine",
            1, true), tostring(err))
      end
   end)

   it('cosine: closed form, per iteration, reaches min_lr at the end', function()
      local s = S.build({name = 'cosine', min_lr = 0.001}, {base_lr = 0.1, epochs = 10, iters_per_epoch = 4})
      assert_near(0.1, s:lr(), 'start')
      s:step(); s:step()  -- half an epoch
      assert_near(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.05)), s:lr(), 'epoch 0.5')
      s:next_epoch()
      assert_near(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.1)), s:lr(), 'epoch 1')
      assert_near(0.0505, s:at(5), 'middle')
      assert_near(0.001, s:at(10), 'end')
      local e = S.build({name = 'cosine', granularity = 'epoch'}, {base_lr = 1, epochs = 4, iters_per_epoch = 10})
      for _ = 1, 5 do e:step() end
      assert_near(1, e:lr(), 'per-epoch granularity ignores iterations')
   end)

   it('linear warm-up then cosine, and linear decay', function()
      local s = S.build({name = 'cosine', warmup = 2}, {base_lr = 0.4, epochs = 12, iters_per_epoch = 10})
      assert_near(0, s:at(0))
      assert_near(0.1, s:at(0.5))
      assert_near(0.3, s:at(1.5))
      assert_near(0.4, s:at(2))
      assert_near(0.2, s:at(7))
      local w = S.build({name = 'step', warmup = 1, warmup_start = 0.1, milestones = {3}}, {base_lr = 1, epochs = 5, iters_per_epoch = 10})
      assert_near(0.1, w:lr())
      for _ = 1, 5 do w:step() end
      assert_near(0.55, w:lr(), 'warm-up is per iteration even for step schedules')
      local l = S.linear{base_lr = 1, epochs = 4}
      assert_near(0.75, l:at(1)); assert_near(0, l:at(4)); assert_near(0, l:at(9))
   end)

   it('position is explicit: not advancing holds the LR (NR shifts the schedule)', function()
      local s = S.build({name = 'step', milestones = {1}}, {base_lr = 1, epochs = 3})
      s:next_epoch()
      assert_near(0.1, s:lr())
      local t = S.build({name = 'step', milestones = {1}}, {base_lr = 1, epochs = 3})
      -- "held" epochs: the trainer simply does not call next_epoch
      assert_near(1, t:lr())
      assert.equal(0, t.epoch)
   end)

   it('round-trips its state', function()
      local s = S.build({name = 'cosine', warmup = 1}, {base_lr = 0.1, epochs = 5, iters_per_epoch = 7})
      for _ = 1, 3 do s:next_epoch() end
      for _ = 1, 4 do s:step() end
      local st = s:state()
      local json = require('cjson').encode(st)
      local r = S.build({name = 'cosine', warmup = 1}, {base_lr = 0.1, epochs = 5, iters_per_epoch = 7})
      r:load_state(require('cjson').decode(json))
      assert.equal(s:lr(), r:lr())
      assert.equal(3, r.epoch); assert.equal(4, r.iter)
      assert.has_error(function() S.build({name = 'step'}, {base_lr = 1}):load_state(st) end)
      -- a corrupt state is refused by name (found by fuzzing: base_lr = NaN gave NaN LRs, epoch = NaN
      -- or -3 a wrong LR, iter = 'x' an arithmetic error from inside lr())
      for _, bad in ipairs({{epoch = 0 / 0, what = 'state.epoch'}, {epoch = -3, what = 'state.epoch'}, {iter = 1.5, what = 'state.iter'},
                            {iter = 'x', what = 'state.iter'}, {base_lr = 0 / 0, what = 'state.base_lr'},
                            {base_lr = -1, what = 'state.base_lr'}}) do
         local what = bad.what
         bad.what = nil
         local ok, err = pcall(r.load_state, r, bad)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('Schedule:load_state: ' .. what .. ' must be', 1, true), err)
      end
      assert.equal(s:lr(), r:lr())
   end)

   it('rejects unknown names, keys and bad milestones', function()
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(msg(function() S.build({name = 'poly'}, {base_lr = 1}) end):find('poly', 1, true))
      assert.truthy(msg(function() S.build({name = 'step', milestone = {1}}, {base_lr = 1}) end):find('milestone', 1, true))
      assert.truthy(msg(function() S.build({name = 'step', milestones = {5, 2}}, {base_lr = 1}) end):find('increasing', 1, true))
      assert.truthy(msg(function() S.build({name = 'cosine'}, {}) end):find('base_lr', 1, true))
      -- torch's MultiStepLR ignores a negative milestone; here it decayed from the start: refused
      assert.truthy(msg(function() S.build({name = 'step', milestones = {-1, 2}}, {base_lr = 1}) end)
         :find('increasing finite numbers >= 0 (entry 1 is -1)', 1, true))
      assert.truthy(msg(function() S.build({name = 'step', milestones = {a = 1}}, {base_lr = 1}) end)
         :find('milestones must be a list of epochs', 1, true))
      assert.truthy(msg(function() S.build({name = 'step', milestones = {2}, step_size = 3}, {base_lr = 1}) end)
         :find('milestones or step_size, not both', 1, true))
      -- LinearLR's start_factor range: a "warm-up" from 5 x base_lr went down
      assert.truthy(msg(function() S.build({name = 'cosine', warmup = 1, warmup_start = 5}, {base_lr = 1, epochs = 4}) end)
         :find('warmup_start must be a fraction of base_lr in [0, 1], got 5', 1, true))
      assert.equal(0.5, S.build({name = 'constant', warmup = 1, warmup_start = 0.5}, {base_lr = 1, epochs = 4}):at(0))
   end)

   it('rejects options of the wrong type or not finite, naming the option and the value', function()
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      local nan, inf = 0 / 0, math.huge
      for _, c in ipairs({
         {{name = 'step', gamma = nan}, {}, 'gamma must be a finite number >= 0, got nan'},
         {{name = 'step', gamma = 'x'}, {}, 'gamma must be a finite number >= 0, got "x"'},
         {{name = 'cosine', min_lr = nan}, {}, 'min_lr must be a finite number >= 0, got nan'},
         {{name = 'cosine', warmup = inf}, {}, 'warmup must be a finite number >= 0, got inf'},
         {{name = 'cosine', warmup_start = -1}, {}, 'warmup_start must be a finite number >= 0, got -1'},
         {{name = 'cosine', epochs = inf}, {}, 'epochs must be a finite number > 0, got inf'},
         {{name = 'linear'}, {iters_per_epoch = 'x'}, 'iters_per_epoch must be a finite integer >= 1, got "x"'},
         {{name = 'linear'}, {iters_per_epoch = inf}, 'iters_per_epoch must be a finite integer >= 1, got inf'},
         {{name = 'linear'}, {base_lr = inf}, 'base_lr must be a finite number >= 0, got inf'},
         {{name = 'step', step_size = inf}, {}, 'step_size must be a finite number > 0, got inf'},
         {{name = 'step', milestones = {1, nan}}, {}, 'milestones must be increasing finite numbers >= 0 (entry 2 is nan)'},
         -- no schedule as written: a warm-up the length of the run, a cosine / linear floor above base_lr
         {{name = 'cosine', warmup = 5}, {}, 'warmup (5 epochs) must be shorter than the schedule (4 epochs)'},
         {{name = 'step', warmup = 4}, {}, 'warmup (4 epochs) must be shorter than the schedule (4 epochs)'},
         {{name = 'cosine', min_lr = 0.5}, {}, 'min_lr (0.5) must not exceed base_lr (0.1): the cosine decay would rise'},
         {{name = 'linear', min_lr = 0.2}, {}, 'min_lr (0.2) must not exceed base_lr (0.1): the linear decay would rise'},
      }) do
         local ctx = {base_lr = 0.1, epochs = 4}
         for k, v in pairs(c[2]) do ctx[k] = v end
         local e = msg(function() local s = S.build(c[1], ctx); return s end)
         assert.truthy(e:find('schedule_spec.lua:%d+: nr.schedule: '), e)
         assert.truthy(e:find(c[3], 1, true), e)
      end
      assert.truthy(msg(function() S.build({}, 5) end):find('nr.schedule: ctx must be a table', 1, true))
      -- a direct build that gives no length (it defaults to 1 epoch) keeps any warm-up
      assert.equal(0.1, S.build({name = 'step', warmup = 2}, {base_lr = 0.1, iters_per_epoch = 1}).base_lr)
   end)
end)

-- Neural Rejuvenation policies: a custom Lua policy replaces the default and its decisions are
-- the ones applied (reallocate, init, rescale, when, lambda); the default adaptive λ rule; the two
-- example policies shipped in recipes/ (mean-|γ| allocation and uniform allocation).
local nr = require 'nr'
local nn = nr.nn
local R = require 'nr.rejuvenate'

local function src_root()
   return (debug.getinfo(1, 'S').source:match('^@(.*)/tests/lua/[^/]*$')) or '.'
end

local function small_net()
   local layers = {}
   for _, b in ipairs({{3, 16}, {16, 24}, {24, 32}}) do
      layers[#layers + 1] = nn.Conv2d(b[1], b[2], 3, {padding = 1, bias = false})
      layers[#layers + 1] = nn.BatchNorm2d(b[2])
      layers[#layers + 1] = nn.ReLU()
   end
   layers[#layers + 1] = nn.GlobalAvgPool2d()
   layers[#layers + 1] = nn.Linear(32, 4)
   return nn.Sequential(layers)
end

local function kill_half(model)
   for _, bn in ipairs(model:findModules('BatchNorm2d')) do
      for i = 1, bn.num_features, 2 do bn.weight:set(i, 0) end
   end
end

-- A trainer stand-in with the hook / state / log API of nr.train.
local function fake_trainer(model)
   local tr = {model = model, epoch = 1, step = 0, hooks = {}, states = {}, logs = {}}
   function tr:add_hook(name, fn) self.hooks[name] = self.hooks[name] or {}; table.insert(self.hooks[name], fn) end
   function tr:register_state(name, spec) self.states[name] = spec end
   function tr:log(r) self.logs[#self.logs + 1] = r end
   function tr:call(name, info) for _, fn in ipairs(self.hooks[name] or {}) do fn(self, info or {}) end end
   return tr
end

describe('nr.rejuvenate policies', function()
   it('a custom reallocate decides the widths; its inputs describe the live sets', function()
      nr.manual_seed(1)
      local m = small_net()
      kill_half(m)
      local seen
      local rep = nr.rejuvenate(m, {input_shape = {3, 8, 8}, policy = {
         reallocate = function(layers, budget)
            seen = {layers = layers, budget = budget}
            local w = {}
            for _, l in ipairs(layers) do w[l.id] = l.live + l.id end
            return w, {note = 'custom'}
         end}})
      assert.are.equal(3, #seen.layers)
      assert.same({8, 12, 16}, {seen.layers[1].live, seen.layers[2].live, seen.layers[3].live})
      assert.same({16, 24, 32}, {seen.layers[1].width, seen.layers[2].width, seen.layers[3].width})
      assert.is_true(seen.budget.target > seen.budget.live_cost)
      local convs = m:findModules('Conv2d')
      assert.same({9, 14, 19}, {convs[1].out_channels, convs[2].out_channels, convs[3].out_channels})
      assert.are.equal('custom', rep.policy_info.note)
      assert.are.equal(19, m:findModules('Linear')[1].in_features)
      assert.is_nil(rep.alpha)
   end)

   it('budget.cost prices what surgery builds: a set left out keeps its live channels; shrinking keeps the largest |γ|', function()
      nr.manual_seed(1)
      local m = small_net()
      kill_half(m)
      local seen = {}
      local rep = nr.rejuvenate(m, {input_shape = {3, 8, 8}, policy = {reallocate = function(layers, budget)
         seen.partial = budget.cost({[2] = 20})
         seen.explicit = budget.cost({[1] = layers[1].live, [2] = 20, [3] = layers[3].live})
         return {[2] = 20}
      end}})
      assert.are.equal(seen.explicit, seen.partial)
      assert.are.equal(seen.partial, rep.planned_cost)
      assert.are.equal(rep.planned_cost, rep.cost)
      -- CR with kept generations, then a budget below the live cost where the strongest channels are
      -- the new generation's: the planned cost (the solver's) is the built one
      nr.manual_seed(2)
      local net = small_net()
      kill_half(net)
      local r1 = nr.rejuvenate(net, {input_shape = {3, 8, 8}, scheme = 'CR', generations = 'keep'})
      for _, bn in ipairs(net:findModules('BatchNorm2d')) do
         local old = #bn.weight:totable()
         for c = 1, old do bn.weight:set(c, c <= old / 2 and 0.2 or 1.0) end
      end
      local rep2 = nr.rejuvenate(net, {input_shape = {3, 8, 8}, scheme = 'CR', generations = 'keep', budget = 0.4,
                                       constraint_value = r1.target_cost})
      assert.is_true(rep2.alpha < 1)
      assert.are.equal(rep2.planned_cost, rep2.cost)
      assert.is_true(rep2.cost <= rep2.target_cost)
   end)

   it('rejects bad policy output and unknown policies with clear errors', function()
      local m = small_net()
      assert.has_error(function()
         nr.rejuvenate(m, {input_shape = {3, 8, 8}, policy = {reallocate = function() return {[1] = 0.5} end}})
      end)
      assert.has_error(function() nr.rejuvenate(m, {input_shape = {3, 8, 8}, policy = {bogus = function() end}}) end)
      assert.has_error(function() nr.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = 'XY'}) end)
      local function err(f)
         local ok, e = pcall(f)
         assert.is_false(ok)
         return tostring(e)
      end
      local function rej(o)
         o.input_shape = {3, 8, 8}
         local k = small_net()
         kill_half(k)
         return err(function() nr.rejuvenate(k, o) end)
      end
      assert.truthy(rej({budget = -1}):find('budget must be a number >= 0', 1, true))
      -- at the user's line, not a line inside lua/nr (a check a few calls deep); an error in the
      -- user's own policy keeps its position, once
      local here = debug.getinfo(1, 'S').short_src
      for _, e in ipairs({rej({budget = -1}), rej({scheme = 'XY'}), err(function() nr.utilization(small_net(), {3, 8, 8}, {threshold = 2}) end),
                          err(function() nr.checkpoint.load_weights(small_net(), '/nonexistent/w.safetensors') end)}) do
         assert(e:sub(1, #here + 1) == here .. ':' and not e:find('/lua/nr/', 1, true), e)
      end
      local mine = rej({policy = {reallocate = function() error('mine') end}})
      assert(mine:match('^[^:]+:%d+: mine$') and mine:sub(1, #here + 1) == here .. ':', mine)
      -- the same from init (it runs inside the surgery: it came wrapped in "building the new layers
      -- failed (the widths reallocate returned ...)", blaming the widths)
      mine = rej({policy = {init = function() error('mine') end}})
      assert(mine:match('^[^:]+:%d+: mine$') and mine:sub(1, #here + 1) == here .. ':', mine)
      local bad_shape = rej({policy = {init = function() return nr.zeros({1}) end}})
      assert.truthy(bad_shape:find('nr.rejuvenate: policy.init must return a float32 tensor of shape', 1, true), bad_shape)
      assert.is_nil(bad_shape:find('reallocate returned', 1, true), bad_shape)
      -- an error object a policy throws comes back as it was thrown (also from init, which runs
      -- inside the surgery)
      for _, which in ipairs({'reallocate', 'init'}) do
         local k = small_net()
         kill_half(k)
         local obj = {code = 7}
         local ok, e = pcall(nr.rejuvenate, k, {input_shape = {3, 8, 8}, policy = {[which] = function() error(obj) end}})
         assert.is_false(ok)
         assert.are.equal(obj, e, which)
      end
      -- every resizable channel dead: an error, not a model collapsed to width 1
      local dead = small_net()
      for _, bn in ipairs(dead:findModules('BatchNorm2d')) do bn.weight:zero() end
      assert.truthy(err(function() nr.rejuvenate(dead, {input_shape = {3, 8, 8}}) end)
         :find('no live channel in any resizable layer', 1, true))
      -- nothing resizable at all (an MLP): an error, not α = 2^65 over a cost of 0
      local mlp = nn.Sequential{nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)}
      assert.truthy(err(function() nr.rejuvenate(mlp, {input_shape = {3, 2, 2}}) end)
         :find('nr.rejuvenate: the model has no channels Neural Rejuvenation can resize', 1, true))
      assert.truthy(rej({budget = 0 / 0}):find('budget must be a number >= 0', 1, true))
      assert.truthy(rej({constraint = 'flop'}):find('constraint must be "params" or "flops", got "flop"', 1, true))
      assert.truthy(rej({policy = {init = function(_, s) return nr.full(s, 0 / 0) end}}):find('policy.init returned non-finite', 1, true))
      assert.truthy(rej({policy = {reallocate = function(layers)
         local w = {}
         for _, l in ipairs(layers) do w[l.id] = math.huge end
         return w
      end}}):find('must be an integer in [1, 2^20]', 1, true))
      -- widths in range whose tensors cannot be built: said with the widths, the model as it was
      local huge = small_net()
      kill_half(huge)
      local before = huge:nParameters()
      local he = err(function() nr.rejuvenate(huge, {input_shape = {3, 8, 8}, policy = {reallocate = function(layers)
         local w = {}
         for _, l in ipairs(layers) do w[l.id] = 2 ^ 20 end
         return w
      end}}) end)
      assert.truthy(he:find('nr.rejuvenate: building the new layers failed (the widths reallocate returned: planned cost', 1, true)
         and he:find('with 1048576 channels): nr.empty: nr_tensor_new_at: tensor too large', 1, true), he)
      assert.are.equal(before, huge:nParameters())
      -- the console line of a pure prune (budget 0) says so, not "0.00% under the budget"
      local pruned = small_net()
      kill_half(pruned)
      local line = R.describe(nr.rejuvenate(pruned, {input_shape = {3, 8, 8}, budget = 0}))
      assert.truthy(line:find('(a pure prune), widths', 1, true), line)
      -- a reallocation's info is checked before the surgery (the model is left as it was)
      local k = small_net()
      kill_half(k)
      local widths_before = k:findModules('Conv2d')[2].out_channels
      for _, info in ipairs({5, 'x'}) do
         local e = err(function() nr.rejuvenate(k, {input_shape = {3, 8, 8}, policy = {reallocate = function(layers, budget)
            local w = {}
            for _, l in ipairs(layers) do w[l.id] = l.live end
            return w, info
         end}}) end)
         assert.truthy(e:find('its second result (info) must be a table or nil', 1, true), e)
      end
      assert.are.equal(widths_before, k:findModules('Conv2d')[2].out_channels)
      assert.are.equal(0, k:findModules('BatchNorm2d')[1].weight:get(1))
      -- budget.cost and budget.solve name a wrong argument
      assert.truthy(rej({policy = {reallocate = function(_, b) return b.cost('x') end}})
         :find('budget.cost: widths must be a table {[layer id] = width}, got "x"', 1, true))
      assert.truthy(rej({policy = {reallocate = function(_, b) return b.cost({[1] = 2.5}) end}})
         :find('budget.cost: width of layer 1 must be a whole number, got 2.5', 1, true))
      assert.truthy(rej({policy = {reallocate = function(_, b) return b.solve(nil) end}})
         :find('budget.solve: widths_of must be a function', 1, true))
      assert.truthy(rej({policy = {rescale = function() return 'yes' end}})
         :find('policy.rescale: must return true or false, got "yes"', 1, true))
      -- a value of the wrong type is shown as what it is (a string '0.5' read "got 0.5")
      assert.truthy(rej({gamma0 = '0.5'}):find('gamma0 must be a number > 0, got "0.5"', 1, true))
      assert.truthy(rej({rescale = 'true'}):find('rescale must be true or false, got "true"', 1, true))
      -- a policy that is not a table (a name), and unknown ids: blamed on who handed them over
      assert.truthy(rej({policy = 'gamma'}):find('nr.rejuvenate: policy must be a table of functions', 1, true))
      assert.truthy(rej({policy = {reallocate = function(_, b) return b.cost({foo = 3}) end}})
         :find('budget.cost got a width for unknown layer id "foo" (widths are keyed by layers[i].id, e.g. ', 1, true))
      assert.truthy(rej({policy = {reallocate = function(layers)
         local w = {}
         for _, l in ipairs(layers) do w[l.id] = l.live end
         w['0'] = 3 -- a layer's name, not its id
         return w
      end}}):find('reallocate returned a width for unknown layer id "0"', 1, true))
      -- nr.utilization's graph errors name nr.utilization
      local one_channel = nn.Sequential(nn.Conv2d(1, 4, 3, {bias = false}), nn.BatchNorm2d(4))
      assert.truthy(err(function() return nr.utilization(one_channel, {3, 8, 8}) end)
         :find('^[^\n]*nr%.utilization: 0 %(Conv2d'))
      -- attach checks the whole configuration at once, before any training
      local function att(cfg)
         cfg.input_shape = {3, 8, 8}
         return err(function() R.attach(fake_trainer(small_net()), cfg) end)
      end
      assert.truthy(att({scheme = 'XA'}):find('nr.rejuvenate.attach: scheme must be', 1, true))
      assert.truthy(att({constraint = 'flop'}):find('constraint must be', 1, true))
      assert.truthy(att({target = 2}):find('target (T_r) must be in (0, 1]', 1, true))
      assert.truthy(att({times = 0}):find('times must be an integer >= 1', 1, true))
      assert.truthy(att({lambda = {dl = -1}}):find('lambda.dl must be a number >= 0', 1, true))
      -- a policy's λ is checked where it is used
      local tr = fake_trainer(small_net())
      R.attach(tr, {input_shape = {3, 8, 8}, target = 0.01, policy = {lambda = function() return 0 / 0 end}})
      tr:call('train_begin')
      assert.truthy(err(function() tr:call('epoch_end') end):find('policy.lambda: must return a finite number >= 0', 1, true))
      -- when must say yes or no (a 0 or "no" is true in Lua: it would rejuvenate)
      local tr2 = fake_trainer(small_net())
      R.attach(tr2, {input_shape = {3, 8, 8}, target = 0.01, policy = {when = function() return 0 end}})
      tr2:call('train_begin')
      assert.truthy(err(function() tr2:call('epoch_end') end):find('policy.when: must return true or false, got 0', 1, true))
   end)

   it('rejects bad constraint_value, count, optimizer, input_shape and a non-finite γ, naming the option and value', function()
      local function err(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      local function rej(o)
         local m = small_net()
         kill_half(m)
         o.input_shape = o.input_shape or {3, 8, 8}
         return err(function() local r = nr.rejuvenate(m, o); return r end)
      end
      for _, v in ipairs({-1, 0, 0 / 0, math.huge, 'x'}) do
         -- -1 shrank the model to width 1 without a word; NaN blamed the policy
         assert.truthy(rej({constraint_value = v}):find('nr.rejuvenate: constraint_value must be a finite number > 0 (the cost C), got '
            .. (type(v) == 'string' and '"' .. v .. '"' or tostring(v)), 1, true))
      end
      assert.truthy(rej({count = 'x'}):find('nr.rejuvenate: count must be a table such as {conv = true, bn = false}, got "x"', 1, true))
      assert.truthy(rej({count = {conv = 1}}):find('nr.rejuvenate: count.conv must be true or false, got 1', 1, true))
      assert.truthy(rej({count = {convs = true}}):find('nr.rejuvenate: unknown count key convs', 1, true))
      assert.truthy(rej({optimizer = {}}):find('nr.rejuvenate: optimizer must be an nr.optim optimizer, got a table without :state_of()', 1, true))
      assert.truthy(rej({optimizer = 5}):find('nr.rejuvenate: optimizer must be an nr.optim optimizer, got number', 1, true))
      assert.truthy(rej({input_shape = {3, -8, 8}}):find('nr_policy_spec.lua:%d+: nr.rejuvenate: input_shape%[2%] must be a positive integer, got %-8'))
      assert.truthy(rej({input_shape = {'a', 8, 8}}):find('nr.rejuvenate: input_shape[1] must be a positive integer, got "a"', 1, true))
      -- an inf γ made every other channel of its layer look dead; NaN too
      for _, v in ipairs({math.huge, 0 / 0}) do
         local m = small_net()
         m:findModules('BatchNorm2d')[2].weight:set(5, v)
         local e = err(function() local r = nr.rejuvenate(m, {input_shape = {3, 8, 8}}); return r end)
         assert.truthy(e:find('nr.rejuvenate: 4 (BatchNorm2d 24): γ holds non-finite values (NaN or inf)', 1, true), e)
      end
   end)

   it('a custom init fills the new weights; rescale follows opts / policy', function()
      nr.manual_seed(2)
      local m = small_net()
      kill_half(m)
      local calls = 0
      nr.rejuvenate(m, {input_shape = {3, 8, 8}, budget = 1, policy = {
         init = function(kind, shape, info)
            calls = calls + 1
            return nr.full(shape, 0.125)
         end}})
      assert.is_true(calls >= 3)
      local c2 = m:findModules('Conv2d')[2]
      -- new output rows of conv 2 read only new input channels (W_S->R = 0): their last column is new
      local w = c2.weight
      local last_row = w:narrow(1, w:size(1), 1)
      local newcol = last_row:narrow(2, w:size(2), 1)
      assert.are.equal(0.125, newcol:max())
      local oldcol = last_row:narrow(2, 1, 1)
      assert.are.equal(0, oldcol:abs():max())
      -- kind: 'depthwise' for a depthwise conv's new rows, 'conv' for the others
      local dw = nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
         nn.Conv2d(8, 8, 3, {padding = 1, groups = 8, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
         nn.Conv2d(8, 12, 1, {bias = false}), nn.BatchNorm2d(12), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(12, 4)}
      kill_half(dw)
      local kinds = {}
      nr.rejuvenate(dw, {input_shape = {3, 8, 8}, policy = {init = function(kind, shape)
         kinds[kind] = (kinds[kind] or 0) + 1
         return nr.randn(shape)
      end}})
      assert.same({conv = 2, depthwise = 1}, kinds)
      -- rescale policy
      local m2 = small_net()
      for _, bn in ipairs(m2:findModules('BatchNorm2d')) do bn.weight:fill(0.3) end
      local rep = nr.rejuvenate(m2, {input_shape = {3, 8, 8}, gamma0 = 1, policy = {rescale = function() return true end}})
      assert.is_true(rep.rescaled > 0)
      assert.are.equal(1, m2:findModules('BatchNorm2d')[1].weight:min())
   end)

   it('ELU, SiLU, GELU, Hardswish, Hardsigmoid pass channels through and stop rescaling; LeakyReLU rescales', function()
      for _, act in ipairs({'LeakyReLU', 'ELU', 'SiLU', 'GELU', 'Hardswish', 'Hardsigmoid'}) do
         nr.manual_seed(3)
         local m = small_net()
         for i, mm in ipairs(m.modules) do if mm:typename() == 'ReLU' then m.modules[i] = nn[act]() end end
         for _, bn in ipairs(m:findModules('BatchNorm2d')) do bn.weight:fill(0.3) end
         kill_half(m)
         local rep = nr.rejuvenate(m, {input_shape = {3, 8, 8}, gamma0 = 1, rescale = true})
         -- a BN before a positively homogeneous activation only (f(s x) = s f(x)) may be rescaled
         if act == 'LeakyReLU' then assert.is_true(rep.rescaled > 0, act) else assert.equal(0, rep.rescaled, act) end
         assert.is_true(m:findModules('BatchNorm2d')[1].num_features > 8, act)   -- regrown past the 8 live
         assert.equal(#m:findModules(act), 3, act)
         local y = m:forward(nr.randn({2, 3, 8, 8}))
         assert.same({2, 4}, y:shape())
      end
   end)

   it('default adaptive λ: +Δλ per interval unless r fell by more than Δr; custom when/lambda replace it', function()
      local m = small_net()
      local tr = fake_trainer(m)
      local ctl = R.attach(tr, {target = 0.5, input_shape = {3, 8, 8}, lambda = {dt = 'epoch', dr = 0.01, dl = 1e-3}})
      tr:call('train_begin')
      assert.is_true(tr.schedule_hold)
      tr:call('epoch_end'); assert.are.equal(1e-3, ctl.lambda)          -- r = 1, no drop
      tr:call('epoch_end'); assert.are.equal(2e-3, ctl.lambda)
      local bn = m:findModules('BatchNorm2d')[3]
      for i = 1, 4 do bn.weight:set(i, 0) end                             -- r drops by > 0.01
      tr:call('epoch_end'); assert.are.equal(2e-3, ctl.lambda)
      tr:call('epoch_end'); assert.are.equal(3e-3, ctl.lambda)           -- no further drop
      kill_half(m)                                                        -- r < 0.5: rejuvenate
      tr:call('epoch_end')
      assert.are.equal(1, ctl.rejuvenations)
      assert.are.equal(0, ctl.lambda)
      assert.is_false(tr.schedule_hold)
      local rec = tr.logs[#tr.logs]
      assert.are.equal('rejuvenate', rec.event)
      assert.same({0, 1e-3, 2e-3, 2e-3, 3e-3}, rec.lambda_history)
      -- custom decisions
      local m2 = small_net()
      local tr2 = fake_trainer(m2)
      local checks = 0
      local ctl2 = R.attach(tr2, {target = 0.01, input_shape = {3, 8, 8}, times = 2, policy = {
         when = function(ctx) checks = checks + 1; return checks == 3 end,
         lambda = function(ctx) return ctx.lambda * 0.5 + 1 end,
      }})
      tr2:call('train_begin')
      tr2:call('epoch_end'); tr2:call('epoch_end')
      assert.are.equal(1.5, ctl2.lambda)
      tr2:call('epoch_end')
      assert.are.equal(1, ctl2.rejuvenations)
      assert.is_true(tr2.schedule_hold)      -- times = 2: still sparsifying
      -- the L1 hook uses λ
      tr2:call('epoch_end')
      assert.are.equal(1, ctl2.lambda)
      m2:zeroGradParameters()
      tr2:call('after_backward')
      assert.is_true(m2:findModules('BatchNorm2d')[1].gradWeight:abs():max() == 1)
   end)

   it('a policy that measures the model again (nr.utilization) does not change what the rejuvenation keeps', function()
      -- the report's masks were refilled in place by the policy's own measurement: live channels went
      local function run(ask)
         nr.manual_seed(1)
         local m = nn.Sequential{nn.Conv2d(1, 16, 3, {padding = 1, bias = false}), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(8, 3)}
         local bn = m:findModules('BatchNorm2d')
         for c = 1, 16 do bn[1].weight:set(c, c <= 8 and 1 or (c <= 12 and 0.3 + c * 0.01 or 0)) end
         bn[2].weight:fill(1)
         nr.rejuvenate(m, {input_shape = {1, 8, 8}, rescale = false, policy = {reallocate = function(layers)
            if ask then nr.utilization(m, {1, 8, 8}, {threshold = 0.5}) end
            local w = {}
            for _, l in ipairs(layers) do w[l.id] = l.live end -- keep the live, grow nothing
            return w
         end}})
         return m:findModules('BatchNorm2d')[1].weight:totable()
      end
      local plain, asked = run(false), run(true)
      assert.are.equal(12, #plain)
      assert.are.same(plain, asked)
      assert.is_true(math.abs(asked[12] - 0.42) < 1e-6)
   end)

   it('a custom reallocation far over the budget is applied as returned, logged and reported on the console', function()
      local m = small_net()
      local tr = fake_trainer(m)
      local lines = {}
      function tr:print(text) lines[#lines + 1] = text end
      R.attach(tr, {target = 0.5, input_shape = {3, 8, 8}, policy = {
         reallocate = function(layers)
            local w = {}
            for _, l in ipairs(layers) do w[l.id] = 4 * l.width end
            return w, {why = 'four times'}
         end}})
      tr:call('train_begin')
      kill_half(m)
      tr:call('epoch_end')
      local rec = tr.logs[#tr.logs]
      assert.are.equal('rejuvenate', rec.event)
      assert.is_true(rec.cost_error > 1)
      assert.same({why = 'four times'}, rec.policy_info)
      -- the rejuvenation's line, then the warning
      assert.truthy(lines[1] and lines[1]:find('^nr: rejuvenation 1 .* %(1452%.00%% over the budget%), widths 16/24/32 %-> 64/96/128$'),
         tostring(lines[1]))
      assert.truthy(lines[2] and lines[2]:find('nr: the reallocation costs %d+%.%d%% more than the target %(params'),
         tostring(lines[2]))
   end)

   it('a check every N steps runs after the optimizer step (Algorithm 1: update, then check)', function()
      nr.manual_seed(4)
      local m = small_net()
      kill_half(m)
      local tr = fake_trainer(m)
      local checks = 0
      local ctl = R.attach(tr, {target = 0.9, input_shape = {3, 8, 8}, lambda = {dt = 2}, policy = {
         when = function(ctx) checks = checks + 1; return true end}})
      tr:call('train_begin')
      for step = 1, 2 do
         tr.step = step
         tr:call('after_backward')
         assert.are.equal(0, checks)               -- never between backward and the update
         tr:call('after_step')
      end
      assert.are.equal(1, checks)
      assert.are.equal(1, ctl.rejuvenations)
   end)

   it('saves and restores its state (architecture before weights)', function()
      nr.manual_seed(3)
      local m = small_net()
      kill_half(m)
      local tr = fake_trainer(m)
      local ctl = R.attach(tr, {target = 0.9, input_shape = {3, 8, 8}, scheme = 'CR'})
      tr:call('train_begin')
      tr:call('epoch_end')
      assert.are.equal(1, ctl.rejuvenations)
      local saved = tr.states.nr.save()
      assert.is_true(tr.states.nr.before_weights)
      local json = require('nr.checkpoint').json_encode(saved)
      local m2 = small_net()
      local tr2 = fake_trainer(m2)
      R.attach(tr2, {target = 0.9, input_shape = {3, 8, 8}, scheme = 'CR'})
      tr2.states.nr.load(require('nr.checkpoint').json_decode(json))
      local a, b = {}, {}
      for _, e in ipairs(m:namedParameters()) do a[e.name] = table.concat(e.param:shape(), 'x') end
      for _, e in ipairs(m2:namedParameters()) do b[e.name] = table.concat(e.param:shape(), 'x') end
      assert.same(a, b)
      assert.are.equal(tr.nr.rejuvenations, tr2.nr.rejuvenations)
   end)

   describe('example policies in recipes/', function()
      local function zoo_model()
         nr.manual_seed(11)
         local m = nr.models.build({name = 'vgg', depth = 19, dataset = 'cifar10', classes = 10})
         local g = R.monitor.graph_of(m, {3, 8, 8})
         for i, u in ipairs(g.units) do
            local c = u.bn.num_features
            -- layer-dependent death and scale: deeper layers die more, scales differ by layer
            local dead = math.floor(c * (0.2 + 0.04 * i))
            u.bn.weight:fill(0.2 + 0.1 * (i % 5))
            for k = 1, dead do u.bn.weight:set(k, 0) end
         end
         return m
      end

      it('nr_policy_uniform: every layer gets the same number of new channels, cost on budget', function()
         local recipe = dofile(src_root() .. '/recipes/nr_policy_uniform.lua')
         local m = zoo_model()
         local before = nr.utilization(m, {3, 8, 8})
         local rep = nr.rejuvenate(m, {input_shape = {3, 8, 8}, policy = {reallocate = recipe.nr.policy.reallocate}})
         local k
         for i, l in ipairs(rep.layers) do
            local added = l.width_after - l.live
            k = k or added
            assert.are.equal(k, added)
            assert.are.equal(before.layers[i].live, l.live)
         end
         assert.is_true(k > 0)
         print(string.format('  uniform: +%d channels per layer, cost error %+.3f%%', k, 100 * rep.cost_error))
         assert.is_true(math.abs(rep.cost_error) <= 0.01)
      end)

      it('nr_policy_gamma: expansion follows the survivors\' mean |gamma|, cost on budget', function()
         local recipe = dofile(src_root() .. '/recipes/nr_policy_gamma.lua')
         local m = zoo_model()
         local seen
         local rep = nr.rejuvenate(m, {input_shape = {3, 8, 8}, policy = {reallocate = function(layers, budget)
            seen = layers
            return recipe.nr.policy.reallocate(layers, budget)
         end}})
         local t = rep.policy_info.t
         assert.is_true(t > 0)
         for i, l in ipairs(rep.layers) do
            local expect = math.max(1, math.floor(l.live * (1 + t * seen[i].mean_gamma / rep.policy_info.mean_gamma) + 0.5))
            assert.are.equal(expect, l.width_after)
         end
         print(string.format('  gamma: t = %.4f, cost error %+.3f%%', t, 100 * rep.cost_error))
         assert.is_true(math.abs(rep.cost_error) <= 0.01)
      end)
   end)
end)

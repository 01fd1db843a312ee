-- Neural Rejuvenation details: repeated rejuvenations (generations kept: 0..3, and merged: S/R, with CR and CA, on a
-- net with a residual add, a DenseNet-style concat and a Flatten -> Linear head), optimizer
-- momentum remapping, a layer dead as a whole, and clear errors.
-- Function preservation tolerance: 1e-4 relative (eval mode), as in nr_surgery_spec.
local nr = require 'nr'
local nn = nr.nn
local R = require 'nr.rejuvenate'

local function cbr(cin, cout, k, fixed)
   local c = nn.Conv2d(cin, cout, k, {padding = k == 3 and 1 or 0, bias = false})
   local b = nn.BatchNorm2d(cout)
   if fixed then c.nr_fixed, b.nr_fixed = true, true end
   return c, b
end

-- stem -> residual block (fixed last conv) -> dense layer (concat) -> conv -> pool -> flatten -> fc
local function net()
   local s, sb = cbr(3, 8, 3, true)
   local a1, ab1 = cbr(8, 12, 3)
   local a2, ab2 = cbr(12, 8, 3, true)
   local d1, db1 = cbr(8, 10, 3)
   local t, tb = cbr(18, 14, 1)
   local m = nn.Sequential{
      s, sb, nn.ReLU(),
      nn.Sequential{nn.Residual(nn.Sequential{a1, ab1, nn.ReLU(), a2, ab2}), nn.ReLU()},
      nn.Concat{nn.Identity(), nn.Sequential{d1, db1, nn.ReLU()}},
      t, tb, nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(14 * 2 * 2, 5),
   }
   for _, bn in ipairs(m:findModules('BatchNorm2d')) do
      local c = bn.num_features
      bn.running_mean:copy(nr.randn({c}):mul_(0.1))
      bn.running_var:copy(nr.rand({c}):add_(0.5))
      bn.bias:copy(nr.randn({c}):mul_(0.1))
      bn.weight:copy(nr.rand({c}):mul_(1.4):add_(0.1))
   end
   return m
end

local SHAPE = {3, 4, 4}

local function kill(model, frac)
   local g = R.monitor.graph_of(model, SHAPE)
   for _, u in ipairs(g.units) do
      if u.bn and not u.fixed then
         local c = u.bn.num_features
         local perm = nr.randperm(c):totable()
         for i = 1, math.min(c - 1, math.floor(c * frac)) do u.bn.weight:set(perm[i] + 1, 0) end
      end
   end
end

local function rel(a, b) return a:sub(b):abs():max() / math.max(1e-12, b:abs():max()) end

-- Three rounds of kill 40% + rejuvenate with opts_of(round) (input_shape added), each checked
-- against the pruned model (rejuvenated with budget 0): generation = round, eval output within
-- 1e-4 relative; then after(m, x, round). Returns the model.
local function three_rounds(seed, opts_of, after)
   nr.manual_seed(seed)
   local m = net()
   m:evaluate()
   local x = nr.randn({2, 3, 4, 4})
   for round = 1, 3 do
      kill(m, 0.4)
      local pruned = m:clone()
      nr.rejuvenate(pruned, {input_shape = SHAPE, budget = 0})
      local y0 = pruned:forward(x):clone()
      local opts = opts_of(round)
      opts.input_shape = SHAPE
      local rep = nr.rejuvenate(m, opts)
      assert.are.equal(round, rep.generation)
      local e = rel(m:forward(x), y0)
      if e > 1e-4 then print(opts.scheme, 'round', round, 'rel err', e) end
      assert.is_true(e <= 1e-4, tostring(opts.scheme) .. ' round ' .. round)
      after(m, x, round)
   end
   return m
end

describe('nr.rejuvenate repeated and detailed', function()
   for _, scheme in ipairs({'NR', 'CR', 'CA'}) do
      it(scheme .. ': three rounds of kill + rejuvenate preserve the pruned function each time (generations kept)', function()
         local m = three_rounds(10, function(round)
            return {scheme = scheme, rescale = round == 2, generations = 'keep'}
         end, function(mm, x)
            -- training mode still runs forward and backward
            mm:training()
            local y = mm:forward(x)
            mm:backward(x, nr.randn(y:shape()))
            mm:evaluate()
         end)
         if scheme ~= 'NR' then
            local splits = m:findModules('NRConv2d')
            assert.is_true(#splits >= 2)
            local maxg = 0
            for _, s in ipairs(splits) do
               for _, og in ipairs(s.spec.out_groups) do maxg = math.max(maxg, og.gen) end
            end
            assert.are.equal(3, maxg)
         else
            assert.are.equal(0, #m:findModules('NRConv2d'))
         end
      end)
   end

   for _, scheme in ipairs({'CR', 'CA'}) do
      it(scheme .. ': merged generations (the default; the paper\'s S and R): every survivor joins S each round', function()
         -- budget 2: room for new channels although S now counts its whole survivor x survivor block
         local m = three_rounds(16, function() return {scheme = scheme, budget = 2} end, function(mm)
            local splits = mm:findModules('NRConv2d')
            assert.is_true(#splits >= 2)
            for _, s in ipairs(splits) do
               local gens = {}
               for _, og in ipairs(s.spec.out_groups) do gens[#gens + 1] = og.gen end
               assert.same({0, 1}, gens)                         -- S and R, never more
               for _, ig in ipairs(s.spec.in_groups) do assert.is_true(ig.gen == 0 or ig.gen == 1) end
            end
         end)
         -- the cost the policy planned is the cost of the model built (S counted whole)
         kill(m, 0.4)
         local rep = nr.rejuvenate(m, {input_shape = SHAPE, scheme = scheme, budget = 2})
         assert.are.equal(rep.planned_cost, rep.cost)
      end)
   end

   -- The optimizers whose state surgery carries: SGD's momentum (a gradient sum), AdamW's moments
   -- (exp_avg a gradient average, exp_avg_sq and amsgrad's maximum of squares) and per-parameter step.
   local OPTIMIZERS = {
      {name = 'SGD', keys = {momentum = 1}, make = function(m) return nr.optim.SGD(m, {lr = 0.1, momentum = 0.9}) end},
      {name = 'AdamW', keys = {exp_avg = 1, exp_avg_sq = 2, max_exp_avg_sq = 2},
       make = function(m) return nr.optim.AdamW(m, {lr = 0.01, amsgrad = true}) end},
   }

   -- net() after one step of optimizer o (default SGD with momentum) on input x (so every parameter
   -- has its state)
   local function stepped_net(seed, o)
      nr.manual_seed(seed)
      local m = net()
      local opt = (o or OPTIMIZERS[1]).make(m)
      local x = nr.randn({2, 3, 4, 4})
      local y = m:forward(x)
      m:zeroGradParameters()
      m:backward(x, nr.randn(y:shape()))
      opt:step()
      return m, opt, x
   end

   for _, o in ipairs(OPTIMIZERS) do
   it(o.name .. ': remaps the optimizer state: survivors gathered, new entries zero; or drops it', function()
      local m, opt, x = stepped_net(11, o)
      local conv = m:findModules('Conv2d')[2]          -- a1: 8 -> 12, input fixed (all live)
      local bn = m:findModules('BatchNorm2d')[2]
      for i = 1, 12, 3 do bn.weight:set(i, 0) end      -- kill channels 1, 4, 7, 10 (0-based 0, 3, 6, 9)
      local olds = {}
      for key in pairs(o.keys) do olds[key] = opt:state_of(conv.weight)[key]:clone() end
      local old_step = opt:state_of(conv.weight).step
      nr.rejuvenate(m, {input_shape = SHAPE, optimizer = opt})
      local nc = m:findModules('Conv2d')[2]
      for key, old in pairs(olds) do
         local mom = opt:state_of(nc.weight)[key]
         assert.are.equal(nc.weight:size(1), mom:size(1))
         -- survivor k = 1 is old channel 1 (0-based); input channels: the 8 old ones come first
         local a = mom:narrow(1, 1, 1):narrow(2, 1, 8)
         local b = old:narrow(1, 2, 1)
         assert.is_true(b:abs():max() > 0 and a:sub(b):abs():max() == 0, key)
         local fresh = mom:narrow(1, 9, nc.weight:size(1) - 8)
         assert.are.equal(0, fresh:abs():max())
      end
      -- the step count goes with the state (Adam's bias corrections)
      assert.are.equal(old_step, opt:state_of(nc.weight).step)
      if o.name ~= 'SGD' then assert.are.equal(1, old_step) end
      opt:step()   -- the optimizer works on the new parameters
      -- dropping
      local m2 = net()
      local opt2 = o.make(m2)
      local y2 = m2:forward(x)
      m2:zeroGradParameters()
      m2:backward(x, nr.randn(y2:shape()))
      opt2:step()
      kill(m2, 0.3)
      nr.rejuvenate(m2, {input_shape = SHAPE, optimizer = opt2, optim_state = 'drop'})
      assert.is_nil(opt2:state_of(m2:findModules('Conv2d')[2].weight))
   end)
   end

   it('remaps conv bias state into CR / CA blocks and back out of them (SGD momentum, AdamW moments)', function()
      for _, case in ipairs({{'CR', OPTIMIZERS[1]}, {'CA', OPTIMIZERS[1]}, {'CR', OPTIMIZERS[2]}, {'CA', OPTIMIZERS[2]}}) do
         local scheme, o = case[1], case[2]
         local key = o.name == 'SGD' and 'momentum' or 'exp_avg_sq'
         nr.manual_seed(21)
         local m = nn.Sequential{
            nn.Conv2d(3, 6, 3, {padding = 1, bias = false}), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, {padding = 1}), nn.BatchNorm2d(6), nn.ReLU(),
            nn.GlobalAvgPool2d(), nn.Linear(6, 2)}
         local opt = o.make(m)
         -- the bias state of the second conv as one vector (blocks: their dense view)
         local function bias_mom()
            local c = m.modules[4]
            if c:typename() ~= 'NRConv2d' then return opt:state_of(c.bias)[key]:totable() end
            return c:dense_bias(function(b) local st = opt:state_of(b.conv.bias); return st and st[key] end):totable()
         end
         local types = {}
         for round = 1, 2 do
            local c = m.modules[4]
            local with_bias = c:typename() == 'NRConv2d' and {} or {c}
            if #with_bias == 0 then for _, b in ipairs(c.blocks) do if b.conv.bias then with_bias[#with_bias + 1] = b.conv end end end
            for k, conv in ipairs(with_bias) do
               local t = nr.arange(conv.bias:numel()):add_(1 + 10 * k)
               opt:set_state_of(conv.bias, o.name == 'SGD' and {momentum = t} or {exp_avg = t:clone(), exp_avg_sq = t, step = 7})
            end
            local old = bias_mom()
            m.modules[2].weight:set(2, 0)          -- an input channel dies (the blocks split by generation)
            m.modules[5].weight:set(3, 0)          -- and output channel 3
            nr.rejuvenate(m, {input_shape = {3, 6, 6}, scheme = scheme, optimizer = opt, budget = 1.2})
            types[round] = m.modules[4]:typename()
            local new, want = bias_mom(), {}
            for i = 1, #old do if i ~= 3 then want[#want + 1] = old[i] end end
            for _ = #want + 1, #new do want[#want + 1] = 0 end
            assert.same(want, new, scheme .. ' round ' .. round)
            if o.name ~= 'SGD' then
               local c2 = m.modules[4]
               local p = c2:typename() == 'NRConv2d' and c2.blocks[1].conv.bias or c2.bias
               assert.are.equal(7, opt:state_of(p).step)
            end
         end
         -- into blocks in round 1; CR's merged generations make it dense again in round 2
         assert.same(scheme == 'CR' and {'NRConv2d', 'Conv2d'} or {'NRConv2d', 'NRConv2d'}, types)
      end
   end)

   it('CA: a gated output generation whose inputs all died keeps its function (its gate 2σ(bias) folded in)', function()
      for _, bias in ipairs({false, true}) do
         nr.manual_seed(3)
         local m = nn.Sequential{
            nn.Conv2d(3, 4, 3, {padding = 1, bias = false}), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, {padding = 1, bias = bias}), nn.BatchNorm2d(4), nn.ReLU(),
            nn.GlobalAvgPool2d(), nn.Linear(4, 3)}
         m.modules[2].weight:set(1, 0)
         m.modules[5].weight:set(1, 0)
         nr.rejuvenate(m, {input_shape = {3, 6, 6}, scheme = 'CA', generations = 'keep'})   -- gens 0 | 1
         -- as after training: cross blocks, biases and the new classifier columns non-zero
         for _, b in ipairs(m.modules[4].blocks) do
            b.conv.weight:add_(nr.randn(b.conv.weight:shape()):mul_(0.3))
            if b.conv.bias then b.conv.bias:copy(nr.randn(b.conv.bias:shape())) end
         end
         m.modules[8].weight:copy(nr.randn(m.modules[8].weight:shape()))
         m:evaluate()
         -- every generation-1 channel of the first conv dies: the second conv's generation-1 outputs
         -- lose their own inputs (the reference: those channels' γ and β zeroed)
         local n0 = m.modules[1].nr_gens[1].n
         local ref = m:clone()
         for c = n0 + 1, m.modules[2].num_features do
            m.modules[2].weight:set(c, 0)
            ref.modules[2].weight:set(c, 0)
            ref.modules[2].bias:set(c, 0)
         end
         local x = nr.randn({2, 3, 6, 6})
         local want = ref:forward(x):clone()
         -- AdamW state of every block: all ones, so a folded row reads 1 / f (exp_avg, a gradient
         -- average) and 1 / f² (exp_avg_sq, of squares)
         local opt = nr.optim.AdamW(m, {lr = 0.01})
         for _, b in ipairs(m.modules[4].blocks) do
            local sh = b.conv.weight:shape()
            opt:set_state_of(b.conv.weight, {exp_avg = nr.ones(sh), exp_avg_sq = nr.ones(sh), step = 3})
         end
         local B = bias and m.modules[4]:dense_bias():totable()
         nr.rejuvenate(m, {input_shape = {3, 6, 6}, scheme = 'CA', generations = 'keep', budget = 0, optimizer = opt})
         m:evaluate()
         assert.truthy(m.modules[4]:extra():find('|1:', 1, true))    -- generation 1 still has outputs
         assert.is_true(rel(m:forward(x), want) <= 1e-5, 'bias ' .. tostring(bias))
         local function dense_state(key)
            local c = m.modules[4]
            local get = function(b) local st = opt:state_of(b.conv.weight); return st and st[key] end
            return c.dense and c:dense(get) or opt:state_of(c.weight)[key]
         end
         local E1, E2 = dense_state('exp_avg'), dense_state('exp_avg_sq')
         local folded = 0
         for q = 1, E1:size(1) do
            local v1, v2 = E1:narrow(1, q, 1):abs():max(), E2:narrow(1, q, 1):abs():max()
            assert.is_true(math.abs(v2 - v1 * v1) <= 1e-6 * v2, 'row ' .. q)
            if math.abs(v1 - 1) > 1e-6 then
               folded = folded + 1
               assert.is_true(math.abs(v1 - (1 + math.exp(-B[q])) / 2) <= 1e-6, 'row ' .. q .. ': 1 / 2σ(b)')
            end
         end
         local gen1 = 0   -- the second conv's generation-1 outputs: the orphans
         for _, gg in ipairs(m.modules[4].nr_gens) do if gg.gen ~= 0 then gen1 = gen1 + gg.n end end
         assert.is_true(gen1 > 0)
         assert.are.equal(bias and gen1 or 0, folded)
      end
   end)

   it('with kept generations, CA is refused over a trained ungated cross read (CR\'s unread block, NR\'s pinned conv)', function()
      -- the output conv is pinned (the model's output): it reads the grown first layer's new
      -- channels across generations; CA would gate that read (A + 2 sigmoid(A) B): 8.8% output change
      for _, first in ipairs({'CR', 'NR'}) do
         nr.manual_seed(1)
         local m = nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 3, {padding = 1, bias = false}), nn.BatchNorm2d(4)}
         for _, bn in ipairs(m:findModules('BatchNorm2d')) do bn.weight:copy(nr.rand({bn.num_features}):add_(0.5)) end
         nr.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = first, generations = 'keep', budget = 1.5})
         local out = m.modules[4]
         nr.manual_seed(2)
         if out:typename() == 'NRConv2d' then   -- as training leaves the cross read
            for _, b in ipairs(out.blocks) do if b.unread then b.conv.weight:copy(nr.randn(b.conv.weight:shape())) end end
         else
            out.weight:narrow(2, 9, out.in_channels - 8):copy(nr.randn({4, out.in_channels - 8, 3, 3}))
         end
         m:evaluate()
         local x = nr.randn({2, 3, 8, 8})
         local y0 = m:forward(x):clone()
         local ok, err = pcall(nr.rejuvenate, m, {input_shape = {3, 8, 8}, scheme = 'CA', generations = 'keep', budget = 0})
         assert.is_false(ok, first .. ' -> CA')
         assert.truthy(tostring(err):find("reads channels of another generation without a gate, which cross attention "
            .. "would gate, changing its function; rejuvenate it with scheme = '" .. first .. "'", 1, true), tostring(err))
         assert.equal(0, m:forward(x):clone():sub(y0):abs():max())
         -- its own scheme keeps the function
         nr.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = first, generations = 'keep', budget = 0})
         m:evaluate()
         assert.is_true(rel(m:forward(x), y0) <= 1e-5, first)
      end
   end)

   it('with kept generations, a scheme switch that would change the function is refused (CA -> NR/CR, NR -> CR/CA)', function()
      local refused = {['CA>NR'] = 'cross-attention gates', ['CA>CR'] = 'cross-attention gates',
                       ['NR>CR'] = 'cross connections between generations would be dropped',
                       ['NR>CA'] = 'cross connections between generations would be gated'}
      -- (Sigmoid: the convs' inputs carry no BN source, so the generations are read from the sets)
      for _, case in ipairs({{'NR', 'NR', 'ReLU'}, {'NR', 'CR', 'ReLU'}, {'NR', 'CA', 'ReLU'}, {'CR', 'NR', 'ReLU'},
                             {'CR', 'CR', 'ReLU'}, {'CR', 'CA', 'ReLU'}, {'CA', 'NR', 'ReLU'}, {'CA', 'CR', 'ReLU'},
                             {'CA', 'CA', 'ReLU'}, {'NR', 'CR', 'Sigmoid'}, {'NR', 'NR', 'Sigmoid'}}) do
         local a, b, act = case[1], case[2], case[3]
         do
            nr.manual_seed(4)
            local m = nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn[act](),
               nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn[act](),
               nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn[act](),
               nn.GlobalAvgPool2d(), nn.Linear(8, 3)}
            for _, bn in ipairs(m:findModules('BatchNorm2d')) do bn.weight:set(2, 0); bn.weight:set(5, 0) end
            nr.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = a, generations = 'keep'})
            for _, mm in ipairs(m:listModules()) do   -- as training leaves it: cross blocks trained
               if mm.weight and mm:typename() ~= 'BatchNorm2d' then mm.weight:copy(nr.randn(mm.weight:shape()):mul_(0.3)) end
               if mm:typename() == 'BatchNorm2d' then mm.weight:copy(nr.rand({mm.num_features}):add_(0.5)) end
            end
            m:evaluate()
            local x = nr.randn({2, 3, 8, 8})
            local y0 = m:forward(x):clone()
            local ok, err = pcall(nr.rejuvenate, m, {input_shape = {3, 8, 8}, scheme = b, generations = 'keep', budget = 0})
            local want = refused[a .. '>' .. b]
            if want then
               assert.is_false(ok, a .. ' -> ' .. b .. ' ' .. act)
               assert.truthy(tostring(err):find(want, 1, true), tostring(err))
               assert.truthy(tostring(err):find("scheme = '" .. a .. "'", 1, true), tostring(err))
               assert.equal(0, m:forward(x):clone():sub(y0):abs():max(), a .. ' -> ' .. b .. ': the refused call changed the model')
            else
               assert.is_true(ok, tostring(err))
               m:evaluate()
               assert.is_true(rel(m:forward(x), y0) <= 1e-5, a .. ' -> ' .. b .. ' ' .. act)
            end
         end
      end
   end)

   it('an optimizer over one layer, or over groups without their model, follows that layer\'s replacement', function()
      local function conv_net()
         return nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 10, 3, {padding = 1}), nn.BatchNorm2d(10), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(10, 3)}
      end
      for _, case in ipairs({{'one layer', function(m) return nr.optim.AdamW(m.modules[4], {lr = 1e-2}) end},
                             {'groups without model', function(m) return nr.optim.SGD({{params = m:namedParameters()}}, {lr = 1e-2}) end}}) do
         for _, pass in ipairs({true, false}) do
            nr.manual_seed(1)
            local m = conv_net()
            local opt = case[2](m)
            local x = nr.randn({2, 3, 6, 6})
            local function fb() local y = m:forward(x); m:zeroGradParameters(); m:backward(x, nr.randn(y:shape())) end
            fb(); opt:step()
            m.modules[2].weight:set(1, 0); m.modules[5].weight:set(2, 0)
            nr.rejuvenate(m, {input_shape = {3, 6, 6}, optimizer = pass and opt or nil})
            fb()
            if not pass then
               -- stepping the replaced tensors would train nothing: refused until refreshed
               local ok, err = pcall(opt.step, opt)
               assert.is_false(ok, case[1])
               assert.truthy(tostring(err):find('replaced', 1, true), tostring(err))
               opt:refresh()
            end
            local before = m.modules[4].weight:clone()
            opt:step()
            assert.is_true(m.modules[4].weight:sub(before):abs():max() > 0, case[1] .. (pass and ' (passed)' or ' (refreshed)'))
         end
      end
   end)

   it('an optimizer not given to nr.rejuvenate refuses to step the replaced layers until refreshed', function()
      nr.manual_seed(14)
      local m = net()
      local opt = nr.optim.SGD(m, {lr = 0.1, momentum = 0.9})
      local given = nr.optim.SGD(m, {lr = 0.1})
      kill(m, 0.3)
      nr.rejuvenate(m, {input_shape = SHAPE, optimizer = given})
      local ok, e = pcall(opt.step, opt)
      assert.is_false(ok)
      assert.truthy(tostring(e):find('the model\'s layers were replaced (nr.rejuvenate)', 1, true))
      given:step()                                   -- the one given was refreshed by the surgery
      opt:refresh()
      opt:step()
      -- custom parameter groups over the model follow the replaced layers to the new ones
      -- (an optimizer with two groups: the Linear layers at 10x the LR, everything else)
      local function grouped_sgd(model)
         local rest, linear = {params = {}}, {params = {}, lr_mult = 10}
         for _, entry in ipairs(model:namedParameters()) do
            local g = entry.module:typename() == 'Linear' and linear or rest
            g.params[#g.params + 1] = entry
         end
         return nr.optim.SGD({model = model, rest, linear}, {lr = 0.1})
      end
      nr.manual_seed(15)
      local m2 = net()
      local gopt = grouped_sgd(m2)
      kill(m2, 0.3)
      nr.rejuvenate(m2, {input_shape = SHAPE, optimizer = gopt})
      local conv = m2:findModules('Conv2d')[2]
      local before = conv.weight:clone()
      local x = nr.randn({2, 3, 4, 4})
      local y = m2:forward(x)
      m2:zeroGradParameters()
      m2:backward(x, nr.randn(y:shape()))
      assert.is_true(conv.gradWeight:abs():max() > 0)
      gopt:step()
      assert.is_true(conv.weight:sub(before):abs():max() > 0, 'the step did not reach the new conv')
      -- ... also into NRConv2d blocks (CR), and from blocks into the modules that replace them
      nr.manual_seed(17)
      local m3 = net()
      local copt = grouped_sgd(m3)
      for round = 1, 2 do
         kill(m3, 0.3)
         nr.rejuvenate(m3, {input_shape = SHAPE, scheme = 'CR', optimizer = copt, budget = 2})
         assert.is_true(#m3:findModules('NRConv2d') >= 2)   -- blocks after round 1; round 2 replaces them
         local covered = {}
         for _, g in ipairs(copt.groups) do for _, pe in ipairs(g.params) do covered[pe.param] = true end end
         local n = 0
         for _, entry in ipairs(m3:namedParameters()) do
            assert.is_true(covered[entry.param] == true, 'round ' .. round .. ': ' .. entry.name .. ' not in the optimizer')
            n = n + 1
         end
         local count = 0
         for _ in pairs(covered) do count = count + 1 end
         assert.are.equal(n, count, 'the optimizer holds tensors the model no longer has')
      end
      -- rejuvenating a part of the tree is seen by an optimizer over the whole tree
      local outer = nn.Sequential{net()}
      local oopt = nr.optim.SGD(outer, {lr = 0.1})
      kill(outer.modules[1], 0.3)
      nr.rejuvenate(outer.modules[1], {input_shape = SHAPE})
      assert.has_error(function() oopt:step() end)
   end)

   it('rescaling transforms optimizer state as the gradients (γ, β: / s; consumer columns: × s; squares: s²)', function()
      for _, o in ipairs(OPTIMIZERS) do
         -- the same run twice (same seed), without and with rescaling: they differ only by s
         local function run(rescale)
            local m, opt = stepped_net(12, o)
            local bn = m:findModules('BatchNorm2d')[2]      -- a1's BN: through ReLU to a2, rescalable
            bn.weight:set(1, 0)
            bn.weight:set(4, 0)
            nr.rejuvenate(m, {input_shape = SHAPE, optimizer = opt, rescale = rescale})
            bn = m:findModules('BatchNorm2d')[2]
            local a2 = m:findModules('Conv2d')[3]
            local out = {g = bn.weight:clone()}
            for key in pairs(o.keys) do
               out[key] = {g = opt:state_of(bn.weight)[key]:clone(), b = opt:state_of(bn.bias)[key]:clone(),
                           w = opt:state_of(a2.weight)[key]:clone()}
            end
            return out
         end
         local a, b = run(false), run(true)
         local s = b.g:div(a.g)                              -- γ of every channel is nonzero here
         local n_scaled = 0
         for j = 1, s:size(1) do if math.abs(s:get(j) - 1) > 1e-6 then n_scaled = n_scaled + 1 end end
         assert.is_true(n_scaled >= 2)
         for key, power in pairs(o.keys) do
            local sp = s:clone()
            if power == 2 then sp:mul_(s) end
            local A, B = a[key], b[key]
            assert.is_true(A.g:abs():max() > 0 and A.w:abs():max() > 0, o.name .. ' ' .. key)
            assert.is_true(rel(B.g, A.g:div(sp)) <= 1e-6, o.name .. ' ' .. key)
            assert.is_true(rel(B.b, A.b:div(sp)) <= 1e-6, o.name .. ' ' .. key)
            assert.is_true(rel(B.w, A.w:mul(sp:reshape(1, s:size(1), 1, 1))) <= 1e-6, o.name .. ' ' .. key)
         end
      end
   end)

   it('rescaling through a depthwise conv that reads a concat: each consumer scaled on the channels it reads', function()
      -- the depthwise unit passes two sets through; its consumer reads them at offsets 0 and 4
      local m = nn.Sequential{
         nn.Conv2d(3, 4, 3, {padding = 1, bias = false}), nn.BatchNorm2d(4), nn.ReLU(),
         nn.Concat{nn.Identity(), nn.Sequential{nn.Conv2d(4, 2, 3, {padding = 1, bias = false}), nn.BatchNorm2d(2), nn.ReLU()}},
         nn.Conv2d(6, 6, 3, {padding = 1, groups = 6, bias = false}), nn.BatchNorm2d(6), nn.ReLU(),
         nn.Conv2d(6, 3, 1, {bias = false}), nn.BatchNorm2d(3), nn.ReLU(),
         nn.GlobalAvgPool2d(), nn.Linear(3, 2)}
      local bns = m:findModules('BatchNorm2d')
      for _, bn in ipairs(bns) do bn.weight:copy(nr.rand({bn.num_features}):mul_(0.4):add_(0.1)) end
      m:evaluate()
      local x = nr.randn({2, 3, 6, 6})
      local before = m:forward(x):clone()
      local last = m:findModules('Conv2d')[4].weight:clone()
      local rep = nr.rejuvenate(m, {input_shape = {3, 6, 6}, budget = 0, rescale = true, gamma0 = 1})
      assert.is_true(rep.rescaled >= 6)
      local g = m:findModules('BatchNorm2d')[3].weight  -- the depthwise conv's BN: every |γ| now 1
      assert.is_true(rel(g:clone():abs(), nr.ones({6})) <= 1e-6)
      assert.is_true(rel(m:findModules('Conv2d')[4].weight, last:mul(bns[3].weight:clone():reshape(1, 6, 1, 1))) <= 1e-6)
      assert.is_true(rel(m:forward(x), before) <= 1e-5)
   end)

   it('classifier columns of new channels: zero by default, N(0, 0.01) with linear_init = normal', function()
      nr.manual_seed(13)
      for _, mode in ipairs({'zero', 'normal'}) do
         local m = net()
         kill(m, 0.4)
         local before = m:findModules('Linear')[1].in_features
         nr.rejuvenate(m, {input_shape = SHAPE, linear_init = mode, budget = 2})
         local lin = m:findModules('Linear')[1]
         assert.is_true(lin.in_features > before)
         -- the conv feeding the head keeps its survivors first; its new channels' columns are last
         local last = lin.weight:narrow(2, lin.in_features - 3, 4)
         if mode == 'zero' then
            assert.are.equal(0, last:abs():max())
         else
            assert.is_true(last:abs():max() > 0 and last:abs():max() < 0.1)
         end
      end
   end)

   it('a layer dead as a whole keeps a one-channel stub; r counts it as dead', function()
      nr.manual_seed(12)
      local m = net()
      local d1bn = m:findModules('BatchNorm2d')[4]     -- the dense layer's BN
      d1bn.weight:fill(1e-5)
      local u = nr.utilization(m, SHAPE)
      assert.is_true(u.layers[4].dead)
      assert.are.equal(0, u.layers[4].live)
      m:evaluate()
      local x = nr.randn({2, 3, 4, 4})
      local pruned = m:clone()
      nr.rejuvenate(pruned, {input_shape = SHAPE, budget = 0})
      assert.are.equal(1, pruned:findModules('Conv2d')[4].out_channels)
      local y0 = pruned:forward(x):clone()
      nr.rejuvenate(m, {input_shape = SHAPE, scheme = 'CR'})
      assert.is_true(rel(m:forward(x), y0) <= 1e-4)
      -- the planned CR cost counts the stub as surgery builds it (one channel of its generation)
      for _, gens in ipairs({'merge', 'keep'}) do
         nr.manual_seed(12)
         local m2 = net()
         m2:findModules('BatchNorm2d')[4].weight:fill(1e-5)
         local b2 = m2:findModules('BatchNorm2d')[2]
         for i = 1, 12, 2 do b2.weight:set(i, 0) end
         local rep = nr.rejuvenate(m2, {input_shape = SHAPE, scheme = 'CR', generations = gens})
         assert.are.equal(rep.planned_cost, rep.cost, gens)
      end
   end)

   it('explains what it cannot do', function()
      assert.has_error(function() nr.utilization(net()) end, "nr.utilization: input_shape is required (e.g. {3, 32, 32}); the model has no nr_info.input_size")
      local bad = nn.Sequential{nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)}
      local ok, err = pcall(nr.utilization, bad, {3, 8, 8})
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find('expects 5 channels but the graph carries 4', 1, true))
      local c = nn.Conv2d(4, 4, 3, {padding = 1, bias = false})
      local tied = nn.Sequential{nn.Conv2d(3, 4, 1, {bias = false}), nn.BatchNorm2d(4), c, nn.BatchNorm2d(4), c, nn.BatchNorm2d(4)}
      local ok3, err3 = pcall(nr.rejuvenate, tied, {input_shape = {3, 4, 4}})
      assert.is_false(ok3)
      assert.is_truthy(tostring(err3):find('4 (Conv2d 4->4 3x3 p1 nobias): shares its parameters with 2 (weight tying)', 1, true), tostring(err3))
      -- a bias alone shared by assignment is tying too
      local c1, c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
      c2.bias, c2.gradBias = c1.bias, c1.gradBias
      local bias_tied = nn.Sequential{c1, nn.BatchNorm2d(4), c2, nn.BatchNorm2d(4)}
      local ok4, err4 = pcall(nr.rejuvenate, bias_tied, {input_shape = {3, 4, 4}})
      assert.is_false(ok4)
      assert.is_truthy(tostring(err4):find('shares its parameters with 0', 1, true), tostring(err4))
   end)

   it('keeps a grouped conv (1 < groups < channels) and the sets it reads and writes at their widths', function()
      -- the grouped conv's weight cannot be resized channel by channel: its input set (the stem) and
      -- its output are fixed, unpenalised and all live; the conv after it is rejuvenated as usual
      local stem, grouped, last = nn.Conv2d(3, 4, 1, {bias = false}), nn.Conv2d(4, 4, 3, {groups = 2, padding = 1, bias = false}),
                                  nn.Conv2d(4, 6, 3, {padding = 1, bias = false})
      local m = nn.Sequential{stem, nn.BatchNorm2d(4), nn.ReLU(), grouped, nn.BatchNorm2d(4), nn.ReLU(),
                              last, nn.BatchNorm2d(6), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(6, 2)}
      m:evaluate()
      local bns = m:findModules('BatchNorm2d')
      for _, bn in ipairs(bns) do
         bn.running_mean:copy(nr.randn({bn.num_features}):mul_(0.1))
         bn.bias:copy(nr.randn({bn.num_features}):mul_(0.1))
      end
      assert.same({bns[3]}, R.penalized(m, SHAPE))
      bns[1].weight:set(1, 0)                       -- would be dead, but the stem's set cannot lose it
      bns[3].weight:set(2, 0)                       -- dead, and removable
      bns[3].bias:set(2, 0)
      local u = nr.utilization(m, SHAPE)
      assert.are.equal(3 * 4 + 2 * 2 * 2 * 9 + 4 * 5 * 9, u.params_live)   -- convs (the head is not counted)
      local x = nr.randn({2, 3, 4, 4})
      local before = m:forward(x):clone()
      local rep = nr.rejuvenate(m, {input_shape = SHAPE, budget = 1.5})
      assert.are.equal(4, m:get(1).out_channels)
      assert.are.equal(grouped, m:get(4))           -- untouched
      assert.is_true(m:get(7).out_channels > 5)     -- the free layer grew back toward the budget
      assert.is_true(rep.cost <= 1.5 * u.params_all and rep.cost > u.params_all, rep.cost)
      local after = m:forward(x)
      local err = after:clone():sub_(before):abs():max() / before:abs():max()
      assert.is_true(err < 1e-4, 'function changed: ' .. err)
   end)
end)

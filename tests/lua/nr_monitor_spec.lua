-- Neural Rejuvenation monitoring: liveliness masks, the utilization ratio and its cost.
--
-- Checks: the C primitives (nr_bn_live_mask, nr_l1_sign_add); counts against hand-computed
-- values on small graphs (chain, residual add, concat, depthwise); counts against a brute-force
-- count (physically prune, then count with nr.count, an independent counter) on the zoo; the L1
-- hook skips fixed layers; and the monitor's cost relative to one training step (< 1%).
local nr = require 'nr'
local nn = nr.nn
local ffi = require 'ffi'
local C = require('nr.ffi').C
local R = require 'nr.rejuvenate'
local now = require('nr.progress').now

local function cbn(cin, cout, k, opts)
   opts = opts or {}
   return nn.Conv2d(cin, cout, k, {padding = opts.padding or (k == 3 and 1 or 0), groups = opts.groups, bias = false}),
          nn.BatchNorm2d(cout)
end

local function kill(bn, list) for _, i in ipairs(list) do bn.weight:set(i, 0) end end

describe('nr monitoring', function()
   it('nr_bn_live_mask: relative threshold, whole-layer death, count', function()
      local g = nr.tensor({1, -0.009, 0.5, 0.011, 0})
      local m = nr.empty({5}, {dtype = 'uint8'})
      local n = ffi.new('int64_t[1]')
      assert.are.equal(0, C.nr_bn_live_mask(g.c, m.c, 0.01, 1e-3, n))
      assert.same({1, 0, 1, 1, 0}, m:totable())
      assert.are.equal(3, tonumber(n[0]))
      local tiny = nr.tensor({9e-4, 1e-4})
      C.nr_bn_live_mask(tiny.c, m:narrow(1, 1, 2).c, 0.01, 1e-3, n)
      assert.are.equal(0, tonumber(n[0]))
      assert.are_not.equal(0, C.nr_bn_live_mask(g.c, m.c, -1, 1e-3, n))
   end)

   it('nr_l1_sign_add adds lambda*sign(gamma), sign(0) = 0', function()
      local g = nr.tensor({2, -3, 0})
      local d = nr.tensor({1, 1, 1})
      assert.are.equal(0, C.nr_l1_sign_add(g.c, d.c, 0.5))
      assert.same({1.5, 0.5, 1}, d:totable())
   end)

   it('chain: live_in * live_out * k * k, FLOPs x oh*ow, dead layer and no-live-input rules', function()
      local c1, b1 = cbn(3, 8, 3)
      local c2, b2 = cbn(8, 6, 3)
      local c3, b3 = cbn(6, 4, 1)
      local net = nn.Sequential{c1, b1, nn.ReLU(), nn.MaxPool2d(2), c2, b2, nn.ReLU(), c3, b3, nn.ReLU(),
                                nn.GlobalAvgPool2d(), nn.Linear(4, 5)}
      kill(b1, {1, 2, 3})                    -- 5 of 8 live
      b2.weight:set(4, 0.009)                -- below 1% of max (1): dead
      b2.weight:set(5, 0.0101)               -- above: live -> 5 of 6 live
      local u = nr.utilization(net, {3, 8, 8})
      local p = 3 * 5 * 9 + 5 * 5 * 9 + 5 * 4 * 1
      local f = 3 * 5 * 9 * 64 + 5 * 5 * 9 * 16 + 5 * 4 * 16
      assert.are.equal(p, u.params_live)
      assert.are.equal(3 * 8 * 9 + 8 * 6 * 9 + 6 * 4, u.params_all)
      assert.are.equal(f, u.flops_live)
      assert.are.equal(p / u.params_all, u.r_params)
      assert.are.equal(5, u.layers[1].live)
      assert.are.equal(5, u.layers[2].live)
      -- counting the classifier and BN is configurable
      local u2 = nr.utilization(net, {3, 8, 8}, {count = {linear = true, bn = true}})
      assert.are.equal(p + 4 * 5 + 2 * (5 + 5 + 4), u2.params_live)
      -- max |gamma| < 1e-3: the layer is dead as a whole, and so is everything it feeds
      b2.weight:mul_(1e-4)
      local u3 = nr.utilization(net, {3, 8, 8})
      assert.is_true(u3.layers[2].dead)
      assert.is_true(u3.layers[3].dead)
      assert.are.equal(3 * 5 * 9, u3.params_live)
   end)

   it('residual add: OR of both sides; fixed convs always live', function()
      local c1, b1 = cbn(4, 6, 3)
      local c2, b2 = cbn(6, 4, 3)
      local c3, b3 = cbn(4, 4, 1)
      local net = nn.Sequential{nn.Residual(nn.Sequential{c1, b1, nn.ReLU(), c2, b2}, nn.Sequential{c3, b3}),
                                nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(4, 2)}
      kill(b2, {1, 2})
      kill(b3, {2, 3})
      -- channel 2 is dead on both sides: removable; 1 and 3 are live on one side each
      local u = nr.utilization(net, {4, 4, 4})
      assert.are.equal(3, u.layers[2].live)
      assert.are.equal(3, u.layers[3].live)
      assert.are.equal(4 * 6 * 9 + 6 * 3 * 9 + 4 * 3, u.params_live)
      c2.nr_fixed = true
      u = nr.utilization(net, {4, 4, 4})
      assert.are.equal(4, u.layers[2].live)
      assert.are.equal(4, u.layers[3].live)
   end)

   it('concat: masks concatenate (DenseNet)', function()
      local c0, b0 = cbn(3, 4, 3)
      local c1, b1 = cbn(4, 3, 3)
      local c2, b2 = cbn(7, 5, 1)
      local net = nn.Sequential{c0, b0, nn.ReLU(), nn.Concat{nn.Identity(), nn.Sequential{c1, b1, nn.ReLU()}},
                                c2, b2, nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(5, 2)}
      kill(b0, {1})
      kill(b1, {2, 3})
      local u = nr.utilization(net, {3, 4, 4})
      assert.are.equal(3 * 3 * 9 + 3 * 1 * 9 + (3 + 1) * 5, u.params_live)
      assert.are.equal(4, u.layers[3].in_live)
   end)

   it('depthwise: a channel lives only if its producer AND its own gamma live; linear cost', function()
      local c1, b1 = cbn(3, 6, 3)
      local dw, bd = cbn(6, 6, 3, {groups = 6})
      local pw, bp = cbn(6, 8, 1)
      local net = nn.Sequential{c1, b1, nn.ReLU(), dw, bd, nn.ReLU(), pw, bp, nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(8, 2)}
      kill(b1, {1})
      kill(bd, {2})
      local u = nr.utilization(net, {3, 4, 4})
      -- channels 1 and 2 are gone from the producer, the depthwise conv and the consumer
      assert.are.equal(4, u.layers[1].live)
      assert.are.equal(4, u.layers[2].live)
      assert.are.equal(3 * 4 * 9 + 4 * 9 + 4 * 8, u.params_live)
      assert.are.equal(3 * 6 * 9 + 6 * 9 + 6 * 8, u.params_all)
   end)

   local ZOO = {
      {'VGG-19-CIFAR', {name = 'vgg', depth = 19, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
      {'ResNet-164', {name = 'resnet', depth = 164, dataset = 'cifar10', classes = 10, preact = true}, {3, 8, 8}},
      {'DenseNet-100-40', {name = 'densenet', depth = 100, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
      {'MobileNet-0.25', {name = 'mobilenet', width = 0.25, classes = 10}, {3, 32, 32}},
      {'ResNet-50', {name = 'resnet', depth = 50, classes = 10}, {3, 32, 32}},
   }
   for zi, z in ipairs(ZOO) do
      it(z[1] .. ': mask counts equal a brute-force count of the physically pruned model', function()
         nr.manual_seed(300 + zi)
         local model = nr.models.build(z[2])
         local g = R.monitor.graph_of(model, z[3])
         for _, u in ipairs(g.units) do
            if u.bn and not u.fixed then
               local c = u.bn.num_features
               local perm = nr.randperm(c):totable()
               for i = 1, math.floor(c * 0.4) do u.bn.weight:set(perm[i] + 1, 0) end
            end
         end
         local u = nr.utilization(model, z[3])
         assert.is_true(u.r_params < 0.9)
         nr.rejuvenate(model, {input_shape = z[3], budget = 0})
         local bf = nr.count(model, z[3])
         local conv = bf.by_type.Conv2d
         assert.are.equal(u.params_live, conv.params)
         assert.are.equal(u.flops_live, conv.macs)
         local after = nr.utilization(model, z[3])
         assert.are.equal(1, after.r_params)
      end)
   end

   it('L1 hook adds lambda*sign(gamma) to non-fixed BN scales only', function()
      local model = nr.models.build({name = 'resnet', depth = 164, dataset = 'cifar10', classes = 10, preact = false})
      model:zeroGradParameters()
      local n = R.l1(model, 1e-3, {3, 8, 8})
      local fixed_touched, free_touched = 0, 0
      for _, m in ipairs(model:findModules('BatchNorm2d')) do
         local s = m.gradWeight:abs():sum()
         if m.nr_fixed then fixed_touched = fixed_touched + s else free_touched = free_touched + (s > 0 and 1 or 0) end
      end
      assert.are.equal(0, fixed_touched)
      assert.are.equal(n, free_touched)
      assert.are.equal(2 * 54, n)
   end)

   it('utilization and l1 check input_shape, count and lambda, naming the value', function()
      local model = nn.Sequential{cbn(3, 8, 3)}
      local function err(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      -- {3, -8, 0.5} used to report a cost of 0 (nr.count refuses it)
      local e = err(function() local u = nr.utilization(model, {3, -8, 0.5}); return u end)
      assert.truthy(e:find('nr_monitor_spec.lua:%d+: nr.utilization: input_shape%[2%] must be a positive integer, got %-8'), e)
      e = err(function() local u = nr.utilization(model, {3, 8, 0.5}); return u end)
      assert.truthy(e:find('nr.utilization: input_shape[3] must be a positive integer, got 0.5', 1, true), e)
      e = err(function() local u = nr.utilization(model, {3, 8, 8}, {count = 'x'}); return u end)
      assert.truthy(e:find('nr.utilization: count must be a table such as {conv = true, bn = false}, got "x"', 1, true), e)
      e = err(function() local u = nr.utilization(model, {3, 8, 8}, {threshold = 0 / 0}); return u end)
      assert.truthy(e:find('nr.utilization: threshold must be a fraction in [0, 1)', 1, true), e)
      -- a NaN λ made every BN gradient NaN
      model:zeroGradParameters()
      for _, v in ipairs({0 / 0, -1, math.huge, 'x'}) do
         e = err(function() local n = R.l1(model, v, {3, 8, 8}); return n end)
         assert.truthy(e:find('nr_monitor_spec.lua:%d+: nr.rejuvenate.l1: '), e)
         assert.truthy(e:find('lambda must be a finite number >= 0, got ' .. require('nr.check').show(v), 1, true), e)
      end
      assert.equal(0, model:findModules('BatchNorm2d')[1].gradWeight:abs():sum())
      -- the shape from nr_info: without input_channels, the first convolution's (not 3)
      local grey = nn.Sequential{cbn(1, 8, 3)}
      grey.nr_info = {input_size = 8}
      assert.are.equal(nr.utilization(grey, {1, 8, 8}).params_all, nr.utilization(grey).params_all)
   end)

   it('counting every part (count.bias too), utilization equals nr.count after NR, CR and CA (split convs\' biases)', function()
      local count = {conv = true, linear = true, bn = true, bias = true}
      for _, scheme in ipairs({'NR', 'CR', 'CA'}) do
         nr.manual_seed(1)
         local m = nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1}), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, {padding = 1}), nn.BatchNorm2d(8), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(8, 3)}
         for _, bn in ipairs(m:findModules('BatchNorm2d')) do bn.weight:set(1, 0); bn.weight:set(2, 0) end
         local rep = R.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = scheme, count = count})
         local all = nr.count(m, {3, 8, 8}).params
         assert.are.equal(all, nr.utilization(m, {3, 8, 8}, {count = count}).params_all, scheme)
         assert.are.equal(all, rep.cost, scheme)   -- the budget priced them too
      end
   end)

   it('monitoring costs well under 1% of a training step (ResNet-164, batch 8, 32x32, wall clock)', function()
      nr.manual_seed(7)
      local model = nr.models.build({name = 'resnet', depth = 164, dataset = 'cifar10', classes = 10})
      local x = nr.randn({8, 3, 32, 32})
      local labels = nr.randint(0, 10, {8})
      local crit = nn.CrossEntropyLoss()
      local function step()
         local y = model:forward(x)
         crit:forward(y, labels)
         model:zeroGradParameters()
         model:backward(x, crit:backward(y, labels))
      end
      step()
      -- minimum over repetitions: robust to other processes preempting this one
      local t_step = math.huge
      for _ = 1, 2 do
         local t0 = now()
         step()
         t_step = math.min(t_step, now() - t0)
      end
      nr.utilization(model, {3, 32, 32})
      local t_mon = math.huge
      for _ = 1, 20 do
         local t0 = now()
         nr.utilization(model, {3, 32, 32})
         R.l1(model, 1e-4, {3, 32, 32})
         t_mon = math.min(t_mon, now() - t0)
      end
      print(string.format('  monitor + L1: %.3f ms; training step %.1f ms (wall); fraction %.4f%%',
         t_mon * 1e3, t_step * 1e3, 100 * t_mon / t_step))
      assert.is_true(t_mon / t_step < 0.01)
   end)
end)

-- Inference folding under nr.no_grad: a Sequential runs Conv2d + BatchNorm2d (evaluation mode)
-- + in-place ReLU as one conv with the BN and ReLU applied per output plane
-- (nr_conv2d_forward_bn). Checks: the zoo models give bit-identical outputs with and without
-- folding, on every conv path (oneDNN dense 3x3, im2col, 1x1, depthwise, strided, with bias);
-- the fold really happens (BN output is the conv's buffer); backward is refused inside no_grad
-- and after a no_grad forward; the mode is restored after errors; the C entry checks arguments.
local nr = require 'nr'
local nn = nr.nn
local C = require('nr.ffi').C

local function randomize_stats(m)
   for _, bn in ipairs(m:findModules('BatchNorm2d')) do
      bn.running_mean:copy(nr.randn(bn.running_mean:shape()):mul(0.2))
      bn.running_var:copy(nr.rand(bn.running_var:shape()):add(0.5))
      if bn.weight then bn.weight:copy(nr.randn(bn.weight:shape())) end
      if bn.bias then bn.bias:copy(nr.randn(bn.bias:shape())) end
   end
end

local function max_diff(a, b) return a:clone():sub_(b):abs_():max() end

describe('inference folding (nr.no_grad)', function()
   local cases = {
      {'MobileNet-0.25 (depthwise, 1x1, strided)', function() return nr.models.mobilenet{width = 0.25, input = 32, classes = 10} end, {3, 32, 32}},
      {'ResNet-18-CIFAR (oneDNN 3x3, residual)', function() return nr.models.resnet{depth = 18, dataset = 'cifar10'} end, {3, 32, 32}},
      {'convs with bias, no ReLU after one BN', function()
         return nn.Sequential{nn.Conv2d(3, 16, 3, {padding = 1}), nn.BatchNorm2d(16), nn.ReLU{inplace = true},
            nn.Conv2d(16, 16, 3, {padding = 1, groups = 16}), nn.BatchNorm2d(16),
            nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8, {affine = false}), nn.ReLU{inplace = true},
            nn.GlobalAvgPool2d(), nn.Flatten(), nn.Linear(8, 3)}
      end, {3, 12, 12}},
   }
   for _, case in ipairs(cases) do
      it(case[1] .. ': outputs identical with and without folding', function()
         nr.manual_seed(2)
         local m = case[2]()
         randomize_stats(m)
         m:evaluate()
         local x = nr.randn({3, unpack(case[3])})
         local plain = m:forward(x):clone()
         local folded = nr.no_grad(function() return m:forward(x):clone() end)
         assert.are.equal(0, max_diff(plain, folded))
         -- the fold happened: some BN's output is its conv's buffer
         local hits = 0
         for _, seq in ipairs(m:findModules('Sequential')) do
            for i = 1, #seq.modules - 1 do
               local a, b = seq.modules[i], seq.modules[i + 1]
               if a:typename() == 'Conv2d' and b:typename() == 'BatchNorm2d' and b.output:same_storage(a.output) then
                  hits = hits + 1
               end
            end
         end
         assert.is_true(hits > 0, 'no Conv2d + BatchNorm2d pair was folded')
         -- and a forward with gradients on runs unfolded again
         m:forward(x)
         for _, seq in ipairs(m:findModules('Sequential')) do
            for i = 1, #seq.modules - 1 do
               local a, b = seq.modules[i], seq.modules[i + 1]
               if a:typename() == 'Conv2d' and b:typename() == 'BatchNorm2d' then
                  assert.is_false(b.output:same_storage(a.output))
               end
            end
         end
      end)
   end

   it('Residual sums in place under no_grad: same bits, the input untouched, training output separate', function()
      nr.manual_seed(31)
      local net = nn.Sequential{nn.Conv2d(4, 4, 3, {padding = 1}), nn.BatchNorm2d(4),
         nn.Residual(nn.Sequential{nn.Conv2d(4, 4, 3, {padding = 1}), nn.BatchNorm2d(4)}), nn.ReLU{inplace = true},
         nn.Residual(nn.Identity())}
      randomize_stats(net)
      net:evaluate()
      local x = nr.randn({2, 4, 6, 6})
      local want = net:forward(x):clone()
      local res = net.modules[3]
      local got = nr.no_grad(function() return net:forward(x):clone() end)
      assert.are.same(want:totable(), got:totable())
      -- in place: the Residual's output is its main path's output
      assert.is_true(res.output:same_storage(res.modules[1].output))
      -- an identity main path is the input itself: never summed into
      local y = nr.randn({2, 4, 6, 6})
      local y0 = y:clone()
      local id = nn.Residual(nn.Identity())
      local s = nr.no_grad(function() return id:forward(y) end)
      assert.are.same(y0:totable(), y:totable())
      assert.are.equal(0, max_diff(s, y0:clone():mul(2)))
      -- back to training: the sum has its own buffer again and backward works
      net:training()
      net:forward(x)
      assert.is_false(res.output:same_storage(res.modules[1].output))
      net:backward(x, nr.randn(net.output:shape()))
   end)

   it('training-mode BN is never folded', function()
      local m = nn.Sequential{nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU{inplace = true}}
      local x = nr.randn({2, 2, 5, 5})
      nr.no_grad(function() m:forward(x) end)
      assert.is_false(m.modules[2].output:same_storage(m.modules[1].output))
   end)

   it('backward is refused inside no_grad and after a no_grad forward; mode restored after errors', function()
      local m = nn.Sequential{nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU{inplace = true}}
      m:evaluate()
      local x = nr.randn({2, 2, 5, 5})
      local y = nr.no_grad(function() return m:forward(x) end)
      local g = nr.randn(y:shape())
      local ok, err = pcall(function() m:backward(x, g) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('after a forward run inside nr.no_grad', 1, true), err)
      ok, err = pcall(nr.no_grad, function() m:forward(x); m:backward(x, g) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('inside nr.no_grad', 1, true), err)
      assert.is_true(nr.is_grad_enabled())
      m:forward(x)
      m:backward(x, g)   -- fine again
      assert.is_true(nr.set_grad_enabled(false))
      assert.is_false(nr.set_grad_enabled(true))
      -- found by fuzzing: a non-function failed as "attempt to call a table value"
      ok, err = pcall(nr.no_grad, {})
      assert.is_false(ok)
      assert.truthy(tostring(err):find('nr.no_grad: fn must be a function (or callable), got table', 1, true), err)
      assert.is_true(nr.is_grad_enabled())
      -- a module is callable (m(x) is m:forward(x)): nr.no_grad(m, x) ran it before that check, and runs it again
      assert.are.equal(0, max_diff(nr.no_grad(m, x):clone(), m:forward(x)))
      assert.is_true(nr.is_grad_enabled())
   end)

   it('nr_conv2d_forward_bn checks its BN arguments', function()
      local x, y, w = nr.randn({1, 2, 4, 4}), nr.empty({1, 3, 2, 2}), nr.randn({3, 2, 3, 3})
      local rm, rv = nr.zeros({3}), nr.ones({3})
      assert.are.equal(0, C.nr_conv2d_forward_bn(x.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1, nil, nil, rm.c, rv.c, 1e-5, 1))
      assert.are_not.equal(0, C.nr_conv2d_forward_bn(x.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1, nr.ones({3}).c, nil, rm.c, rv.c, 1e-5, 0))
      assert.truthy(require('nr.ffi').ffi.string(C.nr_last_error()):find('gamma and beta', 1, true))
      assert.are_not.equal(0, C.nr_conv2d_forward_bn(x.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1, nil, nil, nr.zeros({4}).c, rv.c, 1e-5, 0))
      assert.truthy(require('nr.ffi').ffi.string(C.nr_last_error()):find('running_mean', 1, true))
      assert.are_not.equal(0, C.nr_conv2d_forward_bn(x.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1, nil, nil, rm.c, rv.c, 0, 0))
      assert.truthy(require('nr.ffi').ffi.string(C.nr_last_error()):find('eps', 1, true))
   end)
end)

-- Layers: construction and fields, shapes (forward and outputShape agree), printing, default
-- initialisation, errors on bad input and bad options (clear messages, never a crash), buffer
-- reuse (no allocation in steady state), BatchNorm train vs eval, Dropout, CrossEntropyLoss,
-- thread-count independence, and a small model trained through Sequential.
local nr = require 'nr'
local nn = nr.nn
local nrffi = require 'nr.ffi'
local C = nrffi.C

local function close(a, b, tol) return math.abs(a - b) <= (tol or 1e-5) * math.max(1, math.abs(b)) end
-- The largest |a - b|; math.huge when any difference is NaN (math.max drops NaN arguments).
local function max_abs_diff(a, b)
   local pa, pb, m = a:contiguous():data(), b:contiguous():data(), 0
   for i = 0, a:numel() - 1 do
      local d = math.abs(pa[i] - pb[i])
      if d ~= d then return math.huge end
      m = math.max(m, d)
   end
   return m
end
local function err_of(f, ...)
   local ok, e = pcall(f, ...)
   assert(not ok, 'expected an error')
   return tostring(e)
end

describe('layer construction and shapes', function()
   it('Conv2d has PyTorch fields, shapes and printing', function()
      local m = nn.Conv2d(64, 128, 3, {stride = 2, padding = 1})
      assert.equal(64, m.in_channels)
      assert.equal(128, m.out_channels)
      assert.same({3, 3}, m.kernel_size)
      assert.same({2, 2}, m.stride)
      assert.same({1, 1}, m.padding)
      assert.same({1, 1}, m.dilation)
      assert.equal(1, m.groups)
      assert.same({128, 64, 3, 3}, m.weight:shape())
      assert.same({128}, m.bias:shape())
      assert.same({128, 64, 3, 3}, m.gradWeight:shape())
      assert.equal('64->128 3x3 s2 p1', m:extra())
      assert.same({128, 8, 8}, m:outputShape({64, 16, 16}))
      local g = nn.Conv2d(32, 64, {3, 1}, {groups = 4, bias = false, dilation = {2, 1}, padding = {2, 0}})
      assert.is_nil(g.bias)
      assert.same({64, 8, 3, 1}, g.weight:shape())
      assert.equal('32->64 3x1 p2x0 d2x1 g4 nobias', g:extra())
      local p, grads = g:parameters()
      assert.equal(1, #p)
      assert.equal(1, #grads)
   end)

   it('forward output shapes agree with outputShape for every layer', function()
      nr.manual_seed(1)
      local x = nr.randn({2, 4, 9, 7})
      local mods = {
         nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 3, {stride = 2, padding = 1}), nn.Conv2d(4, 4, 5, {groups = 4, padding = 2}),
         nn.Conv2d(4, 8, 1), nn.Conv2d(4, 2, 3, {dilation = 2}), nn.BatchNorm2d(4), nn.ReLU(), nn.Sigmoid(),
         nn.MaxPool2d(2), nn.MaxPool2d(3, {stride = 2, padding = 1}), nn.AvgPool2d(3, {stride = 1, padding = 1}),
         nn.AvgPool2d({3, 2}), nn.GlobalAvgPool2d(), nn.Flatten(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
         nn.AdaptiveAvgPool2d({4, 3}), nn.AdaptiveMaxPool2d(5), nn.AdaptiveMaxPool2d({12, 2}),
      }
      for _, m in ipairs(mods) do
         local y = m:forward(x)
         local s = y:shape()
         assert.equal(2, s[1])
         table.remove(s, 1)
         assert.same(m:outputShape({4, 9, 7}), s, tostring(m))
      end
      local l = nn.Linear(10, 3)
      assert.same({5, 3}, l:forward(nr.randn({5, 10})):shape())
      assert.same({3}, l:outputShape({10}))
   end)

   it('Linear takes (*, in_features) as PyTorch: each row of the leading dimensions, and one sample', function()
      nr.manual_seed(6)
      local l = nn.Linear(5, 3)
      local x, g = nr.randn({2, 4, 5}), nr.randn({2, 4, 3})
      local y = l:forward(x):clone()
      assert.same({2, 4, 3}, y:shape())
      l:zeroGradParameters()
      local gi = l:backward(x, g):clone()
      local gw, gb = l.gradWeight:clone(), l.gradBias:clone()
      -- the same rows as one (8, 5) batch: same values, bit for bit
      local x2, g2 = x:reshape({8, 5}), g:reshape({8, 3})
      assert.same(l:forward(x2):totable(), y:reshape({8, 3}):totable())
      l:zeroGradParameters()
      assert.same(l:backward(x2, g2):totable(), gi:reshape({8, 5}):totable())
      assert.same(gw:totable(), l.gradWeight:totable())
      assert.same(gb:totable(), l.gradBias:totable())
      assert.same({3}, l:forward(nr.randn({5})):shape())              -- one sample (in) -> (out)
      assert.same({4, 3}, l:outputShape({4, 5}))
      assert.same(4 * 5 * 3, select(2, l:cost({4, 5})))                -- MACs: one product per row
      local ok, err = pcall(l.forward, l, nr.randn({2, 4}))
      assert.is_false(ok)
      assert.truthy(tostring(err):find('expected input with 5 features in its last dimension, got [2 x 4]', 1, true), err)
   end)

   it('outputShape and tree name a shape argument that is not one', function()
      local m = nn.Sequential{nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)}
      local res = nn.Residual(nn.Sequential{nn.ReLU()})
      for _, c in ipairs({{m.outputShape, m, 'x', 'Sequential:outputShape: the input shape must be a table of integers >= 0'},
                          {m.outputShape, m, {3, 2.5, 3}, 'got {3, 2.5, 3}'},
                          {res.outputShape, res, 7, 'Residual:outputShape: the input shape must be'},
                          {m.tree, m, 5, 'Module:tree: the input shape must be a table of integers >= 0'},
                          {m.modules[4].outputShape, m.modules[4], 'x', 'got "x"'}}) do
         local ok, err = pcall(c[1], c[2], c[3])
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[4], 1, true), tostring(err))
      end
      assert.truthy(m:tree({3, 3, 3}):find('Linear 4->2 -> [2]', 1, true)) -- shapes still print
   end)

   it('initialises as PyTorch (bounded uniform, BN ones/zeros) and reproduces with the seed', function()
      nr.manual_seed(42)
      local a = nn.Conv2d(16, 8, 3)
      nr.manual_seed(42)
      local b = nn.Conv2d(16, 8, 3)
      assert.equal(0, max_abs_diff(a.weight, b.weight))
      assert.equal(0, max_abs_diff(a.bias, b.bias))
      local bound = 1 / math.sqrt(16 * 9)
      assert.is_true(a.weight:max() <= bound and a.weight:min() >= -bound)
      assert.is_true(a.weight:max() > 0.8 * bound and a.weight:min() < -0.8 * bound)
      assert.is_true(a.bias:max() <= bound and a.bias:min() >= -bound)
      local l = nn.Linear(100, 10)
      assert.is_true(l.weight:max() <= 0.1 and l.weight:min() >= -0.1)
      local bn = nn.BatchNorm2d(5)
      assert.same({1, 1, 1, 1, 1}, bn.weight:totable())
      assert.same({0, 0, 0, 0, 0}, bn.bias:totable())
      assert.same({0, 0, 0, 0, 0}, bn.running_mean:totable())
      assert.same({1, 1, 1, 1, 1}, bn.running_var:totable())
      assert.same({'running_mean', 'running_var'}, bn._buffers)
      local names = {}
      for _, b2 in ipairs(nn.Sequential{bn}:namedBuffers()) do names[#names + 1] = b2.name end
      assert.same({'0.running_mean', '0.running_var'}, names)
   end)
end)

describe('errors on bad input and bad options', function()
   it('containers take a list or the modules themselves; anything else is an error, never an empty container', function()
      nr.manual_seed(3)
      local a, b = nn.Linear(4, 3), nn.ReLU()
      local x = nr.randn({2, 4})
      local listed = nn.Sequential{a, b}:forward(x):clone()
      local direct = nn.Sequential(a, b)
      assert.are.equal(2, #direct.modules)
      assert.are.same(listed:totable(), direct:forward(x):totable())
      assert.are.equal(2, #nn.Concat(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 3, 1)).modules)
      local e = err_of(nn.Sequential, 5)
      assert.truthy(e:find('expects a list of modules', 1, true), e)
      e = err_of(nn.Sequential, {a, 'relu'})
      assert.truthy(e:find('child 2 is not a module', 1, true), e)
      e = err_of(nn.Concat, 'x')
      assert.truthy(e:find('expects a list of modules', 1, true), e)
      -- a nil child (an unassigned variable) is an error, not a silently shorter container
      e = err_of(nn.Sequential, {a, nil, b})
      assert.truthy(e:find('child 2 is nil (an unassigned variable?); 3 children were given', 1, true), e)
      e = err_of(nn.Sequential, a, nil, b)
      assert.truthy(e:find('child 2 is nil', 1, true), e)
      -- a class where an instance belongs (the call forgotten): it ran, its state kept on the class
      e = err_of(nn.Sequential, nn.ReLU)
      assert.truthy(e:find('Sequential: child 1 is the class ReLU, not a module: call it (ReLU())', 1, true), e)
      e = err_of(nn.Concat, {a, nn.Conv2d})
      assert.truthy(e:find('child 2 is the class Conv2d', 1, true), e)
      e = err_of(function() nn.Sequential():add(nn.Tanh) end)
      assert.truthy(e:find('Sequential:add: got the class Tanh, not a module: call it (Tanh())', 1, true), e)
      -- seq:add checks as the constructor does (found by fuzzing: add({}) was accepted and failed
      -- later in forward or print, add(5) as "bad argument #1 to 'rawget'")
      local s = nn.Sequential()
      for _, bad in ipairs({5, {}, 'relu'}) do
         local ok, err = pcall(function() s:add(bad) end)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('layers_spec.lua:%d+: Sequential:add: expected a module, got ' .. type(bad)), err)
      end
      assert.are.equal(0, #s.modules)
      assert.are.equal(1, #s:add(nn.ReLU()).modules)
   end)

   it('Concat and Residual need their module children; Concat checks gradOutput; Flatten checks x in backward', function()
      local function ctor_err(f)
         local ok, e = pcall(f)
         assert.is_false(ok)
         return tostring(e)
      end
      -- raised at the caller's line, naming the container
      local e = ctor_err(function() local m = nn.Concat{}; return m end)
      assert.truthy(e:find('layers_spec.lua:%d+: Concat: expects at least one module'), e)
      e = ctor_err(function() local m = nn.Residual(nil); return m end)
      assert.truthy(e:find('layers_spec.lua:%d+: Residual: main must be a module, got nil'), e)
      e = ctor_err(function() local m = nn.Residual(nil, nn.ReLU()); return m end)
      assert.truthy(e:find('Residual: main must be a module, got nil', 1, true), e)
      e = ctor_err(function() local m = nn.Sequential{nn.ReLU(), 3}; return m end)
      assert.truthy(e:find('layers_spec.lua:%d+: Sequential: child 2 is not a module'), e)
      local x = nr.randn({2, 3, 4, 4})
      local cat = nn.Concat{nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)}
      e = err_of(cat.backward, cat, x, nr.ones({2, 4, 4, 4}))
      assert.truthy(e:find('Concat (Concat): backward called before forward', 1, true), e)
      cat:forward(x)
      e = err_of(cat.backward, cat, x, nil)
      assert.truthy(e:find('Concat (Concat): gradOutput must be a tensor, got nil', 1, true), e)
      e = err_of(cat.backward, cat, x, nr.ones({2, 1, 4, 4}))
      assert.truthy(e:find('gradOutput [2 x 1 x 4 x 4] does not match the output [2 x 4 x 4 x 4]', 1, true), e)
      assert.same({2, 3, 4, 4}, cat:backward(x, nr.ones({2, 4, 4, 4})):shape())
      local f = nn.Flatten()
      f:forward(x)
      e = err_of(f.backward, f, 5, nr.ones({2, 48}))
      assert.truthy(e:find('Flatten (Flatten): expected a tensor as input, got number', 1, true), e)
   end)

   it('names the module path and the shapes on wrong channels', function()
      local net = nn.Sequential{nn.Conv2d(3, 64, 3, {padding = 1}), nn.ReLU(), nn.Conv2d(32, 16, 3)}
      local e = err_of(net.forward, net, nr.randn({8, 3, 16, 16}))
      assert.truthy(e:find('2 (Conv2d 32->16 3x3): expected input with 32 channels, got [8 x 64 x 16 x 16]', 1, true), e)
      local bn = nn.BatchNorm2d(64)
      e = err_of(bn.forward, bn, nr.randn({8, 32, 16, 16}))
      assert.truthy(e:find('expected input with 64 channels, got [8 x 32 x 16 x 16]', 1, true), e)
      local l = nn.Linear(10, 2)
      e = err_of(l.forward, l, nr.randn({4, 11}))
      assert.truthy(e:find('expected input with 10 features in its last dimension, got [4 x 11]', 1, true), e)
      e = err_of(l.forward, l, nr.randn({4, 10, 1, 1}))
      assert.truthy(e:find('got [4 x 10 x 1 x 1] (an (N, C, H, W) map needs nn.Flatten or a global pool first)', 1, true), e)
   end)

   it('rejects wrong dtypes, wrong ranks, tiny inputs and mismatched gradients', function()
      local c = nn.Conv2d(3, 4, 3)
      assert.truthy(err_of(c.forward, c, nr.zeros({2, 3, 8, 8}, {dtype = 'int64'})):find('float32', 1, true))
      assert.truthy(err_of(c.forward, c, nr.randn({3, 8, 8})):find('expected a 4-d input', 1, true))
      assert.truthy(err_of(c.forward, c, nr.randn({1, 3, 2, 2})):find('too small', 1, true))
      local x = nr.randn({2, 3, 8, 8})
      c:forward(x)
      assert.truthy(err_of(c.backward, c, x, nr.randn({2, 4, 5, 5})):find('gradOutput [2 x 4 x 5 x 5] does not match', 1, true))
      local p = nn.MaxPool2d(3)
      assert.truthy(err_of(p.forward, p, nr.randn({1, 1, 2, 2})):find('too small', 1, true))
      assert.truthy(err_of(nn.Conv2d(3, 4, 3).backward, nn.Conv2d(3, 4, 3), x, nr.randn({2, 4, 6, 6})):find('before forward', 1, true))
   end)

   it('CrossEntropyLoss checks labels: dtype, shape, range (naming value and position)', function()
      local crit = nn.CrossEntropyLoss()
      local logits = nr.randn({4, 10})
      local e = err_of(crit.forward, crit, logits, nr.tensor({0, 3, 1, 9}))
      assert.truthy(e:find('labels must be int64 class ids 0..9, got float32 cpu [4]', 1, true), e)
      e = err_of(crit.forward, crit, logits, nr.tensor({0, 3, 10, 9}, {dtype = 'int64'}))
      assert.truthy(e:find('labels[2] = 10 is outside 0..9', 1, true), e)
      e = err_of(crit.forward, crit, logits, nr.tensor({0, -1, 1, 9}, {dtype = 'int64'}))
      assert.truthy(e:find('labels[1] = -1 is outside 0..9', 1, true), e)
      e = err_of(crit.forward, crit, logits, nr.tensor({0, 1, 2}, {dtype = 'int64'}))
      assert.truthy(e:find('labels must have shape [4]', 1, true), e)
      e = err_of(crit.forward, crit, nr.randn({4, 10, 1}), nr.tensor({0, 1, 2, 3}, {dtype = 'int64'}))
      assert.truthy(e:find('logits must be a float32 or bfloat16 (N, K) tensor', 1, true), e)
      -- backward checks the range too
      crit:forward(logits, nr.tensor({0, 1, 2, 3}, {dtype = 'int64'}))
      e = err_of(crit.backward, crit, logits, nr.tensor({0, 1, 2, 30}, {dtype = 'int64'}))
      assert.truthy(e:find('labels[3] = 30', 1, true), e)
      -- labels_checked only skips a GPU's check: on the CPU the range is always checked
      e = err_of(crit.loss_tensor, crit, logits, nr.tensor({0, 3, 10, 9}, {dtype = 'int64'}), true)
      assert.truthy(e:find('labels[2] = 10 is outside 0..9', 1, true), e)
      e = err_of(crit.backward, crit, logits, nr.tensor({0, 1, 2, 30}, {dtype = 'int64'}), 1, true)
      assert.truthy(e:find('labels[3] = 30', 1, true), e)
      -- the host-side check the trainer runs before copying labels
      e = err_of(nn.check_class_ids, nr.tensor({0, 3, 10, 9}, {dtype = 'int64'}), 10)
      assert.truthy(e:find('nr.nn.check_class_ids: nr_check_class_ids: labels[2] = 10 is outside 0..9', 1, true), e)
      e = err_of(nn.check_class_ids, nr.tensor({0, 3}), 10)
      assert.truthy(e:find('labels must be a 1-d int64 tensor, got float32', 1, true), e)
      e = err_of(nn.check_class_ids, nr.tensor({0, 3}, {dtype = 'int64'}), 0)
      assert.truthy(e:find('num_classes must be a positive integer, got 0', 1, true), e)
      nn.check_class_ids(nr.tensor({0, 3, 9}, {dtype = 'int64'}), 10)
      -- a strided view is checked element by element
      local ids = nr.tensor({{0, 50}, {9, 60}}, {dtype = 'int64'})
      nn.check_class_ids(ids:select(2, 1), 10)
      e = err_of(nn.check_class_ids, ids:select(2, 2), 10)
      assert.truthy(e:find('labels[0] = 50', 1, true), e)
   end)

   it('rejects bad options with the option named', function()
      local function opt_err(f) return err_of(f) end
      assert.truthy(opt_err(function() nn.Conv2d(3, 4, 3, {strid = 2}) end):find('unknown option "strid"', 1, true))
      assert.truthy(opt_err(function() nn.Conv2d(3, 4, 3, {groups = 2}) end):find('groups 2 must divide', 1, true))
      assert.truthy(opt_err(function() nn.Conv2d(3, 4, 3, {stride = 0}) end):find('stride', 1, true))
      assert.truthy(opt_err(function() nn.Conv2d(3, 4, 0) end):find('kernel_size', 1, true))
      assert.truthy(opt_err(function() nn.Conv2d(3, 4, 3, {padding = -1}) end):find('padding', 1, true))
      assert.truthy(opt_err(function() nn.Conv2d(3, 4, 3, {bias = 'no'}) end):find('bias must be a boolean', 1, true))
      assert.truthy(opt_err(function() nn.Conv2d(0, 4, 3) end):find('in_channels', 1, true))
      assert.truthy(opt_err(function() nn.MaxPool2d(2, {padding = 2}) end):find('at most half the kernel', 1, true))
      assert.truthy(opt_err(function() nn.AvgPool2d(2, {ceil_mode = 1}) end):find('ceil_mode must be a boolean', 1, true))
      assert.equal('nr.nn.MaxPool2d 3x3 s2 ceil', tostring(nn.MaxPool2d(3, {stride = 2, ceil_mode = true})))
      assert.same({4, 3, 3}, nn.MaxPool2d(2, {ceil_mode = true}):outputShape({4, 5, 6}))
      assert.truthy(opt_err(function() nn.BatchNorm2d(4, {eps = 0}) end):find('eps', 1, true))
      assert.truthy(opt_err(function() nn.BatchNorm2d(4, {momentum = 2}) end):find('momentum', 1, true))
      assert.truthy(opt_err(function() nn.Dropout(1.5) end):find('p must be a number in [0, 1], got 1.5', 1, true))
      assert.truthy(opt_err(function() nn.Dropout(-0.1) end):find('p must be', 1, true))
      assert.truthy(opt_err(function() nn.CrossEntropyLoss({label_smoothing = 1.5}) end):find('label_smoothing', 1, true))
      assert.truthy(opt_err(function() nn.Linear(3, 4, {bais = true}) end):find('unknown option "bais"', 1, true))
      -- each names the line that called the constructor, not a line inside nrlua
      local here = debug.getinfo(1, 'S').short_src
      for i, make in ipairs({function() local m = nn.Conv2d(3, 4, 3, {strid = 2}) return m end,
                             function() local m = nn.MaxPool2d(0) return m end,
                             function() local m = nn.AvgPool2d(2, {stride = 0}) return m end,
                             function() local m = nn.AvgPool2d(2, {ceil_mode = 1}) return m end,
                             function() local m = nn.MaxPool2d(2, {pad = 1}) return m end,
                             function() local m = nn.BatchNorm2d(4, {eps = 1e-5, mom = 1}) return m end,
                             function() local m = nn.Linear(3, 4, 5) return m end,
                             function() local m = nn.CrossEntropyLoss({smoothing = 0.1}) return m end}) do
         local e = opt_err(make)
         assert(e:sub(1, #here + 1) == here .. ':', 'case ' .. i .. ': ' .. e)
      end
   end)

   it('C kernels return errors (not crashes) on NULL, wrong dtype or mismatched tensors', function()
      local x, w = nr.randn({1, 3, 5, 5}), nr.randn({4, 3, 3, 3})
      local y = nr.empty({1, 4, 3, 3})
      assert.equal(0, C.nr_conv2d_forward(x.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1))
      assert.are_not.equal(0, C.nr_conv2d_forward(nil, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1))
      assert.are_not.equal(0, C.nr_conv2d_forward(x.c, y.c, w.c, nil, 0, 1, 0, 0, 1, 1, 1))
      assert.are_not.equal(0, C.nr_conv2d_forward(x.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 2))
      assert.are_not.equal(0, C.nr_conv2d_forward(x.c, nr.empty({1, 4, 4, 4}).c, w.c, nil, 1, 1, 0, 0, 1, 1, 1))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('y: expected', 1, true))
      assert.are_not.equal(0, C.nr_conv2d_forward(x.c, y.c, nr.randn({4, 3}).c, nil, 1, 1, 0, 0, 1, 1, 1))
      local xi = nr.zeros({1, 3, 5, 5}, {dtype = 'int64'})
      assert.are_not.equal(0, C.nr_conv2d_forward(xi.c, y.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1))
      local nc = x:transpose(3, 4)
      assert.are_not.equal(0, C.nr_relu_forward(nc.c, nr.empty({1, 3, 5, 5}).c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('contiguous', 1, true))
      assert.are_not.equal(0, C.nr_maxpool2d_backward(nr.randn({1, 1, 2, 2}).c, nr.full({1, 1, 2, 2}, 99, {dtype = 'int64'}).c,
         nr.empty({1, 1, 4, 4}).c, 2, 2, 2, 2, 0, 0, 0))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('outside the input plane', 1, true))
      -- the geometry must be the forward's: a dy of the wrong size for it is named
      assert.are_not.equal(0, C.nr_maxpool2d_backward(nr.randn({1, 1, 2, 2}).c, nr.zeros({1, 1, 2, 2}, {dtype = 'int64'}).c,
         nr.empty({1, 1, 4, 4}).c, 3, 3, 1, 1, 1, 1, 0))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('dy', 1, true))
      assert.are_not.equal(0, C.nr_bn2d_forward_train(nr.randn({1, 2, 1, 1}).c, nr.empty({1, 2, 1, 1}).c, nr.empty({2}).c,
         nr.empty({2}).c, nil, nil, nr.zeros({2}).c, nr.ones({2}).c, 0.1, 1e-5, 0))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('more than one value per channel', 1, true))
      assert.are_not.equal(0, C.nr_dropout_forward(x.c, nr.empty({1, 3, 5, 5}).c, nr.empty({1, 3, 5, 5}).c, 1.0))
      assert.are_not.equal(0, C.nr_softmax_xent_forward(nr.randn({2, 3}).c, nr.tensor({0, 1}).c, nr.empty({1}).c,
         nr.empty({2, 3}).c, 0, 0))
   end)
end)

describe('buffers and modes', function()
   it('allocates nothing in steady state (same shapes, repeated forward/backward)', function()
      nr.manual_seed(1)
      local net = nn.Sequential{
         nn.Conv2d(3, 8, 3, {padding = 1}), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
         nn.Conv2d(8, 8, 3, {padding = 1, groups = 8}), nn.Sigmoid(), nn.AvgPool2d(2),
         nn.Residual(nn.Sequential{nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)}),
         nn.Concat{nn.Identity(), nn.Conv2d(8, 4, 3, {padding = 1})},
         nn.Dropout(0.2), nn.GlobalAvgPool2d(), nn.Linear(12, 5),
      }
      local crit = nn.CrossEntropyLoss({label_smoothing = 0.1})
      local x = nr.randn({4, 3, 8, 8})
      local labels = nr.tensor({0, 1, 2, 4}, {dtype = 'int64'})
      local function step()
         local y = net:forward(x)
         crit:forward(y, labels)
         net:zeroGradParameters()
         net:backward(x, crit:backward(y, labels))
      end
      step()
      step()
      local before = nr.memory().cpu.allocations
      local out1 = net.modules[1].output
      for _ = 1, 3 do step() end
      assert.equal(before, nr.memory().cpu.allocations)
      assert.equal(out1, net.modules[1].output)
      -- a new batch size reallocates once, then is steady again
      x = nr.randn({2, 3, 8, 8})
      labels = nr.tensor({3, 1}, {dtype = 'int64'})
      step()
      local after = nr.memory().cpu.allocations
      step()
      assert.equal(after, nr.memory().cpu.allocations)
   end)

   it('BatchNorm2d: training uses batch statistics and updates running ones; eval uses running ones', function()
      nr.manual_seed(3)
      local bn = nn.BatchNorm2d(2, {momentum = 0.5})
      local x = nr.randn({4, 2, 3, 3}):mul(2):add(3)
      local y = bn:forward(x)
      -- per-channel output has mean ~0 and (biased) variance ~1
      for c = 1, 2 do
         local yc = y:narrow(2, c, 1):contiguous()
         assert.is_true(math.abs(yc:mean()) < 1e-5)
         local v = yc:square():mean()
         assert.is_true(close(v, 1, 1e-3), tostring(v))
         local xc = x:narrow(2, c, 1):contiguous()
         local m = xc:mean()
         local var = xc:sub(m):square():sum() / (xc:numel() - 1) -- unbiased
         assert.is_true(close(bn.running_mean:get(c), 0.5 * m, 1e-5))
         assert.is_true(close(bn.running_var:get(c), 0.5 + 0.5 * var, 1e-5))
      end
      bn:evaluate()
      local rm, rv = bn.running_mean:clone(), bn.running_var:clone()
      local ye = bn:forward(x)
      assert.equal(0, max_abs_diff(rm, bn.running_mean))
      assert.equal(0, max_abs_diff(rv, bn.running_var))
      local want = x:get(1) - rm:get(1)
      want = want / math.sqrt(rv:get(1) + 1e-5)
      assert.is_true(close(ye:get(1), want, 1e-5))
      bn:training()
      bn:forward(x)
      assert.are_not.equal(rm:get(1), bn.running_mean:get(1))
   end)

   it('BatchNorm2d batch statistics stay accurate with a large offset and planes of different means', function()
      -- mean 1000, std ~1, each sample shifted differently: the one-pass per-plane merge must match
      -- a double-precision two-pass reference
      nr.manual_seed(4)
      local x = nr.randn({6, 2, 7, 5})
      for n = 1, 6 do x:narrow(1, n, 1):add_(1000 + 3 * n) end
      local bn = nn.BatchNorm2d(2)
      bn:forward(x)
      local v = x:totable()
      for c = 1, 2 do
         local s, cnt = 0, 0
         for n = 1, 6 do for h = 1, 7 do for w = 1, 5 do s = s + v[n][c][h][w]; cnt = cnt + 1 end end end
         local mean = s / cnt
         local ss = 0
         for n = 1, 6 do for h = 1, 7 do for w = 1, 5 do ss = ss + (v[n][c][h][w] - mean) ^ 2 end end end
         local invstd = 1 / math.sqrt(ss / cnt + 1e-5)
         assert.is_true(close(bn._save_mean:get(c), mean, 1e-6), 'mean')
         assert.is_true(close(bn._save_invstd:get(c), invstd, 1e-4),
            string.format('invstd %.7g vs %.7g', bn._save_invstd:get(c), invstd))
      end
   end)

   it('BatchNorm2d on large planes far from zero: the batch mean within half an ulp, outputs as exact as fp32 allows', function()
      -- mean 100, std 1, 112 x 112 planes: a float sum per plane is off by a few ulps of the mean,
      -- and x * a + (beta - mean * a) loses what x and the mean share (either one puts outputs
      -- ~1e-5 off); PyTorch's mean is correctly rounded
      nr.manual_seed(21)
      local N, Cn, HW = 4, 2, 112 * 112
      local x = nr.randn({N, Cn, 112, 112}):add_(100)
      for _, eval in ipairs({false, true}) do
         local bn = nn.BatchNorm2d(Cn)
         if eval then -- the running statistics set to the batch's, for the evaluation formula
            local t = nn.BatchNorm2d(Cn, {momentum = 1})
            t:forward(x)
            bn.running_mean:copy(t._save_mean)
            bn.running_var:copy(t.running_var)
            bn:evaluate()
         end
         local y = bn:forward(x):contiguous()
         local px, py = x:data(), y:data()
         local worst = 0
         for c = 0, Cn - 1 do
            local s = 0
            for n = 0, N - 1 do for i = 0, HW - 1 do s = s + px[(n * Cn + c) * HW + i] end end
            local mean = s / (N * HW)
            local ss = 0
            for n = 0, N - 1 do for i = 0, HW - 1 do ss = ss + (px[(n * Cn + c) * HW + i] - mean) ^ 2 end end
            local var = ss / (N * HW)
            if eval then mean, var = bn.running_mean:get(c + 1), bn.running_var:get(c + 1) end -- what evaluation uses
            if not eval then
               local half_ulp = 2 ^ (math.floor(math.log(mean) / math.log(2)) - 24)
               local err = math.abs(bn._save_mean:get(c + 1) - mean)
               assert(err <= half_ulp, string.format('channel %d: batch mean off by %.3g ulps', c, err / (2 * half_ulp)))
            end
            local inv = 1 / math.sqrt(var + 1e-5)
            for n = 0, N - 1 do
               for i = 0, HW - 1 do
                  local k = (n * Cn + c) * HW + i
                  worst = math.max(worst, math.abs(py[k] - (px[k] - mean) * inv))
               end
            end
         end
         -- the float mean's own rounding (half an ulp of 100: 3.8e-6) and the output's
         assert(worst <= 5e-6, string.format('%s: output off by %.3g from the double reference', eval and 'eval' or 'train', worst))
      end
   end)

   it('depthwise conv (own kernels) equals per-channel dense convs (im2col): forward, input and weight gradients', function()
      -- the polyphase kernels (core/nn_depthwise.c) for every stride, padding (also beyond
      -- (k - 1) * dilation), dilation, odd/even sizes, the 3x3 one-pass kernels and the general ones
      nr.manual_seed(8)
      local worst, n = 0, 0
      for _, cfg in ipairs({{3, 1, 1, 1, 5, 7}, {5, 2, 2, 1, 9, 6}, {3, 0, 1, 1, 4, 4}, {1, 0, 1, 1, 3, 3},
                            {3, 1, 1, 1, 1, 1}, {3, 3, 3, 1, 8, 8}, {3, 3, 1, 1, 5, 5}, {3, 1, 1, 2, 9, 7},
                            {3, 1, 1, 2, 8, 8}, {3, 0, 1, 2, 8, 9}, {5, 2, 1, 2, 11, 10}, {3, 1, 2, 2, 9, 9},
                            {3, 1, 1, {2, 1}, 7, 6}, {3, 2, 1, 3, 10, 11}, {4, 1, 1, 2, 9, 8}, {2, 0, 1, 2, 6, 7}}) do
         local k, p, d, st, h, w = unpack(cfg)
         local dwc = nn.Conv2d(3, 3, k, {padding = p, dilation = d, stride = st, groups = 3})
         local x = nr.randn({2, 3, h, w})
         local y = dwc:forward(x):clone()
         local g = nr.randn(y:shape())
         dwc:zeroGradParameters()
         local gi = dwc:backward(x, g):clone()
         for c = 1, 3 do
            local one = nn.Conv2d(1, 1, k, {padding = p, dilation = d, stride = st})
            one.weight:copy(dwc.weight:narrow(1, c, 1)); one.bias:copy(dwc.bias:narrow(1, c, 1))
            one:zeroGradParameters()
            local xc = x:narrow(2, c, 1):contiguous()
            worst = math.max(worst, max_abs_diff(one:forward(xc), y:narrow(2, c, 1):contiguous()))
            worst = math.max(worst, max_abs_diff(one:backward(xc, g:narrow(2, c, 1):contiguous()), gi:narrow(2, c, 1):contiguous()))
            worst = math.max(worst, max_abs_diff(one.gradWeight, dwc.gradWeight:narrow(1, c, 1):contiguous()))
            worst = math.max(worst, max_abs_diff(one.gradBias, dwc.gradBias:narrow(1, c, 1):contiguous()))
         end
         n = n + 1
      end
      assert.are.equal(16, n)
      assert.is_true(worst < 1e-5, 'max difference ' .. worst)
   end)

   it('Winograd F(2x2, 3x3) (>= 128 channels) equals im2col: forward with bias, input gradient, paddings 0-2, odd sizes', function()
      local ffi = require 'ffi'
      pcall(ffi.cdef, 'int nr_perf_conv_set_mode(int mode);')
      nr.manual_seed(12)
      local worst, scale, n = 0, 0, 0
      for _, cfg in ipairs({{256, 256, 5, 7, 1}, {256, 320, 4, 4, 0}, {264, 256, 3, 5, 2}, {256, 256, 1, 1, 1}, {256, 256, 6, 6, 1},
                            {128, 136, 6, 5, 1}, {136, 128, 9, 10, 2}}) do
         local cin, cout, h, w, p = unpack(cfg)
         local conv = nn.Conv2d(cin, cout, 3, {padding = p})
         local x = nr.randn({3, cin, h, w})
         local old = C.nr_perf_conv_set_mode(4)        -- Winograd wherever it applies
         local okw, y, g, gi = pcall(function()
            local yw = conv:forward(x):clone()
            local gw = nr.randn(yw:shape())
            return yw, gw, conv:updateGradInput(x, gw):clone()
         end)
         C.nr_perf_conv_set_mode(2)                    -- im2col + OpenBLAS, the reference path
         local ok, err = pcall(function()
            assert(okw, y)
            worst = math.max(worst, max_abs_diff(conv:forward(x), y))
            worst = math.max(worst, max_abs_diff(conv:updateGradInput(x, g), gi))
         end)
         C.nr_perf_conv_set_mode(old)
         assert(ok, err)
         scale = math.max(scale, y:clone():abs_():max(), gi:clone():abs_():max())
         n = n + 1
      end
      assert.are.equal(7, n)
      assert.is_true(worst < 2e-5 * scale, string.format('max difference %g at output scale %g', worst, scale))
      assert.is_true(worst > 0, 'no rounding difference at all: mode 4 did not run Winograd')
   end)

   it('Dropout: scaled mask in training, identity in evaluate(), reproducible with the seed', function()
      local d = nn.Dropout(0.25)
      local x = nr.ones({100, 100})
      nr.manual_seed(9)
      local y = d:forward(x):clone()
      local kept, zeros = 0, 0
      local p = y:data()
      for i = 0, y:numel() - 1 do
         if p[i] == 0 then zeros = zeros + 1 else
            kept = kept + 1
            assert(close(p[i], 1 / 0.75, 1e-6))
         end
      end
      assert.is_true(math.abs(zeros / 1e4 - 0.25) < 0.03, tostring(zeros))
      nr.manual_seed(9)
      assert.equal(0, max_abs_diff(y, d:forward(x)))
      local g = d:backward(x, nr.ones({100, 100}))
      assert.equal(0, max_abs_diff(g, y))
      d:evaluate()
      assert.equal(x, d:forward(x))
      assert.equal(x, d:backward(x, x))
      -- p = 1 drops everything (zeros forward and back, as PyTorch); eval() is evaluate()
      local all = nn.Dropout(1)
      local x5 = nr.randn({4, 5})
      local z = all:forward(x5)
      assert.same({0, 0}, {z:abs():max(), all:backward(x5, nr.ones({4, 5})):abs():max()})
      assert.is_false(all:eval().train)
      assert.equal(x, all:forward(x))
   end)

   it('MaxPool2d: first maximum on ties, NaN propagates (as PyTorch), indices are h * W + w', function()
      local m = nn.MaxPool2d(2)
      local x = nr.tensor({{{{1, 5, 2, 2}, {5, 0, 2, 2}, {0 / 0, 1, 3, 4}, {2, 9, 4, 3}}}})
      local y = m:forward(x):totable()[1][1]
      assert.equal(5, y[1][1])
      assert.equal(2, y[1][2])
      assert.is_true(y[2][1] ~= y[2][1])
      assert.equal(4, y[2][2])
      assert.same({{{{1, 2}, {8, 11}}}}, m._indices:totable())
      local g = m:backward(x, nr.ones({1, 1, 2, 2})):totable()[1][1]
      assert.same({0, 1, 1, 0}, g[1])
      assert.same({1, 0, 0, 1}, g[3])
   end)

   it('CrossEntropyLoss returns a Lua number: log K for uniform logits', function()
      local crit = nn.CrossEntropyLoss()
      local loss = crit:forward(nr.zeros({3, 7}), nr.tensor({0, 6, 2}, {dtype = 'int64'}))
      assert.equal('number', type(loss))
      assert.is_true(close(loss, math.log(7), 1e-6))
      local g = crit:backward(nr.zeros({3, 7}), nr.tensor({0, 6, 2}, {dtype = 'int64'}))
      assert.is_true(close(g:get(1), (1 / 7 - 1) / 3, 1e-6))
      assert.is_true(close(g:get(2), (1 / 7) / 3, 1e-6))
   end)

   it('CrossEntropyLoss:loss_tensor gives the loss as a 1-element tensor; forward reads it', function()
      local crit = nn.CrossEntropyLoss()
      local x, y = nr.randn({5, 4}), nr.tensor({0, 3, 2, 1, 1}, {dtype = 'int64'})
      local lt = crit:loss_tensor(x, y)
      assert.same({1}, lt:shape())
      assert.equal(crit:forward(x, y), lt:get(1))
   end)

   it('nr_batch_metrics_add: loss sum and top-1 / top-5 hits as a stable descending sort ranks them', function()
      nr.manual_seed(11)
      local n, k = 40, 9
      local x = nr.randn({n, k})
      local function at(i, j) return (i - 1) * k + j end   -- get / set index the flat elements
      for j = 1, k do x:set(at(1, j), 1); x:set(at(2, j), 1) end -- all tied: label 0 ranks first, label 8 last
      for j = 1, 6 do x:set(at(3, j), 3) end                     -- label 5 tied with 5 classes before it
      local ids = {}
      for i = 1, n do ids[i] = (i * 5) % k end
      ids[1], ids[2], ids[3] = 0, 8, 5
      local labels = nr.tensor(ids, {dtype = 'int64'})
      -- reference: the label's position in a stable sort by descending score
      local r1, r5 = 0, 0
      for i = 1, n do
         local order = {}
         for j = 1, k do order[j] = j - 1 end
         table.sort(order, function(a, b)
            local va, vb = x:get(at(i, a + 1)), x:get(at(i, b + 1))
            if va ~= vb then return va > vb end
            return a < b
         end)
         for pos, c in ipairs(order) do
            if c == ids[i] then
               if pos == 1 then r1 = r1 + 1 end
               if pos <= 5 then r5 = r5 + 1 end
            end
         end
      end
      local acc = nr.zeros({4})
      assert.equal(0, C.nr_batch_metrics_add(x.c, labels.c, nr.tensor({0.5}).c, acc.c))
      assert.equal(0, C.nr_batch_metrics_add(x.c, labels.c, nil, acc.c))
      assert.same({n * 0.5, 2 * r1, 2 * r5, 2 * n}, {acc:get(1), acc:get(2), acc:get(3), acc:get(4)})
      assert.is_true(r1 >= 1 and r5 > r1 and r5 < n)  -- the data exercises hits and misses
      -- wrong arguments are errors, not crashes
      assert.are_not.equal(0, C.nr_batch_metrics_add(x.c, labels.c, nil, nr.zeros({3}).c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('acc', 1, true))
      assert.are_not.equal(0, C.nr_batch_metrics_add(x.c, nr.tensor({1, 2}, {dtype = 'int64'}).c, nil, acc.c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('labels', 1, true))
      assert.are_not.equal(0, C.nr_batch_metrics_add(x.c, labels.c, nr.zeros({2}).c, acc.c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('loss: expected one element', 1, true))
   end)

   it('results do not depend on the thread count (within float rounding)', function()
      nr.manual_seed(5)
      local m = nn.Conv2d(16, 32, 3, {padding = 1})
      local x = nr.randn({7, 16, 16, 16})
      local threads = nr.get_num_threads()
      local function run(t)
         nr.set_num_threads(t)
         m:zeroGradParameters()
         local y = m:forward(x):clone()
         local g = m:backward(x, y):clone()
         return y, g, m.gradWeight:clone()
      end
      local y1, g1, w1 = run(1)
      local y2, g2, w2 = run(2)
      nr.set_num_threads(threads)
      assert.is_true(max_abs_diff(y1, y2) <= 1e-5)
      assert.is_true(max_abs_diff(g1, g2) <= 1e-5)
      assert.is_true(max_abs_diff(w1, w2) <= 1e-4 * math.max(1, w1:abs():max()))
   end)

   it('batched GEMM chunks agree with one sample at a time (small maps, groups, 1x1; forward, both backwards)', function()
      -- small maps (< 64 positions) run several samples per GEMM, in chunks (the last one partial);
      -- a batch of one takes the one-sample path, so the two must agree
      -- (the first two are large enough to run the chunks on several threads)
      local cases = {
         {64, 64, 3, {padding = 1}, 4}, {32, 48, 3, {padding = 1}, 16},
         {8, 12, 3, {padding = 1}, 4}, {6, 8, 3, {padding = 1, groups = 2, stride = 2}, 7},
         {8, 16, 1, {}, 5}, {4, 6, 3, {padding = 1}, 12},
      }
      for _, c in ipairs(cases) do
         nr.manual_seed(8)
         local m = nn.Conv2d(c[1], c[2], c[3], c[4])
         local n, hw = 7, c[5]
         local x = nr.randn({n, c[1], hw, hw})
         m:zeroGradParameters()
         local y = m:forward(x):clone()
         local gy = nr.randn(y:shape())
         local gx = m:backward(x, gy):clone()
         local gw, gb = m.gradWeight:clone(), m.gradBias:clone()
         m:zeroGradParameters()
         for i = 1, n do
            local xi = x:narrow(1, i, 1):contiguous()
            local yi = m:forward(xi)
            assert.is_true(max_abs_diff(yi, y:narrow(1, i, 1)) <= 1e-5, 'forward sample ' .. i)
            local gxi = m:backward(xi, gy:narrow(1, i, 1):contiguous()) -- accumulates gradWeight
            assert.is_true(max_abs_diff(gxi, gx:narrow(1, i, 1)) <= 1e-5, 'backward data sample ' .. i)
         end
         assert.is_true(max_abs_diff(m.gradWeight, gw) <= 1e-4 * math.max(1, gw:abs():max()))
         assert.is_true(max_abs_diff(m.gradBias, gb) <= 1e-4 * math.max(1, gb:abs():max()))
      end
   end)

   it('parameter gradients accumulate across backward calls and honour Torch7 scale', function()
      nr.manual_seed(12)
      for _, m in ipairs({nn.Conv2d(3, 4, 3, {padding = 1}), nn.Conv2d(4, 4, 3, {groups = 4}), nn.BatchNorm2d(3),
                          nn.Linear(6, 2)}) do
         local x = m.in_features and nr.randn({5, 6}) or nr.randn({2, m.in_channels or 3, 5, 5})
         local y = m:forward(x)
         local gy = nr.randn(y:shape())
         m:zeroGradParameters()
         m:backward(x, gy)
         local gw, gb = m.gradWeight:clone(), m.gradBias:clone()
         m:backward(x, gy, 0.5) -- now 1.5 x
         assert.is_true(max_abs_diff(m.gradWeight, gw:mul(1.5)) <= 1e-5 * math.max(1, gw:abs():max()), tostring(m))
         assert.is_true(max_abs_diff(m.gradBias, gb:mul(1.5)) <= 1e-5 * math.max(1, gb:abs():max()), tostring(m))
      end
   end)

   it('backward\'s scale reaches every layer inside containers (Sequential, Residual, Concat, NRConv2d)', function()
      nr.manual_seed(13)
      local ca = nn.NRConv2d({in_channels = 6, out_channels = 4, kernel_size = 1, bias = true, scheme = 'CA',
                              in_groups = {{gen = 0, idx = {0, 1, 2, 3}}, {gen = 1, idx = {4, 5}}},
                              out_groups = {{gen = 0, first = 0, n = 3}, {gen = 1, first = 3, n = 1}}})
      local net = nn.Sequential{nn.Conv2d(3, 4, 3, {padding = 1}), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.Residual(nn.Sequential{nn.Conv2d(4, 4, 3, {padding = 1}), nn.BatchNorm2d(4)}),
                                nn.Concat{nn.Identity(), nn.Conv2d(4, 2, 1)}, ca,
                                nn.GlobalAvgPool2d(), nn.Linear(4, 3)}
      local x = nr.randn({2, 3, 5, 5})
      local gy = nr.randn(net:forward(x):shape())
      net:zeroGradParameters()
      local gx = net:backward(x, gy):clone()
      local params, grads = net:parameters()
      local once = {}
      for i, g in ipairs(grads) do once[i] = g:clone() end
      net:forward(x)
      local gx2 = net:backward(x, gy, 0.5)            -- parameter gradients now 1.5 x; the input's as before
      assert.are.equal(0, max_abs_diff(gx, gx2))
      assert.are.equal(#params, #once)
      for i, g in ipairs(grads) do
         assert.is_true(max_abs_diff(g, once[i]:mul(1.5)) <= 1e-5 * math.max(1, once[i]:abs():max()), 'parameter ' .. i)
      end
   end)

   it('BN eval backward with its fused ReLU masks dy before scaling (a NaN γ gives NaN, as an unfused ReLU + BN)', function()
      local x, dy, dx = nr.tensor({{{{0.5, -0.5}}}}), nr.ones({1, 1, 1, 2}), nr.zeros({1, 1, 1, 2})
      local relu_y = nr.tensor({{{{0, 0.7}}}})                      -- the first position masked
      local gamma, rm, rv = nr.tensor({0 / 0}), nr.zeros({1}), nr.ones({1})
      assert.equal(0, C.nr_bn2d_backward_eval(x.c, dy.c, dx.c, nil, nil, gamma.c, rm.c, rv.c, 1e-5, 1, 0, relu_y.c))
      for _, v in ipairs(dx:reshape(2):totable()) do assert.is_true(v ~= v, 'dx ' .. tostring(v)) end
      gamma:fill(-2)                                                 -- a negative γ: the masked position is -0
      assert.equal(0, C.nr_bn2d_backward_eval(x.c, dy.c, dx.c, nil, nil, gamma.c, rm.c, rv.c, 1e-5, 1, 0, relu_y.c))
      assert.equal(-math.huge, 1 / dx:reshape(2):get(1))
   end)

   it('BN batch statistics of an input holding inf: the mean is inf wherever the inf sits (as PyTorch)', function()
      for _, pos in ipairs({1, 16}) do                             -- the first sample, the last sample
         local bn = nn.BatchNorm2d(1)
         local x = nr.ones({4, 1, 2, 2})
         x:set(pos, math.huge)
         bn:forward(x)
         assert.equal(math.huge, bn.running_mean:get(1), 'inf at ' .. pos)
      end
      -- one value per plane (BatchNorm1d on (N, C): the channel-block path), the inf in the first
      -- row (the shift origin) or the last
      for _, pos in ipairs({1, 5, 7}) do
         local bn = nn.BatchNorm1d(2)
         local x = nr.ones({4, 2})
         x:set(pos, math.huge)
         bn:forward(x)
         assert.equal(math.huge, bn.running_mean:get(pos % 2 == 1 and 1 or 2), 'BatchNorm1d, inf at ' .. pos)
      end
   end)

   it('BN batch statistics of finite values near FLT_MAX apart: exact (summed again in double), not NaN', function()
      -- the float shift x - k overflows; PyTorch gives NaN or 0 here, the exact answer is below
      local s3, s2 = math.sqrt(3), math.sqrt(2)
      local cases = {
         {nn.BatchNorm1d(1), nr.tensor({{{3e38, 0}}, {{0, 0}}}), {s3, -1 / s3, -1 / s3, -1 / s3}},  -- plane loops
         {nn.BatchNorm2d(1), nr.tensor({{{{3e38, 0}}}, {{{0, 0}}}}), {s3, -1 / s3, -1 / s3, -1 / s3}},
         {nn.BatchNorm1d(1), nr.tensor({{3e38}, {0}, {0}, {0}}), {s3, -1 / s3, -1 / s3, -1 / s3}},  -- channel blocks
         {nn.BatchNorm1d(1), nr.tensor({{3e38}, {-3e38}, {0}, {0}}), {s2, -s2, 0, 0}},
      }
      for i, c in ipairs(cases) do
         local y = c[1]:forward(c[2]):contiguous():reshape({4}):totable()
         for j = 1, 4 do
            assert(math.abs(y[j] - c[3][j]) <= 1e-6 * s3, string.format('case %d, value %d: %s, not %s', i, j, y[j], c[3][j]))
         end
         assert.equal(math.huge, c[1].running_var:get(1)) -- the unbiased variance overflows float, as PyTorch's
      end
   end)

   it('clone() copies parameters and gives the same output', function()
      nr.manual_seed(6)
      local net = nn.Sequential{nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()}
      local x = nr.randn({2, 3, 6, 6})
      net:evaluate()
      local y = net:forward(x):clone()
      local c = net:clone()
      assert.equal(0, max_abs_diff(y, c:forward(x)))
      assert.is_false(c.modules[1].weight:same_storage(net.modules[1].weight))
   end)
end)

describe('a module applied to its own output, and empty batches', function()
   it('m:forward(m:forward(x)) equals applying it to a copy (the buffer is not read while written)', function()
      nr.manual_seed(2)
      local mods = {
         {'Conv2d 1x1', nn.Conv2d(4, 4, 1)}, {'Conv2d 3x3', nn.Conv2d(4, 4, 3, {padding = 1})},
         {'depthwise', nn.Conv2d(4, 4, 3, {padding = 1, groups = 4})},
         {'MaxPool2d', nn.MaxPool2d(3, {stride = 1, padding = 1})}, {'AvgPool2d', nn.AvgPool2d(3, {stride = 1, padding = 1})},
         {'BatchNorm2d', nn.BatchNorm2d(4)}, {'ReLU', nn.ReLU()}, {'Sigmoid', nn.Sigmoid()}, {'Linear', nn.Linear(4, 4)},
         {'Softmax', nn.Softmax()}, {'LogSoftmax', nn.LogSoftmax()}, {'Tanh', nn.Tanh()}, {'ReLU6', nn.ReLU6()},
         {'LeakyReLU', nn.LeakyReLU(0.2)}, {'ELU', nn.ELU()}, {'SiLU', nn.SiLU()}, {'GELU', nn.GELU()},
         {'Hardswish', nn.Hardswish()}, {'Hardsigmoid', nn.Hardsigmoid()}, {'AdaptiveMaxPool2d', nn.AdaptiveMaxPool2d(6)},
         {'AdaptiveAvgPool2d', nn.AdaptiveAvgPool2d(6)},
      }
      for _, c in ipairs(mods) do
         local name, m = c[1], c[2]
         local x = (name == 'Linear' or name:match('Softmax')) and nr.randn({3, 4}) or nr.randn({2, 4, 6, 6})
         for round = 1, 3 do -- the buffers alternate from the second round on
            local want = m:forward(m:forward(x):clone()):clone()
            local got = m:forward(m:forward(x))
            assert(max_abs_diff(got, want) == 0, string.format('%s round %d: differs by %g', name, round, max_abs_diff(got, want)))
         end
      end
      -- the kernels refuse an output overlapping their input instead of computing garbage
      local x, w = nr.randn({1, 4, 6, 6}), nr.randn({4, 4, 1, 1})
      assert.equal(1, C.nr_conv2d_forward(x.c, x.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('y f32 cpu (1, 4, 6, 6) overlaps x', 1, true))
      assert.equal(1, C.nr_avgpool2d_forward(x.c, x.c, 3, 3, 1, 1, 1, 1, 1, 0))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('overlaps x', 1, true))
      assert.equal(1, C.nr_conv2d_backward_data(x.c, x.c, w.c, 1, 1, 0, 0, 1, 1, 1))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('dx f32 cpu (1, 4, 6, 6) overlaps dy', 1, true))
   end)

   it('an empty batch (N = 0) passes through every layer in training, as PyTorch: no change to running statistics', function()
      local net = nn.Sequential{nn.Conv2d(3, 4, 3, {padding = 1}), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
         nn.Flatten(), nn.Linear(16, 3)}
      local x = nr.randn({0, 3, 4, 4})
      local y = net:forward(x)
      assert.same({0, 3}, y:shape())
      local _, grads = net:parameters()
      for _, g in ipairs(grads) do g:fill(7) end
      net:backward(x, nr.zeros({0, 3}))
      for i, g in ipairs(grads) do assert.equal(7 * g:numel(), g:sum(), 'gradient ' .. i .. ' changed') end
      local bn = net:get(2)
      assert.same({0, 0, 0, 0}, bn.running_mean:totable())
      assert.same({1, 1, 1, 1}, bn.running_var:totable())
      -- acc = 0 overwrites the parameter gradients with zeros, as for any batch
      local dg, db = nr.full({4}, 0 / 0), nr.full({4}, 5)
      local sm, si = nr.empty({4}), nr.empty({4})
      local z = nr.empty({0, 4, 2, 2})
      assert.equal(0, C.nr_bn2d_forward_train(z.c, z.c, sm.c, si.c, bn.weight.c, bn.bias.c, bn.running_mean.c,
         bn.running_var.c, 0.1, 1e-5, 0))
      assert.equal(0, C.nr_bn2d_backward(z.c, z.c, z.c, dg.c, db.c, bn.weight.c, sm.c, si.c, 1, 0, nil))
      assert.same({0, 0, 0, 0}, dg:totable())
      assert.same({0, 0, 0, 0}, db:totable())
      -- one value per channel still cannot be normalised
      assert.truthy(err_of(function() return nn.BatchNorm2d(2):forward(nr.randn({1, 2, 1, 1})) end)
         :find('more than one value per channel', 1, true))
   end)

   it('Dropout takes p only', function()
      assert.truthy(err_of(function() return nn.Dropout(0.5, {inplace = true}) end):find('Dropout: takes p only', 1, true))
   end)
end)

describe('a small model through Sequential', function()
   it('learns a fixed batch (loss decreases with plain SGD on the gradients)', function()
      nr.manual_seed(1)
      local net = nn.Sequential{
         nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, {padding = 1, stride = 2}), nn.ReLU(),
         nn.GlobalAvgPool2d(), nn.Linear(16, 4),
      }
      local crit = nn.CrossEntropyLoss()
      local x = nr.randn({8, 3, 8, 8})
      local labels = nr.tensor({0, 1, 2, 3, 0, 1, 2, 3}, {dtype = 'int64'})
      local params, grads = net:parameters()
      assert.equal(7, #params)
      local first, last
      for step = 1, 30 do
         local y = net:forward(x)
         local loss = crit:forward(y, labels)
         if step == 1 then first = loss end
         last = loss
         net:zeroGradParameters()
         net:backward(x, crit:backward(y, labels))
         for i = 1, #params do params[i]:axpy_(-0.2, grads[i]) end
      end
      assert.is_true(last < 0.5 * first, string.format('loss %g -> %g', first, last))
   end)
end)

describe('ReLU{inplace = true}', function()
   it('overwrites its input, returns it, and gives the same gradients as ReLU()', function()
      nr.manual_seed(11)
      local x = nr.randn({2, 3, 4, 4})
      local g = nr.randn({2, 3, 4, 4})
      local plain = nr.nn.ReLU()
      local y_ref = plain:forward(x):clone()
      local gi_ref = plain:backward(x, g):clone()
      local inplace = nr.nn.ReLU{inplace = true}
      local x2 = x:clone()
      local y = inplace:forward(x2)
      assert.is_true(y:same_storage(x2))
      assert.same(y_ref:totable(), x2:totable())
      local gi = inplace:backward(x2, g)
      assert.same(gi_ref:totable(), gi:totable())
      assert.is_false(gi:same_storage(g))
      assert.has_error(function() nr.nn.ReLU{inplce = true} end)
   end)

   it('overwrites a strided input too (a transposed view): computed on a copy and written back', function()
      local t = nr.tensor({{-1, 2}, {3, -4}})
      local relu = nr.nn.ReLU{inplace = true}
      local y = relu:forward(t:t())
      assert.same({{0, 2}, {3, 0}}, t:totable())
      assert.is_true(y:same_storage(t))
      assert.same({{0, 3}, {2, 0}}, y:totable())
      -- the gradient is masked where the (transposed) output is 0
      assert.same({{0, 1}, {1, 0}}, relu:backward(t:t(), nr.ones({2, 2})):totable())
   end)

   it('trains a conv-BN-ReLU stack to the same weights as out-of-place ReLU', function()
      local function run(inplace)
         nr.manual_seed(5)
         local net = nr.nn.Sequential{nr.nn.Conv2d(3, 4, 3, {padding = 1, bias = false}), nr.nn.BatchNorm2d(4),
            inplace and nr.nn.ReLU{inplace = true} or nr.nn.ReLU(), nr.nn.GlobalAvgPool2d(), nr.nn.Linear(4, 3)}
         local crit = nr.nn.CrossEntropyLoss()
         local x, y = nr.randn({4, 3, 6, 6}), nr.tensor({0, 1, 2, 1}, {dtype = 'int64'})
         for _ = 1, 3 do
            local out = net:forward(x)
            crit:forward(out, y)
            net:zeroGradParameters()
            net:backward(x, crit:backward(out, y))
            local p, gr = net:parameters()
            for i = 1, #p do p[i]:axpy_(-0.1, gr[i]) end
         end
         return net.modules[1].weight:totable()
      end
      -- in-place ReLU after BN runs fused into the BN (one pass): equal up to float rounding of the
      -- per-channel sums
      local a, b = run(false), run(true)
      local worst = 0
      for o = 1, #a do for i = 1, #a[o] do for h = 1, #a[o][i] do for w = 1, #a[o][i][h] do
         worst = math.max(worst, math.abs(a[o][i][h][w] - b[o][i][h][w]))
      end end end end
      assert.is_true(worst < 1e-6, 'max weight difference ' .. worst)
   end)

   for _, mode in ipairs({'training', 'evaluate'}) do
      it('BatchNorm2d + in-place ReLU fused in a Sequential equals the two run separately (' .. mode .. ')', function()
         local function run(fuse)
            nr.manual_seed(9)
            local net = nr.nn.Sequential{nr.nn.BatchNorm2d(3), nr.nn.ReLU{inplace = true}, nr.nn.Conv2d(3, 2, 1)}
            net.noFusion = not fuse
            net[mode](net)
            net.modules[1].running_mean:copy(nr.randn({3}))
            local x = nr.randn({4, 3, 5, 5})
            local out = net:forward(x):clone()
            net:zeroGradParameters()
            local gi = net:backward(x, nr.randn(out:shape())):clone()
            assert.are.equal(fuse, net.modules[1]._relu_fused)
            assert.are.equal(fuse, net.modules[2]._fused)
            return out, gi, net.modules[1].gradWeight:clone(), net.modules[1].gradBias:clone()
         end
         local o1, g1, w1, b1 = run(false)
         local o2, g2, w2, b2 = run(true)
         assert.are.equal(0, o1:clone():sub_(o2):abs_():max())
         assert.is_true(g1:clone():sub_(g2):abs_():max() < 1e-6)
         assert.is_true(w1:clone():sub_(w2):abs_():max() < 1e-5)
         assert.is_true(b1:clone():sub_(b2):abs_():max() < 1e-5)
         -- the masked gradient really is masked: inputs whose BN output is negative get no gradient
         -- through the ReLU (dx of BN is not zero there, but dbeta sums only unmasked dy)
         assert.is_true(b2:abs():sum() > 0)
      end)
   end
end)

describe('channels-last inputs on the CPU', function()
   it('layers read a channels-last batch through one conversion: same outputs and gradients as NCHW', function()
      nr.manual_seed(12)
      local net = require('tests.lua.nr_zoo').layout_net()
      local cl = net:clone()
      local x = nr.randn({4, 3, 8, 8})
      local xc = x:contiguous('channels_last')
      local y, ycl = net:forward(x), cl:forward(xc)
      assert.equal(0, max_abs_diff(ycl, y))
      local g = nr.randn(y:shape())
      net:zeroGradParameters(); cl:zeroGradParameters()
      local gx, gxc = net:backward(x, g), cl:backward(xc, g)
      assert.equal(0, max_abs_diff(gxc, gx))
      local _, ga = net:parameters()
      local _, gb = cl:parameters()
      for i = 1, #ga do assert.equal(0, max_abs_diff(gb[i], ga[i])) end
   end)

   it('the C kernels refuse a channels-last CPU activation with a message that says what to do', function()
      local x = nr.randn({2, 3, 4, 5}):contiguous('channels_last')
      local y = nr.zeros({2, 3, 4, 5})
      assert.is_true(C.nr_relu_forward(x.c, y.c) ~= 0)
      local msg = nrffi.ffi.string(C.nr_last_error())
      assert.truthy(msg:find('channels%-last activations compute on CUDA only'), msg)
      assert.truthy(msg:find(':contiguous%(%)'), msg)
   end)
end)

-- (the GPU's NaN rule is checked in tests/lua/cuda_spec.lua, which also runs on the CUDA emulator)
describe('NaN propagates through ReLU (as PyTorch), so a diverging run reaches the loss check', function()
   local nan = 0 / 0
   local nan_positions = require('tests.lua.spec_util').nan_positions

   it('ReLU and ReLU{inplace = true}: NaN in, NaN out; the backward passes no gradient there (mask y > 0)', function()
      local x = nr.tensor({nan, 1, -1, 0, nan, 2}):reshape(1, 1, 2, 3)
      for _, m in ipairs({nn.ReLU(), nn.ReLU{inplace = true}}) do
         local y = m:forward(x:clone())
         assert.same({1, 5}, nan_positions(y))
         local f = y:reshape(-1):totable()
         assert.same({1, 0, 0, 2}, {f[2], f[3], f[4], f[6]})
         local g = m:backward(x, nr.ones({1, 1, 2, 3})):reshape(-1):totable()
         assert.same({0, 1, 0, 0, 0, 1}, g)
      end
      -- NaN never turns into 0 on a large (vectorised, multi-threaded) input either
      local big = nr.randn({4, 8, 64, 64})
      big:set(1, nan); big:set(777, nan); big:set(big:numel(), nan)
      assert.same({1, 777, big:numel()}, nan_positions(nn.ReLU():forward(big)))
   end)

   it('depthwise conv: an inf or NaN reaches only the outputs, taps and positions of its real pairs (as PyTorch)', function()
      -- the polyphase kernels multiply padding and dropped-column zeros, and 0 * inf is NaN:
      -- compared with a direct loop over the real (output, tap) pairs, NaN positions and values
      local function ref(x, w, dy, st, pd)
         local N, Cn, H, W = unpack(x:shape())
         local K = w:size(3)
         local Ho, Wo = math.floor((H + 2 * pd - K) / st) + 1, math.floor((W + 2 * pd - K) / st) + 1
         local y, gx, gw = nr.zeros({N, Cn, Ho, Wo}), nr.zeros({N, Cn, H, W}), nr.zeros({Cn, 1, K, K})
         local px, pw, pdy = x:data(), w:data(), dy:data()
         local py, pgx, pgw = y:data(), gx:data(), gw:data()
         for n = 0, N - 1 do for c = 0, Cn - 1 do for oh = 0, Ho - 1 do for ow = 0, Wo - 1 do
            local o = ((n * Cn + c) * Ho + oh) * Wo + ow
            for i = 0, K - 1 do for j = 0, K - 1 do
               local ih, iw = oh * st - pd + i, ow * st - pd + j
               if ih >= 0 and ih < H and iw >= 0 and iw < W then
                  local xi, wi = ((n * Cn + c) * H + ih) * W + iw, (c * K + i) * K + j
                  py[o] = py[o] + pw[wi] * px[xi]
                  pgx[xi] = pgx[xi] + pw[wi] * pdy[o]
                  pgw[wi] = pgw[wi] + pdy[o] * px[xi]
               end
            end end
         end end end end
         return y, gx, gw
      end
      local function same(what, got, want)
         assert.same(nan_positions(want), nan_positions(got), what .. ': NaN positions')
         local pg, pw = got:contiguous():data(), want:contiguous():data()
         for i = 0, want:numel() - 1 do
            local a, b = pg[i], pw[i]
            assert(a ~= a or a == b or math.abs(a - b) <= 1e-5 * math.max(1, math.abs(b)),
               string.format('%s [%d]: %g vs %g', what, i, a, b))
         end
      end
      for _, geo in ipairs({{3, 1, 1}, {3, 2, 1}, {2, 1, 0}, {3, 1, 2}}) do
         local K, st, pd = unpack(geo)
         for _, where in ipairs({'x', 'w', 'dy'}) do
            for _, bad in ipairs({1 / 0, nan}) do
               nr.manual_seed(5)
               local conv = nn.Conv2d(3, 3, K, {groups = 3, stride = st, padding = pd, bias = false})
               local x = nr.randn({2, 3, 6, 8})
               local ys = conv:outputShape({3, 6, 8})
               local dy = nr.randn({2, ys[1], ys[2], ys[3]})
               local t = ({x = x, w = conv.weight, dy = dy})[where]
               t:set(1, bad) -- the first and last elements (corners) and one inside
               t:set(t:numel(), bad)
               t:set(math.floor(t:numel() / 2) + 1, bad)
               local y = conv:forward(x)
               conv:zeroGradParameters()
               local gx = conv:backward(x, dy)
               local ry, rgx, rgw = ref(x, conv.weight, dy, st, pd)
               local what = string.format('k%d s%d p%d, %s in %s', K, st, pd, tostring(bad), where)
               same(what .. ' y', y, ry)
               same(what .. ' gx', gx, rgx)
               same(what .. ' gw', conv.gradWeight, rgw)
            end
         end
      end
   end)

   for _, mode in ipairs({'training', 'evaluate'}) do
      it('BatchNorm2d + in-place ReLU, fused and separate, keep the NaN (' .. mode .. ')', function()
         nr.manual_seed(3)
         local x = nr.randn({2, 3, 4, 4})
         x:set(1 * 16 + 5, nan)                                     -- sample 1, channel 2
         local outs = {}
         for _, fuse in ipairs({true, false}) do
            local net = nn.Sequential{nn.BatchNorm2d(3), nn.ReLU{inplace = true}}
            net.noFusion = not fuse
            net[mode](net)
            local y = net:forward(x:clone())
            assert.are.equal(fuse, net.modules[1]._relu_fused == true)
            outs[#outs + 1] = nan_positions(y)
         end
         assert.same(outs[1], outs[2])
         if mode == 'training' then
            assert.equal(32, #outs[1])                               -- channel 2's batch mean is NaN: all of it
            assert.equal(17, outs[1][1])
         else
            assert.same({21}, outs[1])                               -- only the NaN element
         end
      end)
   end

   it('a Conv2d + BatchNorm2d + ReLU folded under nr.no_grad keeps the NaN (every conv path)', function()
      local cases = {
         {'im2col', function() return nn.Conv2d(3, 4, 3, {padding = 1}) end, {3, 6, 6}},
         {'1x1', function() return nn.Conv2d(3, 4, 1) end, {3, 6, 6}},
         {'depthwise', function() return nn.Conv2d(4, 4, 3, {padding = 1, groups = 4}) end, {4, 6, 6}},
         {'3x3 dense (oneDNN or Winograd)', function() return nn.Conv2d(128, 128, 3, {padding = 1, bias = false}) end, {128, 6, 6}},
      }
      for _, c in ipairs(cases) do
         nr.manual_seed(4)
         local conv = c[2]()
         local bn = nn.BatchNorm2d(conv.out_channels)
         local net = nn.Sequential{conv, bn, nn.ReLU{inplace = true}}
         net:evaluate()
         local x = nr.randn({2, unpack(c[3])})
         x:set(3, nan)
         local plain = nan_positions(net:forward(x))
         local folded = nr.no_grad(function() return nan_positions(net:forward(x)) end)
         assert.is_true(bn.output:same_storage(conv.output), c[1] .. ': the fold did not happen')
         assert.is_true(#plain > 0, c[1] .. ': no NaN in the unfolded output')
         assert.same(plain, folded, c[1])
      end
   end)
end)

describe('Softmax and LogSoftmax', function()
   it('rows sum to 1, large logits stay finite, a NaN or all -inf row gives NaN in that row only (as PyTorch)', function()
      local inf = math.huge
      local x = nr.tensor({{1, 2, 3}, {-1000, 0, 1000}, {0 / 0, 1, 2}, {-inf, -inf, -inf}, {-inf, 0, 0}})
      local p = nn.Softmax():forward(x):clone()
      local lp = nn.LogSoftmax():forward(x):clone()
      local function row(t, i) return t:narrow(1, i, 1):contiguous():totable()[1] end
      local r1 = row(p, 1)
      assert.is_true(math.abs(r1[1] + r1[2] + r1[3] - 1) < 1e-6)
      assert.is_true(math.abs(r1[3] - math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3))) < 1e-6)
      assert.same({0, 0, 1}, row(p, 2))
      assert.same({-2000, -1000, 0}, row(lp, 2))
      for _, t in ipairs({p, lp}) do
         for _, i in ipairs({3, 4}) do
            for _, v in ipairs(row(t, i)) do assert.is_true(v ~= v, 'row ' .. i .. ' should be NaN') end
         end
      end
      assert.same({0, 0.5, 0.5}, row(p, 5))
      local l5 = row(lp, 5)
      assert.is_true(l5[1] == -inf and math.abs(l5[2] - math.log(0.5)) < 1e-7)
   end)

   it('an empty last dimension (K = 0) or batch runs forward and backward (empty tensors are contiguous)', function()
      assert.is_true(nr.empty({0}):reshape({3, 0}):is_contiguous())
      for _, name in ipairs({'Softmax', 'LogSoftmax', 'ReLU'}) do
         for _, shape in ipairs({{3, 0}, {0, 4}}) do
            local m = nn[name]()
            local x = nr.randn(shape)
            assert.same(shape, m:forward(x):shape())
            assert.same(shape, m:backward(x, nr.randn(shape)):shape())
         end
      end
   end)

   it('checks its input and its dim, and names the problem', function()
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(msg(function() nn.Softmax({dim = 1}):forward(nr.randn({2, 3})) end)
         :find('dim 1 is not the last dimension of the 2-d input [2 x 3]', 1, true))
      assert.truthy(msg(function() nn.Softmax({dim = 0}) end):find('dim must be -1 or a dimension >= 1', 1, true))
      assert.truthy(msg(function() nn.LogSoftmax({axis = 1}) end):find('unknown option "axis"', 1, true))
      assert.truthy(msg(function() nn.Softmax():forward(nr.tensor({1, 2}, {dtype = 'int64'})) end):find('float32', 1, true))
      assert.truthy(msg(function() nn.Softmax():backward(nr.randn({2, 3}), nr.randn({2, 3})) end):find('before forward', 1, true))
      local m = nn.Softmax()
      m:forward(nr.randn({2, 3}))
      assert.truthy(msg(function() m:backward(nr.randn({2, 3}), nr.randn({3, 2})) end):find('does not match', 1, true))
   end)

   it('in a model Neural Rejuvenation resizes: after the classifier, or across channels (those keep their width)', function()
      -- after the Linear the conv's dead channel goes; a softmax over the pooled channels reads every
      -- channel (a dead one still adds to its normalizer), so that conv keeps all of them
      for _, case in ipairs({{'after Linear', 5}, {'over channels', 6}, {'over the width', 5}}) do
         nr.manual_seed(3)
         local sm = case[1] == 'after Linear' and {nn.GlobalAvgPool2d(), nn.Linear(6, 4), nn.Softmax()}
            or case[1] == 'over channels' and {nn.GlobalAvgPool2d(), nn.LogSoftmax(), nn.Linear(6, 4)}
            or {nn.LogSoftmax(), nn.GlobalAvgPool2d(), nn.Linear(6, 4)}
         local m = nn.Sequential{nn.Conv2d(3, 6, 3, {padding = 1, bias = false}), nn.BatchNorm2d(6), nn.ReLU(), unpack(sm)}
         m.modules[2].weight:set(2, 0)
         m:evaluate()
         local x = nr.randn({2, 3, 5, 5})
         local y0 = m:forward(x):clone()
         nr.rejuvenate(m, {input_shape = {3, 5, 5}, budget = 0})
         assert.equal(case[2], m.modules[1].out_channels, case[1])
         -- (over the width the dead channel's zeros become log(1/W), a constant the classifier
         -- read: removing it changes the output, as a dead channel through a Sigmoid does)
         if case[1] ~= 'over the width' then assert.is_true(m:forward(x):sub(y0):abs():max() < 1e-5, case[1]) end
      end
   end)
end)

describe('Tanh, ReLU6, LeakyReLU and the smooth and hard activations', function()
   it('values at the ends and for NaN, and their gradients (as PyTorch, NaN as ReLU)', function()
      local x = nr.tensor({-3, 0, 2, 6, 9, 0 / 0})
      local function run(m)
         local y = m:forward(x):clone()
         return y:totable(), m:backward(x, nr.ones({6})):totable()
      end
      local y, g = run(nn.ReLU6())
      assert.same({0, 0, 2, 6, 6}, {y[1], y[2], y[3], y[4], y[5]}); assert.is_true(y[6] ~= y[6])
      assert.same({0, 0, 1, 0, 0, 0}, g)
      y, g = run(nn.LeakyReLU(0.1))
      assert.is_true(math.abs(y[1] + 0.3) < 1e-7 and y[3] == 2 and y[6] ~= y[6])
      assert.is_true(math.abs(g[1] - 0.1) < 1e-7 and math.abs(g[2] - 0.1) < 1e-7 and g[3] == 1)
      y, g = run(nn.Tanh())
      assert.is_true(math.abs(y[1] - math.tanh(-3)) < 1e-6 and y[2] == 0 and y[6] ~= y[6])
      assert.is_true(math.abs(g[1] - (1 - math.tanh(-3) ^ 2)) < 1e-6 and g[2] == 1)
   end)

   it('checks its arguments', function()
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(msg(function() nn.LeakyReLU(0 / 0) end):find('negative_slope must be a finite number', 1, true))
      assert.truthy(msg(function() nn.LeakyReLU({slope = 0.1}) end):find('unknown option "slope"', 1, true))
      assert.truthy(msg(function() nn.Tanh({inplace = true}) end):find('nr.nn.Tanh: takes no arguments', 1, true))
      assert.truthy(msg(function() nn.ELU(1 / 0) end):find('nr.nn.ELU: alpha must be a finite number, got inf', 1, true))
      assert.truthy(msg(function() nn.GELU({approximate = 'erf'}) end)
         :find("nr.nn.GELU: approximate must be 'none' or 'tanh', got \"erf\"", 1, true))
      assert.truthy(msg(function() nn.GELU({aproximate = 'tanh'}) end):find('did you mean "approximate"', 1, true))
      assert.truthy(msg(function() nn.SiLU(true) end):find('nr.nn.SiLU: takes no arguments, got true', 1, true))
      assert.equal('approximate=tanh', nn.GELU('tanh'):extra())
      local t = nr.zeros({2})
      for _, k in ipairs({0, 10, 99}) do
         assert.equal(1, C.nr_activation_forward(t.c, t.c, k, 0))
         assert.truthy(require('nr.ffi').ffi.string(C.nr_last_error()):find('kind must be one of NR_ACT_* (1..9), got ' .. k, 1, true))
      end
      assert.equal(1, C.nr_activation_backward(t.c, t.c, t.c, C.NR_ACT_ELU, 0 / 0))
      assert.truthy(require('nr.ffi').ffi.string(C.nr_last_error()):find('nr_activation_backward: alpha must be finite', 1, true))
   end)

   it('ELU, SiLU, GELU, Hardswish, Hardsigmoid: values and gradients from their formulas, kinks as PyTorch, NaN kept', function()
      local xs = {-4, -3, -1, 0, 0.5, 3, 5, 0 / 0}
      local x = nr.tensor(xs)
      local function erf(v)   -- Abramowitz-Stegun 7.1.26 is too coarse: a series, |v| <= 5 here
         local sum, term, k = v, v, 0
         repeat
            k = k + 1
            term = -term * v * v / k
            local add = term / (2 * k + 1)
            sum = sum + add
         until math.abs(add) < 1e-17
         return 2 / math.sqrt(math.pi) * sum
      end
      local sg = function(v) return 1 / (1 + math.exp(-v)) end
      local c = math.sqrt(2 / math.pi)
      -- the last element: the gradient of a NaN input, dy = 2 (PyTorch's backward rules: NaN for the
      -- smooth ones, dy where the rule's test on x is false)
      local nan = 0 / 0
      local cases = {
         {nn.ELU(0.5), function(v) return v > 0 and v or 0.5 * (math.exp(v) - 1) end,
            function(v) return v > 0 and 1 or 0.5 * math.exp(v) end, 2},
         {nn.SiLU(), function(v) return v * sg(v) end, function(v) return sg(v) * (1 + v * (1 - sg(v))) end, nan},
         {nn.GELU(), function(v) return 0.5 * v * (1 + erf(v / math.sqrt(2))) end,
            function(v) return 0.5 * (1 + erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi) end, nan},
         {nn.GELU('tanh'), function(v) return 0.5 * v * (1 + math.tanh(c * (v + 0.044715 * v ^ 3))) end,
            function(v)
               local t = math.tanh(c * (v + 0.044715 * v ^ 3))
               return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v)
            end, nan},
         -- at -3 and 3 the left derivative (PyTorch's): Hardswish -0.5 and 1.5, Hardsigmoid 0 and 0
         {nn.Hardswish(), function(v) return v * math.min(math.max(v + 3, 0), 6) / 6 end,
            function(v) return v < -3 and 0 or (v <= 3 and v / 3 + 0.5 or 1) end, 2},
         {nn.Hardsigmoid(), function(v) return math.min(math.max(v + 3, 0), 6) / 6 end,
            function(v) return (v > -3 and v < 3) and 1 / 6 or 0 end, 0},
      }
      for _, case in ipairs(cases) do
         local m, f, df, dnan = case[1], case[2], case[3], case[4]
         local y = m:forward(x):totable()
         local g = m:backward(x, nr.tensor({1, 1, 1, 1, 1, 1, 1, 2})):totable()
         for i = 1, #xs - 1 do
            local v = xs[i]
            assert(math.abs(y[i] - f(v)) <= 2e-6 * (1 + math.abs(f(v))), string.format('%s(%g) = %.9g, want %.9g', tostring(m), v, y[i], f(v)))
            assert(math.abs(g[i] - df(v)) <= 2e-6 * (1 + math.abs(df(v))), string.format('%s\'(%g) = %.9g, want %.9g', tostring(m), v, g[i], df(v)))
         end
         assert(y[#xs] ~= y[#xs], tostring(m) .. ': a NaN input gives NaN')
         if m:typename() == 'Hardswish' then   -- computed as written, as PyTorch: -inf * 0 and 3e38 * 6
            local ends = m:forward(nr.tensor({-1 / 0, 3e38})):totable()
            assert(ends[1] ~= ends[1] and ends[2] == 1 / 0, 'Hardswish(-inf), Hardswish(3e38)')
         end
         local gn = g[#xs]
         assert(gn == dnan or (gn ~= gn and dnan ~= dnan), string.format('%s: gradient at a NaN input %g, want %g', tostring(m), gn, dnan))
      end
   end)
end)

describe('AdaptiveAvgPool2d and AdaptiveMaxPool2d', function()
   -- PyTorch's windows, written out: output row o of n_out pools input rows
   -- floor(o*n/n_out) .. ceil((o+1)*n/n_out) - 1 (0-based), likewise columns
   local function window(o, n, no) return math.floor(o * n / no), math.ceil((o + 1) * n / no) - 1 end
   local function reference(x, oh, ow)
      local n, c, h, w = unpack(x:shape())
      local xt = x:totable()
      local avg, max, arg = {}, {}, {}
      for i = 1, n do
         avg[i], max[i], arg[i] = {}, {}, {}
         for j = 1, c do
            avg[i][j], max[i][j], arg[i][j] = {}, {}, {}
            for a = 0, oh - 1 do
               avg[i][j][a + 1], max[i][j][a + 1], arg[i][j][a + 1] = {}, {}, {}
               local r0, r1 = window(a, h, oh)
               for b = 0, ow - 1 do
                  local c0, c1 = window(b, w, ow)
                  local s, best, at = 0, -math.huge, nil
                  for r = r0, r1 do
                     for q = c0, c1 do
                        local v = xt[i][j][r + 1][q + 1]
                        s = s + v
                        if v > best then best, at = v, r * w + q end
                     end
                  end
                  avg[i][j][a + 1][b + 1] = s / ((r1 - r0 + 1) * (c1 - c0 + 1))
                  max[i][j][a + 1][b + 1], arg[i][j][a + 1][b + 1] = best, at
               end
            end
         end
      end
      return nr.tensor(avg), nr.tensor(max), arg
   end

   it('pool over PyTorch\'s windows (overlapping, uneven, and more outputs than inputs)', function()
      nr.manual_seed(7)
      local x = nr.randn({2, 3, 7, 5})
      for _, size in ipairs({{3, 2}, {4, 4}, {1, 1}, {7, 5}, {9, 6}, {2, 5}}) do
         local tag = size[1] .. 'x' .. size[2]
         local avg, max, arg = reference(x, size[1], size[2])
         local ma, mm = nn.AdaptiveAvgPool2d(size), nn.AdaptiveMaxPool2d(size)
         assert(max_abs_diff(ma:forward(x), avg) < 1e-6, tag .. ' average: ' .. max_abs_diff(ma:forward(x), avg))
         assert(max_abs_diff(mm:forward(x), max) == 0, tag .. ' max')
         assert.same(arg, mm._indices:totable(), tag .. ' indices')
      end
      -- (7, 5) -> (7, 5) is the identity; an even split is the windowed pool; (1, 1) the global one
      assert.equal(0, max_abs_diff(nn.AdaptiveMaxPool2d({7, 5}):forward(x), x))
      local x8 = nr.randn({2, 3, 8, 6})
      assert(max_abs_diff(nn.AdaptiveAvgPool2d({4, 3}):forward(x8), nn.AvgPool2d(2):forward(x8)) < 1e-6)
      assert.equal(0, max_abs_diff(nn.AdaptiveMaxPool2d({4, 2}):forward(x8), nn.MaxPool2d({2, 3}):forward(x8)))
      assert(max_abs_diff(nn.AdaptiveAvgPool2d(1):forward(x):reshape({2, 3}), nn.GlobalAvgPool2d():forward(x)) < 1e-6)
   end)

   it('backward: the average spreads dy / window size over each window, the max sends dy to its argmax', function()
      nr.manual_seed(8)
      -- 5 -> 3 rows: windows 0..1, 1..3, 3..4 overlap at rows 1 and 3
      local x = nr.randn({1, 1, 5, 1})
      local g = nr.tensor({{{{1}, {2}, {4}}}})
      local ma = nn.AdaptiveAvgPool2d({3, 1})
      ma:forward(x)
      local gx = ma:backward(x, g)
      local want = {1 / 2, 1 / 2 + 2 / 3, 2 / 3, 2 / 3 + 4 / 2, 4 / 2}
      for i = 1, 5 do assert(math.abs(gx:totable()[1][1][i][1] - want[i]) < 1e-6, 'row ' .. i) end
      local x2 = nr.tensor({{{{0}, {5}, {1}, {1}, {0}}}})
      local m = nn.AdaptiveMaxPool2d({3, 1})
      m:forward(x2)
      local gm = m:backward(x2, nr.tensor({{{{1}, {2}, {4}}}})):totable()
      -- rows 0..1 -> argmax row 1 (dy 1); rows 1..3 -> row 1 (dy 2); rows 3..4 -> row 3 (dy 4)
      assert.same({{{{0}, {3}, {0}, {4}, {0}}}}, gm)
      -- the max pools' argmax positions are the forward's: a backward over another plane size
      -- with the same output size (which placed the gradients in the wrong cells) is refused
      for _, c in ipairs({{nn.AdaptiveMaxPool2d(2), {1, 1, 4, 4}, {1, 1, 8, 8}},
                          {nn.MaxPool2d(2), {1, 1, 4, 5}, {1, 1, 4, 4}}}) do
         c[1]:forward(nr.randn(c[2]))
         local ok, e = pcall(c[1].backward, c[1], nr.randn(c[3]), nr.ones({1, 1, 2, 2}))
         assert.is_false(ok)
         assert.truthy(tostring(e):find(string.format("backward: the input is %dx%d, the forward's was %dx%d", c[3][3], c[3][4],
            c[2][3], c[2][4]), 1, true), tostring(e))
      end
   end)

   it('check their arguments and inputs, naming the caller\'s line', function()
      local here = debug.getinfo(1, 'S').short_src
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      local e = msg(function() local m = nn.AdaptiveAvgPool2d(0) return m end)
      assert.truthy(e:find(here, 1, true) and e:find('output_size must be an integer in [1, 2^31 - 1], got 0', 1, true), e)
      e = msg(function() local m = nn.AdaptiveMaxPool2d({2, 'a'}) return m end)
      assert.truthy(e:find(here, 1, true) and e:find('output_size[2] must be an integer', 1, true), e)
      e = msg(function() local m = nn.AdaptiveMaxPool2d() return m end)
      assert.truthy(e:find(here, 1, true) and e:find('the output size (a number or a {h, w} pair) is required', 1, true), e)
      e = msg(function() local m = nn.AdaptiveAvgPool2d(2, {stride = 1}) return m end)
      assert.truthy(e:find('takes only the output size', 1, true), e)
      assert.truthy(msg(function() nn.AdaptiveAvgPool2d(2):forward(nr.randn({2, 3, 4})) end)
         :find('expected a 4-d input (N, C, H, W), got [2 x 3 x 4]', 1, true))
      assert.truthy(msg(function() nn.AdaptiveMaxPool2d(2):forward(nr.randn({2, 3, 0, 4})) end)
         :find('x plane 0x4 and y plane 2x2 must both be non-empty', 1, true))
      assert.truthy(msg(function() nn.AdaptiveAvgPool2d(2):outputShape({3, 0, 4}) end):find('empty plane', 1, true))
      assert.equal('nr.nn.AdaptiveAvgPool2d 7x3', tostring(nn.AdaptiveAvgPool2d({7, 3})))
      -- the C kernels take the output size from y and check the rest
      local x = nr.randn({1, 2, 4, 4})
      assert.equal(1, C.nr_adaptive_avgpool2d_forward(x.c, nr.empty({1, 3, 2, 2}).c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('y: expected', 1, true))
      assert.equal(1, C.nr_adaptive_maxpool2d_forward(x.c, nr.empty({1, 2, 2, 2}).c, nr.empty({1, 2, 2, 2}).c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('indices', 1, true))
      assert.equal(1, C.nr_adaptive_maxpool2d_backward(nr.randn({1, 2, 2, 2}).c, nr.full({1, 2, 2, 2}, 16, {dtype = 'int64'}).c,
         nr.empty({1, 2, 4, 4}).c))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('outside the input plane 0..15', 1, true))
   end)

   it('in a model Neural Rejuvenation removes dead channels across them and keeps the function', function()
      nr.manual_seed(9)
      local m = nn.Sequential{
         nn.Conv2d(3, 6, 3, {padding = 1, bias = false}), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveMaxPool2d({5, 4}),
         nn.Conv2d(6, 5, 3, {padding = 1, bias = false}), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
         nn.Flatten(), nn.Linear(20, 4)}
      -- one dead channel per BN, and small live γ for the rescaling to scale up
      m.modules[2].weight:copy(nr.tensor({1, 0, 0.05, 0.8, 0.3, 1}))
      m.modules[6].weight:copy(nr.tensor({0.2, 1, 0.9, 0, 0.04}))
      m:evaluate()
      local x = nr.randn({2, 3, 7, 7})
      local y0 = m:forward(x):clone()
      local pruned = m:clone()
      nr.rejuvenate(pruned, {input_shape = {3, 7, 7}, budget = 0})
      assert.same({5, 4, 16}, {pruned.modules[1].out_channels, pruned.modules[5].out_channels, pruned.modules[10].in_features})
      assert(max_abs_diff(pruned:forward(x), y0) < 1e-5, 'pruned: ' .. max_abs_diff(pruned:forward(x), y0))
      local grown = m:clone()
      local rep = nr.rejuvenate(grown, {input_shape = {3, 7, 7}, rescale = true})
      assert.is_true(rep.rescaled > 0)
      assert(max_abs_diff(grown:forward(x), y0) < 1e-4, 'grown: ' .. max_abs_diff(grown:forward(x), y0))
      -- (back at the cost it started from: the two convs regain their widths, the classifier its inputs)
      assert.same({6, 5, 20}, {grown.modules[1].out_channels, grown.modules[5].out_channels, grown.modules[10].in_features})
      assert.equal(rep.before.params_all, rep.after.params_all)
   end)
end)

describe('BatchNorm1d', function()
   it('takes (N, C) and (N, C, L), names a wrong input, and shares BatchNorm2d\'s fields and options', function()
      local m = nn.BatchNorm1d(4, {eps = 1e-3, momentum = 0.2})
      assert.same({m.num_features, m.eps, m.momentum}, {4, 1e-3, 0.2})
      assert.same({4}, m:outputShape({4}))
      assert.same({4, 7}, m:outputShape({4, 7}))
      assert.equal('nr.nn.BatchNorm1d 4', tostring(m))
      assert.equal('nr.nn.BatchNorm1d 4 noaffine', tostring(nn.BatchNorm1d(4, {affine = false})))
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(msg(function() m:forward(nr.randn({2, 4, 3, 3})) end)
         :find('expected a 2-d (N, C) or 3-d (N, C, L) input, got [2 x 4 x 3 x 3]', 1, true))
      assert.truthy(msg(function() m:forward(nr.randn({2, 5})) end):find('expected input with 4 features, got [2 x 5]', 1, true))
      assert.truthy(msg(function() m:forward(nr.randn({1, 4})) end):find('more than one value per channel', 1, true))
      assert.truthy(msg(function() m:outputShape({4, 2, 2}) end):find('expected a (4) or (4, L) input', 1, true))
      local here = debug.getinfo(1, 'S').short_src
      local e = msg(function() local b = nn.BatchNorm1d(3, {mom = 1}) return b end)
      assert.truthy(e:sub(1, #here + 1) == here .. ':' and e:find('nr.nn.BatchNorm1d: unknown option "mom"', 1, true), e)
      -- the C kernels refuse other ranks with the layouts they take
      assert.equal(1, C.nr_bn2d_forward_eval(nr.randn({4}).c, nr.empty({4}).c, nil, nil, nr.zeros({4}).c, nr.ones({4}).c, 1e-5, 0))
      assert.truthy(nrffi.ffi.string(C.nr_last_error()):find('expected (N, C), (N, C, L) or (N, C, H, W), got f32 cpu (4)', 1, true))
   end)

   it('(N, C) runs on channel blocks: the same values as the per-plane loops on the transposed (1, C, N) batch', function()
      -- (N, C) has one value per plane, so its kernels walk rows of channel blocks (64 channels);
      -- a (1, C, N) input holds the same values per channel as one plane each
      for _, c in ipairs({5, 130}) do
         for _, relu in ipairs({false, true}) do
            nr.manual_seed(c)
            local x, g = nr.randn({37, c}):mul(3):add(2), nr.randn({37, c})
            local function run(input, grad)
               local bn = nn.BatchNorm1d(c)
               bn.weight:copy(nr.randn({c}))
               bn.bias:fill(0.25)
               local m = nn.Sequential{bn, nn.ReLU{inplace = relu}}
               local out = {m:forward(input):clone()}
               out[2] = m:backward(input, grad):clone()
               out[3], out[4], out[5], out[6] = bn.gradWeight:clone(), bn.gradBias:clone(), bn.running_mean:clone(),
                  bn.running_var:clone()
               m:evaluate()
               out[7] = m:forward(input):clone()
               m:zeroGradParameters()
               out[8] = m:backward(input, grad):clone()
               out[9] = bn.gradWeight:clone()
               return out
            end
            local function planes(t) return t:transpose(1, 2):contiguous():reshape({1, c, 37}) end
            local function rows(t) return t:reshape({c, 37}):transpose(1, 2):contiguous() end
            nr.manual_seed(1)
            local a = run(x, g)
            nr.manual_seed(1)
            local b = run(planes(x), planes(g))
            for i = 1, 9 do
               local bi = (i == 1 or i == 2 or i == 7 or i == 8) and rows(b[i]) or b[i]
               local d = a[i]:sub(bi):abs():max() / math.max(1e-12, bi:abs():max())
               assert(d < 1e-5, string.format('C = %d relu %s: result %d differs by %.3g', c, tostring(relu), i, d))
            end
         end
      end
   end)

   it('after a Linear with an in-place ReLU: fused in one pass, equal to the unfused layers', function()
      nr.manual_seed(4)
      local function net(inplace)
         return nn.Sequential{nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU{inplace = inplace}, nn.Linear(6, 3)}
      end
      local a, b = net(true), net(false)
      local pb = b:parameters()
      for i, p in ipairs(a:parameters()) do pb[i]:copy(p) end
      local x, g = nr.randn({8, 5}), nr.randn({8, 3})
      assert.is_true(max_abs_diff(a:forward(x), b:forward(x)) < 1e-6)
      assert.is_true(a.modules[2]._relu_fused)
      a:zeroGradParameters(); b:zeroGradParameters()
      assert.is_true(max_abs_diff(a:backward(x, g), b:backward(x, g)) < 1e-6)
      local _, ga = a:parameters()
      local _, gb = b:parameters()
      for i = 1, #ga do assert.is_true(max_abs_diff(ga[i], gb[i]) < 1e-5, 'gradient ' .. i) end
      -- a conv never folds a BatchNorm1d into its output pass (it would accept a 4-d input the
      -- layer refuses): the error is the same with gradients off
      local c = nn.Sequential{nn.Conv2d(2, 3, 1), nn.BatchNorm1d(3)}
      c:evaluate()
      local ok, err = pcall(nr.no_grad, function() return c:forward(nr.randn({2, 2, 4, 4})) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('expected a 2-d (N, C) or 3-d (N, C, L) input', 1, true), tostring(err))
   end)

   it('Neural Rejuvenation slices it after a global pool, keeps it after a Linear, pins what it reads after a Flatten', function()
      local S = require 'nr.rejuvenate.surgery'
      for _, case in ipairs({{'global pool', 5, 5}, {'Flatten', 6, 24}, {'Linear', 5, 8}}) do
         nr.manual_seed(5)
         local head = case[1] == 'global pool' and {nn.GlobalAvgPool2d(), nn.BatchNorm1d(6), nn.Linear(6, 3)}
            or case[1] == 'Flatten' and {nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.BatchNorm1d(24), nn.Linear(24, 3)}
            or {nn.GlobalAvgPool2d(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)}
         local m = nn.Sequential{nn.Conv2d(3, 6, 3, {padding = 1, bias = false}), nn.BatchNorm2d(6), nn.ReLU(), unpack(head)}
         m.modules[2].weight:copy(nr.tensor({1, 0, 0.05, 0.8, 0.3, 1}))
         local bn1 = m:findModules('BatchNorm1d')[1]
         local f = bn1.num_features
         bn1.running_mean:copy(nr.randn({f})); bn1.running_var:copy(nr.rand({f}):add(0.5))
         bn1.weight:copy(nr.randn({f})); bn1.bias:copy(nr.randn({f}))
         -- the dead channel (2) reaches a BatchNorm1d after the global pool as 0, which it maps to
         -- 0 (mean and β 0 there): removing it keeps the function, so a wrong slice would show
         if case[1] == 'global pool' then bn1.running_mean:set(2, 0); bn1.bias:set(2, 0) end
         m:evaluate()
         local x = nr.randn({2, 3, 6, 6})
         local y0 = m:forward(x):clone()
         local pruned, grown = m:clone(), m:clone()
         nr.rejuvenate(pruned, {input_shape = {3, 6, 6}, budget = 0})
         assert.same({case[2], case[3]}, {pruned.modules[1].out_channels, pruned:findModules('BatchNorm1d')[1].num_features},
            case[1])
         assert(max_abs_diff(pruned:forward(x), y0) < 1e-5, case[1] .. ' pruned: ' .. max_abs_diff(pruned:forward(x), y0))
         nr.rejuvenate(grown, {input_shape = {3, 6, 6}})
         assert(max_abs_diff(grown:forward(x), y0) < 1e-4, case[1] .. ': ' .. max_abs_diff(grown:forward(x), y0))
         assert.equal('BatchNorm1d', grown:findModules('BatchNorm1d')[1]:typename())
         -- a checkpoint's architecture rebuilds the pruned model's BatchNorm1d from a fresh one
         local fresh = m:clone()
         S.apply_arch(fresh, S.arch_state(pruned), true)
         assert.equal(case[3], fresh:findModules('BatchNorm1d')[1].num_features, case[1])
         -- its parameters count where it stands (nr.count's total, every kind counted)
         local all = {conv = true, linear = true, bn = true, bias = true}
         for _, mm in ipairs({m, pruned}) do
            assert.equal(nr.count(mm, {3, 6, 6}).params, nr.utilization(mm, {3, 6, 6}, {count = all}).params_all, case[1])
         end
      end
   end)

   it('a misplaced one is named by nr.count and nr.rejuvenate; a refused input leaves no fused ReLU behind', function()
      local function msg(f, ...) local ok, e = pcall(f, ...); assert.is_false(ok); return tostring(e) end
      local e = msg(nr.count, nn.Sequential{nn.Flatten(), nn.BatchNorm1d(3)}, {2, 2, 2})
      assert.truthy(e:find('nr.count: 1 (BatchNorm1d 3): expected a (3) or (3, L) input, got [8]', 1, true), e)
      local m = nn.Sequential{nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.BatchNorm1d(6), nn.GlobalAvgPool2d(), nn.Linear(6, 2)}
      e = msg(nr.rejuvenate, m, {input_shape = {3, 8, 8}})
      assert.truthy(e:find('2 (BatchNorm1d 6): expects a (6) or (6, L) sample but the graph carries (6, 6, 6)', 1, true), e)
      e = msg(nr.utilization, nn.Sequential{nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.GlobalAvgPool2d(),
         nn.AdaptiveAvgPool2d(2), nn.Linear(6, 2)}, {3, 8, 8})
      assert.truthy(e:find('nr.utilization: 3 (AdaptiveAvgPool2d 2x2): expected a (C, H, W) input, got [6]', 1, true), e)
      -- Sequential asks it for the in-place ReLU's work just before its forward; a refused input
      -- must not leave that request for the next forward, called directly
      local bn = nn.BatchNorm1d(3)
      local seq = nn.Sequential{bn, nn.ReLU{inplace = true}}
      msg(seq.forward, seq, nr.randn({2, 3, 4, 4}))
      nr.manual_seed(3)
      assert.is_true(bn:forward(nr.randn({8, 3})):min() < 0, 'a ReLU was applied')
   end)
end)

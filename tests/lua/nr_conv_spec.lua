-- nr.nn.NRConv2d (NR-CR / NR-CA split conv): forward against dense references and gradients by
-- finite differences (input and every block's weights and bias).
-- Tolerances: forward 1e-5 relative; gradients |analytic - numeric| <= 2e-2 * max(1, |numeric|)
-- with central differences, eps = 1e-2 (CR, linear) and 2e-3 (CA) in float32.
local nr = require 'nr'
local nn = nr.nn

local function max_rel(a, b)
   return a:sub(b):abs():max() / math.max(1e-12, b:abs():max())
end

-- groups: input channels 0..6 as {gen 0: 0,1,4,5} {gen 1: 2,3,6} (scattered, as after a Concat);
-- outputs: gen 0 (3 channels), gen 1 (2), gen 2 (2, an orphan: no gen-2 input)
local function make(scheme, bias)
   return nn.NRConv2d{in_channels = 7, out_channels = 7, kernel_size = 3, stride = 1, padding = 1, bias = bias,
      scheme = scheme,
      in_groups = {{gen = 0, idx = {0, 1, 4, 5}}, {gen = 1, idx = {2, 3, 6}}},
      out_groups = {{gen = 0, first = 0, n = 3}, {gen = 1, first = 3, n = 2}, {gen = 2, first = 5, n = 2}}}
end

local function randomize(m)
   for _, b in ipairs(m.blocks) do
      b.conv.weight:copy(nr.randn(b.conv.weight:shape()):mul_(0.3))
      if b.conv.bias then b.conv.bias:copy(nr.randn(b.conv.bias:shape()):mul_(0.3)) end
   end
end

local function dense_conv(m)
   local c = nn.Conv2d(m.in_channels, m.out_channels, 3, {padding = 1, bias = m.spec.bias})
   c.weight:copy(m:dense())
   if m.spec.bias then c.bias:copy(m:dense_bias()) end
   return c
end

-- loss = Σ y ⊙ R
local function loss_of(m, x, R)
   return m:forward(x):clone():mul_(R):sum()
end

local function gradcheck(m, x, eps)
   local y = m:forward(x)
   local R = nr.randn(y:shape())
   m:zeroGradParameters()
   local gx = m:backward(x, R):clone()
   local worst = 0
   local function probe(t, g, k)
      local n = t:numel()
      for _ = 1, k do
         local i = math.random(1, n)
         local v = t:get(i)
         t:set(i, v + eps)
         local lp = loss_of(m, x, R)
         t:set(i, v - eps)
         local lm = loss_of(m, x, R)
         t:set(i, v)
         local num = (lp - lm) / (2 * eps)
         local err = math.abs(g:get(i) - num) / math.max(1, math.abs(num))
         if err ~= err or err > worst then worst = err == err and err or math.huge end -- NaN: worst
         if err ~= err or err > 2e-2 then print(string.format('gradcheck: analytic %.5g numeric %.5g', g:get(i), num)) end
      end
   end
   probe(x, gx, 12)
   for _, b in ipairs(m.blocks) do
      probe(b.conv.weight, b.conv.gradWeight, 6)
      if b.conv.bias then probe(b.conv.bias, b.conv.gradBias, 2) end
   end
   return worst
end

describe('nr.nn.NRConv2d', function()
   it('CR equals a dense conv whose cross blocks are zero, and computes only diagonal blocks', function()
      nr.manual_seed(1)
      local m = make('CR', true)
      randomize(m)
      -- gen0 <- gen0, gen1 <- gen1, gen2 (orphan) <- all inputs: 3*4 + 2*3 + 2*7 weights per tap
      local n = 0
      for _, b in ipairs(m.blocks) do n = n + b.conv.weight:numel() end
      assert.are.equal((3 * 4 + 2 * 3 + 2 * 7) * 9, n)
      local x = nr.randn({2, 7, 5, 5})
      local ref = dense_conv(m):forward(x)
      assert.is_true(max_rel(m:forward(x), ref) < 1e-5)
      local p, macs = m:cost({7, 5, 5})
      assert.are.equal(n + 7, p)
      assert.are.equal(n * 25, macs)
   end)

   it('CR: an input generation no output group has is read by the oldest output group (it fed nothing)', function()
      nr.manual_seed(11)
      math.randomseed(11)
      -- inputs gen 0 {0, 2, 3}, gen 1 {1, 4}, gen 2 {5}; outputs gen 0 (2), gen 1 (3): gen 2 is
      -- unread, and read by the oldest output group (its block keeps its name in later layouts)
      local m = nn.NRConv2d{in_channels = 6, out_channels = 5, kernel_size = 3, stride = 1, padding = 1, bias = true,
         scheme = 'CR', in_groups = {{gen = 0, idx = {0, 2, 3}}, {gen = 1, idx = {1, 4}}, {gen = 2, idx = {5}}},
         out_groups = {{gen = 0, first = 0, n = 2}, {gen = 1, first = 2, n = 3}}}
      local keys = {}
      for _, b in ipairs(m.blocks) do keys[#keys + 1] = b.conv._key .. (b.conv.bias and '+b' or '') end
      assert.are.same({'o0_i0+b', 'o1_i1+b', 'o0_i2'}, keys)
      randomize(m)
      local x = nr.randn({2, 6, 5, 5})
      assert.is_true(max_rel(m:forward(x), dense_conv(m):forward(x)) < 1e-5)
      local p = m:cost({6, 5, 5})
      assert.are.equal((2 * 3 + 3 * 2 + 2 * 1) * 9 + 5, p)
      local worst = gradcheck(m, nr.randn({2, 6, 4, 4}), 1e-2)
      assert.is_true(worst <= 2e-2, worst)
      -- a newer orphan (gen 2, reading every input) does not take the oldest group's read over (its
      -- trained weights would go); an oldest group that is an orphan reads every input already
      local function keys_of(conv)
         local k = {}
         for _, b in ipairs(conv.blocks) do k[#k + 1] = b.conv._key end
         return k
      end
      local o = nn.NRConv2d{in_channels = 3, out_channels = 3, kernel_size = 1, scheme = 'CR',
         in_groups = {{gen = 0, idx = {0}}, {gen = 1, idx = {1, 2}}},
         out_groups = {{gen = 0, first = 0, n = 1}, {gen = 2, first = 1, n = 2}}}
      assert.are.same({'o0_i0', 'o2_all', 'o0_i1'}, keys_of(o))
      o = nn.NRConv2d{in_channels = 3, out_channels = 3, kernel_size = 1, scheme = 'CR',
         in_groups = {{gen = 0, idx = {0}}, {gen = 1, idx = {1, 2}}}, out_groups = {{gen = 2, first = 0, n = 3}}}
      assert.are.same({'o2_all'}, keys_of(o))
   end)

   it('CA computes O_j = A_j + 2·sigmoid(A_j)·B_j with A_j the own-group response', function()
      nr.manual_seed(2)
      local m = make('CA', false)
      randomize(m)
      local x = nr.randn({2, 7, 5, 5})
      local y = m:forward(x):clone()
      -- reference from dense convs of the diagonal-only and cross-only weights
      local diag = make('CR', false)   -- same group structure, diagonal blocks only
      for _, b in ipairs(diag.blocks) do
         for _, b2 in ipairs(m.blocks) do
            if b2.out == b.out and b2.inp == b.inp then b.conv.weight:copy(b2.conv.weight) end
         end
      end
      local A = dense_conv(diag):forward(x):clone()
      local full = dense_conv(m):forward(x):clone()
      local B = full:sub(A)
      local ref = A:sigmoid():mul_(B):mul_(2):add_(A)
      -- the orphan group (gen 2, channels 5..6) is a plain conv over all inputs: no gate
      ref:narrow(2, 6, 2):copy(full:narrow(2, 6, 2))
      assert.is_true(max_rel(y, ref) < 1e-5)
   end)

   it('CA with zero cross blocks is exactly the diagonal conv (function preserved at rejuvenation)', function()
      nr.manual_seed(3)
      local m = make('CA', true)
      randomize(m)
      for _, b in ipairs(m.blocks) do if not b.diag then b.conv.weight:zero() end end
      local x = nr.randn({2, 7, 5, 5})
      assert.is_true(max_rel(m:forward(x), dense_conv(m):forward(x)) < 1e-5)
   end)

   it('CR gradients match finite differences', function()
      nr.manual_seed(4)
      math.randomseed(4)
      local m = make('CR', true)
      randomize(m)
      local worst = gradcheck(m, nr.randn({2, 7, 4, 4}), 1e-2)
      print(string.format("  worst relative gradient error %.2e", worst))
      assert.is_true(worst <= 2e-2)
   end)

   it('CA gradients (through the sigmoid gate) match finite differences', function()
      nr.manual_seed(5)
      math.randomseed(5)
      local m = make('CA', true)
      randomize(m)
      local worst = gradcheck(m, nr.randn({2, 7, 4, 4}), 2e-3)
      print(string.format("  worst relative gradient error %.2e", worst))
      assert.is_true(worst <= 2e-2)
   end)

   it('works inside a Sequential, clones, and names its block parameters stably', function()
      local m = make('CA', false)
      local net = nn.Sequential{nn.Conv2d(3, 7, 1, {bias = false}), m, nn.BatchNorm2d(7)}
      local names = {}
      for _, e in ipairs(net:namedParameters()) do names[#names + 1] = e.name end
      assert.are.equal('1.o0_i0.weight', names[2])
      local x = nr.randn({2, 3, 4, 4})
      local y = net:forward(x):clone()
      local c = net:clone()
      assert.is_true(max_rel(c:forward(x), y) < 1e-6)
      assert.has_error(function() make('XX', false) end)
   end)

   it('the fused cross-attention kernels equal their formula and reject mismatched operands', function()
      local C = require('nr.ffi').C
      local a, b, g = nr.randn({3, 4}):mul(3), nr.randn({3, 4}), nr.randn({3, 4})
      local o, s, da, db = nr.empty({3, 4}), nr.empty({3, 4}), nr.empty({3, 4}), nr.empty({3, 4})
      assert.equal(0, C.nr_cross_attention_forward(a.c, b.c, o.c, s.c))
      assert.equal(0, C.nr_cross_attention_backward(s.c, b.c, g.c, da.c, db.c))
      local worst = 0
      for i = 1, 12 do
         local av, bv, gv = a:get(i), b:get(i), g:get(i)
         local sv = 1 / (1 + math.exp(-av))
         for _, pair in ipairs({{s:get(i), sv}, {o:get(i), av + 2 * sv * bv},
                                {da:get(i), gv * (1 + 2 * sv * (1 - sv) * bv)}, {db:get(i), 2 * sv * gv}}) do
            local e = math.abs(pair[1] - pair[2]) / (math.abs(pair[2]) + 1e-3)
            worst = e == e and math.max(worst, e) or math.huge -- math.max drops a NaN
         end
      end
      assert.is_true(worst < 1e-5, 'worst relative error ' .. worst)
      local ffi = require 'ffi'
      assert.is_true(C.nr_cross_attention_forward(a.c, nr.randn({4, 3}).c, o.c, s.c) ~= 0)
      assert.matches('shape mismatch: a .- vs b', ffi.string(C.nr_last_error()))
      assert.is_true(C.nr_cross_attention_backward(s.c, b.c, g:t().c, da.c, db.c) ~= 0)
      assert.matches('g: expected a contiguous tensor', ffi.string(C.nr_last_error()))
   end)
   it('rejects a hand-written spec that is malformed, naming the field and the value', function()
      local base = {in_channels = 4, out_channels = 4, kernel_size = 1, scheme = 'CR',
         out_groups = {{gen = 0, first = 0, n = 2}, {gen = 1, first = 2, n = 2}},
         in_groups = {{gen = 0, idx = {0, 1}}, {gen = 1, idx = {2, 3}}}}
      local function with(over)
         local s = {}
         for k, v in pairs(base) do s[k] = v end
         for k, v in pairs(over) do s[k] = v end
         return s
      end
      assert.has_no.errors(function() nn.NRConv2d(base) end)
      local function fails(over, pattern)
         local ok, err = pcall(nn.NRConv2d, with(over))
         assert.is_false(ok, 'accepted: ' .. pattern)
         assert.matches(pattern, tostring(err), 1, true)
      end
      local ig, og = base.in_groups, base.out_groups
      -- A3: two output (or input) groups of one generation named two blocks alike
      fails({out_groups = {{gen = 0, first = 0, n = 2}, {gen = 0, first = 2, n = 2}}, in_groups = {{gen = 0, idx = {0, 1, 2, 3}}}},
         'spec.out_groups[2].gen = 0 repeats the generation of spec.out_groups[1]')
      fails({in_groups = {{gen = 0, idx = {0, 1}}, {gen = 0, idx = {2, 3}}}},
         'spec.in_groups[2].gen = 0 repeats the generation of spec.in_groups[1]')
      -- C6: fractional, NaN, string positions
      fails({in_groups = {{gen = 0, idx = {0, 0.5}}, ig[2]}}, 'spec.in_groups[1].idx[2] must be a non-negative integer <= 3, got 0.5')
      fails({in_groups = {{gen = 0, idx = {0, 0 / 0}}, ig[2]}}, 'spec.in_groups[1].idx[2] must be a non-negative integer <= 3, got nan')
      fails({in_groups = {{gen = 0, idx = {0, '1'}}, ig[2]}}, 'spec.in_groups[1].idx[2] must be a non-negative integer <= 3, got "1"')
      fails({in_groups = {{gen = 0, idx = {0, 4}}, ig[2]}}, 'spec.in_groups[1].idx[2] must be a non-negative integer <= 3, got 4')
      fails({in_groups = {{gen = 0, idx = {0, 2}}, ig[2]}}, 'position 2 is in spec.in_groups[1] and spec.in_groups[2]')
      -- B5: missing or mistyped fields
      fails({in_groups = false}, 'spec.in_groups must be a table, got false')
      fails({out_groups = 'x'}, 'spec.out_groups must be a table, got "x"')
      fails({in_channels = 'four'}, 'spec.in_channels must be an integer >= 1, got "four"')
      fails({in_groups = {{gen = 0, idx = 'ab'}, ig[2]}}, 'spec.in_groups[1].idx must be a table, got "ab"')
      fails({in_groups = {ig[1], 7}}, 'spec.in_groups[2] must be a table, got 7')
      fails({out_groups = {{first = 0, n = 2}, og[2]}}, 'spec.out_groups[1].gen must be a non-negative integer, got nil')
      fails({in_groups = {{gen = 1.5, idx = {0, 1}}, ig[2]}}, 'spec.in_groups[1].gen must be a non-negative integer, got 1.5')
      fails({out_groups = {{gen = 0, first = 0, n = 1.5}, {gen = 1, first = 1.5, n = 2.5}}},
         'spec.out_groups[1].n must be an integer >= 1, got 1.5')
      fails({out_groups = {{gen = 0, first = 1, n = 2}, og[2]}}, 'spec.out_groups[1].first = 1, expected 0')
      fails({out_channels = 0, out_groups = {}}, 'spec.out_channels must be an integer >= 1, got 0')
   end)

   it('refuses two parameters of one name instead of saving one of them', function()
      local a, b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
      local net = nn.Sequential{a, b}
      a._key, b._key = 'same', 'same'
      local ok, err = pcall(function() return net:namedParameters() end)
      assert.is_false(ok)
      assert.matches('two parameters are both named "same.weight"', tostring(err), 1, true)
      local path = os.tmpname()
      ok, err = pcall(require('nr.checkpoint').save_weights, net, path)
      os.remove(path)
      assert.is_false(ok)
      assert.matches('both named "same.weight"', tostring(err), 1, true)
      -- one module at two places (weight tying) is one parameter, listed once and stepped once
      local lin = nn.Linear(3, 3)
      local tied = nn.Sequential{lin, nn.ReLU(), lin}
      assert.equal(2, #tied:namedParameters())
      assert.equal('0.weight', tied:namedParameters()[1].name)    -- its first place, as PyTorch
      assert.equal(2, #tied:parameters())
      assert.equal(12, nr.count(tied, {3}).params)                 -- held once, computed twice
      assert.equal(18, nr.count(tied, {3}).flops)
      -- a weight shared by hand, each layer with its own bias: the shared tensor once, both biases
      local l1, l2 = nn.Linear(3, 3), nn.Linear(3, 3)
      l2.weight, l2.gradWeight = l1.weight, l1.gradWeight
      assert.equal(9 + 3 + 3, nr.count(nn.Sequential{l1, nn.ReLU(), l2}, {3}).params)
      tied:zeroGradParameters()
      lin.gradWeight:fill(1)
      local w0 = lin.weight:clone()
      nr.optim.SGD(tied, {lr = 0.5, momentum = 0, weight_decay = 0}):step()
      assert.near(-0.5, lin.weight:clone():add(w0:mul(-1)):max(), 1e-7)
      assert.near(-0.5, lin.weight:clone():add(w0:mul(-1)):min(), 1e-7)
   end)
end)

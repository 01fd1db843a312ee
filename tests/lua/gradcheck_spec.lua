-- Finite-difference gradient checks of every layer and container: inputs AND parameters.
--
-- Method: L = sum_i y_i * R_i for a fixed random R (accumulated in Lua doubles), so dL/dy = R;
-- the analytic gradients come from m:backward(x, R) (parameter grads zeroed first); the numeric
-- ones from central differences (L(v + eps) - L(v - eps)) / (2 eps) on a sample of up to
-- MAX_CHECK elements of each tensor (all of them when the tensor is small).
-- Tolerance (float32 forward passes): |num - ana| <= ATOL + RTOL * max(|num|, |ana|), with
-- eps = 1e-2 (piecewise-linear layers are exact up to rounding; smooth ones have O(eps^2) error).
-- On failure the first differing values are printed with their positions.
local nr = require 'nr'
local nn = nr.nn

local EPS, ATOL, RTOL, MAX_CHECK = 1e-2, 2e-3, 1e-2, 24

local function sum_weighted(y, r)
   local py, pr, s = y:contiguous():data(), r:data(), 0
   for i = 0, y:numel() - 1 do s = s + py[i] * pr[i] end
   return s
end

-- Indices (0-based) of up to MAX_CHECK elements, spread over the tensor, deterministic.
local function sample(n)
   local out = {}
   if n <= MAX_CHECK then
      for i = 0, n - 1 do out[#out + 1] = i end
   else
      local step = n / MAX_CHECK
      for k = 0, MAX_CHECK - 1 do out[#out + 1] = math.floor(k * step + (k * 7919) % math.max(1, math.floor(step))) end
   end
   return out
end

-- loss_fn() -> double; t: the tensor to perturb; ana: analytic gradient (same shape).
-- Returns a list of failures {i, num, ana}.
local function compare(loss_fn, t, ana, skip, eps)
   eps = eps or EPS
   local p, g = t:data(), ana:contiguous():data()
   local bad = {}
   for _, i in ipairs(sample(t:numel())) do
      if not (skip and skip(i)) then
         local v = p[i]
         p[i] = v + eps
         local lp = loss_fn()
         p[i] = v - eps
         local lm = loss_fn()
         p[i] = v
         local num, a = (lp - lm) / (2 * eps), g[i]
         -- "not <=": a NaN on either side is a mismatch (with ">" it passed as a match)
         if not (math.abs(num - a) <= ATOL + RTOL * math.max(math.abs(num), math.abs(a))) then -- luacheck: ignore 581
            bad[#bad + 1] = {i, num, a}
         end
      end
   end
   return bad
end

local function report(what, bad)
   if #bad == 0 then return end
   local lines = {string.format('%s: %d mismatches (eps %g, atol %g, rtol %g); first:', what, #bad, EPS, ATOL, RTOL)}
   for k = 1, math.min(6, #bad) do
      lines[#lines + 1] = string.format('  [%d] numeric %.6g analytic %.6g', bad[k][1], bad[k][2], bad[k][3])
   end
   error(table.concat(lines, '\n'), 2)
end

-- Full check of module m on input x. opts.reseed: re-seed the RNG before every forward (Dropout);
-- opts.kink: skip input elements closer than this to 0 (ReLU kinks); opts.eps: a smaller step
-- where a max pool follows a normalisation (nearby values would swap the argmax at eps = 1e-2).
local function gradcheck(m, x, opts)
   opts = opts or {}
   local function fwd()
      if opts.reseed then nr.manual_seed(opts.reseed) end
      return m:forward(x)
   end
   local y = fwd()
   local r = nr.randn(y:shape())
   local function loss() return sum_weighted(fwd(), r) end
   m:zeroGradParameters()
   fwd()
   local gi = m:backward(x, r):clone()
   local params, grads = m:parameters()
   local gcopy = {}
   for k = 1, #grads do gcopy[k] = grads[k]:clone() end
   local px = x:data()
   local skip = opts.kink and function(i) return math.abs(px[i]) < opts.kink end or nil
   report('input', compare(loss, x, gi, skip, opts.eps))
   for k = 1, #params do report('parameter ' .. k, compare(loss, params[k], gcopy[k], nil, opts.eps)) end
   return true
end

-- Inputs away from ties and kinks: randn with a fixed seed.
local function input(shape, seed)
   nr.manual_seed(seed or 7)
   return nr.randn(shape)
end

describe('gradcheck: convolution', function()
   local cases = {
      {'plain 3x3 with bias', 3, 4, 3, {padding = 1}},
      {'no bias, strided, padded', 4, 6, 3, {stride = 2, padding = 1, bias = false}},
      {'grouped (2 groups)', 4, 6, 3, {groups = 2, padding = 1}},
      {'depthwise', 4, 4, 3, {groups = 4, padding = 1}},
      {'depthwise strided, no bias', 4, 4, 3, {groups = 4, stride = 2, padding = 1, bias = false}},
      {'dilated', 3, 4, 3, {dilation = 2, padding = 2}},
      {'1x1 stride 1', 5, 3, 1, {}},
      {'1x1 stride 2', 5, 3, 1, {stride = 2}},
      {'rectangular kernel and stride', 3, 2, {3, 2}, {stride = {2, 1}, padding = {1, 0}}},
      {'channel multiplier (groups = cin, cout = 2 cin)', 3, 6, 3, {groups = 3, padding = 1}},
   }
   for _, c in ipairs(cases) do
      it(c[1], function()
         nr.manual_seed(3)
         local m = nn.Conv2d(c[2], c[3], c[4], c[5])
         assert.is_true(gradcheck(m, input({2, c[2], 7, 6})))
      end)
   end
end)

describe('gradcheck: normalisation, activations, pools, linear, dropout', function()
   it('BatchNorm2d in training mode (batch statistics)', function()
      local m = nn.BatchNorm2d(3)
      nr.manual_seed(5)
      m.weight:copy(nr.randn({3}))
      m.bias:copy(nr.randn({3}))
      assert.is_true(gradcheck(m, input({4, 3, 3, 3})))
   end)
   it('BatchNorm2d in evaluation mode (running statistics)', function()
      local m = nn.BatchNorm2d(3)
      m.running_mean:copy(nr.tensor({0.1, -0.2, 0.3}))
      m.running_var:copy(nr.tensor({0.5, 1.5, 2.0}))
      m:evaluate()
      assert.is_true(gradcheck(m, input({2, 3, 3, 3})))
   end)
   it('BatchNorm2d without affine parameters', function()
      assert.is_true(gradcheck(nn.BatchNorm2d(2, {affine = false}), input({3, 2, 2, 3})))
   end)
   it('BatchNorm1d over (N, C) and (N, C, L), training and evaluation', function()
      for _, shape in ipairs({{6, 3}, {3, 3, 4}}) do
         local m = nn.BatchNorm1d(3)
         nr.manual_seed(6)
         m.weight:copy(nr.randn({3}))
         m.bias:copy(nr.randn({3}))
         assert.is_true(gradcheck(m, input(shape)))
         m.running_mean:copy(nr.tensor({0.1, -0.2, 0.3}))
         m.running_var:copy(nr.tensor({0.5, 1.5, 2.0}))
         m:evaluate()
         assert.is_true(gradcheck(m, input(shape)))
      end
   end)
   it('ReLU', function()
      assert.is_true(gradcheck(nn.ReLU(), input({2, 3, 4, 4}), {kink = 3 * EPS}))
   end)
   it('Sigmoid', function()
      assert.is_true(gradcheck(nn.Sigmoid(), input({2, 3, 4, 4})))
   end)
   it('Tanh, ReLU6 and LeakyReLU (a positive and a negative slope)', function()
      assert.is_true(gradcheck(nn.Tanh(), input({2, 3, 4, 4})))
      assert.is_true(gradcheck(nn.ReLU6(), input({2, 3, 4, 4}):mul_(4), {kink = 3 * EPS}))
      assert.is_true(gradcheck(nn.LeakyReLU(0.1), input({2, 3, 4, 4}), {kink = 3 * EPS}))
      assert.is_true(gradcheck(nn.LeakyReLU({negative_slope = -0.5}), input({2, 3, 4, 4}), {kink = 3 * EPS}))
   end)
   it('ELU (two alphas), SiLU, GELU (both forms), Hardswish and Hardsigmoid (across their kinks at -3 and 3)', function()
      assert.is_true(gradcheck(nn.ELU(), input({2, 3, 4, 4}):mul_(2), {kink = 3 * EPS}))
      assert.is_true(gradcheck(nn.ELU({alpha = 0.3}), input({2, 3, 4, 4}):mul_(2), {kink = 3 * EPS}))
      assert.is_true(gradcheck(nn.SiLU(), input({2, 3, 4, 4}):mul_(3)))
      assert.is_true(gradcheck(nn.GELU(), input({2, 3, 4, 4}):mul_(3)))
      assert.is_true(gradcheck(nn.GELU('tanh'), input({2, 3, 4, 4}):mul_(3)))
      assert.is_true(gradcheck(nn.Hardswish(), input({2, 3, 4, 4}):mul_(4), {kink = 3 * EPS}))
      assert.is_true(gradcheck(nn.Hardsigmoid(), input({2, 3, 4, 4}):mul_(4), {kink = 3 * EPS}))
   end)
   it('Softmax and LogSoftmax (over the last dimension, 2-d and 3-d)', function()
      for _, m in ipairs({nn.Softmax(), nn.LogSoftmax()}) do
         assert.is_true(gradcheck(m, input({3, 6})))
         assert.is_true(gradcheck(m, input({2, 3, 4})))
      end
   end)
   it('MaxPool2d (2x2, and 3x3 stride 2 padded)', function()
      assert.is_true(gradcheck(nn.MaxPool2d(2), input({2, 2, 6, 6})))
      assert.is_true(gradcheck(nn.MaxPool2d(3, {stride = 2, padding = 1}), input({2, 2, 7, 7})))
      assert.is_true(gradcheck(nn.MaxPool2d(2, {ceil_mode = true}), input({2, 2, 5, 7})))
   end)
   it('AvgPool2d (count_include_pad true and false)', function()
      assert.is_true(gradcheck(nn.AvgPool2d(3, {stride = 2, padding = 1}), input({2, 2, 7, 6})))
      assert.is_true(gradcheck(nn.AvgPool2d(3, {stride = 2, padding = 1, count_include_pad = false}), input({2, 2, 7, 6})))
      assert.is_true(gradcheck(nn.AvgPool2d({2, 3}, {stride = 1}), input({1, 2, 5, 5})))
      -- ceil mode: clipped last windows, both divisors
      assert.is_true(gradcheck(nn.AvgPool2d(3, {stride = 2, padding = 1, ceil_mode = true}), input({2, 2, 8, 6})))
      assert.is_true(gradcheck(nn.AvgPool2d(2, {stride = 2, ceil_mode = true, count_include_pad = false}), input({1, 2, 5, 5})))
   end)
   it('GlobalAvgPool2d', function()
      assert.is_true(gradcheck(nn.GlobalAvgPool2d(), input({2, 3, 3, 5})))
   end)
   it('AdaptiveAvgPool2d and AdaptiveMaxPool2d (overlapping uneven windows, and more outputs than inputs)', function()
      for _, size in ipairs({{3, 2}, {4, 7}, 1}) do
         assert.is_true(gradcheck(nn.AdaptiveAvgPool2d(size), input({2, 2, 7, 5})))
         assert.is_true(gradcheck(nn.AdaptiveMaxPool2d(size), input({2, 2, 7, 5})))
      end
   end)
   it('Linear with and without bias', function()
      nr.manual_seed(2)
      assert.is_true(gradcheck(nn.Linear(5, 4), input({3, 5})))
      assert.is_true(gradcheck(nn.Linear(5, 4, {bias = false}), input({3, 5})))
      assert.is_true(gradcheck(nn.Linear(5, 4), input({2, 3, 5}))) -- (*, in): leading dimensions
   end)
   it('Dropout (training; mask fixed by re-seeding)', function()
      assert.is_true(gradcheck(nn.Dropout(0.3), input({4, 10}), {reseed = 11}))
   end)
   it('Flatten', function()
      nr.manual_seed(2)
      local m = nn.Sequential{nn.Flatten(), nn.Linear(12, 3)}
      assert.is_true(gradcheck(m, input({2, 3, 2, 2})))
   end)
end)

describe('gradcheck: CrossEntropyLoss', function()
   local function check_ce(ls)
      local crit = nn.CrossEntropyLoss({label_smoothing = ls})
      local x = input({5, 7}, 9)
      local labels = nr.tensor({0, 6, 3, 3, 1}, {dtype = 'int64'})
      crit:forward(x, labels)
      local g = crit:backward(x, labels):clone()
      report('logits', compare(function() return crit:forward(x, labels) end, x, g))
      return true
   end
   it('without label smoothing', function() assert.is_true(check_ce(0)) end)
   it('with label smoothing 0.1', function() assert.is_true(check_ce(0.1)) end)
end)

describe('gradcheck: containers', function()
   it('Sequential conv-bn-relu-pool-linear', function()
      nr.manual_seed(4)
      local m = nn.Sequential{nn.Conv2d(2, 3, 3, {padding = 1}), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)}
      assert.is_true(gradcheck(m, input({3, 2, 4, 4}), {eps = 1e-3}))
   end)
   it('Residual with a projection shortcut and with identity', function()
      nr.manual_seed(4)
      local main = nn.Sequential{nn.Conv2d(3, 4, 3, {padding = 1, stride = 2, bias = false}), nn.BatchNorm2d(4), nn.Sigmoid()}
      local m = nn.Residual(main, nn.Conv2d(3, 4, 1, {stride = 2}))
      assert.is_true(gradcheck(m, input({2, 3, 5, 5})))
      local m2 = nn.Residual(nn.Sequential{nn.Conv2d(3, 3, 3, {padding = 1}), nn.Sigmoid()})
      assert.is_true(gradcheck(m2, input({2, 3, 4, 4})))
   end)
   it('a module at two places: weight tying, and one activation or pool called twice', function()
      -- the second place holds a twin (same parameter tensors, own forward state); its gradients
      -- are the sum over both uses, which the finite differences of the shared tensor measure
      nr.manual_seed(5)
      local lin = nn.Linear(4, 4)
      local m = nn.Sequential{lin, lin}
      assert.are.equal(lin.weight, m:get(2).weight)
      assert.are.equal(2, #m:parameters())
      assert.is_true(gradcheck(m, input({3, 4})))
      local c1 = nn.Conv2d(4, 4, 1)
      assert.is_true(gradcheck(nn.Sequential{c1, c1}, input({2, 4, 5, 5})))
      local c3 = nn.Conv2d(3, 3, 3, {padding = 1})
      assert.is_true(gradcheck(nn.Sequential{c3, nn.Conv2d(3, 3, 1), c3}, input({2, 3, 5, 5})))
      assert.is_true(gradcheck(nn.Sequential{c3, nn.BatchNorm2d(3), c3}, input({2, 3, 5, 5})))
      local sig = nn.Sigmoid()
      assert.is_true(gradcheck(nn.Sequential{nn.Conv2d(3, 4, 3, {padding = 1}), sig, nn.Conv2d(4, 4, 3, {padding = 1}), sig},
         input({2, 3, 6, 6})))
      -- ReLU and max pooling (kinks and ties make finite differences unreliable): one module called
      -- twice gives exactly what two separate ones give (the same convs: their twins)
      for _, make in ipairs({function() return nn.ReLU() end, function() return nn.MaxPool2d(3, {stride = 1, padding = 1}) end}) do
         local a1, a2 = nn.Conv2d(3, 4, 3, {padding = 1}), nn.Conv2d(4, 4, 3, {padding = 1})
         local act = make()
         local once = nn.Sequential{a1, act, a2, act}
         local apart = nn.Sequential{a1, make(), a2, make()}
         local x = input({2, 3, 6, 6})
         local r = nr.randn({2, 4, 6, 6})
         local got = {}
         for k, net in ipairs({once, apart}) do
            net:zeroGradParameters()
            local y = net:forward(x):clone()
            local gx = net:backward(x, r):clone()
            got[k] = {y, gx, a1.gradWeight:clone(), a2.gradWeight:clone(), a1.gradBias:clone()}
         end
         for i = 1, #got[1] do assert.are.equal(0, got[1][i]:clone():sub_(got[2][i]):abs():max()) end
      end
      -- a device move keeps the twins' tensors shared (each converted once)
      local moved = nn.Sequential{lin, nn.ReLU(), lin}
      moved:_apply(function(t) return t:clone() end)
      assert.are.equal(moved:get(1).weight, moved:get(3).weight)
      assert.are.equal(moved:get(1).gradBias, moved:get(3).gradBias)
      assert.are_not.equal(lin.weight, moved:get(1).weight)
   end)
   it('Concat of two branches (DenseNet style)', function()
      nr.manual_seed(4)
      local m = nn.Concat{nn.Identity(), nn.Sequential{nn.BatchNorm2d(3), nn.Sigmoid(), nn.Conv2d(3, 2, 3, {padding = 1})}}
      assert.is_true(gradcheck(m, input({2, 3, 4, 4})))
   end)
end)

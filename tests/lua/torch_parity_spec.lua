-- Parity with PyTorch: outputs and gradients of every layer against golden values made by
-- tests/fixtures/make_layer_fixtures.py (PyTorch CPU) and stored in tests/fixtures/layers/.
-- Each case loads the input x, the parameters (w, b), the output gradient gy, runs forward and
-- backward, and compares y, gx, gw, gb (and BatchNorm's running statistics, max-pool indices,
-- the cross-entropy loss).
-- Tolerance: element i passes when |got_i - want_i| <= RTOL * (|want_i| + mean |want|), RTOL = 1e-4
-- (relative to the element, floored by the tensor's mean magnitude so values near zero are
-- compared on the tensor's scale). Mismatches print the first positions and values.
local nr = require 'nr'
local nn = nr.nn
local T = require 'nr.tensor'

local RTOL = 1e-4

local function fixture_dir()
   local src = debug.getinfo(1, 'S').source:sub(2)
   return (src:match('^(.*)/lua/[^/]*$') or 'tests') .. '/fixtures/layers/'
end
local DIR = fixture_dir()

local function load(case, name) return nr.load(DIR .. case .. '.' .. name .. '.npy') end
local function exists(case, name)
   local f = io.open(DIR .. case .. '.' .. name .. '.npy', 'rb')
   if f then f:close() end
   return f ~= nil
end

local function compare(what, got, want)
   assert(T.same_shape(got:shape(), want:shape()),
      string.format('%s: shape [%s] vs expected [%s]', what, table.concat(got:shape(), ' x '), table.concat(want:shape(), ' x ')))
   local g, w = got:contiguous():to('cpu', 'float32'), want:to('cpu', 'float32')
   local pg, pw, n = g:data(), w:data(), g:numel()
   local mean = 0
   for i = 0, n - 1 do mean = mean + math.abs(pw[i]) end
   mean = mean / math.max(n, 1)
   local bad, worst = {}, 0
   for i = 0, n - 1 do
      local d = math.abs(pg[i] - pw[i])
      local tol = RTOL * (math.abs(pw[i]) + mean)
      if not (d <= tol) then
         bad[#bad + 1] = i
         worst = math.max(worst, d / math.max(tol, 1e-30))
      end
   end
   if #bad > 0 then
      local lines = {string.format('%s: %d of %d elements differ beyond %g relative (worst %.3g x tolerance); first:',
         what, #bad, n, RTOL, worst)}
      for k = 1, math.min(6, #bad) do
         local i = bad[k]
         lines[#lines + 1] = string.format('  [%d] got %.8g want %.8g', i, pg[i], pw[i])
      end
      error(table.concat(lines, '\n'), 2)
   end
end

-- Runs module m on a fixture case and compares everything stored for it.
local function check_module(case, m)
   -- what the fixture script stores for such a module must be there: a missing gradient file
   -- would otherwise drop that comparison without a word
   local want = {'x', 'y', 'gy', 'gx'}
   if m.weight then want[#want + 1] = 'w'; want[#want + 1] = 'gw' end
   if m.bias then want[#want + 1] = 'b'; want[#want + 1] = 'gb' end
   if m.running_mean then for _, k in ipairs({'rm0', 'rv0', 'rm', 'rv'}) do want[#want + 1] = k end end
   for _, k in ipairs(want) do assert(exists(case, k), case .. ': fixture ' .. k .. '.npy is missing') end
   local x = load(case, 'x')
   if exists(case, 'w') then m.weight:copy(load(case, 'w')) end
   if exists(case, 'b') then m.bias:copy(load(case, 'b')) end
   if exists(case, 'rm0') then
      m.running_mean:copy(load(case, 'rm0'))
      m.running_var:copy(load(case, 'rv0'))
   end
   local y = m:forward(x)
   compare(case .. ' y', y, load(case, 'y'))
   m:zeroGradParameters()
   local gx = m:backward(x, load(case, 'gy'))
   compare(case .. ' gx', gx, load(case, 'gx'))
   if exists(case, 'gw') then compare(case .. ' gw', m.gradWeight, load(case, 'gw')) end
   if exists(case, 'gb') then compare(case .. ' gb', m.gradBias, load(case, 'gb')) end
   if exists(case, 'rm') then
      compare(case .. ' running_mean', m.running_mean, load(case, 'rm'))
      compare(case .. ' running_var', m.running_var, load(case, 'rv'))
   end
   return true
end

describe('PyTorch parity: Conv2d', function()
   local cases = {
      {'conv_basic', 3, 8, 3, {padding = 1}},
      {'conv_strided_nobias', 4, 6, 3, {stride = 2, padding = 1, bias = false}},
      {'conv_grouped', 4, 8, 3, {padding = 1, groups = 2}},
      {'conv_depthwise', 6, 6, 3, {stride = 2, padding = 1, groups = 6}},
      {'conv_dilated', 3, 4, 3, {padding = 2, dilation = 2}},
      {'conv_1x1', 8, 4, 1, {}},
      {'conv_rect', 3, 5, {3, 2}, {stride = {2, 1}, padding = {1, 0}}},
      {'conv_big', 16, 32, 3, {padding = 1}},
      {'conv_chmult', 3, 6, 3, {padding = 1, groups = 3}},
   }
   for _, c in ipairs(cases) do
      it(c[1], function() assert.is_true(check_module(c[1], nn.Conv2d(c[2], c[3], c[4], c[5]))) end)
   end
end)

describe('PyTorch parity: other layers', function()
   it('BatchNorm2d training step (output, gradients, running statistics)', function()
      assert.is_true(check_module('bn_train', nn.BatchNorm2d(4)))
   end)
   it('BatchNorm2d evaluation mode', function()
      assert.is_true(check_module('bn_eval', nn.BatchNorm2d(4):evaluate()))
   end)
   it('BatchNorm2d without affine parameters, and with another eps and momentum', function()
      assert.is_true(check_module('bn_noaffine', nn.BatchNorm2d(4, {affine = false})))
      assert.is_true(check_module('bn_momentum', nn.BatchNorm2d(4, {eps = 1e-3, momentum = 0.3})))
   end)
   it('BatchNorm1d over (N, C) and (N, C, L): a training step, and evaluation', function()
      assert.is_true(check_module('bn1d_train', nn.BatchNorm1d(5)))
      assert.is_true(check_module('bn1d_train_3d', nn.BatchNorm1d(5, {momentum = 0.3})))
      local m = nn.BatchNorm1d(5)
      m:evaluate()
      assert.is_true(check_module('bn1d_eval', m))
   end)
   it('Linear over leading dimensions, and non-overlapping MaxPool2d', function()
      assert.is_true(check_module('linear_3d', nn.Linear(10, 5)))
      assert.is_true(check_module('maxpool_2', nn.MaxPool2d(2)))
   end)
   it('ReLU and Sigmoid', function()
      assert.is_true(check_module('relu', nn.ReLU()))
      assert.is_true(check_module('sigmoid', nn.Sigmoid()))
   end)
   it('Tanh, ReLU6 (inputs past 6) and LeakyReLU(0.1)', function()
      assert.is_true(check_module('tanh', nn.Tanh()))
      assert.is_true(check_module('relu6', nn.ReLU6()))
      assert.is_true(check_module('leaky_relu', nn.LeakyReLU(0.1)))
   end)
   it('ELU(0.7), SiLU, GELU (erf and tanh forms), Hardswish and Hardsigmoid (inputs past -3 and 3)', function()
      assert.is_true(check_module('elu', nn.ELU(0.7)))
      assert.is_true(check_module('silu', nn.SiLU()))
      assert.is_true(check_module('gelu', nn.GELU()))
      assert.is_true(check_module('gelu_tanh', nn.GELU({approximate = 'tanh'})))
      assert.is_true(check_module('hardswish', nn.Hardswish()))
      assert.is_true(check_module('hardsigmoid', nn.Hardsigmoid()))
   end)
   it('Softmax and LogSoftmax over the last dimension (2-d and 3-d)', function()
      assert.is_true(check_module('softmax', nn.Softmax()))
      assert.is_true(check_module('logsoftmax', nn.LogSoftmax({dim = -1})))
      assert.is_true(check_module('softmax_3d', nn.Softmax({dim = 3})))
      assert.is_true(check_module('logsoftmax_3d', nn.LogSoftmax()))
   end)
   it('AvgPool2d with and without count_include_pad', function()
      assert.is_true(check_module('avgpool_pad', nn.AvgPool2d(3, {stride = 2, padding = 1})))
      assert.is_true(check_module('avgpool_nopad', nn.AvgPool2d(3, {stride = 2, padding = 1, count_include_pad = false})))
   end)
   it('MaxPool2d (output, argmax indices, gradient)', function()
      local m = nn.MaxPool2d(3, {stride = 2, padding = 1})
      assert.is_true(check_module('maxpool', m))
      assert.same(load('maxpool', 'idx'):totable(), m._indices:totable())
   end)
   it('ceil_mode: MaxPool2d and AvgPool2d (clipped last windows, the dropped one, both divisors)', function()
      for _, c in ipairs({{'maxpool_ceil', 2}, {'maxpool_ceil_drop', 3}}) do
         local m = nn.MaxPool2d(3, {stride = c[2], padding = 1, ceil_mode = true})
         assert.is_true(check_module(c[1], m))
         assert.same(load(c[1], 'idx'):totable(), m._indices:totable())
      end
      assert.same({1, 2, 2, 4}, load('maxpool_ceil_drop', 'y'):shape()) -- floor mode's size: the 3rd row dropped
      assert.is_true(check_module('avgpool_ceil', nn.AvgPool2d(3, {stride = 2, padding = 1, ceil_mode = true})))
      assert.is_true(check_module('avgpool_ceil_nopad',
         nn.AvgPool2d(3, {stride = 2, padding = 1, ceil_mode = true, count_include_pad = false})))
      assert.is_true(check_module('avgpool_ceil_k2', nn.AvgPool2d(2, {stride = 2, ceil_mode = true})))
      assert.is_true(check_module('avgpool_ceil_small', nn.AvgPool2d(2, {stride = 2, ceil_mode = true})))
      assert.same({1, 2, 2, 1}, load('avgpool_ceil_small', 'y'):shape())
   end)
   it('GlobalAvgPool2d', function()
      assert.is_true(check_module('gap', nn.GlobalAvgPool2d()))
   end)
   it('AdaptiveAvgPool2d and AdaptiveMaxPool2d (overlapping uneven windows; more outputs than inputs)', function()
      for _, c in ipairs({{'down', {3, 2}}, {'up', {9, 2}}}) do
         assert.is_true(check_module('adaptive_avg_' .. c[1], nn.AdaptiveAvgPool2d(c[2])))
         local m = nn.AdaptiveMaxPool2d(c[2])
         assert.is_true(check_module('adaptive_max_' .. c[1], m))
         assert.same(load('adaptive_max_' .. c[1], 'idx'):totable(), m._indices:totable())
      end
   end)
   it('Linear with and without bias', function()
      assert.is_true(check_module('linear', nn.Linear(10, 5)))
      assert.is_true(check_module('linear_nobias', nn.Linear(10, 5, {bias = false})))
   end)
   for _, c in ipairs({{'ce', 0}, {'ce_ls', 0.1}}) do
      it('CrossEntropyLoss, label_smoothing = ' .. c[2], function()
         local crit = nn.CrossEntropyLoss({label_smoothing = c[2]})
         local x, labels = load(c[1], 'x'), load(c[1], 'labels')
         local loss = crit:forward(x, labels)
         compare(c[1] .. ' loss', nr.tensor({loss}), load(c[1], 'loss'))
         compare(c[1] .. ' gx', crit:backward(x, labels), load(c[1], 'gx'))
      end)
   end
end)

-- The containers (Sequential, Residual with identity and projection shortcuts, Concat) carrying
-- conv / BN / ReLU / pools / Linear and the cross-entropy, against the same network in PyTorch
-- (containers_net in the fixture script; parameters matched by name): a training step, then the
-- evaluation-mode output with gradients on and off (off folds Conv + BN + ReLU and sums residuals
-- in place).
describe('PyTorch parity: containers', function()
   local function net()
      return nn.Sequential(
         nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
         nn.Residual(nn.Sequential(nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8))),
         nn.ReLU(),
         nn.Residual(nn.Sequential(nn.Conv2d(8, 12, 3, {stride = 2, padding = 1, bias = false}), nn.BatchNorm2d(12)),
                     nn.Sequential(nn.Conv2d(8, 12, 1, {stride = 2, bias = false}), nn.BatchNorm2d(12))),
         nn.ReLU(),
         nn.Concat(nn.Conv2d(12, 4, 1), nn.Sequential(nn.MaxPool2d(3, {stride = 1, padding = 1}), nn.Conv2d(12, 4, 1))),
         nn.GlobalAvgPool2d(), nn.Linear(8, 5))
   end

   it('a training step (loss, input and parameter gradients, running statistics), then evaluation', function()
      local m = net()
      local params, buffers = m:namedParameters(), m:namedBuffers()
      assert.equal(21, #params)
      for _, e in ipairs(params) do
         assert(exists('net', 'p.' .. e.name), 'no fixture for parameter ' .. e.name)
         e.param:copy(load('net', 'p.' .. e.name))
      end
      local x, labels = load('net', 'x'), load('net', 'labels')
      local crit = nn.CrossEntropyLoss()
      m:zeroGradParameters()
      local loss = crit:forward(m:forward(x), labels)
      compare('net loss', nr.tensor({loss}), load('net', 'loss'))
      compare('net gx', m:backward(x, crit:backward(m.output, labels)), load('net', 'gx'))
      for _, e in ipairs(params) do compare('net grad ' .. e.name, e.grad, load('net', 'g.' .. e.name)) end
      assert.equal(10, #buffers)
      for _, e in ipairs(buffers) do
         assert(exists('net', 'buf.' .. e.name), 'no fixture for buffer ' .. e.name)
         compare('net ' .. e.name, e.tensor, load('net', 'buf.' .. e.name))
      end
      m:evaluate()
      compare('net eval y', m:forward(x), load('net', 'y_eval'))
      compare('net eval y (no_grad: folded)', nr.no_grad(m, x), load('net', 'y_eval'))
   end)
end)

-- NRConv2d (CR and CA) against the same layer written in PyTorch from its blocks: three
-- generations, input groups that are index lists (the gather), the cross-attention gate.
describe('PyTorch parity: NRConv2d', function()
   local spec = {in_channels = 6, out_channels = 7, kernel_size = 3, padding = 1, bias = true,
                 in_groups = {{gen = 0, idx = {0, 3, 5}}, {gen = 1, idx = {1, 4}}, {gen = 2, idx = {2}}},
                 out_groups = {{gen = 0, first = 0, n = 3}, {gen = 1, first = 3, n = 2}, {gen = 2, first = 5, n = 2}}}
   for _, c in ipairs({{'nrconv_cr', 'CR', 3}, {'nrconv_ca', 'CA', 9}}) do
      local case, scheme, nblocks = c[1], c[2], c[3]
      it(scheme .. ': output, input gradient and every block\'s weight and bias gradients', function()
         local sp = {}
         for k, v in pairs(spec) do sp[k] = v end
         sp.scheme = scheme
         local m = nn.NRConv2d(sp)
         assert.equal(nblocks, #m.blocks)
         for _, b in ipairs(m.blocks) do
            local key = b.conv._key
            assert(exists(case, key .. '.w'), case .. ': no fixture for block ' .. key)
            b.conv.weight:copy(load(case, key .. '.w'))
            assert.equal(b.diag, b.conv.bias ~= nil, key .. ': bias on the diagonal blocks only')
            if b.conv.bias then b.conv.bias:copy(load(case, key .. '.b')) end
         end
         local x = load(case, 'x')
         compare(case .. ' y', m:forward(x), load(case, 'y'))
         m:zeroGradParameters()
         compare(case .. ' gx', m:backward(x, load(case, 'gy')), load(case, 'gx'))
         for _, b in ipairs(m.blocks) do
            local key = b.conv._key
            compare(case .. ' ' .. key .. ' gw', b.conv.gradWeight, load(case, key .. '.gw'))
            if b.conv.bias then compare(case .. ' ' .. key .. ' gb', b.conv.gradBias, load(case, key .. '.gb')) end
         end
      end)
   end
end)

-- Shared fixtures of the NR specs (nr_budget_spec, nr_surgery_spec, nr_train_spec, cuda_spec):
-- the five models the issue names, at small inputs; `damage`, which randomises BN state and
-- forces dead channels; the small Fashion-MNIST-sized net and synthetic data of the NR training
-- runs; and position lists for surgery maps.
local nr = require 'nr'

local M = {}

-- Random BN state and forced dead channels on every non-fixed unit; returns the channels killed
-- and the channels of those units in all.
function M.damage(model, shape, frac)
   local R = require 'nr.rejuvenate'
   local g = R.monitor.graph_of(model, shape)
   for _, m in ipairs(model:listModules()) do
      if m:typename() == 'BatchNorm2d' then
         local c = m.num_features
         m.running_mean:copy(nr.randn({c}):mul_(0.1))
         m.running_var:copy(nr.rand({c}):add_(0.5))
         m.bias:copy(nr.randn({c}):mul_(0.1))
         m.weight:copy(nr.rand({c}):mul_(1.4):add_(0.1))
      end
   end
   local killed, total = 0, 0
   for _, u in ipairs(g.units) do
      if u.bn and not u.fixed then
         local c = u.bn.num_features
         local perm = nr.randperm(c):totable()
         local n = math.min(c - 1, math.floor(c * frac))
         for i = 1, n do u.bn.weight:set(perm[i] + 1, 0) end
         killed, total = killed + n, total + c
      end
   end
   return killed, total
end

-- {name, model spec, input shape}; ResNet-50 runs at 32x32 unless a spec overrides the shape.
M.ZOO = {
   {'VGG-19-CIFAR', {name = 'vgg', depth = 19, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'ResNet-164', {name = 'resnet', depth = 164, dataset = 'cifar10', classes = 10, preact = true}, {3, 8, 8}},
   {'DenseNet-100-40', {name = 'densenet', depth = 100, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'MobileNet-0.25', {name = 'mobilenet', width = 0.25, classes = 10}, {3, 32, 32}},
   {'ResNet-50', {name = 'resnet', depth = 50, classes = 10}, {3, 32, 32}},
}

-- The 3-block BN convnet (1x28x28 in, 10 classes) of the NR training runs, γ starting at 0.2 so a
-- short run can sparsify it (the CIFAR VGG of the paper uses 0.5).
function M.small_net()
   local nn = nr.nn
   local layers = {}
   for _, b in ipairs({{1, 16}, {16, 32}, {32, 32}}) do
      for _, m in ipairs({nn.Conv2d(b[1], b[2], 3, {padding = 1, bias = false}), nn.BatchNorm2d(b[2]), nn.ReLU(),
                          nn.MaxPool2d(2)}) do
         layers[#layers + 1] = m
      end
   end
   layers[#layers + 1] = nn.Flatten()
   layers[#layers + 1] = nn.Linear(32 * 3 * 3, 10)
   local net = nn.Sequential(layers)
   for _, bn in ipairs(net:findModules('BatchNorm2d')) do bn.weight:fill(0.2) end
   net.nr_info = {gamma0 = 0.2}
   return net
end

-- n learnable 1x28x28 samples: noise plus a class-dependent bright square; x (n, 1, 28, 28), y int64.
function M.synthetic(n, seed)
   nr.manual_seed(seed)
   local y = nr.randint(0, 10, {n})
   local x = nr.randn({n, 1, 28, 28}):mul_(0.5)
   local yt = y:totable()
   for i = 1, n do x:narrow(1, i, 1):narrow(3, 2 + 2 * yt[i], 4):narrow(4, 4, 6):add_(2) end
   return x, y
end

-- n distinct positions of 0..m-1, in random order (the global generator).
function M.pick(n, m)
   local perm = nr.randperm(m):totable()
   local out = {}
   for i = 1, n do out[i] = perm[i] end
   return out
end

-- The positions of 0..m-1 not in used, in order.
function M.without(m, used)
   local set, out = {}, {}
   for _, v in ipairs(used) do set[v] = true end
   for i = 0, m - 1 do if not set[i] then out[#out + 1] = i end end
   return out
end

-- A net with one of each layer kind that carries a 4-d activation (conv with bias, grouped conv,
-- BN, ReLU, max and average pooling, a residual block, a channel concat, dropout off, global
-- pooling) for the memory-format specs; input (N, 3, 8, 8), 5 classes.
function M.layout_net()
   local nn = nr.nn
   return nn.Sequential{
      nn.Conv2d(3, 8, 3, {padding = 1}), nn.BatchNorm2d(8), nn.ReLU(),
      nn.Residual(nn.Sequential{nn.Conv2d(8, 8, 3, {padding = 1, groups = 2, bias = false}), nn.BatchNorm2d(8)}),
      nn.MaxPool2d(2),
      nn.Concat{nn.Conv2d(8, 4, 1), nn.Sequential{nn.Conv2d(8, 4, 3, {padding = 1, groups = 4}), nn.Sigmoid()}},
      nn.AvgPool2d(3, {stride = 1, padding = 1}), nn.Dropout(0),
      nn.GlobalAvgPool2d(), nn.Linear(8, 5),
   }
end

return M

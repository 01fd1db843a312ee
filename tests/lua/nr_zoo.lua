-- Shared fixtures of the NR zoo specs (nr_budget_spec, nr_surgery_spec): the five models the
-- issue names, at small inputs, and `damage`, which randomises BN state and forces dead channels.
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
   {'ResNet-164', {name = 'resnet', depth = 164, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'DenseNet-100-40', {name = 'densenet', depth = 100, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'MobileNet-0.25', {name = 'mobilenet', width = 0.25, classes = 10}, {3, 32, 32}},
   {'ResNet-50', {name = 'resnet', depth = 50, classes = 10}, {3, 32, 32}},
}

return M

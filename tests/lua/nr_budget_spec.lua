-- Neural Rejuvenation reallocation on the model zoo: the cost budget.
--
-- On VGG-19-CIFAR, ResNet-164 (CIFAR), DenseNet-100-40 (CIFAR), MobileNet-0.25 and ResNet-50 with
-- half of every prunable layer's channels forced dead, rejuvenating back to the full cost C
-- (shared α solved by bisection on the exact cost) lands within 1% of C, for params and for
-- FLOPs, and the cost the policy planned is the cost of the model that surgery builds. Prints α
-- solved vs the authors' sqrt(C/live).
local nr = require 'nr'

-- Random BN state and forced dead channels on every non-fixed unit.
local function damage(model, shape, frac)
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
   local killed = 0
   for _, u in ipairs(g.units) do
      if u.bn and not u.fixed then
         local c = u.bn.num_features
         local perm = nr.randperm(c):totable()
         local n = math.min(c - 1, math.floor(c * frac))
         for i = 1, n do u.bn.weight:set(perm[i] + 1, 0) end
         killed = killed + n
      end
   end
   return killed
end

local ZOO = {
   {'VGG-19-CIFAR', {name = 'vgg', depth = 19, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'ResNet-164', {name = 'resnet', depth = 164, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'DenseNet-100-40', {name = 'densenet', depth = 100, dataset = 'cifar10', classes = 10}, {3, 8, 8}},
   {'MobileNet-0.25', {name = 'mobilenet', width = 0.25, classes = 10}, {3, 32, 32}},
   {'ResNet-50', {name = 'resnet', depth = 50, classes = 10}, {3, 32, 32}},
}

describe('nr.rejuvenate reallocation budget on the zoo', function()
   for zi, z in ipairs(ZOO) do
      local name, spec, shape = z[1], z[2], z[3]
      it(name .. ': cost after reallocation is within 1% of the target (params and FLOPs)', function()
         nr.manual_seed(200 + zi)
         local base = nr.models.build(spec)
         damage(base, shape, 0.5)
         for _, constraint in ipairs({'params', 'flops'}) do
            local m = base:clone()
            local rep = nr.rejuvenate(m, {input_shape = shape, constraint = constraint})
            print(string.format('%-16s %-6s r %.3f  alpha %.4f (sqrt %.4f)  cost %.4g target %.4g  error %+.3f%%',
               name, constraint, constraint == 'params' and rep.before.r_params or rep.before.r_flops,
               rep.alpha, rep.alpha_sqrt, rep.cost, rep.target_cost, 100 * rep.cost_error))
            assert.is_true(math.abs(rep.cost_error) <= 0.01)
            assert.are.equal(rep.planned_cost, rep.cost)
         end
      end)
   end
end)

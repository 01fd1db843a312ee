-- Neural Rejuvenation reallocation on the model zoo: the cost budget.
--
-- On VGG-19-CIFAR, ResNet-164 (CIFAR), DenseNet-100-40 (CIFAR), MobileNet-0.25 and ResNet-50 with
-- half of every prunable layer's channels forced dead, rejuvenating back to the full cost C
-- (shared α solved by bisection on the exact cost, then single sets rounded up while the budget
-- allows) lands at or below C and within 0.5% of it, for params and for FLOPs, and the cost the policy planned is the cost of the model that surgery builds. Prints α
-- solved vs the authors' sqrt(C/live).
local nr = require 'nr'

local fixtures = require 'tests.lua.nr_zoo'
local damage, ZOO = fixtures.damage, fixtures.ZOO

describe('nr.rejuvenate reallocation budget on the zoo', function()
   for zi, z in ipairs(ZOO) do
      local name, spec, shape = z[1], z[2], z[3]
      it(name .. ': cost after reallocation is at most the target and within 0.5% of it (params and FLOPs)', function()
         nr.manual_seed(200 + zi)
         local base = nr.models.build(spec)
         damage(base, shape, 0.5)
         for _, constraint in ipairs({'params', 'flops'}) do
            local m = base:clone()
            local rep = nr.rejuvenate(m, {input_shape = shape, constraint = constraint})
            print(string.format('%-16s %-6s r %.3f  alpha %.4f (sqrt %.4f)  cost %.4g target %.4g  error %+.3f%%',
               name, constraint, constraint == 'params' and rep.before.r_params or rep.before.r_flops,
               rep.alpha, rep.alpha_sqrt, rep.cost, rep.target_cost, 100 * rep.cost_error))
            assert.is_true(rep.cost <= rep.target_cost, 'cost above the budget')
            assert.is_true(math.abs(rep.cost_error) <= 0.005)
            assert.are.equal(rep.planned_cost, rep.cost)
         end
      end)
   end
end)

-- Neural Rejuvenation surgery on the model zoo: function preservation.
--
-- For VGG-19-CIFAR, ResNet-164 (CIFAR), DenseNet-100-40 (CIFAR), MobileNet-0.25 and ResNet-50,
-- with random weights, random BN statistics and forced dead channels (γ = 0 on about a third of
-- every prunable layer's channels), the eval-mode output of
--   pruned            = rejuvenate with a zero budget (dead channels removed, nothing added)
--   prune+expand+init = rejuvenate back to the full cost (scheme NR, CR and CA)
--   ... + rescale     = the same with neural rescaling
-- agree within 1e-4 relative (max |Δ| / max |y|). (The cost budget is checked in
-- nr_budget_spec.lua.) Small inputs keep the spec short.
local nr = require 'nr'

local TOL = 1e-4

local function rel_err(a, b)
   local d = a:sub(b):abs():max()
   return d / math.max(1e-12, b:abs():max()), d
end

local fixtures = require 'tests.lua.nr_zoo'
local damage = fixtures.damage
-- the fixtures' zoo, with ResNet-50 at 16x16 to keep this spec short
local ZOO = {}
for i, z in ipairs(fixtures.ZOO) do ZOO[i] = z[1] == 'ResNet-50' and {z[1], z[2], {3, 16, 16}} or z end

describe('nr.rejuvenate on the zoo', function()
   for zi, z in ipairs(ZOO) do
      local name, spec, shape = z[1], z[2], z[3]
      it(name .. ': prune+expand+reinit (NR/CR/CA) and rescaling preserve the pruned function', function()
         nr.manual_seed(100 + zi)
         local base = nr.models.build(spec)
         local killed = damage(base, shape, 0.35)
         assert.is_true(killed > 0)
         base:evaluate()
         local x = nr.randn({2, shape[1], shape[2], shape[3]})
         local pruned = base:clone()
         local pr = nr.rejuvenate(pruned, {input_shape = shape, budget = 0})
         assert.is_true(pr.after.params_all < pr.before.params_all)
         local y0 = pruned:forward(x):clone()
         local schemes = {'NR', 'CR', 'CA'}
         for _, scheme in ipairs(schemes) do
            for _, rescale in ipairs({false, true}) do
               -- rescaling is checked once (with CA, the most complex path) to keep the spec short
               if not rescale or scheme == 'CA' then
                  local m = base:clone()
                  local rep = nr.rejuvenate(m, {input_shape = shape, scheme = scheme, rescale = rescale})
                  local y = m:forward(x)
                  local e, d = rel_err(y, y0)
                  if e > TOL then
                     print(string.format('%s %s rescale=%s: rel err %.3g (max |diff| %.3g)', name, scheme, tostring(rescale), e, d))
                  end
                  assert.is_true(e <= TOL)
                  assert.is_true(rep.after.r_params > 0.999)
                  if rescale then assert.is_true(rep.rescaled > 0) end
               end
            end
         end
      end)

   end
end)

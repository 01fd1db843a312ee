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
   {'ResNet-50', {name = 'resnet', depth = 50, classes = 10}, {3, 16, 16}},
}

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

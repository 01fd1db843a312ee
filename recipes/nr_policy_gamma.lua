-- recipes/nr_policy_gamma.lua — Neural Rejuvenation with a custom reallocation policy: new
-- channels go where the survivors' scales are large.
--
--   nrlua recipes/nr_policy_gamma.lua                  # Fashion-MNIST, a few minutes on 2 cores
--
-- The default policy expands every layer's live width by one shared rate α (paper 3.2). This one
-- gives layer i  w_i = live_i · (1 + t · ḡ_i / mean_j ḡ_j), where ḡ_i is the mean |γ| of its
-- survived channels (a layer whose survivors are strong is assumed to need capacity most), and
-- solves t with the same exact-cost bisection (budget.solve) so the cost still meets the budget.
-- Sets with no BN scale (ḡ = 0: fixed convs without BN) get t·1 (the mean). The policy is a
-- plain function of (layers, budget) -> widths, info — see lua/nr/rejuvenate/policy.lua.

local function reallocate(layers, budget)
   local sum, n = 0, 0
   for _, l in ipairs(layers) do
      if l.mean_gamma > 0 then sum, n = sum + l.mean_gamma, n + 1 end
   end
   local mean = n > 0 and sum / n or 1
   local function widths(t)
      local w = {}
      for _, l in ipairs(layers) do
         local rel = l.mean_gamma > 0 and l.mean_gamma / mean or 1
         w[l.id] = math.max(1, math.floor(l.live * (1 + t * rel) + 0.5))
      end
      return w
   end
   local t = budget.solve(widths, 0)
   return widths(t), {t = t, mean_gamma = mean}
end

-- The rest of the recipe (model, data, optimizer, NR settings) is recipes/nr_fashion_mnist.lua.
local recipe = require('nr.train').deep_copy(dofile(debug.getinfo(1, 'S').source:match('^@(.*)/[^/]*$') .. '/nr_fashion_mnist.lua'))
recipe.name = 'nr_policy_gamma'
recipe.nr.policy = {reallocate = reallocate}
return recipe

-- recipes/nr_policy_uniform.lua — Neural Rejuvenation with a uniform reallocation policy: every
-- layer gets the same number of new channels.
--
--   nrlua recipes/nr_policy_uniform.lua                # Fashion-MNIST, a few minutes on 2 cores
--
-- The default policy expands live widths by a shared rate α, so layers with many survivors grow
-- most (paper 3.2, MorphNet's linear expansion). This alternative ignores where the survivors
-- are: w_i = live_i + k for every resizable layer i, with the integer k solved on the exact cost
-- (budget.solve over t, k = floor(t)) so the cost meets the budget. Useful as an ablation of the
-- paper's allocation assumption. See lua/nr/rejuvenate/policy.lua for the policy contract.

local function reallocate(layers, budget)
   local function widths(t)
      local w = {}
      local k = math.floor(t)
      for _, l in ipairs(layers) do w[l.id] = math.max(1, l.live + k) end
      return w
   end
   local t = budget.solve(widths, 0)
   return widths(t), {added = math.floor(t)}
end

-- The rest of the recipe (model, data, optimizer, NR settings) is recipes/nr_fashion_mnist.lua.
local recipe = require('nr.train').deep_copy(dofile(debug.getinfo(1, 'S').source:match('^@(.*)/[^/]*$') .. '/nr_fashion_mnist.lua'))
recipe.name = 'nr_policy_uniform'
recipe.nr.policy = {reallocate = reallocate}
return recipe

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
local nr = require 'nr'

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

local function model(recipe)
   local nn = nr.nn
   local layers = {}
   for _, b in ipairs({{1, 32}, {32, 64}, {64, 128}}) do
      layers[#layers + 1] = nn.Conv2d(b[1], b[2], 3, {padding = 1, bias = false})
      layers[#layers + 1] = nn.BatchNorm2d(b[2])
      layers[#layers + 1] = nn.ReLU()
      layers[#layers + 1] = nn.MaxPool2d(2)
   end
   layers[#layers + 1] = nn.GlobalAvgPool2d()
   layers[#layers + 1] = nn.Linear(128, recipe.classes or 10)
   local net = nn.Sequential(layers)
   for _, bn in ipairs(net:findModules('BatchNorm2d')) do bn.weight:fill(0.5) end
   net.nr_info = {gamma0 = 0.5, input_channels = 1, input_size = 28}
   return net
end

return {
   name     = 'nr_policy_uniform',
   model    = model,
   classes  = 10,
   data     = {dataset = 'fashion-mnist', root = '/usr/share/datasets/fashion-mnist', batch = 128, threads = 1},
   optim    = {name = 'sgd', lr = 0.1, momentum = 0.9, weight_decay = 1e-4},
   schedule = {name = 'cosine', warmup = 0},
   epochs   = 6,
   nr       = {
      target = 0.5, budget = 1.0, constraint = 'params', scheme = 'NR', rescale = true, times = 1,
      lambda = {mode = 'adaptive', init = 0, dt = 100, dr = 0.01, dl = 2e-4},
      policy = {reallocate = reallocate},
   },
   device   = 'auto', seed = 1,
}

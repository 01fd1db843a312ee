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
local nr = require 'nr'

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
   name     = 'nr_policy_gamma',
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

-- nr.optim — optimizers. nr.optim.SGD(module_or_groups, config) (lua/nr/optim/sgd.lua);
-- nr.optim.param_groups(model, {no_decay_bn_bias = true}) builds groups (no weight decay on
-- biases and normalization parameters); nr.optim.build(cfg, model) makes the optimizer a
-- recipe's `optim` table names ({name = 'sgd', lr = ..., ...}).
-- Every optimizer offers: step(), zero_grad(), config (writable), state()/load_state(t) keyed by
-- parameter names, state_of(p)/set_state_of(p, t), refresh() (docs/ARCHITECTURE.md).
local check = require 'nr.check'
local SGD = require 'nr.optim.sgd'

local M = {}
M.SGD = SGD
M.param_groups = SGD.param_groups

local BUILDERS = {sgd = SGD}

function M.build(cfg, model)
   check.arg(type(cfg) == 'table', 'nr.optim.build', 'optim config must be a table')
   check.arg(cfg.name == nil or type(cfg.name) == 'string', 'nr.optim.build', 'name must be a string, got %s', check.show(cfg.name))
   local name = (cfg.name or 'sgd'):lower()
   local cls = BUILDERS[name]
   if not cls then
      local names = {}
      for k in pairs(BUILDERS) do names[#names + 1] = k end
      table.sort(names)
      error(string.format('nr.optim: unknown optimizer %q (available: %s)', name, table.concat(names, ', ')), 2)
   end
   local c = {}
   for k, v in pairs(cfg) do if k ~= 'name' then c[k] = v end end
   return cls(model, c)
end

return M

-- nr.optim — optimizers. nr.optim.SGD(module_or_groups, config) (lua/nr/optim/sgd.lua),
-- nr.optim.Adam and nr.optim.AdamW (adam.lua), all nr.optim.Optimizer (optimizer.lua);
-- nr.optim.param_groups(model, {no_decay_bn_bias = true}) builds groups (no weight decay on
-- biases and normalization parameters); nr.optim.build(cfg, model) makes the optimizer a
-- recipe's `optim` table names ({name = 'sgd', lr = ..., ...}); nr.optim.clip_grad_norm(target,
-- max_norm) clips gradients by their total norm (clip.lua).
-- Every optimizer offers: step(), zero_grad(), config (writable), state()/load_state(t) keyed by
-- parameter names, state_of(p)/set_state_of(p, t), refresh() (docs/ARCHITECTURE.md).
local check = require 'nr.check'
local Optimizer = require 'nr.optim.optimizer'
local SGD = require 'nr.optim.sgd'
local adam = require 'nr.optim.adam'

local M = {}
M.Optimizer = Optimizer
M.SGD = SGD
M.Adam = adam.Adam
M.AdamW = adam.AdamW
M.param_groups = Optimizer.param_groups
M.clip_grad_norm = require 'nr.optim.clip'

local BUILDERS = {sgd = SGD, adam = adam.Adam, adamw = adam.AdamW}

-- A recipe's optim table is filled from these when it names the optimizer (nr.train.resolve; sgd's
-- are nr.train.DEFAULTS.optim): each class's own defaults (Adam and AdamW: PyTorch's) with its
-- name, no_decay_bn_bias off, and sgd as the paper trains (lr 0.1, momentum 0.9, weight decay 5e-4).
M.RECIPE_DEFAULTS = {}
for key, cls in pairs(BUILDERS) do
   local d = {name = key, no_decay_bn_bias = false}
   for k, v in pairs(cls.DEFAULTS) do d[k] = v end
   M.RECIPE_DEFAULTS[key] = d
end
for k, v in pairs({lr = 0.1, momentum = 0.9, weight_decay = 5e-4}) do M.RECIPE_DEFAULTS.sgd[k] = v end

-- The config keys of the optimizer named name (case-insensitive), or nil for an unknown name.
function M.config_keys(name)
   local cls = type(name) == 'string' and BUILDERS[name:lower()]
   return cls and cls.CONFIG_KEYS or nil
end

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
   local c, foreign = {}, {}
   for k, v in pairs(cfg) do
      if k ~= 'name' then c[k] = v end
      if not cls.CONFIG_KEYS[k] then
         local owners = {}
         for other, ocls in pairs(BUILDERS) do
            if ocls.CONFIG_KEYS[k] then owners[#owners + 1] = other end
         end
         table.sort(owners)
         if #owners > 0 then foreign[#foreign + 1] = string.format('%s (%s)', k, table.concat(owners, '/') .. "'s") end
      end
   end
   -- e.g. --optim.name adamw on a recipe that sets sgd's momentum: say so, not "unknown option"
   if #foreign > 0 then
      table.sort(foreign)
      error(string.format('nr.optim: %s takes no %s; remove %s from the optim table (or the --optim flags)', name,
         table.concat(foreign, ', '), #foreign > 1 and 'them' or 'it'), 2)
   end
   return cls(model, c)
end

return M

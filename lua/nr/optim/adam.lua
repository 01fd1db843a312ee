-- nr.optim.Adam and nr.optim.AdamW — Adam (Kingma & Ba) with PyTorch's torch.optim.Adam / AdamW
-- semantics (amsgrad too): Adam adds weight_decay * param to the gradient (L2), AdamW decays the
-- parameter itself (param *= 1 - lr * weight_decay, Loshchilov & Hutter). One fused C call per
-- parameter group (nr_adam_step_many, core/optim.c; one kernel launch on CUDA).
--
-- What it is: the settings and the step; groups, state, serialization and the surgery API are
-- nr.optim.Optimizer's (optimizer.lua). State per parameter, as PyTorch's: exp_avg (a running
-- average of gradients), exp_avg_sq (of their squares) and step (the parameter's own count, for
-- the bias corrections; it restarts when the state is dropped).
-- NR note: after nr.rejuvenate with optim_state = 'remap' the surviving channels keep their
-- moments and step; new channels start with zero moments under the parameter's step count, so
-- their first updates are larger than a fresh Adam's (up to ~(1 - beta1) / sqrt(1 - beta2) x lr
-- and more while exp_avg_sq warms up); optim_state = 'drop' restarts every moment and step.
local Optimizer = require 'nr.optim.optimizer'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local C = nrffi.C
local ffi = nrffi.ffi

-- A value as the betas error shows it: a list's items, else check.show's form.
local function show_list(v)
   if type(v) ~= 'table' then return check.show(v) end
   local parts = {}
   for k, x in pairs(v) do parts[#parts + 1] = (type(k) == 'number' and '' or (tostring(k) .. ' = ')) .. check.show(x) end
   return '{' .. table.concat(parts, ', ') .. '}'
end

local SPEC = {
   CONFIG_KEYS = {name = true, lr = true, betas = true, eps = true, weight_decay = true, amsgrad = true,
                  no_decay_bn_bias = true},
   GROUP_KEYS = {params = true, grads = true, lr = true, lr_mult = true, betas = true, eps = true,
                 weight_decay = true, amsgrad = true, name = true},
   SETTINGS = {'lr', 'lr_mult', 'eps', 'weight_decay'},
   REQUIRED = {lr = true, eps = true, weight_decay = true},
   -- max_exp_avg_sq: amsgrad's running maximum of exp_avg_sq (only with amsgrad)
   STATE = {{key = 'exp_avg', power = 1}, {key = 'exp_avg_sq', power = 2}, {key = 'max_exp_avg_sq', power = 2}},
   SCALARS = {step = true},
}

local function make(name, key, decoupled, weight_decay)
   local spec = {DEFAULTS = {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = weight_decay, amsgrad = false},
                 DECOUPLED = decoupled and 1 or 0}
   for k, v in pairs(SPEC) do spec[k] = v end
   local cls = Optimizer.subclass(name, key, spec)

   function cls:validate_extra(t, prefix, fname, is_config)
      local b = t.betas
      if b ~= nil or is_config then
         -- each below 1 also as a float (the C step multiplies by float(beta): 0.99999999 is 1 there)
         local function beta(v) return type(v) == 'number' and v >= 0 and v < 1 and tonumber(ffi.new('float', v)) < 1 end
         check.arg(type(b) == 'table' and #b == 2 and next(b, 2) == nil and beta(b[1]) and beta(b[2]), fname,
            '%sbetas must be two numbers in [0, 1) such as {0.9, 0.999}, got %s', prefix, show_list(b))
      end
      check.arg(t.amsgrad == nil or type(t.amsgrad) == 'boolean', fname, '%samsgrad must be true or false, got %s', prefix,
         check.show(t.amsgrad))
   end

   function cls:settings(g)
      local b = self:setting(g, 'betas')
      return {lr = self:group_lr(g), beta1 = b[1], beta2 = b[2], eps = self:setting(g, 'eps'),
              weight_decay = self:setting(g, 'weight_decay'), amsgrad = self:setting(g, 'amsgrad') == true}
   end

   function cls:check_group(g, s)
      local jb = self:job_batch(g, 'nr_adam_job')
      local arr, n = jb.arr, 0
      self:each_stepped(g, function(p, grad)
         local m, v = self:buffer(p, 'exp_avg'), self:buffer(p, 'exp_avg_sq')
         local st = self:state_table(p)
         arr[n].param, arr[n].grad, arr[n].exp_avg, arr[n].exp_avg_sq = p.c, grad.c, m.c, v.c
         arr[n].max_exp_avg_sq = s.amsgrad and self:buffer(p, 'max_exp_avg_sq').c or nil
         arr[n].step = (st.step or 0) + 1
         n = n + 1
         jb.states[n] = st
      end)
      if C.nr_adam_check_many(arr, n, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay) ~= 0 then self:step_error(g) end
      jb.n = n
      return jb
   end

   function cls:run_group(jb, s)
      local rc = C.nr_adam_step_many(jb.arr, jb.n, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, self.DECOUPLED)
      if rc == 0 then
         for k = 1, jb.n do jb.states[k].step = tonumber(jb.arr[k - 1].step) end
      end
      for k = 1, jb.n do jb.states[k] = nil end   -- (the array outlives the step: drop its references)
      return rc
   end

   return cls
end

-- Adam(module_or_groups, config): lr (1e-3), betas ({0.9, 0.999}), eps (1e-8), weight_decay (0,
-- L2 through the gradient), amsgrad (false), no_decay_bn_bias (false; with a module).
local M = {}
M.Adam = make('Adam', 'adam', false, 0)
-- AdamW(module_or_groups, config): as Adam, weight_decay (1e-2) decoupled.
M.AdamW = make('AdamW', 'adamw', true, 1e-2)
return M

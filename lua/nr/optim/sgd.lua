-- nr.optim.SGD — stochastic gradient descent with momentum, Nesterov and weight decay, PyTorch's
-- torch.optim.SGD semantics (dampening 0); the update is one fused C call per parameter group
-- (nr_sgd_step_many, core/optim.c: one kernel launch for the whole group on CUDA).
--
-- What it is: the settings and the step; groups, state, serialization and the surgery API are
-- nr.optim.Optimizer's (optimizer.lua). State per parameter: momentum (a running sum of
-- gradients), zero-filled when created, which makes the first step set buf = grad exactly as
-- torch.optim.SGD does. What it is not: a schedule (nr.schedule sets opt.config.lr).
local Optimizer = require 'nr.optim.optimizer'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local C = nrffi.C

-- SGD(module_or_groups, config). config: lr (required), momentum (0), weight_decay (0),
-- nesterov (false), dampening (0 only), no_decay_bn_bias (false; with a module).
local SGD = Optimizer.subclass('SGD', 'sgd', {
   DEFAULTS = {momentum = 0, weight_decay = 0, nesterov = false},
   CONFIG_KEYS = {name = true, lr = true, momentum = true, weight_decay = true, nesterov = true,
                  dampening = true, no_decay_bn_bias = true},
   GROUP_KEYS = {params = true, grads = true, lr = true, lr_mult = true, momentum = true,
                 weight_decay = true, nesterov = true, name = true},
   SETTINGS = {'lr', 'lr_mult', 'momentum', 'weight_decay'},
   REQUIRED = {lr = true, momentum = true, weight_decay = true},
   STATE = {{key = 'momentum', power = 1}},
   SCALARS = {},
})

function SGD:validate_extra(t, prefix, fname, is_config)
   check.arg(t.nesterov == nil or type(t.nesterov) == 'boolean', fname, '%snesterov must be a boolean, got %s',
      prefix, check.show(t.nesterov))
   if is_config then
      check.arg((t.dampening or 0) == 0, fname, 'config.dampening: only 0 is supported, got %s', check.show(t.dampening))
      check.arg(not t.nesterov or t.momentum > 0, fname, 'config.nesterov needs momentum > 0')
   end
end

-- Effective settings of group g at this step.
function SGD:settings(g)
   local mom, nest = self:setting(g, 'momentum'), self:setting(g, 'nesterov')
   -- without momentum there is no Nesterov term (PyTorch: a group with momentum 0 under a
   -- nesterov config steps as plain SGD)
   return {lr = self:group_lr(g), momentum = mom, weight_decay = self:setting(g, 'weight_decay'),
           nesterov = (nest and mom > 0) and 1 or 0}
end

function SGD:check_group(g, s)
   local jb = self:job_batch(g, 'nr_sgd_job')
   local arr, n = jb.arr, 0
   self:each_stepped(g, function(p, grad)
      local buf = s.momentum ~= 0 and self:buffer(p, 'momentum') or nil
      arr[n].param, arr[n].grad, arr[n].momentum_buf = p.c, grad.c, buf and buf.c or nil
      n = n + 1
   end)
   if C.nr_sgd_check_many(arr, n, s.momentum, s.weight_decay, s.nesterov) ~= 0 then self:step_error(g) end
   jb.n = n
   return jb
end

function SGD:run_group(jb, s)
   return C.nr_sgd_step_many(jb.arr, jb.n, s.lr, s.momentum, s.weight_decay, s.nesterov)
end

return SGD

-- nr.optim.SGD — stochastic gradient descent with momentum, Nesterov and weight decay; the update
-- itself is one fused C call per parameter group (nr_sgd_step_many, core/optim.c: one kernel
-- launch for the whole group on CUDA), PyTorch semantics.
--
-- What it is: parameter groups with their own settings, per-parameter state (the momentum
-- buffer), serialization keyed by parameter names, and the surgery API NR relies on
-- (state_of / set_state_of / refresh).  What it is not: a schedule (nr.schedule sets
-- opt.config.lr) or a gradient producer (the module's backward fills the gradients).
-- Invariants:
--   * opt.config is read at every step, so writing opt.config.lr (or any field) takes effect at
--     the next step. A group's own setting overrides config; a group's lr_mult scales config.lr.
--   * state is keyed by the parameter tensor object; momentum buffers are zero-filled when
--     created, which makes the first step set buf = grad exactly as torch.optim.SGD does.
--   * if the model's parameter tensors change (surgery) the next step raises an error asking
--     for opt:refresh() instead of silently updating stale tensors.
local class = require 'nr.class'
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local C = nrffi.C

local SGD = class('SGD')

local CONFIG_KEYS = {name = true, lr = true, momentum = true, weight_decay = true, nesterov = true,
                     dampening = true, no_decay_bn_bias = true}
local GROUP_KEYS = {params = true, grads = true, lr = true, lr_mult = true, momentum = true,
                    weight_decay = true, nesterov = true, name = true}
local GRAD_FIELD = {weight = 'gradWeight', bias = 'gradBias'}

local function is_module(x) return type(x) == 'table' and type(x.namedParameters) == 'function' end

-- Parameters that get no weight decay under no_decay_bn_bias: every bias and the affine
-- parameters (γ, β) of normalization layers.
local function is_bn_or_bias(e)
   if e.field == 'bias' then return true end
   local tn = e.module and e.module.typename and e.module:typename() or ''
   return tn:match('Norm') ~= nil
end

-- nr.optim.param_groups(model, {no_decay_bn_bias = true}) -> groups usable by SGD; the groups
-- remember the model and the rule, so opt:refresh() can re-derive them after surgery.
local function param_groups(model, opts)
   check.arg(is_module(model), 'nr.optim.param_groups', 'model must be an nr.nn module')
   opts = check.options(opts, {no_decay_bn_bias = true}, 'nr.optim.param_groups')
   local rule
   if opts.no_decay_bn_bias then
      rule = function(e) return is_bn_or_bias(e) and 2 or 1 end
   else
      rule = function() return 1 end
   end
   local groups = {model = model, rule = rule, {params = {}, name = 'decay'}}
   if opts.no_decay_bn_bias then groups[2] = {params = {}, weight_decay = 0, name = 'no_decay'} end
   for _, e in ipairs(model:namedParameters()) do
      local g = groups[rule(e)]
      g.params[#g.params + 1] = e
   end
   return groups
end
SGD.param_groups = param_groups

-- A finite number >= 0: an inf or NaN lr, momentum, weight decay or lr_mult turns the weights
-- into inf/NaN at the first step.
local function nonneg(v) return type(v) == 'number' and v >= 0 and v < math.huge end
local show = check.show

-- Checks the numeric and boolean settings of t: opt.config (prefix "config.", lr, momentum and
-- weight_decay required) or a group's own (prefix "group N: ", each optional).
local SETTINGS = {'lr', 'lr_mult', 'momentum', 'weight_decay'}
local REQUIRED = {lr = true, momentum = true, weight_decay = true}
local function validate_settings(t, prefix, fname, required)
   for _, k in ipairs(SETTINGS) do
      local v = t[k]
      if v ~= nil or (required and required[k]) then
         check.arg(nonneg(v), fname, '%s%s must be a finite number >= 0, got %s', prefix, k, show(v))
      end
   end
   check.arg(t.nesterov == nil or type(t.nesterov) == 'boolean', fname, '%snesterov must be a boolean, got %s',
      prefix, show(t.nesterov))
end

-- Normalizes one parameter entry into {name, param, grad | module+gfield}.
local function entry_of(e, group, gi, pi)
   if T.is_tensor(e) then
      local grads = group.grads
      check.arg(type(grads) == 'table' and T.is_tensor(grads[pi]), 'nr.optim.SGD',
         'group %d: parameter %d is a bare tensor; give its gradient in group.grads[%d] (or pass a module)', gi, pi, pi)
      return {name = string.format('group%d.%d', gi, pi), param = e, grad = grads[pi]}
   end
   check.arg(type(e) == 'table' and T.is_tensor(e.param), 'nr.optim.SGD',
      'group %d: parameter %d must be a tensor or a namedParameters() entry', gi, pi)
   local out = {name = e.name or string.format('group%d.%d', gi, pi), param = e.param, grad = e.grad,
                module = e.module, field = e.field}
   if e.module and e.field then out.gfield = GRAD_FIELD[e.field] or ('grad' .. e.field:sub(1, 1):upper() .. e.field:sub(2)) end
   return out
end

local function build_groups(self, spec)
   local groups = {}
   for gi, g in ipairs(spec) do
      check.arg(type(g) == 'table' and type(g.params) == 'table', 'nr.optim.SGD', 'group %d must be a table with params = {...}', gi)
      for k in pairs(g) do
         check.arg(GROUP_KEYS[k] ~= nil, 'nr.optim.SGD', 'group %d: unknown setting %q', gi, tostring(k))
      end
      validate_settings(g, string.format('group %d: ', gi), 'nr.optim.SGD')
      local out = {params = {}}
      for k, v in pairs(g) do if k ~= 'params' and k ~= 'grads' then out[k] = v end end
      for pi, e in ipairs(g.params) do out.params[pi] = entry_of(e, g, gi, pi) end
      groups[gi] = out
   end
   self.groups = groups
   self._by_name = {}
   self._present = {}
   for _, g in ipairs(groups) do
      for _, e in ipairs(g.params) do
         check.arg(self._by_name[e.name] == nil, 'nr.optim.SGD', 'parameter name %q appears twice', e.name)
         -- one tensor stepped twice per step (PyTorch: "some parameters appear in more than one
         -- parameter group"); on a GPU the two updates would also race in one launch
         local prev = self._present[e.param]
         check.arg(prev == nil, 'nr.optim.SGD', 'parameter %q is the same tensor as %q: list each parameter once',
            e.name, prev and prev.name or '')
         self._by_name[e.name] = e
         self._present[e.param] = e
      end
   end
end

local function validate_config(cfg, fname)
   check.options(cfg, CONFIG_KEYS, fname)
   validate_settings(cfg, 'config.', fname, REQUIRED)
   check.arg((cfg.dampening or 0) == 0, fname, 'config.dampening: only 0 is supported, got %s', check.show(cfg.dampening))
   check.arg(not cfg.nesterov or cfg.momentum > 0, fname, 'config.nesterov needs momentum > 0')
end

-- SGD(module_or_groups, config). config: lr (required), momentum (0), weight_decay (0),
-- nesterov (false), dampening (0 only), no_decay_bn_bias (false; with a module).
-- The module standing where m stood: m itself (replaced = false), or the replacement of m or of
-- its nearest replaced ancestor (surgery sets _replaced_by on the module it swaps out; a swapped
-- out NRConv2d's blocks are reached through their parent).
local function replacement_of(m)
   local node = m
   while node do
      if rawget(node, '_replaced_by') then
         local r = node
         while rawget(r, '_replaced_by') do r = rawget(r, '_replaced_by') end
         return r, true
      end
      node = rawget(node, '_parent')
   end
   return m, false
end

-- How many times layers of the model's tree were replaced (nr.rejuvenate's surgery counts them on
-- the root): a change means the parameters this optimizer read may be orphaned.
local function structure_of(model)
   return model and type(model.root) == 'function' and model:root():transient().structure or nil
end

function SGD:__init(target, config)
   config = config or {}
   check.arg(type(config) == 'table', 'nr.optim.SGD', 'config must be a table')
   local cfg = {}
   for k, v in pairs(config) do cfg[k] = v end
   cfg.momentum = cfg.momentum or 0
   cfg.weight_decay = cfg.weight_decay or 0
   cfg.nesterov = cfg.nesterov or false
   validate_config(cfg, 'nr.optim.SGD')
   self.config = cfg
   self.t = 0          -- steps taken
   self.state_ = {}    -- [param tensor] = {momentum = T}
   if is_module(target) then
      self.model = target
      self.spec = param_groups(target, {no_decay_bn_bias = cfg.no_decay_bn_bias or nil})
   else
      check.arg(type(target) == 'table' and #target > 0, 'nr.optim.SGD',
         'first argument must be a module or a non-empty list of parameter groups')
      self.model = target.model
      self.spec = target
   end
   build_groups(self, self.spec)
   self.structure = structure_of(self.model)
end

-- Effective settings of group g at this step.
local function settings(self, g)
   local c = self.config
   local lr = g.lr or c.lr * (g.lr_mult or 1)
   local mom = g.momentum or c.momentum
   local wd = g.weight_decay or c.weight_decay
   local nest = g.nesterov
   if nest == nil then nest = c.nesterov end
   -- without momentum there is no Nesterov term (PyTorch: a group with momentum 0 under a
   -- nesterov config steps as plain SGD)
   return lr, mom, wd, (nest and mom > 0) and 1 or 0
end

local function resolve(e)
   if e.module then
      local p = e.module[e.field]
      if p ~= e.param then
         error(string.format('nr.optim.SGD: parameter %s was replaced (model surgery?); call opt:refresh() first', e.name), 3)
      end
      return p, e.module[e.gfield]
   end
   return e.param, e.grad
end

local function buffer_for(self, p)
   local st = self.state_[p]
   if not st then
      st = {}
      self.state_[p] = st
   end
   if not (st.momentum and rawget(st.momentum, 'c')) then -- none yet, or freed by its user: start again
      st.momentum = T.zeros(p:shape(), {device = p:device()})
   end
   return st.momentum
end

-- Per group: the nr_sgd_job array handed to C (reused while the group's size stays). Weak keys:
-- a dropped group takes its array with it.
local JOBS = setmetatable({}, {__mode = 'k'})
local job_array = nrffi.ffi.typeof('nr_sgd_job[?]')

-- Raises the C message of group g's failed check or step, naming the parameter of its job.
local function step_error(g)
   local msg = nrffi.ffi.string(C.nr_last_error())
   -- job k is the (k+1)-th entry that has a gradient: name it
   local k, name = tonumber(msg:match('%(job (%d+)%)')), nil
   for _, e in ipairs(g.params) do
      if k and select(2, resolve(e)) then
         if k == 0 then name = e.name break end
         k = k - 1
      end
   end
   error('SGD:step' .. (name and (' (' .. name .. ')') or '') .. ': ' .. msg, 3)
end

function SGD:step()
   validate_config(self.config, 'SGD:step')
   -- surgery (nr.rejuvenate) replaced the model's layers: stepping the old tensors would train nothing
   if self.model and structure_of(self.model) ~= self.structure then
      error('SGD:step: the model\'s layers were replaced (nr.rejuvenate) after this optimizer read them; pass '
         .. 'optimizer = opt to nr.rejuvenate (remaps momentum) or call opt:refresh()', 2)
   end
   -- every group is checked (its settings, then C's checks of its tensors) before any steps, so a
   -- refused step leaves every parameter, buffer and the step count as they were
   for gi, g in ipairs(self.groups) do
      validate_settings(g, string.format('group %d: ', gi), 'SGD:step')   -- opt.groups[i] is writable too
      local lr, mom, wd, nest = settings(self, g)
      local jb = JOBS[g]
      if not jb or jb.cap < #g.params then
         jb = {cap = #g.params, arr = job_array(math.max(1, #g.params))}
         JOBS[g] = jb
      end
      local arr, n = jb.arr, 0
      for _, e in ipairs(g.params) do
         local p, grad = resolve(e)
         if grad then
            local buf = mom ~= 0 and buffer_for(self, p) or nil
            arr[n].param, arr[n].grad, arr[n].momentum_buf = p.c, grad.c, buf and buf.c or nil
            n = n + 1
         end
      end
      if C.nr_sgd_check_many(arr, n, mom, wd, nest) ~= 0 then step_error(g) end
      jb.n, jb.lr, jb.mom, jb.wd, jb.nest = n, lr, mom, wd, nest -- this step's, for the pass below
   end
   for _, g in ipairs(self.groups) do
      local jb = JOBS[g]
      if C.nr_sgd_step_many(jb.arr, jb.n, jb.lr, jb.mom, jb.wd, jb.nest) ~= 0 then step_error(g) end
   end
   self.t = self.t + 1
end

function SGD:zero_grad()
   for _, g in ipairs(self.groups) do
      for _, e in ipairs(g.params) do
         local _, grad = resolve(e)
         if grad then grad:zero() end
      end
   end
end

-- Learning rate of group i (default 1) as the next step will use it.
function SGD:lr(i)
   local g = self.groups[i or 1]
   return (settings(self, g))
end

-- ---- per-parameter state (NR surgery) ----------------------------------------------------------

-- {momentum = T} for a parameter, or nil when it has none yet.
function SGD:state_of(param)
   local st = self.state_[param]
   if not st or not st.momentum then return nil end
   return {momentum = st.momentum}
end

-- Sets a parameter's state: tbl.momentum is a tensor of the parameter's shape (or nil to drop).
-- The parameter need not be in the groups yet (call refresh() after surgery; order is free).
function SGD:set_state_of(param, tbl)
   check.arg(T.is_tensor(param), 'SGD:set_state_of', 'param must be a tensor')
   if tbl == nil or tbl.momentum == nil then
      self.state_[param] = nil
      return
   end
   local m = tbl.momentum
   check.arg(T.is_tensor(m) and T.same_shape(m:shape(), param:shape()), 'SGD:set_state_of',
      'momentum must be a tensor of shape [%s], got %s', table.concat(param:shape(), ' x '),
      T.is_tensor(m) and m:describe() or type(m))
   if m:device() ~= param:device() or m:dtype() ~= 'float32' or not m:is_contiguous() then
      m = T.empty(param:shape(), {device = param:device()}):copy(m)
   end
   self.state_[param] = {momentum = m}
end

-- Re-reads the model's parameters (after surgery); state of parameters no longer present is
-- dropped. Groups given as plain lists (no model) are kept as they are.
function SGD:refresh()
   if self.model and self.spec.rule then
      self.spec = param_groups(self.model, {no_decay_bn_bias = (self.spec[2] ~= nil) or nil})
   elseif self.model then
      -- custom groups over a model: re-resolve entries by module/field; an entry whose module (or
      -- an ancestor: the blocks of a replaced NRConv2d) was replaced by surgery becomes the
      -- same-field parameters of the replacement (a Conv2d's weight -> every block's weight of
      -- the NRConv2d that replaced it), each once per group
      for _, g in ipairs(self.spec) do
         local params, seen = {}, {}
         local function add(e)
            if e.param == nil or not seen[e.param] then
               if e.param ~= nil then seen[e.param] = true end
               params[#params + 1] = e
            end
         end
         for _, e in ipairs(g.params) do
            if type(e) == 'table' and e.module and e.field then
               local m, replaced = replacement_of(e.module)
               if not replaced then
                  add({name = e.name, param = m[e.field], grad = m[GRAD_FIELD[e.field] or e.field], module = m, field = e.field})
               else
                  for _, ne in ipairs(m:namedParameters()) do
                     if ne.field == e.field then
                        add({name = ne.module:path() .. '.' .. ne.field, param = ne.param, grad = ne.grad, module = ne.module,
                             field = ne.field})
                     end
                  end
               end
            else
               add(e)
            end
         end
         g.params = params
      end
   end
   -- keep group-level settings the user may have changed on opt.groups
   local old = self.groups
   build_groups(self, self.spec)
   self.structure = structure_of(self.model)
   for i, g in ipairs(self.groups) do
      if old[i] then
         for k, v in pairs(old[i]) do if k ~= 'params' then g[k] = v end end
      end
   end
   for p in pairs(self.state_) do
      if not self._present[p] then self.state_[p] = nil end
   end
end

-- Names of the parameters, in group order.
function SGD:names()
   local out = {}
   for _, g in ipairs(self.groups) do for _, e in ipairs(g.params) do out[#out + 1] = e.name end end
   return out
end

-- ---- serialization ------------------------------------------------------------------------------

-- {name='sgd', t=, config={...}, groups={{settings..., param_names = {...}}},
-- params={[name]={momentum=T}}}. Tensors are the live buffers (the checkpoint writer copies them out).
function SGD:state()
   local cfg = {}
   for k, v in pairs(self.config) do cfg[k] = v end
   local groups = {}
   for i, g in ipairs(self.groups) do
      local s = {param_names = {}} -- which parameters the settings belong to (checked on load)
      for k, v in pairs(g) do if k ~= 'params' then s[k] = v end end
      for j, e in ipairs(g.params) do s.param_names[j] = e.name end
      groups[i] = s
   end
   local params = {}
   for _, g in ipairs(self.groups) do
      for _, e in ipairs(g.params) do
         local st = self.state_[e.param]
         if st and st.momentum then params[e.name] = {momentum = st.momentum} end
      end
   end
   return {name = 'sgd', t = self.t, config = cfg, groups = groups, params = params}
end

-- Restores a state() table. Momentum buffers are copied into fresh tensors on each parameter's
-- device. Everything is checked before anything changes (as PyTorch's load_state_dict), so a
-- refused state leaves the optimizer as it was: a name missing from the model, a shape
-- mismatch, groups that do not match this optimizer's (their number, or the parameters a
-- group's settings belong to) are errors naming what differs.
function SGD:load_state(s)
   local F = 'SGD:load_state'
   check.arg(type(s) == 'table', F, 'state must be a table')
   check.arg(s.name == nil or s.name == 'sgd', F, 'state is for optimizer %q, not sgd', tostring(s.name))
   local config
   if s.config ~= nil then
      check.arg(type(s.config) == 'table', F, 'state.config must be a table, got %s', type(s.config))
      config = {}
      for k, v in pairs(self.config) do config[k] = v end
      for k, v in pairs(s.config) do config[k] = v end
      validate_config(config, F)
   end
   local groups
   if s.groups ~= nil then
      check.arg(type(s.groups) == 'table' and #s.groups == #self.groups, F,
         'state has %s parameter groups, this optimizer %d', type(s.groups) == 'table' and #s.groups or '?', #self.groups)
      groups = {}
      for i, gs in ipairs(s.groups) do
         check.arg(type(gs) == 'table', F, 'state.groups[%d] must be a table', i)
         local g, names = self.groups[i], gs.param_names
         if names ~= nil then
            check.arg(type(names) == 'table' and #names == #g.params, F, 'group %d holds %d parameters, the state\'s %s',
               i, #g.params, type(names) == 'table' and #names or '?')
            for j, e in ipairs(g.params) do
               check.arg(names[j] == e.name, F, 'group %d, parameter %d is %s, the state\'s is %s', i, j, e.name,
                  tostring(names[j]))
            end
         end
         local merged = {}
         for k, v in pairs(g) do if k ~= 'params' then merged[k] = v end end
         for k, v in pairs(gs) do
            if k ~= 'param_names' then
               check.arg(GROUP_KEYS[k] ~= nil and k ~= 'params' and k ~= 'grads', F, 'state.groups[%d]: unknown setting %q', i,
                  tostring(k))
               merged[k] = v
            end
         end
         validate_settings(merged, string.format('group %d: ', i), F)
         groups[i] = merged
      end
   end
   -- a string or NaN failed at the next step as "attempt to perform arithmetic on field 't'"
   if s.t ~= nil then check.int(s.t, F, 'state.t', 0) end
   check.arg(s.params == nil or type(s.params) == 'table', F, 'state.params must be a table, got %s', type(s.params))
   for name, st in pairs(s.params or {}) do
      local e = self._by_name[name]
      check.arg(e ~= nil, F, 'saved state for parameter %q, which the model does not have', name)
      check.arg(type(st) == 'table', F, '%s: state must be a table, got %s', name, type(st))
      local m = st.momentum
      check.arg(m == nil or (T.is_tensor(m) and T.same_shape(m:shape(), e.param:shape())), F,
         '%s: momentum has shape [%s] but the parameter is [%s]', name,
         T.is_tensor(m) and table.concat(m:shape(), ' x ') or '?', table.concat(e.param:shape(), ' x '))
   end
   -- checked: now change
   local fresh = {}
   for name, st in pairs(s.params or {}) do
      local e = self._by_name[name]
      if st.momentum then fresh[e.param] = {momentum = T.empty(e.param:shape(), {device = e.param:device()}):copy(st.momentum)} end
   end
   if config then for k, v in pairs(config) do self.config[k] = v end end -- the same table (others hold it)
   if groups then
      for i, merged in ipairs(groups) do
         local g = self.groups[i]
         for k, v in pairs(merged) do g[k] = v end
      end
   end
   self.t = s.t or 0
   self.state_ = fresh
end

return SGD

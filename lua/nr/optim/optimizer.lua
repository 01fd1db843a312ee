-- nr.optim.Optimizer — what every optimizer shares: parameter groups with their own settings,
-- per-parameter state, serialization keyed by parameter names, and the surgery API NR relies on
-- (state_of / set_state_of / refresh). SGD (sgd.lua) and Adam / AdamW (adam.lua) are subclasses
-- that say which settings they take and how one group steps (one fused C call per group).
--
-- A subclass defines:
--   NAME ('SGD'), KEY ('sgd': the recipe's optim.name and the state's name), DEFAULTS (config
--   values filled in when absent), CONFIG_KEYS / GROUP_KEYS (what config and a group may hold),
--   SETTINGS (numeric settings checked as finite >= 0; REQUIRED among them for config),
--   STATE = {{key = 'momentum', power = 1}, ...}: the per-parameter buffers (the parameter's
--   shape), with power = how the buffer scales with the gradient (a gradient sum 1, a sum of
--   squares 2: surgery rescales and folds them by that power); SCALARS = {step = true}: number
--   state per parameter;
--   validate_extra(t, prefix, fname, is_config) for checks beyond SETTINGS; settings(g) -> s;
--   check_group(g, s) -> job batch or raises; run_group(batch, s) -> nr_status.
-- Invariants:
--   * opt.config is read at every step, so writing opt.config.lr (or any field) takes effect at
--     the next step. A group's own setting overrides config; a group's lr_mult scales config.lr.
--   * every group is checked (its settings, then C's checks of its tensors) before any steps, so
--     a refused step leaves every parameter, buffer and the step count as they were.
--   * state is keyed by the parameter tensor object; buffers are zero-filled when created.
--   * if the model's parameter tensors change (surgery) the next step raises an error asking
--     for opt:refresh() instead of silently updating stale tensors.
local class = require 'nr.class'
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local C = nrffi.C

local Optimizer = class('Optimizer')

local GRAD_FIELD = {weight = 'gradWeight', bias = 'gradBias'}

local function is_module(x) return type(x) == 'table' and type(x.namedParameters) == 'function' end

-- Parameters that get no weight decay under no_decay_bn_bias: every bias and the affine
-- parameters (γ, β) of normalization layers.
local function is_bn_or_bias(e)
   if e.field == 'bias' then return true end
   local tn = e.module and e.module.typename and e.module:typename() or ''
   return tn:match('Norm') ~= nil
end

-- nr.optim.param_groups(model, {no_decay_bn_bias = true}) -> groups usable by any optimizer; the
-- groups remember the model and the rule, so opt:refresh() can re-derive them after surgery.
function Optimizer.param_groups(model, opts)
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
local param_groups = Optimizer.param_groups

-- A number >= 0 that is finite as a float (the C step takes floats): an inf or NaN lr,
-- momentum, weight decay or lr_mult, or one past 3.4e38 (inf as a float), turns the weights into
-- inf/NaN at the first step.
local FLT_MAX = 3.4028234663852886e38
local function nonneg(v) return type(v) == 'number' and v >= 0 and v <= FLT_MAX end

-- Errors at the line that called the public method (check.at_caller: checks inside need no level
-- of their own); 2 is the method's caller, 3 for __init, which the class's constructor call runs.
local at_caller = check.at_caller
local show = check.show

-- Checks the settings of t: opt.config (prefix "config.", is_config: the REQUIRED ones must be
-- there) or a group's own (prefix "group N: ", each optional).
function Optimizer:validate_settings(t, prefix, fname, is_config)
   for _, k in ipairs(self.SETTINGS) do
      local v = t[k]
      if v ~= nil or (is_config and self.REQUIRED[k]) then
         check.arg(nonneg(v), fname, '%s%s must be a finite number >= 0%s, got %s', prefix, k,
            (type(v) == 'number' and v > FLT_MAX and v < math.huge) and ' (at most 3.4e38: the step computes in float)' or '',
            show(v))
      end
   end
   self:validate_extra(t, prefix, fname, is_config)
end

function Optimizer:validate_config(cfg, fname)
   check.options(cfg, self.CONFIG_KEYS, fname)
   self:validate_settings(cfg, 'config.', fname, true)
   check.arg(cfg.no_decay_bn_bias == nil or type(cfg.no_decay_bn_bias) == 'boolean', fname,
      'config.no_decay_bn_bias must be true or false, got %s', show(cfg.no_decay_bn_bias))
   check.arg(cfg.name == nil or (type(cfg.name) == 'string' and cfg.name:lower() == self.KEY), fname,
      'config.name is %s, but this is %s (%q)', show(cfg.name), self.NAME, self.KEY)
end

-- A group's own settings (its keys known to this optimizer, their values checked), as built and
-- at every step (opt.groups[i] is writable).
function Optimizer:validate_group(g, gi, fname)
   for k in pairs(g) do
      check.arg(self.GROUP_KEYS[k] ~= nil, fname, 'group %d: unknown setting %q', gi, tostring(k))
   end
   self:validate_settings(g, string.format('group %d: ', gi), fname)
end

-- Normalizes one parameter entry into {name, param, grad | module+gfield}.
local function entry_of(self, e, group, gi, pi)
   if T.is_tensor(e) then
      local grads = group.grads
      check.arg(type(grads) == 'table' and T.is_tensor(grads[pi]), self.FNAME,
         'group %d: parameter %d is a bare tensor; give its gradient in group.grads[%d] (or pass a module)', gi, pi, pi)
      return {name = string.format('group%d.%d', gi, pi), param = e, grad = grads[pi]}
   end
   check.arg(type(e) == 'table' and T.is_tensor(e.param), self.FNAME,
      'group %d: parameter %d must be a tensor or a namedParameters() entry', gi, pi)
   local out = {name = e.name or string.format('group%d.%d', gi, pi), param = e.param, grad = e.grad,
                module = e.module, field = e.field}
   if e.module and e.field then out.gfield = GRAD_FIELD[e.field] or ('grad' .. e.field:sub(1, 1):upper() .. e.field:sub(2)) end
   return out
end

local function build_groups(self, spec)
   local groups = {}
   for gi, g in ipairs(spec) do
      check.arg(type(g) == 'table' and type(g.params) == 'table', self.FNAME, 'group %d must be a table with params = {...}', gi)
      check.arg(not T.is_tensor(g.params), self.FNAME, 'group %d: params must be a list of parameters, got one tensor '
         .. '(write params = {t}, grads = {g})', gi)
      self:validate_group(g, gi, self.FNAME)
      local out = {params = {}}
      for k, v in pairs(g) do if k ~= 'params' and k ~= 'grads' then out[k] = v end end
      for pi, e in ipairs(g.params) do out.params[pi] = entry_of(self, e, g, gi, pi) end
      groups[gi] = out
   end
   self.groups = groups
   self._by_name = {}
   self._present = {}
   for _, g in ipairs(groups) do
      for _, e in ipairs(g.params) do
         check.arg(self._by_name[e.name] == nil, self.FNAME, 'parameter name %q appears twice', e.name)
         -- one tensor stepped twice per step (PyTorch: "some parameters appear in more than one
         -- parameter group"); on a GPU the two updates would also race in one launch
         local prev = self._present[e.param]
         check.arg(prev == nil, self.FNAME, 'parameter %q is the same tensor as %q: list each parameter once',
            e.name, prev and prev.name or '')
         self._by_name[e.name] = e
         self._present[e.param] = e
      end
   end
end

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

-- Optimizer(module_or_groups, config): config as the subclass takes it (its DEFAULTS filled in);
-- with a module, config.no_decay_bn_bias makes the two groups of param_groups.
local function init_impl(self, target, config)
   -- Torch7's m:parameters() (two lists of tensors) or a list of tensors: the module is what to pass
   check.arg(not (type(target) == 'table' and T.is_tensor(target[1])), self.FNAME, 'got a list of tensors '
      .. '(m:parameters()?): pass the model itself, %s(model, {lr = ...}), or groups {{params = m:namedParameters()}}',
      self.FNAME)
   config = config or {}
   check.arg(type(config) == 'table', self.FNAME, 'config must be a table')
   local cfg = {}
   for k, v in pairs(config) do cfg[k] = v end
   for k, v in pairs(self.DEFAULTS) do
      if cfg[k] == nil then cfg[k] = type(v) == 'table' and {unpack(v)} or v end   -- (a table each: config is writable)
   end
   self:validate_config(cfg, self.FNAME)
   self.config = cfg
   self.t = 0          -- steps taken
   self.state_ = {}    -- [param tensor] = {key = tensor or number}
   if is_module(target) then
      self.model = target
      self.spec = param_groups(target, {no_decay_bn_bias = cfg.no_decay_bn_bias or nil})
   else
      check.arg(type(target) == 'table' and #target > 0, self.FNAME,
         'first argument must be a module or a non-empty list of parameter groups')
      self.model = target.model
      self.spec = target
   end
   build_groups(self, self.spec)
   self.structure = structure_of(self.model)
end
function Optimizer:__init(target, config) return at_caller(3, init_impl, self, target, config) end

-- (its errors reach the user through at_caller)
local function resolve(self, e)
   if e.module then
      local p = e.module[e.field]
      -- the parameter itself, or its layer (or a layer above: an NRConv2d's blocks) was replaced:
      -- stepping the old tensor would train nothing
      if p ~= e.param or select(2, replacement_of(e.module)) then
         error(string.format('%s: parameter %s was replaced (nr.rejuvenate, or by hand); pass optimizer = opt to '
            .. 'nr.rejuvenate (remaps its state) or call opt:refresh()', self.FNAME, e.name), 0)
      end
      local grad = e.module[e.gfield]
      if grad ~= nil and not T.is_tensor(grad) then
         error(string.format('%s: parameter %s: its gradient (%s) is a %s, not a tensor', self.FNAME, e.name, e.gfield,
            type(grad)), 0)
      end
      return p, grad
   end
   return e.param, e.grad
end

-- Setting k of group g: the group's own, else config's (a group's false overrides a true config).
function Optimizer:setting(g, k)
   local v = g[k]
   if v == nil then v = self.config[k] end
   return v
end

-- The learning rate of group g: its own lr, else config.lr times its lr_mult.
function Optimizer:group_lr(g) return g.lr or self.config.lr * (g.lr_mult or 1) end

-- The parameters of group g that step (those with a gradient): fn(p, grad) for each. Called by
-- a subclass's check_group (from step).
function Optimizer:each_stepped(g, fn)
   for _, e in ipairs(g.params) do
      local p, grad = resolve(self, e)
      if grad then fn(p, grad) end
   end
end

-- Parameter p's state table (created empty), and its buffer key (created zero-filled when absent
-- or freed by its user).
function Optimizer:state_table(p)
   local st = self.state_[p]
   if not st then
      st = {}
      self.state_[p] = st
   end
   return st
end

function Optimizer:buffer(p, key)
   local st = self:state_table(p)
   if not (st[key] and rawget(st[key], 'c')) then st[key] = T.zeros(p:shape(), {device = p:device()}) end
   return st[key]
end

-- Group g's batch of C jobs: arr, an array of ctype ('nr_sgd_job', ...) of at least #g.params,
-- reused while the group's size stays (weak keys: a dropped group takes its array with it);
-- states, for a subclass to note what its run_group must update afterwards.
local BATCHES = setmetatable({}, {__mode = 'k'})
function Optimizer:job_batch(g, ctype)
   local jb = BATCHES[g]
   if not jb or jb.cap < #g.params or jb.ctype ~= ctype then
      jb = {cap = #g.params, ctype = ctype, arr = nrffi.ffi.new(ctype .. '[?]', math.max(1, #g.params)), states = {}}
      BATCHES[g] = jb
   end
   return jb
end

-- Raises the C message of group g's failed check or step, naming the parameter of its job.
function Optimizer:step_error(g)
   local msg = nrffi.ffi.string(C.nr_last_error())
   -- job k is the (k+1)-th entry that has a gradient: name it
   local k, name = tonumber(msg:match('%(job (%d+)%)')), nil
   for _, e in ipairs(g.params) do
      if k and select(2, resolve(self, e)) then
         if k == 0 then name = e.name break end
         k = k - 1
      end
   end
   error(self.NAME .. ':step' .. (name and (' (' .. name .. ')') or '') .. ': ' .. msg, 0)
end

local function step_impl(self)
   local F = self.NAME .. ':step'
   self:validate_config(self.config, F)
   -- surgery (nr.rejuvenate) replaced the model's layers: stepping the old tensors would train nothing
   if self.model and structure_of(self.model) ~= self.structure then
      error(string.format('%s: the model\'s layers were replaced (nr.rejuvenate) after this optimizer read them; pass '
         .. 'optimizer = opt to nr.rejuvenate (remaps its state) or call opt:refresh()', F), 0)
   end
   local batches = {}
   for gi, g in ipairs(self.groups) do
      self:validate_group(g, gi, F)   -- opt.groups[i] is writable too
      local s = self:settings(g)
      batches[gi] = {self:check_group(g, s), s}
   end
   for gi, g in ipairs(self.groups) do
      local b = batches[gi]
      if self:run_group(b[1], b[2]) ~= 0 then self:step_error(g) end
   end
   self.t = self.t + 1
end
function Optimizer:step() return at_caller(2, step_impl, self) end

local function zero_grad_impl(self)
   for _, g in ipairs(self.groups) do
      for _, e in ipairs(g.params) do
         local _, grad = resolve(self, e)
         if grad then grad:zero() end
      end
   end
end
function Optimizer:zero_grad() return at_caller(2, zero_grad_impl, self) end

-- Learning rate of group i (default 1) as the next step will use it.
local function lr_impl(self, i)
   local g = self.groups[i or 1]
   check.arg(g ~= nil, self.NAME .. ':lr', 'group %s does not exist (this optimizer has %d)', show(i), #self.groups)
   return self:settings(g).lr
end
function Optimizer:lr(i) return at_caller(2, lr_impl, self, i) end

-- ---- per-parameter state (NR surgery) ----------------------------------------------------------

-- How each state buffer scales with the gradient, by key (surgery's rescale and folds).
function Optimizer:state_powers()
   local out = {}
   for _, s in ipairs(self.STATE) do out[s.key] = s.power end
   return out
end

-- {key = tensor, ..., step = n} for a parameter (the live buffers), or nil when it has none yet.
function Optimizer:state_of(param)
   local st = self.state_[param]
   if not st then return nil end
   local out, any = {}, false
   for _, s in ipairs(self.STATE) do
      if st[s.key] then out[s.key] = st[s.key]; any = true end
   end
   if not any then return nil end
   for k in pairs(self.SCALARS) do out[k] = st[k] end
   return out
end

-- Checks one parameter's state table (set_state_of, load_state); what names it in messages.
local function check_state(self, F, what, param, tbl)
   check.arg(type(tbl) == 'table', F, '%s: state must be a table, got %s', what, type(tbl))
   local powers = self:state_powers()
   for k, v in pairs(tbl) do
      if powers[k] then
         check.arg(T.is_tensor(v), F, '%s: %s must be a tensor of the parameter\'s shape [%s], got %s', what, tostring(k),
            table.concat(param:shape(), ' x '), show(v))
         check.arg(T.same_shape(v:shape(), param:shape()), F, '%s: %s has shape [%s] but the parameter is [%s]', what,
            tostring(k), table.concat(v:shape(), ' x '), table.concat(param:shape(), ' x '))
      elseif self.SCALARS[k] then
         check.arg(type(v) == 'number' and v >= 0 and v == math.floor(v) and v < 2 ^ 53, F,
            '%s.%s must be an integer >= 0, got %s', what, tostring(k), show(v))
      else
         local names = {}
         for kk in pairs(powers) do names[#names + 1] = kk end
         for kk in pairs(self.SCALARS) do names[#names + 1] = kk end
         table.sort(names)
         check.arg(false, F, '%s: unknown state %q for %s (it keeps: %s)', what, tostring(k), self.NAME, table.concat(names, ', '))
      end
   end
end

-- Whether tbl holds any state tensor (a state without its buffers is no state: its numbers, a
-- step count, would apply to zero moments).
local function has_buffers(self, tbl)
   for _, st in ipairs(self.STATE) do if tbl[st.key] ~= nil then return true end end
   return false
end

-- A checked state table as kept for param: its tensors on the parameter's device, float32,
-- contiguous, and owned: a tensor is copied unless the caller hands over a fresh one (one that
-- shares no storage with the parameter, another of tbl's tensors, or another parameter's state,
-- which would make two buffers one). always_copy: copy every tensor (load_state).
local function fresh_state(self, param, tbl, always_copy)
   local out, taken = {}, {}
   local function aliased(v)
      if v:same_storage(param) then return true end
      for _, t in ipairs(taken) do if v:same_storage(t) then return true end end
      for p, st in pairs(self.state_) do
         if p ~= param then
            for _, s in ipairs(self.STATE) do
               local t = st[s.key]
               if t and rawget(t, 'c') and v:same_storage(t) then return true end
            end
         end
      end
      return false
   end
   for k, v in pairs(tbl) do
      if T.is_tensor(v) then
         if always_copy or v:device() ~= param:device() or v:dtype() ~= 'float32' or not v:is_contiguous() or aliased(v) then
            v = T.empty(param:shape(), {device = param:device()}):copy(v)
         end
         taken[#taken + 1] = v
      end
      out[k] = v
   end
   return out
end

-- Sets a parameter's state (a table as state_of gives, or nil to drop it). The parameter need
-- not be in the groups yet (call refresh() after surgery; order is free).
local function set_state_of_impl(self, param, tbl)
   local F = self.NAME .. ':set_state_of'
   check.arg(T.is_tensor(param), F, 'param must be a tensor')
   if tbl ~= nil then check_state(self, F, 'state', param, tbl) end
   self.state_[param] = tbl ~= nil and has_buffers(self, tbl) and fresh_state(self, param, tbl) or nil
end
function Optimizer:set_state_of(param, tbl) return at_caller(2, set_state_of_impl, self, param, tbl) end

-- Re-reads the model's parameters (after surgery); state of parameters no longer present is
-- dropped. Groups of namedParameters() entries (with or without groups.model) follow their
-- layers' replacements; bare tensors are kept as they are.
local function refresh_impl(self)
   -- built over one layer that surgery replaced: the replacement is the target now
   if self.model then self.model = (replacement_of(self.model)) end
   if self.model and self.spec.rule then
      self.spec = param_groups(self.model, {no_decay_bn_bias = (self.spec[2] ~= nil) or nil})
   else
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
function Optimizer:refresh() return at_caller(2, refresh_impl, self) end

-- Names of the parameters, in group order.
function Optimizer:names()
   local out = {}
   for _, g in ipairs(self.groups) do for _, e in ipairs(g.params) do out[#out + 1] = e.name end end
   return out
end

-- ---- serialization ------------------------------------------------------------------------------

-- {name = KEY, t =, config = {...}, groups = {{settings..., param_names = {...}}},
-- params = {[name] = state_of(param)}}. Tensors are the live buffers (the checkpoint writer
-- copies them out).
function Optimizer:state()
   local cfg = {}
   for k, v in pairs(self.config) do cfg[k] = type(v) == 'table' and {unpack(v)} or v end   -- (betas: a copy)
   local groups = {}
   for i, g in ipairs(self.groups) do
      local s = {param_names = {}} -- which parameters the settings belong to (checked on load)
      for k, v in pairs(g) do if k ~= 'params' then s[k] = type(v) == 'table' and {unpack(v)} or v end end
      for j, e in ipairs(g.params) do s.param_names[j] = e.name end
      groups[i] = s
   end
   local params = {}
   for _, g in ipairs(self.groups) do
      for _, e in ipairs(g.params) do params[e.name] = self:state_of(e.param) end
   end
   return {name = self.KEY, t = self.t, config = cfg, groups = groups, params = params}
end

-- Restores a state() table. Buffers are copied into fresh tensors on each parameter's device.
-- Everything is checked before anything changes (as PyTorch's load_state_dict), so a refused
-- state leaves the optimizer as it was: another optimizer's state, a name missing from the
-- model, a shape mismatch, groups that do not match this optimizer's (their number, or the
-- parameters a group's settings belong to) are errors naming what differs.
local function load_state_impl(self, s)
   local F = self.NAME .. ':load_state'
   check.arg(type(s) == 'table', F, 'state must be a table')
   check.arg(s.name == nil or s.name == self.KEY, F, 'state is for optimizer %q, not %s', tostring(s.name), self.KEY)
   local config
   if s.config ~= nil then
      check.arg(type(s.config) == 'table', F, 'state.config must be a table, got %s', type(s.config))
      config = {}
      for k, v in pairs(self.config) do config[k] = v end
      for k, v in pairs(s.config) do config[k] = type(v) == 'table' and {unpack(v)} or v end   -- (betas: a copy)
      self:validate_config(config, F)
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
               check.arg(self.GROUP_KEYS[k] ~= nil and k ~= 'params' and k ~= 'grads', F, 'state.groups[%d]: unknown setting %q', i,
                  tostring(k))
               merged[k] = v
            end
         end
         self:validate_settings(merged, string.format('group %d: ', i), F)
         groups[i] = merged
      end
   end
   -- a string or NaN failed at the next step as "attempt to perform arithmetic on field 't'"
   if s.t ~= nil then check.int(s.t, F, 'state.t', 0) end
   check.arg(s.params == nil or type(s.params) == 'table', F, 'state.params must be a table, got %s', type(s.params))
   for name, st in pairs(s.params or {}) do
      local e = self._by_name[name]
      check.arg(e ~= nil, F, 'saved state for parameter %q, which the model does not have', name)
      check_state(self, F, name, e.param, st)
   end
   -- checked: now change
   local fresh = {}
   for name, st in pairs(s.params or {}) do
      local e = self._by_name[name]
      if has_buffers(self, st) then fresh[e.param] = fresh_state(self, e.param, st, true) end
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
function Optimizer:load_state(s) return at_caller(2, load_state_impl, self, s) end

-- A subclass: class(name, Optimizer) with the tables the header lists.
function Optimizer.subclass(name, key, spec)
   local cls = class(name, Optimizer)
   cls.NAME, cls.KEY, cls.FNAME = name, key, 'nr.optim.' .. name
   for k, v in pairs(spec) do cls[k] = v end
   return cls
end

return Optimizer

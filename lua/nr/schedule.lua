-- nr.schedule — learning-rate schedules as functions of the schedule's own position.
--
-- What it is: constant, step (×gamma at milestones or every step_size epochs), cosine and
-- linear decay, each with an optional linear warm-up; per-epoch or per-iteration granularity;
-- serializable position. What it is not: the code that decides when to advance (nr.train does,
-- and only while tr.schedule_hold is false, which is how NR "shifts the milestones": the whole
-- schedule starts after rejuvenation).
-- Invariants: the position is two explicit fields, s.epoch (schedule epochs completed, 0-based)
-- and s.iter (iterations into the current schedule epoch); s:lr() is a pure function of them,
-- so state() = {epoch, iter} restores the LR exactly. Milestones count schedule epochs:
-- milestones = {150, 225} means epochs 151.. use base*gamma (1-based), as torch's MultiStepLR.
--
--   local s = nr.schedule.build({name = 'cosine', warmup = 1}, {base_lr = 0.1, epochs = 90, iters_per_epoch = 500})
--   opt.config.lr = s:lr(); ...; s:step()      -- each iteration
--   s:next_epoch()                             -- each epoch end
local check = require 'nr.check'

local M = {}

local Schedule = {}
Schedule.__index = Schedule
Schedule.__typename = 'nr.Schedule'

local KEYS = {name = true, milestones = true, gamma = true, step_size = true, warmup = true,
              warmup_start = true, min_lr = true, epochs = true, granularity = true}
local NAMES = {constant = true, step = true, multistep = true, cosine = true, linear = true}

local finite, show = check.finite, check.show

-- Numeric settings: {field, lower bound, bound excluded, integer}. A NaN or infinite value would
-- give a NaN LR (gamma, min_lr) or one stuck at its start (warmup, epochs) without an error.
local NUMERIC = {{'base_lr', 0}, {'epochs', 0, true}, {'iters_per_epoch', 1, false, true}, {'gamma', 0},
                 {'warmup', 0}, {'warmup_start', 0}, {'min_lr', 0}}

-- build(cfg, ctx): cfg is a recipe's schedule table; ctx = {base_lr, epochs, iters_per_epoch}.
-- cfg.epochs overrides ctx.epochs (the schedule's length; the decay ends there).
function M.build(cfg, ctx)
   cfg = cfg or {}
   ctx = ctx or {}
   check.options(cfg, KEYS, 'nr.schedule')
   check.arg(type(ctx) == 'table', 'nr.schedule', 'ctx must be a table {base_lr, epochs, iters_per_epoch}, got %s', type(ctx))
   local name = cfg.name or 'constant'
   check.arg(NAMES[name], 'nr.schedule', 'unknown schedule %q (constant, step, multistep, cosine, linear)', tostring(name))
   local s = setmetatable({
      name = name, base_lr = ctx.base_lr,
      epochs = cfg.epochs or ctx.epochs or 1,
      iters_per_epoch = ctx.iters_per_epoch or 1,
      gamma = cfg.gamma or 0.1,
      milestones = cfg.milestones,
      step_size = cfg.step_size,
      warmup = cfg.warmup or 0,
      warmup_start = cfg.warmup_start or 0,
      min_lr = cfg.min_lr or 0,
      granularity = cfg.granularity or ((name == 'cosine' or name == 'linear') and 'iter' or 'epoch'),
      epoch = 0, iter = 0,
   }, Schedule)
   check.arg(not finite(s.warmup_start) or s.warmup_start <= 1, 'nr.schedule',
      'warmup_start must be a fraction of base_lr in [0, 1], got %s', show(s.warmup_start))
   check.arg(s.granularity == 'iter' or s.granularity == 'epoch', 'nr.schedule', 'granularity must be "iter" or "epoch", got %q', tostring(s.granularity))
   for _, o in ipairs(NUMERIC) do
      local k, lo, open, int = o[1], o[2], o[3], o[4]
      local v = s[k]
      check.arg(finite(v) and (v > lo or v == lo and not open) and (not int or v == math.floor(v)), 'nr.schedule',
         '%s must be a finite %s %s %g, got %s', k, int and 'integer' or 'number', open and '>' or '>=', lo, show(v))
   end
   -- values that make no schedule: a warm-up as long as the run never reaches base_lr (and leaves
   -- no time to decay), a floor above base_lr turns the decay into a rise; both ran silently
   -- (only where the length was given: a direct build without epochs defaults it to 1)
   local known_length = cfg.epochs ~= nil or ctx.epochs ~= nil
   check.arg(s.warmup == 0 or not known_length or s.warmup < s.epochs, 'nr.schedule', 'warmup (%s epochs) must be shorter than the schedule '
      .. '(%s epochs): the LR would never reach base_lr', show(s.warmup), show(s.epochs))
   check.arg(not (name == 'cosine' or name == 'linear') or s.min_lr <= s.base_lr, 'nr.schedule',
      'min_lr (%s) must not exceed base_lr (%s): the %s decay would rise', show(s.min_lr), show(s.base_lr), name)
   -- a setting only step schedules read, given to another, was ignored without a word
   for _, k in ipairs({'milestones', 'step_size', 'gamma'}) do
      check.arg(cfg[k] == nil or name == 'step' or name == 'multistep', 'nr.schedule',
         "%s is a setting of the step schedules (name = 'step' or 'multistep'), not of %s", k, name)
   end
   if name == 'step' or name == 'multistep' then
      if s.milestones == nil and s.step_size == nil then
         -- torch-style default for CIFAR recipes: ×0.1 at 50% and 75% (none before the first
         -- epoch ends: a 1-epoch run keeps its LR instead of starting at base × gamma²)
         -- (once each: over 2 epochs both fall on epoch 1, which cut the LR twice there)
         s.milestones = {}
         for _, f in ipairs({0.5, 0.75}) do
            local m = math.floor(s.epochs * f)
            if m >= 1 and m ~= s.milestones[#s.milestones] then s.milestones[#s.milestones + 1] = m end
         end
      end
      check.arg(cfg.milestones == nil or cfg.step_size == nil, 'nr.schedule',
         'give milestones or step_size, not both (step_size would be ignored)')
      if s.milestones then
         local n = 0
         if type(s.milestones) == 'table' then for _ in pairs(s.milestones) do n = n + 1 end end
         check.arg(type(s.milestones) == 'table' and n == #s.milestones, 'nr.schedule',
            'milestones must be a list of epochs, got %s', show(s.milestones))
         local prev = 0
         for i, m in ipairs(s.milestones) do
            check.arg(finite(m) and m >= prev, 'nr.schedule',
               'milestones must be increasing finite numbers >= 0 (entry %d is %s)', i, show(m))
            prev = m
         end
      else
         check.arg(finite(s.step_size) and s.step_size > 0, 'nr.schedule', 'step_size must be a finite number > 0, got %s', show(s.step_size))
      end
   end
   return s
end

-- Learning rate at schedule position t (fractional schedule epochs elapsed, from 0).
function Schedule:at(t)
   local base = self.base_lr
   if self.warmup > 0 and t < self.warmup then
      local f = t / self.warmup
      return base * (self.warmup_start + (1 - self.warmup_start) * f)
   end
   if self.granularity == 'epoch' then t = math.floor(t) end
   local name = self.name
   if name == 'constant' then return base end
   if name == 'step' or name == 'multistep' then
      local k = 0
      if self.milestones then
         for _, m in ipairs(self.milestones) do if t >= m then k = k + 1 end end
      else
         k = math.floor(t / self.step_size + 1e-9)
      end
      return base * self.gamma ^ k
   end
   local span = self.epochs - self.warmup
   local f = span > 0 and math.min(math.max((t - self.warmup) / span, 0), 1) or 1
   if name == 'cosine' then
      return self.min_lr + (base - self.min_lr) * 0.5 * (1 + math.cos(math.pi * f))
   end
   -- linear decay to min_lr
   return self.min_lr + (base - self.min_lr) * (1 - f)
end

-- Current position in fractional schedule epochs. The fraction stays below 1 even if an epoch
-- runs more iterations than iters_per_epoch said: only next_epoch() crosses an epoch.
function Schedule:position()
   return self.epoch + math.min(self.iter / self.iters_per_epoch, 1 - 1e-9)
end

function Schedule:lr() return self:at(self:position()) end

-- True while the position is inside the warm-up (nr.train lets a held schedule run through it).
function Schedule:in_warmup() return self.warmup > 0 and self:position() < self.warmup end

-- One iteration done (the trainer calls this only while the schedule is not held).
function Schedule:step()
   self.iter = self.iter + 1
end

-- One epoch done: the epoch counter advances and the iteration count restarts.
function Schedule:next_epoch()
   self.epoch = self.epoch + 1
   self.iter = 0
end

function Schedule:state()
   return {name = self.name, epoch = self.epoch, iter = self.iter, base_lr = self.base_lr}
end

function Schedule:load_state(t)
   check.arg(type(t) == 'table', 'Schedule:load_state', 'state must be a table')
   check.arg(t.name == nil or t.name == self.name, 'Schedule:load_state', 'state is for schedule %q, this one is %q', tostring(t.name), self.name)
   -- checked as build checks its settings: a NaN base_lr gave NaN LRs, a NaN or negative position
   -- a wrong LR, and a string failed later in lr() as "attempt to perform arithmetic"
   for _, k in ipairs({'epoch', 'iter'}) do
      if t[k] ~= nil then check.int(t[k], 'Schedule:load_state', 'state.' .. k, 0) end
   end
   check.arg(t.base_lr == nil or finite(t.base_lr) and t.base_lr >= 0, 'Schedule:load_state',
      'state.base_lr must be a finite number >= 0, got %s', show(t.base_lr))
   self.epoch = t.epoch or 0
   self.iter = t.iter or 0
   if t.base_lr then self.base_lr = t.base_lr end
end

-- The LR at the start of each schedule epoch 1..n (for reports and --help).
function Schedule:table(n)
   local out = {}
   for e = 0, (n or self.epochs) - 1 do out[e + 1] = self:at(e) end
   return out
end

M.Schedule = Schedule

-- Shorthands: nr.schedule.cosine{base_lr = 0.1, epochs = 90, warmup = 1, iters_per_epoch = 100}
for name in pairs(NAMES) do
   M[name] = function(opts)
      opts = opts or {}
      local cfg, ctx = {name = name}, {}
      for k, v in pairs(opts) do
         if k == 'base_lr' or k == 'iters_per_epoch' then ctx[k] = v else cfg[k] = v end
      end
      return M.build(cfg, ctx)
   end
end

return M

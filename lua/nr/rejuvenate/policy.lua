-- nr.rejuvenate.policy — every Neural Rejuvenation decision as a replaceable Lua function.
--
-- A recipe replaces any of them: `nr = {policy = {reallocate = function(layers, budget) ... end}}`.
-- Defaults (paper section in brackets):
--   when(ctx) -> bool             rejuvenate when r < T_r (cfg.target) and fewer than cfg.times
--                                 rejuvenations happened [Alg. 1 step 7]
--   lambda(ctx) -> λ              adaptive: every Δt, λ += Δλ unless r fell by more than Δr over
--                                 the interval [3.1.3]; constant mode returns cfg.lambda.value
--   reallocate(layers, budget)    one shared expansion rate α for every layer's live width,
--     -> widths, info             solved by bisection on the exact cost so cost <= budget.target
--                                 [3.2], then rounded up set by set while the budget allows
--                                 (the next step's sets, then the rest, nearest first)
--                                 (not called with budget = 0: that is a pure prune)
--   init(kind, shape, info) -> T  fresh weights: Kaiming normal, fan-out (std = sqrt(2 / fan_out));
--                                 kind 'depthwise' for a depthwise conv's new rows, else 'conv'
--   rescale(ctx) -> bool          neural rescaling after rejuvenation iff cfg.rescale [3.2]
-- ctx (when, lambda and rescale in training) = {r, r_prev, util (nr.utilization's table), cfg (the
-- recipe's nr table), lambda, rejuvenations, epoch, step, trainer}. In training, `when` is asked
-- only while NR is active (fewer than cfg.times rejuvenations, within cfg.active_epochs): raise
-- `times` to allow more. nr.rejuvenate by hand asks rescale with {cfg = {rescale = false}, model}
-- when its opts.rescale is nil.
-- The `layers` given to reallocate are the resizable channel sets: {id, name, members, live,
-- width, fixed, mean_gamma, kind}; `budget` = {target, constraint, constraint_value,
-- cost(widths) -> number, solve(widths_of_t, lo) -> t, t_next (t: the largest with cost <= target;
-- t_next: just past the next cost step, or nil), live_cost, all_cost}. widths[id] = new width
-- (>= 1); a set left out keeps only its live channels. The widths are applied as returned, even
-- over the budget (the report's cost_error shows it; nr.train prints a line past 1%). New
-- classifier columns (a Linear after a grown set) follow opts.linear_init, not init.
local T = require 'nr.tensor'
local check = require 'nr.check'

local M = {}

function M.when(ctx)
   return ctx.r < ctx.cfg.target and ctx.rejuvenations < (ctx.cfg.times or 1)
end

function M.lambda(ctx)
   local l = ctx.cfg.lambda or {}
   if (l.mode or 'adaptive') == 'constant' then return l.value or 0 end
   local dr, dl = l.dr or 0.01, l.dl or 5e-5
   if ctx.r < ctx.r_prev - dr then return ctx.lambda end
   return ctx.lambda + dl
end

-- widths(a): every resizable set gets round(a · live) channels (at least 1).
local function shared(layers)
   return function(a)
      local w = {}
      for _, l in ipairs(layers) do w[l.id] = math.max(1, math.floor(a * l.live + 0.5)) end
      return w
   end
end
M.shared_widths = shared

-- α >= 1 when the live cost is within the budget (the paper's case: T_r <= budget); otherwise
-- (a forced rejuvenation above the budget) α < 1 and the lowest-|γ| live channels go too.
-- Integer widths make the cost a step function, and one step can be large (ResNet-164: every
-- 16-wide set of a stage rounds up at the same α, 1.5% of the cost), so the sets that round up
-- at the next step do so one at a time, in layer order, while the cost stays within the budget;
-- then the other sets, those nearest to rounding up first (the α at which round(α·live) would
-- give one more), each if the cost still fits (on small nets one step of the shared α skips
-- several percent of the budget). Every width stays round(α·live) or one more, and the cost lands
-- just under the target.
function M.reallocate(layers, budget)
   local f = shared(layers)
   local a, a_next = budget.solve(f, budget.cost(f(1)) <= budget.target and 1 or 0)
   local w = f(a)
   local base = f(a)
   local function try_one_more(id)
      local was = w[id]
      w[id] = was + 1
      if budget.cost(w) > budget.target then w[id] = was end
   end
   if a_next then
      local up = f(a_next)
      for _, l in ipairs(layers) do
         if up[l.id] > w[l.id] then try_one_more(l.id) end
      end
      local rest = {}
      for i, l in ipairs(layers) do
         if w[l.id] == base[l.id] and l.live > 0 then
            rest[#rest + 1] = {id = l.id, at = (base[l.id] + 0.5) / l.live, order = i}
         end
      end
      table.sort(rest, function(x, y) return x.at < y.at or (x.at == y.at and x.order < y.order) end)
      for _, r in ipairs(rest) do try_one_more(r.id) end
   end
   return w, {alpha = a}
end

function M.init(kind, shape, info)
   local fan = info.fan_out or 1
   local t = T.randn(shape, {device = info.device})
   return t:mul_(math.sqrt(2 / fan))
end

function M.rescale(ctx) return ctx.cfg.rescale == true end

-- Bisection on t >= lo for a monotone family widths_of(t): the largest t whose exact cost stays
-- within budget.target (the paper's constraint c(A) <= C; integer widths make cost a step
-- function, so the cost lands on the highest step at or below the target, as the authors' floored
-- widths do), and the t just past the next step (nil when there is none to find). Returns lo when
-- even lo is over the target.
function M.make_solver(cost, target)
   return function(widths_of, lo)
      if type(widths_of) ~= 'function' then
         error('nr.rejuvenate budget.solve: widths_of must be a function t -> widths, got ' .. type(widths_of), 2)
      end
      if lo ~= nil and (type(lo) ~= 'number' or lo ~= lo or lo < 0) then
         error('nr.rejuvenate budget.solve: lo must be a number >= 0, got ' .. check.show(lo), 2)
      end
      lo = lo or 0
      if cost(widths_of(lo)) > target then return lo, nil end
      local hi = math.max(lo * 2, lo + 1)
      for _ = 1, 64 do
         if cost(widths_of(hi)) > target then break end
         lo, hi = hi, hi * 2
      end
      if cost(widths_of(hi)) <= target then return hi, nil end
      -- invariant: cost(lo) <= target < cost(hi)
      for _ = 1, 60 do
         local mid = (lo + hi) / 2
         if cost(widths_of(mid)) > target then hi = mid else lo = mid end
         if hi - lo < 1e-9 * hi then break end
      end
      return lo, hi
   end
end

return M

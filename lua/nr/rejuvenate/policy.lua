-- nr.rejuvenate.policy — every Neural Rejuvenation decision as a replaceable Lua function.
--
-- A recipe replaces any of them: `nr = {policy = {reallocate = function(layers, budget) ... end}}`.
-- Defaults (paper section in brackets):
--   when(ctx) -> bool             rejuvenate when r < T_r (cfg.target) and fewer than cfg.times
--                                 rejuvenations happened [Alg. 1 step 7]
--   lambda(ctx) -> λ              adaptive: every Δt, λ += Δλ unless r fell by more than Δr over
--                                 the interval [3.1.3]; constant mode returns cfg.lambda.value
--   reallocate(layers, budget)    one shared expansion rate α for every layer's live width,
--     -> widths, info             solved by bisection on the exact cost so cost ≈ budget.target [3.2]
--                                 (not called with budget = 0: that is a pure prune)
--   init(kind, shape, info) -> T  fresh weights: Kaiming normal, fan-out (std = sqrt(2 / fan_out))
--   rescale(ctx) -> bool          neural rescaling after rejuvenation iff cfg.rescale [3.2]
-- The `layers` given to reallocate are the resizable channel sets: {id, name, members, live,
-- width, fixed, mean_gamma, kind}; `budget` = {target, constraint, cost(widths) -> number,
-- solve(widths_of_t, lo) -> t, live_cost, all_cost}. widths[id] = new width (>= 1); a layer left
-- out keeps only its live channels.
local T = require 'nr.tensor'

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
function M.reallocate(layers, budget)
   local f = shared(layers)
   local a
   if budget.cost(f(1)) <= budget.target then a = budget.solve(f, 1) else a = budget.solve(f, 0) end
   return f(a), {alpha = a}
end

function M.init(kind, shape, info)
   local fan = info.fan_out or 1
   local t = T.randn(shape, {device = info.device})
   return t:mul_(math.sqrt(2 / fan))
end

function M.rescale(ctx) return ctx.cfg.rescale == true end

-- Bisection on t >= lo for a monotone family widths_of(t): the t whose exact cost is closest to
-- budget.target (integer widths make cost a step function; the closest step is returned).
function M.make_solver(cost, target)
   return function(widths_of, lo)
      lo = lo or 0
      local c_lo = cost(widths_of(lo))
      if c_lo >= target then return lo end
      local hi, c_hi = math.max(lo * 2, lo + 1), nil
      for _ = 1, 64 do
         c_hi = cost(widths_of(hi))
         if c_hi >= target then break end
         lo, c_lo = hi, c_hi
         hi = hi * 2
      end
      if c_hi < target then return hi end
      for _ = 1, 60 do
         local mid = (lo + hi) / 2
         local c = cost(widths_of(mid))
         if c >= target then hi, c_hi = mid, c else lo, c_lo = mid, c end
         if hi - lo < 1e-9 * hi then break end
      end
      return (target - c_lo <= c_hi - target) and lo or hi
   end
end

return M

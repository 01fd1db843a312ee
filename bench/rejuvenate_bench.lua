-- bench/rejuvenate_bench.lua — wall time of one Neural Rejuvenation of ResNet-50 (ImageNet, 224x224).
--
--   NR_THREADS=2 ./build/nrlua bench/rejuvenate_bench.lua [--reps 7] [--profile 1]
--       [--scheme NR] [--constraint flops] [--dead 0.4] [--input 224] [--depth 50]
--       [--surgery FILE] [--tag NAME] [--json FILE]
--
-- What it measures: `nr.rejuvenate` (the public API) on a fresh copy of a ResNet-50 whose
-- non-fixed BatchNorm layers have ~40% of their γ set to 0 (deterministic: nr.manual_seed(1),
-- the first floor(dead·C) channels of a random permutation per layer), with an SGD optimizer
-- (momentum 0.9, weight decay 1e-4) that has taken one step on random gradients, so every
-- parameter has a momentum buffer to remap. One rejuvenation = prune the dead channels, expand
-- every channel set by the shared rate α back to the FLOPs of the full model, reinitialise the new
-- channels, remap the momentum. Each repetition clones the damaged model (outside the timer),
-- builds the optimizer and steps it (outside), runs a full GC (outside), then times the call.
-- The graph is built inside the timed call (a fresh clone has no cached graph), as it is for the
-- first rejuvenation of a model that was never monitored.
--
-- --profile 1 runs one more repetition after the timed ones with timers around the phases of
-- nr.rejuvenate (graph, reports, reallocation, plans, surgery, optimizer remap) and, inside the
-- surgery, around the C placement call, the leaf tensor operations and module constructors
-- (exclusive times); --profile 2 profiles the first rejuvenation of the process instead (before
-- the timed ones: cold memory, as the first rejuvenation of a training run). The timers add a
-- little overhead.
--
-- --surgery FILE replaces the functions of nr.rejuvenate.surgery by those FILE returns (e.g. the
-- previous version, `git show HEAD:lua/nr/rejuvenate/surgery.lua > /tmp/surgery_old.lua`), for
-- before/after comparisons in one session.
local nr = require 'nr'
local R = require 'nr.rejuvenate'
local T = require 'nr.tensor'
local now = require('nr.progress').now

local opt = {reps = 7, profile = 0, scheme = 'NR', constraint = 'flops', dead = 0.4, input = 224, depth = 50,
             surgery = '', tag = '', json = ''}
do
   local args = {...}
   local i = 1
   while i <= #args do
      local k = args[i]:match('^%-%-(.+)$')
      assert(k and opt[k] ~= nil and args[i + 1], 'rejuvenate_bench: unknown or incomplete option ' .. tostring(args[i]))
      local v = args[i + 1]
      opt[k] = type(opt[k]) == 'number' and assert(tonumber(v), 'rejuvenate_bench: --' .. k .. ' needs a number') or v
      i = i + 2
   end
end

if opt.surgery ~= '' then
   local alt = dofile(opt.surgery)
   for k, v in pairs(alt) do R.surgery[k] = v end
end

local INPUT = {3, opt.input, opt.input}

-- ---- the damaged model --------------------------------------------------------------------------

nr.manual_seed(1)
local base = nr.models.resnet{depth = opt.depth}
-- random BN state and ~opt.dead of every prunable layer's channels dead (the NR specs' fixture)
local killed, total = dofile((_NRLUA and _NRLUA.home or '.') .. '/tests/lua/nr_zoo.lua').damage(base, INPUT, opt.dead)
-- random gradients, so the optimizer's first step leaves a non-trivial momentum everywhere
for _, e in ipairs(base:namedParameters()) do e.grad:copy(nr.randn(e.grad:shape()):mul_(0.01)) end
base:transient().nr_graph = nil

local function fresh()
   local m = base:clone()
   rawset(m, '_transient', nil)
   local o = nr.optim.SGD(m, {lr = 0.1, momentum = 0.9, weight_decay = 1e-4})
   o:step()
   return m, o
end

local function rejuvenate(m, o)
   return nr.rejuvenate(m, {input_shape = INPUT, constraint = opt.constraint, budget = 1.0, scheme = opt.scheme,
                            optimizer = o})
end

-- ---- profiler (exclusive wall time per label) --------------------------------------------------------

local prof = {time = {}, calls = {}, stack = {}}
local function wrap(tbl, key, label)
   local f = tbl[key]
   if type(f) ~= 'function' then return function() end end
   tbl[key] = function(...)
      local st = prof.stack
      st[#st + 1] = 0
      local t0 = now()
      local r = {f(...)}
      local dt = now() - t0
      local child = table.remove(st)
      prof.time[label] = (prof.time[label] or 0) + dt - child
      prof.calls[label] = (prof.calls[label] or 0) + 1
      if #st > 0 then st[#st] = st[#st] + dt end
      return unpack(r, 1, table.maxn(r))
   end
   return function() tbl[key] = f end
end

local function profiled(m, o)
   local undo = {}
   local function w(tbl, key, label) undo[#undo + 1] = wrap(tbl, key, label) end
   w(R.monitor, 'graph_of', 'graph (build or cache)')
   w(R.monitor, 'report', 'monitor.report')
   w(R.monitor, 'cost_fn', 'monitor.cost_fn')
   w(R.policy, 'reallocate', 'reallocate (bisection)')
   w(R.surgery, 'plans', 'surgery.plans')
   w(R.surgery, 'apply', 'surgery.apply (Lua, rest)')
   w(R.surgery, 'rescale', 'surgery.rescale')
   w(o, 'refresh', 'opt:refresh')
   w(o, 'set_state_of', 'opt:set_state_of')
   local Tensor = T.Tensor
   for _, k in ipairs({'index_select', 'index_copy', 'copy', 'fill', 'clone', 'narrow', 'contiguous', 'totable', 'mul_'}) do
      w(Tensor, k, 'Tensor:' .. k)
   end
   for _, k in ipairs({'zeros', 'empty', 'full', 'randn', 'tensor'}) do w(T, k, 'nr.' .. k) end
   if R.surgery.run_jobs then w(R.surgery, 'run_jobs', 'surgery.run_jobs (nr_surgery_place_many)') end
   for _, k in ipairs({'Conv2d', 'BatchNorm2d', 'Linear', 'NRConv2d'}) do
      if rawget(nr.nn[k], '__init') then w(nr.nn[k], '__init', 'nn.' .. k .. ' (constructor)') end
   end
   w(require('nr.nn.layer_util'), 'default_init', 'layer default_init (random)')
   -- (policy.init is not wrapped: a wrapped default would no longer be recognised as the default,
   -- which the surgery draws in C)
   collectgarbage()
   local t0 = now()
   rejuvenate(m, o)
   local total_t = now() - t0
   for i = #undo, 1, -1 do undo[i]() end
   return total_t
end

-- ---- run ------------------------------------------------------------------------------------------

local median = require('nr.profile').median

local function run_profile(when)
   local m, o = fresh()
   collectgarbage()
   collectgarbage()
   prof.time, prof.calls = {}, {}
   local tot = profiled(m, o)
   local rows, acc = {}, 0
   for k, v in pairs(prof.time) do rows[#rows + 1] = {k, v, prof.calls[k]}; acc = acc + v end
   table.sort(rows, function(a, b) return a[2] > b[2] end)
   print(string.format('profile (%s, with timers): total %.3f s; exclusive time per phase / op:', when, tot))
   for _, r in ipairs(rows) do print(string.format('  %-42s %8.1f ms  %6d calls', r[1], 1000 * r[2], r[3])) end
   print(string.format('  %-42s %8.1f ms', '(rest of nr.rejuvenate)', 1000 * (tot - acc)))
   return {total = tot, rows = rows, when = when}
end

print(string.format('rejuvenate_bench: ResNet-%d %dx%d, %d/%d prunable BN channels dead (%.1f%%), scheme %s, '
   .. 'constraint %s, threads %d%s', opt.depth, opt.input, opt.input, killed, total, 100 * killed / total, opt.scheme,
   opt.constraint, nr.get_num_threads(), opt.surgery ~= '' and (', surgery ' .. opt.surgery) or ''))

local profile
if opt.profile == 2 then profile = run_profile('the first rejuvenation of this process') end
local times, rep = {}, nil
for i = 1, opt.reps do
   local m, o = fresh()
   collectgarbage()
   collectgarbage()
   local t0 = now()
   rep = rejuvenate(m, o)
   times[i] = now() - t0
   print(string.format('  rep %d: %.3f s', i, times[i]))
end
print(string.format('alpha %.4f, FLOPs %.4g -> %.4g (target %.4g, error %+.3f%%), r_flops before %.3f',
   rep.alpha or 0, rep.before.flops_all, rep.cost, rep.target_cost, 100 * (rep.cost_error or 0), rep.before.r_flops))
local mn = math.huge
for _, t in ipairs(times) do mn = math.min(mn, t) end
local md = median(times)
print(string.format('%sRESULT rejuvenate wall: median %.3f s, min %.3f s, first %.3f s over %d reps',
   opt.tag ~= '' and (opt.tag .. ' ') or '', md, mn, times[1], #times))
if opt.profile == 1 then profile = run_profile('one more rep') end

if opt.json ~= '' then
   local f = assert(io.open(opt.json, 'w'))
   f:write(require('cjson').encode({tag = opt.tag, times = times, median = md, min = mn, profile = profile,
                                    alpha = rep.alpha, cost_error = rep.cost_error, threads = nr.get_num_threads()}))
   f:close()
end

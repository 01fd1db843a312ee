-- nr.rejuvenate — Neural Rejuvenation (Qiao et al., CVPR 2019): the public API.
--
--   nr.utilization(model, input_shape [, opts]) -> {params_live, params_all, flops_live, flops_all,
--        r_params, r_flops, layers = {...}}         any model, any time (REPL included)
--   nr.rejuvenate(model, opts) -> report             one rejuvenation: prune + expand + reinit
--                                                    [+ rescale] [+ CR/CA split]
--   require('nr.rejuvenate').attach(tr, recipe.nr)   wires it into nr.train: L1 on γ, adaptive λ,
--                                                    trigger, schedule hold, state, logs
--   require('nr.rejuvenate').l1(model, lambda [, input_shape])   adds λ·sign(γ) to γ's gradient
-- What it is not: the channel graph (graph.lua), masks and counts (monitor.lua), surgery
-- (surgery.lua), default decisions (policy.lua). docs/NR.md records the design choices.
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local graph = require 'nr.rejuvenate.graph'
local monitor = require 'nr.rejuvenate.monitor'
local surgery = require 'nr.rejuvenate.surgery'
local policy = require 'nr.rejuvenate.policy'
local C = nrffi.C
local now = require('nr.progress').now

local M = {graph = graph, monitor = monitor, surgery = surgery, policy = policy}

local function input_shape_of(model, given, fname)
   if given then
      check.arg(type(given) == 'table' and #given >= 1, fname, 'input_shape must be one sample\'s shape, e.g. {3, 32, 32}')
      -- as nr.count requires: a negative or fractional size gave a cost of 0, a string a raw error
      for i, v in ipairs(given) do
         if type(v) ~= 'number' or v < 1 or v >= 2 ^ 31 or v ~= math.floor(v) then
            error(string.format('%s: input_shape[%d] must be a positive integer, got %s', fname, i, check.show(v)), 3)
         end
      end
      return given
   end
   local info = rawget(model, 'nr_info')
   if info and info.input_size then
      -- without input_channels: the first convolution's (a 3 by default failed a grey-image model
      -- with "expects 1 input channels but the graph carries 3")
      local channels = info.input_channels
      if not channels then
         local first = model:findModules('Conv2d')[1]
         channels = first and first.in_channels or 3
      end
      return {channels, info.input_size, info.input_size}
   end
   error(fname .. ': input_shape is required (e.g. {3, 32, 32}); the model has no nr_info.input_size', 3)
end

local MON_KEYS = {threshold = true, abs_min = true, count = true}
-- The options nr.rejuvenate and attach share, checked where they are given (a typo in a recipe's
-- nr table fails at the start of a run, not hours later at the first rejuvenation).
local finite = check.finite
local function check_common(o, FN)
   local function is(v, set) return v == nil or set[v] == true end
   check.arg(is(o.constraint, {params = true, flops = true}), FN, 'constraint must be "params" or "flops", got %s', check.show(o.constraint))
   check.arg(is(o.scheme, {NR = true, CR = true, CA = true}), FN, 'scheme must be "NR", "CR" or "CA", got %s', check.show(o.scheme))
   check.arg(is(o.optim_state, {remap = true, drop = true}), FN, 'optim_state must be "remap" or "drop", got %s', check.show(o.optim_state))
   check.arg(is(o.linear_init, {zero = true, normal = true}), FN, 'linear_init must be "zero" or "normal", got %s', check.show(o.linear_init))
   check.arg(is(o.generations, {merge = true, keep = true}), FN, 'generations must be "merge" or "keep", got %s', check.show(o.generations))
   check.arg(o.budget == nil or (finite(o.budget) and o.budget >= 0), FN, 'budget must be a number >= 0 (a fraction of the cost C), got %s', check.show(o.budget))
   check.arg(o.gamma0 == nil or (finite(o.gamma0) and o.gamma0 > 0), FN, 'gamma0 must be a number > 0, got %s', check.show(o.gamma0))
   check.arg(o.threshold == nil or (finite(o.threshold) and o.threshold >= 0 and o.threshold < 1), FN,
      'threshold must be a fraction in [0, 1) of the layer\'s max |γ|, got %s', check.show(o.threshold))
   check.arg(o.abs_min == nil or (finite(o.abs_min) and o.abs_min >= 0), FN, 'abs_min must be a number >= 0, got %s', check.show(o.abs_min))
   check.arg(o.rescale == nil or type(o.rescale) == 'boolean', FN, 'rescale must be true or false, got %s', check.show(o.rescale))
   -- C: -1 shrank the model to width 1, NaN reached the policy as an absurd width
   check.arg(o.constraint_value == nil or (finite(o.constraint_value) and o.constraint_value > 0), FN,
      'constraint_value must be a finite number > 0 (the cost C), got %s', check.show(o.constraint_value))
   check.arg(o.count == nil or type(o.count) == 'table', FN, 'count must be a table such as {conv = true, bn = false}, got %s',
      check.show(o.count))
   for k, v in pairs(o.count or {}) do
      check.arg(monitor.DEFAULT_COUNT[k] ~= nil, FN, 'unknown count key %s (conv, linear, bn, bias)', tostring(k))
      check.arg(type(v) == 'boolean', FN, 'count.%s must be true or false, got %s', tostring(k), check.show(v))
   end
   local opt = o.optimizer
   for _, method in ipairs({'state_of', 'set_state_of', 'refresh'}) do
      check.arg(opt == nil or (type(opt) == 'table' and type(opt[method]) == 'function'), FN,
         'optimizer must be an nr.optim optimizer, got %s', type(opt) == 'table' and ('a table without :' .. method .. '()')
         or type(opt))
   end
end

-- With kept generations the function survives a rejuvenation only under the scheme the model's
-- generations were trained with, or from CR to another (its cross blocks are zero, not trained):
-- CA's gates have no NR or CR form, and NR's trained cross blocks no CR form (nor an ungated CA
-- one). The scheme a model was rejuvenated with shows in its layers: an NRConv2d carries it; a
-- plain conv over several generations was made by NR.
-- level: error's (where the message points); what: who asks ('nr.rejuvenate' or the resumed run).
local function refuse_scheme_switch(g, scheme, level, what)
   -- the distinct generations of some sets' channels now (monitor.cs_gens: from their producers)
   local function n_gens(sets)
      local seen, n = {}, 0
      for _, cs in ipairs(sets) do
         for _, x in ipairs(monitor.cs_gens(cs:root()) or {}) do
            if not seen[x.gen] then seen[x.gen], n = true, n + 1 end
         end
      end
      return n
   end
   local prev
   -- a trained read across generations without a gate: CR's block reading an input generation no
   -- output group has ("unread"), or a plain conv reading several generations (NR's, also one
   -- whose output is pinned to one generation). CA would gate it: O = A + 2 sigmoid(A) B
   local ungated_cross
   for _, u in ipairs(g.units) do
      local m = u.conv
      if m:typename() == 'NRConv2d' then
         prev = (prev == 'CA' or m.scheme == 'CA') and 'CA' or 'CR'
         for _, b in ipairs(rawget(m, 'blocks') or {}) do
            if b.unread and m.scheme ~= 'CA' then ungated_cross = u end
         end
      end
   end
   -- plain convs reading several generations: an ungated cross read; writing several too, and no
   -- NRConv2d about, the model was made by NR (CR and CA split such a conv; at the stem, reading
   -- the image, a plain conv is theirs too)
   for _, u in ipairs(g.units) do
      if u.kind == 'conv' and u.conv:typename() ~= 'NRConv2d' then
         local ins = {}
         for _, sg in ipairs(u.in_desc.segs) do ins[#ins + 1] = sg.cs end
         if n_gens(ins) > 1 then
            ungated_cross = ungated_cross or u
            if not prev and n_gens({u.out}) > 1 then prev = 'NR' end
         end
      end
   end
   if prev == 'CA' and scheme ~= 'CA' then
      error(string.format("%s: scheme '%s' with generations = 'keep' on a model rejuvenated with scheme 'CA': "
         .. "its cross-attention gates would be dropped and its function would change; rejuvenate it with scheme = 'CA' "
         .. '(a scheme is a per-run setting)', what, scheme), level)
   elseif prev == 'NR' and scheme ~= 'NR' then
      error(string.format("%s: scheme '%s' with generations = 'keep' on a model rejuvenated with scheme 'NR': "
         .. "its trained cross connections between generations would be %s and its function would change; rejuvenate it "
         .. "with scheme = 'NR' (a scheme is a per-run setting), or with generations = 'merge'", what, scheme,
         scheme == 'CR' and 'dropped' or 'gated'), level)
   end
   if scheme == 'CA' and prev ~= 'CA' and ungated_cross then
      error(string.format("%s: scheme 'CA' with generations = 'keep' on a model rejuvenated with scheme '%s': %s reads "
         .. 'channels of another generation without a gate, which cross attention would gate, changing its function; '
         .. "rejuvenate it with scheme = '%s' (a scheme is a per-run setting), or with generations = 'merge'", what,
         prev or 'NR', ungated_cross.conv:where(), prev or 'NR'), level)
   end
end

local function mon_opts(opts)
   return {threshold = opts.threshold or 0.01, abs_min = opts.abs_min or 1e-3, count = opts.count}
end

-- ---- utilization ------------------------------------------------------------------------------------

-- opts: threshold (0.01, relative to the layer's max |γ|), abs_min (1e-3: a layer whose max |γ|
-- is below is dead), count ({conv = true, linear = false, bn = false, bias = false}).
local function utilization(model, input_shape, opts)
   check.arg(type(model) == 'table' and model.listModules, 'nr.utilization', 'model must be an nr.nn module')
   opts = check.options(opts, MON_KEYS, 'nr.utilization')
   check_common(opts, 'nr.utilization')
   input_shape = input_shape_of(model, input_shape, 'nr.utilization')
   local g = monitor.graph_of(model, input_shape, 'nr.utilization')
   return (monitor.report(g, mon_opts(opts)))
end
function M.utilization(model, input_shape, opts) return check.at_caller(2, utilization, model, input_shape, opts) end

-- ---- L1 on γ -------------------------------------------------------------------------------------

-- The BN scales that get the L1 penalty: every unit's BN whose conv (or BN) is not nr_fixed.
local function penalized(model, input_shape)
   local cache = model:transient().nr_l1
   if cache and graph.unchanged(model, cache.snap) then return cache.list end
   local list = {}
   local g = monitor.graph_of(model, input_shape)
   for _, u in ipairs(g.units) do
      if u.bn and u.bn.weight and not u.fixed then list[#list + 1] = u.bn end
   end
   model:transient().nr_l1 = {snap = graph.snapshot(model), list = list}
   return list
end
M.penalized = penalized

function M.l1(model, lambda, input_shape)
   -- NaN would make every BN gradient NaN
   check.arg(type(lambda) == 'number' and lambda >= 0 and lambda < math.huge, 'nr.rejuvenate.l1',
      'lambda must be a finite number >= 0, got %s', check.show(lambda))
   if lambda == 0 then return 0 end
   input_shape = input_shape_of(model, input_shape, 'nr.rejuvenate.l1')
   local list = penalized(model, input_shape)
   for _, bn in ipairs(list) do
      local st = C.nr_l1_sign_add(bn.weight.c, bn.gradWeight.c, lambda)
      if st ~= 0 then check.status(st, 'nr.rejuvenate.l1 (' .. bn:where() .. ')') end
   end
   return #list
end

-- ---- rejuvenate ------------------------------------------------------------------------------------

-- widths beyond any real layer (a policy bug, e.g. math.huge) are refused before surgery allocates
local MAX_WIDTH = 2 ^ 20

local REJ_KEYS = {input_shape = true, threshold = true, abs_min = true, count = true, generations = true,
                  constraint = true, constraint_value = true, budget = true, scheme = true, rescale = true,
                  gamma0 = true, optimizer = true, optim_state = true, policy = true, linear_init = true}

local function merged_policy(p)
   check.arg(p == nil or type(p) == 'table', 'nr.rejuvenate', 'policy must be a table of functions '
      .. '{when, lambda, reallocate, init, rescale}, got %s', check.show(p))
   local out = {}
   for k, v in pairs(policy) do out[k] = v end
   for k, v in pairs(p or {}) do
      check.arg(type(v) == 'function', 'nr.rejuvenate', 'policy.%s must be a function, got %s', tostring(k), type(v))
      check.arg(policy[k] ~= nil and k ~= 'make_solver' and k ~= 'shared_widths', 'nr.rejuvenate',
         'unknown policy %q (when, lambda, reallocate, init, rescale)', tostring(k))
      out[k] = v
   end
   return out
end
M.merged_policy = merged_policy

local function summary(rep)
   return {params_live = rep.params_live, params_all = rep.params_all, flops_live = rep.flops_live,
           flops_all = rep.flops_all, r_params = rep.r_params, r_flops = rep.r_flops}
end

-- The rescale policy's answer, which must be a boolean (nil: no).
function M.ask_rescale(pol, ctx)
   local v = pol.rescale(ctx)
   check.arg(type(v) == 'boolean', 'nr.rejuvenate policy.rescale', 'must return true or false, got %s%s', check.show(v),
      v == nil and ' (a function that ends without return gives nil)' or '')
   return v == true
end

-- The layers whose death cut the model's output off its input (every channel feeding the
-- classifiers, or the output when there is none, is dead), named in forward order (at most 3, the
-- ones dead by their own γ); nil when live channels reach it.
local function cut_by(g, st)
   local feeding = {}
   if #g.linears > 0 then
      for _, l in ipairs(g.linears) do for _, sg in ipairs(l.desc.segs) do feeding[#feeding + 1] = sg.cs:root() end end
   else
      for _, sg in ipairs(g.output_desc.segs) do feeding[#feeding + 1] = sg.cs:root() end
   end
   -- (a Linear reading another's output, an MLP head: its input is judged at the first Linear)
   local judged = false
   for _, r in ipairs(feeding) do
      if r.kind ~= 'terminal' then
         judged = true
         if (st.cs_live[r] or r.width) > 0 then return nil end
      end
   end
   if not judged then return nil end
   local names = {}
   for _, u in ipairs(g.units) do
      if st.own_live[u] == 0 and #names < 3 then names[#names + 1] = string.format('%q', u.conv:path()) end
   end
   -- none dead by its own γ: a set the depthwise rule emptied (its producer's live channels are
   -- the ones its depthwise conv found dead)
   for _, u in ipairs(g.units) do
      if #names == 0 and u.out and (st.cs_live[u.out:root()] or 1) == 0 then
         names[1] = string.format('%q (its live channels are the ones a depthwise conv after it found dead)', u.conv:path())
      end
   end
   if #names == 0 then names[1] = '(one of them)' end
   return names
end

-- opts: input_shape, threshold, abs_min, count (as utilization); constraint ('params' | 'flops');
-- budget (fraction of C, default 1 = keep the cost; 0.5 = compression mode, Table 4; 0 = prune
-- only; a budget below the live cost shrinks live widths too, dropping the lowest |γ|);
-- constraint_value (C; default the model's current full cost); scheme ('NR' | 'CR' | 'CA');
-- rescale (bool); gamma0 (default model.nr_info.gamma0 or 1); optimizer (remaps its state: momentum, Adam's moments);
-- optim_state ('remap' | 'drop'); linear_init ('zero' | 'normal'); policy ({reallocate, init, ...}).
local function rejuvenate(model, opts)
   local FN = 'nr.rejuvenate'
   check.arg(type(model) == 'table' and model.listModules, FN, 'model must be an nr.nn module')
   opts = check.options(opts, REJ_KEYS, FN)
   local input_shape = input_shape_of(model, opts.input_shape, FN)
   check_common(opts, FN)
   local constraint = opts.constraint or 'params'
   local scheme = opts.scheme or 'NR'
   local info = rawget(model, 'nr_info') or {}
   local gamma0 = opts.gamma0 or info.gamma0 or 1
   local pol = merged_policy(opts.policy)
   local mo = mon_opts(opts)

   local g = monitor.graph_of(model, input_shape)
   -- a NaN or inf γ (a diverged run) would make every other channel of its layer look dead
   for _, u in ipairs(g.units) do
      local gamma = u.bn and u.bn.weight
      check.arg(not gamma or gamma:all_finite(), FN, '%s: γ holds non-finite values (NaN or inf): training diverged; '
         .. 'resume from an earlier checkpoint', gamma and u.bn:where())
   end
   local before, st = monitor.report(g, mo)
   st = monitor.detach(st) -- its masks stay these while the policy runs (it may measure the model again)
   local key = constraint == 'params' and 'params' or 'flops'
   local all_now, live_now = before[key .. '_all'], before[key .. '_live']
   local Cval = opts.constraint_value or all_now
   local target = (opts.budget or 1) * Cval
   -- generations: 'merge' (the paper's S and R: every survivor joins S, whichever rejuvenation
   -- made it) or 'keep' (each rejuvenation's channels stay a group of their own)
   local merge = (opts.generations or 'merge') == 'merge'
   if not merge then refuse_scheme_switch(g, scheme, 3, FN) end
   local generation = (rawget(model, 'nr_generation') or surgery.max_gen(g)) + 1
   local next_gen = merge and 1 or generation
   local cost_fn = monitor.cost_fn(g, st, {count = opts.count, scheme = scheme, next_gen = next_gen, merge = merge})

   -- the resizable channel sets, as the policy sees them
   local layers, root_of = {}, {}
   for _, r in ipairs(g.roots) do
      if r.kind == 'unit' and not r.pinned then
         local id = #layers + 1
         local names, gsum, gn = {}, 0, 0
         for _, u in ipairs(r.or_members) do names[#names + 1] = u.conv:path() end
         for _, e in ipairs(r.and_members) do names[#names + 1] = e.unit.conv:path() end
         local a = st.cs[r]
         for _, u in ipairs(r.or_members) do
            if u.bn and u.bn.weight then
               local gam = u.bn.weight:totable()
               for i = 1, #gam do if a[i - 1] ~= 0 then gsum = gsum + math.abs(gam[i]); gn = gn + 1 end end
            end
         end
         layers[id] = {id = id, name = names[1], members = names, live = st.cs_live[r], width = r.width,
                       fixed = r.fixed or false, mean_gamma = gn > 0 and gsum / gn or 0,
                       kind = r.or_members[1].kind}
         root_of[id] = r
      end
   end
   -- no BN-scaled conv channels at all (an MLP): an error, as nr.train's attach says it (by hand
   -- it returned α = 2^65 over a cost of 0); every set pinned (read whole) leaves the widths as they
   -- are, with no α (reallocate is not asked)
   check.arg(#g.units > 0, FN, 'the model has no channels Neural Rejuvenation can resize (a Conv2d whose output '
      .. 'channels a BatchNorm2d scales): nothing to prune or grow')
   local any_live = #layers == 0
   for _, l in ipairs(layers) do any_live = any_live or l.live > 0 end
   -- (γ may live where the depthwise rule left no channel: a producer's live channel is the one
   -- its depthwise conv found dead)
   local own_any = false
   for _, u in ipairs(g.units) do own_any = own_any or (not u.fixed and (st.own_live[u] or 0) > 0) end
   check.arg(any_live or (opts.budget or 1) == 0, FN,
      'no live channel in any resizable layer (%s), so there is nothing to rejuvenate from; the L1 penalty (lambda) was '
      .. 'too strong or training diverged', own_any and 'the channels whose |γ| live are the ones a depthwise conv after '
      .. 'them found dead: a depthwise channel and its producer\'s live only together'
      or 'every |γ| is below the liveliness threshold')
   -- every channel that feeds the classifiers (or the output) dead: a layer on every path died as
   -- a whole, the model's output no longer depends on its input, and a reallocation would grow the
   -- layers before that cut and leave one-channel stubs after it (the authors' code breaks there)
   local cut = cut_by(g, st)
   check.arg(not cut or (opts.budget or 1) == 0, FN,
      'no live channel reaches the model\'s output: %s %s no live channel, so every layer after it on every path is '
      .. 'dead and the output no longer depends on the input; a rejuvenation would keep one-channel stubs there. '
      .. 'The L1 penalty (lambda) was too strong for this model (lower lambda.dl or raise target)',
      cut and ((#cut > 1 and 'layers ' or 'layer ') .. table.concat(cut, ', ')), cut and (#cut > 1 and 'have' or 'has'))
   -- whose: who handed widths over, for the message ("reallocate returned", "budget.cost got")
   local function by_root(widths, whose)
      local w = {}
      for id, v in pairs(widths) do
         local r = root_of[id]
         check.arg(r ~= nil, FN, '%s a width for unknown layer id %s (widths are keyed by layers[i].id%s)', whose,
            check.show(id), layers[1] and (', e.g. ' .. check.show(layers[1].id)) or '')
         w[r] = v
      end
      return w
   end
   local function cost(widths)
      check.arg(type(widths) == 'table', 'nr.rejuvenate budget.cost', 'widths must be a table {[layer id] = width}, got %s',
         check.show(widths))
      for id, w in pairs(widths) do
         check.arg(type(w) == 'number' and w >= 0 and w == math.floor(w), 'nr.rejuvenate budget.cost',
            'width of layer %s must be a whole number, got %s', check.show(id), check.show(w))
      end
      local p, f = cost_fn(by_root(widths, 'budget.cost got'))
      return key == 'params' and p or f
   end
   local budget = {target = target, constraint = constraint, cost = cost, live_cost = live_now, all_cost = all_now,
                   constraint_value = Cval}
   budget.solve = policy.make_solver(cost, target)
   local widths, rinfo
   if (opts.budget or 1) == 0 or #layers == 0 then
      widths, rinfo = {}, {prune_only = true}   -- budget 0: remove dead channels, add nothing
   else
      widths, rinfo = pol.reallocate(layers, budget)
   end
   rinfo = rinfo or {}
   check.arg(type(widths) == 'table', FN, 'reallocate must return a table of widths by layer id')
   -- its info goes into the report and the run's log: checked before anything is changed
   check.arg(type(rinfo) == 'table', FN, 'reallocate: its second result (info) must be a table or nil, got %s', check.show(rinfo))
   for id, w in pairs(widths) do
      check.arg(type(w) == 'number' and w >= 1 and w == math.floor(w) and w <= MAX_WIDTH, FN,
         'reallocate: width of layer %s must be an integer in [1, 2^20], got %s', check.show(id), check.show(w))
   end
   local root_widths = by_root(widths, 'reallocate returned')
   local planned = cost(widths)

   -- surgery
   local opt = opts.optimizer
   local plans = surgery.plans(g, st, root_widths, next_gen, merge)
   local ctx = {opt = opt, optim_state = opts.optim_state or 'remap', gamma0 = gamma0, scheme = scheme,
                init = pol.init, linear_init = opts.linear_init or 'zero'}
   -- (the new tensors are built before any layer changes: a failure leaves the model as it was)
   local built, res, moms = pcall(surgery.apply, g, plans, ctx)
   if not built then
      if type(res) ~= 'string' then error(res, 0) end -- a policy's own error object, as it threw it
      -- policy.init's own failure (an error at a line of the user's, as reallocate's is raised, or
      -- what it returned refused): the widths are not the cause
      local stripped, dropped = check.without_library_position(res)
      if dropped == 0 and res:match('^[^\n:]-%.lua:%d+: ') then error(res, 0) end
      if stripped:find('policy.init', 1, true) then
         error(string.format('%s: %s', FN, (stripped:gsub('^nr%.rejuvenate: ', ''))), 2)
      end
      local big_id, big = nil, 0
      for id, w in pairs(widths) do if w > big then big_id, big = id, w end end
      -- (a library position is dropped; a policy.init error keeps the user's file and line)
      error(string.format('%s: building the new layers failed (the widths reallocate returned: planned cost %s, the '
         .. 'widest layer %s with %d channels): %s', FN, tostring(planned), check.show(big_id), big,
         (check.without_library_position(res))), 2)
   end
   if opt then
      opt:refresh()
      for _, e in ipairs(moms) do opt:set_state_of(e.param, e.state) end
   end
   monitor.invalidate(model)
   model:transient().nr_l1 = nil
   model.nr_generation = generation   -- rejuvenations so far (with merged generations the layout no longer counts them)

   local rescaled = 0
   local do_rescale = opts.rescale
   if do_rescale == nil then do_rescale = M.ask_rescale(pol, {cfg = {rescale = false}, model = model}) end
   if do_rescale then rescaled = surgery.rescale(monitor.graph_of(model, input_shape), gamma0, opt) end

   local after = monitor.report(monitor.graph_of(model, input_shape), mo)
   local new_cost = after[key .. '_all']
   local out_layers = {}
   for id, l in ipairs(layers) do
      local p = plans[root_of[id]]
      out_layers[id] = {name = l.name, members = l.members, width_before = l.width, live = l.live,
                        width_after = p.w, fixed = l.fixed}
   end
   return {
      before = summary(before), after = summary(after), constraint = constraint, scheme = scheme,
      constraint_value = Cval, budget = opts.budget or 1, target_cost = target, planned_cost = planned,
      cost = new_cost, cost_error = target > 0 and (new_cost - target) / target or nil,
      -- the authors' rule: sqrt(all / live) of the model's current full cost, whatever the budget
      alpha = rinfo.alpha, alpha_sqrt = live_now > 0 and math.sqrt(all_now / live_now) or nil,
      policy_info = rinfo, layers = out_layers, rescaled = rescaled, generation = generation,
   }
end
function M.rejuvenate(model, opts) return check.at_caller(2, rejuvenate, model, opts) end

-- One console line for a rejuvenation report (nr.rejuvenate's result): index (the run's count),
-- epoch and step when it ran in training.
function M.describe(rep, index, epoch, step)
   local key = rep.constraint == 'flops' and 'flops' or 'params'
   local function size(v)
      if key == 'params' then return v >= 1e6 and string.format('%.3gM', v / 1e6) or string.format('%.4gk', v / 1e3) end
      return v >= 1e9 and string.format('%.3gG', v / 1e9) or string.format('%.4gM', v / 1e6)
   end
   local widths
   if #rep.layers <= 8 then
      local a, b = {}, {}
      for i, l in ipairs(rep.layers) do a[i], b[i] = l.width_before, l.width_after end
      widths = string.format('widths %s -> %s', table.concat(a, '/'), table.concat(b, '/'))
   else
      local grew, shrank = 0, 0
      for _, l in ipairs(rep.layers) do
         if l.width_after > l.width_before then grew = grew + 1 elseif l.width_after < l.width_before then shrank = shrank + 1 end
      end
      widths = string.format('%d of %d layers wider, %d narrower', grew, #rep.layers, shrank)
   end
   local e = rep.cost_error or 0
   -- budget 0 prunes only: no budget to be under
   local against = rep.budget == 0 and 'a pure prune'
      or string.format('%.2f%% %s the budget', 100 * math.abs(e), e > 0 and 'over' or 'under')
   return string.format('nr: rejuvenation %d%s (%s): r_%s %.3f -> %.3f, alpha %s, %s %s -> %s (%s), %s%s',
      index or 1, epoch and string.format(' in epoch %d, step %d', epoch, step or 0) or '', rep.scheme, key,
      rep.before['r_' .. key], rep.after['r_' .. key], rep.alpha and string.format('%.3g', rep.alpha) or '-', key,
      size(rep.before[key .. '_all']), size(rep.cost), against,
      widths, (rep.rescaled or 0) > 0 and string.format(', %d channels rescaled', rep.rescaled) or '')
end

-- ---- trainer integration -------------------------------------------------------------------------------

local CFG_KEYS = {enabled = true, target = true, budget = true, constraint = true, scheme = true, rescale = true,
                  times = true, active_epochs = true, lambda = true, policy = true, threshold = true,
                  abs_min = true, count = true, gamma0 = true, optim_state = true, hold_schedule = true,
                  extend_epochs = true, input_shape = true, linear_init = true, generations = true}
local LAMBDA_KEYS = {mode = true, init = true, dt = true, dr = true, dl = true, value = true}

-- Rebuilds a trainer's model to a rejuvenated architecture recorded in a checkpoint
-- (states.nr.arch): widths and split layers, before the weights are loaded. Used by attach's
-- state and by nr.train for a run resumed with NR off (--nr off), whose model is still the one
-- the checkpoint holds.
function M.restore_arch(tr, arch)
   surgery.apply_arch(tr.model, arch)
   monitor.invalidate(tr.model)
   tr.model:transient().nr_l1 = nil
   if tr.optimizer and tr.optimizer.refresh then tr.optimizer:refresh() end
end

-- attach(tr, cfg): cfg is the recipe's nr table:
--   target (T_r, 0.5), budget (1.0), constraint ('params'), scheme ('NR'), rescale (false),
--   times (1), active_epochs (nil = always), hold_schedule (true), extend_epochs (true: the held
--   epochs lengthen the run, tr.extend_held, up to the recipe's max_epochs), gamma0, threshold, abs_min,
--   count, optim_state ('remap'), linear_init ('zero'), input_shape (default: the trainer's loader's
--   sample shape, else model.nr_info),
--   lambda = {mode = 'adaptive' | 'constant', init = 0, dt = 'epoch' | N steps, dr = 0.01,
--             dl = 5e-5, value}, policy = {when, lambda, reallocate, init, rescale}.
-- Returns the controller (its fields: lambda, r_hist, lambda_hist, rejuvenations (all, restored on
-- --resume), reports (this process's rejuvenations; the run's metrics.jsonl has an 'nr' event for each
-- one, those before a resume included)).
function M.attach(tr, cfg)
   local FN = 'nr.rejuvenate.attach'
   cfg = check.options(cfg or {}, CFG_KEYS, FN)
   local lam = check.options(cfg.lambda or {}, LAMBDA_KEYS, FN .. ' (lambda)')
   local c = {}
   for k, v in pairs(cfg) do c[k] = v end
   c.target = c.target or 0.5
   c.times = c.times or 1
   c.constraint = c.constraint or 'params'
   c.lambda = {mode = lam.mode or 'adaptive', init = lam.init or 0, dt = lam.dt or 'epoch', dr = lam.dr or 0.01,
               dl = lam.dl or 5e-5, value = lam.value}
   check_common(c, FN)
   check.arg(finite(c.target) and c.target > 0 and c.target <= 1, FN, 'target (T_r) must be in (0, 1], got %s', check.show(c.target))
   check.arg(type(c.times) == 'number' and c.times >= 1 and c.times == math.floor(c.times), FN,
      'times must be an integer >= 1, got %s', check.show(c.times))
   check.arg(c.active_epochs == nil or (type(c.active_epochs) == 'number' and c.active_epochs >= 1), FN,
      'active_epochs must be a number of epochs >= 1, got %s', check.show(c.active_epochs))
   check.arg(c.lambda.mode == 'adaptive' or c.lambda.mode == 'constant', FN, 'lambda.mode must be "adaptive" or "constant"')
   -- without a value a constant λ was 0: no sparsification, the run held until max_epochs
   check.arg(c.lambda.mode ~= 'constant' or c.lambda.value ~= nil, FN, 'lambda.mode "constant" needs lambda.value (the λ)')
   for _, k in ipairs({'init', 'dr', 'dl', 'value'}) do
      local v = c.lambda[k]
      check.arg(v == nil or (finite(v) and v >= 0), FN, 'lambda.%s must be a number >= 0, got %s', k, check.show(v))
   end
   check.arg(c.lambda.dt == 'epoch' or (type(c.lambda.dt) == 'number' and c.lambda.dt >= 1), FN,
      'lambda.dt must be "epoch" or a number of steps >= 1')
   check.arg(c.extend_epochs == nil or type(c.extend_epochs) == 'boolean', FN, 'extend_epochs must be true or false, got %s',
      check.show(c.extend_epochs))
   local pol = merged_policy(c.policy)
   local ctl = {cfg = c, lambda = c.lambda.mode == 'constant' and (c.lambda.value or 0) or c.lambda.init,
                r_prev = 1, r_hist = {}, lambda_hist = {}, rejuvenations = 0, reports = {},
                monitor_ms = 0, monitor_calls = 0}
   local key = c.constraint == 'flops' and 'r_flops' or 'r_params'

   -- one sample's shape: cfg.input_shape, else the trainer's loader (the data the model trains
   -- on: a zoo model's nr_info.input_size may be another, e.g. 64 for 28x28 images), else the
   -- model's nr_info
   local function shape()
      if c.input_shape then return input_shape_of(tr.model, c.input_shape, FN) end
      local l = tr.train_loader
      if l and type(l.shape) == 'table' and #l.shape == 4 then return {l.shape[2], l.shape[3], l.shape[4]} end
      if l and type(l.x) == 'table' and l.x.shape then
         local s = l.x:shape()
         if #s == 4 then return {s[2], s[3], s[4]} end
      end
      return input_shape_of(tr.model, nil, FN)
   end
   -- NR acts in epoch `epoch` (default: the one training now)
   local function active(epoch)
      if c.enabled == false then return false end
      if c.active_epochs and (epoch or tr.epoch or 1) > c.active_epochs then return false end
      return ctl.rejuvenations < c.times
   end
   local function set_hold(epoch)
      if c.hold_schedule ~= false then tr.schedule_hold = active(epoch) end
   end
   -- in a check: the hold is taken at once but released only where an epoch ends (epoch_end,
   -- train_begin), so after a rejuvenation mid-epoch (Δt in steps) the rest of that epoch trains
   -- at the held LR and the schedule runs from the next one (released at once, it ran for the
   -- rest of the epoch and went back where the release found it: a cosine LR fell, then rose)
   local function keep_hold()
      if c.hold_schedule ~= false and active() then tr.schedule_hold = true end
   end
   -- the authors shift the schedule by the sparsification epochs: the run grows by the held ones
   tr.extend_held = c.hold_schedule ~= false and c.extend_epochs ~= false
   -- NR reads liveliness from the BatchNorm scales of the channels it can resize: a model with
   -- none (an MLP, only main-stream layers) kept r at 1 and its schedule held until max_epochs
   if c.enabled ~= false then
      local u = M.utilization(tr.model, shape(), {threshold = c.threshold, abs_min = c.abs_min, count = c.count})
      if u.params_all == 0 then
         error(string.format('%s: the model has no channels Neural Rejuvenation can resize (a Conv2d whose output '
            .. 'channels a BatchNorm2d scales, outside the nr_fixed main stream): nothing to measure or prune; train it '
            .. 'without NR (--nr off)', FN), 0)
      end
   end

   local function check_point()
      if not active() then
         ctl.lambda = 0
         return
      end
      local t0 = now()
      local u = M.utilization(tr.model, shape(), {threshold = c.threshold, abs_min = c.abs_min, count = c.count})
      ctl.monitor_ms = ctl.monitor_ms + (now() - t0) * 1000
      ctl.monitor_calls = ctl.monitor_calls + 1
      local r = u[key]
      ctl.r_hist[#ctl.r_hist + 1] = {epoch = tr.epoch, step = tr.step, r_params = u.r_params, r_flops = u.r_flops}
      ctl.lambda_hist[#ctl.lambda_hist + 1] = ctl.lambda
      local ctx = {r = r, r_prev = ctl.r_prev, util = u, cfg = c, lambda = ctl.lambda, rejuvenations = ctl.rejuvenations,
                   epoch = tr.epoch, step = tr.step, trainer = tr}
      if tr.log then
         tr:log({kind = 'nr', event = 'check', epoch = tr.epoch, step = tr.step, r_params = u.r_params,
                 r_flops = u.r_flops, lambda = ctl.lambda})
      end
      local go = pol.when(ctx)
      -- (nil too: a `when` without a return never rejuvenated, and the run stayed held to max_epochs)
      check.arg(type(go) == 'boolean', 'nr.rejuvenate policy.when', 'must return true or false, got %s%s', check.show(go),
         go == nil and ' (a function that ends without return gives nil)' or '')
      if go then
         if not ctl.C then
            ctl.C = c.constraint == 'flops' and u.flops_all or u.params_all
         end
         local rep = M.rejuvenate(tr.model, {
            input_shape = shape(), threshold = c.threshold, abs_min = c.abs_min, count = c.count,
            constraint = c.constraint, constraint_value = ctl.C, budget = c.budget or 1, scheme = c.scheme or 'NR',
            rescale = M.ask_rescale(pol, ctx), gamma0 = c.gamma0, optimizer = tr.optimizer,
            optim_state = c.optim_state, linear_init = c.linear_init, generations = c.generations,
            policy = {reallocate = pol.reallocate, init = pol.init},
         })
         ctl.rejuvenations = ctl.rejuvenations + 1
         rep.lambda_history = ctl.lambda_hist
         rep.r_history = ctl.r_hist
         rep.epoch, rep.step = tr.epoch, tr.step
         ctl.reports[#ctl.reports + 1] = rep
         if tr.log then
            tr:log({kind = 'nr', event = 'rejuvenate', epoch = tr.epoch, step = tr.step, index = ctl.rejuvenations,
                    r_before = {params = rep.before.r_params, flops = rep.before.r_flops},
                    r_after = {params = rep.after.r_params, flops = rep.after.r_flops},
                    cost = rep.cost, target_cost = rep.target_cost, cost_error = rep.cost_error,
                    alpha = rep.alpha, alpha_sqrt = rep.alpha_sqrt, lambda_history = ctl.lambda_hist,
                    scheme = rep.scheme, rescaled = rep.rescaled, layers = rep.layers,
                    size_before = {params = rep.before.params_all, flops = rep.before.flops_all},
                    size_after = {params = rep.after.params_all, flops = rep.after.flops_all},
                    model_params = tr.model:nParameters(),
                    policy_info = next(rep.policy_info or {}) and rep.policy_info or nil})
         end
         if tr.print then tr:print(M.describe(rep, ctl.rejuvenations, tr.epoch, tr.step)) end
         -- the default reallocation stays within the budget; a replaced one is applied as it
         -- returned, so a cost well past the target is worth a line on the console
         if rep.cost_error and rep.cost_error > 0.01 and tr.print then
            tr:print(string.format('nr: the reallocation costs %.1f%% more than the target (%s %.4g vs %.4g)',
               100 * rep.cost_error, c.constraint, rep.cost, rep.target_cost))
         end
         ctl.lambda = c.lambda.mode == 'constant' and (c.lambda.value or 0) or 0
         ctl.r_prev = 1
         ctl.lambda_hist = {}
         ctl.r_hist = {}
      else
         local l = pol.lambda(ctx)
         check.arg(finite(l) and l >= 0, 'nr.rejuvenate policy.lambda', 'must return a finite number >= 0, got %s', check.show(l))
         ctl.lambda = l
         ctl.r_prev = r
      end
      keep_hold()
   end
   ctl.check = check_point

   -- the epoch's console line: utilization against the target and λ, while NR sparsifies
   if tr.add_status then
      tr:add_status(function()
         if not active() then return nil end
         local u = M.utilization(tr.model, shape(), {threshold = c.threshold, abs_min = c.abs_min, count = c.count})
         return string.format('nr %s %.3f (target %g) lambda %.3g', key, u[key], c.target, ctl.lambda)
      end)
   end
   tr:add_hook('train_begin', function()
      if not ctl.C then
         local u = M.utilization(tr.model, shape(), {threshold = c.threshold, abs_min = c.abs_min, count = c.count})
         ctl.C = c.constraint == 'flops' and u.flops_all or u.params_all
      end
      set_hold((tr.epoch or 0) + 1) -- the epoch about to train (tr.epoch: the last one done)
   end)
   tr:add_hook('after_backward', function()
      if ctl.lambda ~= 0 and active() then M.l1(tr.model, ctl.lambda, shape()) end
   end)
   -- a check every Δt steps runs after the optimizer step, as in Algorithm 1 (update, then check):
   -- before it, a rejuvenation would discard that step's gradients (surgery zeroes them)
   tr:add_hook('after_step', function()
      if c.lambda.dt ~= 'epoch' and tr.step and tr.step % c.lambda.dt == 0 then check_point() end
   end)
   tr:add_hook('epoch_end', function()
      if c.lambda.dt == 'epoch' then check_point() end
      -- the last epoch of active_epochs ended: the next one trains without the penalty, its
      -- schedule running (checked there, the hold held that whole epoch too)
      local nxt = (tr.epoch or 0) + 1
      if not active(nxt) then ctl.lambda = 0 end
      set_hold(nxt)
   end)
   if tr.register_state then
      tr:register_state('nr', {
         before_weights = true,
         save = function()
            return {lambda = ctl.lambda, r_prev = ctl.r_prev, r_hist = ctl.r_hist, lambda_hist = ctl.lambda_hist,
                    rejuvenations = ctl.rejuvenations, C = ctl.C, constraint = c.constraint,
                    arch = ctl.rejuvenations > 0 and surgery.arch_state(tr.model) or nil}
         end,
         load = function(s)
            ctl.lambda, ctl.r_prev = s.lambda or ctl.lambda, s.r_prev or 1
            ctl.r_hist, ctl.lambda_hist = s.r_hist or {}, s.lambda_hist or {}
            ctl.rejuvenations, ctl.C = s.rejuvenations or 0, s.C
            -- C (the budget: the cost at the start) was measured under the run's constraint; a
            -- resume under the other one would compare FLOPs with a parameter count
            if s.constraint ~= nil and s.constraint ~= c.constraint then
               check.arg(ctl.rejuvenations == 0, FN, 'this run rejuvenated under constraint %s; resuming it under %s '
                  .. 'would need the cost of the model it started from: keep --nr.constraint %s (or start a new run)',
                  tostring(s.constraint), tostring(c.constraint), tostring(s.constraint))
               ctl.C = nil -- the model is still the one it started as: measured again at train_begin
            end
            if ctl.rejuvenations > 0 then tr.model.nr_generation = ctl.rejuvenations end
            if s.arch then M.restore_arch(tr, s.arch) end
            -- a resumed run with rejuvenations to go under another scheme: refused now, not at
            -- the next rejuvenation, epochs later
            if s.arch and ctl.rejuvenations < c.times and c.generations == 'keep' then
               refuse_scheme_switch(monitor.graph_of(tr.model, shape()), c.scheme or 'NR', 0,
                  FN .. ' (resuming a run rejuvenated ' .. ctl.rejuvenations .. ' time(s))')
            end
         end,
      })
   end
   tr.nr = ctl
   return ctl
end

return M

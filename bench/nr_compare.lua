-- bench/nr_compare.lua — the paper's comparison (Table 4 / Table 1 style), scaled to Fashion-MNIST
-- and a small CIFAR-style VGG so that it runs on a CPU:
--   baseline          plain training
--   slimming          Network Slimming: L1 on γ (constant λ) for the first half, prune with one
--                     global |γ| threshold to the same size as NR-CR (0.5 × C params), fine-tune
--   nr_cr             NR-CR, rejuvenated to 0.5 × C params (compression mode, T_r = 0.25)
--   nr                NR (cross connections kept), back to 1.0 × C (T_r = 0.5)
--   nr_ca             NR-CA with neural rescaling, back to 1.0 × C (T_r = 0.5)
-- Same epoch budget and the same cosine LR schedule for every method (no schedule hold here,
-- so the budgets are equal; NR's recipe default holds the LR while sparsifying).
--
--   nrlua bench/nr_compare.lua                                   # defaults below
--   nrlua bench/nr_compare.lua --seeds 3 --epochs 10 --train_batches 0 --val_batches 0 --width 1
--
-- Options: --seeds N (3), --epochs E (4), --batch B (32), --train_batches K (50 per epoch; 0 =
-- all), --val_batches V (30; 0 = the full 10k test set), --width W (channel multiplier, 0.5),
-- --methods list, --out DIR (runs/nr_compare), --dt steps between λ checks (4), --dl Δλ (4e-3),
-- --threshold liveliness threshold relative to the layer max (0.05: short runs; the paper's
-- 0.01 needs λ·lr small enough that dead γ settle within 1% of the max, i.e. long runs),
-- --ns_lambda Network Slimming's constant λ (0.02), --lr (0.1),
-- --data PATH (/usr/share/datasets/fashion-mnist). The defaults fit a shared 2-core CPU.
-- NR rejuvenates when r < T_r, or at the end of the sparsification window (half the epochs) if
-- r has not reached T_r by then (the report says which). Output: a markdown table (mean ± std
-- error over seeds: test top-1, params, FLOPs, wall time) on stdout and in OUT/results.md, and
-- one JSON line per run in OUT/runs.jsonl.
local nr = require 'nr'
local nn = nr.nn
local train = require 'nr.train'
local R = require 'nr.rejuvenate'
local ck = require 'nr.checkpoint'
local now = require('nr.progress').now

local args = {...}
local opt = {seeds = 3, epochs = 4, batch = 32, train_batches = 50, val_batches = 30, width = 0.5,
             methods = 'baseline,slimming,nr_cr,nr,nr_ca', out = 'runs/nr_compare', dt = 4, dl = 4e-3,
             threshold = 0.05, ns_lambda = 0.02, data = '/usr/share/datasets/fashion-mnist', lr = 0.1}
do
   local i = 1
   while i <= #args do
      local k = args[i]:match('^%-%-(.+)$')
      assert(k and opt[k] ~= nil and args[i + 1], 'nr_compare: unknown or incomplete option ' .. tostring(args[i]))
      local v = args[i + 1]
      opt[k] = tonumber(v) or v
      i = i + 2
   end
end

local INPUT = {1, 28, 28}

-- CIFAR-style VGG (conv3x3-BN-ReLU, max-pools, GAP, one FC), γ init 0.5 as the authors' VGG.
local function vgg(width)
   return function()
      local cfg = {32, 32, 'M', 64, 64, 'M', 128, 128}
      local layers, c = {}, 1
      for _, v in ipairs(cfg) do
         if v == 'M' then
            layers[#layers + 1] = nn.MaxPool2d(2)
         else
            local w = math.max(1, math.floor(v * width))
            layers[#layers + 1] = nn.Conv2d(c, w, 3, {padding = 1, bias = false})
            layers[#layers + 1] = nn.BatchNorm2d(w)
            layers[#layers + 1] = nn.ReLU()
            c = w
         end
      end
      layers[#layers + 1] = nn.GlobalAvgPool2d()
      layers[#layers + 1] = nn.Linear(c, 10)
      local net = nn.Sequential(layers)
      for _, bn in ipairs(net:findModules('BatchNorm2d')) do bn.weight:fill(0.5) end
      net.nr_info = {gamma0 = 0.5, input_channels = 1, input_size = 28}
      return net
   end
end

local function base_recipe(method, seed)
   return {
      name = 'nr_compare_' .. method, model = vgg(opt.width), classes = 10,
      data = {dataset = 'fashion-mnist', root = opt.data, batch = opt.batch, threads = 1,
              train_batches = opt.train_batches > 0 and opt.train_batches or nil,
              val_batches = opt.val_batches > 0 and opt.val_batches or nil},
      optim = {name = 'sgd', lr = opt.lr, momentum = 0.9, weight_decay = 1e-4},
      schedule = {name = 'cosine', warmup = 0},
      epochs = opt.epochs, seed = seed, device = 'auto',
      out = string.format('%s/%s-seed%d', opt.out, method, seed),
      eval_every = opt.epochs, checkpoint_every = 0, log_every = 50,
   }
end

-- NR with a deadline: rejuvenate at r < T_r, or at the end of the sparsification window.
local function nr_cfg(T_r, budget, scheme, rescale)
   local window = math.max(1, math.floor(opt.epochs / 2))
   return {
      target = T_r, budget = budget, constraint = 'params', scheme = scheme, rescale = rescale, times = 1,
      hold_schedule = false, input_shape = INPUT, threshold = opt.threshold,
      lambda = {mode = 'adaptive', init = 0, dt = opt.dt, dr = 0.01, dl = opt.dl},
      policy = {when = function(ctx)
         if ctx.rejuvenations >= 1 then return false end
         if ctx.r < ctx.cfg.target then return true end
         local tr = ctx.trainer
         local last = tr.epoch == window and tr.step >= window * tr.iters_per_epoch - opt.dt + 1
         if last then tr.nr_forced = true end
         return last
      end},
   }
end

-- Network Slimming: constant λ for the first half, then prune to budget·C by a global |γ|
-- threshold (all BN scales of prunable layers sorted together) and fine-tune. Only the global
-- threshold decides (NS's rule): the monitor runs with a vanishing relative threshold so that
-- NR's per-layer 1% rule does not remove extra channels.
local NS_MON = {threshold = 1e-30, abs_min = 1e-30}
local function slimming_hooks(budget)
   local window = math.max(1, math.floor(opt.epochs / 2))
   local state = {}
   return state, {
      train_begin = function(tr)
         local u = R.utilization(tr.model, INPUT)
         state.C = u.params_all
      end,
      after_backward = function(tr)
         if tr.epoch <= window then R.l1(tr.model, opt.ns_lambda, INPUT) end
      end,
      epoch_end = function(tr)
         if tr.epoch ~= window then return end
         local bns = R.penalized(tr.model, INPUT)
         local all = {}
         for _, bn in ipairs(bns) do for _, v in ipairs(bn.weight:abs():totable()) do all[#all + 1] = v end end
         table.sort(all)
         local function live_after(k)   -- prune the k smallest
            local m = tr.model:clone()
            local thr = all[k] or -1
            for _, bn in ipairs(R.penalized(m, INPUT)) do
               local g = bn.weight:totable()
               for i, v in ipairs(g) do if math.abs(v) <= thr then bn.weight:set(i, 0) end end
            end
            return R.utilization(m, INPUT, NS_MON).params_live, thr
         end
         local lo, hi = 0, #all - 1
         while lo < hi do
            local mid = math.floor((lo + hi + 1) / 2)
            if live_after(mid) >= budget * state.C then lo = mid else hi = mid - 1 end
         end
         local _, thr = live_after(lo)
         for _, bn in ipairs(bns) do
            local g = bn.weight:totable()
            for i, v in ipairs(g) do if math.abs(v) <= thr then bn.weight:set(i, 0) end end
         end
         local rep = nr.rejuvenate(tr.model, {input_shape = INPUT, budget = 0, optimizer = tr.optimizer,
                                              threshold = NS_MON.threshold, abs_min = NS_MON.abs_min})
         state.pruned = rep.after.params_all
         state.threshold = thr
      end,
   }
end

local function count(model)
   local c = nr.count(model, INPUT)
   return c.params, c.flops
end

local results = {}
ck.mkdirs(opt.out)
local jl = assert(io.open(opt.out .. '/runs.jsonl', 'a'))
local methods = {}
for m in tostring(opt.methods):gmatch('[^,]+') do methods[#methods + 1] = m end

for _, method in ipairs(methods) do
   results[method] = {}
   for seed = 1, opt.seeds do
      local rc = base_recipe(method, seed)
      local ns_state
      if method == 'nr_cr' then rc.nr = nr_cfg(0.25, 0.5, 'CR', false)
      elseif method == 'nr' then rc.nr = nr_cfg(0.5, 1.0, 'NR', false)
      elseif method == 'nr_ca' then rc.nr = nr_cfg(0.5, 1.0, 'CA', true)
      elseif method == 'slimming' then
         local hooks
         ns_state, hooks = slimming_hooks(0.5)
         rc.hooks = hooks
      else
         assert(method == 'baseline', 'nr_compare: unknown method ' .. method)
      end
      local t0 = now()
      local tr = train.new(rc)
      local summary = tr:run()
      local dt = now() - t0
      local params, flops = count(tr.model)
      local rec = {method = method, seed = seed, top1 = summary.final_top1, params = params, flops = flops,
                   time_s = dt, epochs = opt.epochs}
      if tr.nr and tr.nr.reports[1] then
         local rep = tr.nr.reports[1]
         rec.nr = {epoch = rep.epoch, step = rep.step, r_before = rep.before.r_params, alpha = rep.alpha,
                   alpha_sqrt = rep.alpha_sqrt, cost_error = rep.cost_error, forced = tr.nr_forced or false}
      end
      if ns_state then rec.slimming = {threshold = ns_state.threshold, pruned_params = ns_state.pruned} end
      results[method][#results[method] + 1] = rec
      jl:write(ck.json_encode(rec), '\n')
      jl:flush()
      print(string.format('[nr_compare] %-9s seed %d: top1 %.2f%%  params %d  flops %d  %.0fs%s', method, seed,
         rec.top1 or -1, params, flops, dt, rec.nr and string.format('  (NR at epoch %d step %d, r %.3f%s)',
         rec.nr.epoch, rec.nr.step, rec.nr.r_before, rec.nr.forced and ', forced at window end' or '') or ''))
   end
end
jl:close()

local function stats(list, key)
   local n, s = #list, 0
   for _, r in ipairs(list) do s = s + (r[key] or 0) end
   local mean = s / n
   local v = 0
   for _, r in ipairs(list) do v = v + ((r[key] or 0) - mean) ^ 2 end
   local se = n > 1 and math.sqrt(v / (n - 1)) / math.sqrt(n) or 0
   return mean, se
end

-- The table covers every record in OUT/runs.jsonl (a later run of a method and seed replaces an
-- earlier one), so methods can be (re)run separately into the same folder.
do
   local f = io.open(opt.out .. '/runs.jsonl')
   if f then
      local by = {}
      for line in f:lines() do
         local ok, r = pcall(ck.json_decode, line)
         if ok and type(r) == 'table' and r.method then
            by[r.method] = by[r.method] or {}
            by[r.method][r.seed] = r
         end
      end
      f:close()
      local order = {'baseline', 'slimming', 'nr_cr', 'nr', 'nr_ca'}
      methods = {}
      for _, m in ipairs(order) do
         if by[m] then
            methods[#methods + 1] = m
            results[m] = {}
            local seeds = {}
            for sd in pairs(by[m]) do seeds[#seeds + 1] = sd end
            table.sort(seeds)
            for _, sd in ipairs(seeds) do results[m][#results[m] + 1] = by[m][sd] end
         end
      end
   end
end

local lines = {
   string.format('Fashion-MNIST, VGG-style (width %.2g), %d epochs x %s batches of %d, seeds per method as listed; test top-1 on %s.',
      opt.width, opt.epochs, opt.train_batches > 0 and tostring(opt.train_batches) or 'all', opt.batch,
      opt.val_batches > 0 and (opt.val_batches .. ' test batches') or 'the full test set'),
   '',
   '| method | seeds | test top-1 (%) | params | FLOPs (MACs) | time (s) |',
   '|---|---|---|---|---|---|',
}
for _, method in ipairs(methods) do
   local list = results[method]
   local t, tse = stats(list, 'top1')
   local p = stats(list, 'params')
   local f = stats(list, 'flops')
   local tm, tmse = stats(list, 'time_s')
   lines[#lines + 1] = string.format('| %s | %d | %.2f ± %.2f | %.0f | %.0f | %.0f ± %.0f |', method, #list, t, tse, p, f, tm, tmse)
end
local text = table.concat(lines, '\n')
print(text)
ck.write_atomic(opt.out .. '/results.md', text .. '\n')

-- bench/bench.lua — the nrlua side of the CPU benchmark against PyTorch (bench/run.sh runs both).
--
--   build-perf/nrlua bench/bench.lua --threads 2 --models fmnist_cnn,resnet18_cifar --json out.json
--
-- What it measures, exactly as ../shared/bench/torch_baseline.py does on its side:
--   train step = zeroGradParameters + forward + CrossEntropyLoss + backward + SGD(momentum 0.9) step
--   infer step = evaluate() + forward inside nr.no_grad (as torch.no_grad())
--   one fixed synthetic batch (randn images, random labels), fp32, NCHW; `--warmup` untimed steps,
--   then at least `--min-steps` timed steps until `--min-time` seconds or `--max-steps`; the
--   median step gives images/s. Also recorded: tensor allocations per timed step (must be 0),
--   peak RSS of the process (VmHWM; run one model per process for a per-model number), nrlua's
--   own peak tensor bytes, and GFLOP/s (6 x forward MACs per trained image, 2 x per inferred
--   image, the PyTorch side's convention) as a fraction of the sgemm peak measured at start
--   (2048^3 sgemm through nr_matmul, OpenBLAS, same thread count, best of 5).
-- --conv selects the convolution path: 'layers' (default: the library's own choice), or 'auto',
-- 'dnnl', 'dnnl_plain', 'im2col' to force one (nr_perf_conv_set_mode).
-- The JSON has torch_baseline.py's layout ({env, models = {name = {params, macs = {total},
-- train = {B = {...}}, infer = {...}, peak_rss_mib}}}) plus env.sgemm_gflops.
-- What it is not: a correctness test (tests/ are); model definitions live in bench/models.lua.
local nr = require 'nr'
local cjson = require 'cjson'

local args = {...}

local opts = {threads = 2, models = 'all', warmup = 3, ['min-steps'] = 10, ['max-steps'] = 60,
              ['min-time'] = 4.0, json = nil, ['train-batches'] = nil, ['infer-batches'] = nil,
              ['no-sgemm'] = false, conv = 'layers'}
do
   local i = 1
   while i <= #args do
      local k = args[i]:match('^%-%-(.+)$')
      if not k or opts[k] == nil and k ~= 'json' and k ~= 'train-batches' and k ~= 'infer-batches' then
         error('bench.lua: unknown argument ' .. tostring(args[i]), 0)
      end
      if k == 'no-sgemm' then
         opts[k] = true
         i = i + 1
      else
         local v = args[i + 1]
         if v == nil then error('bench.lua: --' .. k .. ' needs a value', 0) end
         opts[k] = tonumber(v) or v
         i = i + 2
      end
   end
end

nr.set_num_threads(opts.threads)
-- NR_PROFILE=1: per-layer times of every step (warm-up included), printed at exit
if os.getenv('NR_PROFILE') == '1' then require 'nr.profile' end

local now = require('nr.profile').now -- CLOCK_MONOTONIC seconds (profiling stays off unless NR_PROFILE=1)

-- --conv: which convolution path core/nn_conv.c takes (it asks core/perf_dnnl_conv.c first):
-- 'layers' (default) leaves the library's choice ('auto'); 'dnnl', 'dnnl_plain', 'im2col', 'own'
-- (Winograd wherever it applies, never oneDNN) force one, for measuring the choice itself. Only the mode is set: the layers run as in any model.
local function route_conv(mode)
   if mode == 'layers' then return end
   local ffi = require 'ffi'
   ffi.cdef [[ int nr_perf_conv_set_mode(int mode); ]]
   local C = require('nr.ffi').C
   local MODES = {auto = 0, dnnl = 1, im2col = 2, dnnl_plain = 3, own = 4}
   assert(MODES[mode], 'bench.lua: --conv must be layers, auto, dnnl, dnnl_plain, im2col or own')
   C.nr_perf_conv_set_mode(MODES[mode])
end

local function vm_hwm_mib()
   local f = io.open('/proc/self/status', 'r')
   if not f then return nil end
   local s = f:read('*a')
   f:close()
   local kb = s:match('VmHWM:%s*(%d+)')
   return kb and tonumber(kb) / 1024 or nil
end

local median = require('nr.profile').median

-- sgemm peak: C (n x n) = A @ B through nr_matmul (OpenBLAS), best of `reps`.
local function sgemm_peak(n, reps)
   local a, b, c = nr.randn({n, n}), nr.randn({n, n}), nr.empty({n, n})
   a:matmul(b, {out = c})
   local best = math.huge
   for _ = 1, reps do
      local t0 = now()
      a:matmul(b, {out = c})
      local dt = now() - t0
      if dt < best then best = dt end
   end
   a:free(); b:free(); c:free()
   return 2 * n * n * n / best / 1e9
end

-- Frees what a finished run left: a tensor's storage goes back when its last holder's finalizer
-- has run, which can take more than one collection cycle, so collect until nothing more is freed
-- (one collectgarbage() left a whole MobileNet b32 model, 143 MiB, alive into the b64 run and
-- its peak RSS).
local function full_gc()
   if jit then jit.flush() end -- compiled traces keep the objects they specialised on alive
   local before = math.huge
   for _ = 1, 10 do
      collectgarbage()
      collectgarbage()
      local now_in_use = nr.memory().cpu.in_use
      if now_in_use >= before then break end
      before = now_in_use
   end
end

local function run_steps(step)
   for _ = 1, opts.warmup do step() end
   local times = {}
   local allocs0 = nr.memory().cpu.allocations
   local t_start = now()
   while #times < opts['max-steps'] and (#times < opts['min-steps'] or now() - t_start < opts['min-time']) do
      local t0 = now()
      step()
      times[#times + 1] = now() - t0
   end
   local allocs = nr.memory().cpu.allocations - allocs0
   return times, allocs
end

local function summarize(times, batch, allocs)
   local med = median(times)
   local mn, mx = math.huge, 0
   for _, v in ipairs(times) do mn = math.min(mn, v); mx = math.max(mx, v) end
   return {batch = batch, steps = #times, median_s = med, min_s = mn, max_s = mx, img_per_s = batch / med,
           img_per_s_best = batch / mn, times_s = times, allocs_per_step = allocs / #times}
end

local M = dofile((_NRLUA and _NRLUA.home or '.') .. '/bench/models.lua')

local function batch_list(default, override)
   if not override then return default end
   local out = {}
   for b in tostring(override):gmatch('[^,]+') do out[#out + 1] = tonumber(b) end
   return out
end

-- Cost of Neural Rejuvenation's monitoring on this model (when lua/nr/rejuvenate exists): the
-- per-step L1 on BN γ (nr.rejuvenate.l1, run after every backward while NR is active) and one
-- utilization check (run once per epoch or every lambda.dt steps); medians of 10 / 3 calls, ms.
-- Run after the peak RSS is read: nr.rejuvenate's per-model caches keep the model alive (a
-- weak-keyed table whose value refers to its key is never collected by LuaJIT).
local function nr_monitor_cost(model, shape)
   local okr, rej = pcall(require, 'nr.rejuvenate')
   if not okr or not rej.l1 or not rej.utilization then return nil end
   local ok, res = pcall(function()
      rej.l1(model, 1e-5, shape)
      local tl, tu = {}, {}
      for i = 1, 10 do
         local t0 = now()
         rej.l1(model, 1e-5, shape)
         tl[i] = now() - t0
      end
      for i = 1, 3 do
         local t0 = now()
         rej.utilization(model, shape)
         tu[i] = now() - t0
      end
      return {l1_ms = median(tl) * 1e3, utilization_ms = median(tu) * 1e3}
   end)
   return ok and res or {error = tostring(res)}
end

local function bench_train(spec, batch)
   nr.manual_seed(0)
   local model = spec.build()
   model:training()
   -- the input batch needs no gradient (as the PyTorch side's input tensor, and as in nr.train)
   if model.setInputGrad then model:setInputGrad(false) end
   local crit = nr.nn.CrossEntropyLoss()
   local opt = nr.optim.SGD(model, {lr = 0.01, momentum = 0.9})
   local shape = {batch}
   for i, s in ipairs(spec.shape) do shape[i + 1] = s end
   local x = nr.randn(shape)
   local y = nr.randint(0, spec.classes, {batch})
   local loss
   local function step()
      model:zeroGradParameters()
      local out = model:forward(x)
      loss = crit:forward(out, y)
      model:backward(x, crit:backward(out, y))
      opt:step()
   end
   local times, allocs = run_steps(step)
   local r = summarize(times, batch, allocs)
   step()
   r.final_loss = loss
   return r
end

local function bench_infer(spec, batch)
   nr.manual_seed(0)
   local model = spec.build()
   model:evaluate()
   local shape = {batch}
   for i, s in ipairs(spec.shape) do shape[i + 1] = s end
   local x = nr.randn(shape)
   -- gradients off, as the PyTorch side's torch.no_grad() (lets a Sequential fold Conv2d + BN + ReLU)
   local function step() return nr.no_grad(model.forward, model, x) end
   local times, allocs = run_steps(step)
   return summarize(times, batch, allocs)
end

local function main()
   route_conv(opts.conv)
   local names = {}
   if opts.models == 'all' then
      names = M.order
   else
      for n in tostring(opts.models):gmatch('[^,]+') do
         if not M.models[n] then error('bench.lua: unknown model ' .. n, 0) end
         names[#names + 1] = n
      end
   end
   local env = {nrlua = nr.version, threads = nr.get_num_threads(), lib = require('nr.ffi').libpath, conv = opts.conv}
   if not opts['no-sgemm'] then env.sgemm_gflops = sgemm_peak(2048, 5) end
   local out = {env = env, models = {}}
   print(cjson.encode(env))
   for _, name in ipairs(names) do
      local spec = M.models[name]
      -- nr.count's per-layer records refer to the modules: keep only the totals, so the counted
      -- model is garbage before the runs (it held a whole model's parameters in the peak RSS)
      local c
      do
         local counted = nr.count(spec.build(), spec.shape)
         c = {params = counted.params, flops = counted.flops}
      end
      local rec = {input = spec.shape, classes = spec.classes, params = c.params, macs = {total = c.flops},
                   train = {}, infer = {}}
      full_gc()
      io.write(string.format('\n== %s: input (%s), params %d, fwd MACs/img %d\n', name,
         table.concat(spec.shape, ', '), c.params, c.flops))
      for _, b in ipairs(batch_list(spec.train, opts['train-batches'])) do
         local r = bench_train(spec, b)
         full_gc()
         rec.train[tostring(b)] = r
         local gf = 6 * c.flops * r.img_per_s / 1e9
         r.gflops = gf
         io.write(string.format('   train b%-3d median %9.2f ms/step  %9.1f img/s (best %.1f, %d steps, min/max %.1f/%.1f ms)'
            .. '  ~%.1f GFLOP/s%s  allocs/step %g  loss %.3f\n', b, r.median_s * 1e3, r.img_per_s, r.img_per_s_best,
            r.steps, r.min_s * 1e3, r.max_s * 1e3, gf,
            env.sgemm_gflops and string.format(' (%.0f%% of sgemm)', 100 * gf / env.sgemm_gflops) or '',
            r.allocs_per_step, r.final_loss))
         io.flush()
      end
      for _, b in ipairs(batch_list(spec.infer, opts['infer-batches'])) do
         local r = bench_infer(spec, b)
         full_gc()
         rec.infer[tostring(b)] = r
         local gf = 2 * c.flops * r.img_per_s / 1e9
         r.gflops = gf
         io.write(string.format('   infer b%-3d median %9.2f ms/step  %9.1f img/s (best %.1f, %d steps, min/max %.1f/%.1f ms)'
            .. '  ~%.1f GFLOP/s%s  allocs/step %g\n', b, r.median_s * 1e3, r.img_per_s, r.img_per_s_best,
            r.steps, r.min_s * 1e3, r.max_s * 1e3, gf,
            env.sgemm_gflops and string.format(' (%.0f%% of sgemm)', 100 * gf / env.sgemm_gflops) or '',
            r.allocs_per_step))
         io.flush()
      end
      rec.peak_rss_mib = vm_hwm_mib()
      rec.peak_tensor_mib = nr.memory().cpu.peak / 2 ^ 20
      out.models[name] = rec
      -- NR monitoring cost, on a model with gradients, after the memory readings
      local first = next(rec.train)
      local tb = first and tonumber(first)
      if tb then
         local mm = spec.build()
         mm:training()
         local shape = {tb}
         for i, s in ipairs(spec.shape) do shape[i + 1] = s end
         local x, crit = nr.randn(shape), nr.nn.CrossEntropyLoss()
         local out_ = mm:forward(x)
         local lbl = nr.randint(0, spec.classes, {tb})
         crit:forward(out_, lbl)
         mm:backward(x, crit:backward(out_, lbl))
         local r = rec.train[tostring(tb)]
         r.nr_monitor = nr_monitor_cost(mm, spec.shape)
         if r.nr_monitor and r.nr_monitor.l1_ms then
            io.write(string.format('   nr monitor b%-3d L1 on BN gamma %.3f ms/step (%.2f%% of a step), utilization check %.1f ms\n',
               tb, r.nr_monitor.l1_ms, 100 * r.nr_monitor.l1_ms / (r.median_s * 1e3), r.nr_monitor.utilization_ms))
         end
      end
   end
   if opts.json then
      local f = assert(io.open(opts.json, 'w'))
      f:write(cjson.encode(out))
      f:close()
   end
end

main()

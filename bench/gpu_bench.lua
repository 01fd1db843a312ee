-- bench/gpu_bench.lua — nrlua side of the GPU training benchmark (PyTorch side and the driver:
-- tests/gpu/torch_gpu_bench.py, tests/gpu/run.sh).
--
--   nrlua bench/gpu_bench.lua --model mobilenet|resnet50|vgg19 [--batch N] [--warmup N]
--                             [--steps N] [--precision fp32|bf16] [--tf32 0|1] [--json PATH]
--                             [--memory_format contiguous|channels_last] [--trainer 1 [--input uint8|float32]]
--                             [--device cpu]   (a dry run of the script itself on the CPU)
--
-- What it measures: training images/s of one synthetic fixed batch on the GPU (no data loading),
-- step = zeroGradParameters + forward + CrossEntropyLoss (the loss stays on the device, as in
-- PyTorch's loop and nr.train) + backward + SGD(momentum 0.9, weight decay 5e-4), the same step as
-- the PyTorch side. Wall time of `--steps` steps after `--warmup` untimed ones, with
-- nr.cuda.synchronize() before starting and stopping the clock. The first steps include the
-- cuDNN algorithm search (reported as warmup_s).
-- --trainer 1: the same steps through nr.train instead, over host batches of synthetic images
-- (an in-memory loader): what a run adds to the bare step (the input's copy on the copy stream,
-- its conversion, label checks, metrics on the device, the schedule, hooks); timed between two
-- after_step hooks that synchronise. --input: the host batches as bytes that the trainer
-- finishes on the device (uint8, the default, as nr.data loaders under nr.train on a GPU) or as
-- float32.
-- --precision bf16: mixed precision as nr.train runs it (the input batch in bfloat16, so every
-- activation is bf16; weights, gradients and the SGD update stay fp32), against PyTorch autocast.
-- --memory_format: the input batch's layout, which every activation follows (default as nr.train:
-- channels_last under bf16, contiguous under fp32).
-- What it is not: a correctness test (tests/lua/cuda_spec.lua).
local nr = require 'nr'
local now = require('nr.profile').now -- CLOCK_MONOTONIC (loading nr.profile enables nothing)

local MODELS = {
   mobilenet = {build = function() return nr.models.mobilenet{width = 0.25, input = 128} end,
                shape = {3, 128, 128}, classes = 1000, batch = 256},
   resnet50 = {build = function() return nr.models.resnet{depth = 50} end,
               shape = {3, 224, 224}, classes = 1000, batch = 128},
   vgg19 = {build = function() return nr.models.vgg{depth = 19, dataset = 'cifar10'} end,
            shape = {3, 32, 32}, classes = 10, batch = 128},
}

local function parse(argv)
   local o = {model = 'mobilenet', warmup = 5, steps = 20, precision = 'fp32', tf32 = 0, device = 'cuda'}
   local i = 1
   while i <= #argv do
      local k, v = argv[i]:match('^%-%-([%w_]+)$'), argv[i + 1]
      if not k or v == nil then error('gpu_bench: expected --name value pairs, got ' .. tostring(argv[i]), 0) end
      o[k] = tonumber(v) or v
      i = i + 2
   end
   return o
end

local function json_line(t)
   local keys, parts = {}, {}
   for k in pairs(t) do keys[#keys + 1] = k end
   table.sort(keys)
   for _, k in ipairs(keys) do
      local v = t[k]
      local s = type(v) == 'number' and string.format('%.6g', v) or string.format('%q', tostring(v))
      parts[#parts + 1] = string.format('%q: %s', k, s)
   end
   return '{' .. table.concat(parts, ', ') .. '}'
end

-- The steps through nr.train (--trainer 1): one epoch of (warmup + steps) batches from a host
-- loader that hands out one synthetic batch every time (as the bare step reuses one; a real
-- loader's batches would cost gigabytes of host memory to make up here), the clock between the
-- after_step hooks of the last warm-up step and of the last step.
local function run_trainer(o, spec, batch, base, sync)
   local train = require 'nr.train'
   local shape = {batch}
   for _, s in ipairs(spec.shape) do shape[#shape + 1] = s end
   local bytes = (o.input or 'uint8') == 'uint8'
   local x = bytes and nr.randint(0, 256, shape, {dtype = 'uint8'}) or nr.randn(shape)
   local y = nr.randint(0, spec.classes, {batch}, {dtype = 'int64'})
   local total = o.warmup + o.steps
   local stats = nr.data.stats('imagenet')
   local loader = {nbatches = function() return total end,
                   normalize = function(_, xb, out) return nr.data.normalize(xb, out, stats) end,
                   epoch = function()
                      local i = 0
                      return function()
                         i = i + 1
                         if i <= total then return x, y end
                      end
                   end}
   local t_start, t0, t1 = now(), nil, nil
   local tr = train.new({
      name = 'gpu_bench', model = spec.build, device = o.device, precision = o.precision,
      memory_format = o.memory_format, epochs = 1, seed = 0, log_every = 1000000,
      out = (os.getenv('TMPDIR') or '/tmp') .. '/nr_gpu_bench_' .. tostring(os.time()),
      optim = {lr = 0.01, momentum = 0.9, weight_decay = 5e-4}, schedule = {name = 'cosine'},
      data = {train = loader},
      progress = {stream = io.open('/dev/null', 'w'), tty = false},
      hooks = {train_begin = function() if o.warmup == 0 then sync(); t0 = now() end end,
               after_step = function(t)
                  if t.step == o.warmup then sync(); t0 = now()
                  elseif t.step == o.warmup + o.steps then sync(); t1 = now() end
               end},
   })
   tr:run()
   base.warmup_s = t0 - t_start
   base.steps = o.steps
   base.step_ms = (t1 - t0) * 1000 / o.steps
   base.images_per_s = batch * o.steps / (t1 - t0)
   return base
end

local function run(o)
   local spec = MODELS[o.model]
   if not spec then error('gpu_bench: unknown model ' .. tostring(o.model) .. ' (mobilenet, resnet50, vgg19)', 0) end
   local batch = o.batch or spec.batch
   o.memory_format = o.memory_format or (o.precision == 'bf16' and 'channels_last' or 'contiguous')
   local base = {side = 'nrlua', model = o.model, precision = o.precision, batch = batch, memory_format = o.memory_format,
                 tf32 = o.tf32, device = o.device == 'cuda' and (nr.cuda.device_name(0) or 'none') or 'cpu',
                 trainer = o.trainer == 1 and 1 or nil, input = o.trainer == 1 and (o.input or 'uint8') or nil}
   local gpu = o.device == 'cuda'
   if gpu and not nr.cuda.available() then
      base.error = 'no GPU: ' .. tostring(nr.cuda.unavailable_reason())
      return base
   end
   if o.precision ~= 'fp32' and o.precision ~= 'bf16' then
      error('gpu_bench: --precision must be fp32 or bf16, got ' .. tostring(o.precision), 0)
   end
   local sync = gpu and nr.cuda.synchronize or function() end
   nr.cuda.set_allow_tf32(o.tf32 == 1)
   nr.manual_seed(0)
   if o.trainer == 1 then return run_trainer(o, spec, batch, base, sync) end
   local net = spec.build()
   net:to(o.device)
   net:training()
   local crit = nr.nn.CrossEntropyLoss()
   local opt = nr.optim.SGD(net, {lr = 0.01, momentum = 0.9, weight_decay = 5e-4})
   local shape = {batch}
   for _, s in ipairs(spec.shape) do shape[#shape + 1] = s end
   local x = nr.randn(shape, {device = o.device})
   if o.precision == 'bf16' then x = x:bfloat16() end
   x = x:contiguous(o.memory_format)
   local labels = nr.randint(0, spec.classes, {batch}, {dtype = 'int64', device = o.device})
   nr.nn.check_class_ids(labels, spec.classes) -- once, so the steps skip the device check (as nr.train)
   local loss
   -- as PyTorch's loop: the loss stays on the device (read once at the end), no step waits
   local function step()
      net:zeroGradParameters()
      local y = net:forward(x)
      loss = crit:loss_tensor(y, labels, true)
      net:backward(x, crit:backward(y, labels, 1, true))
      opt:step()
   end
   local t0 = now()
   for _ = 1, o.warmup do step() end
   sync()
   base.warmup_s = now() - t0
   -- under NR_PROFILE the warm-up (cuDNN's searches) is not part of the profile
   local prof = package.loaded['nr.profile']
   if prof and prof.enabled() then prof.reset() end
   local t1 = now()
   for _ = 1, o.steps do step() end
   sync()
   local dt = now() - t1
   base.steps = o.steps
   base.step_ms = dt * 1000 / o.steps
   base.images_per_s = batch * o.steps / dt
   base.final_loss = loss:get(1)
   if gpu then
      local m = nr.cuda.memory()
      base.peak_mem_gib = m.peak / 2 ^ 30
      base.cached_gib = m.cached / 2 ^ 30
   end
   return base
end

local o = parse({...})
local ok, res = pcall(run, o)
if not ok then res = {side = 'nrlua', model = o.model, precision = o.precision, error = tostring(res)} end
local line = json_line(res)
print(line)
if o.json then
   local f = assert(io.open(o.json, 'w'))
   f:write(line, '\n')
   f:close()
end

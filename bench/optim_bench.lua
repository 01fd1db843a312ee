-- bench/optim_bench.lua — time of one optimizer step (SGD with momentum, Adam, AdamW) and of one
-- gradient clipping (nr.optim.clip_grad_norm) over the parameters of a zoo model, against
-- PyTorch's torch.optim and torch.nn.utils.clip_grad_norm_ on the same shapes (optim_bench.py).
--
--   NR_THREADS=2 ./build/nrlua bench/optim_bench.lua [--model resnet18_cifar] [--steps 50] [--rounds 3]
--
-- Each round times --steps steps of each optimizer on random gradients (after 3 warm-up steps),
-- first nrlua's (nr.optim, one fused C call per group), then PyTorch's (optim_bench.py in a
-- subprocess, --threads the same; its single-tensor loop and its foreach path), alternating so
-- machine load lands on both alike. Prints ms/step per optimizer and side, and the ratio
-- PyTorch best / nrlua (> 1: nrlua faster), median over rounds.
local nr = require 'nr'
local here = debug.getinfo(1, 'S').source:match('^@(.*/)') or './'
local models = dofile(here .. 'models.lua')
local side = dofile(here .. 'side.lua')
local now = require('nr.progress').now
local json = require 'cjson'

local opt = side.options({model = 'resnet18_cifar', steps = 50, rounds = 3, python = '/usr/bin/python3'}, {...},
   'optim_bench')

local spec = assert(models.models[opt.model], 'optim_bench: unknown model ' .. opt.model)
local model = spec.build()
local shapes, n = {}, 0
for _, e in ipairs(model:namedParameters()) do
   shapes[#shapes + 1] = e.param:shape()
   n = n + e.param:numel()
end
local shape_file = os.tmpname()
local f = assert(io.open(shape_file, 'w'))
f:write(json.encode(shapes))
f:close()

local CONFIGS = {
   {name = 'sgd', cls = nr.optim.SGD, cfg = {lr = 0.01, momentum = 0.9, weight_decay = 5e-4}},
   {name = 'adam', cls = nr.optim.Adam, cfg = {lr = 1e-3, weight_decay = 1e-4}},
   {name = 'adamw', cls = nr.optim.AdamW, cfg = {lr = 1e-3, weight_decay = 1e-2}},
   -- gradient clipping by the total 2-norm (nr.optim.clip_grad_norm; a max_norm no gradient
   -- reaches, so every round times the same work: the norm and the scale by 1)
   {name = 'clip', cls = function(m)
      local out = nr.zeros({1})
      return {step = function() nr.optim.clip_grad_norm(m, 1e9, {out = out}) end}
   end},
}

local function time_nrlua(c)
   for _, e in ipairs(model:namedParameters()) do e.grad:copy(nr.randn(e.param:shape()):mul_(1e-2)) end
   local o = c.cls(model, c.cfg)
   for _ = 1, 3 do o:step() end
   local t0 = now()
   for _ = 1, opt.steps do o:step() end
   return (now() - t0) / opt.steps * 1e3
end

local function time_torch()
   return side.torch('optim_bench.py', string.format('--shapes %s --steps %d', shape_file, opt.steps), opt.python)
end
local median = side.median

print(string.format('%s: %d parameter tensors, %.2fM values; %d steps per timing, %d rounds', opt.model, #shapes, n / 1e6,
   opt.steps, opt.rounds))
local ours, theirs = {}, {}
for _ = 1, opt.rounds do
   for _, c in ipairs(CONFIGS) do
      ours[c.name] = ours[c.name] or {}
      table.insert(ours[c.name], time_nrlua(c))
   end
   local t = time_torch()
   for k, v in pairs(t) do
      theirs[k] = theirs[k] or {}
      table.insert(theirs[k], v)
   end
end
print(string.format('%-6s %12s %18s %18s %8s', 'optim', 'nrlua ms', 'torch loop ms', 'torch foreach ms', 'ratio'))
for _, c in ipairs(CONFIGS) do
   local a = median(ours[c.name])
   local loop, fe = median(theirs[c.name .. '_loop']), theirs[c.name .. '_foreach'] and median(theirs[c.name .. '_foreach'])
   print(string.format('%-6s %12.2f %18.2f %18s %8.2f', c.name, a, loop, fe and string.format('%.2f', fe) or '-',
      math.min(loop, fe or loop) / a))
end
os.remove(shape_file)

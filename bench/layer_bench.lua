-- bench/layer_bench.lua — forward + backward time of single layers (pools, adaptive pools,
-- BatchNorm1d, elementwise activations) against PyTorch's on the same shapes (layer_bench.py), training mode.
--
--   NR_THREADS=2 ./build/nrlua bench/layer_bench.lua [--reps 20] [--rounds 3] [--only NAME-PART,...]
--
-- Each round times every case on both sides (PyTorch in a subprocess with the same thread count),
-- alternating so machine load lands on both alike; a case's time is its best forward and best
-- backward over --reps repetitions. Prints ms per side, median over rounds, and the ratio
-- PyTorch / nrlua (> 1: nrlua faster) of forward + backward.
local nr = require 'nr'
local nn = nr.nn
local now = require('nr.progress').now
local json = require 'cjson'
local side = dofile((debug.getinfo(1, 'S').source:match('^@(.*/)') or './') .. 'side.lua')

local opt = side.options({reps = 20, rounds = 3, python = '/usr/bin/python3', only = false}, {...}, 'layer_bench')

-- name, input shape, the layer (nrlua), its PyTorch twin (a Python expression on torch.nn as nn)
local CASES = {
   {'maxpool 3x3 s2 p1', {32, 64, 56, 56}, function() return nn.MaxPool2d(3, {stride = 2, padding = 1}) end,
    'nn.MaxPool2d(3, 2, 1)'},
   {'avgpool 2x2', {64, 128, 16, 16}, function() return nn.AvgPool2d(2) end, 'nn.AvgPool2d(2)'},
   {'adaptive avg 7->3', {64, 128, 7, 7}, function() return nn.AdaptiveAvgPool2d(3) end, 'nn.AdaptiveAvgPool2d(3)'},
   {'adaptive max 7->3', {64, 128, 7, 7}, function() return nn.AdaptiveMaxPool2d(3) end, 'nn.AdaptiveMaxPool2d(3)'},
   {'batchnorm1d (N, C)', {256, 512}, function() return nn.BatchNorm1d(512) end, 'nn.BatchNorm1d(512)'},
   {'batchnorm1d (N, C) large', {4096, 512}, function() return nn.BatchNorm1d(512) end, 'nn.BatchNorm1d(512)'},
   {'batchnorm1d (N, C, L)', {128, 64, 100}, function() return nn.BatchNorm1d(64) end, 'nn.BatchNorm1d(64)'},
   {'sigmoid', {32, 64, 56, 56}, function() return nn.Sigmoid() end, 'nn.Sigmoid()'},
   {'tanh', {32, 64, 56, 56}, function() return nn.Tanh() end, 'nn.Tanh()'},
   {'silu', {32, 64, 56, 56}, function() return nn.SiLU() end, 'nn.SiLU()'},
   {'gelu', {32, 64, 56, 56}, function() return nn.GELU() end, 'nn.GELU()'},
   {'gelu tanh', {32, 64, 56, 56}, function() return nn.GELU('tanh') end, 'nn.GELU(approximate="tanh")'},
   {'hardswish', {32, 64, 56, 56}, function() return nn.Hardswish() end, 'nn.Hardswish()'},
   {'elu', {32, 64, 56, 56}, function() return nn.ELU() end, 'nn.ELU()'},
   {'leaky relu', {32, 64, 56, 56}, function() return nn.LeakyReLU(0.1) end, 'nn.LeakyReLU(0.1)'},
}
-- --only A,B: the cases whose name contains A or B
if opt.only then
   local kept = {}
   for _, c in ipairs(CASES) do
      for part in tostring(opt.only):gmatch('[^,]+') do
         if c[1]:find(part, 1, true) then kept[#kept + 1] = c break end
      end
   end
   assert(#kept > 0, 'layer_bench: no case name contains ' .. opt.only)
   CASES = kept
end

local function time_nrlua(c)
   nr.manual_seed(1)
   local m, x = c[3](), nr.randn(c[2])
   local g = nr.randn(m:forward(x):shape())
   m:backward(x, g)
   local bf, bb = math.huge, math.huge
   for _ = 1, opt.reps do
      local t0 = now()
      m:forward(x)
      local t1 = now()
      m:backward(x, g)
      bf, bb = math.min(bf, t1 - t0), math.min(bb, now() - t1)
   end
   return {bf * 1e3, bb * 1e3}
end

local case_file = os.tmpname()
do
   local list = {}
   for i, c in ipairs(CASES) do list[i] = {shape = c[2], module = c[4]} end
   local f = assert(io.open(case_file, 'w'))
   f:write(json.encode(list))
   f:close()
end
local function time_torch()
   return side.torch('layer_bench.py', string.format('--cases %s --reps %d', case_file, opt.reps), opt.python)
end
local median = side.median

local ours, theirs = {}, {}
for _ = 1, opt.rounds do
   for i, c in ipairs(CASES) do
      local t = time_nrlua(c)
      ours[i] = ours[i] or {f = {}, b = {}}
      table.insert(ours[i].f, t[1]); table.insert(ours[i].b, t[2])
   end
   for i, t in ipairs(time_torch()) do
      theirs[i] = theirs[i] or {f = {}, b = {}}
      table.insert(theirs[i].f, t[1]); table.insert(theirs[i].b, t[2])
   end
end
print(string.format('%d reps per timing, %d rounds, %d threads', opt.reps, opt.rounds, nr.get_num_threads and nr.get_num_threads() or 2))
print(string.format('%-26s %-18s %18s %18s %7s', 'layer', 'input', 'nrlua fwd / bwd ms', 'torch fwd / bwd ms', 'ratio'))
for i, c in ipairs(CASES) do
   local af, ab, tf, tb = median(ours[i].f), median(ours[i].b), median(theirs[i].f), median(theirs[i].b)
   print(string.format('%-26s %-18s %8.3f / %7.3f %8.3f / %7.3f %7.2f', c[1], table.concat(c[2], 'x'), af, ab, tf, tb,
      (tf + tb) / (af + ab)))
end
os.remove(case_file)

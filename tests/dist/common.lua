-- tests/dist/common.lua — helpers for the scripts that tests/lua/dist_spec.lua runs under
-- `mpirun -np 2` (each script is also runnable by hand: mpirun -np 2 nrlua tests/dist/NAME.lua).
-- A failed check raises an error naming the rank; the process then exits non-zero and libnr_dist
-- aborts the whole job, so the spec sees a non-zero status. Success prints "PASS <what> rank r".
local nr = require 'nr'
local dist = require 'nr.dist'

local M = {}

function M.fail(fmt, ...)
   error(string.format('FAIL rank %d: ' .. fmt, dist.rank(), ...), 2)
end

function M.pass(what)
   print(string.format('PASS %s rank %d/%d', what, dist.rank(), dist.size()))
   io.stdout:flush()
end

-- Relative difference of two tensors (same shape): max|a - b| / max|b|, i.e. relative to the
-- tensor's scale (entries near zero are not judged by their own tiny size). Fails above tol,
-- naming the element with the largest difference.
function M.compare(a, b, tol, what)
   local x, y = a:contiguous(), b:contiguous()
   local n = x:numel()
   if n ~= y:numel() then M.fail('%s: %d vs %d elements', what, n, y:numel()) end
   local pa, pb = x:data(), y:data()
   local scale, diff, at = 0, 0, 0
   for i = 0, n - 1 do
      scale = math.max(scale, math.abs(pb[i]))
      local d = math.abs(pa[i] - pb[i])
      if d > diff then diff, at = d, i end
   end
   local rel = diff / math.max(scale, 1e-30)
   if rel > tol then
      M.fail('%s: max|a-b| / max|b| = %.3g > %.1g (element %d: %.9g vs %.9g)', what, rel, tol, at + 1, pa[at], pb[at])
   end
   return rel
end

-- A small MLP without BatchNorm (so a split batch and the combined batch see the same math).
function M.mlp(seed, din, hidden, classes)
   nr.manual_seed(seed)
   return nr.nn.Sequential{
      nr.nn.Linear(din, hidden), nr.nn.ReLU(),
      nr.nn.Linear(hidden, hidden), nr.nn.ReLU(),
      nr.nn.Linear(hidden, classes),
   }
end

-- A small conv net without BatchNorm (input (N, 3, 8, 8)).
function M.convnet(seed, classes)
   nr.manual_seed(seed)
   return nr.nn.Sequential{
      nr.nn.Conv2d(3, 8, 3, {padding = 1}), nr.nn.ReLU(),
      nr.nn.Conv2d(8, 8, 3, {padding = 1, stride = 2}), nr.nn.ReLU(),
      nr.nn.GlobalAvgPool2d(),
      nr.nn.Linear(8, classes),
   }
end

-- The same with BatchNorm after each conv (for synchronized BatchNorm).
function M.convnet_bn(seed, classes)
   nr.manual_seed(seed)
   return nr.nn.Sequential{
      nr.nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
      nr.nn.Conv2d(8, 8, 3, {padding = 1, stride = 2, bias = false}), nr.nn.BatchNorm2d(8), nr.nn.ReLU(),
      nr.nn.GlobalAvgPool2d(),
      nr.nn.Linear(8, classes),
   }
end

return M

-- tests/dist/compare_runs.lua A B [TOL] — compares the latest checkpoints of two run folders:
-- every weight and buffer, max|a - b| / max|b| <= TOL per tensor (default 1e-5: relative to the
-- tensor's scale, so entries near zero are not judged by their own tiny size), and the step and
-- epoch. Prints "SAME <n> tensors, max relative difference <d>" or fails naming the tensor.
-- Run: nrlua tests/dist/compare_runs.lua /tmp/run1 /tmp/run2
local ck = require 'nr.checkpoint'

local a, b, tol = arg[1], arg[2], tonumber(arg[3] or '1e-5')
local ra, rb = ck.load(a .. '/checkpoint'), ck.load(b .. '/checkpoint')
assert(ra.state.step == rb.state.step and ra.state.epoch == rb.state.epoch,
   string.format('different positions: epoch %s step %s vs epoch %s step %s', ra.state.epoch, ra.state.step, rb.state.epoch, rb.state.step))
local worst, n = 0, 0
local names = {}
for k in pairs(ra.weights) do names[#names + 1] = k end
table.sort(names)
for _, k in ipairs(names) do
   local x, y = ra.weights[k]:contiguous(), rb.weights[k] and rb.weights[k]:contiguous()
   assert(y, 'tensor ' .. k .. ' missing in ' .. b)
   assert(x:numel() == y:numel(), 'tensor ' .. k .. ' differs in size')
   local px, py = x:data(), y:data()
   local scale, diff, at = 0, 0, 0
   for i = 0, x:numel() - 1 do
      scale = math.max(scale, math.abs(py[i]))
      local d = math.abs(px[i] - py[i])
      if d ~= d then d = math.huge end -- NaN on either side: the worst difference (">" skipped it)
      if d > diff then diff, at = d, i end
   end
   local rel = diff / math.max(scale, 1e-30)
   if rel > worst then worst = rel end
   if rel > tol then
      error(string.format('%s: max|a-b| / max|b| = %.3g > %g (element %d: %.9g vs %.9g)', k, rel, tol, at + 1, px[at], py[at]), 0)
   end
   n = n + 1
end
print(string.format('SAME %d tensors at epoch %d step %d, max relative difference %.3g (tolerance %g)', n,
   ra.state.epoch, ra.state.step, worst, tol))

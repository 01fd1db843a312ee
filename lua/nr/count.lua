-- nr.count(model, input_shape) — parameters and multiply-adds of a model for ONE sample.
--
--   local c = nr.count(net, {3, 224, 224})
--   c.params   all parameter elements: conv weights (+ bias), BatchNorm γ and β, Linear weight
--              and bias (running statistics are buffers, not counted)
--   c.flops    multiply-adds (MACs) of Conv2d and Linear only, the convention of the paper's
--              "FLOPs" (NR, He et al.): conv = cout * cin/groups * kh * kw * oh * ow,
--              linear = in * out (times any leading non-batch positions); bias adds, BatchNorm,
--              ReLU, pooling and residual adds are NOT counted
--   c.output   the per-sample output shape
--   c.layers   one row per leaf, in forward order: {path, type, extra, input, output, params, macs,
--              module}
--   c.by_type  {Conv2d = {n, params, macs}, BatchNorm2d = {...}, ...}
--
-- Shapes are propagated by walking the tree: Sequential chains, Residual feeds both branches the
-- same input (their shapes must agree), Concat adds up channels, Identity passes through. Leaves
-- use their own outputShape when the class defines one, else the shape is computed here from the
-- PyTorch-named fields (Conv2d, pools, Linear, GlobalAvgPool2d, Flatten, shape-preserving
-- layers). Any other module that defines :cost(in_shape) and :outputShape(in_shape) is counted as
-- one leaf by them, containers included (NRConv2d, the split conv of rejuvenation); another layer
-- with conv fields (in_channels, out_channels, kernel_size, weight) follows the conv rule; any
-- other layer with parameters, or another container, is an error naming it. Not a profiler:
-- nothing is run, no tensor is touched.
local Module = require 'nr.nn.module'
local U = require 'nr.nn.layer_util'

local M = {}

local FNAME = 'nr.count'

local function shape_str(s) return '[' .. table.concat(s, ' x ') .. ']' end

local function fail(m, fmt, ...)
   error(string.format('%s: %s: %s', FNAME, m:where(), string.format(fmt, ...)), 0)
end

-- m:outputShape(s), its error named with the module (as nr.count's own checks are).
local function shape_of(m, s)
   local ok, out = pcall(m.outputShape, m, s)
   if not ok then fail(m, '%s', (tostring(out):gsub('^[^\n]-%.lua:%d+: ', ''))) end
   return out
end

local function pair(v)
   if type(v) == 'table' then return v[1], v[2] or v[1] end
   return v, v
end

local function prod(s, from)
   local n = 1
   for i = from or 1, #s do n = n * s[i] end
   return n
end

-- Output side of a window op: floor((n + 2p - d*(k-1) - 1) / s) + 1.
local function window(m, n, k, s, p, d)
   local o = math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1
   if o < 1 then fail(m, 'input side %d is too small for kernel %d (stride %d, padding %d)', n, k, s, p) end
   return o
end

local function numel_of(t) return t and t:numel() or 0 end

-- Shape-preserving leaves (per sample).
local SAME = {BatchNorm2d = true, BatchNorm1d = true, ReLU = true, Sigmoid = true, Tanh = true, Dropout = true,
              Identity = true, LeakyReLU = true, ReLU6 = true, ELU = true, SiLU = true, GELU = true, Hardswish = true,
              Hardsigmoid = true}

-- Per-leaf rule: returns out_shape, params, macs.
local KNOWN = {Conv2d = true, Linear = true, MaxPool2d = true, AvgPool2d = true, GlobalAvgPool2d = true,
               Flatten = true, BatchNorm2d = true}

local function leaf(m, s)
   local t = m:typename()
   local own_shape = m.outputShape ~= Module.outputShape
   if not KNOWN[t] and not SAME[t] and m.cost ~= Module.cost then
      -- a layer that counts itself (e.g. a split conv after rejuvenation)
      local params, macs = m:cost(s)
      return shape_of(m, s), params, macs or 0
   end
   local convlike = t == 'Conv2d' or (m.in_channels and m.out_channels and m.kernel_size and m.weight)
   if convlike then
      if #s ~= 3 then fail(m, 'expects a (C, H, W) input, got %s', shape_str(s)) end
      if s[1] ~= m.in_channels then fail(m, 'expects %d input channels, got %s', m.in_channels, shape_str(s)) end
      local kh, kw = pair(m.kernel_size)
      local sh, sw = pair(m.stride or 1)
      local ph, pw = pair(m.padding or 0)
      local dh, dw = pair(m.dilation or 1)
      local out = own_shape and shape_of(m, s) or
         {m.out_channels, window(m, s[2], kh, sh, ph, dh), window(m, s[3], kw, sw, pw, dw)}
      local groups = m.groups or 1
      local macs = m.out_channels * (m.in_channels / groups) * kh * kw * out[2] * out[3]
      return out, numel_of(m.weight) + numel_of(m.bias), macs
   elseif t == 'Linear' then
      if s[#s] ~= m.in_features then fail(m, 'expects %d input features, got %s', m.in_features, shape_str(s)) end
      local out = {unpack(s)}
      out[#out] = m.out_features
      return out, numel_of(m.weight) + numel_of(m.bias), m.in_features * m.out_features * prod(s, 1) / s[#s]
   elseif t == 'MaxPool2d' or t == 'AvgPool2d' then
      if #s ~= 3 then fail(m, 'expects a (C, H, W) input, got %s', shape_str(s)) end
      local kh, kw = pair(m.kernel_size)
      local sh, sw = pair(m.stride or m.kernel_size)
      local ph, pw = pair(m.padding or 0)
      local out = own_shape and shape_of(m, s) or {s[1], window(m, s[2], kh, sh, ph, 1), window(m, s[3], kw, sw, pw, 1)}
      return out, 0, 0
   elseif t == 'GlobalAvgPool2d' then
      if #s ~= 3 then fail(m, 'expects a (C, H, W) input, got %s', shape_str(s)) end
      return own_shape and shape_of(m, s) or {s[1]}, 0, 0
   elseif t == 'Flatten' then
      return own_shape and shape_of(m, s) or {prod(s)}, 0, 0
   elseif t == 'BatchNorm2d' then
      if #s ~= 3 then fail(m, 'expects a (C, H, W) input, got %s', shape_str(s)) end
      if s[1] ~= m.num_features then fail(m, 'expects %d channels, got %s', m.num_features, shape_str(s)) end
      return {unpack(s)}, numel_of(m.weight) + numel_of(m.bias), 0
   elseif SAME[t] then
      return own_shape and shape_of(m, s) or {unpack(s)}, m:nParameters(), 0
   end
   -- another leaf without a cost of its own: parameter-free layers pass the shape on through
   -- their outputShape; a layer with parameters cannot be counted silently
   if m:nParameters() > 0 then
      fail(m, 'unknown layer type %s: define :outputShape(in_shape) and :cost(in_shape)', t)
   end
   return shape_of(m, s), 0, 0
end

local CONTAINERS = {Sequential = true, Residual = true, Concat = true}

local function walk(m, s, acc)
   local t = m:typename()
   if not m.modules or (not CONTAINERS[t] and m.cost ~= Module.cost) then
      local out, params, macs = leaf(m, s)
      -- a tensor held by two modules (weight tying: a twin, or a weight assigned by hand) is
      -- computed with twice but counted once
      for _, p in ipairs((m:parameters())) do
         if acc.seen[p] then params = math.max(0, params - p:numel()) end
         acc.seen[p] = true
      end
      acc.layers[#acc.layers + 1] = {path = m:path(), type = t, extra = m:extra(), input = {unpack(s)},
                                     output = out, params = params, macs = macs, module = m}
      local bt = acc.by_type[t] or {n = 0, params = 0, macs = 0}
      bt.n, bt.params, bt.macs = bt.n + 1, bt.params + params, bt.macs + macs
      acc.by_type[t] = bt
      acc.params, acc.flops = acc.params + params, acc.flops + macs
      return out
   end
   if t == 'Sequential' then
      for _, c in ipairs(m.modules) do s = walk(c, s, acc) end
      return s
   elseif t == 'Residual' then
      local a = walk(m.modules[1], s, acc)
      local b = m.modules[2] and walk(m.modules[2], s, acc) or s
      if #a ~= #b then fail(m, 'main path gives %s but shortcut gives %s', shape_str(a), shape_str(b)) end
      for i = 1, #a do
         if a[i] ~= b[i] then fail(m, 'main path gives %s but shortcut gives %s', shape_str(a), shape_str(b)) end
      end
      return a
   elseif t == 'Concat' then
      local out
      for i, c in ipairs(m.modules) do
         local o = walk(c, s, acc)
         if not out then
            out = {unpack(o)}
         else
            if not U.concatenable(out, o) then fail(m, 'branch 1 gives %s but branch %d gives %s', shape_str(out), i, shape_str(o)) end
            out[1] = out[1] + o[1]
         end
      end
      return out
   end
   fail(m, 'container type %s is unknown to nr.count: define :cost(in_shape) and :outputShape(in_shape)', t)
end

-- nr.count(model, input_shape) -> {params, flops, output, layers, by_type}
function M.count(model, input_shape)
   if type(model) ~= 'table' or type(model.listModules) ~= 'function' then
      error(FNAME .. ': model must be an nr.nn module, got ' .. type(model), 2)
   end
   if type(input_shape) ~= 'table' or #input_shape == 0 then
      error(FNAME .. ': input_shape must be one sample\'s shape, e.g. {3, 224, 224}', 2)
   end
   for i, v in ipairs(input_shape) do
      if type(v) ~= 'number' or v ~= math.floor(v) or v < 1 then
         error(string.format('%s: input_shape[%d] must be a positive integer, got %s', FNAME, i, tostring(v)), 2)
      end
   end
   local acc = {params = 0, flops = 0, layers = {}, by_type = {}, seen = {}}
   local ok, out = pcall(walk, model, {unpack(input_shape)}, acc)
   if not ok then error(out, 2) end
   acc.output = out
   return acc
end

-- Human-readable table of a count: one line per leaf with parameters or MACs, then totals.
function M.format(c, opts)
   opts = opts or {}
   local lines = {}
   local function num(n) return string.format('%d', n) end
   if not opts.totals_only then
      lines[#lines + 1] = string.format('%-40s %-28s %-16s %12s %16s', 'path', 'layer', 'output', 'params', 'MACs')
      for _, r in ipairs(c.layers) do
         if r.params > 0 or r.macs > 0 then
            lines[#lines + 1] = string.format('%-40s %-28s %-16s %12s %16s', r.path,
               r.type .. (r.extra ~= '' and (' ' .. r.extra) or ''), table.concat(r.output, 'x'), num(r.params), num(r.macs))
         end
      end
   end
   local types = {}
   for t in pairs(c.by_type) do types[#types + 1] = t end
   table.sort(types)
   for _, t in ipairs(types) do
      local b = c.by_type[t]
      if b.params > 0 or b.macs > 0 then
         lines[#lines + 1] = string.format('%-12s x%-4d params %12s  MACs %16s', t, b.n, num(b.params), num(b.macs))
      end
   end
   lines[#lines + 1] = string.format('total: params %s (%.3fM), MACs %s (%.3fG)', num(c.params), c.params / 1e6,
      num(c.flops), c.flops / 1e9)
   return table.concat(lines, '\n')
end

return M

-- nr.nn MaxPool2d, AvgPool2d, AdaptiveMaxPool2d, AdaptiveAvgPool2d, GlobalAvgPool2d — pooling on
-- nr_maxpool2d_*, nr_avgpool2d_*, nr_adaptive_*pool2d_*, nr_global_avgpool_* (core/nn_pool.c).
-- PyTorch semantics: floor mode (ceil_mode = true: PyTorch's ceil mode), padding <= kernel/2,
-- AvgPool2d count_include_pad = true by default; the adaptive pools take the output size (PyTorch's
-- windows, which may overlap); GlobalAvgPool2d gives (N, C) (AdaptiveAvgPool2d(1) the same means
-- as (N, C, 1, 1)).
-- Invariants: kernel_size, stride, padding, output_size are {h, w}; the max pools keep the argmax
-- indices of the last forward (_indices, int64) for its backward; buffers are reused while shapes
-- stay the same.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local check = require 'nr.check'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local function init_window(self, name, k, opts, extra_opts)
   local allowed = {stride = true, padding = true, ceil_mode = true}
   for key in pairs(extra_opts or {}) do allowed[key] = true end
   local fn = 'nr.nn.' .. name
   opts = check.options(opts, allowed, fn, 4)
   local kh, kw = U.pair(k, 'kernel_size', fn, 1, 1)
   local sh, sw = U.pair(opts.stride or {kh, kw}, 'stride', fn, 1, 1)
   local ph, pw = U.pair(opts.padding or 0, 'padding', fn, 0, 1)
   if ph > math.floor(kh / 2) or pw > math.floor(kw / 2) then
      error(string.format('%s: padding %dx%d must be at most half the kernel %dx%d', fn, ph, pw, kh, kw), 4)
   end
   self.kernel_size, self.stride, self.padding = {kh, kw}, {sh, sw}, {ph, pw}
   self.ceil_mode = U.opt_bool(opts.ceil_mode, 'ceil_mode', fn, false, 1)
   return opts
end

-- One side of the output (core/nn_internal.h's nn_pool_out_size): floor, or PyTorch's ceil mode,
-- whose last window may run past the input but must start inside it or its left padding.
local function out_side(n, k, s, p, ceil)
   local o = math.floor((n + 2 * p - k + (ceil and s - 1 or 0)) / s) + 1
   if ceil and (o - 1) * s >= n + p then o = o - 1 end
   return o
end

local function out_hw(self, h, w)
   local k, s, p = self.kernel_size, self.stride, self.padding
   local ho = out_side(h, k[1], s[1], p[1], self.ceil_mode)
   local wo = out_side(w, k[2], s[2], p[2], self.ceil_mode)
   if ho < 1 or wo < 1 then
      error(string.format('input %dx%d is too small for kernel %dx%d (padding %dx%d)', h, w, k[1], k[2], p[1], p[2]), 0)
   end
   return ho, wo
end

local function window_shape(self, s)
   U.check_shape(s, self:typename() .. ':outputShape')
   if #s ~= 3 then error('expected a (C, H, W) input, got ' .. U.shape_str(s), 0) end
   local ho, wo = out_hw(self, s[2], s[3])
   return {s[1], ho, wo}
end

local function window_extra(self)
   local k, s, p = self.kernel_size, self.stride, self.padding
   local e = string.format('%dx%d', k[1], k[2])
   if s[1] ~= k[1] or s[2] ~= k[2] then e = e .. (s[1] == s[2] and (' s' .. s[1]) or string.format(' s%dx%d', s[1], s[2])) end
   if p[1] ~= 0 or p[2] ~= 0 then e = e .. (p[1] == p[2] and (' p' .. p[1]) or string.format(' p%dx%d', p[1], p[2])) end
   return e .. (self.ceil_mode and ' ceil' or '')
end

-- What every pool's backward starts from: gradOutput checked against the output, and the
-- gradInput buffer shaped like the checked input.
-- (max pools: their argmax positions index the forward's planes, so the input must be that one's
-- size; another with the same output size would route gradients to the wrong places)
local function grad_pair(self, x, gradOutput)
   x = U.input(x, 4, nil, '(N, C, H, W)')
   local h, w = rawget(self, '_in_h'), rawget(self, '_in_w')
   if h and (x:size(3) ~= h or x:size(4) ~= w) then
      error(string.format('backward: the input is %dx%d, the forward\'s was %dx%d (the argmax positions are the '
         .. "forward's)", x:size(3), x:size(4), h, w), 0)
   end
   return U.grad(gradOutput, self.output), U.grad_buffer(self, x:shape(), x)
end

local function geom(self)
   local k, s, p = self.kernel_size, self.stride, self.padding
   return k[1], k[2], s[1], s[2], p[1], p[2]
end
local function ceil_flag(self) return self.ceil_mode and 1 or 0 end

-- ---- MaxPool2d -------------------------------------------------------------------------------
local MaxPool2d = class('MaxPool2d', Module)
function MaxPool2d:__init(k, opts)
   Module.__init(self)
   init_window(self, 'MaxPool2d', k, opts)
end
function MaxPool2d:updateOutput(x)
   x = U.input(x, 4, nil, '(N, C, H, W)')
   local ho, wo = out_hw(self, x:size(3), x:size(4))
   local shape = {x:size(1), x:size(2), ho, wo}
   local y = U.act_buffer(self, 'output', shape, x)
   local idx = U.buffer(self, '_indices', shape, x, 'int64')
   local kh, kw, sh, sw, ph, pw = geom(self)
   U.call(C.nr_maxpool2d_forward(x.c, y.c, idx.c, kh, kw, sh, sw, ph, pw, ceil_flag(self)))
   self._in_h, self._in_w = x:size(3), x:size(4)
   return y
end
function MaxPool2d:updateGradInput(x, gradOutput)
   local g, gi = grad_pair(self, x, gradOutput)
   local kh, kw, sh, sw, ph, pw = geom(self)
   U.call(C.nr_maxpool2d_backward(g.c, self._indices.c, gi.c, kh, kw, sh, sw, ph, pw, ceil_flag(self)))
   return gi
end
MaxPool2d.outputShape = window_shape
MaxPool2d.extra = window_extra

-- ---- AvgPool2d -------------------------------------------------------------------------------
local AvgPool2d = class('AvgPool2d', Module)
function AvgPool2d:__init(k, opts)
   Module.__init(self)
   opts = init_window(self, 'AvgPool2d', k, opts, {count_include_pad = true})
   self.count_include_pad = U.opt_bool(opts.count_include_pad, 'count_include_pad', 'nr.nn.AvgPool2d', true)
end
function AvgPool2d:updateOutput(x)
   x = U.input(x, 4, nil, '(N, C, H, W)')
   local ho, wo = out_hw(self, x:size(3), x:size(4))
   local y = U.act_buffer(self, 'output', {x:size(1), x:size(2), ho, wo}, x)
   local kh, kw, sh, sw, ph, pw = geom(self)
   U.call(C.nr_avgpool2d_forward(x.c, y.c, kh, kw, sh, sw, ph, pw, self.count_include_pad and 1 or 0, ceil_flag(self)))
   return y
end
function AvgPool2d:updateGradInput(x, gradOutput)
   local g, gi = grad_pair(self, x, gradOutput)
   local kh, kw, sh, sw, ph, pw = geom(self)
   U.call(C.nr_avgpool2d_backward(g.c, gi.c, kh, kw, sh, sw, ph, pw, self.count_include_pad and 1 or 0, ceil_flag(self)))
   return gi
end
AvgPool2d.outputShape = window_shape
function AvgPool2d:extra()
   return window_extra(self) .. (self.count_include_pad and '' or ' nopad')
end

-- ---- AdaptiveMaxPool2d, AdaptiveAvgPool2d: (N, C, H, W) -> (N, C, oh, ow) --------------------
local function init_adaptive(self, name, size, opts)
   local fn = 'nr.nn.' .. name
   if opts ~= nil then error(fn .. ': takes only the output size', 4) end
   if size == nil then error(fn .. ': the output size (a number or a {h, w} pair) is required', 4) end
   local oh, ow = U.pair(size, 'output_size', fn, 1, 1)
   self.output_size = {oh, ow}
end
local function adaptive_shape(self, s)
   U.check_shape(s, self:typename() .. ':outputShape')
   if #s ~= 3 then error('expected a (C, H, W) input, got ' .. U.shape_str(s), 0) end
   if s[2] < 1 or s[3] < 1 then error('input ' .. U.shape_str(s) .. ' has an empty plane', 0) end
   return {s[1], self.output_size[1], self.output_size[2]}
end
local function adaptive_out(self, x)
   local o = self.output_size
   return {x:size(1), x:size(2), o[1], o[2]}
end
local function adaptive_extra(self)
   local o = self.output_size
   return string.format('%dx%d', o[1], o[2])
end

local AdaptiveMaxPool2d = class('AdaptiveMaxPool2d', Module)
function AdaptiveMaxPool2d:__init(size, opts)
   Module.__init(self)
   init_adaptive(self, 'AdaptiveMaxPool2d', size, opts)
end
function AdaptiveMaxPool2d:updateOutput(x)
   x = U.input(x, 4, nil, '(N, C, H, W)')
   local shape = adaptive_out(self, x)
   local y = U.act_buffer(self, 'output', shape, x)
   local idx = U.buffer(self, '_indices', shape, x, 'int64')
   U.call(C.nr_adaptive_maxpool2d_forward(x.c, y.c, idx.c))
   self._in_h, self._in_w = x:size(3), x:size(4)
   return y
end
function AdaptiveMaxPool2d:updateGradInput(x, gradOutput)
   local g, gi = grad_pair(self, x, gradOutput)
   U.call(C.nr_adaptive_maxpool2d_backward(g.c, self._indices.c, gi.c))
   return gi
end
AdaptiveMaxPool2d.outputShape = adaptive_shape
AdaptiveMaxPool2d.extra = adaptive_extra

local AdaptiveAvgPool2d = class('AdaptiveAvgPool2d', Module)
function AdaptiveAvgPool2d:__init(size, opts)
   Module.__init(self)
   init_adaptive(self, 'AdaptiveAvgPool2d', size, opts)
end
function AdaptiveAvgPool2d:updateOutput(x)
   x = U.input(x, 4, nil, '(N, C, H, W)')
   local y = U.act_buffer(self, 'output', adaptive_out(self, x), x)
   U.call(C.nr_adaptive_avgpool2d_forward(x.c, y.c))
   return y
end
function AdaptiveAvgPool2d:updateGradInput(x, gradOutput)
   local g, gi = grad_pair(self, x, gradOutput)
   U.call(C.nr_adaptive_avgpool2d_backward(g.c, gi.c))
   return gi
end
AdaptiveAvgPool2d.outputShape = adaptive_shape
AdaptiveAvgPool2d.extra = adaptive_extra

-- ---- GlobalAvgPool2d: (N, C, H, W) -> (N, C) -----------------------------------------------
local GlobalAvgPool2d = class('GlobalAvgPool2d', Module)
function GlobalAvgPool2d:__init(opts)
   Module.__init(self)
   if opts ~= nil then error('nr.nn.GlobalAvgPool2d: takes no arguments', 3) end
end
function GlobalAvgPool2d:updateOutput(x)
   x = U.input(x, 4, nil, '(N, C, H, W)')
   local y = U.act_buffer(self, 'output', {x:size(1), x:size(2)}, x)
   U.call(C.nr_global_avgpool_forward(x.c, y.c))
   return y
end
function GlobalAvgPool2d:updateGradInput(x, gradOutput)
   local g, gi = grad_pair(self, x, gradOutput)
   U.call(C.nr_global_avgpool_backward(g.c, gi.c))
   return gi
end
function GlobalAvgPool2d:outputShape(s)
   U.check_shape(s, 'GlobalAvgPool2d:outputShape')
   if #s ~= 3 then error('expected a (C, H, W) input, got ' .. U.shape_str(s), 0) end
   return {s[1]}
end

return {MaxPool2d = MaxPool2d, AvgPool2d = AvgPool2d, AdaptiveMaxPool2d = AdaptiveMaxPool2d,
        AdaptiveAvgPool2d = AdaptiveAvgPool2d, GlobalAvgPool2d = GlobalAvgPool2d}

-- nr.nn Conv2d — 2-d convolution (PyTorch's Conv2d fields, Torch7 methods), on the kernels
-- nr_conv2d_forward / _backward_data / _backward_weight (core/nn_conv.c, core/cuda/).
-- Invariants: weight (out, in/groups, kh, kw) and bias (out) or nil; gradWeight/gradBias have
-- the same shapes and accumulate (zeroGradParameters clears them); output and gradInput are
-- buffers owned by the module, reused while the input shape stays the same.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local check = require 'nr.check'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local Conv2d = class('Conv2d', Module)
local FN = 'nr.nn.Conv2d'

function Conv2d:__init(cin, cout, k, opts)
   Module.__init(self)
   opts = check.options(opts, {stride = true, padding = true, dilation = true, groups = true, bias = true}, FN, 3)
   U.posint(cin, 'in_channels', FN)
   U.posint(cout, 'out_channels', FN)
   local kh, kw = U.pair(k, 'kernel_size', FN, 1)
   local sh, sw = U.pair(opts.stride or 1, 'stride', FN, 1)
   local ph, pw = U.pair(opts.padding or 0, 'padding', FN, 0)
   local dh, dw = U.pair(opts.dilation or 1, 'dilation', FN, 1)
   local groups = U.posint(opts.groups or 1, 'groups', FN)
   if cin % groups ~= 0 or cout % groups ~= 0 then
      error(string.format('%s: groups %d must divide in_channels %d and out_channels %d', FN, groups, cin, cout), 3)
   end
   local bias = U.opt_bool(opts.bias, 'bias', FN, true)
   self.in_channels, self.out_channels, self.groups = cin, cout, groups
   self.kernel_size, self.stride, self.padding, self.dilation = {kh, kw}, {sh, sw}, {ph, pw}, {dh, dw}
   self.weight = T.empty({cout, cin / groups, kh, kw})
   self.gradWeight = T.zeros({cout, cin / groups, kh, kw})
   if bias then
      self.bias = T.empty({cout})
      self.gradBias = T.zeros({cout})
   end
   self:reset()
end

-- PyTorch's default initialisation (kaiming_uniform a = sqrt(5); bias U(+-1/sqrt(fan_in))).
function Conv2d:reset()
   U.default_init(self.weight, self.bias, (self.in_channels / self.groups) * self.kernel_size[1] * self.kernel_size[2])
   return self
end

local out_hw = U.conv_out_hw

local function geom(self)
   local s, p, d = self.stride, self.padding, self.dilation
   return s[1], s[2], p[1], p[2], d[1], d[2], self.groups
end

-- A parent Sequential inside nr.no_grad sets _fold_bn (the BatchNorm2d after this, in evaluation
-- mode) and _fold_relu just before forward: the conv then applies them to its output.
Conv2d.canFoldBN = true

function Conv2d:updateOutput(x)
   x = U.input(x, 4, self.in_channels, '(N, C, H, W)')
   local bn, relu = rawget(self, '_fold_bn'), rawget(self, '_fold_relu')
   self._fold_bn, self._fold_relu = nil, nil
   local ho, wo = out_hw(self, x:size(3), x:size(4))
   local y = U.act_buffer(self, 'output', {x:size(1), self.out_channels, ho, wo}, x)
   local w, b = U.tensor_c(self.weight, 'weight'), U.tensor_c(self.bias, 'bias', true)
   if bn then
      local sh, sw, ph, pw, dh, dw, groups = geom(self)
      U.call(C.nr_conv2d_forward_bn(x.c, y.c, w, b, sh, sw, ph, pw, dh, dw, groups,
         U.tensor_c(bn.weight, 'folded BN weight', true), U.tensor_c(bn.bias, 'folded BN bias', true),
         U.tensor_c(bn.running_mean, 'folded BN running_mean'), U.tensor_c(bn.running_var, 'folded BN running_var'), bn.eps,
         relu and 1 or 0))
      self._fold_done = true
   else
      U.call(C.nr_conv2d_forward(x.c, y.c, w, b, geom(self)))
   end
   return y
end

function Conv2d:updateGradInput(x, gradOutput)
   x = U.input(x, 4, self.in_channels, '(N, C, H, W)')
   local g = U.grad(gradOutput, self.output)
   local gi = U.grad_buffer(self, x:shape(), x)
   U.call(C.nr_conv2d_backward_data(g.c, gi.c, U.tensor_c(self.weight, 'weight'), geom(self)))
   return gi
end

Conv2d.paramsOnlyBackward = true -- Module.gradients may skip the input gradient (Sequential:setInputGrad)

function Conv2d:accGradParameters(x, gradOutput, scale)
   x = U.input(x, 4, self.in_channels, '(N, C, H, W)')
   local g = U.grad(gradOutput, self.output)
   local sh, sw, ph, pw, dh, dw, groups = geom(self)
   U.call(C.nr_conv2d_backward_weight(x.c, g.c, U.tensor_c(self.gradWeight, 'gradWeight'),
      U.tensor_c(self.gradBias, 'gradBias', self.bias == nil),
      sh, sw, ph, pw, dh, dw, groups, scale or 1, 1))
end

Conv2d.outputShape = U.conv_output_shape

function Conv2d:cost(s)
   local o = self:outputShape(s)
   local params = self.weight:numel() + (self.bias and self.bias:numel() or 0)
   local k = self.kernel_size
   return params, o[1] * o[2] * o[3] * (self.in_channels / self.groups) * k[1] * k[2]
end

-- "64->128 3x3 s2 p1 g2 d2 nobias" (defaults omitted).
function Conv2d:extra()
   local k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
   local function hw(v) return v[1] == v[2] and tostring(v[1]) or (v[1] .. 'x' .. v[2]) end
   local parts = {string.format('%d->%d %dx%d', self.in_channels, self.out_channels, k[1], k[2])}
   if s[1] ~= 1 or s[2] ~= 1 then parts[#parts + 1] = 's' .. hw(s) end
   if p[1] ~= 0 or p[2] ~= 0 then parts[#parts + 1] = 'p' .. hw(p) end
   if d[1] ~= 1 or d[2] ~= 1 then parts[#parts + 1] = 'd' .. hw(d) end
   if self.groups ~= 1 then parts[#parts + 1] = 'g' .. self.groups end
   if not self.bias then parts[#parts + 1] = 'nobias' end
   return table.concat(parts, ' ')
end

return {Conv2d = Conv2d}

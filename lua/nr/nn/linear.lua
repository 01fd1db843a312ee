-- nr.nn Linear — y = x W^T + b for x (N, in), on nr_matmul (BLAS / cuBLAS) and the bias kernels
-- nr_bias_add / nr_bias_backward.
-- Invariants: weight (out, in), bias (out) or nil; gradients accumulate; output and gradInput are
-- buffers owned by the module, reused while the batch size stays the same.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local check = require 'nr.check'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local Linear = class('Linear', Module)
local FN = 'nr.nn.Linear'

function Linear:__init(nin, nout, opts)
   Module.__init(self)
   opts = check.options(opts, {bias = true}, FN)
   U.posint(nin, 'in_features', FN)
   U.posint(nout, 'out_features', FN)
   self.in_features, self.out_features = nin, nout
   self.weight = T.empty({nout, nin})
   self.gradWeight = T.zeros({nout, nin})
   if U.opt_bool(opts.bias, 'bias', FN, true) then
      self.bias = T.empty({nout})
      self.gradBias = T.zeros({nout})
   end
   self:reset()
end

function Linear:reset()
   U.default_init(self.weight, self.bias, self.in_features)
   return self
end

local function input(self, x)
   x = U.input(x, 2, nil, '(N, in_features)')
   if x:size(2) ~= self.in_features then
      error(string.format('expected input with %d features, got %s', self.in_features, U.shape_str(x:shape())), 0)
   end
   return x
end

function Linear:updateOutput(x)
   x = input(self, x)
   local y = U.act_buffer(self, 'output', {x:size(1), self.out_features}, x)
   U.call(C.nr_matmul(x.c, self.weight.c, y.c, 0, 1, 1, 0))
   if self.bias then U.call(C.nr_bias_add(y.c, self.bias.c)) end
   return y
end

function Linear:updateGradInput(x, gradOutput)
   x = input(self, x)
   local g = U.grad(gradOutput, self.output)
   local gi = U.grad_buffer(self, x:shape(), x)
   U.call(C.nr_matmul(g.c, self.weight.c, gi.c, 0, 0, 1, 0))
   return gi
end

Linear.paramsOnlyBackward = true -- Module.gradients may skip the input gradient (Sequential:setInputGrad)

function Linear:accGradParameters(x, gradOutput, scale)
   x = input(self, x)
   local g = U.grad(gradOutput, self.output)
   scale = scale or 1
   U.call(C.nr_matmul(g.c, x.c, self.gradWeight.c, 1, 0, scale, 1))
   if self.bias then U.call(C.nr_bias_backward(g.c, self.gradBias.c, scale, 1)) end
end

function Linear:outputShape(s)
   if #s ~= 1 or s[1] ~= self.in_features then
      error(string.format('expected a (%d) input, got %s', self.in_features, U.shape_str(s)), 0)
   end
   return {self.out_features}
end

function Linear:cost(s)
   self:outputShape(s)
   return self.weight:numel() + (self.bias and self.bias:numel() or 0), self.in_features * self.out_features
end

function Linear:extra()
   return string.format('%d->%d%s', self.in_features, self.out_features, self.bias and '' or ' nobias')
end

return {Linear = Linear}

-- nr.nn Linear — y = x W^T + b for x (*, in) (as PyTorch: (N, in), a single (in) sample, or any
-- leading dimensions), on nr_matmul (BLAS / cuBLAS) and the bias kernels nr_bias_add /
-- nr_bias_backward.
-- Invariants: weight (out, in), bias (out) or nil; gradients accumulate; an input of other than 2
-- dimensions is computed as the (M, in) matrix of its rows (M the product of the leading sizes)
-- and the output is that (M, out) buffer viewed as (*, out); output and gradInput are buffers
-- owned by the module, reused while the shapes stay the same.
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
   opts = check.options(opts, {bias = true}, FN, 3)
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

-- x (*, in) -> the (M, in) matrix of its rows (x itself when 2-d, else a view) and, for other
-- than 2 dimensions, the leading sizes
local function input(self, x)
   x = U.float_input(x, '(*, in_features)')
   local d = x:dim()
   if d < 1 or x:size(d) ~= self.in_features then
      error(string.format('expected input with %d features in its last dimension, got %s%s', self.in_features,
         U.shape_str(x:shape()), d == 4 and ' (an (N, C, H, W) map needs nn.Flatten or a global pool first)' or ''), 0)
   end
   if d == 2 then return x end
   local lead, m = {}, 1
   for i = 1, d - 1 do
      lead[i] = x:size(i)
      m = m * lead[i]
   end
   return x:reshape({m, self.in_features}), lead
end

-- shape {lead..., n}
local function with_last(lead, n)
   local s = {unpack(lead)}
   s[#s + 1] = n
   return s
end

function Linear:updateOutput(x)
   local x2, lead = input(self, x)
   local key = lead and '_output2d' or 'output'
   local y = U.act_buffer(self, key, {x2:size(1), self.out_features}, x2)
   U.call(C.nr_matmul(x2.c, U.tensor_c(self.weight, 'weight'), y.c, 0, 1, 1, 0))
   if self.bias then U.call(C.nr_bias_add(y.c, U.tensor_c(self.bias, 'bias'))) end
   self.output = lead and y:reshape(with_last(lead, self.out_features)) or y
   return self.output
end

-- gradOutput (*, out) checked against the output, as the (M, out) matrix of its rows
local function grad_rows(self, gradOutput)
   local g = U.grad(gradOutput, self.output)
   return g:dim() == 2 and g or g:reshape({g:numel() / self.out_features, self.out_features})
end

function Linear:updateGradInput(x, gradOutput)
   local x2 = input(self, x)
   local g = grad_rows(self, gradOutput)
   local gi = U.grad_buffer(self, x:shape(), x2)
   U.call(C.nr_matmul(g.c, U.tensor_c(self.weight, 'weight'), (gi:dim() == 2 and gi or gi:reshape(x2:shape())).c, 0, 0, 1, 0))
   return gi
end

Linear.paramsOnlyBackward = true -- Module.gradients may skip the input gradient (Sequential:setInputGrad)

function Linear:accGradParameters(x, gradOutput, scale)
   x = input(self, x)
   local g = grad_rows(self, gradOutput)
   scale = scale or 1
   U.call(C.nr_matmul(g.c, x.c, U.tensor_c(self.gradWeight, 'gradWeight'), 1, 0, scale, 1))
   if self.bias then U.call(C.nr_bias_backward(g.c, U.tensor_c(self.gradBias, 'gradBias'), scale, 1)) end
end

function Linear:outputShape(s)
   U.check_shape(s, 'Linear:outputShape')
   if #s < 1 or s[#s] ~= self.in_features then
      error(string.format('expected a (*, %d) input, got %s', self.in_features, U.shape_str(s)), 0)
   end
   return with_last({unpack(s, 1, #s - 1)}, self.out_features)
end

-- params, and MACs per sample: one (in x out) product per row of the sample
function Linear:cost(s)
   self:outputShape(s)
   local rows = 1
   for i = 1, #s - 1 do rows = rows * s[i] end
   return self.weight:numel() + (self.bias and self.bias:numel() or 0), rows * self.in_features * self.out_features
end

function Linear:extra()
   return string.format('%d->%d%s', self.in_features, self.out_features, self.bias and '' or ' nobias')
end

return {Linear = Linear}

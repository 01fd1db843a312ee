-- nr.nn BatchNorm2d, BatchNorm1d — batch normalisation per channel over (N, H, W) (BatchNorm2d,
-- (N, C, H, W) inputs) or over N, or N and L (BatchNorm1d, (N, C) or (N, C, L) inputs), PyTorch
-- semantics (biased batch variance to normalise, unbiased in running_var, momentum 0.1, eps 1e-5),
-- on the kernels nr_bn2d_* (core/nn_norm.c, core/cuda/), which take all three layouts.
-- BatchNorm1d is BatchNorm2d with another input check: it is not a Neural Rejuvenation liveliness
-- source (those are the BatchNorm2d after convolutions) and is never folded into a conv.
-- Invariants: weight (γ, init 1) and bias (β, init 0) exist when affine; running_mean (init 0) and
-- running_var (init 1) are buffers saved with the weights (_buffers); training mode normalises
-- with batch statistics and updates the running ones, evaluation mode uses the running ones;
-- the saved batch mean/invstd (_save_mean, _save_invstd) are scratch, dropped on clone/to().
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local check = require 'nr.check'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local BatchNorm2d = class('BatchNorm2d', Module)
BatchNorm2d._buffers = {'running_mean', 'running_var'}

-- (BatchNorm1d runs this too: FN names the class constructed)
function BatchNorm2d:__init(c, opts)
   Module.__init(self)
   local FN = 'nr.nn.' .. self:typename()
   opts = check.options(opts, {eps = true, momentum = true, affine = true}, FN, 3)
   U.posint(c, 'num_features', FN)
   self.num_features = c
   self.eps = U.opt_num(opts.eps, 'eps', FN, 1e-5, 0, math.huge, true)
   self.momentum = U.opt_num(opts.momentum, 'momentum', FN, 0.1, 0, 1)
   self.affine = U.opt_bool(opts.affine, 'affine', FN, true)
   if self.affine then
      self.weight = T.ones({c})
      self.bias = T.zeros({c})
      self.gradWeight = T.zeros({c})
      self.gradBias = T.zeros({c})
   end
   self.running_mean = T.zeros({c})
   self.running_var = T.ones({c})
end

function BatchNorm2d:reset()
   if self.affine then
      self.weight:fill(1)
      self.bias:fill(0)
   end
   self.running_mean:fill(0)
   self.running_var:fill(1)
   return self
end

local function opt_c(t, what) return U.tensor_c(t, what, true) end

-- The input, checked: (N, C, H, W) with C = num_features.
function BatchNorm2d:input(x) return U.input(x, 4, self.num_features, '(N, C, H, W)') end

-- A Conv2d before this may apply it in its output pass under nr.no_grad (Conv2d.canFoldBN).
BatchNorm2d.canFoldIntoConv = true

-- A parent Sequential whose next child is an in-place ReLU sets _fuse_relu just before calling
-- forward: the ReLU is then applied here in the same pass (and its backward here too, from the
-- fused output), and the ReLU module passes through.
BatchNorm2d.canFuseReLU = true

-- Called by a parent Sequential (inside nr.no_grad) when the Conv2d before this applied it: y is
-- already this BN's output (and the ReLU's when relu).
function BatchNorm2d:foldedForward(y, relu)
   self.output = y
   self._relu_fused = relu
   self._stats_from_batch = false
   return y
end

function BatchNorm2d:updateOutput(x)
   -- (the parent's request is taken before the input is checked: a refused input must not leave
   -- it set for the next forward, which would apply a ReLU nobody asked for)
   local relu = rawget(self, '_fuse_relu') == true
   self._fuse_relu = nil
   x = self:input(x)
   self._relu_fused = relu
   -- own buffer under its own key: after a folded forward, output is the conv's buffer
   local y = U.act_buffer(self, '_out', x:shape(), x)
   self.output = y
   if self.train then
      local c = {self.num_features}
      local sm, si = U.buffer(self, '_save_mean', c, x), U.buffer(self, '_save_invstd', c, x)
      U.call(C.nr_bn2d_forward_train(x.c, y.c, sm.c, si.c, opt_c(self.weight, 'weight'), opt_c(self.bias, 'bias'),
         U.tensor_c(self.running_mean, 'running_mean'), U.tensor_c(self.running_var, 'running_var'), self.momentum,
         self.eps, relu and 1 or 0))
      self._stats_from_batch = true
   else
      U.call(C.nr_bn2d_forward_eval(x.c, y.c, opt_c(self.weight, 'weight'), opt_c(self.bias, 'bias'),
         U.tensor_c(self.running_mean, 'running_mean'), U.tensor_c(self.running_var, 'running_var'), self.eps,
         relu and 1 or 0))
      self._stats_from_batch = false
   end
   return y
end

-- dx, dgamma, dbeta (any of them nil) from the mode of the last forward.
local function backward(self, x, gradOutput, dx, dgamma, dbeta, scale)
   x = self:input(x)
   local g = U.grad(gradOutput, self.output)
   if not T.same_shape(g:shape(), x:shape()) then
      error(string.format('gradOutput %s does not match the input %s', U.shape_str(g:shape()), U.shape_str(x:shape())), 0)
   end
   if dx == true then dx = U.grad_buffer(self, x:shape(), x) end
   local relu_y = self._relu_fused and self.output.c or nil
   if self._stats_from_batch then
      U.call(C.nr_bn2d_backward(x.c, g.c, opt_c(dx, 'gradInput'), opt_c(dgamma, 'gradWeight'), opt_c(dbeta, 'gradBias'),
         opt_c(self.weight, 'weight'),
         self._save_mean.c, self._save_invstd.c, scale, 1, relu_y))
   else
      U.call(C.nr_bn2d_backward_eval(x.c, g.c, opt_c(dx, 'gradInput'), opt_c(dgamma, 'gradWeight'),
         opt_c(dbeta, 'gradBias'), opt_c(self.weight, 'weight'), U.tensor_c(self.running_mean, 'running_mean'),
         U.tensor_c(self.running_var, 'running_var'), self.eps, scale, 1, relu_y))
   end
   return dx
end

function BatchNorm2d:updateGradInput(x, gradOutput)
   return backward(self, x, gradOutput, true, nil, nil, 1)
end

function BatchNorm2d:accGradParameters(x, gradOutput, scale)
   if not self.affine then return end
   backward(self, x, gradOutput, nil, self.gradWeight, self.gradBias, scale or 1)
end

-- One pass for dx, dgamma and dbeta (the reductions dgamma/dbeta need are the ones dx needs).
function BatchNorm2d:gradients(x, gradOutput, scale)
   if not self.affine then return self:updateGradInput(x, gradOutput) end
   return backward(self, x, gradOutput, true, self.gradWeight, self.gradBias, scale or 1)
end

function BatchNorm2d:outputShape(s)
   U.check_shape(s, 'BatchNorm2d:outputShape')
   if #s ~= 3 or s[1] ~= self.num_features then
      error(string.format('expected a (%d, H, W) input, got %s', self.num_features, U.shape_str(s)), 0)
   end
   return s
end

function BatchNorm2d:cost(s)
   self:outputShape(s)
   return self.affine and 2 * self.num_features or 0, 0
end

function BatchNorm2d:extra()
   return tostring(self.num_features) .. (self.affine and '' or ' noaffine')
end

-- ---- BatchNorm1d: (N, C) or (N, C, L) ---------------------------------------------------------
local BatchNorm1d = class('BatchNorm1d', BatchNorm2d)
BatchNorm1d.canFoldIntoConv = false

function BatchNorm1d:input(x)
   x = U.float_input(x, '(N, C) or (N, C, L)')
   if x:dim() ~= 2 and x:dim() ~= 3 then
      error('expected a 2-d (N, C) or 3-d (N, C, L) input, got ' .. U.shape_str(x:shape()), 0)
   end
   if x:size(2) ~= self.num_features then
      error(string.format('expected input with %d features, got %s', self.num_features, U.shape_str(x:shape())), 0)
   end
   return x
end

function BatchNorm1d:outputShape(s)
   U.check_shape(s, 'BatchNorm1d:outputShape')
   if (#s ~= 1 and #s ~= 2) or s[1] ~= self.num_features then
      error(string.format('expected a (%d) or (%d, L) input, got %s', self.num_features, self.num_features,
         U.shape_str(s)), 0)
   end
   return s
end

return {BatchNorm2d = BatchNorm2d, BatchNorm1d = BatchNorm1d}

-- nr.nn Softmax and LogSoftmax — over the last dimension (PyTorch's nn.Softmax(dim=-1) and
-- nn.LogSoftmax(dim=-1); Torch7's nn.SoftMax / nn.LogSoftMax on (N, K)), on nr_softmax_forward /
-- nr_softmax_backward (core/nn_act.c; CUDA twin in core/cuda/nn_kernels.cu).
-- Invariants: any input with ndim >= 1, float32 (or bfloat16 on CUDA), worked on as row-major
-- (a channels-last input is made contiguous first); the backward uses the module's own output,
-- so it needs the forward of the same input first. For training a classifier, CrossEntropyLoss
-- takes the logits directly (its softmax is fused and more accurate than log(Softmax)).
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local U = require 'nr.nn.layer_util'
local T = require 'nr.tensor'
local C = require('nr.ffi').C

local function make(name, take_log)
   local cls = class(name, Module)
   -- opts: nil, or {dim = d}: d = -1 or the input's last dimension (1-based, as t:size(d)); the
   -- softmax runs over the last dimension only
   function cls:__init(opts)
      Module.__init(self)
      self.dim = -1
      if opts ~= nil then
         if type(opts) ~= 'table' then error(string.format('nr.nn.%s: takes {dim = d}, got %s', name, tostring(opts)), 3) end
         for k, v in pairs(opts) do
            if k ~= 'dim' then error(string.format('nr.nn.%s: unknown option %q (allowed: dim)', name, tostring(k)), 3) end
            if type(v) ~= 'number' or v ~= math.floor(v) or (v < 1 and v ~= -1) then
               error(string.format('nr.nn.%s: dim must be -1 or a dimension >= 1 (1-based), got %s', name, tostring(v)), 3)
            end
            self.dim = v
         end
      end
   end
   function cls:updateOutput(x)
      x = U.float_input(x)
      if x:dim() < 1 then error('expected an input with at least 1 dimension, got a scalar', 0) end
      if self.dim ~= -1 and self.dim ~= x:dim() then
         error(string.format('dim %d is not the last dimension of the %d-d input %s (only the last is supported: move it last)',
            self.dim, x:dim(), U.shape_str(x:shape())), 0)
      end
      x = x:contiguous()
      local y = U.act_buffer(self, 'output', x:shape(), x)
      U.call(C.nr_softmax_forward(x.c, y.c, take_log and 1 or 0))
      self.output = y
      return y
   end
   function cls:updateGradInput(x, gradOutput)
      x = U.float_input(x)
      local y = self.output
      local g = U.grad(gradOutput, y)
      if not T.same_shape(x:shape(), y:shape()) then error('backward called with another input than the forward', 0) end
      local gi = U.grad_buffer(self, y:shape(), y)
      U.call(C.nr_softmax_backward(y.c, g.c, gi.c, take_log and 1 or 0))
      self.gradInput = gi
      return gi
   end
   function cls:outputShape(s) return s end
   function cls:extra() return self.dim ~= -1 and ('dim=' .. self.dim) or '' end
   return cls
end

return {Softmax = make('Softmax', false), LogSoftmax = make('LogSoftmax', true)}

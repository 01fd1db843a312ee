-- nr.nn ReLU, Sigmoid, Tanh, ReLU6 and LeakyReLU — elementwise activations on nr_relu_*,
-- nr_sigmoid_* and nr_activation_* (core/nn_act.c).
-- Invariants: any input shape (float32 or bfloat16); the backward uses the module's own output (y > 0 for
-- ReLU, y (1 - y) for Sigmoid, 1 - y^2 for Tanh, 0 < y < 6 for ReLU6) or, for LeakyReLU, its
-- input (x > 0, any slope), so it needs the forward of the same input first; output and
-- gradInput are buffers owned by the module.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local U = require 'nr.nn.layer_util'
local T = require 'nr.tensor'
local C = require('nr.ffi').C


-- inplace_ok: the class accepts {inplace = true} (ReLU, as PyTorch's nn.ReLU(inplace=True)): the
-- forward overwrites its input and returns it, saving one activation buffer. Safe when nothing
-- else reads that input afterwards (a BN or residual-add output feeding only this ReLU, as in the
-- zoo); the backward still writes a gradInput buffer of its own, so gradients never alias.
-- slope: the class takes a negative slope (LeakyReLU(0.01) or {negative_slope = 0.01}, default
-- slope), handed to fwd and bwd as their last argument; from_input: bwd reads the input, not the
-- output.
local function make(name, fwd, bwd, inplace_ok, slope, from_input)
   local cls = class(name, Module)
   function cls:__init(opts)
      Module.__init(self)
      if slope then
         local v = type(opts) == 'table' and opts.negative_slope or opts
         if type(opts) == 'table' then
            for k in pairs(opts) do
               if k ~= 'negative_slope' then
                  error(string.format('nr.nn.%s: unknown option %q (allowed: negative_slope)', name, tostring(k)), 3)
               end
            end
         end
         if v == nil then v = slope end
         if type(v) ~= 'number' or v ~= v or math.abs(v) == math.huge then
            error(string.format('nr.nn.%s: negative_slope must be a finite number, got %s', name, tostring(v)), 3)
         end
         self.negative_slope = v
      elseif inplace_ok and type(opts) == 'table' then
         for k in pairs(opts) do
            if k ~= 'inplace' then error(string.format('nr.nn.%s: unknown option %q (allowed: inplace)', name, tostring(k)), 3) end
         end
         self.inplace = opts.inplace and true or false
      elseif opts ~= nil then
         error(string.format('nr.nn.%s: %s, got %s', name, inplace_ok and 'takes {inplace = bool}' or 'takes no arguments',
            tostring(opts)), 3)
      end
   end
   function cls:updateOutput(x)
      local given = x
      x = U.float_input(x)
      self._fused = false
      local y = self.inplace and x or U.act_buffer(self, 'output', x:shape(), x)
      U.call(fwd(x.c, y.c, self.negative_slope))
      -- in place on a view the kernel does not take (transposed, ...): computed on a dense copy,
      -- written back, so the input is overwritten as promised
      if self.inplace and x ~= given then
         given:copy(y)
         y = given
      end
      self.output = y
      return y
   end
   function cls:extra()
      if self.negative_slope then return 'negative_slope=' .. self.negative_slope end
      return self.inplace and 'inplace' or ''
   end
   -- Called by a parent Sequential instead of forward when the BatchNorm2d before this in-place
   -- ReLU applied it (BatchNorm2d.canFuseReLU): x is already max(., 0); the backward passes the
   -- gradient through, the BatchNorm2d masks it.
   if inplace_ok then
      function cls:fusedForward(x)
         self._fused = true
         self.output = x
         return x
      end
   end
   function cls:updateGradInput(x, gradOutput)
      if self._fused then
         self.gradInput = U.grad(gradOutput, self.output)
         return self.gradInput
      end
      x = U.float_input(x)
      local out = U.float_input(self.output) -- dense (an in-place output may be a strided view)
      local g = U.grad(gradOutput, out)
      local gi = U.grad_buffer(self, x:shape(), x)
      if from_input and not T.same_shape(x:shape(), out:shape()) then
         error('backward called with another input than the forward', 0)
      end
      U.call(bwd((from_input and x or out).c, g.c, gi.c, self.negative_slope))
      return gi
   end
   function cls:outputShape(s) return s end
   return cls
end

-- fwd and bwd of the nr_activation_* kind
local function act(kind)
   return function(x, y, a) return C.nr_activation_forward(x, y, kind, a or 0) end,
      function(s, g, gi, a) return C.nr_activation_backward(s, g, gi, kind, a or 0) end
end

local tanh_f, tanh_b = act(C.NR_ACT_TANH)
local relu6_f, relu6_b = act(C.NR_ACT_RELU6)
local leaky_f, leaky_b = act(C.NR_ACT_LEAKY_RELU)

return {
   ReLU = make('ReLU', function(x, y) return C.nr_relu_forward(x, y) end,
      function(y, g, gi) return C.nr_relu_backward(y, g, gi) end, true),
   Sigmoid = make('Sigmoid', function(x, y) return C.nr_sigmoid_forward(x, y) end,
      function(y, g, gi) return C.nr_sigmoid_backward(y, g, gi) end),
   Tanh = make('Tanh', tanh_f, tanh_b),
   ReLU6 = make('ReLU6', relu6_f, relu6_b),
   LeakyReLU = make('LeakyReLU', leaky_f, leaky_b, false, 0.01, true),
}

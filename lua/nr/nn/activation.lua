-- nr.nn ReLU and Sigmoid — elementwise activations on nr_relu_* / nr_sigmoid_* (core/nn_act.c).
-- Invariants: any input shape (float32); the backward uses the module's own output (y > 0 for
-- ReLU, y (1 - y) for Sigmoid), so it needs the forward of the same input first; output and
-- gradInput are buffers owned by the module.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local function any_input(x)
   if not T.is_tensor(x) then error('expected a tensor as input, got ' .. type(x), 0) end
   if x:dtype() ~= 'float32' then error('expected a float32 input, got ' .. x:describe(), 0) end
   return x:contiguous()
end

local function make(name, fwd, bwd)
   local cls = class(name, Module)
   function cls:__init(opts)
      Module.__init(self)
      if opts ~= nil then error(string.format('nr.nn.%s: takes no arguments, got %s', name, tostring(opts)), 3) end
   end
   function cls:updateOutput(x)
      x = any_input(x)
      local y = U.buffer(self, 'output', x:shape(), x)
      U.call(fwd(x.c, y.c))
      return y
   end
   function cls:updateGradInput(x, gradOutput)
      x = any_input(x)
      local g = U.grad(gradOutput, self.output)
      local gi = U.buffer(self, 'gradInput', x:shape(), x)
      U.call(bwd(self.output.c, g.c, gi.c))
      return gi
   end
   function cls:outputShape(s) return s end
   return cls
end

return {
   ReLU = make('ReLU', function(x, y) return C.nr_relu_forward(x, y) end,
      function(y, g, gi) return C.nr_relu_backward(y, g, gi) end),
   Sigmoid = make('Sigmoid', function(x, y) return C.nr_sigmoid_forward(x, y) end,
      function(y, g, gi) return C.nr_sigmoid_backward(y, g, gi) end),
}

-- nr.nn ReLU and Sigmoid — elementwise activations on nr_relu_* / nr_sigmoid_* (core/nn_act.c).
-- Invariants: any input shape (float32 or bfloat16); the backward uses the module's own output (y > 0 for
-- ReLU, y (1 - y) for Sigmoid), so it needs the forward of the same input first; output and
-- gradInput are buffers owned by the module.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C


-- inplace_ok: the class accepts {inplace = true} (ReLU, as PyTorch's nn.ReLU(inplace=True)): the
-- forward overwrites its input and returns it, saving one activation buffer. Safe when nothing
-- else reads that input afterwards (a BN or residual-add output feeding only this ReLU, as in the
-- zoo); the backward still writes a gradInput buffer of its own, so gradients never alias.
local function make(name, fwd, bwd, inplace_ok)
   local cls = class(name, Module)
   function cls:__init(opts)
      Module.__init(self)
      if inplace_ok and type(opts) == 'table' then
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
      U.call(fwd(x.c, y.c))
      -- in place on a view the kernel does not take (transposed, ...): computed on a dense copy,
      -- written back, so the input is overwritten as promised
      if self.inplace and x ~= given then
         given:copy(y)
         y = given
      end
      self.output = y
      return y
   end
   function cls:extra() return self.inplace and 'inplace' or '' end
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
      U.call(bwd(out.c, g.c, gi.c))
      return gi
   end
   function cls:outputShape(s) return s end
   return cls
end

return {
   ReLU = make('ReLU', function(x, y) return C.nr_relu_forward(x, y) end,
      function(y, g, gi) return C.nr_relu_backward(y, g, gi) end, true),
   Sigmoid = make('Sigmoid', function(x, y) return C.nr_sigmoid_forward(x, y) end,
      function(y, g, gi) return C.nr_sigmoid_backward(y, g, gi) end),
}

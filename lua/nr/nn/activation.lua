-- nr.nn ReLU, Sigmoid, Tanh, ReLU6, LeakyReLU, ELU, SiLU, GELU, Hardswish and Hardsigmoid —
-- elementwise activations on nr_relu_*, nr_sigmoid_* and nr_activation_* (core/nn_act.c; their
-- formulas, PyTorch's, in core/nn_act_math.h).
-- Invariants: any input shape (float32 or bfloat16); the backward uses the module's own output (y > 0 for
-- ReLU, y (1 - y) for Sigmoid, 1 - y^2 for Tanh, 0 < y < 6 for ReLU6) or, for the others, its
-- input, so it needs the forward of the same input first; output and gradInput are buffers owned
-- by the module.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local U = require 'nr.nn.layer_util'
local T = require 'nr.tensor'
local C = require('nr.ffi').C
local check = require 'nr.check'


-- spec.fwd(x, y, m), spec.bwd(saved, dy, dx, m): the kernels (nr_tensor pointers; m the module).
-- spec.inplace_ok: the class accepts {inplace = true} (ReLU, as PyTorch's nn.ReLU(inplace=True)): the
-- forward overwrites its input and returns it, saving one activation buffer. Safe when nothing
-- else reads that input afterwards (a BN or residual-add output feeding only this ReLU, as in the
-- zoo); the backward still writes a gradInput buffer of its own, so gradients never alias.
-- spec.param = {name, default, valid(v) -> true | what was expected}: the class takes one
-- setting, given alone (LeakyReLU(0.01)) or by name ({negative_slope = 0.01}), stored as
-- m[name]. spec.from_input: bwd reads the forward's input, not its output.
local function make(name, spec)
   local fwd, bwd, inplace_ok, param, from_input = spec.fwd, spec.bwd, spec.inplace_ok, spec.param, spec.from_input
   local cls = class(name, Module)
   local FN = 'nr.nn.' .. name
   function cls:__init(opts)
      Module.__init(self)
      if param then
         local v = opts
         if type(opts) == 'table' then
            opts = check.options(opts, {[param.name] = true}, FN, 3)
            v = opts[param.name]
         end
         if v == nil then v = param.default end
         local ok = param.valid(v)
         if ok ~= true then error(string.format('%s: %s must be %s, got %s', FN, param.name, ok, check.show(v)), 3) end
         self[param.name] = v
      elseif inplace_ok and type(opts) == 'table' then
         opts = check.options(opts, {inplace = true}, FN, 3)
         self.inplace = opts.inplace and true or false
      elseif opts ~= nil then
         error(string.format('%s: %s, got %s', FN, inplace_ok and 'takes {inplace = bool}' or 'takes no arguments',
            check.show(opts)), 3)
      end
   end
   function cls:updateOutput(x)
      local given = x
      x = U.float_input(x)
      self._fused = false
      local y = self.inplace and x or U.act_buffer(self, 'output', x:shape(), x)
      U.call(fwd(x.c, y.c, self))
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
      if param then return param.name .. '=' .. tostring(self[param.name]) end
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
      U.call(bwd((from_input and x or out).c, g.c, gi.c, self))
      return gi
   end
   function cls:outputShape(s) return s end
   return cls
end

-- A class on nr_activation_* of kind (a C.NR_ACT_* value, or a function of the module giving
-- one), with the spec's other fields; alpha_of(m): the kernel's alpha (leaky ReLU, ELU).
local function act(name, kind, spec, alpha_of)
   local kind_of = type(kind) == 'function' and kind or function() return kind end
   spec.fwd = function(x, y, m) return C.nr_activation_forward(x, y, kind_of(m), alpha_of and alpha_of(m) or 0) end
   spec.bwd = function(s, g, gi, m) return C.nr_activation_backward(s, g, gi, kind_of(m), alpha_of and alpha_of(m) or 0) end
   return make(name, spec)
end

local function finite(v)
   return (type(v) == 'number' and v == v and math.abs(v) ~= math.huge) or 'a finite number'
end
local GELU_FORMS = {none = C.NR_ACT_GELU, tanh = C.NR_ACT_GELU_TANH}

return {
   ReLU = make('ReLU', {fwd = function(x, y) return C.nr_relu_forward(x, y) end,
      bwd = function(y, g, gi) return C.nr_relu_backward(y, g, gi) end, inplace_ok = true}),
   Sigmoid = make('Sigmoid', {fwd = function(x, y) return C.nr_sigmoid_forward(x, y) end,
      bwd = function(y, g, gi) return C.nr_sigmoid_backward(y, g, gi) end}),
   Tanh = act('Tanh', C.NR_ACT_TANH, {}),
   ReLU6 = act('ReLU6', C.NR_ACT_RELU6, {}),
   LeakyReLU = act('LeakyReLU', C.NR_ACT_LEAKY_RELU,
      {param = {name = 'negative_slope', default = 0.01, valid = finite}, from_input = true},
      function(m) return m.negative_slope end),
   ELU = act('ELU', C.NR_ACT_ELU, {param = {name = 'alpha', default = 1.0, valid = finite}, from_input = true},
      function(m) return m.alpha end),
   SiLU = act('SiLU', C.NR_ACT_SILU, {from_input = true}),
   GELU = act('GELU', function(m) return GELU_FORMS[m.approximate] end, {from_input = true, param = {
      name = 'approximate', default = 'none', valid = function(v) return GELU_FORMS[v] ~= nil or "'none' or 'tanh'" end}}),
   Hardswish = act('Hardswish', C.NR_ACT_HARDSWISH, {from_input = true}),
   Hardsigmoid = act('Hardsigmoid', C.NR_ACT_HARDSIGMOID, {from_input = true}),
}

-- nr.nn Dropout — inverted dropout (kept values scaled by 1/(1-p) in training; identity in
-- evaluate()), on nr_dropout_forward/backward (core/nn_act.c). The mask is drawn from the global
-- generator, so nr.manual_seed reproduces it.
-- Invariants: 0 <= p <= 1 (p = 1 drops everything: zeros, as PyTorch); the mask of the last
-- training forward (_mask) drives the backward.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local Dropout = class('Dropout', Module)

function Dropout:__init(p, extra)
   Module.__init(self)
   if extra ~= nil then error('nr.nn.Dropout: takes p only (no inplace or other options), got a second argument', 3) end
   self.p = U.opt_num(p, 'p', 'nr.nn.Dropout', 0.5, 0, 1)
end

function Dropout:updateOutput(x)
   x = U.float_input(x)
   if not self.train or self.p == 0 then
      self._identity = true
      self.output = x
      return x
   end
   self._identity = false
   local y = U.act_buffer(self, 'output', x:shape(), x)
   local m = U.buffer(self, '_mask', x:shape(), x)
   if self.p == 1 then   -- every value dropped (PyTorch: zeros, no 1/(1-p) scale to take)
      m:fill(0)
      y:fill(0)
   else
      U.call(C.nr_dropout_forward(x.c, y.c, m.c, self.p))
   end
   self.output = y
   return y
end

function Dropout:updateGradInput(x, gradOutput)
   local g = U.grad(gradOutput, self.output)
   if self._identity then
      self.gradInput = g
      return g
   end
   local gi = U.grad_buffer(self, g:shape(), g)
   U.call(C.nr_dropout_backward(g.c, self._mask.c, gi.c))
   return gi
end

function Dropout:outputShape(s) return s end
function Dropout:extra() return string.format('p=%g', self.p) end

return {Dropout = Dropout}

-- nr.nn Flatten — (N, d2, d3, ...) -> (N, d2 * d3 * ...), a view of the input when it is
-- contiguous (no copy); the backward views gradOutput back to the input's shape.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local U = require 'nr.nn.layer_util'

local Flatten = class('Flatten', Module)

function Flatten:__init(opts)
   Module.__init(self)
   if opts ~= nil then error('nr.nn.Flatten: takes no arguments', 3) end
end

-- Raises (level 0: Module adds the path) unless x is a tensor; backward reads x's shape too.
local function tensor_input(x)
   if not T.is_tensor(x) then error('expected a tensor as input, got ' .. type(x), 0) end
end

function Flatten:updateOutput(x)
   tensor_input(x)
   if x:dim() < 1 then error('expected an input with a batch dimension, got a 0-d tensor', 0) end
   local rest = 1 -- not -1: an empty batch (N = 0) has nothing to infer it from
   for d = 2, x:dim() do rest = rest * x:size(d) end
   self.output = x:reshape(x:size(1), rest)
   return self.output
end

function Flatten:updateGradInput(x, gradOutput)
   tensor_input(x)
   if not T.is_tensor(gradOutput) or gradOutput:numel() ~= x:numel() then
      error('gradOutput does not match the flattened input ' .. x:describe(), 0)
   end
   self.gradInput = gradOutput:reshape(x:shape())
   return self.gradInput
end

function Flatten:outputShape(s)
   U.check_shape(s, 'Flatten:outputShape')
   local n = 1
   for i = 1, #s do n = n * s[i] end
   return {n}
end

return {Flatten = Flatten}

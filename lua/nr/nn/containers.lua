-- nr.nn containers: Sequential, Residual (main path + shortcut, added), Concat (channel
-- concatenation of branches fed the same input; DenseNet), Identity.
-- Invariant: every child knows its parent and key (_parent, _key) so errors and parameter names
-- carry the path in the model ("features.3").
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local check = require 'nr.check'

local M = {}

local function adopt(parent, modules)
   parent.modules = {}
   for i, m in ipairs(modules or {}) do
      check.arg(type(m) == 'table' and m.forward, parent.__typename, 'child %d is not a module', i)
      m._parent = parent
      m._key = i - 1
      parent.modules[i] = m
   end
end

local function params_of(self)
   local p, g = {}, {}
   for _, m in ipairs(self.modules) do
      local mp, mg = m:parameters()
      for i = 1, #mp do p[#p + 1] = mp[i]; g[#g + 1] = mg[i] end
   end
   return p, g
end

-- ---- Identity ------------------------------------------------------------------------------
local Identity = class('Identity', Module)
Identity.__tostring = Module.__tostring
function Identity:updateOutput(x) self.output = x; return x end
function Identity:updateGradInput(x, g) self.gradInput = g; return g end
M.Identity = Identity

-- ---- Sequential ----------------------------------------------------------------------------
local Sequential = class('Sequential', Module)
Sequential.__tostring = Module.__tostring
Sequential.__call = Module.__call

function Sequential:__init(modules)
   Module.__init(self)
   adopt(self, modules)
end

function Sequential:add(m)
   self.modules[#self.modules + 1] = m
   m._parent = self
   m._key = #self.modules - 1
   return self
end

function Sequential:get(i) return self.modules[i] end
function Sequential:size() return #self.modules end

function Sequential:updateOutput(x)
   local y = x
   for _, m in ipairs(self.modules) do y = m:forward(y) end
   self.output = y
   return y
end

function Sequential:updateGradInput(x, g)
   -- backward walks children in reverse, each child's input being the previous child's output
   local mods = self.modules
   for i = #mods, 1, -1 do
      local input = i > 1 and mods[i - 1].output or x
      g = mods[i]:backward(input, g)
   end
   self.gradInput = g
   return g
end

function Sequential:backward(x, g, scale)
   if rawget(self, '_parent') then return self:updateGradInput(x, g) end
   return Module.backward(self, x, g, scale)
end
function Sequential:accGradParameters() end
Sequential.parameters = params_of

function Sequential:outputShape(s)
   for _, m in ipairs(self.modules) do s = m:outputShape(s) end
   return s
end
M.Sequential = Sequential

-- ---- Residual: y = main(x) + shortcut(x); shortcut nil means identity ------------------------
local Residual = class('Residual', Module)
Residual.__tostring = Module.__tostring
Residual.__call = Module.__call

function Residual:__init(main, shortcut)
   Module.__init(self)
   adopt(self, {main, shortcut})
   self.modules[1]._key = 'main'
   if self.modules[2] then self.modules[2]._key = 'shortcut' end
end

function Residual:updateOutput(x)
   local a = self.modules[1]:forward(x)
   local b = self.modules[2] and self.modules[2]:forward(x) or x
   if not T.same_shape(a:shape(), b:shape()) then
      error(string.format('residual add: main path gives [%s] but shortcut gives [%s]',
         table.concat(a:shape(), ' x '), table.concat(b:shape(), ' x ')), 0)
   end
   if not self.output or not T.same_shape(self.output:shape(), a:shape()) or self.output:device() ~= a:device() then
      self.output = T.empty(a:shape(), {device = a:device()})
   end
   self.output:copy(a):add_(b)
   return self.output
end

function Residual:updateGradInput(x, g)
   local gm = self.modules[1]:backward(x, g)
   local gs = self.modules[2] and self.modules[2]:backward(x, g) or g
   if not self.gradInput or not T.same_shape(self.gradInput:shape(), gm:shape()) or self.gradInput:device() ~= gm:device() then
      self.gradInput = T.empty(gm:shape(), {device = gm:device()})
   end
   self.gradInput:copy(gm):add_(gs)
   return self.gradInput
end
function Residual:backward(x, g, scale)
   if rawget(self, '_parent') then return self:updateGradInput(x, g) end
   return Module.backward(self, x, g, scale)
end
function Residual:accGradParameters() end
Residual.parameters = params_of
function Residual:outputShape(s) return self.modules[1]:outputShape(s) end
function Residual:_treeChildren(walk, indent, shape)
   local out = walk(self.modules[1], indent, 'main', shape)
   if self.modules[2] then walk(self.modules[2], indent, 'shortcut', shape) end
   return out
end
M.Residual = Residual

-- ---- Concat: channel (dim 2) concatenation of branches fed the same input -------------------
local Concat = class('Concat', Module)
Concat.__tostring = Module.__tostring
Concat.__call = Module.__call

function Concat:__init(modules)
   Module.__init(self)
   adopt(self, modules)
end

function Concat:updateOutput(x)
   local outs, total = {}, 0
   for i, m in ipairs(self.modules) do
      outs[i] = m:forward(x)
      total = total + outs[i]:size(2)
   end
   local shape = outs[1]:shape()
   for i = 2, #outs do
      local s = outs[i]:shape()
      for d = 1, #shape do
         if d ~= 2 and s[d] ~= shape[d] then
            error(string.format('concat: branch 1 gives [%s] but branch %d gives [%s]',
               table.concat(shape, ' x '), i, table.concat(s, ' x ')), 0)
         end
      end
   end
   shape[2] = total
   if not self.output or not T.same_shape(self.output:shape(), shape) or self.output:device() ~= outs[1]:device() then
      self.output = T.empty(shape, {device = outs[1]:device()})
   end
   local at = 1
   for i = 1, #outs do
      local c = outs[i]:size(2)
      self.output:narrow(2, at, c):copy(outs[i])
      at = at + c
   end
   return self.output
end

function Concat:updateGradInput(x, g)
   local at = 1
   self._gparts = self._gparts or {}
   for i, m in ipairs(self.modules) do
      local c = m.output:size(2)
      local part = self._gparts[i]
      local view = g:narrow(2, at, c)
      if not part or not T.same_shape(part:shape(), view:shape()) or part:device() ~= g:device() then
         part = T.empty(view:shape(), {device = g:device()})
         self._gparts[i] = part
      end
      part:copy(view)
      local gi = m:backward(x, part)
      if i == 1 then
         if not self.gradInput or not T.same_shape(self.gradInput:shape(), gi:shape()) or self.gradInput:device() ~= gi:device() then
            self.gradInput = T.empty(gi:shape(), {device = gi:device()})
         end
         self.gradInput:copy(gi)
      else
         self.gradInput:add_(gi)
      end
      at = at + c
   end
   return self.gradInput
end
function Concat:backward(x, g, scale)
   if rawget(self, '_parent') then return self:updateGradInput(x, g) end
   return Module.backward(self, x, g, scale)
end
function Concat:accGradParameters() end
Concat.parameters = params_of
function Concat:outputShape(s)
   local out
   for _, m in ipairs(self.modules) do
      local o = m:outputShape(s)
      if not out then out = {unpack(o)} else out[1] = out[1] + o[1] end
   end
   return out
end
function Concat:_treeChildren(walk, indent, shape)
   local out
   for i, m in ipairs(self.modules) do
      local o = walk(m, indent, tostring(i - 1), shape)
      if o then
         if not out then out = {unpack(o)} else out[1] = out[1] + o[1] end
      end
   end
   return out
end
M.Concat = Concat

return M

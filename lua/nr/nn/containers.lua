-- nr.nn containers: Sequential, Residual (main path + shortcut, added), Concat (channel
-- concatenation of branches fed the same input; DenseNet), Identity.
-- Invariant: every child knows its parent and key (_parent, _key) so errors and parameter names
-- carry the path in the model ("features.3").
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local GP = require 'nr.nn.gradpool'
local U = require 'nr.nn.layer_util'

local M = {}

-- Raises "Type: ..." at the user's call of the constructor (adopt <- __init <- class call <- user).
local function need(cond, parent, fmt, ...)
   if not cond then error(parent.__typename .. ': ' .. string.format(fmt, ...), 5) end
end

-- A class (nr.nn.ReLU) given where an instance (nr.nn.ReLU()) belongs: it ran, keeping its
-- state on the class, which every instance then read through __index.
local function is_class(m) return rawget(m, '__index') == m end

-- A module already placed (here or in another container) goes in as its twin (Module:twin:
-- the same parameters, its own forward state); parameter names keep its first place, as PyTorch.
local function placed(m)
   if rawget(m, '_parent') then return m:twin() end
   return m
end

-- modules: a list of modules, or nil; a module given where the list belongs is an error (a
-- silently empty container would compute the identity). nonempty: at least one child is required.
local function adopt(parent, modules, nonempty)
   parent.modules = {}
   need(modules == nil or type(modules) == 'table' and not modules.forward, parent,
      'expects a list of modules, e.g. %s{a, b, c}; got %s', parent.__typename,
      type(modules) == 'table' and 'a module (wrap the modules in { })' or type(modules))
   -- a nil in the list (an unassigned variable) would end ipairs early and drop what follows
   local n = modules and (modules.n or 0) or 0
   for k in pairs(modules or {}) do if type(k) == 'number' and k > n then n = k end end
   need(n > 0 or not nonempty, parent, 'expects at least one module, e.g. %s{a, b}; got none', parent.__typename)
   for i = 1, n do
      local m = modules[i]
      need(m ~= nil, parent, 'child %d is nil (an unassigned variable?); %d children were given', i, n)
      need(type(m) == 'table' and m.forward, parent, 'child %d is not a module', i)
      need(not is_class(m), parent, 'child %d is the class %s, not a module: call it (%s())', i, m.__typename,
         m.__typename)
      m = placed(m)
      m._parent, m._key = parent, i - 1
      parent.modules[i] = m
   end
end

-- Each parameter once, also when a module sits at two places (weight tying, as PyTorch).
local function params_of(self)
   local p, g, seen = {}, {}, {}
   for _, m in ipairs(self.modules) do
      local mp, mg = m:parameters()
      for i = 1, #mp do
         if not seen[mp[i]] then seen[mp[i]] = true; p[#p + 1] = mp[i]; g[#g + 1] = mg[i] end
      end
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

-- nn.Sequential{a, b, c}, or nn.Sequential(a, b, c) as in PyTorch.
function Sequential:__init(modules, ...)
   Module.__init(self)
   if type(modules) == 'table' and modules.forward then modules = {n = select('#', ...) + 1, modules, ...} end
   adopt(self, modules)
end

function Sequential:add(m)
   -- as the constructor: a non-module failed later as "attempt to call method 'forward'"
   if not (type(m) == 'table' and m.forward) then error('Sequential:add: expected a module, got ' .. type(m), 2) end
   if is_class(m) then error(string.format('Sequential:add: got the class %s, not a module: call it (%s())', m.__typename,
      m.__typename), 2) end
   m = placed(m)
   self.modules[#self.modules + 1] = m
   m._parent, m._key = self, #self.modules - 1
   return self
end

-- The i-th module, 1-based as Torch7's (printed paths are 0-based, as PyTorch's); an index outside
-- 1..size is an error (seq:get(0) from a PyTorch habit returned nil, to fail somewhere later).
function Sequential:get(i)
   local n = #self.modules
   if type(i) ~= 'number' or i ~= math.floor(i) or i < 1 or i > n then
      error(string.format('Sequential:get: index %s is outside 1..%d (modules are numbered from 1 here; the printed '
         .. 'paths count from 0, as PyTorch\'s)', type(i) == 'number' and tostring(i) or type(i), n), 2)
   end
   return self.modules[i]
end
function Sequential:size() return #self.modules end

-- Fusion (off with seq.noFusion = true):
--  * a BatchNorm2d followed by an in-place ReLU runs as one pass (BatchNorm2d.canFuseReLU; the
--    in-place ReLU overwrites the BN output anyway, so nothing else can observe the difference);
--  * with gradients off (nr.no_grad), a Conv2d followed by a BatchNorm2d in evaluation mode (and
--    an in-place ReLU) runs as one conv with the BN and ReLU applied per output plane
--    (Conv2d.canFoldBN, BatchNorm2d.canFoldIntoConv): the conv output is not kept, which only a
--    backward would need.
local function is_inplace_relu(m) return m ~= nil and m.fusedForward ~= nil and m.inplace == true end

function Sequential:updateOutput(x)
   local y, mods, i, fuse = x, self.modules, 1, not self.noFusion
   local nograd = not Module.is_grad_enabled()
   while i <= #mods do
      local m, nxt = mods[i], mods[i + 1]
      if fuse and nograd and m.canFoldBN and nxt ~= nil and nxt.canFoldIntoConv and not nxt.train then
         local relu = is_inplace_relu(mods[i + 2]) and mods[i + 2] or nil
         m._fold_bn, m._fold_relu = nxt, relu ~= nil
         y = m:forward(y)
         if rawget(m, '_fold_done') then   -- the conv applied them (a subclass may not)
            m._fold_done = nil
            nxt:foldedForward(y, relu ~= nil)
            if relu then relu:fusedForward(y) end
            i = i + (relu and 3 or 2)
         else
            m._fold_bn, m._fold_relu = nil, nil
            i = i + 1
         end
      else
         if m.canFuseReLU then
            m._fuse_relu = fuse and is_inplace_relu(nxt)
         end
         y = m:forward(y)
         if m._relu_fused and m.canFuseReLU then
            y = nxt:fusedForward(y)
            i = i + 1
         end
         i = i + 1
      end
   end
   self.output = y
   return y
end

function Sequential:updateGradInput(x, g)
   -- backward walks children in reverse, each child's input being the previous child's output;
   -- a child's gradient goes back to the pool once the child before it has consumed it
   local mods, outer = self.modules, g
   local no_input = rawget(self, '_noInputGrad')
   for i = #mods, 1, -1 do
      local input = i > 1 and mods[i - 1].output or x
      local m = mods[i]
      if i == 1 and no_input and m.paramsOnlyBackward then m._skipInputGrad = true end
      local gi = m:backward(input, g, rawget(self, '_gscale'))
      if g ~= outer then GP.release(g, gi, outer) end
      g = gi
   end
   self.gradInput = g
   return g
end

-- Whether backward computes the gradient with respect to this Sequential's input (default on).
-- Off, as for a PyTorch input that does not require grad: the first layer computes only its
-- parameter gradients (a Conv2d or Linear; any other first layer still computes everything) and
-- backward returns nil; nested Sequentials in first position follow. nr.train turns it off:
-- nothing in a training loop reads the input gradient (MobileNet-0.25's stem spent ~4% of a step
-- on it).
function Sequential:setInputGrad(on)
   self._noInputGrad = not on or nil
   local first = self.modules[1]
   if first and first.setInputGrad then first:setInputGrad(on) end
   return self
end

Sequential.backward = Module.composite_backward
Sequential.gradients = Module.composite_gradients
function Sequential:accGradParameters() end
Sequential.parameters = params_of

function Sequential:outputShape(s)
   U.check_shape(s, 'Sequential:outputShape')
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
   if type(main) ~= 'table' or not main.forward then
      error('Residual: main must be a module, got ' .. type(main), 3)
   end
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
   -- without gradients nothing reads the main path's output again: sum into it (one pass, no
   -- buffer); with gradients the main path's modules may still need theirs, so sum into our own
   if not Module.is_grad_enabled() and not a:same_storage(x) and not a:same_storage(b) then
      self.output = a:add_(b)
      return self.output
   end
   self.output = a:add(b, U.act_buffer(self, '_sum', a:shape(), a)) -- one pass
   return self.output
end

-- The sum lands in place in a branch's pooled gradient when one is free to overwrite (not g,
-- which the caller owns); the other branch's block goes back to the pool.
function Residual:updateGradInput(x, g)
   local scale = rawget(self, '_gscale')
   local gm = self.modules[1]:backward(x, g, scale)
   local gs = self.modules[2] and self.modules[2]:backward(x, g, scale) or g
   local function writable(t) return not t:same_storage(g) and GP.owned(t) end
   local out
   if writable(gm) then
      out = gm:add_(gs)
   elseif writable(gs) then
      out = gs:add_(gm)
   else
      out = gm:add(gs, GP.buffer(self, gm:shape(), gm))
   end
   GP.release(gm, out, g)
   GP.release(gs, out, g)
   self.gradInput = out
   return out
end
Residual.backward = Module.composite_backward
Residual.gradients = Module.composite_gradients
function Residual:accGradParameters() end
Residual.parameters = params_of
function Residual:outputShape(s)
   U.check_shape(s, 'Residual:outputShape')
   return self.modules[1]:outputShape(s)
end
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

-- nn.Concat{a, b}, or nn.Concat(a, b); at least one branch (the output is their concatenation).
function Concat:__init(modules, ...)
   Module.__init(self)
   if type(modules) == 'table' and modules.forward then modules = {n = select('#', ...) + 1, modules, ...} end
   adopt(self, modules, true)
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
   if not self.output or not T.same_shape(self.output:shape(), shape) or self.output:device() ~= outs[1]:device()
      or self.output:dtype() ~= outs[1]:dtype() or not U.has_format(self.output, U.format_for(shape, outs[1])) then
      self.output = T.empty(shape, {device = outs[1]:device(), dtype = outs[1]:dtype(),
                                    memory_format = U.format_for(shape, outs[1])})
   end
   local at = 1
   for i = 1, #outs do
      local c = outs[i]:size(2)
      self.output:narrow(2, at, c):copy(outs[i])
      at = at + c
   end
   return self.output
end

-- Each branch gets a contiguous copy of its slice of g (a pooled block of the branch's own, so
-- the blocks differ per branch); the branch gradients are summed into one pooled block.
function Concat:updateGradInput(x, g_in)
   -- the slices below assume g has the output's shape; g_in (the caller's) stays the release guard
   local g = U.grad(g_in, self.output)
   local at = 1
   local holders = self:transient()
   local sum
   for i, m in ipairs(self.modules) do
      local c = m.output:size(2)
      local view = g:narrow(2, at, c)
      local holder = holders[i]
      if not holder then
         holder = Module()   -- owns the pool's memory of which block branch i's slice used
         holders[i] = holder
      end
      local part = GP.buffer(holder, view:shape(), g)
      part:copy(view)
      local gi = m:backward(x, part, rawget(self, '_gscale'))
      if i == 1 then
         sum = GP.buffer(self, gi:shape(), gi)
         sum:copy(gi)
      else
         sum:add_(gi)
      end
      GP.release(gi, sum, g_in)
      GP.release(part, sum, g_in)
      at = at + c
   end
   self.gradInput = sum
   return sum
end
Concat.backward = Module.composite_backward
Concat.gradients = Module.composite_gradients
function Concat:accGradParameters() end
Concat.parameters = params_of
function Concat:outputShape(s)
   U.check_shape(s, 'Concat:outputShape')
   local out
   for i, m in ipairs(self.modules) do
      local o = m:outputShape(s)
      if not out then
         out = {unpack(o)}
      else
         if not U.concatenable(out, o) then -- as forward checks
            error(string.format('branch 1 gives %s but branch %d gives %s', U.shape_str(out), i, U.shape_str(o)), 0)
         end
         out[1] = out[1] + o[1]
      end
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

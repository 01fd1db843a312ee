-- nr.nn.Module — the base class of every layer and container (Torch7 nn style).
--
-- Contract for subclasses (see docs/ARCHITECTURE.md):
--   :updateOutput(x)              -> self.output (a buffer the module owns and reuses)
--   :updateGradInput(x, gradOut)  -> self.gradInput
--   :accGradParameters(x, gradOut)   accumulates into self.gradWeight / self.gradBias
--   :parameters()                 -> {params}, {grads}   (leaf modules list their own)
--   :outputShape(in_shape)        -> per-sample output shape (no batch dim), used by nr.count
--   :cost(in_shape)               -> params, macs for this leaf (multiply-adds, per sample)
--   :extra()                      -> short description for printing ("64->128 3x3")
--   :_apply(fn)                   -> applies fn(tensor) -> tensor to every owned tensor (to(device))
-- forward/backward wrap these and prefix errors with the module's path in the model
-- ("features.3 (Conv2d 64->128 3x3): ...").
-- Invariants: forward may return a buffer owned by the module (valid until the next forward);
-- buffers are reallocated only when the input shape changes (no allocation per step).
local class = require 'nr.class'
local GP = require 'nr.nn.gradpool'

local Module = class('Module')

function Module:__init()
   self.output = nil
   self.gradInput = nil
   self.train = true
end

-- ---- naming and paths -------------------------------------------------------------------

function Module:typename() return self.__typename or 'Module' end
function Module:extra() return '' end

-- Path from the root, e.g. "features.3"; the root's path is its name or the type name. With
-- below (an ancestor), the path from there ("3.main.0" below a submodule).
function Module:path(below)
   local parts, m = {}, self
   while m ~= below and rawget(m, '_parent') do
      table.insert(parts, 1, tostring(m._key))
      m = m._parent
   end
   return #parts > 0 and table.concat(parts, '.') or (rawget(m, 'name') or m:typename())
end

-- The top of the tree this module belongs to (itself when it has no parent).
function Module:root()
   local m = self
   while rawget(m, '_parent') do m = m._parent end
   return m
end

function Module:where()
   local e = self:extra()
   return string.format('%s (%s%s)', self:path(), self:typename(), e ~= '' and (' ' .. e) or '')
end

-- Calls fn(...) and re-raises any error prefixed with this module's location, once.
local function located(self, fn, ...)
   local ok, a = pcall(fn, ...)
   if ok then return a end
   local msg = tostring(a)
   if type(a) == 'string' and not msg:find('\0loc', 1, true) then
      -- strip "file:line: " from Lua-raised messages of our own code; keep C messages intact
      msg = msg:gsub('^[^:\n]*%.lua:%d+: ', '')
      error(self:where() .. ': ' .. msg .. '\0loc', 0)
   end
   error(a, 0)
end

local function clean(msg) return (tostring(msg):gsub('%zloc', '')) end

-- ---- forward / backward ------------------------------------------------------------------

-- Gradient mode (nr.no_grad / nr.set_grad_enabled): with gradients off, forwards may fold layers
-- for inference (Sequential: Conv2d + BatchNorm2d in evaluation mode + in-place ReLU in one pass)
-- and a backward of that forward is refused.
local grad_enabled = true
function Module.set_grad_enabled(on)
   local prev = grad_enabled
   grad_enabled = on and true or false
   return prev
end
function Module.is_grad_enabled() return grad_enabled end

function Module:forward(x)
   if rawget(self, '_parent') then return located(self, self.updateOutput, self, x) end
   self._nograd_forward = not grad_enabled
   local ok, y = pcall(located, self, self.updateOutput, self, x)
   if not ok then error(clean(y), 2) end
   return y
end

-- The root's backward runs the whole pass with the model's gradient pool (nr.nn.gradpool): the
-- gradInput it returns stays valid until its next backward.
function Module:backward(x, gradOutput, scale)
   local function run() return self:gradients(x, gradOutput, scale) end
   if rawget(self, '_parent') then return located(self, run) end
   if not grad_enabled then error(self:where() .. ': backward inside nr.no_grad (gradients are off)', 2) end
   if rawget(self, '_nograd_forward') then
      error(self:where() .. ': backward after a forward run inside nr.no_grad; run the forward again with gradients on', 2)
   end
   local tr = self:transient()
   tr.gradpool = tr.gradpool or GP.new()
   local ok, gi = pcall(GP.run, tr.gradpool, located, self, run)
   if not ok then error(clean(gi), 2) end
   return gi
end

function Module:__call(x) return self:forward(x) end

-- Composite modules (containers, NRConv2d) run backward on their children inside their own
-- updateGradInput; backward's scale (parameter gradients accumulate scale · ∂L/∂θ, as Torch7)
-- reaches the children through self._gscale while it runs. A composite sets
-- Type.gradients = Module.composite_gradients and backward(x, g, scale) = composite_backward.
function Module:composite_gradients(x, g, scale)
   self._gscale = scale
   local gi = self:updateGradInput(x, g)
   self._gscale = nil
   return gi
end
function Module:composite_backward(x, g, scale)
   if rawget(self, '_parent') then return self:composite_gradients(x, g, scale) end
   return Module.backward(self, x, g, scale)
end

-- gradInput and the parameter gradients of one backward; a leaf that computes both in one pass
-- over its data overrides this (BatchNorm2d).
-- _skipInputGrad (set by a Sequential whose input gradient is off, for this one call, on a first
-- layer with paramsOnlyBackward): parameter gradients only, and nil for the input's.
function Module:gradients(x, gradOutput, scale)
   if rawget(self, '_skipInputGrad') then
      self._skipInputGrad = nil
      self:accGradParameters(x, gradOutput, scale)
      return nil
   end
   local gi = self:updateGradInput(x, gradOutput)
   self:accGradParameters(x, gradOutput, scale)
   return gi
end

function Module:updateOutput(x) error(self:typename() .. ' does not implement updateOutput', 2) end
function Module:updateGradInput(x, g) error(self:typename() .. ' does not implement updateGradInput', 2) end
function Module:accGradParameters(x, g, scale) end

-- ---- parameters --------------------------------------------------------------------------

-- Leaf default: weight/bias with gradWeight/gradBias when present.
function Module:parameters()
   local p, g = {}, {}
   if self.weight then p[#p + 1] = self.weight; g[#g + 1] = self.gradWeight end
   if self.bias then p[#p + 1] = self.bias; g[#g + 1] = self.gradBias end
   return p, g
end

-- Named parameters: list of {name = 'features.0.weight', param = T, grad = T, module = m, field = 'weight'}.
-- A module used at two places (weight tying) is listed once, as PyTorch's named_parameters does.
-- Names are unique otherwise: two different tensors of one name would collapse into one in a
-- name -> tensor map (a checkpoint would keep one of them and say nothing), so that is an error.
local function unique_names(list, what, field)
   local by_name, seen, out = {}, {}, {}
   for _, e in ipairs(list) do
      local t = e[field]
      if not seen[t] then
         if by_name[e.name] then error(string.format('nr.nn: two %s are both named %q', what, e.name), 3) end
         seen[t], by_name[e.name] = true, true
         out[#out + 1] = e
      end
   end
   return out
end

function Module:namedParameters(prefix, out)
   local root = out == nil
   out = out or {}
   prefix = prefix or ''
   for _, field in ipairs({'weight', 'bias'}) do
      if self[field] then
         local gf = field == 'weight' and 'gradWeight' or 'gradBias'
         out[#out + 1] = {name = prefix .. field, param = self[field], grad = self[gf], module = self, field = field}
      end
   end
   if self.modules then
      for i, m in ipairs(self.modules) do m:namedParameters(prefix .. tostring(m._key or (i - 1)) .. '.', out) end
   end
   if root then return unique_names(out, 'parameters', 'param') end
   return out
end

-- Buffers saved with the weights (running statistics): list of {name, tensor, module, field}.
function Module:namedBuffers(prefix, out)
   local root = out == nil
   out = out or {}
   prefix = prefix or ''
   for _, field in ipairs(self._buffers or {}) do
      if self[field] then out[#out + 1] = {name = prefix .. field, tensor = self[field], module = self, field = field} end
   end
   if self.modules then
      for i, m in ipairs(self.modules) do m:namedBuffers(prefix .. tostring(m._key or (i - 1)) .. '.', out) end
   end
   if root then return unique_names(out, 'buffers', 'tensor') end
   return out
end

function Module:zeroGradParameters()
   local _, grads = self:parameters()
   for _, g in ipairs(grads) do g:zero() end
end

function Module:training()
   self.train = true
   if self.modules then for _, m in ipairs(self.modules) do m:training() end end
   return self
end

function Module:evaluate()
   self.train = false
   if self.modules then for _, m in ipairs(self.modules) do m:evaluate() end end
   return self
end
-- PyTorch's name (model.eval()); its model.train() has no twin here: `train` is the module's
-- flag (Torch7's), so training mode is m:training()
Module.eval = Module.evaluate

-- ---- devices and copies -------------------------------------------------------------------

-- Fields holding tensors owned by this module (parameters, grads, buffers). Scratch buffers
-- (output, gradInput, anything starting with '_') are dropped on device moves and clones.
-- A tensor shared by twins (Module:twin) is converted once and stays shared (memo: old -> new).
function Module:_apply(fn, memo)
   memo = memo or {}
   for k, v in pairs(self) do
      if type(v) == 'table' and getmetatable(v) and v.__typename == 'nr.Tensor' then
         if k == 'output' or k == 'gradInput' or (type(k) == 'string' and k:sub(1, 1) == '_') then
            self[k] = nil
         else
            local new = memo[v] or fn(v)
            memo[v] = new
            self[k] = new
         end
      end
   end
   if self.modules then for _, m in ipairs(self.modules) do m:_apply(fn, memo) end end
   return self
end

function Module:to(device)
   self.device = device
   return self:_apply(function(t) return t:to(device) end)
end
function Module:cuda() return self:to('cuda') end
function Module:cpu() return self:to('cpu') end

-- Deep copy: tensors cloned, scratch buffers dropped, parent links rebuilt. share: tensors the
-- copy keeps as they are (the same objects), e.g. for a twin.
function Module:clone(share)
   local seen = {}
   for _, t in ipairs(share or {}) do seen[t] = t end
   local function copy(v, parent_is_module)
      if type(v) ~= 'table' then return v end
      if seen[v] then return seen[v] end
      local mt = getmetatable(v)
      if mt and v.__typename == 'nr.Tensor' then
         local c = v:clone()
         seen[v] = c
         return c
      end
      local out = {}
      seen[v] = out
      for k, x in pairs(v) do
         if k == '_parent' or k == '_transient' then
            out[k] = nil
         elseif k == 'output' or k == 'gradInput' or (type(k) == 'string' and k:sub(1, 1) == '_' and k ~= '_key' and k ~= '_buffers'
                  and type(x) == 'table' and getmetatable(x) and x.__typename == 'nr.Tensor') then
            out[k] = nil
         else
            out[k] = copy(x)
         end
      end
      return setmetatable(out, mt)
   end
   local c = copy(self)
   c:_relink()
   return c
end

-- The module a container places where this one already sits (weight tying, or one ReLU used
-- twice as PyTorch's self.relu): a copy sharing its parameters, their gradients and its buffers
-- (the same tensors: one set, summed gradients, stepped once), with forward state of its own.
-- One object at two places would not work: a module keeps what its backward reads (its output,
-- pooling indices, batch statistics), and its second forward would overwrite the first one's.
function Module:twin()
   local share = {}
   local params, grads = self:parameters()
   for _, t in ipairs(params) do share[#share + 1] = t end
   for _, t in ipairs(grads) do share[#share + 1] = t end
   for _, b in ipairs(self:namedBuffers()) do share[#share + 1] = b.tensor end
   local t = self:clone(share)
   rawset(t, '_twin_of', rawget(self, '_twin_of') or self)
   return t
end

-- Re-establishes _parent/_key on children (after clones and structural edits).
function Module:_relink()
   if self.modules then
      for i, m in ipairs(self.modules) do
         m._parent = self
         if m._key == nil then m._key = i - 1 end
         m:_relink()
      end
   end
end

-- Per-module scratch that is never cloned or checkpointed (e.g. NR's graph cache). Kept on the
-- module rather than in a weak-keyed table outside it: LuaJIT has no ephemerons, so a weak-keyed
-- entry whose value refers back to its key would never be collected.
function Module:transient()
   local t = rawget(self, '_transient')
   if not t then
      t = {}
      rawset(self, '_transient', t)
   end
   return t
end

-- ---- walking -------------------------------------------------------------------------------

function Module:listModules(out)
   out = out or {}
   out[#out + 1] = self
   if self.modules then for _, m in ipairs(self.modules) do m:listModules(out) end end
   return out
end

function Module:findModules(typename)
   local found = {}
   for _, m in ipairs(self:listModules()) do
      if m:typename() == typename then found[#found + 1] = m end
   end
   return found
end

-- ---- shapes and counting -------------------------------------------------------------------

function Module:outputShape(s) return s end
function Module:cost(s) return 0, 0 end

-- Number of parameters (elements).
function Module:nParameters()
   local n = 0
   for _, p in ipairs((self:parameters())) do n = n + p:numel() end
   return n
end

-- ---- printing ------------------------------------------------------------------------------

-- Tree with output shapes (when in_shape is given) and parameter counts.
function Module:tree(in_shape)
   if in_shape ~= nil then require('nr.nn.layer_util').check_shape(in_shape, 'Module:tree') end
   local lines = {}
   local function walk(m, indent, key, shape)
      local out_shape
      if shape then
         local ok, s = pcall(m.outputShape, m, shape)
         out_shape = ok and s or nil
      end
      local e = m:extra()
      local np = 0
      if not m.modules then np = m:nParameters() end
      local line = string.format('%s%s%s%s%s%s', indent, key and (key .. ': ') or '', m:typename(),
         e ~= '' and (' ' .. e) or '',
         out_shape and (' -> [' .. table.concat(out_shape, ' x ') .. ']') or '',
         np > 0 and string.format('  (%d params)', np) or '')
      lines[#lines + 1] = line
      if m.modules then m:_treeChildren(walk, indent .. '  ', shape) end
      return out_shape
   end
   walk(self, '', nil, in_shape)
   local total = self:nParameters()
   lines[#lines + 1] = string.format('total parameters: %d', total)
   return table.concat(lines, '\n')
end

-- Default: children in sequence, each fed the previous output shape.
function Module:_treeChildren(walk, indent, shape)
   for i, m in ipairs(self.modules) do shape = walk(m, indent, tostring(m._key or (i - 1)), shape) end
end

function Module:__tostring()
   if self.modules then return self:tree() end
   local e = self:extra()
   return 'nr.nn.' .. self:typename() .. (e ~= '' and (' ' .. e) or '')
end

return Module

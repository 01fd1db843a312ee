-- nr.nn.gradpool — gradient buffers shared across one backward pass of a model.
--
-- Why: a gradInput is needed only until the module before it has consumed it, yet a buffer per
-- module keeps every layer's gradient alive at once (as much memory again as the activations:
-- VGG-19-CIFAR at batch 64 held 830 MiB of gradInputs). With the pool, leaves draw their
-- gradInput from blocks shared by the whole model and containers hand a block back as soon as
-- the gradient in it has been consumed, so only a few activation-sized blocks exist at a time.
--
-- How: the root module's backward makes its pool current (GP.current) and starts a pass;
-- leaves call GP.buffer(module, shape, like) for their gradInput; containers call
-- GP.release(g, keep...) once g is consumed. A block is found by the data pointer of the tensor
-- handed out (views at offset 0 share it, e.g. Flatten's reshape), so releasing a tensor the
-- pool does not own is a no-op. Each module prefers the block it had in the previous pass, so a
-- steady-state pass repeats the same choices and allocates nothing; blocks unused for a whole
-- pass are dropped at the next (after a shape change, e.g. NR surgery).
-- Invariants: a gradInput returned by a root's backward stays valid until that root's next
-- backward; outside a root backward (no current pool) GP.buffer falls back to a per-module buffer.
local ffi = require 'ffi'
local T = require 'nr.tensor'

local GP = {current = nil}

local Pool = {}
Pool.__index = Pool

function GP.new() return setmetatable({blocks = {}, by_ptr = {}}, Pool) end

-- The address of t's first element; 0 for a freed tensor (no block starts there).
local function ptr(t)
   local c = rawget(t, 'c')
   return c and tonumber(ffi.cast('uintptr_t', c.data)) or 0
end

-- Starts a pass: every block free; blocks nobody used in the previous pass are dropped.
function Pool:begin()
   local keep = {}
   for _, b in ipairs(self.blocks) do
      if b.used then
         b.busy, b.used = false, false
         keep[#keep + 1] = b
      else
         self.by_ptr[b.ptr] = nil
      end
   end
   self.blocks = keep
end

function Pool:bytes()
   local n = 0
   for _, b in ipairs(self.blocks) do n = n + b.cap * b.esize end
   return n
end

local function numel_of(shape)
   local n = 1
   for i = 1, #shape do n = n * shape[i] end
   return n
end

-- Runs fn(...) with pool current (the root module's backward); restores the previous one.
function GP.run(pool, fn, ...)
   local prev = GP.current
   GP.current = pool
   pool:begin()
   local ok, r = pcall(fn, ...)
   GP.current = prev
   if not ok then error(r, 0) end
   return r
end

-- A tensor of `shape` with like's dtype (float32, or bfloat16 under mixed precision), device and
-- (for 4-d shapes) memory format (layer_util.format_for) for owner's gradInput: from the current pool
-- (the owner's previous block when free and large enough, else the smallest free block that
-- fits, else a new block), or owner's own buffer outside a root backward.
function GP.buffer(owner, shape, like)
   local pool = GP.current
   if not pool then return require('nr.nn.layer_util').act_buffer(owner, 'gradInput', shape, like) end
   local n, dev, dt = numel_of(shape), like:device(), like:dtype()
   local tr = owner:transient()
   local last = tr.gp_block
   local b
   if last and pool.by_ptr[last.ptr] == last and not last.busy and last.cap >= n and last.dev == dev and last.dt == dt then
      b = last
   else
      for _, c in ipairs(pool.blocks) do
         if not c.busy and c.cap >= n and c.dev == dev and c.dt == dt and (not b or c.cap < b.cap) then b = c end
      end
      if not b then
         local t = T.empty({n}, {device = dev, dtype = dt})
         b = {t = t, cap = n, dev = dev, dt = dt, esize = dt == 'bfloat16' and 2 or 4, ptr = ptr(t)}
         pool.blocks[#pool.blocks + 1] = b
         pool.by_ptr[b.ptr] = b
      end
   end
   b.busy, b.used = true, true
   local v = tr.gp_view
   local fmt = require('nr.nn.layer_util').format_for(shape, like)
   -- (the view handed out last time may have been freed by its user: made again)
   if last ~= b or not (v and rawget(v, 'c')) or not T.same_shape(v:shape(), shape) or tr.gp_fmt ~= fmt then
      if fmt == 'channels_last' then v = b.t:as_strided(shape, T.channels_last_stride(shape))
      else v = b.t:narrow(1, 1, n):reshape(shape) end
      tr.gp_view, tr.gp_fmt = v, fmt
   end
   tr.gp_block = b
   owner.gradInput = v
   return v
end

-- Whether t is (the start of) a block of the current pool that is handed out.
function GP.owned(t)
   local pool = GP.current
   local b = pool and t and pool.by_ptr[ptr(t)]
   return b ~= nil and b.busy
end

-- Hands t's block back unless t shares its storage start with one of keep... (gradients the
-- caller still needs, or the tensor that now carries the same block onward).
function GP.release(t, ...)
   local pool = GP.current
   if not pool or not t then return end
   local p = ptr(t)
   local b = pool.by_ptr[p]
   if not b then return end
   for i = 1, select('#', ...) do
      local k = select(i, ...)
      if k and ptr(k) == p then return end
   end
   b.busy = false
end

return GP

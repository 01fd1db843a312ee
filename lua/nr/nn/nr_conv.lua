-- nr.nn.NRConv2d — a convolution whose channels are split by rejuvenation generation, for the
-- Neural Rejuvenation training schemes NR-CR and NR-CA (paper 3.3).
--
-- What it is: a conv with in/out channels partitioned into generation groups (gen 0 = the
-- original survivors, gen k = the channels added by the k-th rejuvenation). Built from ordinary
-- Conv2d blocks, one per (output group, input group) pair that is actually computed, plus the
-- fused cross-attention kernels (nr_cross_attention_*) — no zero blocks are stored or computed:
--   CR (cross connections removed): O_j = W_jj * I_j                      (one block per group)
--   CA (cross attention):           O_j = A_j + 2·σ(A_j) ⊙ B_j,  A_j = W_jj * I_j,
--                                   B_j = Σ_{i≠j} W_ji * I_i            (k² blocks)
-- σ is applied to the receiving group's own pre-BN response A_j and is not detached: gradients
-- flow into W_jj through the gate. An output group whose generation has no input channels (an
-- "orphan", e.g. after the input's group died out) reads the whole input with a plain block.
-- Under CR, an input group whose generation has no output group ("unread": the layer gained no
-- channels while its input did) is read by the oldest output group through a plain cross block
-- added to its output; without it those input channels would feed nothing and never learn. (The
-- oldest: later rejuvenations add newer groups, never older ones, so the block keeps its name and
-- its trained weights; read by the newest, a later group took the read over and dropped them.)
-- With two groups this is exactly the paper's S/R formulation.
-- What it is not: the policy of when to split (lua/nr/rejuvenate/surgery.lua does that).
-- Invariants: output groups are contiguous ranges in generation order; input groups are index
-- lists that together cover every input channel exactly once; spec is plain data (saved in
-- checkpoints as the architecture); child keys are stable ("o<gen>_i<gen>" / "o<gen>_all").
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local check = require 'nr.check'
local C = require('nr.ffi').C
local U = require 'nr.nn.layer_util'
local GP = require 'nr.nn.gradpool'

local M = {}

local FNAME = 'nr.nn.NRConv2d'

local function pair(v)
   if type(v) == 'table' then return {v[1], v[2] or v[1]} end
   return {v, v}
end

local NRConv2d = class('NRConv2d', Module)
NRConv2d.__tostring = Module.__tostring
NRConv2d.__call = Module.__call

-- The blocks a CR layer computes: out_gens = its output groups' generations in order; in_groups =
-- its input groups in order, {gen, n (channels)}. Returns a list of {out = j, inp = i (nil: the
-- whole input), unread = bool}: each output group reads its own generation's input (an orphan,
-- with none, reads it all), then the oldest output group, unless it is an orphan, reads every
-- non-empty input generation no output group has. NRConv2d builds these; the reallocation's cost
-- (nr.rejuvenate.monitor) prices them.
function M.cr_layout(out_gens, in_groups)
   local ingen, outgen, oldest, blocks = {}, {}, 1, {}
   for i, ig in ipairs(in_groups) do ingen[ig.gen] = i end
   for j, gen in ipairs(out_gens) do
      outgen[gen] = true
      if gen < out_gens[oldest] then oldest = j end
      blocks[j] = {out = j, inp = ingen[gen]}
   end
   if ingen[out_gens[oldest]] then
      for i, ig in ipairs(in_groups) do
         if not outgen[ig.gen] and ig.n > 0 then blocks[#blocks + 1] = {out = oldest, inp = i, unread = true} end
      end
   end
   return blocks
end

local function is_range(idx)
   for k = 2, #idx do if idx[k] ~= idx[1] + k - 1 then return false end end
   return true
end

-- NRConv2d(spec): spec = {in_channels, out_channels, kernel_size, stride, padding, dilation,
-- bias (bool), scheme ('CR' | 'CA'), out_groups = {{gen, first (0-based), n}, ...},
-- in_groups = {{gen, idx = {0-based positions}}, ...}}.
function NRConv2d:__init(spec)
   Module.__init(self)
   check.arg(type(spec) == 'table', FNAME, 'spec must be a table')
   check.arg(spec.scheme == 'CR' or spec.scheme == 'CA', FNAME, 'scheme must be "CR" or "CA", got %s', tostring(spec.scheme))
   self.spec = spec
   self.scheme = spec.scheme
   self.in_channels, self.out_channels = spec.in_channels, spec.out_channels
   self.kernel_size, self.stride = pair(spec.kernel_size), pair(spec.stride or 1)
   self.padding, self.dilation = pair(spec.padding or 0), pair(spec.dilation or 1)
   self.groups = 1
   -- validate the spec up front: it may be written by hand (or read from a checkpoint), and a
   -- bad one otherwise fails deep inside (ipairs on nil, compare number with string) or, worse,
   -- constructs a wrong layer (a fractional position skips a channel; two output groups of one
   -- generation give two blocks the same parameter name, and a checkpoint keeps only one).
   local function int(v, what, min, max) return check.int(v, FNAME, what, min, max, 2) end
   int(spec.in_channels, 'spec.in_channels', 1)
   int(spec.out_channels, 'spec.out_channels', 1)
   check.arg(type(spec.in_groups) == 'table', FNAME, 'spec.in_groups must be a table, got %s', check.show(spec.in_groups))
   check.arg(type(spec.out_groups) == 'table', FNAME, 'spec.out_groups must be a table, got %s', check.show(spec.out_groups))
   -- group i of list ('in_groups' / 'out_groups'): a table with a generation no earlier group has
   local function group(list, i, g, gens)
      local where = string.format('spec.%s[%d]', list, i)
      check.arg(type(g) == 'table', FNAME, '%s must be a table, got %s', where, check.show(g))
      int(g.gen, where .. '.gen', 0)
      check.arg(not gens[g.gen], FNAME, '%s.gen = %d repeats the generation of spec.%s[%d]', where, g.gen, list,
         gens[g.gen] or 0)
      gens[g.gen] = i
      return where
   end
   local seen, nin, gens = {}, 0, {}
   for gi, ig in ipairs(spec.in_groups) do
      local where = group('in_groups', gi, ig, gens)
      check.arg(type(ig.idx) == 'table', FNAME, '%s.idx must be a table, got %s', where, check.show(ig.idx))
      for k, p in ipairs(ig.idx) do
         int(p, string.format('%s.idx[%d]', where, k), 0, spec.in_channels - 1)
         check.arg(not seen[p], FNAME, 'input groups must partition 0..%d: position %d is in %s and %s',
            spec.in_channels - 1, p, seen[p] or '', where)
         seen[p] = where
         nin = nin + 1
      end
   end
   check.arg(nin == spec.in_channels, FNAME, 'input groups cover %d of %d channels', nin, spec.in_channels)
   local at = 0
   gens = {}
   for gj, og in ipairs(spec.out_groups) do
      local where = group('out_groups', gj, og, gens)
      int(og.first, where .. '.first', 0)
      int(og.n, where .. '.n', 1)
      check.arg(og.first == at, FNAME, 'output groups must be contiguous ranges in order: %s.first = %d, expected %d',
         where, og.first, at)
      at = at + og.n
   end
   check.arg(at == spec.out_channels, FNAME, 'output groups cover %d of %d channels', at, spec.out_channels)
   -- blocks
   local nn = require 'nr.nn'
   local ingen = {}
   for i, ig in ipairs(spec.in_groups) do ingen[ig.gen] = i end
   self.blocks, self.out_plan, self.modules = {}, {}, {}
   local function add_block(j, i, diag)
      local og = spec.out_groups[j]
      local idx = i and spec.in_groups[i].idx or nil
      local all = {}
      if not idx then for p = 0, spec.in_channels - 1 do all[#all + 1] = p end end
      local conv = nn.Conv2d(idx and #idx or spec.in_channels, og.n, self.kernel_size,
         {stride = self.stride, padding = self.padding, dilation = self.dilation, bias = (spec.bias and diag) or false})
      local key = string.format('o%d_%s', og.gen, i and ('i' .. spec.in_groups[i].gen) or 'all')
      conv._parent, conv._key = self, key
      self.modules[#self.modules + 1] = conv
      local b = {conv = conv, out = j, inp = i, diag = diag, in_idx = idx or all, out_first = og.first, out_n = og.n}
      self.blocks[#self.blocks + 1] = b
      return b
   end
   if self.scheme == 'CR' then
      local out_gens, in_sizes = {}, {}
      for j, og in ipairs(spec.out_groups) do out_gens[j] = og.gen end
      for i, ig in ipairs(spec.in_groups) do in_sizes[i] = {gen = ig.gen, n = #ig.idx} end
      for j = 1, #spec.out_groups do self.out_plan[j] = {j = j} end
      for _, l in ipairs(M.cr_layout(out_gens, in_sizes)) do
         local plan = self.out_plan[l.out]
         if l.unread then
            local b = add_block(l.out, l.inp, false)
            b.unread = true
            plan.unread = plan.unread or {}
            plan.unread[#plan.unread + 1] = b
         else
            plan.plain = add_block(l.out, l.inp, true)
         end
      end
   else -- CA: every output group reads its own generation (gated) and all others
      for j, og in ipairs(spec.out_groups) do
         local i = ingen[og.gen]
         local plan = {j = j}
         if not i then
            plan.plain = add_block(j, nil, true)
         else
            plan.diag = add_block(j, i, true)
            plan.cross = {}
            for i2 = 1, #spec.in_groups do
               if i2 ~= i then plan.cross[#plan.cross + 1] = add_block(j, i2, false) end
            end
            if #plan.cross == 0 then plan.plain, plan.diag, plan.cross = plan.diag, nil, nil end
         end
         self.out_plan[j] = plan
      end
   end
   self.in_range = {}
   for i, ig in ipairs(spec.in_groups) do self.in_range[i] = is_range(ig.idx) and #ig.idx > 0 end
end

function NRConv2d:extra()
   local gens = {}
   for _, og in ipairs(self.spec.out_groups) do gens[#gens + 1] = og.gen .. ':' .. og.n end
   return string.format('%s %d->%d %dx%d [%s]', self.scheme, self.in_channels, self.out_channels,
      self.kernel_size[1], self.kernel_size[2], table.concat(gens, '|'))
end

function NRConv2d:parameters()
   local p, g = {}, {}
   for _, m in ipairs(self.modules) do
      local mp, mg = m:parameters()
      for i = 1, #mp do p[#p + 1] = mp[i]; g[#g + 1] = mg[i] end
   end
   return p, g
end

NRConv2d.outputShape = U.conv_output_shape -- as Conv2d's: channels and size checked

-- params, multiply-adds (per sample) of the computed blocks only; the CA gate's elementwise
-- work is not a multiply-add of a weight and is not counted (as BN/ReLU are not).
function NRConv2d:cost(s)
   local o = self:outputShape(s)
   local params, macs = 0, 0
   for _, b in ipairs(self.blocks) do
      local n = b.conv.weight:numel()
      params = params + n + (b.conv.bias and b.conv.bias:numel() or 0)
      macs = macs + n * o[2] * o[3]
   end
   return params, macs
end

function NRConv2d:_treeChildren(walk, indent, shape)
   for _, m in ipairs(self.modules) do walk(m, indent, m._key, nil) end
   return shape and self:outputShape(shape)
end

-- ---- forward / backward -------------------------------------------------------------------------

local buf = U.act_buffer -- self[key]: x's dtype and device, reused while the shape stays

-- Positions of input group i (0-based) as a host int64 tensor, made once: the GPU gathers copy it
-- with the kernel's launch, which reads nothing back.
local function idx_tensor(self, i)
   local cache = rawget(self, '_idx_t')
   if not cache then
      cache = {}
      self._idx_t = cache
   end
   cache[i] = cache[i] or T.tensor(self.spec.in_groups[i].idx, {dtype = 'int64'})
   return cache[i]
end

-- Input of group i ((N, n_i, H, W) in the input's layout).
local function gather(self, x, i)
   local ig = self.spec.in_groups[i]
   local s = x:shape()
   s[2] = #ig.idx
   local b = buf(self, '_xin' .. i, s, x)
   if self.in_range[i] then
      b:copy(x:narrow(2, ig.idx[1] + 1, #ig.idx))
   else
      x:index_select(2, idx_tensor(self, i), b)
   end
   return b
end

function NRConv2d:updateOutput(x)
   check.arg(x:dim() == 4 and x:size(2) == self.in_channels, FNAME, 'expects (N, %d, H, W) input, got %s',
      self.in_channels, x:describe())
   -- computes in the layout the layers take (channels-last stays so on CUDA, where the gathers,
   -- blocks and cross attention all run in it); every buffer below follows self._x
   self._x = U.float_input(x)
   self._xin = {}
   for i = 1, #self.spec.in_groups do
      if #self.spec.in_groups[i].idx > 0 then self._xin[i] = gather(self, self._x, i) end
   end
   local function input_of(b) return b.inp and self._xin[b.inp] or self._x end
   local s = self:outputShape({x:size(2), x:size(3), x:size(4)})
   local out = buf(self, '_out', {x:size(1), s[1], s[2], s[3]}, self._x)
   for j, plan in ipairs(self.out_plan) do
      local og = self.spec.out_groups[j]
      local dst = out:narrow(2, og.first + 1, og.n)
      if plan.plain then
         dst:copy(plan.plain.conv:forward(input_of(plan.plain)))
         for _, b in ipairs(plan.unread or {}) do dst:add_(b.conv:forward(input_of(b))) end
      else
         local A = plan.diag.conv:forward(input_of(plan.diag))
         local sh = A:shape()
         local B = buf(self, '_B' .. j, sh, self._x)
         B:copy(plan.cross[1].conv:forward(input_of(plan.cross[1])))
         for c = 2, #plan.cross do B:add_(plan.cross[c].conv:forward(input_of(plan.cross[c]))) end
         local S = buf(self, '_S' .. j, sh, self._x)
         local O = buf(self, '_O' .. j, sh, self._x)
         check.status(C.nr_cross_attention_forward(A.c, B.c, O.c, S.c), FNAME, 0)  -- O = A + 2σ(A)⊙B
         dst:copy(O)
      end
   end
   self.output = out
   return out
end

function NRConv2d:updateGradInput(x, gradOutput)
   local gi = buf(self, '_gi', self._x:shape(), self._x)
   gi:zero()
   local gx = {}
   for i, xi in pairs(self._xin) do
      gx[i] = buf(self, '_gx' .. i, xi:shape(), self._x)
      gx[i]:zero()
   end
   local gall
   local function acc(b, g)
      local input = b.inp and self._xin[b.inp] or self._x
      local r = b.conv:backward(input, g, rawget(self, '_gscale'))
      if b.inp then
         gx[b.inp]:add_(r)
      else
         if not gall then gall = buf(self, '_gall', self._x:shape(), self._x); gall:zero() end
         gall:add_(r)
      end
      GP.release(r) -- a block of the model's gradient pool (during a root backward): consumed
   end
   for j, plan in ipairs(self.out_plan) do
      local og = self.spec.out_groups[j]
      local G = buf(self, '_G' .. j, {x:size(1), og.n, gradOutput:size(3), gradOutput:size(4)}, self._x)
      G:copy(gradOutput:narrow(2, og.first + 1, og.n))
      if plan.plain then
         acc(plan.plain, G)
         for _, b in ipairs(plan.unread or {}) do acc(b, G) end
      else
         local S, B = rawget(self, '_S' .. j), rawget(self, '_B' .. j)
         local sh = S:shape()
         -- dA = G ⊙ (1 + 2·σ(A)(1 − σ(A)) ⊙ B),  dB = 2·σ(A) ⊙ G
         local dA = buf(self, '_dA' .. j, sh, self._x)
         local dB = buf(self, '_dB' .. j, sh, self._x)
         check.status(C.nr_cross_attention_backward(S.c, B.c, G.c, dA.c, dB.c), FNAME, 0)
         acc(plan.diag, dA)
         for _, c in ipairs(plan.cross) do acc(c, dB) end
      end
   end
   for i, g in pairs(gx) do
      local ig = self.spec.in_groups[i]
      if self.in_range[i] then
         gi:narrow(2, ig.idx[1] + 1, #ig.idx):copy(g)
      else
         gi:index_copy(2, idx_tensor(self, i), g)
      end
   end
   if gall then gi:add_(gall) end
   self.gradInput = gi
   return gi
end

function NRConv2d:accGradParameters() end  -- done by the blocks' backward in updateGradInput

NRConv2d.backward = Module.composite_backward
NRConv2d.gradients = Module.composite_gradients

-- ---- dense view (surgery, tests) ------------------------------------------------------------------

-- Dense (cout, cin, kh, kw) tensor from per-block tensors get(block) (nil = zeros); blocks that
-- are not computed are zero. get defaults to the block weights.
function NRConv2d:dense(get)
   get = get or function(b) return b.conv.weight end
   local k = self.kernel_size
   local dev = self.blocks[1].conv.weight:device()
   local W = T.zeros({self.out_channels, self.in_channels, k[1], k[2]}, {device = dev})
   for _, b in ipairs(self.blocks) do
      local t = get(b)
      if t then
         local rows = W:narrow(1, b.out_first + 1, b.out_n)
         if is_range(b.in_idx) then
            rows:narrow(2, b.in_idx[1] + 1, #b.in_idx):copy(t)
         else
            local tmp = rows:contiguous()
            tmp:index_copy(2, b.in_idx, t)
            rows:copy(tmp)
         end
      end
   end
   return W
end

-- Calls set(block, slice) with each block's slice of a dense (cout, cin, kh, kw) tensor.
function NRConv2d:scatter(W, set)
   for _, b in ipairs(self.blocks) do
      local rows = W:narrow(1, b.out_first + 1, b.out_n)
      local slice
      if is_range(b.in_idx) then
         slice = rows:narrow(2, b.in_idx[1] + 1, #b.in_idx):contiguous()
      else
         slice = rows:contiguous():index_select(2, b.in_idx)
      end
      set(b, slice:clone())
   end
end

-- Bias of the whole output (cout) or nil.
function NRConv2d:dense_bias(get)
   if not self.spec.bias then return nil end
   get = get or function(b) return b.conv.bias end
   local dev = self.blocks[1].conv.weight:device()
   local out = T.zeros({self.out_channels}, {device = dev})
   for _, b in ipairs(self.blocks) do
      local t = b.diag and get(b)
      if t then out:narrow(1, b.out_first + 1, b.out_n):copy(t) end
   end
   return out
end

M.NRConv2d = NRConv2d
return M

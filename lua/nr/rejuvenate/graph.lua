-- nr.rejuvenate.graph — the channel graph of a model, derived from its module tree.
--
-- What it is: one walk over the tree (Sequential, Residual, Concat, Identity, Conv2d,
-- BatchNorm2d, BatchNorm1d, NRConv2d, pass-throughs, Flatten/Linear, Softmax) that records
--   * units: every conv (Conv2d or NRConv2d) with the BatchNorm2d that directly follows it (the
--     source of liveliness, paper 3.1.1), its kernel and output size, and its input descriptor;
--   * channel sets (CS): groups of channel positions that must keep the same width and layout.
--     A conv's output is one CS. A residual add unions the CSs of its two sides (union-find);
--     a depthwise conv (groups == in == out) does not create a CS: its output IS its input's
--     CS(s), and it joins them as an AND member (a channel lives only if the producer's channel
--     and the depthwise channel both live). The AND is "hard" only when every reader of the set
--     (a conv, a Linear, a residual add, the model's output) reads it through that depthwise
--     conv; otherwise ("soft") its dead channel removes nothing, since another reader still
--     sees the producer's channel. The image is the 'input' CS (never resized); a Linear's
--     output is a 'terminal' CS.
--   * descriptors: the channels of a tensor as an ordered list of segments {cs = CS, src = unit,
--     src_off, via} (Concat concatenates segments); src is the unit whose BN last scaled those
--     channels (nil when a non positively-homogeneous op or an add came in between: no rescaling
--     then), src_off where they start among its output channels (a depthwise conv passes several
--     segments through, one unit), via the depthwise convs the channels passed through since
--     their set was written (the last one's AND member, linked to the earlier ones by prev; nil
--     for none; a member, not a unit: a depthwise conv may read one set at two offsets);
--   * reads: each reader's (cs, via) pairs, from which the AND members' hardness is derived;
--   * consumers: the Linear classifiers (with the flatten factor) and the standalone BatchNorms
--     (a BN not directly after a conv, e.g. pre-activation ResNet; a BatchNorm1d after a global
--     pool or a Linear), sliced at surgery; a BatchNorm1d over several channels' features (after
--     a Flatten) is listed with them as pinned: counted, never sliced;
--   * pinned sets (kept whole: every channel, their width): those read by such a BatchNorm1d, by
--     a Softmax across channels, by a grouped conv, and the ones reaching the model's output.
-- What it is not: masks, counts or surgery (monitor.lua, surgery.lua).
-- Invariants: segments always cover whole CSs (never part of one); cs:root() resolves unions.
-- Unknown module types are an error naming the path, unless registered with graph.register.
local M = {}

-- The public function a graph is built for (graph.build's fname), named in its errors.
local FNAME = 'nr.rejuvenate'

-- Pass-through leaves: channels and their meaning unchanged. homog = positively homogeneous
-- (f(s·x) = s·f(x) for s > 0), which neural rescaling needs between a BN and its consumers.
local PASS = {ReLU = true, MaxPool2d = true, AvgPool2d = true, AdaptiveMaxPool2d = true, AdaptiveAvgPool2d = true,
              Dropout = true, Identity = true, GlobalAvgPool2d = true, ReLU6 = false, Sigmoid = false,
              Tanh = false, LeakyReLU = true, ELU = false, SiLU = false, GELU = false, Hardswish = false,
              Hardsigmoid = false}
M.PASS = PASS
local CUSTOM = {}

-- graph.register(typename, fn(g, m, desc, shape) -> desc, shape) for model-specific modules.
function M.register(typename, fn) CUSTOM[typename] = fn end

local function pair(v)
   if type(v) == 'table' then return v[1], v[2] or v[1] end
   return v, v
end

local function fail(m, fmt, ...)
   local where = m and m.where and m:where() or '?'
   error(string.format('%s: %s: %s', FNAME, where, string.format(fmt, ...)), 0)
end

-- ---- channel sets ---------------------------------------------------------------------------

local CS = {}
CS.__index = CS
function CS:root()
   local r = self
   while r.parent do r = r.parent end
   if r ~= self then self.parent = r end
   return r
end

local function new_cs(g, width, kind)
   local cs = setmetatable({id = #g.sets + 1, width = width, kind = kind, or_members = {}, and_members = {},
                            fixed = kind ~= 'unit'}, CS)
   g.sets[#g.sets + 1] = cs
   return cs
end

local function union(g, a, b, m)
   a, b = a:root(), b:root()
   if a == b then return a end
   if a.width ~= b.width then fail(m, 'residual add of %d and %d channels', a.width, b.width) end
   b.parent = a
   for _, u in ipairs(b.or_members) do a.or_members[#a.or_members + 1] = u end
   for _, e in ipairs(b.and_members) do a.and_members[#a.and_members + 1] = e end
   if b.kind ~= 'unit' then a.kind = b.kind end
   a.fixed = a.fixed or b.fixed
   a.coupled = true
   return a
end

local function desc_width(desc)
   local n = 0
   for _, s in ipairs(desc.segs) do n = n + s.cs:root().width end
   return n
end
M.desc_width = desc_width

-- Offsets of each segment within a descriptor (by current root widths).
local function seg_offsets(desc)
   local offs, o = {}, 0
   for i, s in ipairs(desc.segs) do offs[i] = o; o = o + s.cs:root().width end
   return offs, o
end
M.seg_offsets = seg_offsets

-- ---- walking --------------------------------------------------------------------------------

local walk

local function conv_out(m, shape)
   local kh, kw = pair(m.kernel_size)
   local sh, sw = pair(m.stride or 1)
   local ph, pw = pair(m.padding or 0)
   local dh, dw = pair(m.dilation or 1)
   local oh = math.floor((shape[2] + 2 * ph - dh * (kh - 1) - 1) / sh) + 1
   local ow = math.floor((shape[3] + 2 * pw - dw * (kw - 1) - 1) / sw) + 1
   return kh, kw, oh, ow
end

local function mark_no_rescale(desc)
   for _, s in ipairs(desc.segs) do
      if s.src then s.src.rescalable = false end
   end
end

local function add_consumer(desc, consumer)
   local offs = seg_offsets(desc)
   for i, s in ipairs(desc.segs) do
      if s.src then
         local c = s.src.consumers
         c[#c + 1] = {module = consumer, offset = offs[i], sf = desc.sf or 1, src_off = s.src_off, width = s.cs.width}
      end
   end
end

-- A reader of desc's channels (a conv that is not depthwise, a Linear, an add, the output).
local function read_desc(g, desc)
   for _, s in ipairs(desc.segs) do g.reads[#g.reads + 1] = {cs = s.cs, via = s.via} end
end

local function passes_through(via, e)
   while via do
      if via == e then return true end
      via = via.prev
   end
   return false
end

-- An AND member is hard only when every read of its set goes through its depthwise conv.
local function mark_soft_and_members(g)
   local reads_of = {}
   for _, rd in ipairs(g.reads) do
      local r = rd.cs:root()
      reads_of[r] = reads_of[r] or {}
      table.insert(reads_of[r], rd)
   end
   for _, r in ipairs(g.roots) do
      for _, e in ipairs(r.and_members) do
         e.soft = false
         for _, rd in ipairs(reads_of[r] or {}) do
            if not passes_through(rd.via, e) then e.soft = true; break end
         end
      end
   end
end

local function conv_unit(g, m, desc, shape)
   if #shape ~= 3 then fail(m, 'expects a (C, H, W) input, got [%s]', table.concat(shape, ' x ')) end
   local cin = desc_width(desc)
   if cin ~= m.in_channels then fail(m, 'expects %d input channels but the graph carries %d', m.in_channels, cin) end
   if (desc.sf or 1) ~= 1 then fail(m, 'conv after Flatten is not supported') end
   local kh, kw, oh, ow = conv_out(m, shape)
   local groups = m.groups or 1
   local u = {id = #g.units + 1, conv = m, kh = kh, kw = kw, oh = oh, ow = ow, groups = groups,
              in_desc = {segs = {}}, consumers = {}, rescalable = true,
              fixed = m.nr_fixed == true, split = m:typename() == 'NRConv2d'}
   for i, s in ipairs(desc.segs) do u.in_desc.segs[i] = {cs = s.cs, src = s.src, src_off = s.src_off} end
   add_consumer(desc, u)
   g.units[#g.units + 1] = u
   g.by_module[m] = u
   local out
   -- (nr_depthwise: one the surgery shrank to a single channel, groups 1, is depthwise still)
   if (groups > 1 or rawget(m, 'nr_depthwise')) and groups == m.in_channels and groups == m.out_channels then
      u.kind = 'dw'
      -- the output shares the input's CSs; this conv joins each as an AND member (hard or soft:
      -- mark_soft_and_members, once every reader is known)
      local offs = seg_offsets(desc)
      out = {segs = {}}
      for i, s in ipairs(desc.segs) do
         local r = s.cs:root()
         local e = {unit = u, offset = offs[i], prev = s.via}
         r.and_members[#r.and_members + 1] = e
         out.segs[i] = {cs = s.cs, src = u, src_off = offs[i], via = e}
      end
   else
      read_desc(g, desc)
      u.kind = groups > 1 and 'group' or 'conv'
      local cs = new_cs(g, m.out_channels, 'unit')
      cs.or_members[1] = u
      u.out = cs
      out = {segs = {{cs = cs, src = u, src_off = 0}}}
   end
   u.out_segs = out.segs
   g.pending = u   -- a BatchNorm2d right after this conv becomes its liveliness source
   return out, {m.out_channels, oh, ow}
end

-- A reader of every channel of desc that keeps them all and their width (fixed, pinned).
local function pin_read(g, desc)
   read_desc(g, desc)
   for _, sg in ipairs(desc.segs) do
      local r = sg.cs:root()
      if r.kind == 'unit' then r.fixed, r.pinned = true, true end
   end
end

-- A BN that is not part of a unit (a BN not directly after a conv): per-channel affine on the
-- descriptor's channels; sliced at surgery.
local function standalone_bn(g, m, desc, shape)
   local segs = {}
   for i, s in ipairs(desc.segs) do segs[i] = {cs = s.cs, via = s.via} end
   g.chanwise[#g.chanwise + 1] = {module = m, desc = {segs = segs}}
   mark_no_rescale(desc)
   return {segs = segs, sf = desc.sf}, shape
end

local function leaf(g, m, desc, shape)
   local t = m:typename()
   -- a module at two places (weight tying: twins share the tensors) cannot be resized at one of
   -- them alone
   for _, p in ipairs((m:parameters())) do   -- every parameter: a bias alone may be shared
      if g.owner_of[p] and g.owner_of[p] ~= m then
         fail(m, 'shares its parameters with %s (weight tying); NR cannot resize a layer used at two places',
            g.owner_of[p]:path())
      end
      g.owner_of[p] = m
   end
   if CUSTOM[t] then
      read_desc(g, desc)   -- (what it does with the channels is its own: counted as a reader)
      return CUSTOM[t](g, m, desc, shape)
   end
   if t == 'Conv2d' or t == 'NRConv2d' then return conv_unit(g, m, desc, shape) end
   local pending = g.pending
   g.pending = nil
   if t == 'BatchNorm2d' then
      if desc_width(desc) ~= m.num_features then
         fail(m, 'expects %d channels but the graph carries %d', m.num_features, desc_width(desc))
      end
      if pending and not pending.bn then
         pending.bn = m
         g.by_module[m] = pending
         if m.nr_fixed then pending.fixed = true end
         return desc, shape
      end
      return standalone_bn(g, m, desc, shape)
   elseif t == 'BatchNorm1d' then
      -- where its features are the channels the graph carries (after a global pool or a Linear,
      -- or a (C, L) sample of C channels) it is a standalone BN on them; over features of several
      -- channels each (after a Flatten) or over another first dimension, the sets it reads keep
      -- their channels (pinned: it is counted, never sliced)
      if (#shape ~= 1 and #shape ~= 2) or shape[1] ~= m.num_features then
         fail(m, 'expects a (%d) or (%d, L) sample but the graph carries %s', m.num_features, m.num_features,
            '(' .. table.concat(shape, ', ') .. ')')
      end
      if (desc.sf or 1) == 1 and desc_width(desc) == m.num_features then return standalone_bn(g, m, desc, shape) end
      mark_no_rescale(desc)
      pin_read(g, desc)
      g.chanwise[#g.chanwise + 1] = {module = m, desc = {segs = desc.segs, sf = desc.sf}, pinned = true}
      return desc, shape
   elseif t == 'Linear' then
      local sf = desc.sf or 1
      local width = desc_width(desc) * sf
      if width ~= m.in_features then
         fail(m, 'expects %d input features but the graph carries %d', m.in_features, width)
      end
      local segs = {}
      for i, s in ipairs(desc.segs) do segs[i] = {cs = s.cs} end
      local lin = {module = m, desc = {segs = segs, sf = sf}}
      g.linears[#g.linears + 1] = lin
      add_consumer(desc, lin)
      read_desc(g, desc)
      local cs = new_cs(g, m.out_features, 'terminal')
      local out = {unpack(shape)}
      out[#out] = m.out_features
      return {segs = {{cs = cs}}}, out
   elseif t == 'Flatten' then
      local sf = 1
      for i = 2, #shape do sf = sf * shape[i] end
      local n = 1
      for i = 1, #shape do n = n * shape[i] end
      return {segs = desc.segs, sf = (desc.sf or 1) * sf}, {n}
   elseif t == 'Softmax' or t == 'LogSoftmax' then
      -- over the last dimension: across the channels when a sample is a vector (after a global
      -- pool, a Flatten or a Linear), where every output reads every channel: a dead channel
      -- still adds to the normalizer and a new one would too, so the sets it reads keep their
      -- channels and width (fixed, pinned); over the width of a (C, H, W) sample it is per channel
      mark_no_rescale(desc)
      if #shape == 1 then
         pin_read(g, desc)
         return {segs = {{cs = new_cs(g, shape[1], 'terminal')}}}, shape
      end
      local segs = {}
      for i, sg in ipairs(desc.segs) do segs[i] = {cs = sg.cs, via = sg.via} end
      return {segs = segs, sf = desc.sf}, shape
   elseif PASS[t] ~= nil then
      local ok, out_shape = pcall(m.outputShape, m, shape)
      if not ok then fail(m, '%s', (tostring(out_shape):gsub('^[^\n]-%.lua:%d+: ', ''))) end
      if PASS[t] == false then
         mark_no_rescale(desc)
         local segs = {}
         for i, s in ipairs(desc.segs) do segs[i] = {cs = s.cs, via = s.via} end
         return {segs = segs, sf = desc.sf}, out_shape
      end
      return desc, out_shape
   end
   if m.modules then fail(m, 'unknown container type %s (register it with nr.rejuvenate.graph.register)', t) end
   if m.weight then fail(m, 'unknown layer type %s with parameters (register it with nr.rejuvenate.graph.register)', t) end
   -- a parameter-free leaf that keeps channels: treated as a pass-through without rescaling
   local ok, out_shape = pcall(m.outputShape, m, shape)
   if not ok or out_shape[1] ~= shape[1] then fail(m, 'unknown layer type %s that changes the channel count', t) end
   mark_no_rescale(desc)
   return desc, out_shape
end

walk = function(g, m, desc, shape)
   local t = m:typename()
   if t == 'Sequential' then
      for _, c in ipairs(m.modules) do desc, shape = walk(g, c, desc, shape) end
      return desc, shape
   elseif t == 'Residual' then
      g.pending = nil
      local a, sa = walk(g, m.modules[1], desc, shape)
      g.pending = nil
      local b = desc
      if m.modules[2] then b = walk(g, m.modules[2], desc, shape) end
      g.pending = nil
      if #a.segs ~= #b.segs then
         fail(m, 'residual add of differently segmented channels (%d vs %d segments) is not supported', #a.segs, #b.segs)
      end
      read_desc(g, a)   -- the add reads both sides
      read_desc(g, b)
      local segs = {}
      for i = 1, #a.segs do
         local r = union(g, a.segs[i].cs, b.segs[i].cs, m)
         segs[i] = {cs = r}
      end
      mark_no_rescale(a)
      mark_no_rescale(b)
      return {segs = segs, sf = a.sf}, sa
   elseif t == 'Concat' then
      g.pending = nil
      local segs, out_shape, sf = {}, nil, nil
      for i, c in ipairs(m.modules) do
         g.pending = nil
         local d, s = walk(g, c, desc, shape)
         for _, sg in ipairs(d.segs) do segs[#segs + 1] = {cs = sg.cs, src = sg.src, src_off = sg.src_off, via = sg.via} end
         if not out_shape then out_shape = {unpack(s)} else out_shape[1] = out_shape[1] + s[1] end
         -- flattened branches (features per channel: sf) concatenate channel by channel only when
         -- every branch has as many per channel (one sf for the whole descriptor)
         local dsf = d.sf or 1
         if i > 1 and dsf ~= (sf or 1) then
            fail(m, 'concatenates flattened branches with %d and %d features per channel; NR supports a Concat of '
               .. 'flattened branches only where each has as many per channel (pool them to one size)', sf or 1, dsf)
         end
         sf = d.sf
      end
      g.pending = nil
      return {segs = segs, sf = sf}, out_shape
   end
   return leaf(g, m, desc, shape)
end

-- graph.build(model, input_shape [, fname]) -> g. input_shape: one sample's shape, e.g. {3, 32, 32};
-- fname: the public function errors name (default nr.rejuvenate).
function M.build(model, input_shape, fname)
   FNAME = fname or 'nr.rejuvenate'
   assert(type(input_shape) == 'table' and #input_shape >= 1, FNAME .. ': input_shape must be a table like {3, 32, 32}')
   local g = {model = model, input_shape = input_shape, units = {}, sets = {}, linears = {}, chanwise = {},
              by_module = {}, owner_of = {}, reads = {}}
   local input = new_cs(g, input_shape[1], 'input')
   local desc, shape = walk(g, model, {segs = {{cs = input}}}, input_shape)
   g.input = input
   g.output_shape = shape
   g.output_desc = desc
   -- roots, in creation order
   g.roots = {}
   for _, cs in ipairs(g.sets) do
      if cs:root() == cs then g.roots[#g.roots + 1] = cs end
   end
   -- the model's output reads what reaches it, and keeps its width (the classes of a model that
   -- ends in a conv, a pool or a BN; a Linear's outputs are never resized anyway)
   pin_read(g, desc)
   mark_soft_and_members(g)
   -- A grouped conv (1 < groups < channels) keeps its widths: its weight's group structure cannot
   -- be resized channel by channel, so the sets it reads and writes are fixed and pinned (not
   -- offered to the reallocation: they keep every channel and their width).
   for _, u in ipairs(g.units) do
      if u.kind == 'group' then
         u.fixed = true
         u.out:root().pinned = true
         for _, s in ipairs(u.in_desc.segs) do
            local r = s.cs:root()
            r.fixed, r.pinned = true, true
         end
      end
   end
   for _, u in ipairs(g.units) do
      if u.fixed and u.out then u.out:root().fixed = true end
   end
   -- A fixed set never loses a channel, so every conv writing it (residual partners, a depthwise
   -- conv on it) is fixed too: no L1 on γ of channels that cannot go (it would only kill them),
   -- all of them live.
   for _, r in ipairs(g.roots) do
      if r.fixed then
         for _, u in ipairs(r.or_members) do u.fixed = true end
         for _, e in ipairs(r.and_members) do e.unit.fixed = true end
      end
   end
   -- a CS is rescalable only through its single producer; coupled sets never
   for _, u in ipairs(g.units) do
      if not u.bn or u.fixed or u.kind == 'group' then u.rescalable = false end
      if u.out and u.out:root().coupled then u.rescalable = false end
   end
   -- the model's output: whatever feeds it cannot be rescaled (the output itself would change)
   mark_no_rescale(desc)
   return g
end

-- Structural snapshot of a model (module identities, parameter tensors, nr_fixed flags): the
-- monitor caches its graph with one and rebuilds after surgery, a flag change or a device move.
-- Comparing is a walk without string building (cheap enough for every step).
function M.snapshot(model)
   local mods = model:listModules()
   local snap = {n = #mods, m = mods, w = {}, f = {}}
   for i, m in ipairs(mods) do
      snap.w[i] = m.weight or false
      snap.f[i] = m.nr_fixed == true
   end
   return snap
end

function M.unchanged(model, snap)
   local i = 0
   local ok = true
   local function visit(m)
      i = i + 1
      if snap.m[i] ~= m or snap.w[i] ~= (m.weight or false) or snap.f[i] ~= (m.nr_fixed == true) then
         ok = false
         return
      end
      local kids = m.modules
      if kids then
         for _, c in ipairs(kids) do
            visit(c)
            if not ok then return end
         end
      end
   end
   visit(model)
   return ok and i == snap.n
end

return M

-- nr.rejuvenate.surgery — dead-neuron removal, width expansion, reinitialization, neural
-- rescaling and the split into NRConv2d (paper 3.2-3.3), applied to a model in place.
--
-- What it is: given the channel graph (graph.lua), the masks (monitor.lua) and new widths per
-- channel set (from the reallocation policy), rebuild every affected module:
--   * layout of every resized CS: [survivors in their old order (so generations stay grouped) |
--     new channels]; the same layout for every member of a coupled set (residual adds), and for
--     a depthwise conv and its producer (same CS);
--   * W_S→S kept; W_R→R fresh (policy.init, default Kaiming normal fan-out); W_R→S = 0; W_S→R = 0
--     when the layer has new input channels (else — the stem, or an input set that did not
--     grow — the new rows read the survivors with fresh weights, as the authors' is_input path);
--   * new BN channels γ = γ0, β = 0, running mean 0, var 1; survivors keep theirs; standalone BNs
--     (pre-activation; a BatchNorm1d after a global pool or a Linear) are sliced the same way, as
--     their own class (a pinned one is left as it is);
--   * Linear input columns remapped, new columns zero (function exact; see docs/NR.md);
--   * optimizer state (momentum; Adam's moments) gathered with the same index maps (new entries 0), or dropped;
--   * scheme 'CR' / 'CA': a groups=1 conv whose input carries generations becomes an NRConv2d
--     with the dense weight's blocks (cross blocks: dropped for CR, kept for CA);
--   * neural rescaling: |γ'| = max(|γ|, γ0), β scaled alike, consumers' input weights divided.
-- How: every new tensor (weight, bias, BN vector, gradient, optimizer buffer) is written once, in
-- C: the placements are queued and run by one nr_surgery_place_many call (survivors gathered by
-- the index maps, the fresh block, a fill value; one OpenMP region), with index maps converted
-- once per channel map; new modules are shells (constructor at the smallest size, no random
-- reset); the default init policy's Kaiming block is drawn inside that same pass, a replaced init
-- policy is asked only for the non-zero block (W_R→R, or every column of the new rows when the
-- input did not grow: info.full_shape, info.columns).
-- What it is not: deciding widths (policy.lua) or when (init.lua).
-- Invariants: modules are replaced by fresh ones (no stale kernel scratch) at the same path and
-- key; flags (nr_fixed) and the train/eval mode carry over; every tensor stays on its device.
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local ffi, C = nrffi.ffi, nrffi.C
local monitor = require 'nr.rejuvenate.monitor'
local DEFAULT_INIT = require('nr.rejuvenate.policy').init

local M = {}

local FNAME = 'nr.rejuvenate'

local function fail(fmt, ...) error(FNAME .. ': ' .. string.format(fmt, ...), 0) end

local function range(a, n)
   local out = {}
   for i = 0, n - 1 do out[#out + 1] = a + i end
   return out
end
M.range = range

-- Index maps go to C as int64 CPU tensors, built once per map and shared by every tensor placed
-- with it (weight, bias, momentum, BN vectors): a map {keep = {old positions}, dst = {new
-- positions}} (0-based) becomes a (2, K) tensor of (source, destination) pairs, cached in the map.
local function pairs_of(m)
   local t = m._pairs
   if not t then
      local keep, dst, k = m.keep, m.dst, #m.keep
      t = T.empty({2, k}, {dtype = 'int64'})
      local p = t:data()
      for i = 1, k do p[i - 1] = keep[i]; p[k + i - 1] = dst[i] end
      m._pairs = t
   end
   return t
end

local function list_of(l)
   local t = T.empty({#l}, {dtype = 'int64'})
   local p = t:data()
   for i = 1, #l do p[i - 1] = l[i] end
   return t
end

-- A placement job: dst <- [survivors of old placed by m1 (rows) and m2 (columns) | a new block
-- at (blk.rows, blk.cols) | fill elsewhere], every element written once (nr_surgery_place). The
-- new block is blk.t, or with blk.std drawn N(0, blk.std²) inside the same pass (seeded here from
-- the global generator, so nr.manual_seed reproduces it). old may be nil (nothing survives), m2
-- nil (only dim 1 remapped), blk nil (no new block) or blk.cols nil (the block spans every
-- column). The job table holds every tensor it names until it has run.
local function job(dst, old, m1, m2, fill, blk)
   local a = old and #m1.keep > 0 and (not m2 or #m2.keep > 0) and old:contiguous() or nil
   local cols = (a and m2) or (blk and blk.cols)
   local j = {dst = dst, a = a, fill = fill or 0, std = 0, seed = 0}
   if a then
      j.ar = pairs_of(m1)
      if cols then
         j.ac = m2 and pairs_of(m2) or pairs_of({keep = range(0, dst:size(2)), dst = range(0, dst:size(2))})
      end
   end
   if blk then
      j.b = blk.t and blk.t:contiguous()
      j.br = list_of(blk.rows)
      if cols then j.bc = list_of(blk.cols or range(0, dst:size(2))) end
      if not j.b then j.std, j.seed = blk.std, C.nr_rng_next() end
   end
   return j
end

local JOBS = ffi.typeof('nr_place_job[?]')
local function cp(t) return t and t.c or nil end

-- Runs a list of jobs as one nr_surgery_place_many call (one parallel region).
function M.run_jobs(list)
   local n = #list
   if n == 0 then return end
   local arr = JOBS(n)
   for i, j in ipairs(list) do
      local e = arr[i - 1]
      e.dst, e.a, e.a_rows, e.a_cols = j.dst.c, cp(j.a), cp(j.ar), cp(j.ac)
      e.b, e.b_rows, e.b_cols = cp(j.b), cp(j.br), cp(j.bc)
      e.fill, e.b_std, e.b_seed = j.fill, j.std, j.seed
   end
   check.status(C.nr_surgery_place_many(arr, n), FNAME .. ' (surgery)')
end

-- One placement, run now; returns dst.
local function place_into(dst, old, m1, m2, fill, blk)
   M.run_jobs({job(dst, old, m1, m2, fill, blk)})
   return dst
end
M.place_into = place_into

-- A new tensor of new_shape on old's device, placed as place_into (new positions: fill, 0).
local function place(old, new_shape, m1, m2, fill, blk)
   local dev = old and old:device() or (blk and blk.t and blk.t:device()) or 'cpu'
   return place_into(T.empty(new_shape, {device = dev}), old, m1, m2, fill, blk)
end
M.place = place

-- The class's own constructor without the random initialisation of the weights (reset).
local function quiet_new(cls, ...)
   local obj = setmetatable({reset = function(self) return self end}, cls)
   cls.__init(obj, ...)
   obj.reset = nil
   return obj
end
M.quiet_new = quiet_new

-- ---- plans ------------------------------------------------------------------------------------

-- |γ| score of every position of a root (max over its BN members); nil when none has a BN.
local scores = monitor.scores

-- Highest generation id present in the graph.
local function max_gen(g)
   local mx = 0
   for _, r in ipairs(g.roots) do
      for _, x in ipairs(monitor.cs_gens(r) or {}) do if x.gen > mx then mx = x.gen end end
   end
   return mx
end
M.max_gen = max_gen

-- plan[root] = {keep = {old positions}, w = new width, gens = {{gen, n}} | nil, old_w}.
-- merge: every survivor becomes generation 0 (the paper's S) and the new channels next_gen (R);
-- otherwise survivors keep their generations.
function M.plans(g, st, widths, next_gen, merge)
   local plans = {}
   for _, r in ipairs(g.roots) do
      if r.kind ~= 'unit' then
         plans[r] = {keep = range(0, r.width), w = r.width, old_w = r.width}
      else
         local surv = monitor.survivors(r, st)
         local live = 0
         for _, x in ipairs(surv) do live = live + x.n end
         local w = widths[r] or math.max(1, live)
         if w < 1 then fail('%s: width %d requested (at least 1)', r.or_members[1].conv:path(), w) end
         local keep, gens = monitor.layout(r, surv, scores(r), w, next_gen, merge)
         plans[r] = {keep = keep, w = w, gens = gens, old_w = r.width}
      end
   end
   return plans
end

-- Map of a descriptor (concatenation of CSs) under the plans.
local function desc_map(desc, plans)
   local keep, dst, fresh, gen_of = {}, {}, {}, {}
   local shared = false
   local o_old, o_new = 0, 0
   for _, s in ipairs(desc.segs) do
      local r = s.cs:root()
      local p = plans[r]
      for k, pos in ipairs(p.keep) do keep[#keep + 1] = o_old + pos; dst[#dst + 1] = o_new + k - 1 end
      for k = #p.keep, p.w - 1 do fresh[#fresh + 1] = o_new + k end
      if p.gens then
         local at = o_new
         for _, x in ipairs(p.gens) do
            for q = at, at + x.n - 1 do gen_of[q] = x.gen end
            at = at + x.n
         end
      else
         shared = true
      end
      o_old, o_new = o_old + r.width, o_new + p.w
   end
   return {keep = keep, dst = dst, fresh = fresh, width = o_new, old_width = o_old,
           gen_of = (not shared) and gen_of or nil}
end
M.desc_map = desc_map

-- ---- module replacement -------------------------------------------------------------------------

local function replace(old, new)
   local parent = rawget(old, '_parent')
   if not parent then fail('cannot replace the root module %s', old:typename()) end
   local found = false
   for i, m in ipairs(parent.modules) do
      if m == old then parent.modules[i] = new; found = true end
   end
   if not found then fail('%s is not among its parent\'s modules', old:path()) end
   for k, v in pairs(parent) do
      if v == old and k ~= 'modules' then parent[k] = new end
   end
   new._parent, new._key = parent, old._key
   new.train = old.train
   -- whoever still holds old (an optimizer's custom groups) can follow it to new; optimizers built
   -- on the tree see its structure count change (SGD:step refuses until refreshed)
   rawset(old, '_replaced_by', new)
   local tr = parent:root():transient()
   tr.structure = (tr.structure or 0) + 1
   for k, v in pairs(old) do
      if type(k) == 'string' and k:sub(1, 3) == 'nr_' and k ~= 'nr_gens' then new[k] = v end
   end
end
M.replace = replace

local function on_device(m, dev)
   if dev ~= 'cpu' then m:to(dev) end
   return m
end

local function conv_opts(m, groups, bias)
   return {stride = m.stride, padding = m.padding, dilation = m.dilation, groups = groups, bias = bias}
end

-- New modules are shells: the class's constructor at the smallest size without its random reset
-- (so every field is what the constructor sets), then the real sizes, and tensors allocated
-- uninitialised that the queued placements write (gradients: zero). Rebuilding a big model thus
-- writes each new element once, in one parallel region, and draws nothing it throws away.
-- tests/lua/nr_surgery_spec.lua checks that a shell has exactly a constructed module's fields.
local function empty(shape, dev) return T.empty(shape, {device = dev}) end

local function conv_shell(m, cin, cout, k, groups, bias, dev)
   local nn = require 'nr.nn'
   local nc = on_device(quiet_new(nn.Conv2d, 1, 1, k, conv_opts(m, 1, bias)), dev)
   nc.in_channels, nc.out_channels, nc.groups = cin, cout, groups
   local ws = {cout, cin / groups, k[1], k[2]}
   nc.weight, nc.gradWeight = empty(ws, dev), empty(ws, dev)
   if bias then nc.bias, nc.gradBias = empty({cout}, dev), empty({cout}, dev) end
   return nc
end
M.conv_shell = conv_shell

local function bn_shell(bn, c, dev)
   local nn = require 'nr.nn'
   local affine = bn.weight ~= nil
   -- (the class by name: a synchronized BatchNorm2d comes back plain, nr.dist converts it again)
   local nb = on_device(quiet_new(nn[bn:typename()], 1, {eps = bn.eps, momentum = bn.momentum, affine = affine}), dev)
   nb.num_features = c
   if affine then nb.weight, nb.bias, nb.gradWeight, nb.gradBias = empty({c}, dev), empty({c}, dev), empty({c}, dev), empty({c}, dev) end
   nb.running_mean, nb.running_var = empty({c}, dev), empty({c}, dev)
   return nb
end
M.bn_shell = bn_shell

local function linear_shell(nin, nout, bias, dev)
   local nn = require 'nr.nn'
   local nl = on_device(quiet_new(nn.Linear, 1, 1, {bias = bias}), dev)
   nl.in_features, nl.out_features = nin, nout
   nl.weight, nl.gradWeight = empty({nout, nin}, dev), empty({nout, nin}, dev)
   if bias then nl.bias, nl.gradBias = empty({nout}, dev), empty({nout}, dev) end
   return nl
end
M.linear_shell = linear_shell

-- ---- surgery --------------------------------------------------------------------------------------

-- The optimizer's state of parameter p ({key = tensor, ..., step = n}: SGD's momentum, Adam's
-- exp_avg, exp_avg_sq and step), or nil.
local function state_of(opt, p)
   if not opt or not p then return nil end
   return opt:state_of(p)
end

-- How each state tensor scales with its parameter's gradient (1: a gradient sum, 2: of squares);
-- an optimizer that does not say is taken as holding gradient sums.
local function powers_of(opt)
   local pw = opt and opt.state_powers and opt:state_powers() or {}
   return setmetatable(pw, {__index = function() return 1 end})
end

-- A state table with f(tensor, key) for each tensor (numbers kept), or nil for nil.
local function map_state(st, f)
   if not st then return nil end
   local out = {}
   for k, v in pairs(st) do
      if T.is_tensor(v) then out[k] = f(v, k) else out[k] = v end
   end
   return out
end

-- A fresh block {t = tensor | std = number, rows = positions, cols = positions | nil (every
-- column)}. The default init policy (Kaiming normal, fan-out) is drawn inside nr_surgery_place
-- (same distribution, no temporary, in parallel); a replaced one is called with kind 'depthwise'
-- for a depthwise conv's new rows, else 'conv', and its tensor checked.
local function fresh_block(ctx, shape, info, rows, cols)
   if ctx.init == DEFAULT_INIT then
      return {std = math.sqrt(2 / (info.fan_out or 1)), rows = rows, cols = cols}
   end
   local R = ctx.init(info.unit and info.unit.kind == 'dw' and 'depthwise' or 'conv', shape, info)
   check.arg(T.is_tensor(R) and T.same_shape(R:shape(), shape) and R:dtype() == 'float32', FNAME,
      'policy.init must return a float32 tensor of shape [%s], got %s', table.concat(shape, ' x '),
      T.is_tensor(R) and R:describe() or type(R))
   check.arg(R:all_finite(), FNAME,
      'policy.init returned non-finite weights (NaN or inf) for a block of shape [%s]', table.concat(shape, ' x '))
   if R:device() ~= info.device then R = R:to(info.device) end
   return {t = R, rows = rows, cols = cols}
end

-- CA: an output channel gated by its generation's own response A (O = A + 2σ(A)·B) whose
-- generation has no input channel left becomes a plain block reading every input (O = A + B,
-- an "orphan"). A is then its bias alone, a constant, so the gate 2σ(b) is folded into the
-- channel's weight row (its optimizer state, gradient sums (of squares), / the factor (squared)):
-- the function is kept. m: the old NRConv2d; keep: old positions in new order; W, Wst, B: m's
-- dense weight, optimizer state (or nil) and bias, fresh tensors changed in place; pw: powers_of.
local function fold_orphan_gates(m, spec, keep, W, Wst, B, pw)
   local has_in, gen_at, gated = {}, {}, {}
   for _, ig in ipairs(spec.in_groups) do has_in[ig.gen] = true end
   for _, og in ipairs(spec.out_groups) do
      for k = og.first, og.first + og.n - 1 do gen_at[k] = og.gen end
   end
   for j, plan in ipairs(m.out_plan) do
      if plan.diag then
         local og = m.spec.out_groups[j]
         for q = og.first, og.first + og.n - 1 do gated[q] = true end
      end
   end
   local b = B:totable()
   for k, q in ipairs(keep) do   -- new position k - 1 holds old channel q
      if gated[q] and not has_in[gen_at[k - 1]] then
         local f = 2 / (1 + math.exp(-b[q + 1]))
         W:narrow(1, q + 1, 1):mul_(f)
         map_state(Wst, function(t, key) return t:narrow(1, q + 1, 1):mul_(f ^ -pw[key]) end)
      end
   end
end

-- Applies the plans. ctx = {opt, optim_state ('remap' | 'drop'), gamma0, scheme, init = fn}.
-- Returns the list of replaced modules {old, new} and pending optimizer state {param, state}.
-- Every new tensor is written once by nr_surgery_place from the old tensor, the init policy's
-- block and a fill value; the init policy is asked only for the block that is not zero: the new
-- rows' columns of new input channels (W_R→R), or every column when the input has no new
-- channels (info.full_shape is the rows' whole shape, info.columns the columns it fills, nil =
-- all).
function M.apply(g, plans, ctx)
   local nn = require 'nr.nn'
   -- placements are queued and run together at the end (one C call, one parallel region over all
   -- of them); queue2 holds placements that read tensors queue 1 writes (the blocks of an
   -- NRConv2d, gathered from the dense new weight), run by a second call
   local queue, queue2 = {}, {}
   local function put(dst, old, m1, m2, fill, blk)
      queue[#queue + 1] = job(dst, old, m1, m2, fill, blk)
      return dst
   end
   local function put_new(old, new_shape, m1, m2, fill, blk)
      return put(T.empty(new_shape, {device = old:device()}), old, m1, m2, fill, blk)
   end
   local function put2(dst, from, m1, m2)
      queue2[#queue2 + 1] = job(dst, from, m1, m2, 0)
      return dst
   end
   local function flush()
      M.run_jobs(queue)   -- looked up per call, so a profiler can wrap it
      M.run_jobs(queue2)
      queue, queue2 = {}, {}
   end
   local reps, moms = {}, {}
   local remap = ctx.opt and ctx.optim_state ~= 'drop'
   local pw = powers_of(ctx.opt)
   -- new parameter p takes old parameter q's optimizer state, each tensor through f(tensor)
   local function carry(p, q, f)
      local st = remap and map_state(state_of(ctx.opt, q), f)
      if st then moms[#moms + 1] = {param = p, state = st} end
   end
   local gamma0 = ctx.gamma0

   local function zero(t) if t then put(t, nil, nil, nil, 0) end end

   -- map: the {keep, dst} of the channels; every other position is a new channel
   local function rebuild_bn(bn, map, n_new)
      local nb = bn_shell(bn, n_new, (bn.weight or bn.running_mean):device())
      if bn.weight then
         put(nb.weight, bn.weight, map, nil, gamma0)
         put(nb.bias, bn.bias, map, nil, 0)
         zero(nb.gradWeight)
         zero(nb.gradBias)
         carry(nb.weight, bn.weight, function(t) return put_new(t, {n_new}, map) end)
         carry(nb.bias, bn.bias, function(t) return put_new(t, {n_new}, map) end)
      end
      put(nb.running_mean, bn.running_mean, map, nil, 0)
      put(nb.running_var, bn.running_var, map, nil, 1)
      reps[#reps + 1] = {old = bn, new = nb}
      return nb
   end

   for _, u in ipairs(g.units) do
      local m = u.conv
      local inmap = desc_map(u.in_desc, plans)
      local kh, kw = u.kh, u.kw
      local dev = (m.weight or m.blocks[1].conv.weight):device()
      if u.kind == 'dw' then
         local w = inmap.width
         local m1 = {keep = inmap.keep, dst = inmap.dst}
         local nc = conv_shell(m, w, w, {kh, kw}, w, m.bias ~= nil, dev)
         -- stays depthwise at one channel too (groups = in = out = 1 reads as a dense conv)
         nc.nr_depthwise = true
         local blk
         if #inmap.fresh > 0 then
            -- fan-out as the zoo's init computes it for a depthwise weight (w, 1, kh, kw): w * kh * kw
            -- (PyTorch's, not divided by groups), so new rows start at the scale of the model's own
            blk = fresh_block(ctx, {#inmap.fresh, 1, kh, kw}, {fan_out = w * kh * kw, fan_in = kh * kw, device = dev, unit = u,
                                    full_shape = {#inmap.fresh, 1, kh, kw}}, inmap.fresh)
         end
         put(nc.weight, m.weight, m1, nil, 0, blk)
         zero(nc.gradWeight)
         carry(nc.weight, m.weight, function(t) return put_new(t, {w, 1, kh, kw}, m1) end)
         if m.bias then
            put(nc.bias, m.bias, m1, nil, 0)
            zero(nc.gradBias)
            carry(nc.bias, m.bias, function(t) return put_new(t, {w}, m1) end)
         end
         reps[#reps + 1] = {old = m, new = nc}
         if u.bn then rebuild_bn(u.bn, m1, w) end
      elseif u.kind == 'group' then
         local p = plans[u.out:root()]
         if inmap.width ~= inmap.old_width or p.w ~= p.old_w or #inmap.keep ~= inmap.old_width or #p.keep ~= p.old_w then
            fail('%s: a grouped conv (1 < groups < channels) cannot be resized (its sets are pinned)', m:where())
         end
      else
         local p = plans[u.out:root()]
         local wout, win = p.w, inmap.width
         local m1 = {keep = p.keep, dst = range(0, #p.keep)}
         local m2 = {keep = inmap.keep, dst = inmap.dst}
         local W_old, B_old, Wst_old, Bst_old
         if u.split then
            W_old = m:dense()
            B_old = m:dense_bias()
            -- the optimizer state as one dense tensor per key, where any block has it (the blocks
            -- without count as zero; the blocks step together, so any one's numbers are all's)
            local function dense_state(dense, param_of)
               local st
               for _, b in ipairs(m.blocks) do
                  st = st or (param_of(b) and state_of(ctx.opt, param_of(b)))
               end
               return map_state(st, function(_, k)
                  return dense(m, function(b)
                     local bst = param_of(b) and state_of(ctx.opt, param_of(b))
                     return bst and bst[k]
                  end)
               end)
            end
            Wst_old = dense_state(m.dense, function(b) return b.conv.weight end)
            Bst_old = B_old and dense_state(m.dense_bias, function(b) return b.conv.bias end)
         else
            W_old, B_old = m.weight, m.bias
            Wst_old, Bst_old = state_of(ctx.opt, m.weight), state_of(ctx.opt, m.bias)
         end
         local n_f = wout - #p.keep
         local blk
         if n_f > 0 then
            -- W_R→R fresh; W_S→R = 0 when the input has new channels, else the new rows read every
            -- input channel (the stem, an input set that did not grow)
            local cols = #inmap.fresh > 0 and inmap.fresh or nil
            blk = fresh_block(ctx, {n_f, cols and #cols or win, kh, kw},
               {fan_out = wout * kh * kw, fan_in = win * kh * kw, device = dev, unit = u, full_shape = {n_f, win, kh, kw},
                columns = cols}, range(#p.keep, n_f), cols)
         end
         -- split by generation (CR / CA) when the input carries generations
         local spec
         if ctx.scheme ~= 'NR' and inmap.gen_of and p.gens then
            local by_gen, order = {}, {}
            for q = 0, win - 1 do
               local gg = inmap.gen_of[q]
               if not by_gen[gg] then by_gen[gg] = {}; order[#order + 1] = gg end
               local l = by_gen[gg]
               l[#l + 1] = q
            end
            table.sort(order)
            local in_groups = {}
            for _, gg in ipairs(order) do in_groups[#in_groups + 1] = {gen = gg, idx = by_gen[gg]} end
            local out_groups, at = {}, 0
            for _, x in ipairs(p.gens) do out_groups[#out_groups + 1] = {gen = x.gen, first = at, n = x.n}; at = at + x.n end
            local dense = #in_groups == 1 and #out_groups == 1 and in_groups[1].gen == out_groups[1].gen
            if not dense then
               spec = {in_channels = win, out_channels = wout, kernel_size = {kh, kw}, stride = m.stride,
                       padding = m.padding, dilation = m.dilation, bias = B_old ~= nil, scheme = ctx.scheme,
                       in_groups = in_groups, out_groups = out_groups}
            end
         end
         local nc
         if spec then
            if ctx.scheme == 'CA' and u.split and m.scheme == 'CA' and B_old then
               fold_orphan_gates(m, spec, p.keep, W_old, remap and Wst_old, B_old, pw)
            end
            -- the dense new weight (temporary), then each block gathered from it
            local W = put_new(W_old, {wout, win, kh, kw}, m1, m2, 0, blk)
            local B = B_old and put_new(B_old, {wout}, m1)
            local Wst = remap and map_state(Wst_old, function(t) return put_new(t, {wout, win, kh, kw}, m1, m2) end)
            local Bst = remap and map_state(Bst_old, function(t) return put_new(t, {wout}, m1) end)
            nc = on_device(nn.NRConv2d(spec), dev)
            for _, b in ipairs(nc.blocks) do
               local rows = {keep = range(b.out_first, b.out_n), dst = range(0, b.out_n)}
               local cols = {keep = b.in_idx, dst = range(0, #b.in_idx)}
               put2(b.conv.weight, W, rows, cols)
               local function block_state(bp, st, c)
                  if st then
                     moms[#moms + 1] = {param = bp, state = map_state(st, function(t)
                        return put2(T.empty(bp:shape(), {device = dev}), t, rows, c)
                     end)}
                  end
               end
               block_state(b.conv.weight, Wst, cols)
               if b.conv.bias then
                  put2(b.conv.bias, B, rows)
                  block_state(b.conv.bias, Bst, nil)
               end
            end
         else
            nc = conv_shell(m, win, wout, {kh, kw}, 1, B_old ~= nil, dev)
            put(nc.weight, W_old, m1, m2, 0, blk)
            zero(nc.gradWeight)
            if remap and Wst_old then
               moms[#moms + 1] = {param = nc.weight, state = map_state(Wst_old, function(t) return put_new(t, {wout, win, kh, kw}, m1, m2) end)}
            end
            if B_old then
               put(nc.bias, B_old, m1, nil, 0)
               zero(nc.gradBias)
               if remap and Bst_old then
                  moms[#moms + 1] = {param = nc.bias, state = map_state(Bst_old, function(t) return put_new(t, {wout}, m1) end)}
               end
            end
         end
         nc.nr_gens = p.gens
         reps[#reps + 1] = {old = m, new = nc}
         if u.bn then rebuild_bn(u.bn, m1, wout) end
      end
   end

   for _, cw in ipairs(g.chanwise) do
      if not cw.pinned then -- (a pinned one's sets keep their channels: nothing to slice)
         local map = desc_map(cw.desc, plans)
         rebuild_bn(cw.module, map, map.width)
      end
   end

   for _, l in ipairs(g.linears) do
      local m = l.module
      local map = desc_map(l.desc, plans)
      local sf = l.desc.sf or 1
      local keep, dst = {}, {}
      for k, pos in ipairs(map.keep) do
         for j = 0, sf - 1 do keep[#keep + 1] = pos * sf + j; dst[#dst + 1] = map.dst[k] * sf + j end
      end
      local nin, nout = map.width * sf, m.out_features
      local dev = m.weight:device()
      local rows = {keep = range(0, nout), dst = range(0, nout)}
      local cols = {keep = keep, dst = dst}
      local nl = linear_shell(nin, nout, m.bias ~= nil, dev)
      local blk
      if ctx.linear_init == 'normal' and #map.fresh > 0 then
         local fresh = {}
         for _, pos in ipairs(map.fresh) do for j = 0, sf - 1 do fresh[#fresh + 1] = pos * sf + j end end
         blk = {std = 0.01, rows = rows.dst, cols = fresh}   -- the authors' N(0, 0.01)
      end
      put(nl.weight, m.weight, rows, cols, 0, blk)
      zero(nl.gradWeight)
      carry(nl.weight, m.weight, function(t) return put_new(t, {nout, nin}, rows, cols) end)
      if m.bias then
         put(nl.bias, m.bias, rows, nil, 0)
         zero(nl.gradBias)
         carry(nl.bias, m.bias, function(t) return t:clone() end)
      end
      reps[#reps + 1] = {old = m, new = nl}
   end

   flush()
   for _, r in ipairs(reps) do replace(r.old, r.new) end
   return reps, moms
end

-- ---- neural rescaling -------------------------------------------------------------------------------

-- Rescales every rescalable unit of graph g (built on the current model): s = max(|γ|, γ0)/|γ|,
-- γ, β ← s·γ, s·β; every consumer's weights for those channels ← w / s. Exact in eval mode
-- through ReLU / pools (positively homogeneous). With the optimizer opt, every rescaled value's
-- state is transformed as its gradient is: SGD's momentum is a running sum of gradients, and
-- γ' = s·γ has gradient ∂L/∂γ / s while w' = w / s has s·∂L/∂w, so the buffers become v_γ / s
-- (β alike) and s·v_w: what the gradients of the rescaled net would have accumulated, so later
-- gradients and the buffer agree (an unchanged buffer would be off by s, scaled as the values
-- by s²); a sum of squared gradients (Adam's exp_avg_sq) by the square. Returns the number of
-- channels rescaled.
function M.rescale(g, gamma0, opt)
   local pw = powers_of(opt)
   -- f(t, 0) on a parameter, f(buf, power) on each state tensor opt holds for it: the value
   -- scales by x, its state by x^-power
   local function both(p, f)
      f(p, 0)
      map_state(state_of(opt, p), function(t, k) return f(t, pw[k]) end)
   end
   local n = 0
   for _, u in ipairs(g.units) do
      if u.rescalable and u.bn and u.bn.weight and #u.consumers > 0 then
         local gam = u.bn.weight:totable()
         local s, any = {}, false
         for i, v in ipairs(gam) do
            local a = math.abs(v)
            if a > 1e-12 and a < gamma0 then s[i] = gamma0 / a; any = true; n = n + 1 else s[i] = 1 end
         end
         if any then
            local dev = u.bn.weight:device()
            -- s^e as a tensor on the device, per exponent e
            local pow_cache = {}
            local function s_pow(e)
               if not pow_cache[e] then
                  local v = {}
                  for i = 1, #s do v[i] = s[i] ^ e end
                  pow_cache[e] = T.tensor(v):to(dev)
               end
               return pow_cache[e]
            end
            -- values of the unit: × s; their state: × s^-power. Consumers: the reverse, each on
            -- the channels it reads (a segment of the unit's output, at its own offset)
            local function unit_scale(t, power) t:mul_(s_pow(power == 0 and 1 or -power)) end
            both(u.bn.weight, unit_scale)
            both(u.bn.bias, unit_scale)
            for _, c in ipairs(u.consumers) do
               local cm = c.module
               local lo, w = c.src_off, c.width
               -- a consumer's value × 1/s, its state × s^power, on the channels it reads
               local function cpow(power) return s_pow(power == 0 and -1 or power):narrow(1, lo + 1, w) end
               if cm.conv then
                  local conv = cm.conv
                  if cm.kind == 'dw' then
                     both(conv.weight, function(t, power)
                        t:narrow(1, c.offset + 1, w):mul_(cpow(power):reshape(w, 1, 1, 1))
                     end)
                  elseif cm.split then
                     -- the blocks as one dense weight (and one dense tensor per state key, where
                     -- blocks have it)
                     local gets = {{0, function(b) return b.conv.weight end}}
                     local st0
                     for _, b in ipairs(conv.blocks) do st0 = st0 or state_of(opt, b.conv.weight) end
                     map_state(st0, function(_, k)
                        gets[#gets + 1] = {pw[k], function(b)
                           local bst = state_of(opt, b.conv.weight)
                           return bst and bst[k]
                        end}
                     end)
                     for _, pg in ipairs(gets) do
                        local power, get = pg[1], pg[2]
                        local W = conv:dense(get)
                        W:narrow(2, c.offset + 1, w):mul_(cpow(power):reshape(1, w, 1, 1))
                        conv:scatter(W, function(b, slice)
                           local t = get(b)
                           if t then t:copy(slice) end
                        end)
                     end
                  else
                     both(conv.weight, function(t, power)
                        t:narrow(2, c.offset + 1, w):mul_(cpow(power):reshape(1, w, 1, 1))
                     end)
                  end
               else
                  local lin = cm.module
                  local sf = c.sf or 1
                  both(lin.weight, function(t, power)
                     local e = power == 0 and -1 or power
                     local v = {}
                     for i = lo + 1, lo + w do for _ = 1, sf do v[#v + 1] = s[i] ^ e end end
                     local vt = T.tensor(v):reshape(1, #v)
                     if dev ~= 'cpu' then vt = vt:to(dev) end
                     t:narrow(2, c.offset * sf + 1, #v):mul_(vt)
                  end)
               end
            end
         end
      end
   end
   return n
end

-- ---- architecture state (checkpoints of rejuvenated models) ---------------------------------------

-- The modules below model (not model itself, nor an NRConv2d's own blocks) that an arch_state
-- describes, by path below model.
local function arch_modules(model)
   local out = {}
   for _, m in ipairs(model:listModules()) do
      local parent = rawget(m, '_parent')
      local t = m:typename()
      if m ~= model and parent and parent:typename() ~= 'NRConv2d'
         and (t == 'Conv2d' or t == 'NRConv2d' or t == 'BatchNorm2d' or t == 'BatchNorm1d' or t == 'Linear') then
         out[#out + 1] = {path = m:path(model), m = m}
      end
   end
   return out
end

-- Plain-data description of every conv / BN / Linear whose shape may differ from a freshly built
-- model: {path = {type, ...sizes, spec | nil, nr_gens}}, paths below model (a submodule saved on
-- its own loads into a fresh copy of that submodule).
function M.arch_state(model)
   local out = {}
   for _, e in ipairs(arch_modules(model)) do
      local m, t = e.m, e.m:typename()
      if t == 'Conv2d' then
         out[e.path] = {type = t, in_channels = m.in_channels, out_channels = m.out_channels,
                        groups = m.groups or 1, bias = m.bias ~= nil, nr_gens = m.nr_gens,
                        depthwise = rawget(m, 'nr_depthwise')}
      elseif t == 'NRConv2d' then
         out[e.path] = {type = t, spec = m.spec, nr_gens = m.nr_gens}
      elseif t == 'BatchNorm2d' or t == 'BatchNorm1d' then
         out[e.path] = {type = t, num_features = m.num_features}
      else
         out[e.path] = {type = t, in_features = m.in_features, out_features = m.out_features, bias = m.bias ~= nil}
      end
   end
   return out
end

-- Whether a rejuvenation has changed model (a conv carries its generations).
function M.rejuvenated(model)
   for _, m in ipairs(model:listModules()) do
      if rawget(m, 'nr_gens') ~= nil then return true end
   end
   return false
end

-- A conv's input channels, from its arch entry or the module.
local function conv_in(a_or_m)
   return a_or_m.spec and a_or_m.spec.in_channels or a_or_m.in_channels
end

-- Rebuilds modules of a freshly built model to match an arch_state (weights are then loaded).
-- Every entry is checked before anything is replaced (a mismatch leaves the model as it was):
-- the path exists with a kind a rejuvenation can give it (Conv2d and NRConv2d are one kind).
-- strict (a file loaded by hand): also what no rejuvenation changes, so another model is an
-- error rather than rebuilt to the file: a Linear's outputs and the first conv's inputs.
function M.apply_arch(model, arch, strict)
   local nn = require 'nr.nn'
   local by_path, first_conv = {}, nil
   for _, e in ipairs(arch_modules(model)) do
      by_path[e.path] = e.m
      local t = e.m:typename()
      if not first_conv and (t == 'Conv2d' or t == 'NRConv2d') then first_conv = e end
   end
   local KIND = {Conv2d = 'conv', NRConv2d = 'conv', BatchNorm2d = 'bn', BatchNorm1d = 'bn1d', Linear = 'linear'}
   local paths = {}
   for path in pairs(arch) do paths[#paths + 1] = path end
   table.sort(paths) -- the first mismatch named is the same every time
   for _, path in ipairs(paths) do
      local a, m = arch[path], by_path[path]
      if not m then fail('checkpoint architecture names %s, which the model does not have', path) end
      if type(a) ~= 'table' or not KIND[a.type] or KIND[a.type] ~= KIND[m:typename()] then
         fail('checkpoint architecture has a %s at %s, where the model has a %s', type(a) == 'table' and tostring(a.type)
            or type(a), path, m:typename())
      end
      if strict and a.type == 'Linear' and a.out_features ~= m.out_features then
         fail('%s gives %s outputs in the checkpoint but %d in the model (another model: a rejuvenation keeps them)',
            path, tostring(a.out_features), m.out_features)
      end
      if strict and first_conv and path == first_conv.path and conv_in(a) ~= conv_in(m) then
         fail('%s reads %s input channels in the checkpoint but %d in the model (another model: a rejuvenation '
            .. 'keeps them)', path, tostring(conv_in(a)), conv_in(m))
      end
   end
   local n = 0
   for _, path in ipairs(paths) do
      local a, m = arch[path], by_path[path]
      local dev = (m.weight or m.running_mean or (m.blocks and m.blocks[1].conv.weight))
      dev = dev and dev:device() or 'cpu'
      local new
      if a.type == 'NRConv2d' then
         new = nn.NRConv2d(a.spec)
      elseif a.type == 'Conv2d' then
         local k = m.kernel_size
         if m:typename() == 'NRConv2d' or m.in_channels ~= a.in_channels or m.out_channels ~= a.out_channels
            or (m.groups or 1) ~= a.groups then
            new = nn.Conv2d(a.in_channels, a.out_channels, k, {stride = m.stride, padding = m.padding,
               dilation = m.dilation, groups = a.groups, bias = a.bias})
         end
         if a.depthwise then (new or m).nr_depthwise = true end
      elseif a.type == 'BatchNorm2d' or a.type == 'BatchNorm1d' then
         if m.num_features ~= a.num_features then
            new = nn[a.type](a.num_features, {eps = m.eps, momentum = m.momentum, affine = m.weight ~= nil})
         end
      elseif a.type == 'Linear' then
         if m.in_features ~= a.in_features or m.out_features ~= a.out_features then
            new = nn.Linear(a.in_features, a.out_features, {bias = a.bias})
         end
      end
      if new then
         on_device(new, dev)
         replace(m, new)
         n = n + 1
      else
         new = m
      end
      new.nr_gens = a.nr_gens
   end
   return n
end

return M

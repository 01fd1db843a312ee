-- nr.rejuvenate.monitor — liveliness masks and the utilization ratio r (paper 3.1.1-3.1.2).
--
-- What it is: per-unit masks from the BN scales (C: nr_bn_live_mask), fed forward through the
-- channel graph (graph.lua) to per-CS masks, and the live/all counts of parameters and
-- multiply-adds (FLOPs in the paper's sense). Also the exact cost of a *planned* architecture
-- (new widths per CS), which the reallocation policies solve against.
-- Rules (docs/NR.md):
--   * unit channel live iff |γ| >= rel·max|γ| of its layer (rel 0.01); a unit is dead as a whole
--     when max|γ| < abs_min (1e-3) or it has no live input channel; fixed units (nr_fixed) are
--     always live; a conv without a BN after it is live;
--   * a CS channel is live iff (OR over the units whose outputs are added into it) AND (every
--     depthwise conv that passes it through is live there). OR because a channel is physically
--     removable only if every summand is dead; AND because a depthwise channel without its
--     producer (or the producer's channel without its depthwise consumer) does nothing; except
--     where the depthwise conv's input is read elsewhere too (the other branch of a Residual or
--     Concat): there the producer's channel stays live for that reader whatever the depthwise's;
--   * conv cost = live_in·live_out·kh·kw (×oh·ow for FLOPs); depthwise cost = live·kh·kw
--     (linear, as MorphNet); grouped convs sum per group; a split NRConv2d sums its blocks;
--   * what counts is configurable: count = {conv = true, linear = false, bn = false, bias = false}
--     (default = the authors': conv weights only).
-- Invariants: the graph is cached (weakly) per model with a structural snapshot, so calling
-- this every step costs a few C calls and O(total channels) Lua work.
local ffi = require 'ffi'
local nrffi = require 'nr.ffi'
local T = require 'nr.tensor'
local graph = require 'nr.rejuvenate.graph'
local C = nrffi.C

local M = {}

local FNAME = 'nr.utilization'

M.DEFAULT_COUNT = {conv = true, linear = false, bn = false, bias = false}

local u8arr = ffi.typeof('uint8_t[?]')
local cr_layout = require('nr.nn.nr_conv').cr_layout

-- The graph of a model, cached in the model's transient scratch (never cloned or checkpointed)
-- with a structural snapshot and the input shape; rebuilt after surgery, flag changes or a device move.
-- fname: the public function that asked, named in the graph's errors.
function M.graph_of(model, input_shape, fname)
   local key = table.concat(input_shape, 'x')
   local scratch = model:transient()
   local cache = scratch.nr_graph
   if cache and cache.key == key and graph.unchanged(model, cache.snap) then return cache.g end
   local g = graph.build(model, input_shape, fname)
   scratch.nr_graph = {snap = graph.snapshot(model), key = key, g = g}
   return g
end
function M.invalidate(model) model:transient().nr_graph = nil end

-- Whether a conv adds a bias per output channel (an NRConv2d's sit on its blocks: spec.bias).
local function has_bias(m)
   return m.bias ~= nil or (m:typename() == 'NRConv2d' and m.spec.bias == true)
end

local function fill(a, n, v) ffi.fill(a, n, v) end

-- Own mask of a unit: a uint8 array (1 live) and its live count; nil mask = all live.
local function own_mask(u, opts)
   if u.fixed then return nil, u.conv.out_channels end
   local bn = u.bn
   local gamma = bn and bn.weight
   if not gamma then return nil, u.conv.out_channels end
   local c = gamma:numel()
   if not u._mask_t or u._mask_t:numel() ~= c or u._mask_t:device() ~= gamma:device() then
      u._mask_t = T.empty({c}, {dtype = 'uint8', device = gamma:device()})
      u._mask_h = gamma:is_cuda() and T.empty({c}, {dtype = 'uint8'}) or u._mask_t
   end
   local live_n = ffi.new('int64_t[1]') -- (out-parameters are fresh per call: see nr.tensor's double1)
   local st = C.nr_bn_live_mask(gamma.c, u._mask_t.c, opts.threshold, opts.abs_min, live_n)
   if st ~= 0 then require('nr.check').status(st, FNAME .. ' (' .. u.conv:where() .. ')') end
   if u._mask_h ~= u._mask_t then u._mask_h:copy(u._mask_t) end
   return u._mask_h:data(), tonumber(live_n[0])
end

local function count_range(a, from, n)
   local k = 0
   for i = from, from + n - 1 do k = k + a[i] end
   return k
end

-- Computes every mask. Returns state = {own = {[u] = arr|nil}, own_live = {[u] = n},
-- dead = {[u] = bool}, cs = {[root] = arr}, cs_live = {[root] = n}}.
function M.masks(g, opts)
   local own, own_live, dead = {}, {}, {}
   for _, u in ipairs(g.units) do
      own[u], own_live[u] = own_mask(u, opts)
      dead[u] = false
   end
   local csm, csl = {}, {}
   for _, r in ipairs(g.roots) do
      if not r._mask or r._mask_n ~= r.width then r._mask = u8arr(math.max(1, r.width)); r._mask_n = r.width end
      csm[r] = r._mask
   end
   for _ = 1, #g.units + 1 do
      for _, r in ipairs(g.roots) do
         local a, w = csm[r], r.width
         if r.fixed then
            fill(a, w, 1)
         else
            fill(a, w, 0)
            for _, u in ipairs(r.or_members) do
               if not dead[u] then
                  local o = own[u]
                  if o == nil then fill(a, w, 1); break end
                  for i = 0, w - 1 do if o[i] ~= 0 then a[i] = 1 end end
               end
            end
            for _, e in ipairs(r.and_members) do
               local d = e.unit
               if e.soft then -- luacheck: ignore 542 (its input is read elsewhere too: it removes nothing)
               elseif dead[d] then
                  fill(a, w, 0)
               elseif own[d] then
                  local o, off = own[d], e.offset
                  for i = 0, w - 1 do if o[off + i] == 0 then a[i] = 0 end end
               end
            end
         end
         csl[r] = count_range(a, 0, w)
      end
      local changed = false
      for _, u in ipairs(g.units) do
         if not u.fixed then
            local in_live = 0
            for _, s in ipairs(u.in_desc.segs) do in_live = in_live + csl[s.cs:root()] end
            local d = own_live[u] == 0 or in_live == 0
            if d ~= dead[u] then dead[u] = d; changed = true end
         end
      end
      if not changed then break end
   end
   return {own = own, own_live = own_live, dead = dead, cs = csm, cs_live = csl}
end

-- A copy of masks' state that owns its arrays: the masks are refilled in place by the next
-- masks() call on the graph (each set's r._mask, each unit's mask tensor), which a policy asking
-- nr.utilization in the middle of a rejuvenation makes (it then removed live channels).
function M.detach(st)
   local function copy(t) local o = {}; for k, v in pairs(t) do o[k] = v end; return o end
   local own, cs = {}, {}
   for u, a in pairs(st.own) do
      local n = u.bn.weight:numel()
      own[u] = u8arr(n)
      ffi.copy(own[u], a, n)
   end
   for r, a in pairs(st.cs) do
      local n = math.max(1, r.width)
      cs[r] = u8arr(n)
      ffi.copy(cs[r], a, n)
   end
   return {own = own, own_live = copy(st.own_live), dead = copy(st.dead), cs = cs, cs_live = copy(st.cs_live)}
end

-- Concatenated mask of a descriptor (Lua table of 0/1, 0-based positions) — used for blocks.
local function desc_mask(desc, st)
   local out, p = {}, 0
   for _, s in ipairs(desc.segs) do
      local r = s.cs:root()
      local a = st.cs[r]
      for i = 0, r.width - 1 do out[p] = a[i]; p = p + 1 end
   end
   return out, p
end
M.desc_mask = desc_mask

local function desc_live(desc, st)
   local n = 0
   for _, s in ipairs(desc.segs) do n = n + st.cs_live[s.cs:root()] end
   return n
end

-- Live/all weight counts of one unit (per sample for FLOPs: multiply by oh·ow outside).
local function unit_weights(u, st)
   local m = u.conv
   local k = u.kh * u.kw
   local dead = st.dead[u]
   if u.kind == 'dw' then
      local live = 0
      for _, s in ipairs(u.out_segs) do live = live + st.cs_live[s.cs:root()] end
      return dead and 0 or live * k, m.out_channels * k, live
   end
   local out_live = st.cs_live[u.out:root()]
   if u.split then
      local inm = desc_mask(u.in_desc, st)
      local outm = st.cs[u.out:root()]
      local live, all = 0, 0
      for _, b in ipairs(m.blocks) do
         local li = 0
         for _, p in ipairs(b.in_idx) do li = li + inm[p] end
         local lo = count_range(outm, b.out_first, b.out_n)
         live = live + li * lo * k
         all = all + #b.in_idx * b.out_n * k
      end
      return dead and 0 or live, all, out_live
   end
   if u.kind == 'group' then
      local inm = desc_mask(u.in_desc, st)
      local outm = st.cs[u.out:root()]
      local G = u.groups
      local ci, co = m.in_channels / G, m.out_channels / G
      local live = 0
      for gi = 0, G - 1 do
         local li = 0
         for p = gi * ci, gi * ci + ci - 1 do li = li + inm[p] end
         live = live + li * count_range(outm, gi * co, co)
      end
      return dead and 0 or live * k, m.in_channels / G * m.out_channels * k, out_live
   end
   local in_live = desc_live(u.in_desc, st)
   return dead and 0 or in_live * out_live * k, m.in_channels * m.out_channels * k, out_live
end

local function merged_count(count)
   local c = {}
   for k, v in pairs(M.DEFAULT_COUNT) do c[k] = v end
   for k, v in pairs(count or {}) do
      assert(M.DEFAULT_COUNT[k] ~= nil, FNAME .. ': unknown count key ' .. tostring(k) .. ' (conv, linear, bn, bias)')
      c[k] = v
   end
   return c
end
M.merged_count = merged_count

-- The full report. opts: threshold (0.01), abs_min (1e-3), count (see above).
function M.report(g, opts)
   local count = merged_count(opts.count)
   local st = M.masks(g, opts)
   local res = {params_live = 0, params_all = 0, flops_live = 0, flops_all = 0, layers = {}}
   local function add(pl, pa, fl, fa)
      res.params_live = res.params_live + pl
      res.params_all = res.params_all + pa
      res.flops_live = res.flops_live + fl
      res.flops_all = res.flops_all + fa
   end
   for _, u in ipairs(g.units) do
      local live, all, out_live = unit_weights(u, st)
      local hw = u.oh * u.ow
      local pl, pa = 0, 0
      if count.conv then pl, pa = live, all end
      if count.bias and has_bias(u.conv) then
         pa = pa + u.conv.out_channels
         pl = pl + (st.dead[u] and 0 or out_live)
      end
      local fl, fa = (count.conv and live or 0) * hw, (count.conv and all or 0) * hw
      if count.bn and u.bn and u.bn.weight then
         pa = pa + 2 * u.bn.num_features
         pl = pl + (st.dead[u] and 0 or 2 * out_live)
      end
      add(pl, pa, fl, fa)
      res.layers[#res.layers + 1] = {
         name = u.conv:path(), kind = u.kind, fixed = u.fixed, dead = st.dead[u],
         width = u.conv.out_channels, live = st.dead[u] and 0 or out_live, own_live = st.own_live[u],
         in_width = u.conv.in_channels, in_live = desc_live(u.in_desc, st),
         params_live = pl, params_all = pa, flops_live = fl, flops_all = fa, split = u.split or nil,
      }
   end
   if count.linear then
      for _, l in ipairs(g.linears) do
         local m = l.module
         local li = desc_live(l.desc, st) * (l.desc.sf or 1)
         local pa, pl = m.in_features * m.out_features, li * m.out_features
         local fa, fl = pa, pl
         if count.bias and m.bias then pa = pa + m.out_features; pl = pl + m.out_features end
         add(pl, pa, fl, fa)
         res.layers[#res.layers + 1] = {name = m:path(), kind = 'linear', width = m.out_features,
            live = m.out_features, in_width = m.in_features, in_live = li,
            params_live = pl, params_all = pa, flops_live = fl, flops_all = fa}
      end
   end
   if count.bn then
      for _, cw in ipairs(g.chanwise) do
         local m = cw.module
         if m.weight then
            -- (a pinned one reads sets that keep every channel: all its features count as live)
            local n = cw.pinned and 2 * m.num_features or 2 * desc_live(cw.desc, st)
            add(n, 2 * m.num_features, 0, 0)
         end
      end
   end
   res.r_params = res.params_all > 0 and res.params_live / res.params_all or 1
   res.r_flops = res.flops_all > 0 and res.flops_live / res.flops_all or 1
   return res, st
end

-- ---- cost of a planned architecture ----------------------------------------------------------

-- Generation layout of a CS now: list of {gen, n} (from the producing convs), or nil for the
-- image / terminal sets (shared by every generation).
function M.cs_gens(r)
   if r.kind ~= 'unit' then return nil end
   for _, u in ipairs(r.or_members) do
      local gens = u.conv.nr_gens
      if gens then return gens end
   end
   return {{gen = 0, n = r.width}}
end

-- Per channel of a CS: the largest |γ| among its BNs (0-based positions), or nil without BNs.
function M.scores(r)
   local sc
   for _, u in ipairs(r.or_members) do
      if u.bn and u.bn.weight then
         local g = u.bn.weight:abs():totable()
         sc = sc or {}
         for i = 1, #g do sc[i - 1] = math.max(sc[i - 1] or 0, g[i]) end
      end
   end
   return sc
end

-- The stub channel a CS dead as a whole keeps (widths never reach 0): its best |γ| (the first
-- channel without BNs); returns the position and its generation.
function M.stub_of(r)
   local sc = M.scores(r)
   local best, bv = 0, -1
   for p = 0, r.width - 1 do
      local v = sc and sc[p] or 0
      if v > bv then best, bv = p, v end
   end
   local at, gen = 0, 0
   for _, x in ipairs(M.cs_gens(r) or {}) do
      if best >= at and best < at + x.n then gen = x.gen end
      at = at + x.n
   end
   return best, gen
end

-- Survivors per generation of a CS under its live mask: list of {gen, n, first, keep = {pos}}.
function M.survivors(r, st)
   local gens = M.cs_gens(r)
   if not gens then return nil end
   local a, out, p = st.cs[r], {}, 0
   for _, gg in ipairs(gens) do
      local keep = {}
      for i = p, p + gg.n - 1 do if a[i] ~= 0 then keep[#keep + 1] = i end end
      out[#out + 1] = {gen = gg.gen, n = #keep, keep = keep}
      p = p + gg.n
   end
   return out
end

-- The layout a resizable CS gets at width w (as surgery builds it and the cost function prices
-- it): the positions it keeps, in their order, and its generations [{gen, n}]. It keeps its
-- survivors (surv: M.survivors(r, st)); one stub channel when there are none; when w is below
-- their count, the w with the largest |γ| (sc: M.scores(r); ties: the first). The survivors
-- keep their generations (all 0 with merge), then w - #keep new channels of next_gen.
function M.layout(r, surv, sc, w, next_gen, merge)
   local keep, owner = {}, {}
   for _, x in ipairs(surv) do
      for _, p in ipairs(x.keep) do keep[#keep + 1] = p; owner[p] = x.gen end
   end
   if #keep == 0 then
      local best, gen = M.stub_of(r)
      keep = {best}
      owner[best] = gen
   end
   if w < #keep then
      local order = {}
      for i, p in ipairs(keep) do order[i] = p end
      table.sort(order, function(a, b)
         local x, y = sc and sc[a] or 0, sc and sc[b] or 0
         if x ~= y then return x > y end
         return a < b
      end)
      local chosen = {}
      for i = 1, w do chosen[order[i]] = true end
      local k2 = {}
      for _, p in ipairs(keep) do if chosen[p] then k2[#k2 + 1] = p end end
      keep = k2
   end
   local gens, last = {}, nil
   for _, p in ipairs(keep) do
      local gen = merge and 0 or owner[p]
      if last and last.gen == gen then last.n = last.n + 1
      else last = {gen = gen, n = 1}; gens[#gens + 1] = last end
   end
   if w > #keep then gens[#gens + 1] = {gen = next_gen, n = w - #keep} end
   return keep, gens
end

-- A cost function over planned widths: cost(widths) where widths[root] = new width of a
-- resizable root (one left out keeps its live channels, as surgery builds it; the others keep
-- theirs). scheme 'CR' counts only the blocks NRConv2d computes.
-- Returns fn(widths) -> params, flops.
function M.cost_fn(g, st, opts)
   local count = merged_count(opts.count)
   local scheme = opts.scheme or 'NR'
   local next_gen = opts.next_gen or 1
   local surv, sc = {}, {}
   for _, r in ipairs(g.roots) do
      surv[r] = M.survivors(r, st)
      sc[r] = surv[r] and M.scores(r)
   end
   -- planned generation layout of a root at width w, as surgery.plans lays it out
   local function plan_gens(r, w)
      if not surv[r] then return nil end
      local _, gens = M.layout(r, surv[r], sc[r], w, next_gen, opts.merge)
      return gens
   end
   -- the width surgery.plans gives a root the widths leave out: a resizable set keeps its live
   -- channels (one stub channel when none is live), the others keep all of theirs
   local function kept(r)
      if r.kind ~= 'unit' then return r.width end
      return math.max(1, st.cs_live[r])
   end
   return function(widths)
      local function W(r) return widths[r] or kept(r) end
      local params, flops = 0, 0
      local gens_cache = {}
      local function gens_of(r)
         local v = gens_cache[r]
         if v == nil then v = plan_gens(r, W(r)) or false; gens_cache[r] = v end
         return v or nil
      end
      for _, u in ipairs(g.units) do
         local m = u.conv
         local k = u.kh * u.kw
         local hw = u.oh * u.ow
         local in_w = 0
         for _, s in ipairs(u.in_desc.segs) do in_w = in_w + W(s.cs:root()) end
         local wts, out_w
         if u.kind == 'dw' then
            out_w = in_w
            wts = out_w * k
         else
            out_w = W(u.out:root())
            if u.kind == 'group' then
               wts = in_w * out_w * k / u.groups
            elseif scheme == 'CR' then
               local og = gens_of(u.out:root())
               local ig, shared = {}, false
               for _, s in ipairs(u.in_desc.segs) do
                  local gg = gens_of(s.cs:root())
                  if not gg then shared = true break end
                  for _, x in ipairs(gg) do ig[x.gen] = (ig[x.gen] or 0) + x.n end
               end
               if shared or not og then
                  wts = in_w * out_w * k
               else
                  -- the blocks NRConv2d will compute for these generations
                  local out_gens, in_groups = {}, {}
                  for j, x in ipairs(og) do out_gens[j] = x.gen end
                  for gen, n in pairs(ig) do in_groups[#in_groups + 1] = {gen = gen, n = n} end
                  table.sort(in_groups, function(a, b) return a.gen < b.gen end)
                  wts = 0
                  for _, l in ipairs(cr_layout(out_gens, in_groups)) do
                     wts = wts + og[l.out].n * (l.inp and in_groups[l.inp].n or in_w) * k
                  end
               end
            else
               wts = in_w * out_w * k
            end
         end
         if count.conv then params = params + wts; flops = flops + wts * hw end
         if count.bias and has_bias(m) then params = params + out_w end
         if count.bn and u.bn and u.bn.weight then params = params + 2 * out_w end
      end
      if count.linear then
         for _, l in ipairs(g.linears) do
            local in_w = 0
            for _, s in ipairs(l.desc.segs) do in_w = in_w + W(s.cs:root()) end
            local n = in_w * (l.desc.sf or 1) * l.module.out_features
            params = params + n + ((count.bias and l.module.bias) and l.module.out_features or 0)
            flops = flops + n
         end
      end
      if count.bn then
         for _, cw in ipairs(g.chanwise) do
            if cw.module.weight and cw.pinned then
               params = params + 2 * cw.module.num_features
            elseif cw.module.weight then
               for _, s in ipairs(cw.desc.segs) do params = params + 2 * W(s.cs:root()) end
            end
         end
      end
      return params, flops
   end
end

return M

-- nr.profile — wall-clock time per layer and per module type, forward and backward.
--
--   NR_PROFILE=1 nrlua train.lua        -- enabled when nr.profile is loaded; report printed at exit
--   NR_PROFILE=sync nrlua train.lua     -- on a GPU: each timed call waits for its kernels
--   local prof = require 'nr.profile'
--   prof.enable(); ...; prof.report(); prof.reset(); prof.disable()
--   prof.enable{sync = true}            -- GPU times per layer (see below)
--
-- How: enable() wraps nr.nn.Module.forward/backward (and the forward/backward that a class defines
-- itself, e.g. containers and CrossEntropyLoss) with a timer. A call stack separates inclusive time
-- (the module and everything below it) from self time (minus its children's timed calls), so a
-- leaf layer's self time is its kernels plus its Lua glue, and a container's self time is pure
-- overhead. Nothing in module.lua changes; disable() restores the original methods.
-- What it is not: a sampling profiler or a kernel profiler. CUDA kernels run asynchronously, so
-- by default GPU time lands where the stream synchronises; with sync = true every timed call
-- first waits for the GPU's queued work and waits again at its end (nr.cuda.synchronize), so
-- each layer's time includes its kernels, at the cost of the overlap a real run has (the total
-- is then an upper bound). Profiling allocates small Lua tables per call (not tensor storage),
-- and adds about a microsecond per module call (plus the waits with sync).
-- Invariants: times are seconds from CLOCK_MONOTONIC; layers are keyed by module object and
-- printed with their path in the model ("features.3 (Conv2d 64->128 3x3)").
local ffi = require 'ffi'

local M = {}

pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } nrprof_timespec;
int clock_gettime(int clk, nrprof_timespec *ts);
]])
local timespec = ffi.typeof('nrprof_timespec')
local function now()
   local tsbuf = timespec() -- (out-parameters are fresh per call: see nr.tensor's double1)
   ffi.C.clock_gettime(1, tsbuf) -- CLOCK_MONOTONIC
   return tonumber(tsbuf.tv_sec) + tonumber(tsbuf.tv_nsec) * 1e-9
end
M.now = now

-- Median of a list of timings (the list is not modified).
function M.median(xs)
   local s = {}
   for i, v in ipairs(xs) do s[i] = v end
   table.sort(s)
   local n = #s
   return n % 2 == 1 and s[(n + 1) / 2] or (s[n / 2] + s[n / 2 + 1]) / 2
end

-- [module] -> its record (weak: profiling does not keep dropped models alive); the records
-- themselves are kept in `records`, in first-forward order, so they outlive their modules.
local stats = setmetatable({}, {__mode = 'k'})
local records = {}
local stack = {}
local saved = nil -- {[cls] = {forward = f, backward = b}} while enabled
local gpu_wait = nil -- nr.cuda.synchronize while enabled with sync = true on a CUDA build

local function entry(m)
   local s = stats[m]
   if not s then
      local tn = m.typename and m:typename() or '?'
      local ok, where = pcall(function() return m:where() end)
      s = {fwd = 0, fwd_self = 0, bwd = 0, bwd_self = 0, nf = 0, nb = 0, container = m.modules ~= nil,
           type = m.modules and (tn .. ' (self)') or tn, where = ok and where or tn}
      stats[m] = s
      records[#records + 1] = s
   end
   return s
end

local function finish(ok, ...)
   if not ok then error((...), 0) end
   return ...
end

local function wrap(orig, phase)
   return function(self, ...)
      local top = stack[#stack]
      -- a class's backward that calls Module.backward on itself: time it once
      if top and top.mod == self and top.phase == phase then return orig(self, ...) end
      if gpu_wait then gpu_wait() end
      local fr = {mod = self, phase = phase, child = 0, t0 = now()}
      stack[#stack + 1] = fr
      local function done(ok, ...)
         if gpu_wait and ok then
            local okw, err = pcall(gpu_wait)
            if not okw then
               stack[#stack] = nil
               error(err, 0)
            end
         end
         local dt = now() - fr.t0
         stack[#stack] = nil
         if top then top.child = top.child + dt end
         local s = entry(self)
         if phase == 'f' then
            s.fwd, s.fwd_self, s.nf = s.fwd + dt, s.fwd_self + dt - fr.child, s.nf + 1
         else
            s.bwd, s.bwd_self, s.nb = s.bwd + dt, s.bwd_self + dt - fr.child, s.nb + 1
         end
         return finish(ok, ...)
      end
      return done(pcall(orig, self, ...))
   end
end

-- Wraps Module and every nr.nn class that defines its own forward/backward. opts.sync: on a GPU,
-- time each call's kernels too (waits before and after every timed call).
function M.enable(opts)
   if opts ~= nil or not saved then -- enable() again keeps the mode it is in
      local cuda = require 'nr.cuda'
      gpu_wait = opts and opts.sync and cuda.built() and cuda.available() and cuda.synchronize or nil
   end
   if saved then return M end
   local nn = require 'nr.nn'
   saved = {}
   local classes = {nn.Module}
   for _, cls in pairs(nn) do
      if type(cls) == 'table' and cls ~= nn.Module then classes[#classes + 1] = cls end
   end
   for _, cls in ipairs(classes) do
      -- a criterion's loss_tensor is its forward as nr.train calls it (the loss stays on the device)
      local f, b, lt = rawget(cls, 'forward'), rawget(cls, 'backward'), rawget(cls, 'loss_tensor')
      if f or b or lt then
         saved[cls] = {forward = f, backward = b, loss_tensor = lt}
         if f then cls.forward = wrap(f, 'f') end
         if b then cls.backward = wrap(b, 'b') end
         if lt then cls.loss_tensor = wrap(lt, 'f') end
      end
   end
   return M
end

function M.disable()
   if not saved then return M end
   for cls, fns in pairs(saved) do
      cls.forward, cls.backward, cls.loss_tensor = fns.forward, fns.backward, fns.loss_tensor
   end
   saved = nil
   gpu_wait = nil
   return M
end

function M.enabled() return saved ~= nil end
-- Whether timed calls wait for the GPU (enable{sync = true} with a GPU present).
function M.syncs() return gpu_wait ~= nil end

function M.reset()
   for k in pairs(stats) do stats[k] = nil end
   for i = #records, 1, -1 do records[i] = nil end
end

-- Returns {types = {{type, fwd, bwd, n}...}, layers = {{where, type, fwd, bwd, nf, nb}...},
-- total_fwd, total_bwd}: self times, layers in first-forward order, types by total time.
function M.data()
   local types, tlist, layers = {}, {}, {}
   local tf, tb = 0, 0
   for _, s in ipairs(records) do
      local t = types[s.type]
      if not t then
         t = {type = s.type, fwd = 0, bwd = 0, n = 0}
         types[s.type] = t
         tlist[#tlist + 1] = t
      end
      t.fwd, t.bwd, t.n = t.fwd + s.fwd_self, t.bwd + s.bwd_self, t.n + 1
      tf, tb = tf + s.fwd_self, tb + s.bwd_self
      layers[#layers + 1] = {where = s.where, type = s.type, fwd = s.fwd_self, bwd = s.bwd_self,
                             nf = s.nf, nb = s.nb, container = s.container}
   end
   table.sort(tlist, function(a, b) return a.fwd + a.bwd > b.fwd + b.bwd end)
   return {types = tlist, layers = layers, total_fwd = tf, total_bwd = tb}
end

-- Prints the tables (to io.stderr unless `out` is given); `max_layers` rows of layers (default 60).
function M.report(out, max_layers)
   out = out or io.stderr
   local d = M.data()
   local total = d.total_fwd + d.total_bwd
   if total == 0 then return end
   local function pct(x) return 100 * x / total end
   out:write(string.format('\n== nr.profile: forward %.1f ms, backward %.1f ms (self times, all calls)\n',
      d.total_fwd * 1e3, d.total_bwd * 1e3))
   out:write(string.format('%-28s %6s %10s %10s %6s\n', 'module type', 'count', 'fwd ms', 'bwd ms', '%'))
   for _, t in ipairs(d.types) do
      out:write(string.format('%-28s %6d %10.1f %10.1f %5.1f%%\n', t.type, t.n, t.fwd * 1e3, t.bwd * 1e3,
         pct(t.fwd + t.bwd)))
   end
   local rows = {}
   for _, l in ipairs(d.layers) do if not l.container then rows[#rows + 1] = l end end
   local sorted = {}
   for i, l in ipairs(rows) do sorted[i] = l end
   table.sort(sorted, function(a, b) return a.fwd + a.bwd > b.fwd + b.bwd end)
   max_layers = max_layers or 60
   out:write(string.format('\n%-56s %7s %9s %9s %6s   (top %d layers by time)\n', 'layer', 'calls', 'fwd ms',
      'bwd ms', '%', math.min(max_layers, #sorted)))
   for i = 1, math.min(max_layers, #sorted) do
      local l = sorted[i]
      out:write(string.format('%-56s %7d %9.2f %9.2f %5.1f%%\n', l.where:sub(1, 56), l.nf, l.fwd * 1e3,
         l.bwd * 1e3, pct(l.fwd + l.bwd)))
   end
   out:flush()
end

-- NR_PROFILE=1 (or sync): enable on load and print the report when the Lua state closes (nrlua exit).
local env = os.getenv('NR_PROFILE')
if env == '1' or env == 'sync' then
   M.enable({sync = env == 'sync'})
   local sentinel = newproxy(true)
   getmetatable(sentinel).__gc = function() pcall(M.report) end
   M._sentinel = sentinel
end

return M

-- nr — the nrlua package. `local nr = require 'nr'`.
-- Tensors and the runtime are loaded at once; larger parts (nn, optim, data, models, train,
-- rejuvenation) load on first use so a script pays only for what it touches.
local nrffi = require 'nr.ffi'
local T = require 'nr.tensor'
local check = require 'nr.check'
local C = nrffi.C

local nr = {}
nr.version = '0.1.0'
nr.Tensor = T.Tensor
nr.is_tensor = T.is_tensor
for _, k in ipairs({'tensor', 'empty', 'empty_like', 'zeros', 'ones', 'full', 'randn', 'rand', 'randint', 'randperm', 'arange', 'load',
                   'cat', 'stack'}) do
   nr[k] = T[k]
end

-- Threads: NR_THREADS (read by nr.ffi when the library loads) or all cores, until set here.
-- n = 0: all cores; at most nrffi.MAX_THREADS.
local MAX_THREADS = nrffi.MAX_THREADS
function nr.set_num_threads(n)
   check.int32(n, 'nr.set_num_threads', 'n', 0, MAX_THREADS)
   C.nr_set_num_threads(n)
end
function nr.get_num_threads() return C.nr_get_num_threads() end

-- Seeds the global generator (weights, dropout, shuffling, augmentation all draw from it). C takes
-- a uint64; Lua numbers are exact integers up to 2^53, the bound here.
function nr.manual_seed(seed)
   check.int(seed, 'nr.manual_seed', 'seed', 0, 2 ^ 53)
   C.nr_rng_seed(seed)
end

-- {cpu = {in_use, peak, allocations}, cuda = {...}} in bytes.
-- Gradient mode, as PyTorch's torch.no_grad: nr.no_grad(fn, ...) runs fn with gradients off
-- (inference forwards may fold Conv2d + BatchNorm2d + ReLU into one pass; backward is refused)
-- and returns its results; nr.set_grad_enabled(bool) returns the previous mode.
function nr.set_grad_enabled(on) return require('nr.nn.module').set_grad_enabled(on) end
function nr.is_grad_enabled() return require('nr.nn.module').is_grad_enabled() end
function nr.no_grad(fn, ...)
   -- else "attempt to call a table value", no name; a callable (a module: nr.no_grad(model, x)) is fine
   local mt = type(fn) ~= 'function' and getmetatable(fn)
   check.arg(type(fn) == 'function' or type(mt) == 'table' and mt.__call ~= nil, 'nr.no_grad',
      'fn must be a function (or callable), got %s', type(fn))
   local prev = nr.set_grad_enabled(false)
   local res = {pcall(fn, ...)}
   nr.set_grad_enabled(prev)
   if not res[1] then error(res[2], 0) end
   return unpack(res, 2, table.maxn(res))
end

function nr.memory()
   local out = {}
   for name, dev in pairs({cpu = C.NR_CPU, cuda = C.NR_CUDA}) do
      out[name] = {in_use = tonumber(C.nr_memory_in_use(dev)), peak = tonumber(C.nr_memory_peak(dev)),
                   allocations = tonumber(C.nr_memory_alloc_count(dev))}
   end
   return out
end

-- Lazily loaded namespaces: nr.nn, nr.optim, nr.data, nr.models, ...
local LAZY = {
   nn = 'nr.nn', optim = 'nr.optim', schedule = 'nr.schedule', data = 'nr.data',
   models = 'nr.models', cuda = 'nr.cuda', checkpoint = 'nr.checkpoint', report = 'nr.report',
   recipe = 'nr.recipe', rejuvenation = 'nr.rejuvenate', dist = 'nr.dist', profile = 'nr.profile',
}
-- Functions re-exported from lazily loaded modules.
local LAZY_FN = {
   train = {'nr.train', 'train'},
   count = {'nr.count', 'count'},
   utilization = {'nr.rejuvenate', 'utilization'},
   rejuvenate = {'nr.rejuvenate', 'rejuvenate'},
}

-- their names, for the REPL's completion (nr.cli)
local lazy_names = {}
for k in pairs(LAZY) do lazy_names[#lazy_names + 1] = k end
for k in pairs(LAZY_FN) do lazy_names[#lazy_names + 1] = k end
table.sort(lazy_names)

setmetatable(nr, {
   lazy_names = lazy_names,
   __index = function(t, k)
      if LAZY[k] then
         local v = require(LAZY[k])
         rawset(t, k, v)
         return v
      elseif LAZY_FN[k] then
         local mod, fn = LAZY_FN[k][1], LAZY_FN[k][2]
         local v = require(mod)[fn]
         rawset(t, k, v)
         return v
      end
      return nil
   end,
})

-- NR_PROFILE=1: time per module type and layer, printed at exit (lua/nr/profile.lua).
if os.getenv('NR_PROFILE') == '1' or os.getenv('NR_PROFILE') == 'sync' then require('nr.profile') end

return nr

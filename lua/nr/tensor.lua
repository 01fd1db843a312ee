-- nr.tensor — the Tensor class: a Lua handle around a C nr_tensor (core/nr.h).
--
-- What it is: constructors (nr.tensor, nr.zeros, ...), views (reshape, narrow, select,
-- transpose), copies, arithmetic, reductions, matmul, index_select/index_copy, .npy I/O.
-- Memory formats (as PyTorch's): 'contiguous' (row-major, NCHW for images) and, for 4-d
-- tensors, 'channels_last' (NHWC in memory, still indexed (N, C, H, W)). nr.empty/zeros/...
-- take {memory_format = ...}; clone, to, and elementwise results keep a channels-last input's.
-- Invariants: tensor memory lives in C and is released by ffi.gc when the handle is collected or
-- at once by t:free(); positions and dimensions are 1-based here (as in Lua and Torch7) and
-- converted to 0-based at the C boundary; a freed tensor raises an error when used.
local nrffi = require 'nr.ffi'
local check = require 'nr.check'
local ffi, C = nrffi.ffi, nrffi.C

local Tensor = {}
Tensor.__index = Tensor
-- t[i] is not element access here (LuaJIT tables): said, instead of a nil that fails later
setmetatable(Tensor, {__index = function(_, k)
   if type(k) == 'number' then
      error(string.format('Tensor: t[%s] is not indexing; use t:get(i) (a value, 1-based), t:select(1, i) (a slice) or '
         .. 't:narrow(dim, start, n)', tostring(k)), check.user_level(2))
   end
end})
Tensor.__typename = 'nr.Tensor'

local DTYPES = {float32 = C.NR_F32, f32 = C.NR_F32, float = C.NR_F32,
                int64 = C.NR_I64, long = C.NR_I64, i64 = C.NR_I64,
                uint8 = C.NR_U8, byte = C.NR_U8, u8 = C.NR_U8,
                bfloat16 = C.NR_BF16, bf16 = C.NR_BF16}
local DTYPE_NAMES = {[0] = 'float32', [1] = 'int64', [2] = 'uint8', [3] = 'bfloat16'}
local DEVICE_NAMES = {[0] = 'cpu', [1] = 'cuda'}
local CTYPE_PTR = {[0] = ffi.typeof('float *'), [1] = ffi.typeof('int64_t *'), [2] = ffi.typeof('uint8_t *'),
                   [3] = ffi.typeof('uint16_t *')} -- bfloat16: raw bits
local int64_arr = ffi.typeof('int64_t[8]')

local function free_c(p) C.nr_tensor_free(p) end

-- Wraps a fresh nr_tensor* (owned) into a Tensor.
local function wrap(p)
   return setmetatable({c = ffi.gc(p, free_c)}, Tensor)
end
Tensor._wrap = wrap

local function is_tensor(x) return getmetatable(x) == Tensor end
Tensor.is_tensor = is_tensor

-- 'cpu' | 'cuda' | 'cuda:N' -> the device, and for 'cuda:N' the GPU index (nil: the current GPU,
-- nr.cuda.set_device).
local function parse_device(dev, fname)
   if dev == nil or dev == 'cpu' then return C.NR_CPU end
   if dev == 'cuda' or (type(dev) == 'string' and dev:match('^cuda:%d+$')) then
      if C.nr_has_cuda() == 0 then error(fname .. ': this nrlua was built without CUDA', check.user_level(3)) end
      local idx = dev:match('^cuda:(%d+)$')
      return C.NR_CUDA, idx and tonumber(idx) or nil
   end
   error(string.format('%s: unknown device %q (use "cpu", "cuda" or "cuda:N")', fname, tostring(dev)), check.user_level(3))
end

-- make() with GPU idx as the current device (a tensor asked for on 'cuda:N'), the caller's back after.
local function on_gpu(idx, fname, make)
   local prev = idx and tonumber(C.nr_cuda_current_device())
   if idx == nil or idx == prev then return make() end
   check.status(C.nr_cuda_set_device(idx), string.format('%s (device cuda:%d)', fname, idx), 4)
   local ok, r = pcall(make)
   C.nr_cuda_set_device(prev)
   if not ok then error(r, 0) end
   return r
end

local function parse_dtype(dt, fname)
   if dt == nil then return C.NR_F32 end
   local v = DTYPES[dt]
   if not v then error(string.format('%s: unknown dtype %q (float32, int64, uint8, bfloat16)', fname, tostring(dt)), check.user_level(3)) end
   return v
end

-- The most elements C allocates (nr_tensor_new): a larger size is refused here, by name, rather than
-- as the int64 LuaJIT made of it.
local MAX_NUMEL = 2 ^ 40

-- Errors are raised at the level of the constructor's caller (shape_of <- new <- nr.empty <- user).
-- A number stored into an integer dtype must lie in its range, as PyTorch checks scalars ("value
-- cannot be converted to type uint8 without overflow"): C's float -> integer cast is undefined
-- outside it, and NaN/inf have no integer at all. Inside, a fraction truncates toward zero as in
-- PyTorch. Tensor-to-tensor conversions (copy, to) are not checked, as in PyTorch.
local INT_RANGE = {[C.NR_I64] = {-2 ^ 63, 2 ^ 63 - 1024}, -- the largest double below 2^63
                   [C.NR_U8] = {0, 255}}
-- level: as error() counts it from here (3: the caller of the function calling this).
local function check_scalar(dtype, v, fname, what, level)
   local r = INT_RANGE[dtype]
   if r and not (v >= r[1] and v <= r[2]) then
      error(string.format('%s: %s %s cannot be converted to type %s without overflow', fname, what, tostring(v),
         DTYPE_NAMES[dtype]), check.user_level(level))
   end
end

local function shape_of(shape, fname)
   if type(shape) == 'number' then shape = {shape} end
   if type(shape) ~= 'table' then error(fname .. ': shape must be a table of sizes, got ' .. type(shape), check.user_level(4)) end
   local n = table.maxn(shape) -- not #shape or ipairs: {2, nil, 3} is an error, not the shape {2}
   if n > 8 then error(fname .. ': at most 8 dimensions, got ' .. n, check.user_level(4)) end
   local arr = int64_arr()
   for i = 1, n do arr[i - 1] = check.int(shape[i], fname, 'size ' .. i, 0, MAX_NUMEL, 4) end
   return arr, n
end

local function parse_format(fmt, ndim, fname)
   if fmt == nil or fmt == 'contiguous' then return 'contiguous' end
   if fmt ~= 'channels_last' then
      error(string.format('%s: unknown memory_format %q (contiguous, channels_last)', fname, tostring(fmt)), check.user_level(4))
   end
   if ndim ~= 4 then error(string.format('%s: channels_last needs a 4-d (N, C, H, W) shape, got %d-d', fname, ndim), check.user_level(4)) end
   return fmt
end

-- Tensor memory lives in C, where LuaJIT's collector does not see it: a loop that drops a large
-- tensor per iteration grows a small Lua heap only, and the collector may not run before the
-- machine's memory is gone. So, as Go's GOGC = 100: a full collection once the bytes allocated
-- since the last one exceed what was in use after it (at least GC_MIN_BYTES); and an allocation
-- that fails for lack of memory collects twice (finalizers of the first may free more), empties
-- the GPU cache and retries once. Steady-state training allocates nothing, so none of this runs.
local GC_MIN_BYTES = 256 * 2 ^ 20
local gc = {since = 0, live = 0}
local function in_use() return tonumber(C.nr_memory_in_use(C.NR_CPU)) + tonumber(C.nr_memory_in_use(C.NR_CUDA)) end
local function allocate(dt, dev, n, arr)
   local bytes = tonumber(C.nr_dtype_size(dt))
   for i = 0, n - 1 do bytes = bytes * tonumber(arr[i]) end
   gc.since = gc.since + bytes
   if gc.since > math.max(GC_MIN_BYTES, gc.live) then
      collectgarbage('collect')
      gc.since, gc.live = 0, in_use()
   end
   local p = C.nr_tensor_new(dt, dev, n, arr)
   if p == nil and C.nr_last_status() == C.NR_E_OOM then
      collectgarbage('collect')
      collectgarbage('collect')
      if dev == C.NR_CUDA then C.nr_cuda_empty_cache() end
      gc.since, gc.live = 0, in_use()
      p = C.nr_tensor_new(dt, dev, n, arr)
   end
   return p
end

local function new(shape, opts, fname)
   fname = fname or 'nr.empty'
   opts = check.options(opts, {dtype = true, device = true, memory_format = true}, fname)
   local arr, n = shape_of(shape, fname)
   local dt = parse_dtype(opts.dtype, fname)
   local dev, idx = parse_device(opts.device, fname)
   if idx then
      local here = {dtype = opts.dtype, device = 'cuda', memory_format = opts.memory_format}
      return on_gpu(idx, fname, function() return new(shape, here, fname) end)
   end
   if parse_format(opts.memory_format, n, fname) == 'contiguous' then
      return wrap(check.pointer(allocate(dt, dev, n, arr), fname, 3))
   end
   -- channels_last: an (N, H, W, C) block viewed as (N, C, H, W)
   local nn, c, h, w = arr[0], arr[1], arr[2], arr[3]
   local block = int64_arr()
   block[0], block[1], block[2], block[3] = nn, h, w, c
   local base = wrap(check.pointer(allocate(dt, dev, 4, block), fname, 3))
   local stride = int64_arr()
   stride[0], stride[1], stride[2], stride[3] = h * w * c, 1, w * c, c
   local p = C.nr_tensor_view(base.c, 4, arr, stride, 0)
   return wrap(check.pointer(p, fname, 3))
end

-- ---- constructors ------------------------------------------------------------------------

local M = {Tensor = Tensor, is_tensor = is_tensor}
local fill -- fill(t, v, fname), with Tensor:fill below

function M.empty(shape, opts)
   local t = new(shape, opts, 'nr.empty') -- not a tail call: error levels count this frame
   return t
end
function M.zeros(shape, opts) local t = new(shape, opts, 'nr.zeros'); return t:fill(0) end
function M.ones(shape, opts) local t = new(shape, opts, 'nr.ones'); return t:fill(1) end
function M.full(shape, value, opts)
   local t = new(shape, opts, 'nr.full')
   fill(t, value, 'nr.full')
   return t
end
function M.randn(shape, opts)
   local t = new(shape, opts, 'nr.randn')
   check.status(C.nr_rng_normal(t.c, 0, 1), 'nr.randn')
   return t
end
function M.rand(shape, opts)
   local t = new(shape, opts, 'nr.rand')
   check.status(C.nr_rng_uniform(t.c, 0, 1), 'nr.rand')
   return t
end
-- Integers in [lo, hi): lo and hi are integers with every value in the dtype's range (uint8: 0 <= lo <
-- hi <= 256; int64: |lo|, |hi| <= 2^53, where Lua numbers hold every integer bound exactly).
-- Floating dtypes get integer values as in PyTorch: drawn as int64, then converted; their
-- range is where every integer is exact (2^24 for float32, 2^8 for bfloat16), so no draw rounds
-- out of [lo, hi).
local RANDINT_RANGE = {int64 = {-2 ^ 53, 2 ^ 53}, uint8 = {0, 256}, float32 = {-2 ^ 24, 2 ^ 24},
                       bfloat16 = {-2 ^ 8, 2 ^ 8}}
function M.randint(lo, hi, shape, opts)
   opts = check.options(opts, {dtype = true, device = true}, 'nr.randint')
   local dt = DTYPE_NAMES[parse_dtype(opts.dtype or 'int64', 'nr.randint')]
   local r = RANDINT_RANGE[dt]
   check.int(lo, 'nr.randint', 'lo', r[1], r[2] - 1)
   check.int(hi, 'nr.randint', 'hi', lo + 1, r[2])
   local draw = dt == 'uint8' and dt or 'int64'
   local t = new(shape, {dtype = draw, device = opts.device}, 'nr.randint')
   check.status(C.nr_rng_uniform(t.c, lo, hi), 'nr.randint')
   if draw == dt then return t end
   local out = new(shape, {dtype = dt, device = opts.device}, 'nr.randint')
   out:copy(t)
   t:free()
   return out
end
function M.randperm(n)
   check.int(n, 'nr.randperm', 'n', 0, MAX_NUMEL)
   local t = new({n}, {dtype = 'int64'}, 'nr.randperm')
   check.status(C.nr_rng_permutation(t.c), 'nr.randperm')
   return t
end
function M.arange(n, opts)
   check.int(n, 'nr.arange', 'n', 0, MAX_NUMEL)
   local t = new({n}, opts, 'nr.arange')
   for i = 0, n - 1 do C.nr_tensor_set(t.c, i, i) end
   return t
end

-- nr.tensor(values, opts): values is a number or a (nested) table of numbers.
function M.tensor(values, opts)
   opts = check.options(opts, {dtype = true, device = true}, 'nr.tensor')
   if type(values) == 'number' then
      local t = new({}, opts, 'nr.tensor')
      fill(t, values, 'nr.tensor')
      return t
   end
   check.arg(type(values) == 'table', 'nr.tensor', 'values must be a number or a table, got %s', type(values))
   check.arg(not M.is_tensor(values), 'nr.tensor', 'values is a tensor already (t:clone() copies it, t:to(dtype or '
      .. 'device) converts it)')
   local shape, v = {}, values
   while type(v) == 'table' do
      shape[#shape + 1] = #v
      v = v[1]
   end
   local flat = {}
   local function walk(x, d)
      if d > #shape then
         if type(x) ~= 'number' then error('nr.tensor: non-number element ' .. tostring(x), check.user_level(4)) end
         flat[#flat + 1] = x
         return
      end
      if type(x) ~= 'table' or #x ~= shape[d] then
         error(string.format('nr.tensor: ragged nested table at depth %d (expected %d elements)', d, shape[d]), check.user_level(4))
      end
      for i = 1, #x do walk(x[i], d + 1) end
   end
   walk(values, 1)
   local host = new(shape, {dtype = opts.dtype}, 'nr.tensor')
   if host:dtype() == 'bfloat16' then
      -- the data pointer holds raw bf16 bits: write float32 and round (nearest even), exactly as
      -- nr.tensor(values):bfloat16() does
      local f = new(shape, nil, 'nr.tensor')
      local q = f:data()
      for i = 1, #flat do q[i - 1] = flat[i] end
      host:copy(f)
      f:free()
   else
      local p, dt = host:data(), host.c.dtype
      for i = 1, #flat do
         check_scalar(dt, flat[i], 'nr.tensor', 'element ' .. i .. ' =', 3)
         p[i - 1] = flat[i]
      end
   end
   if opts.device and opts.device ~= 'cpu' then return host:to(opts.device) end
   return host
end

function M.load(path)
   check.type(path, 'string', 'nr.load', 'path')
   return wrap(check.pointer(C.nr_npy_load(path), 'nr.load', 3))
end

-- ---- properties --------------------------------------------------------------------------

-- t's C tensor. A non-tensor is an error naming the function and argument (fname, arg: for
-- arguments other than self; a number or nil reached rawget or the FFI before). level: as error()
-- counts it from here (default 3: the caller of the method calling live).
local function live(t, fname, arg, level)
   if getmetatable(t) ~= Tensor then
      error(string.format('%s: expected a tensor for %s, got %s', fname or 'nr.Tensor', arg or 'self', type(t)), check.user_level(level or 3))
   end
   local c = rawget(t, 'c')
   if c == nil then error('nr.Tensor: use of a freed tensor', check.user_level(level or 3)) end
   return c
end

-- Positions and dimensions must be integers: 1.5 is an error naming the argument, never floored
-- (PyTorch refuses float indices too). Raises at the level of the method's caller.
-- level: the error's level as error() counts it from here (3: the caller's caller, the user of a
-- Tensor method that calls int_arg directly).
local function int_arg(v, fname, what, level)
   check.int(v, fname, what, nil, nil, level or 3) -- finite, |v| <= 2^53: C takes it as an int64
end

-- A dimension of an ndim-dimensional tensor, 1-based, or counted from the end when negative
-- (-1 the last, as PyTorch and Tensor:size): returns it 1-based, or raises naming fname.
local function dim_arg(d, ndim, fname, what)
   check.int(d, fname, what or 'dimension', nil, nil, 3)
   local k = d < 0 and ndim + 1 + d or d
   if k < 1 or k > ndim then
      error(string.format('%s: %s %s out of range 1..%d (or -%d..-1)', fname, what or 'dimension', tostring(d), ndim, ndim),
         check.user_level(3))
   end
   return k
end

function Tensor:dim() return live(self).ndim end
function Tensor:shape()
   local c, s = live(self), {}
   for i = 0, c.ndim - 1 do s[i + 1] = tonumber(c.shape[i]) end
   return s
end
function Tensor:size(d)
   local c = live(self)
   if d == nil then return self:shape() end
   return tonumber(c.shape[dim_arg(d, c.ndim, 'Tensor:size') - 1])
end
function Tensor:stride()
   local c, s = live(self), {}
   for i = 0, c.ndim - 1 do s[i + 1] = tonumber(c.stride[i]) end
   return s
end
function Tensor:numel() return tonumber(C.nr_tensor_numel(live(self))) end
function Tensor:dtype() return DTYPE_NAMES[live(self).dtype] end
-- 'cpu', or 'cuda:N' for a tensor on GPU N (as str(t.device) in PyTorch); t:is_cuda() asks the kind.
function Tensor:device()
   local c = live(self)
   if c.device == C.NR_CUDA then return 'cuda:' .. tonumber(c.device_index) end
   return DEVICE_NAMES[c.device]
end
-- The GPU index of a CUDA tensor (0 on the CPU).
function Tensor:device_index() return tonumber(live(self).device_index) end
-- Whether a 4-d view has exactly the strides of a channels-last tensor of its shape (the ones
-- nr.empty{memory_format = 'channels_last'} gives, size-1 dimensions included: so a
-- channels-last (N, 1, H, W) batch stays tagged although its elements are in row-major order).
local function exact_channels_last(c)
   if c.ndim ~= 4 then return false end
   local ch, w = c.shape[1], c.shape[3]
   return c.stride[1] == 1 and c.stride[3] == ch and c.stride[2] == w * ch and c.stride[0] == c.shape[2] * w * ch
end

-- is_contiguous() (row-major) or is_contiguous('channels_last') (NHWC element order; sizes of 1
-- ignored, so an (N, C, 1, 1) tensor is both).
function Tensor:is_contiguous(memory_format)
   if memory_format == 'channels_last' then return C.nr_tensor_is_channels_last(live(self)) == 1 end
   parse_format(memory_format, 0, 'Tensor:is_contiguous')
   return C.nr_tensor_is_contiguous(live(self)) == 1
end
-- 'channels_last' (4-d with channels-last strides), 'contiguous' or 'strided': the format the
-- layers keep on CUDA (PyTorch's suggest_memory_format).
function Tensor:memory_format()
   local c = live(self)
   if exact_channels_last(c) then return 'channels_last' end
   if C.nr_tensor_is_contiguous(c) == 1 then return 'contiguous' end
   if C.nr_tensor_is_channels_last(c) == 1 then return 'channels_last' end
   return 'strided'
end
function Tensor:is_cuda() return live(self).device == C.NR_CUDA end
-- Raw pointer to element 0 (CPU tensors; typed by dtype, bf16 as uint16_t bits). The pointer
-- keeps its tensor alive while it is reachable (nr.ones({n}):data() held alone was freed by the
-- next collection, and reading it crashed); :free() still frees the memory. Reading a float NaN
-- through it can give a non-number in LuaJIT (NaN payloads are its type tags): read values with
-- get/totable, which canonicalise NaN.
local ANCHOR = setmetatable({}, {__mode = 'k'}) -- pointer cdata -> its tensor
function Tensor:data()
   local c = live(self)
   check.arg(c.device == C.NR_CPU, 'Tensor:data', 'tensor is on %s; call :cpu() first', self:device())
   local p = ffi.cast(CTYPE_PTR[c.dtype], c.data)
   ANCHOR[p] = self
   return p
end
function Tensor:same_storage(other)
   return C.nr_tensor_same_storage(live(self), live(other, 'Tensor:same_storage', 'other')) == 1
end

function Tensor:free()
   local c = rawget(self, 'c')
   if c ~= nil then
      ffi.gc(c, nil)
      C.nr_tensor_free(c)
      self.c = nil
   end
end

-- Human description, as used in error messages: "float32 cpu [8 x 3 x 32 x 32]".
function Tensor:describe()
   local c = rawget(self, 'c')
   if c == nil then return 'freed tensor' end
   local cl = self:memory_format() == 'channels_last' and ' channels_last' or ''
   return string.format('%s %s [%s]%s', DTYPE_NAMES[c.dtype], self:device(), table.concat(self:shape(), ' x '), cl)
end

-- ---- element access ----------------------------------------------------------------------

-- Values come from C as doubles with any NaN canonical (nr_tensor_get): read straight from a
-- float/bf16 pointer, a NaN with some payloads becomes a non-number in LuaJIT (see core/tensor.c),
-- so everything here (get, item, totable, reductions, printing) reads through it.
-- Out-parameters are fresh per call (never one buffer shared by every call): LuaJIT may fuse the
-- load of a returned value into the instruction that uses it, after a later call has rewritten
-- the buffer (Debian's 2.1.0-beta3 did: in a hot loop, a:get(i) == b:get(i) compared b's value
-- with itself, and an accuracy loop built on it reported 99.98% for 81.86%).
local double1 = ffi.typeof('double[1]')
-- Flat (row-major) element i, 1-based.
-- The 0-based row-major position of t's element at the 1-based indices idx[1..n], n >= 2 (get and
-- set handle one flat position themselves): one index per dimension (t:get(i, j) as t[i][j] in
-- Torch7); any other count is an error (extra indices were silently ignored).
local function position(t, fname, idx, n)
   local c = live(t)
   if n ~= c.ndim then
      error(string.format('%s: give one flat position or one index per dimension (%d), got %d indices', fname, c.ndim, n), check.user_level(3))
   end
   local pos = 0
   for d = 1, n do
      local k, size = idx[d], tonumber(c.shape[d - 1])
      int_arg(k, fname, 'index ' .. d, 4)
      if k < 1 or k > size then
         error(string.format('%s: index %d is %d, outside 1..%d of dimension %d', fname, d, k, size, d), check.user_level(3))
      end
      pos = pos * size + (k - 1)
   end
   return pos
end

-- The 0-based position of flat 1-based position i (row-major), checked against t's elements.
local function flat_position(t, fname, i)
   int_arg(i, fname, 'position', 4)
   local n = tonumber(C.nr_tensor_numel(live(t)))
   if i < 1 or i > n then
      error(string.format('%s: position %d is outside 1..%d (%d elements)', fname, i, n, n), check.user_level(3))
   end
   return i - 1
end

-- t:get(pos) (1-based flat position, row-major) or t:get(i, j, ...) (one index per dimension).
function Tensor:get(i, ...)
   local p
   if select('#', ...) == 0 then -- the common case, without a table
      p = flat_position(self, 'Tensor:get', i)
   else
      p = position(self, 'Tensor:get', {i, ...}, select('#', ...) + 1)
   end
   local v = double1()
   check.status(C.nr_tensor_get(live(self), p, v), 'Tensor:get')
   return v[0]
end
-- t:set(pos, v) or t:set(i, j, ..., v): the value is the last argument.
function Tensor:set(i, v, ...)
   local p
   if select('#', ...) == 0 then
      p = flat_position(self, 'Tensor:set', i)
   else
      local args = {i, v, ...}
      local n = select('#', ...) + 2 -- a trailing nil value counts: it is not taken for an index
      v = args[n]
      args[n] = nil
      p = position(self, 'Tensor:set', args, n - 1)
   end
   if type(v) == 'cdata' then v = tonumber(v) end -- an int64 read through the FFI, say
   check.arg(type(v) == 'number', 'Tensor:set', 'the value (the last argument) must be a number, got %s', type(v))
   check_scalar(live(self).dtype, v, 'Tensor:set', 'value', 3)
   check.status(C.nr_tensor_set(live(self), p, v), 'Tensor:set')
   return self
end
-- The single value of a one-element tensor.
function Tensor:item()
   check.arg(self:numel() == 1, 'Tensor:item', 'tensor has %d elements, not 1', self:numel())
   return self:get(1)
end

function Tensor:totable()
   local t = self:is_cuda() and self:cpu() or self
   local shape, n = t:shape(), t:numel()
   local vals, dbl = {}, double1() -- (each value is stored before the next call rewrites it)
   for i = 1, n do
      C.nr_tensor_get(t.c, i - 1, dbl)
      vals[i] = dbl[0]
   end
   if #shape == 0 then return vals[1] end
   local pos = 0
   local function build(d)
      local out = {}
      for i = 1, shape[d] do
         if d == #shape then
            pos = pos + 1
            out[i] = vals[pos]
         else
            out[i] = build(d + 1)
         end
      end
      return out
   end
   return build(1)
end

-- ---- copies and views --------------------------------------------------------------------

-- self <- src, converting dtypes. As in PyTorch's copy_/to, float -> integer conversions are not
-- range-checked (scalars are: fill, set, nr.tensor): NaN, inf and out-of-range values give whatever
-- C's cast gives, so check src:all_finite() and its range first where it matters.
function Tensor:copy(src)
   check.arg(is_tensor(src), 'Tensor:copy', 'source must be a tensor')
   check.status(C.nr_tensor_copy(live(self), live(src)), 'Tensor:copy')
   return self
end
-- t <- v everywhere; fname names the caller in errors (nr.full, nr.tensor), raised at its caller.
function fill(t, v, fname)
   if type(v) ~= 'number' then error(string.format('%s: value must be a number, got %s', fname, type(v)), check.user_level(3)) end
   check_scalar(live(t).dtype, v, fname, 'value', 4)
   check.status(C.nr_tensor_fill(live(t), v), fname, 4)
end
function Tensor:fill(v)
   fill(self, v, 'Tensor:fill')
   return self
end
function Tensor:zero() return self:fill(0) end

-- A new tensor of t's shape, dtype and device (opts.dtype / opts.device override) in t's memory
-- format when that is channels_last, else contiguous.
function M.empty_like(t, opts)
   live(t, 'nr.empty_like', 't')
   opts = check.options(opts, {dtype = true, device = true}, 'nr.empty_like')
   return M.empty(t:shape(), {dtype = opts.dtype or t:dtype(), device = opts.device or t:device(),
                              memory_format = t:memory_format() == 'channels_last' and 'channels_last' or nil})
end
function Tensor:clone()
   return M.empty_like(self):copy(self)
end
-- contiguous() (row-major) or contiguous('channels_last'): self when already so, a view with
-- the exact channels-last strides when the element order is already right, else a copy.
function Tensor:contiguous(memory_format)
   local fmt = parse_format(memory_format, memory_format and self:dim() or 0, 'Tensor:contiguous')
   if fmt == 'channels_last' and exact_channels_last(live(self)) then return self end
   if self:is_contiguous(fmt) then
      if fmt == 'contiguous' then return self end
      local shape = self:shape()
      return self:as_strided(shape, M.channels_last_stride(shape))
   end
   return M.empty(self:shape(), {dtype = self:dtype(), device = self:device(), memory_format = fmt}):copy(self)
end
-- to('cuda') puts the tensor on the current GPU (nr.cuda.set_device), to('cuda:N') on GPU N, as
-- PyTorch; t:to(t:device(), dtype) converts in place of residence. Already there: t itself.
function Tensor:to(device, dtype)
   local dev, idx = parse_device(device, 'Tensor:to')
   local c = live(self)
   local dt = dtype and parse_dtype(dtype, 'Tensor:to') or c.dtype
   if dev == C.NR_CUDA and idx == nil then idx = tonumber(C.nr_cuda_current_device()) end
   if dev == c.device and dt == c.dtype and (dev ~= C.NR_CUDA or idx == c.device_index) then return self end
   local target = dev == C.NR_CUDA and ('cuda:' .. idx) or DEVICE_NAMES[dev]
   return M.empty_like(self, {dtype = DTYPE_NAMES[dt], device = target}):copy(self)
end
function Tensor:cuda() return self:to('cuda') end
function Tensor:cpu() return self:to('cpu') end
function Tensor:float() return self:to(self:device(), 'float32') end

-- True when no element is NaN or ±inf (the sum of |x| is finite; bf16 on the CPU is summed as
-- f32). Integer tensors are always finite.
function Tensor:all_finite()
   local dt = self:dtype()
   if self:numel() == 0 or (dt ~= 'float32' and dt ~= 'bfloat16') then return true end
   local t = (dt == 'bfloat16' and self:device() == 'cpu') and self:float() or self
   local s = t:abs():sum()
   return type(s) == 'number' and s == s and s < math.huge
end
function Tensor:long() return self:to(self:device(), 'int64') end
-- bfloat16 copy (round to nearest even): the activation dtype of mixed precision on CUDA.
function Tensor:bfloat16() return self:to(self:device(), 'bfloat16') end
function Tensor:byte() return self:to(self:device(), 'uint8') end

-- Callers keep their frame (no tail call) so that level 3 / 4 below is their caller.
local function make_view(self, shape, stride, offset, fname)
   -- before the arrays: a 9th entry would be written past them into LuaJIT's heap
   if #shape > 8 then error(fname .. ': at most 8 dimensions, got ' .. #shape, check.user_level(3)) end
   local sa = int64_arr()
   local st = int64_arr()
   for i = 1, #shape do sa[i - 1] = shape[i]; st[i - 1] = stride[i] end
   local p = C.nr_tensor_view(live(self), #shape, sa, st, offset)
   return wrap(check.pointer(p, fname, 4))
end

-- The sizes of reshape/view (d1, d2, ... or {d1, d2, ...}; one may be -1), checked against
-- self's number of elements. Errors are raised at the level of the method's caller.
local function target_shape(self, fname, ...)
   local shape, count = {...}, select('#', ...)
   if count == 1 and type(shape[1]) == 'table' then
      count = table.maxn(shape[1])
      shape = {unpack(shape[1], 1, count)}
   end
   local n, infer, known = self:numel(), nil, 1
   for i = 1, count do -- not ipairs: a nil size is an error, not the end of the list
      local s = shape[i]
      if s == -1 then
         if infer then error(fname .. ': only one size may be -1', check.user_level(3)) end
         infer = i
      else
         known = known * check.int(s, fname, 'size ' .. i, 0, MAX_NUMEL, 3)
      end
   end
   if infer then
      if not (known > 0 and n % known == 0) then
         error(string.format('%s: cannot infer -1 for %d elements into {%s}', fname, n, table.concat(shape, ', ')), check.user_level(3))
      end
      shape[infer] = n / known
      known = n
   end
   if known ~= n then
      error(string.format('%s: cannot reshape %s (%d elements) to {%s}', fname, self:describe(), n, table.concat(shape, ', ')), check.user_level(3))
   end
   return shape
end

-- Strides that view old (shape, stride) as new shape without moving data, or nil when no view
-- exists (PyTorch's computeStride): each run of old dimensions that is contiguous within itself
-- (a "chunk") may be split or merged, but no new dimension may span two chunks.
local function view_strides(oshape, ostride, nshape, numel)
   local nstride = {}
   if #oshape == 0 then
      for i = 1, #nshape do nstride[i] = 1 end
      return nstride
   end
   if numel == 0 then -- no element: any strides do; contiguous ones
      local acc = 1
      for i = #nshape, 1, -1 do nstride[i] = acc; acc = acc * math.max(nshape[i], 1) end
      return nstride
   end
   local view_d = #nshape
   local chunk_base = ostride[#oshape]
   local tensor_numel, view_numel = 1, 1
   for d = #oshape, 1, -1 do
      tensor_numel = tensor_numel * oshape[d]
      if d == 1 or (oshape[d - 1] ~= 1 and ostride[d - 1] ~= tensor_numel * chunk_base) then
         while view_d >= 1 and (view_numel < tensor_numel or nshape[view_d] == 1) do
            nstride[view_d] = view_numel * chunk_base
            view_numel = view_numel * nshape[view_d]
            view_d = view_d - 1
         end
         if view_numel ~= tensor_numel then return nil end
         if d > 1 then
            chunk_base = ostride[d - 1]
            tensor_numel, view_numel = 1, 1
         end
      end
   end
   if view_d ~= 0 then return nil end
   return nstride
end

-- view(d1, d2, ...) or view{d1, d2, ...}: the same memory seen with another shape, so writes
-- through it reach self; one size may be -1. An error (as PyTorch's) when self's strides do not
-- allow it (a transpose flattened, a narrowed row merged with the next): use reshape, which
-- copies then.
function Tensor:view(...)
   local shape = target_shape(self, 'Tensor:view', ...)
   local oshape, ostride = self:shape(), self:stride()
   local stride = view_strides(oshape, ostride, shape, self:numel())
   if not stride then
      error(string.format("Tensor:view: view size is not compatible with input tensor's size and stride (at least one " ..
         "dimension spans across two contiguous subspaces): cannot view %s (strides {%s}) as {%s}; use :reshape(...) " ..
         "instead (it copies when no view exists)", self:describe(), table.concat(ostride, ', '), table.concat(shape, ', ')), check.user_level(2))
   end
   local v = make_view(self, shape, stride, tonumber(live(self).offset), 'Tensor:view')
   return v
end

-- reshape(d1, d2, ...) or reshape{d1, d2, ...}; one size may be -1. A view when the strides
-- allow one (as view(); writes through it reach self), else a contiguous copy reshaped, as
-- PyTorch's reshape; view() never copies.
function Tensor:reshape(...)
   local shape = target_shape(self, 'Tensor:reshape', ...)
   local stride = view_strides(self:shape(), self:stride(), shape, self:numel())
   local src = self
   if not stride then
      src = self:contiguous()
      stride = {}
      local acc = 1
      for i = #shape, 1, -1 do stride[i] = acc; acc = acc * shape[i] end
   end
   local v = make_view(src, shape, stride, tonumber(live(src).offset), 'Tensor:reshape')
   return v
end

-- narrow(dim, start, length): positions 1-based.
function Tensor:narrow(dim, start, len)
   local shape, stride = self:shape(), self:stride()
   dim = dim_arg(dim, #shape, 'Tensor:narrow')
   int_arg(start, 'Tensor:narrow', 'start')
   int_arg(len, 'Tensor:narrow', 'length')
   check.arg(type(start) == 'number' and type(len) == 'number' and start >= 1 and len >= 0 and start + len - 1 <= shape[dim],
      'Tensor:narrow', 'range start %s length %s outside 1..%d of dimension %d', tostring(start), tostring(len), shape[dim], dim)
   local offset = tonumber(live(self).offset) + (start - 1) * stride[dim]
   shape[dim] = len
   local v = make_view(self, shape, stride, offset, 'Tensor:narrow')
   return v
end

-- select(dim, index): removes dim.
function Tensor:select(dim, index)
   local shape, stride = self:shape(), self:stride()
   dim = dim_arg(dim, #shape, 'Tensor:select')
   int_arg(index, 'Tensor:select', 'index')
   check.arg(type(index) == 'number' and index >= 1 and index <= shape[dim], 'Tensor:select', 'index %s outside 1..%d', tostring(index), shape[dim])
   local offset = tonumber(live(self).offset) + (index - 1) * stride[dim]
   table.remove(shape, dim)
   table.remove(stride, dim)
   local v = make_view(self, shape, stride, offset, 'Tensor:select')
   return v
end

function Tensor:transpose(d1, d2)
   local shape, stride = self:shape(), self:stride()
   d1 = dim_arg(d1, #shape, 'Tensor:transpose', 'dimension 1')
   d2 = dim_arg(d2, #shape, 'Tensor:transpose', 'dimension 2')
   shape[d1], shape[d2] = shape[d2], shape[d1]
   stride[d1], stride[d2] = stride[d2], stride[d1]
   local v = make_view(self, shape, stride, tonumber(live(self).offset), 'Tensor:transpose')
   return v
end
-- A view of self's storage with the given shape and strides (elements) starting at element
-- offset of the storage (default: self's offset); the C side checks it stays inside.
function Tensor:as_strided(shape, stride, offset)
   check.arg(type(shape) == 'table' and type(stride) == 'table' and #shape == #stride, 'Tensor:as_strided',
      'shape and stride must be tables of one length')
   for i = 1, #shape do
      int_arg(shape[i], 'Tensor:as_strided', 'size ' .. i)
      int_arg(stride[i], 'Tensor:as_strided', 'stride ' .. i)
   end
   if offset ~= nil then int_arg(offset, 'Tensor:as_strided', 'offset') end
   local v = make_view(self, shape, stride, offset or tonumber(live(self).offset), 'Tensor:as_strided')
   return v
end
-- The strides of a channels-last (N, C, H, W) tensor of this shape.
function M.channels_last_stride(shape)
   local c, h, w = shape[2], shape[3], shape[4]
   return {h * w * c, 1, w * c, c}
end

function Tensor:t()
   check.arg(self:dim() == 2, 'Tensor:t', 'expected a 2-d tensor, got %s', self:describe())
   return self:transpose(1, 2)
end

-- unsqueeze(dim): a view with a dimension of size 1 inserted at dim (1..ndim + 1, or from the
-- end: -1 appends), as PyTorch's.
function Tensor:unsqueeze(dim)
   local shape, stride = self:shape(), self:stride()
   local d = dim_arg(dim, #shape + 1, 'Tensor:unsqueeze')
   table.insert(shape, d, 1)
   table.insert(stride, d, d <= #stride and stride[d] * shape[d + 1] or 1)
   local v = make_view(self, shape, stride, tonumber(live(self).offset), 'Tensor:unsqueeze')
   return v
end

-- squeeze([dim]): a view without dimension dim when its size is 1 (unchanged otherwise, as
-- PyTorch), or without every size-1 dimension.
function Tensor:squeeze(dim)
   local shape, stride = self:shape(), self:stride()
   local keep = {}
   if dim ~= nil then
      local d = dim_arg(dim, math.max(#shape, 1), 'Tensor:squeeze')   -- (a 0-d tensor takes 1 or -1)
      for i = 1, #shape do keep[i] = i ~= d or shape[i] ~= 1 end
   else
      for i = 1, #shape do keep[i] = shape[i] ~= 1 end
   end
   local ns, nst = {}, {}
   for i = 1, #shape do
      if keep[i] then ns[#ns + 1], nst[#nst + 1] = shape[i], stride[i] end
   end
   local v = make_view(self, ns, nst, tonumber(live(self).offset), 'Tensor:squeeze')
   return v
end

-- The numbers of f(a, b, ...) or f({a, b, ...}) as one list.
local function list_of(...)
   if select('#', ...) == 1 and type((...)) == 'table' then return (...) end
   return {...}
end

-- permute(d1, d2, ...) or permute({d1, ...}): a view with the dimensions in that order (each
-- once; negative ones from the end).
function Tensor:permute(...)
   local dims = list_of(...)
   local shape, stride = self:shape(), self:stride()
   check.arg(#dims == #shape, 'Tensor:permute', 'expected %d dimensions (one per dimension of %s), got %d', #shape,
      self:describe(), #dims)
   local seen, ns, nst = {}, {}, {}
   for i = 1, #dims do
      local d = dim_arg(dims[i], #shape, 'Tensor:permute')
      check.arg(not seen[d], 'Tensor:permute', 'dimension %d is given twice', d)
      seen[d] = true
      ns[i], nst[i] = shape[d], stride[d]
   end
   local v = make_view(self, ns, nst, tonumber(live(self).offset), 'Tensor:permute')
   return v
end

-- expand(sizes) or expand(s1, s2, ...): a view repeating size-1 dimensions (stride 0) to the
-- sizes given, new ones in front; -1 keeps a size (PyTorch's expand). Read-only use: a write
-- through it is refused (its elements share memory).
function Tensor:expand(...)
   local sizes = list_of(...)
   local shape, stride = self:shape(), self:stride()
   check.arg(#sizes >= #shape, 'Tensor:expand', 'expected at least %d sizes for %s, got %d', #shape, self:describe(), #sizes)
   local ns, nst, lead = {}, {}, #sizes - #shape
   for i = 1, #sizes do
      local want, j = sizes[i], i - lead
      check.int(want, 'Tensor:expand', 'size ' .. i, -1, MAX_NUMEL, 3)
      if j < 1 then
         check.arg(want >= 0, 'Tensor:expand', 'size %d is -1, but the dimension is new (no size to keep)', i)
         ns[i], nst[i] = want, 0
      elseif want == -1 or want == shape[j] then
         ns[i], nst[i] = shape[j], stride[j]
      else
         check.arg(shape[j] == 1, 'Tensor:expand', 'cannot expand dimension %d of %s (size %d) to %d: only size-1 '
            .. 'dimensions expand', j, self:describe(), shape[j], want)
         ns[i], nst[i] = want, 0
      end
   end
   local v = make_view(self, ns, nst, tonumber(live(self).offset), 'Tensor:expand')
   return v
end

-- index_select(dim, index) along dim (1-based dim; index holds 0-based positions, int64).
local function as_index(index, fname)
   if type(index) == 'table' and not is_tensor(index) then
      for i = 1, #index do
         if type(index[i]) ~= 'number' or index[i] ~= math.floor(index[i]) then
            error(string.format('%s: index %d must be an integer position, got %s', fname, i, tostring(index[i])), check.user_level(3))
         end
      end
      return M.tensor(index, {dtype = 'int64'})
   end
   check.arg(is_tensor(index) and index:dtype() == 'int64', fname, 'index must be an int64 tensor or a table of 0-based positions')
   return index
end
-- self's rows index[i] along dim, into out (contiguous, or channels-last like self) or a new tensor.
function Tensor:index_select(dim, index, out)
   index = as_index(index, 'Tensor:index_select')
   local shape = self:shape()
   dim = dim_arg(dim, #shape, 'Tensor:index_select')
   shape[dim] = index:numel()
   if out ~= nil then live(out, 'Tensor:index_select', 'out') end
   -- a channels-last tensor gives a channels-last result (the rows are gathered in that order)
   local fmt = self:memory_format() == 'channels_last' and 'channels_last' or nil
   out = out or M.empty(shape, {dtype = self:dtype(), device = self:device(), memory_format = fmt})
   check.status(C.nr_tensor_index_select(live(self:contiguous(fmt)), dim - 1, live(index), live(out)), 'Tensor:index_select')
   return out
end
-- self[index[i]] <- src[i] along dim (in place); self contiguous or channels-last.
function Tensor:index_copy(dim, index, src)
   index = as_index(index, 'Tensor:index_copy')
   dim = dim_arg(dim, self:dim(), 'Tensor:index_copy')
   local fmt = self:memory_format()
   check.arg(fmt == 'contiguous' or fmt == 'channels_last', 'Tensor:index_copy', 'destination must be contiguous or channels-last')
   fmt = fmt == 'channels_last' and fmt or nil
   live(src, 'Tensor:index_copy', 'src')
   check.status(C.nr_tensor_index_copy(live(self), dim - 1, live(index), live(src:contiguous(fmt))), 'Tensor:index_copy')
   return self
end

-- A non-empty list of tensors without holes (a nil entry, an unassigned variable, ended ipairs
-- there: the tensors after it were dropped without a word).
local function tensor_list(list, fname)
   check.arg(type(list) == 'table' and not is_tensor(list) and #list > 0, fname, 'expected a non-empty list of tensors, got %s',
      check.show(list))
   local n = table.maxn(list)
   for i = 1, n do
      check.arg(list[i] ~= nil, fname, 'entry %d is nil (an unassigned variable?); %d entries were given', i, n)
   end
end

-- nr.cat(tensors, dim): the tensors joined along dim (default 1; their other sizes, dtype and
-- device equal) into a new one, as torch.cat.
function M.cat(list, dim)
   tensor_list(list, 'nr.cat')
   local first = list[1]
   live(first, 'nr.cat', 'tensor 1')
   local shape = first:shape()
   local d = dim_arg(dim or 1, #shape, 'nr.cat')
   local total = 0
   for i, t in ipairs(list) do
      live(t, 'nr.cat', 'tensor ' .. i)
      local s = t:shape()
      local fits = #s == #shape and t:dtype() == first:dtype() and t:device() == first:device()
      for k = 1, #shape do fits = fits and (k == d or s[k] == shape[k]) end
      check.arg(fits, 'nr.cat', 'tensor %d is %s, which does not join %s along dimension %d (other sizes, dtype and '
         .. 'device must match)', i, t:describe(), first:describe(), d)
      total = total + s[d]
   end
   shape[d] = total
   local out = M.empty(shape, {dtype = first:dtype(), device = first:device()})
   local at = 1
   for _, t in ipairs(list) do
      local n = t:size(d)
      if n > 0 then out:narrow(d, at, n):copy(t) end
      at = at + n
   end
   return out
end

-- nr.stack(tensors, dim): the tensors (one shape) stacked along a new dimension dim (default 1,
-- up to ndim + 1), as torch.stack.
function M.stack(list, dim)
   tensor_list(list, 'nr.stack')
   live(list[1], 'nr.stack', 'tensor 1')
   local shape = list[1]:shape()
   local d = dim_arg(dim or 1, #shape + 1, 'nr.stack')
   local up = {}
   for i, t in ipairs(list) do
      live(t, 'nr.stack', 'tensor ' .. i)
      check.arg(M.same_shape(t:shape(), shape), 'nr.stack', 'tensor %d is %s, the first %s: stacked tensors have one shape',
         i, t:describe(), list[1]:describe())
      up[i] = t:unsqueeze(d)
   end
   local out = M.cat(up, d)
   return out
end

-- ---- arithmetic --------------------------------------------------------------------------

-- PyTorch's broadcasting for a op b (tensors): sizes align from the last dimension, a missing
-- or size-1 one takes the other's. Returns a and b as the kernel takes them (b with a's number
-- of dimensions, its size-1 ones broadcast by C; a expanded when the result is larger than a)
-- and the result's shape when it is not a's (nil otherwise).
local function broadcast_operands(a, b, fname)
   if not is_tensor(b) or not is_tensor(a) then return a, b, nil end
   -- the common case, one rank and a not growing, without tables (C checks b against a)
   local ca, cb = live(a), live(b, fname, 'operand')
   if ca.ndim == cb.ndim then
      local plain = true   -- b's sizes are a's or 1: the kernel takes them as they are
      for d = 0, ca.ndim - 1 do plain = plain and (cb.shape[d] == ca.shape[d] or cb.shape[d] == 1) end
      if plain then return a, b, nil end
   end
   local sa, sb = a:shape(), b:shape()
   local n = math.max(#sa, #sb)
   local out, grows = {}, false
   for i = 1, n do
      local x, y = sa[#sa - n + i] or 1, sb[#sb - n + i] or 1
      if x ~= y and x ~= 1 and y ~= 1 then
         error(string.format('%s: shapes (%s) and (%s) do not broadcast: sizes %d and %d meet at dimension %d of the '
            .. 'result (aligned from the last)', fname, table.concat(sa, ', '), table.concat(sb, ', '), x, y, i), check.user_level(3))
      end
      out[i] = x == 1 and y or x
      grows = grows or out[i] ~= (sa[#sa - n + i] or -1)
   end
   if #sb < n then   -- b with a's rank: leading size-1 dimensions
      local bs, bst, st = {}, {}, b:stride()
      for _ = 1, n - #sb do bs[#bs + 1], bst[#bst + 1] = 1, 0 end
      for i = 1, #sb do bs[#bs + 1], bst[#bst + 1] = sb[i], st[i] end
      b = b:as_strided(bs, bst)
   end
   if not grows then return a, b, nil end
   return a:expand(out), b, out
end

local BIN = {add = C.NR_OP_ADD, sub = C.NR_OP_SUB, mul = C.NR_OP_MUL, div = C.NR_OP_DIV,
             maximum = C.NR_OP_MAX, minimum = C.NR_OP_MIN}
for name, op in pairs(BIN) do
   local fname = 'Tensor:' .. name
   local function apply(a, b, out)
      if type(b) == 'number' then
         check.status(C.nr_binary_scalar(live(a), b, live(out), op), fname, 4)
      else
         -- (raised at the caller of Tensor:add and its twins, as the status below)
         if not is_tensor(b) then error(fname .. ': operand must be a number or a tensor, got ' .. check.show(b), check.user_level(3)) end
         check.status(C.nr_binary(live(a), live(b), live(out), op), fname, 4)
      end
      return out
   end
   -- a:add(b [, out]): into out when given (as torch.add(a, b, out=out)), else a new tensor
   -- (not tail calls: apply's errors are raised 4 levels up, the caller of these). Shapes
   -- broadcast as PyTorch's (broadcast_operands).
   Tensor[name] = function(a, b, out)
      if out ~= nil then live(out, fname, 'out') end
      local shape
      local a0 = a
      a, b, shape = broadcast_operands(a, b, fname)
      if out ~= nil then
         local want = shape or a0:shape()
         if not M.same_shape(out:shape(), want) then
            error(string.format('%s: out is %s, the result has shape (%s)', fname, out:describe(), table.concat(want, ', ')),
               check.user_level(2))
         end
      end
      local r = apply(a, b, out or (shape and M.empty(shape, {dtype = a:dtype(), device = a:device()}) or M.empty_like(a)))
      return r
   end
   Tensor[name .. '_'] = function(a, b)
      local a2, b2, shape = broadcast_operands(a, b, fname .. '_')
      if shape then
         error(string.format('%s_: in place, the result must keep the shape of %s, but %s broadcasts it to (%s)', fname,
            a:describe(), b:describe(), table.concat(shape, ', ')), check.user_level(2))
      end
      local r = apply(a2, b2, a)
      return r
   end
end
-- Operands of an arithmetic operator: a tensor and a tensor or a number (a string, table or nil
-- failed as "attempt to call method 'add'").
local function operand(v, op)
   if not (is_tensor(v) or type(v) == 'number') then
      error(string.format('Tensor %s: operands must be tensors or numbers, got %s', op, check.show(v)), check.user_level(4))
   end
end
local function operands(a, b, op)
   operand(a, op)
   operand(b, op)
end
Tensor.__add = function(a, b)
   operands(a, b, '+')
   if type(a) == 'number' then return b:add(a) end
   return a:add(b)
end
Tensor.__sub = function(a, b)
   operands(a, b, '-')
   if type(a) == 'number' then return b:neg():add(a) end
   return a:sub(b)
end
Tensor.__mul = function(a, b)
   operands(a, b, '*')
   if type(a) == 'number' then return b:mul(a) end
   return a:mul(b)
end
Tensor.__div = function(a, b)
   operands(a, b, '/')
   check.arg(type(a) ~= 'number', 'Tensor:__div', 'number / tensor is not supported')
   return a:div(b)
end

local UN = {neg = C.NR_OP_NEG, abs = C.NR_OP_ABS, exp = C.NR_OP_EXP, log = C.NR_OP_LOG,
            sqrt = C.NR_OP_SQRT, sign = C.NR_OP_SIGN, relu = C.NR_OP_RELU,
            sigmoid = C.NR_OP_SIGMOID, tanh = C.NR_OP_TANH, square = C.NR_OP_SQUARE}
for name, op in pairs(UN) do
   local fname = 'Tensor:' .. name
   Tensor[name] = function(a)
      local out = M.empty_like(a)
      check.status(C.nr_unary(live(a), live(out), op), fname)
      return out
   end
   Tensor[name .. '_'] = function(a)
      check.status(C.nr_unary(live(a), live(a), op), fname)
      return a
   end
end
Tensor.__unm = function(a) return a:neg() end

-- self <- self + alpha * x
function Tensor:axpy_(alpha, x)
   check.type(alpha, 'number', 'Tensor:axpy_', 'alpha')
   check.status(C.nr_axpy(live(x, 'Tensor:axpy_', 'x'), live(self), alpha), 'Tensor:axpy_')
   return self
end

-- Reductions: t:sum() -> number; t:sum(dim [, keepdim]) -> tensor with dim kept as size 1, or
-- removed with keepdim = false (t's dtype; bf16 sums accumulate in f32 and round the result, as
-- PyTorch); dim may count from the end (-1).
-- The result shape of a reduction over dim: dim kept as size 1 (keepdim nil or true, Torch7's
-- way and nrlua's default) or removed (keepdim = false, PyTorch's default).
local function kept_shape(shape, dim, keepdim, fname)
   if keepdim ~= nil and type(keepdim) ~= 'boolean' then
      error(string.format('%s: keepdim must be true or false, got %s', fname, check.show(keepdim)), check.user_level(3))
   end
   local out = {}
   for i, n in ipairs(shape) do
      if i ~= dim then out[#out + 1] = n elseif keepdim ~= false then out[#out + 1] = 1 end
   end
   return out
end
-- The result of a reduction of a over dim (1-based, or from the end) as a new tensor of dtype:
-- run(x, dim0, out) fills out, a view of it with dim kept as size 1, from x (a, or a 0-d a as
-- one element: dimension 1 or -1 then, and a 0-d result, as PyTorch).
local function over_dim(a, dim, keepdim, fname, dtype, run)
   local shape = a:shape()
   if #shape == 0 then
      dim_arg(dim, 1, fname)
      kept_shape({1}, 1, keepdim, fname)
      a, dim, keepdim, shape = a:view({1}), 1, false, {1}
   end
   dim = dim_arg(dim, #shape, fname)
   local out = M.empty(kept_shape(shape, dim, keepdim, fname), {device = a:device(), dtype = dtype})
   shape[dim] = 1
   run(a, dim - 1, keepdim == false and out:view(shape) or out)
   return out
end
local RED = {sum = C.NR_RED_SUM, mean = C.NR_RED_MEAN, max = C.NR_RED_MAX, min = C.NR_RED_MIN}
for name, op in pairs(RED) do
   local fname = 'Tensor:' .. name
   Tensor[name] = function(a, dim, keepdim)
      if dim == nil then
         check.arg(keepdim == nil, fname, 'keepdim needs a dimension')
         local out = M.empty({}, {device = a:device(), dtype = a:dtype()})
         check.status(C.nr_reduce(live(a), -1, live(out), op), fname)
         return out:item()
      end
      local out = over_dim(a, dim, keepdim, fname, a:dtype(), function(x, d0, o)
         check.status(C.nr_reduce(live(x), d0, live(o), op), fname)
      end)
      return out
   end
end
-- argmax(dim [, keepdim]) -> int64 tensor (dim kept, size 1, unless keepdim = false), 0-based
-- positions; argmax() -> 0-based number.
function Tensor:argmax(dim, keepdim)
   -- on the host; bf16 as f32 (exact, so the same positions)
   local a = (self:is_cuda() or self:dtype() == 'bfloat16') and self:to('cpu', 'float32') or self
   if dim == nil then
      local out = M.empty({}, {dtype = 'int64'})
      check.status(C.nr_argmax(live(a), -1, live(out)), 'Tensor:argmax')
      return out:item()
   end
   local out = over_dim(a, dim, keepdim, 'Tensor:argmax', 'int64', function(x, d0, o)
      check.status(C.nr_argmax(live(x), d0, live(o)), 'Tensor:argmax')
   end)
   return out
end

-- matmul(b [, opts]) for 2-d tensors; opts: trans_a, trans_b, out, alpha, beta:
-- out <- alpha * op(self) op(b) + beta * out. beta ~= 0 needs opts.out (PyTorch's addmm takes the
-- matrix to accumulate as an argument): a new out holds whatever memory it was given.
local MATMUL_OPTS = {trans_a = true, trans_b = true, out = true, alpha = true, beta = true}
function Tensor:matmul(b, opts)
   opts = check.options(opts, MATMUL_OPTS, 'Tensor:matmul')
   live(b, 'Tensor:matmul', 'b')
   if opts.out ~= nil then live(opts.out, 'Tensor:matmul', 'opts.out') end
   for _, k in ipairs({'alpha', 'beta'}) do
      if opts[k] ~= nil then check.type(opts[k], 'number', 'Tensor:matmul', 'opts.' .. k) end
   end
   check.arg((opts.beta or 0) == 0 or opts.out ~= nil, 'Tensor:matmul', 'beta %s needs opts.out (the matrix to accumulate into)',
      tostring(opts.beta))
   for _, o in ipairs({{'a', self}, {'b', b}}) do
      if o[2]:dim() ~= 2 then
         error(string.format('Tensor:matmul: %s must be a matrix (2-d), got %s%s', o[1], o[2]:describe(),
            o[2]:dim() == 1 and ' (a vector: reshape it to (n, 1) or (1, n))' or ''), check.user_level(2))
      end
   end
   local ta, tb = opts.trans_a and 1 or 0, opts.trans_b and 1 or 0
   -- operands in a layout BLAS does not take (a transposed view, overlapping or reversed rows)
   -- are read through a contiguous copy, as PyTorch does; out must be one (it is written)
   local function blas_ready(t)
      if t:dim() ~= 2 or t:numel() == 0 then return true end   -- nr_matmul names a wrong rank
      local st = t:stride()
      return (t:size(2) <= 1 or st[2] == 1) and (t:size(1) <= 1 or (st[1] >= math.max(1, t:size(2)) and st[1] < 2 ^ 31))
   end
   local a = self
   if not blas_ready(a) then a = a:contiguous() end
   if not blas_ready(b) then b = b:contiguous() end
   local m = ta == 1 and self:size(2) or self:size(1)
   local n = tb == 1 and b:size(1) or b:size(2)
   -- a bf16 operand makes a bf16 product (mixed precision, CUDA), else f32
   local half = self:dtype() == 'bfloat16' or b:dtype() == 'bfloat16'
   local out = opts.out or M.empty({m, n}, {device = self:device(), dtype = half and 'bfloat16' or 'float32'})
   check.status(C.nr_matmul(live(a), live(b), live(out), ta, tb, opts.alpha or 1, opts.beta or 0), 'Tensor:matmul')
   return out
end

function Tensor:save(path)
   check.type(path, 'string', 'Tensor:save', 'path')
   check.status(C.nr_npy_save(live(self), path), 'Tensor:save')
   return self
end

-- Equality of shapes (tables).
function M.same_shape(a, b)
   if #a ~= #b then return false end
   for i = 1, #a do if a[i] ~= b[i] then return false end end
   return true
end

-- ---- printing ----------------------------------------------------------------------------

local function fmt(v)
   if v == math.floor(v) and math.abs(v) < 1e15 then return string.format('%d', v) end
   return string.format('%.4g', v)
end

function Tensor:__tostring()
   local c = rawget(self, 'c')
   if c == nil then return 'nr.Tensor (freed)' end
   local head = string.format('nr.Tensor %s %s [%s]', ({[0] = 'f32', 'int64', 'uint8', 'bf16'})[c.dtype],
      self:device(), table.concat(self:shape(), ' x '))
   local n = self:numel()
   if n == 0 then return head .. ' (empty)' end
   local host = self:is_cuda() and self:cpu() or self
   local lo, hi, sum, bad = math.huge, -math.huge, 0, 0
   local sample = {}
   local step = n > 1e6 and math.floor(n / 1e6) or 1
   local dbl = double1() -- (each value is used before the next call rewrites it)
   for i = 0, n - 1, step do
      C.nr_tensor_get(host.c, i, dbl)
      local v = dbl[0]
      if v ~= v or v == math.huge or v == -math.huge then bad = bad + 1 else
         if v < lo then lo = v end
         if v > hi then hi = v end
         sum = sum + v
      end
      if #sample < 6 then sample[#sample + 1] = fmt(v) end
   end
   local stats = string.format(' (min %s max %s mean %s%s)', fmt(lo), fmt(hi), fmt(sum / math.ceil(n / step)),
      bad > 0 and (', ' .. bad .. ' non-finite') or '')
   if n <= 6 then return head .. ' {' .. table.concat(sample, ', ') .. '}' end
   return head .. stats .. ' {' .. table.concat(sample, ', ') .. ', ...}'
end

return M

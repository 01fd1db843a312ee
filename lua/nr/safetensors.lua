-- nr.safetensors — read and write the safetensors format (Hugging Face), so PyTorch and others
-- can read nrlua weights and nrlua can read theirs.
--
-- Layout: 8 bytes little-endian uint64 N, then N bytes of JSON header
--   {"name": {"dtype": "F32"|"I64"|"U8"|"BF16", "shape": [...], "data_offsets": [begin, end]}, ...,
--    "__metadata__": {"key": "string value"}}
-- padded with spaces to a multiple of 8, then the data buffer; offsets are relative to the start
-- of the data buffer, tensors lie back to back in the header's (sorted-name) order, row-major,
-- little-endian. What it is not: a general JSON library (the header writer covers exactly this).
-- Invariants: save() writes through nr_file_write_atomic (temp + fsync + rename), so a reader
-- sees the old file or the new one; the bytes are assembled in C memory (a uint8 tensor), not
-- in the LuaJIT heap; load() reads one tensor at a time.
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local ffi, C = nrffi.ffi, nrffi.C

local M = {}

local DTYPE_TO_ST = {float32 = 'F32', int64 = 'I64', uint8 = 'U8', bfloat16 = 'BF16'}
local ST_TO_DTYPE = {F32 = 'float32', I64 = 'int64', U8 = 'uint8', BF16 = 'bfloat16'}
local ST_SIZE = {F32 = 4, I64 = 8, U8 = 1, BF16 = 2}

assert(ffi.abi('le'), 'nr.safetensors: big-endian hosts are not supported')

local function json_string(s)
   return '"' .. s:gsub('[%c"\\]', function(c)
      if c == '"' then return '\\"' elseif c == '\\' then return '\\\\'
      elseif c == '\n' then return '\\n' elseif c == '\t' then return '\\t' end
      return string.format('\\u%04x', c:byte())
   end) .. '"'
end

-- Normalizes the tensors argument: a map name -> tensor, or a list of {name, tensor}.
local function entries_of(tensors)
   check.arg(type(tensors) == 'table', 'nr.safetensors.save', 'tensors must be a table (name -> tensor, or a list of '
      .. '{name, tensor}), got %s', check.show(tensors))
   local list = {}
   if #tensors > 0 then
      for i, e in ipairs(tensors) do
         local name, t = e[1] or e.name, e[2] or e.tensor
         check.arg(type(name) == 'string' and T.is_tensor(t), 'nr.safetensors.save', 'entry %d must be {name, tensor}', i)
         list[#list + 1] = {name = name, t = t}
      end
   else
      for name, t in pairs(tensors) do
         check.arg(type(name) == 'string' and T.is_tensor(t), 'nr.safetensors.save', 'entries must map names to tensors (bad key %s)', tostring(name))
         list[#list + 1] = {name = name, t = t}
      end
   end
   table.sort(list, function(a, b) return a.name < b.name end)
   for i = 2, #list do
      check.arg(list[i].name ~= list[i - 1].name, 'nr.safetensors.save', 'duplicate tensor name %q', list[i].name)
   end
   return list
end

-- The header JSON and total data size for entries (sorted).
local function header_of(list, metadata)
   local parts, off = {}, 0
   if metadata and next(metadata) then
      local keys = {}
      for k, v in pairs(metadata) do
         check.arg(type(k) == 'string' and type(v) == 'string', 'nr.safetensors.save', '__metadata__ must map strings to strings (key %s)', tostring(k))
         keys[#keys + 1] = k
      end
      table.sort(keys)
      local kv = {}
      for _, k in ipairs(keys) do kv[#kv + 1] = json_string(k) .. ':' .. json_string(metadata[k]) end
      parts[#parts + 1] = '"__metadata__":{' .. table.concat(kv, ',') .. '}'
   end
   for _, e in ipairs(list) do
      check.arg(e.name ~= '__metadata__', 'nr.safetensors.save', 'a tensor may not be called __metadata__')
      local st = DTYPE_TO_ST[e.t:dtype()]
      local nbytes = e.t:numel() * ST_SIZE[st]
      e.begin, e.stop, e.st = off, off + nbytes, st
      off = off + nbytes
      parts[#parts + 1] = string.format('%s:{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}',
         json_string(e.name), st, table.concat(e.t:shape(), ','), e.begin, e.stop)
   end
   local h = '{' .. table.concat(parts, ',') .. '}'
   h = h .. string.rep(' ', (8 - #h % 8) % 8)
   return h, off
end

-- Serializes tensors (any device, any strides) into a uint8 tensor holding the file's bytes.
function M.encode(tensors, metadata)
   local list = entries_of(tensors)
   local h, data_len = header_of(list, metadata)
   local total = 8 + #h + data_len
   local buf = T.empty({total}, {dtype = 'uint8'})
   local p = buf:data()
   local n = #h
   for i = 0, 7 do
      p[i] = n % 256
      n = math.floor(n / 256)
   end
   ffi.copy(p + 8, h, #h)
   local base = 8 + #h
   for _, e in ipairs(list) do
      local src = e.t
      if src:is_cuda() or not src:is_contiguous() then src = src:to('cpu'):contiguous() end
      local nbytes = e.stop - e.begin
      if nbytes > 0 then ffi.copy(p + base + e.begin, ffi.cast('const uint8_t *', src.c.data), nbytes) end
   end
   return buf
end

-- save(path, tensors, metadata): tensors is {name = T, ...} or {{name, T}, ...}; metadata maps
-- strings to strings. Atomic.
function M.save(path, tensors, metadata)
   check.type(path, 'string', 'nr.safetensors.save', 'path')
   local buf = M.encode(tensors, metadata)
   check.status(C.nr_file_write_atomic(path, buf:data(), buf:numel()), 'nr.safetensors.save')
   buf:free()
end

local function le_u64(s)
   local n = 0
   for i = 8, 1, -1 do n = n * 256 + s:byte(i) end
   return n
end

-- Whether v is a JSON array of n (any n when nil) integers in [0, 2^53) (cjson decodes an object
-- to a table too: its keys are not 1..#v).
local function uint_array(v, n)
   if type(v) ~= 'table' or (n and #v ~= n) then return false end
   local count = 0
   for _ in pairs(v) do count = count + 1 end
   if count ~= #v then return false end
   for _, x in ipairs(v) do
      if type(x) ~= 'number' or x < 0 or x >= 2 ^ 53 or x ~= math.floor(x) then return false end
   end
   return true
end

local function json_of(v) return (select(2, pcall(require('cjson').encode, v))) end

-- Reads and validates the header: returns header (name -> {dtype, shape, data_offsets}),
-- metadata (or {}), the byte position of the data buffer, and the file size.
function M.read_header(path)
   local f, err = io.open(path, 'rb')
   if not f then error('nr.safetensors: cannot open ' .. path .. ': ' .. tostring(err), 2) end
   local size = f:seek('end')
   f:seek('set', 0)
   local head = f:read(8)
   local open = true
   local function bad(msg)
      if open then f:close() end
      error(string.format('nr.safetensors: %s is not a valid safetensors file: %s', path, msg), check.user_level(3))
   end
   if not head or #head < 8 then bad('shorter than 8 bytes') end
   local n = le_u64(head)
   if n < 2 or 8 + n > size then bad(string.format('header length %.0f does not fit the file (%d bytes)', n, size)) end
   local text = f:read(n)
   f:close()
   open = false
   local ok, hdr = pcall(require('cjson').decode, text)
   if not ok or type(hdr) ~= 'table' then bad('header is not JSON') end
   local meta = hdr.__metadata__ or {}
   hdr.__metadata__ = nil
   -- the format's metadata is a map of strings (a number there failed as "attempt to index")
   if type(meta) ~= 'table' then bad('__metadata__ must be an object of strings, got ' .. json_of(meta)) end
   for k, v in pairs(meta) do
      if type(k) ~= 'string' or type(v) ~= 'string' then
         bad(string.format('__metadata__ must be an object of strings; its entry %s is %s', json_of(k), json_of(v)))
      end
   end
   local data_start = 8 + n
   local data_len = size - data_start
   local spans = {}
   for name, e in pairs(hdr) do
      if type(e) ~= 'table' then bad(string.format('tensor %q: entry must be an object, got %s', name, json_of(e))) end
      if type(e.dtype) ~= 'string' then bad(string.format('tensor %q: dtype must be a string, got %s', name, json_of(e.dtype))) end
      if not ST_TO_DTYPE[e.dtype] then bad(string.format('tensor %q: unsupported dtype %s', name, e.dtype)) end
      -- a missing shape or offsets would load a 0-d tensor or fail in arithmetic
      if not uint_array(e.shape) then
         bad(string.format('tensor %q: shape must be an array of non-negative integers, got %s', name, json_of(e.shape)))
      end
      local o = e.data_offsets
      if not uint_array(o, 2) then
         bad(string.format('tensor %q: data_offsets must be an array of two non-negative integers, got %s', name, json_of(o)))
      end
      -- what nrlua can hold (as nr.empty checks it): found here, a file's damage is named before
      -- a checkpoint is trusted, not at the load
      if #e.shape > 8 then bad(string.format('tensor %q: %d dimensions, more than the 8 nrlua holds', name, #e.shape)) end
      local numel = 1
      for _, s in ipairs(e.shape) do
         if s > 2 ^ 40 then bad(string.format('tensor %q: a size of %.0f, more than the 2^40 nrlua holds', name, s)) end
         numel = numel * s
      end
      if numel > 2 ^ 40 then bad(string.format('tensor %q: %.0f elements, more than the 2^40 nrlua holds', name, numel)) end
      if o[2] - o[1] ~= numel * ST_SIZE[e.dtype] or o[2] > data_len then
         bad(string.format('tensor %q: data_offsets %s do not match its shape and dtype or the file size (truncated file?)', name,
            type(o) == 'table' and ('[' .. table.concat(o, ', ') .. ']') or tostring(o)))
      end
      spans[#spans + 1] = o
   end
   -- by begin, then end: an empty tensor [k, k] goes before the one starting at k (sorting by
   -- begin alone left their order to pairs, and a file with an empty tensor failed at random)
   table.sort(spans, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
   local at = 0
   for _, o in ipairs(spans) do
      if o[1] ~= at then bad('tensor data overlaps or leaves holes') end
      at = o[2]
   end
   if at ~= data_len then bad(string.format('data buffer is %d bytes but the header covers %d (truncated file?)', data_len, at)) end
   return hdr, meta, data_start, size
end

-- load(path [, names]) -> {name = CPU tensor}, metadata. names (a set) restricts what is read.
function M.load(path, names)
   check.type(path, 'string', 'nr.safetensors.load', 'path')
   local hdr, meta, data_start = M.read_header(path)
   local f = assert(io.open(path, 'rb'))
   local out = {}
   for name, e in pairs(hdr) do
      if not names or names[name] then
         local t = T.empty(e.shape, {dtype = ST_TO_DTYPE[e.dtype]})
         local nbytes = e.data_offsets[2] - e.data_offsets[1]
         if nbytes > 0 then
            f:seek('set', data_start + e.data_offsets[1])
            local chunk = f:read(nbytes)
            if not chunk or #chunk ~= nbytes then
               f:close()
               error(string.format('nr.safetensors: %s: short read for tensor %q', path, name), 2)
            end
            ffi.copy(ffi.cast('uint8_t *', t.c.data), chunk, nbytes)
         end
         out[name] = t
      end
   end
   f:close()
   return out, meta
end

return M

-- nr.checkpoint — crash-safe checkpoints: weights in safetensors, everything else in JSON.
--
-- Layout of a checkpoint folder (a run's checkpoint/):
--   step-00001234/model.safetensors   parameters and buffers by module:namedParameters() names
--   step-00001234/state.safetensors   tensors found inside the state (optimizer momentum, ...)
--   step-00001234/state.json          the state, with tensors replaced by {"$tensor": key}, and
--                                     the byte sizes of the two files above; written last
--   latest                            one line: the name of the newest complete step folder
--   best                              the same for the best evaluation's step folder (nr.train's
--                                     best = true), kept when older steps are pruned
-- Invariants: every file is written with nr_file_write_atomic (temp + fsync + rename); the
-- `latest` pointer is swapped only after a step folder is complete, and a step saved again is
-- written to step-N.new and exchanged with step-N in one rename (nr_dir_replace), so a kill at
-- any moment leaves `latest` naming a readable checkpoint. Loading checks sizes and headers, and falls back
-- to the newest complete step folder when `latest` is missing or names a damaged one; leftover
-- *.tmp.* files and half-written newer folders are ignored (and pruned on the next save).
-- What it is not: the policy of what goes into a state (nr.train builds it) — this module only
-- stores a name -> tensor map and a JSON-able table that may contain tensors.
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local safetensors = require 'nr.safetensors'
local C = nrffi.C

local M = {}

-- ---- JSON -----------------------------------------------------------------------------------
-- A small deterministic encoder: sorted keys, shortest round-trip numbers, arrays for tables
-- whose keys are 1..n, functions/userdata as "<function>" strings, NaN/inf as null.

local function encode_number(v)
   if v ~= v or v == math.huge or v == -math.huge then return 'null' end
   if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return string.format('%d', v) end
   for _, f in ipairs({'%.15g', '%.16g', '%.17g'}) do
      local s = string.format(f, v)
      if tonumber(s) == v then return s end
   end
   return string.format('%.17g', v)
end

local ESC = {['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t', ['\b'] = '\\b', ['\f'] = '\\f'}
local function encode_string(s)
   return '"' .. s:gsub('[%c"\\]', function(c) return ESC[c] or string.format('\\u%04x', c:byte()) end) .. '"'
end

local function is_array(t)
   local n = #t
   if n == 0 then return next(t) == nil and getmetatable(t) == M.array_mt end
   local count = 0
   for k in pairs(t) do
      if type(k) ~= 'number' or k < 1 or k > n or k ~= math.floor(k) then return false end
      count = count + 1
   end
   return count == n
end

M.array_mt = {}
-- Marks an (empty) table to encode as [] rather than {}.
function M.array(t) return setmetatable(t or {}, M.array_mt) end

local function encode(v, indent, cur, seen)
   local tv = type(v)
   if tv == 'nil' then return 'null'
   elseif tv == 'boolean' then return v and 'true' or 'false'
   elseif tv == 'number' then return encode_number(v)
   elseif tv == 'string' then return encode_string(v)
   elseif tv == 'table' then
      if T.is_tensor(v) then return encode_string('<' .. v:describe() .. '>') end
      if v == require('cjson').null then return 'null' end
      if seen[v] then error('nr.json: cannot encode a cyclic table', 0) end
      seen[v] = true
      local nl, ind2 = '', ''
      if indent then nl = '\n'; ind2 = cur .. indent end
      local parts = {}
      local out
      if is_array(v) then
         local flat = true
         for i = 1, #v do flat = flat and type(v[i]) ~= 'table' end
         if flat then
            -- arrays of scalars stay on one line (shapes, milestones, RNG words)
            for i = 1, #v do parts[i] = encode(v[i], nil, '', seen) end
            out = '[' .. table.concat(parts, indent and ', ' or ',') .. ']'
         else
            for i = 1, #v do parts[i] = ind2 .. encode(v[i], indent, ind2, seen) end
            out = '[' .. nl .. table.concat(parts, ',' .. nl) .. nl .. cur .. ']'
         end
      else
         local keys = {}
         for k in pairs(v) do
            if type(k) == 'string' or type(k) == 'number' then keys[#keys + 1] = k end
         end
         table.sort(keys, function(a, b)
            if type(a) == type(b) then return a < b end
            return type(a) == 'number'
         end)
         for _, k in ipairs(keys) do
            local x = v[k]
            if type(x) ~= 'table' or x ~= v then
               parts[#parts + 1] = ind2 .. encode_string(tostring(k)) .. (indent and ': ' or ':') .. encode(x, indent, ind2, seen)
            end
         end
         out = #parts == 0 and '{}' or ('{' .. nl .. table.concat(parts, ',' .. nl) .. nl .. cur .. '}')
      end
      seen[v] = nil
      return out
   end
   return encode_string('<' .. tv .. '>')
end

-- json_encode(value [, pretty]) -> string
function M.json_encode(v, pretty)
   return encode(v, pretty and '  ' or nil, '', {})
end

-- json_decode(text) -> value; JSON null becomes nil.
function M.json_decode(text)
   local cjson = require('cjson')
   local ok, v = pcall(cjson.decode, text)
   if not ok then error('invalid JSON: ' .. tostring(v), 2) end
   local function strip(x)
      if type(x) ~= 'table' then return x end
      for k, y in pairs(x) do
         if y == cjson.null then x[k] = nil else strip(y) end
      end
      return x
   end
   return strip(v)
end

-- ---- files and folders ------------------------------------------------------------------------

local has_lfs, lfs = pcall(require, 'lfs')

local function exists(path)
   local f = io.open(path, 'rb')
   if f then f:close(); return true end
   return false
end
M.exists = exists

local function file_size(path)
   local f = io.open(path, 'rb')
   if not f then return nil end
   local n = f:seek('end')
   f:close()
   return n
end

-- CRC-32 of a file as a number, or nil and the reason.
local function file_crc32(path)
   local crc = nrffi.ffi.new('uint32_t[1]')
   if C.nr_file_crc32(path, crc) ~= 0 then return nil, nrffi.ffi.string(C.nr_last_error()) end
   return tonumber(crc[0])
end

-- Without lua-filesystem (scripts/setup.sh installs it) the folder operations go through the
-- shell; every path is quoted by shell.quote, so a path holding $(...), quotes or spaces is
-- only ever a path. Exposed for the specs.
local shell = {}
M.shell = shell
function shell.quote(path) return "'" .. tostring(path):gsub("'", "'\\''") .. "'" end
function shell.is_dir(path) return os.execute('test -d ' .. shell.quote(path)) == 0 end
function shell.is_link(path) return os.execute('test -L ' .. shell.quote(path)) == 0 end
function shell.mkdir(path) return os.execute('mkdir -p -- ' .. shell.quote(path)) == 0 end
function shell.list(path)
   local out = {}
   local p = io.popen('ls -1A -- ' .. shell.quote(path) .. ' 2>/dev/null')
   for line in p:lines() do out[#out + 1] = line end
   p:close()
   return out
end

local function is_dir(path)
   if has_lfs then return lfs.attributes(path, 'mode') == 'directory' end
   return shell.is_dir(path)
end
M.is_dir = is_dir

-- mkdir -p
function M.mkdirs(path)
   if is_dir(path) then return end
   local acc = path:sub(1, 1) == '/' and '/' or ''
   for part in path:gmatch('[^/]+') do
      acc = acc .. part
      if not is_dir(acc) then
         if has_lfs then
            local ok, err = lfs.mkdir(acc)
            if not ok and not is_dir(acc) then error('cannot create folder ' .. acc .. ': ' .. tostring(err), 2) end
         else
            if not shell.mkdir(acc) then error('cannot create folder ' .. acc, 2) end
         end
      end
      acc = acc .. '/'
   end
end

-- Entries of a folder (names), sorted.
function M.list(path)
   local out = {}
   if has_lfs then
      if not is_dir(path) then return out end
      for name in lfs.dir(path) do
         if name ~= '.' and name ~= '..' then out[#out + 1] = name end
      end
   else
      out = shell.list(path)
   end
   table.sort(out)
   return out
end

-- A symbolic link (to a file or a folder).
local function is_link(path)
   if has_lfs and lfs.symlinkattributes then return lfs.symlinkattributes(path, 'mode') == 'link' end
   return shell.is_link(path)
end
M.is_link = is_link

-- rm -r that never follows a link: a link is removed, not what it points to.
local function remove_tree(path)
   if is_link(path) then
      os.remove(path)
   elseif is_dir(path) then
      for _, name in ipairs(M.list(path)) do remove_tree(path .. '/' .. name) end
      if has_lfs then lfs.rmdir(path) else os.remove(path) end
   else
      os.remove(path)
   end
end
M.remove_tree = remove_tree

local function read_file(path)
   local f = io.open(path, 'rb')
   if not f then return nil end
   local s = f:read('*a')
   f:close()
   return s
end
M.read_file = read_file

-- Atomic write of a string.
function M.write_atomic(path, text)
   check.status(C.nr_file_write_atomic(path, text, #text), 'nr.checkpoint', 3)
end

-- ---- one writer per folder -----------------------------------------------------------------------
-- M.lock(path) takes the exclusive lock on the file path (nr_file_lock: flock) and returns its
-- handle; the lock lasts until handle:release(), until this process locks the same file again, or
-- until the process ends, however it ends. When another process holds it: nil and that process's
-- id (0 if unknown). On a file system without locks the handle holds none
-- (handle.unsupported). A new lock in this process takes the file over from the earlier handle: one
-- Lua state runs one writer at a time, and an earlier one that stopped on an error never released.
local ffi = nrffi.ffi
pcall(ffi.cdef, 'char *realpath(const char *path, char *resolved_path);')
local held = {}   -- canonical path -> this process's handle
local Lock = {}
Lock.__index = Lock
function Lock:release()
   if self.fd >= 0 then C.nr_file_unlock(self.fd) end
   self.fd = -1
   if held[self.key] == self then held[self.key] = nil end
end

-- An existing path's real path (links and . / .. resolved), or the path as given when it has none.
function M.realpath(path)
   local buf = ffi.new('char[?]', 8192)
   local p = ffi.C.realpath(path, buf)
   return p ~= nil and ffi.string(p) or path
end

-- The file's path through its folder's real path (the folder exists; the file may not yet).
local function canonical(path)
   local dir, name = path:match('^(.*)/([^/]*)$')
   if not dir then dir, name = '.', path elseif dir == '' then dir = '/' end
   return M.realpath(dir) .. '/' .. name
end

function M.lock(path)
   check.type(path, 'string', 'nr.checkpoint.lock', 'path')
   local fd, holder = ffi.new('int32_t[1]'), ffi.new('int64_t[1]')
   local key = canonical(path)
   if held[key] then held[key]:release() end
   local st = C.nr_file_lock(path, fd, holder)
   if st ~= 0 and holder[0] >= 0 then return nil, tonumber(holder[0]) end
   -- no locks on this file system (holder -2): the handle guards nothing and says so
   local unsupported = st ~= 0 and holder[0] == -2
   if not unsupported then check.status(st, 'nr.checkpoint.lock', 3) end
   local h = setmetatable({fd = unsupported and -1 or fd[0], key = key, path = path, unsupported = unsupported or nil},
                          Lock)
   held[key] = h
   return h
end

-- ---- tensors inside a state table ----------------------------------------------------------------

-- Copies a state table, replacing tensors by {"$tensor" = key}; returns the copy and key -> tensor,
-- or nil, nil and the path of a reference back to an enclosing table (a cycle: the walk would never
-- end). seen holds the tables on the current path only: a table shared by two branches is fine.
local function extract_tensors(state)
   local tensors, seen, cycle = {}, {}, nil
   local function walk(v, path)
      if T.is_tensor(v) then
         tensors[path] = v
         return {['$tensor'] = path}
      end
      if type(v) ~= 'table' or cycle then return v end
      if seen[v] then cycle = path; return nil end
      seen[v] = true
      local out = {}
      for k, x in pairs(v) do
         out[k] = walk(x, path == '' and tostring(k) or (path .. '/' .. tostring(k)))
      end
      seen[v] = nil
      return setmetatable(out, getmetatable(v) == M.array_mt and M.array_mt or nil)
   end
   local out = walk(state, '')
   if cycle then return nil, nil, cycle end
   return out, tensors
end

local function restore_tensors(state, tensors, where)
   local function walk(v)
      if type(v) ~= 'table' then return v end
      local key = v['$tensor']
      if key then
         local t = tensors[key]
         if not t then error(string.format('nr.checkpoint: %s refers to tensor %q, which state.safetensors lacks', where, key), 0) end
         return t
      end
      for k, x in pairs(v) do v[k] = walk(x) end
      return v
   end
   return walk(state)
end

-- ---- save / load ---------------------------------------------------------------------------------

local function step_name(step) return string.format('step-%08d', step) end

-- Checks a step folder: returns state (decoded, tensors not yet loaded) or nil, reason. deep: the
-- files' CRC-32 too (a load reads every byte; pruning trusts sizes and headers). weights_only:
-- model.safetensors alone (load_weights reads no optimizer state, which may have been stripped).
local function validate(dir, deep, weights_only)
   local text = read_file(dir .. '/state.json')
   if not text then return nil, 'no state.json (incomplete checkpoint)' end
   local ok, st = pcall(M.json_decode, text)
   if not ok or type(st) ~= 'table' then return nil, 'state.json is not valid JSON' end
   -- what save writes into every state.json: its own record and the files' byte counts
   if type(st.checkpoint) ~= 'table' or type(st.checkpoint.step) ~= 'number' or type(st.files) ~= 'table'
      or st.files['model.safetensors'] == nil then
      return nil, 'state.json is not a checkpoint record (no checkpoint.step or files)'
   end
   for _, f in ipairs(weights_only and {'model.safetensors'} or {'model.safetensors', 'state.safetensors'}) do
      local want = type(st.files) == 'table' and st.files[f] or nil
      if want ~= nil and (type(want) ~= 'table' or type(want.bytes) ~= 'number') then
         return nil, string.format('state.json: files["%s"] has no byte count', f)
      end
      if want then
         local got = file_size(dir .. '/' .. f)
         if got ~= want.bytes then
            return nil, string.format('%s has %s bytes, state.json says %d', f, tostring(got), want.bytes)
         end
         local hok, herr = pcall(safetensors.read_header, dir .. '/' .. f)
         if not hok then return nil, tostring(herr) end
         -- a file changed after it was written (disk or copy corruption) keeps its size; checkpoints
         -- written before the CRC was recorded have none
         if deep and want.crc32 ~= nil then
            local crc, why = file_crc32(dir .. '/' .. f)
            if not crc then return nil, why end
            if crc ~= want.crc32 then
               return nil, string.format('%s has CRC-32 %08x, state.json says %08x: the file changed after it was written '
                  .. '(disk or copy corruption)', f, crc, tonumber(want.crc32) or 0)
            end
         end
      end
   end
   return st
end

local function pointer(ckdir, which)
   local s = read_file(ckdir .. '/' .. which)
   return s and s:match('^%s*(step%-%d+)%s*$')
end

-- save(ckdir, {step = n, weights = {name = T}, state = table, keep = 2, metadata = {...}})
-- -> the step folder's path. Older complete step folders beyond `keep` are pruned (never the
-- one named by `best`, when that pointer exists).
function M.save(ckdir, opts)
   check.arg(type(opts) == 'table', 'nr.checkpoint.save', 'opts must be a table, got %s', type(opts))
   -- the step names the folder: 2.5 would overwrite step 2, NaN make "step--9223372036854775808"
   local step = opts.step
   check.arg(type(step) == 'number' and step >= 0 and step < 2 ^ 53 and step == math.floor(step), 'nr.checkpoint.save',
      'opts.step must be a non-negative integer, got %s', tostring(step))
   -- before anything is written: a cyclic state would leave a step folder without state.json
   local state, tensors, cycle = extract_tensors(opts.state or {})
   check.arg(not cycle, 'nr.checkpoint.save', 'opts.state is cyclic: %s refers back to a table that contains it', cycle)
   M.mkdirs(ckdir)
   local name = step_name(opts.step)
   local dir = ckdir .. '/' .. name
   -- a folder of this step exists (the step saved again, or an earlier attempt): the new one is
   -- written beside it and swapped in once complete, so the folder `latest` or `best` names is
   -- never half-written (it used to be removed first: a kill then lost that checkpoint)
   local staged = is_dir(dir) and dir .. '.new' or nil
   local wdir = staged or dir
   if staged then
      remove_tree(staged)
      remove_tree(staged .. '.old')
   end
   M.mkdirs(wdir)
   local meta = {format = 'nrlua'}
   for k, v in pairs(opts.metadata or {}) do meta[k] = tostring(v) end
   local ok, err = pcall(function()
      safetensors.save(wdir .. '/model.safetensors', opts.weights or {}, meta)
      safetensors.save(wdir .. '/state.safetensors', tensors, {format = 'nrlua'})
      state.files = {}
      for _, f in ipairs({'model.safetensors', 'state.safetensors'}) do
         state.files[f] = {bytes = file_size(wdir .. '/' .. f), crc32 = assert(file_crc32(wdir .. '/' .. f))}
      end
      state.checkpoint = {name = name, step = opts.step, time = os.time()}
      M.write_atomic(wdir .. '/state.json', M.json_encode(state, true) .. '\n')
      if staged then
         check.status(C.nr_dir_replace(staged, dir), 'nr.checkpoint.save')
         remove_tree(staged) -- the replaced folder
      end
      -- best before latest: a kill between the two leaves best naming this complete folder, which
      -- the resumed run (from the previous one) writes again; the other way round best kept
      -- naming an older step for good
      if opts.best then M.write_atomic(ckdir .. '/best', name .. '\n') end
      M.write_atomic(ckdir .. '/latest', name .. '\n')
   end)
   -- a failed write (a full disk): `latest` still names the previous checkpoint; the unfinished
   -- folder goes, so its space is free again (not when a Ctrl-C came just after a pointer moved)
   if not ok then
      if staged then remove_tree(staged)
      elseif pointer(ckdir, 'latest') ~= name and pointer(ckdir, 'best') ~= name then remove_tree(dir) end
      error(err, 0)
   end
   M.prune(ckdir, opts.keep or 2)
   return dir
end

-- After a run resumed from the checkpoint of `step`: `best` must name this run's best weights,
-- best_name (the step folder the checkpoint's state recorded, or nil). A `best` written by epochs
-- after `step` (the run resumed from an earlier checkpoint) names a folder the continued run will
-- overwrite with other weights: it is pointed at best_name when that folder is complete, else
-- removed (the next improving epoch writes it again). Returns the name `best` holds afterwards.
function M.resumed(ckdir, step, best_name)
   local cur = pointer(ckdir, 'best')
   if best_name ~= nil and (type(best_name) ~= 'string' or not best_name:match('^step%-%d+$')) then best_name = nil end
   if best_name and cur ~= best_name and validate(ckdir .. '/' .. best_name) then
      M.write_atomic(ckdir .. '/best', best_name .. '\n')
      return best_name
   end
   if cur and cur ~= best_name and tonumber(cur:match('%d+')) > step then
      os.remove(ckdir .. '/best')
      return nil
   end
   return cur
end

-- The folder name of a step's checkpoint (step-00000042).
M.step_name = step_name

-- Removes step folders other than the `keep` newest complete ones, `latest` and `best`;
-- removes incomplete folders older than the newest complete one and stray temp files.
function M.prune(ckdir, keep)
   local latest, best = pointer(ckdir, 'latest'), pointer(ckdir, 'best')
   local steps = {}
   for _, n in ipairs(M.list(ckdir)) do
      if n:match('^step%-%d+$') then steps[#steps + 1] = n
      elseif n:match('%.tmp%.%d+$') then os.remove(ckdir .. '/' .. n)
      elseif n:match('^step%-%d+%.new') then remove_tree(ckdir .. '/' .. n) end -- a re-save's leftovers
   end
   table.sort(steps, function(a, b) return a > b end)
   local kept = 0
   for _, n in ipairs(steps) do
      local protect = n == latest or n == best
      if not protect and n > (latest or '') then
         -- newer than latest: a save in progress elsewhere or a crashed one; leave it alone
      elseif protect then
         kept = kept + 1
      elseif kept < keep and validate(ckdir .. '/' .. n) then
         kept = kept + 1
      else
         remove_tree(ckdir .. '/' .. n)
      end
   end
end

-- Finds the checkpoint to resume from: `latest` when it is complete, else the newest complete
-- step folder. Accepts a run folder (uses its checkpoint/), a checkpoint folder or a step folder.
-- Returns dir, state (without tensors) [, why the folder `latest` names was passed over] or nil, message.
function M.find(path)
   check.type(path, 'string', 'nr.checkpoint.find', 'path')
   path = path:gsub('/+$', '')
   if exists(path .. '/state.json') then
      local st, why = validate(path, true)
      if not st then return nil, path .. ': ' .. why end
      return path, st
   end
   local ckdir = is_dir(path .. '/checkpoint') and (path .. '/checkpoint') or path
   if not is_dir(ckdir) then return nil, 'no checkpoint folder at ' .. path end
   local tried = {}
   local latest = pointer(ckdir, 'latest')
   if latest then
      local st, why = validate(ckdir .. '/' .. latest, true)
      if st then return ckdir .. '/' .. latest, st end
      tried[#tried + 1] = latest .. ': ' .. why
   end
   local steps = {}
   for _, n in ipairs(M.list(ckdir)) do if n:match('^step%-%d+$') then steps[#steps + 1] = n end end
   table.sort(steps, function(a, b) return a > b end)
   for _, n in ipairs(steps) do
      if n ~= latest then
         local st, why = validate(ckdir .. '/' .. n, true)
         if st then return ckdir .. '/' .. n, st, latest and tried[1] or nil end
         tried[#tried + 1] = n .. ': ' .. why
      end
   end
   return nil, 'no complete checkpoint in ' .. ckdir .. (#tried > 0 and (' (' .. table.concat(tried, '; ') .. ')') or '')
end

-- load(path) -> {dir, weights = {name = CPU tensor}, state = table with tensors restored, passed_over =
-- nil or why the folder `latest` names was not used}. load(path, found) takes M.find's result as found.
function M.load(path, found)
   -- found: what M.find(path) returned, {dir, state, passed_over}, when the caller has it (a
   -- second find would read every byte again for the CRC)
   local dir, st, passed_over
   if found then dir, st, passed_over = found.dir, found.state, found.passed_over else dir, st, passed_over = M.find(path) end
   if not dir then error('nr.checkpoint: ' .. st, 2) end
   local weights = safetensors.load(dir .. '/model.safetensors')
   local tensors = exists(dir .. '/state.safetensors') and safetensors.load(dir .. '/state.safetensors') or {}
   restore_tensors(st, tensors, dir .. '/state.json')
   return {dir = dir, weights = weights, state = st, passed_over = passed_over}
end

-- ---- models ----------------------------------------------------------------------------------------

-- name -> tensor for a module's parameters and buffers (live tensors, not copies).
function M.model_tensors(model, fname)
   -- named for the caller: a non-module failed as "attempt to call method 'namedParameters'"
   check.arg(type(model) == 'table' and type(model.namedParameters) == 'function', fname or 'nr.checkpoint.model_tensors',
      'model must be a module, got %s', check.show(model))
   local out = {}
   for _, e in ipairs(model:namedParameters()) do out[e.name] = e.param end
   for _, e in ipairs(model:namedBuffers()) do out[e.name] = e.tensor end
   return out
end

-- The weights of NR-CR blocks reading an input generation no output group has (nr.nn.NRConv2d),
-- as a set: they came on 2026-12-06, files written before lack them, and they start at zero, so a
-- missing one is zero-filled rather than an error.
local function unread_blocks(model)
   local unread = {}
   for _, m in ipairs(model:listModules()) do
      for _, b in ipairs(rawget(m, 'blocks') or {}) do
         if b.unread then unread[b.conv.weight] = true end
      end
   end
   return unread
end

-- The error for names a file and a model do not share (lists sorted here); level: error's level as
-- the function calling this would give it.
local function mismatch(where, missing, unexpected, level, hint)
   if #missing == 0 and #unexpected == 0 then return end
   local function list(names) -- the first dozen: a whole other model would list hundreds
      if #names == 0 then return 'none' end
      table.sort(names)
      local shown = table.concat(names, ', ', 1, math.min(#names, 12))
      return #names > 12 and string.format('%s and %d more', shown, #names - 12) or shown
   end
   error(string.format('nr.checkpoint: %s does not match the model: missing %s; unexpected %s%s', where,
      list(missing), list(unexpected), hint or ''), level + 1)
end

-- Copies weights (name -> tensor) into a model's parameters and buffers. Missing or unexpected
-- names and shape mismatches are errors that list them (strict, so a wrong architecture fails).
-- skip: a set of the model's names left as they are (and absent from weights); hint: text added
-- to a mismatch's message.
function M.load_into(model, weights, where, skip, hint)
   where = where or 'checkpoint'
   check.arg(type(weights) == 'table', 'nr.checkpoint.load_into', 'weights must be a table of name -> tensor, got %s',
      type(weights))
   local targets = M.model_tensors(model, 'nr.checkpoint.load_into')
   for name in pairs(skip or {}) do targets[name] = nil end
   local unread = unread_blocks(model)
   local missing, unexpected = {}, {}
   for name, t in pairs(targets) do
      if not weights[name] then
         if unread[t] then t:zero() else missing[#missing + 1] = name end
      end
   end
   for name in pairs(weights) do if not targets[name] then unexpected[#unexpected + 1] = name end end
   mismatch(where, missing, unexpected, 2, hint)
   local names = {}
   for name in pairs(targets) do if weights[name] then names[#names + 1] = name end end
   table.sort(names)
   for _, name in ipairs(names) do
      local t, w = targets[name], weights[name]
      if not T.is_tensor(w) then
         error(string.format('nr.checkpoint: %s: %s must be a tensor, got %s', where, name, type(w)), 2)
      end
      -- floating weights convert (bf16 into float32, as PyTorch's load_state_dict); integer values
      -- into floating weights or the reverse mean a wrong file
      local FLOAT = {float32 = true, bfloat16 = true}
      if w:dtype() ~= t:dtype() and not (FLOAT[w:dtype()] and FLOAT[t:dtype()]) then
         error(string.format('nr.checkpoint: %s: %s is %s in the checkpoint but %s in the model', where, name,
            w:dtype(), t:dtype()), 2)
      end
      if not T.same_shape(w:shape(), t:shape()) then
         error(string.format('nr.checkpoint: %s: %s has shape [%s] in the checkpoint but [%s] in the model', where, name,
            table.concat(w:shape(), ' x '), table.concat(t:shape(), ' x ')), 2)
      end
      -- a diverged run's NaN / inf weights: said here, not as a NaN loss steps later
      if not w:all_finite() then
         error(string.format('nr.checkpoint: %s: %s holds non-finite values (NaN or inf): the run diverged before this '
            .. 'checkpoint; resume from an earlier one', where, name), 2)
      end
   end
   for _, name in ipairs(names) do targets[name]:copy(weights[name]) end
end

-- A rejuvenated model's layer sizes, as safetensors metadata: {nr_arch = JSON of the
-- architecture record nr.rejuvenate's checkpoints keep}; {} for a model no rejuvenation changed
-- (it loads strictly). load_weights rebuilds a freshly built model to it, so a rejuvenated model
-- loads without its training run.
function M.arch_metadata(model)
   local surgery = require 'nr.rejuvenate.surgery'
   if not surgery.rejuvenated(model) then return {} end
   -- and the rejuvenations so far (with merged generations the layout no longer counts them)
   local gen = rawget(model, 'nr_generation')
   return {nr_arch = M.json_encode(surgery.arch_state(model)), nr_generation = gen and tostring(gen) or nil}
end

-- How a weights file names a model's tensors (save_weights / load_weights `names`): nil, the
-- model's own paths; 'torchvision', nr.models.torchvision_names (the ImageNet ResNets); a table
-- {model name -> file name} or a function(model name) -> file name, where nil keeps the name.
-- Returns {model name -> file name}, or nil for the model's own names. level: the user's call.
local function file_names(model, names, fname, level)
   if names == nil then return nil end
   if names == 'torchvision' then return require('nr.models').torchvision_names(model, fname, level + 1) end
   if type(names) ~= 'table' and type(names) ~= 'function' then
      error(string.format("%s: names must be 'torchvision', a table {model name -> file name} or a function, got %s",
         fname, check.show(names)), level + 1)
   end
   local map, taken = {}, {}
   local own = {}
   for name in pairs(M.model_tensors(model, fname)) do own[#own + 1] = name end
   table.sort(own)
   for _, name in ipairs(own) do
      local f
      if type(names) == 'table' then f = names[name] else f = names(name) end
      if f == nil then f = name end
      if type(f) ~= 'string' or f == '' then
         error(string.format('%s: names gives %s for %s; a file name must be a non-empty string', fname,
            check.show(f), name), level + 1)
      end
      if taken[f] then
         error(string.format('%s: names gives %s for both %s and %s', fname, f, taken[f], name), level + 1)
      end
      map[name], taken[f] = f, name
   end
   return map
end

-- load_weights' `skip`: module paths ('fc', 'layer4.1') whose tensors are left as the model has
-- them (a new classifier when fine-tuning); returns the set of the model's names below them. A
-- path naming nothing is an error (a misspelt one would load what it meant to skip).
local function skipped_names(model, skip, fname, level)
   if type(skip) == 'string' then skip = {skip} end
   if type(skip) ~= 'table' then
      error(string.format('%s: skip must be a list of module paths, got %s', fname, check.show(skip)), level + 1)
   end
   local names, set = M.model_tensors(model, fname), {}
   for i, p in ipairs(skip) do
      -- a Sequential's child is its index ('--init.skip 10' reads as a number)
      if type(p) == 'number' and p >= 0 and p == math.floor(p) then p = string.format('%d', p) end
      if type(p) ~= 'string' or p == '' then
         error(string.format('%s: skip[%d] must be a module path such as "fc", got %s', fname, i, check.show(p)), level + 1)
      end
      local found = false
      for name in pairs(names) do
         if name == p or name:sub(1, #p + 1) == p .. '.' then set[name], found = true, true end
      end
      if not found then
         local seen, paths = {}, {}
         for name in pairs(names) do
            local m = name:match('^(.*)%.[^.]+$') or name
            if not seen[m] then seen[m] = true; paths[#paths + 1] = m end
         end
         local function key(m) return (m:gsub('%d+', function(d) return string.format('%010d', tonumber(d)) end)) end
         table.sort(paths, function(a, b) return key(a) < key(b) end) -- 4 before 13
         error(string.format('%s: skip names %s, which holds no parameter or buffer of the model (modules that do: %s%s)',
            fname, p, table.concat(paths, ', ', 1, math.min(#paths, 12)),
            #paths > 12 and string.format(' and %d more', #paths - 12) or ''), level + 1)
      end
   end
   return set
end

-- Saves a model's weights (and buffers) to a safetensors file PyTorch can read, with the layer
-- sizes (arch_metadata). opts: names (file_names above; 'torchvision' writes what a torchvision
-- model's load_state_dict takes), metadata (string -> string, beside the layer sizes).
local function save_weights(model, path, opts)
   local FN = 'nr.checkpoint.save_weights'
   local tensors = M.model_tensors(model, FN)
   check.type(path, 'string', FN, 'path')
   opts = check.options(opts, {names = true, metadata = true}, FN)
   local map = file_names(model, opts.names, FN, 2)
   if map then
      local renamed = {}
      for name, t in pairs(tensors) do renamed[map[name]] = t end
      tensors = renamed
   end
   local meta = M.arch_metadata(model)
   check.arg(opts.metadata == nil or type(opts.metadata) == 'table', FN, 'metadata must be a table of strings, got %s',
      check.show(opts.metadata))
   for k, v in pairs(opts.metadata or {}) do meta[k] = v end
   safetensors.save(path, tensors, meta)
end
function M.save_weights(model, path, opts) return check.at_caller(2, save_weights, model, path, opts) end

-- Loads a file save_weights wrote (or a run's checkpoint/<step>/model.safetensors) into model, a
-- freshly built model of the same kind: when the file comes from a rejuvenated model, the layers
-- a rejuvenation resized or split are first rebuilt to the recorded sizes (what no rejuvenation
-- changes, a classifier's outputs and the first conv's inputs, must already match), then every
-- weight and buffer is loaded with load_into's strict checks. Returns model.
-- path: a safetensors file; a step folder (its model.safetensors); a run folder or its checkpoint
-- folder (the checkpoint `best` names, else the newest complete one); or the `best` / `latest`
-- pointer file itself. opts: names (how the file names the tensors: file_names above), skip
-- (module paths left as the model has them: skipped_names above), rejuvenated = false (refuse a
-- rejuvenated model's file rather than rebuild the model's layers: nr.train's `init`, whose
-- optimizer already holds the layers).
local function weights_file(path)
   local FN = 'nr.checkpoint.load_weights'
   -- a checkpoint's step folder's weights are checked as a resume checks them (size, header,
   -- CRC-32): a file changed on disk loaded, and evaluated, silently
   local function checked(dir, which)
      local st, why = validate(dir, true, true)
      if st then return dir .. '/model.safetensors' end
      local newest = select(1, M.find(dir:match('^(.*)/[^/]*$') or '.'))
      error(string.format('%s: %s%s is damaged: %s%s', FN, which and (which .. ' names ') or '', dir, why,
         newest and newest ~= dir and ('; the newest complete checkpoint is ' .. newest) or ''), 4)
   end
   local p = path:gsub('/+$', '')
   if is_dir(p) then
      if exists(p .. '/model.safetensors') then
         return exists(p .. '/state.json') and checked(p) or p .. '/model.safetensors'
      end
      local ckdir = is_dir(p .. '/checkpoint') and (p .. '/checkpoint') or p
      local best = pointer(ckdir, 'best')
      -- (a `best` whose folder is gone or damaged is an error: the newest one is other weights)
      if best then return checked(ckdir .. '/' .. best, 'best') end
      local dir, why = M.find(p)
      if dir then return dir .. '/model.safetensors' end
      error(string.format('%s: %s is a folder without model.safetensors, and no run checkpoint in it (%s)', FN, path, why), 3)
   end
   local f, err = io.open(p, 'rb')
   if not f then error(string.format('%s: cannot open %s', FN, err), 3) end
   local size = f:seek('end')
   f:close()
   local dir, name = p:match('^(.*)/([^/]*)$')
   dir, name = dir or '.', name or p
   if size < 64 then -- a `best` / `latest` pointer: one line naming a step folder beside it
      local step = pointer(dir, name)
      if step then return checked(dir .. '/' .. step, name) end
      if name == 'best' or name == 'latest' then
         error(string.format('%s: %s is not a pointer to a step folder (it should hold one line such as step-00000012)',
            FN, path), 3)
      end
   end
   -- a step folder's own file
   if name == 'model.safetensors' and exists(dir .. '/state.json') then return checked(dir) end
   return path
end

M.weights_file = weights_file -- (the file load_weights reads for a path: nr.train.evaluate names it)

local function load_weights(model, path, opts)
   local FN = 'nr.checkpoint.load_weights'
   check.arg(type(path) == 'string', FN, 'path must be a string, got %s', check.show(path))
   M.model_tensors(model, FN) -- the model is a module
   opts = check.options(opts, {names = true, skip = true, rejuvenated = true}, FN)
   if opts.names ~= nil then file_names(model, opts.names, FN, 2) end -- a wrong `names` before any work
   if opts.skip ~= nil then skipped_names(model, opts.skip, FN, 2) end
   path = weights_file(path)
   local weights, meta = safetensors.load(path)
   if meta.nr_arch and opts.rejuvenated == false then
      error(string.format("%s: %s holds a rejuvenated model's weights (layers resized or split), which a freshly "
         .. 'built model does not fit', FN, path), 2)
   end
   if meta.nr_arch then
      local ok, arch = pcall(M.json_decode, meta.nr_arch)
      check.arg(ok and type(arch) == 'table', 'nr.checkpoint.load_weights', '%s: its nr_arch metadata is damaged', path)
      local applied, err = pcall(require('nr.rejuvenate.surgery').apply_arch, model, arch, true)
      if not applied then -- another kind of model: said for this call, not as nr.rejuvenate's
         error(string.format('nr.checkpoint.load_weights: %s does not fit the model: %s', path,
            (tostring(err):gsub('^nr%.rejuvenate: ', ''))), 2)
      end
      require('nr.rejuvenate.monitor').invalidate(model)
      local gen = tonumber(meta.nr_generation)
      model.nr_generation = gen and gen >= 1 and gen == math.floor(gen) and gen or nil
   end
   -- PyTorch's BatchNorm counts its batches (num_batches_tracked, an int64 scalar); nrlua's has no
   -- such buffer and PyTorch's load_state_dict fills it in when missing, so it is passed over
   for name, t in pairs(weights) do
      if name:match('%.num_batches_tracked$') and t:dtype() == 'int64' and t:numel() == 1 then weights[name] = nil end
   end
   local map = file_names(model, opts.names, FN, 2) -- after apply_arch: the names of the rebuilt layers
   local skip = opts.skip and skipped_names(model, opts.skip, FN, 2)
   for name in pairs(skip or {}) do weights[map and map[name] or name] = nil end
   local hint
   if not map and weights['layer1.0.conv1.weight'] and not M.model_tensors(model, FN)['layer1.0.conv1.weight'] then
      hint = " (the file names a torchvision ResNet's tensors: load it with {names = 'torchvision'})"
   end
   if map then -- the file's names to the model's; what does not match is named as the file has it
      local renamed, missing, unexpected = {}, {}, {}
      local targets, unread = M.model_tensors(model, FN), unread_blocks(model)
      for name, f in pairs(map) do
         if weights[f] then renamed[name], weights[f] = weights[f], nil
         elseif not unread[targets[name]] and not (skip and skip[name]) then missing[#missing + 1] = f end
      end
      for f in pairs(weights) do unexpected[#unexpected + 1] = f end
      mismatch(path, missing, unexpected, 2)
      weights = renamed
   end
   M.load_into(model, weights, path, skip, hint)
   return model
end
function M.load_weights(model, path, opts) return check.at_caller(2, load_weights, model, path, opts) end

return M

-- nr.check — argument checks and the one place C statuses become Lua errors.
-- check.call(status, where) raises "where: <C message>" at the caller's caller, so the message
-- points at user code; `where` is a module path such as "features.3 (Conv2d 64->128 3x3)".
local nrffi = require 'nr.ffi'
local ffi = nrffi.ffi
local C = nrffi.C

local M = {}

local function c_message()
   return ffi.string(C.nr_last_error())
end

-- A frame running nrlua's own Lua code (lua/nr/*): an error position there names the library's
-- line, where the user's call is what was wrong.
local function library_frame(info)
   return info.what ~= 'C' and info.source:sub(1, 1) == '@' and info.source:find('lua/nr/', 1, true) ~= nil
end

-- The error level to use, as error() counts it in the function calling this: `level`, unless the
-- frame it names runs library code (a check a few calls deep, or a public function reached through
-- another), then the first frame above that is not library code: the user's line (or a C frame,
-- such as pcall, which adds no position). Off the top of the stack: `level` as it was.
function M.user_level(level)
   local k = level + 1
   while true do
      local info = debug.getinfo(k, 'S')
      if not info then return level end
      if not library_frame(info) then return k - 1 end
      k = k + 1
   end
end

-- Raises a Lua error when status ~= 0. level: error level (default 3 = caller of the caller).
function M.status(status, where, level)
   if status ~= 0 then
      local msg = c_message()
      error((where and (where .. ': ') or '') .. msg, M.user_level(level or 3))
   end
end

-- For constructors returning a pointer: raises when it is NULL.
function M.pointer(p, where, level)
   if p == nil then
      local msg = c_message()
      error((where and (where .. ': ') or '') .. msg, M.user_level(level or 3))
   end
   return p
end

-- Argument checks for Lua-side functions: raise "fname: what" at the caller's level.
function M.arg(cond, fname, fmt, ...)
   if not cond then error(fname .. ': ' .. string.format(fmt, ...), M.user_level(3)) end
end

function M.type(value, ty, fname, argname)
   if type(value) ~= ty then
      error(string.format('%s: %s must be a %s, got %s', fname, argname, ty, type(value)), M.user_level(3))
   end
end

-- A value as error messages show it: numbers and booleans as themselves, strings quoted, other
-- things by their type (a table's address says nothing).
local function show(v)
   local ty = type(v)
   if ty == 'number' or ty == 'boolean' or ty == 'nil' then return tostring(v) end
   if ty == 'string' then return string.format('%q', v) end
   return ty
end
M.show = show

-- A number that is neither NaN nor infinite.
function M.finite(v) return type(v) == 'number' and v == v and v > -math.huge and v < math.huge end

-- A bound as messages write it: 2^31 - 1 rather than 2147483647.
local function bound(b)
   local a = math.abs(b)
   for _, d in ipairs({0, 1}) do
      local m, e = math.frexp(a + d)
      if a >= 2 ^ 16 and m == 0.5 then return (b < 0 and '-' or '') .. '2^' .. (e - 1) .. (d == 1 and ' - 1' or '') end
   end
   return string.format('%.0f', b)
end

-- value must be a finite integer in [min, max] (either bound may be nil; without them |value| <= 2^53,
-- past which Lua numbers skip integers). Every integer handed to C goes through here: LuaJIT
-- converts inf, NaN and values past an int32/int64 at the FFI without a word (inf ==
-- math.floor(inf), so "is an integer" alone lets it through), and C then reports the wrapped value.
-- level: the error's level as error() would count it in the function calling M.int (default 2:
-- that function's caller).
local EXACT = 2 ^ 53
local function int_range(value, fname, argname, min, max, level)
   local lo, hi = min or -EXACT, max or EXACT
   if type(value) == 'number' and value == math.floor(value) and value >= lo and value <= hi then
      return value
   end
   if type(value) == 'number' and math.abs(value) < math.huge then -- past a default bound: name it
      if value < lo then min = lo elseif value > hi then max = hi end
   end
   local range = ''
   if min == 0 then range = ' non-negative integer' .. (max and (' <= ' .. bound(max)) or '')
   elseif min and max then range = 'n integer in [' .. bound(min) .. ', ' .. bound(max) .. ']'
   elseif min then range = 'n integer >= ' .. bound(min)
   elseif max then range = 'n integer <= ' .. bound(max)
   else range = 'n integer' end
   error(string.format("%s: %s must be a%s, got %s", fname, argname, range, show(value)), M.user_level(level + 2))
end

function M.int(value, fname, argname, min, max, level)
   int_range(value, fname, argname, min, max, level or 2)
   return value
end

-- An int32_t argument of C: bounds default to (and are clipped to) the int32 range.
M.INT32_MAX = 2 ^ 31 - 1
function M.int32(value, fname, argname, min, max, level)
   int_range(value, fname, argname, math.max(min or -2 ^ 31, -2 ^ 31), math.min(max or M.INT32_MAX, M.INT32_MAX),
      level or 2)
   return value
end

-- Runs f(...) and raises its error at `level` as error() counts it from here, without a position
-- inside lua/nr: a check made a few calls deep names the library's line, where the user's call is
-- what was wrong (a position in the user's own code, such as a policy function's, stays). Public
-- functions tail-call this (their frame is gone), so 2 is their caller.
-- e without a leading position inside lua/nr, and how many it dropped (0 or 1).
function M.without_library_position(e)
   return e:gsub('^[^\n:]-/lua/nr/[^\n:]-%.lua:%d+: ', '', 1)
end

function M.at_caller(level, f, ...)
   local res = {pcall(f, ...)}
   if not res[1] then
      local e = res[2]
      if type(e) == 'string' then
         local stripped, n = M.without_library_position(e)
         -- already at a position of the user's (an error in their policy function): as it is
         if n == 0 and e:match('^[^\n:]-%.lua:%d+: ') then error(e, 0) end
         e = stripped
      end
      error(e, level)
   end
   return unpack(res, 2, table.maxn(res))
end

-- Edit distance between a and b (insertions, deletions, substitutions).
local function distance(a, b)
   local prev = {}
   for j = 0, #b do prev[j] = j end
   for i = 1, #a do
      local cur = {[0] = i}
      for j = 1, #b do
         cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a:sub(i, i) == b:sub(j, j) and 0 or 1))
      end
      prev = cur
   end
   return prev[#b]
end

-- The name among names (a list, tried in order) that k is a near miss of (a typo: one edit, two
-- for names of 8 characters or more; none for names under 5), or nil.
function M.near_miss(k, names)
   if type(k) ~= 'string' or #k < 5 then return nil end
   for _, n in ipairs(names) do
      if distance(k, n) <= (#k >= 8 and 2 or 1) then return n end
   end
end

-- Checks an options table against the allowed keys; unknown keys are errors (catch typos).
function M.options(opts, allowed, fname, level)
   level = (level or 2) + 1 -- the function that called the one checking its options, by default
   if opts == nil then return {} end
   -- (user_level only on the way to an error: it walks the stack)
   if type(opts) ~= 'table' then error(fname .. ': options must be a table, got ' .. type(opts), M.user_level(level)) end
   for k in pairs(opts) do
      if allowed[k] == nil then
         local names = {}
         for a in pairs(allowed) do names[#names + 1] = a end
         table.sort(names)
         local guess = M.near_miss(k, names)
         error(string.format('%s: unknown option %q (%sallowed: %s)', fname, tostring(k),
            guess and string.format('did you mean %q? ', guess) or '', table.concat(names, ', ')), M.user_level(level))
      end
   end
   return opts
end

return M

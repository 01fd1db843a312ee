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

-- Raises a Lua error when status ~= 0. level: error level (default 3 = caller of the caller).
function M.status(status, where, level)
   if status ~= 0 then
      local msg = c_message()
      error((where and (where .. ': ') or '') .. msg, level or 3)
   end
end

-- For constructors returning a pointer: raises when it is NULL.
function M.pointer(p, where, level)
   if p == nil then
      local msg = c_message()
      error((where and (where .. ': ') or '') .. msg, level or 3)
   end
   return p
end

-- Argument checks for Lua-side functions: raise "fname: what" at the caller's level.
function M.arg(cond, fname, fmt, ...)
   if not cond then error(fname .. ': ' .. string.format(fmt, ...), 3) end
end

function M.type(value, ty, fname, argname)
   if type(value) ~= ty then
      error(string.format('%s: %s must be a %s, got %s', fname, argname, ty, type(value)), 3)
   end
end

function M.int(value, fname, argname, min)
   if type(value) ~= 'number' or value ~= math.floor(value) or (min and value < min) then
      error(string.format('%s: %s must be an integer%s, got %s', fname, argname,
         min and (' >= ' .. min) or '', tostring(value)), 3)
   end
end

-- Checks an options table against the allowed keys; unknown keys are errors (catch typos).
function M.options(opts, allowed, fname)
   if opts == nil then return {} end
   if type(opts) ~= 'table' then error(fname .. ': options must be a table, got ' .. type(opts), 3) end
   for k in pairs(opts) do
      if allowed[k] == nil then
         local names = {}
         for a in pairs(allowed) do names[#names + 1] = a end
         table.sort(names)
         error(string.format('%s: unknown option %q (allowed: %s)', fname, tostring(k), table.concat(names, ', ')), 3)
      end
   end
   return opts
end

return M

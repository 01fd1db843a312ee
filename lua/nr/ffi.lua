-- nr.ffi — loads libnr, declares the C API to LuaJIT's FFI and applies NR_THREADS.
-- The declarations are the block between NR_FFI_BEGIN and NR_FFI_END in core/nr.h, read at load
-- time, so the Lua side and the header cannot drift apart (tests/lua/ffi_spec.lua checks that
-- every nr_* function the Lua package calls is declared there and exported by the library).
local ffi = require 'ffi'

local M = {}

local function home()
   if _NRLUA and _NRLUA.home then return _NRLUA.home end
   local env = os.getenv('NRLUA_HOME')
   if env and env ~= '' then return env end
   -- running under plain luajit from the source tree: lua/nr/ffi.lua -> ../..
   local src = debug.getinfo(1, 'S').source:match('^@(.*)/lua/nr/ffi%.lua$')
   return src or '.'
end

local function read_cdef(path)
   local f, err = io.open(path, 'r')
   if not f then error('nr: cannot read the C API header ' .. path .. ': ' .. tostring(err), 0) end
   local text = f:read('*a')
   f:close()
   local block = text:match('/%* NR_FFI_BEGIN %*/(.-)/%* NR_FFI_END %*/')
   if not block then error('nr: ' .. path .. ' has no NR_FFI_BEGIN/END block', 0) end
   return block
end

M.home = home()
M.header = M.home .. '/core/nr.h'
M.cdef_text = read_cdef(M.header)
ffi.cdef(M.cdef_text)

local function load_lib()
   local tried = {}
   local candidates = {}
   local env = os.getenv('NRLUA_LIB')
   if env and env ~= '' then
      -- the library asked for, or an error: another build standing in for it would go unnoticed
      local ok, lib = pcall(ffi.load, env)
      if not ok then error('nr: cannot load NRLUA_LIB=' .. env .. ': ' .. tostring(lib), 0) end
      return lib, env
   end
   if _NRLUA and _NRLUA.lib then candidates[#candidates + 1] = _NRLUA.lib end
   candidates[#candidates + 1] = M.home .. '/build/libnr.so'
   candidates[#candidates + 1] = 'nr'
   for _, c in ipairs(candidates) do
      local ok, lib = pcall(ffi.load, c)
      if ok then
         return lib, c
      end
      tried[#tried + 1] = c .. ' (' .. tostring(lib) .. ')'
   end
   error('nr: cannot load libnr; tried ' .. table.concat(tried, ', ') .. '; build it (cmake --build build) or set NRLUA_LIB', 0)
end

M.C, M.libpath = load_lib()
M.ffi = ffi

-- CPU threads: NR_THREADS (an integer >= 1; unset, empty or 0 = all cores), applied when the
-- library loads, so it holds for every entry point (a recipe that never requires 'nr', a
-- script, the REPL); nr.set_num_threads and a recipe's threads > 0 change it later.
-- More than MAX_THREADS is a typo, not a machine (OpenMP would try to start them); the one bound
-- of NR_THREADS, nr.set_num_threads and a recipe's threads.
M.MAX_THREADS = 4096
do
   local env = os.getenv('NR_THREADS')
   local n = (env or ''):match('^%s*%d+%s*$') and tonumber(env) -- decimal digits only (tonumber took 0x2, 1e1)
   if env and env ~= '' and not (n and n >= 0 and n == math.floor(n) and n <= M.MAX_THREADS) then
      error(string.format('nr: NR_THREADS must be a whole number of threads in 0..%d (0 = all cores), got %q',
         M.MAX_THREADS, env), 0)
   end
   M.C.nr_set_num_threads(n or 0)
end

-- Names of the functions declared in the header block (for the FFI agreement test).
function M.declared_functions()
   local names = {}
   for name in M.cdef_text:gmatch('[%w_%*%s]+%f[%w_](nr_[%w_]+)%s*%(') do names[name] = true end
   return names
end

return M

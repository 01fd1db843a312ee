-- Helpers shared by specs (require 'tests.lua.spec_util'): a unique temporary folder per run,
-- shell commands that must succeed, the NaN positions of a tensor.
local M = {}

-- A unique folder name per run under NR_TEST_TMP (or /tmp), not yet created: os.tmpname makes
-- a unique file, whose name is reused.
function M.temp_dir(prefix)
   local tmp = os.tmpname()
   os.remove(tmp)
   return (os.getenv('NR_TEST_TMP') or '/tmp') .. '/' .. prefix .. tmp:match('[^/]+$')
end

-- The nrlua executable running this spec (tests/run_busted.lua runs the specs through it).
function M.nrlua()
   local ffi = require 'ffi'
   pcall(ffi.cdef, 'int getpid(void);')
   local p = io.popen('readlink /proc/' .. ffi.C.getpid() .. '/exe')
   local exe = p:read('*l')
   p:close()
   assert(exe and exe:match('nrlua$'), 'cannot find the nrlua executable: ' .. tostring(exe))
   return exe
end

-- Runs a shell command: its output (stdout and stderr) and exit status.
function M.run(cmd)
   local p = io.popen('{ ' .. cmd .. '; } 2>&1; echo "::rc=$?"')
   local out = p:read('*a')
   p:close()
   local rc = tonumber(out:match('::rc=(%d+)%s*$'))
   return (out:gsub('::rc=%d+%s*$', '')), rc
end

function M.sh(cmd)
   local ok = os.execute(cmd)
   assert(ok == 0 or ok == true, 'command failed: ' .. cmd)
end

-- Positions (1-based, row-major) of the NaNs of tensor t (specs of NaN propagation, CPU and GPU).
function M.nan_positions(t)
   local out, flat = {}, t:contiguous():reshape(-1):totable()
   for i, v in ipairs(flat) do if v ~= v then out[#out + 1] = i end end
   return out
end

return M

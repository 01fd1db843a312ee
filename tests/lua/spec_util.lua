-- Helpers shared by specs that work with files (require 'tests.lua.spec_util'): a unique
-- temporary folder per run and shell commands that must succeed.
local M = {}

-- A unique folder name per run under NR_TEST_TMP (or /tmp), not yet created: os.tmpname makes
-- a unique file, whose name is reused.
function M.temp_dir(prefix)
   local tmp = os.tmpname()
   os.remove(tmp)
   return (os.getenv('NR_TEST_TMP') or '/tmp') .. '/' .. prefix .. tmp:match('[^/]+$')
end

function M.sh(cmd)
   local ok = os.execute(cmd)
   assert(ok == 0 or ok == true, 'command failed: ' .. cmd)
end

return M

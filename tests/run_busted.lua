-- Runs busted specs inside nrlua, so tests see the same package paths as users:
--   nrlua tests/run_busted.lua tests/lua/tensor_spec.lua [more specs or busted flags]
-- Exit status: busted's (0 all passed); 77 tells ctest the spec skipped itself entirely.
arg = arg or {}
arg[0] = 'busted'
local flags = {'--output=utfTerminal', '--verbose'}
local args = {}
for _, f in ipairs(flags) do args[#args + 1] = f end
for i = 1, #arg do args[#args + 1] = arg[i] end
_G.arg = args
require('busted.runner')({standalone = false, output = 'utfTerminal'})

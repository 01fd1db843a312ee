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
-- busted ends with os.exit(status); on failures under Lua 5.1 semantics it raises error(nil)
-- first, which we turn into a plain non-zero exit.
local ok, err = pcall(require('busted.runner'), {standalone = false, output = 'utfTerminal'})
if not ok then
   if err ~= nil then io.stderr:write(tostring(err), '\n') end
   os.exit(1)
end

-- bench/side.lua — what the side-by-side benchmarks against PyTorch share (optim_bench.lua,
-- layer_bench.lua): their --key value options, and running their PyTorch half (a script beside
-- them printing one JSON value) with this process's thread count.
--   local side = dofile(here .. 'side.lua')
--   local opt = side.options({rounds = 3}, {...}, 'layer_bench')
--   local result = side.torch('layer_bench.py', '--cases ' .. file, opt.python)
local json = require 'cjson'
local nr = require 'nr'

local M = {}
local here = debug.getinfo(1, 'S').source:match('^@(.*/)') or './'

-- defaults updated from argv (--key value pairs, numbers converted); unknown keys are errors.
function M.options(defaults, argv, who)
   for i = 1, #argv, 2 do
      local k = argv[i]:match('^%-%-(.+)$')
      assert(k and defaults[k] ~= nil and argv[i + 1], who .. ': unknown or incomplete option ' .. tostring(argv[i]))
      defaults[k] = tonumber(argv[i + 1]) or argv[i + 1]
   end
   return defaults
end

-- Runs bench/<script> with python and args (plus --threads, this process's), returns its JSON.
function M.torch(script, args, python)
   local cmd = string.format('%s %s%s %s --threads %d', python or '/usr/bin/python3', here, script, args,
      nr.get_num_threads())
   local p = assert(io.popen(cmd))
   local out = p:read('*a')
   p:close()
   return json.decode(out)
end

M.median = require('nr.profile').median

return M

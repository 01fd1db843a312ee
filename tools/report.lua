-- tools/report.lua — writes RUN_DIR/report.html, a self-contained HTML report (inline SVG plots)
-- of a run folder written by nr.train: loss, accuracy, learning rate, and Neural Rejuvenation's
-- utilization, λ and per-layer widths when the run has them.
--   nrlua tools/report.lua RUN_DIR [--out FILE]
local report = require 'nr.report'

local args = {...}
local dir, out
local i = 1
while i <= #args do
   local a = args[i]
   if a == '--out' or a == '-o' then
      out = args[i + 1]
      if not out then error('--out: missing file name', 0) end
      i = i + 2
   elseif a == '--help' or a == '-h' then
      io.write('usage: nrlua tools/report.lua RUN_DIR [--out FILE]\n')
      return
   elseif a:sub(1, 2) == '--' then
      error(string.format('%s: unknown flag (usage: nrlua tools/report.lua RUN_DIR [--out FILE])', a), 0)
   else
      if dir then error(string.format('unexpected argument %q: give one run folder', a), 0) end
      dir = a
      i = i + 1
   end
end
if not dir then error('usage: nrlua tools/report.lua RUN_DIR [--out FILE]', 0) end
local ok, path = pcall(report.write, dir, out)
if not ok then error((tostring(path):gsub('^[^\n]-%.lua:%d+: ', '')), 0) end -- the message, without a traceback
io.write('wrote ', path, '\n')

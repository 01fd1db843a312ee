-- spec_runner.lua — a minimal stand-in for busted on the GPU machine (which has no busted):
--   nrlua tests/gpu/spec_runner.lua tests/lua/cuda_spec.lua [more specs]
-- What it is: describe / it / before_each and a small `assert` (plain assert(cond, msg) plus
-- assert.is_true, is_false, equal, same, truthy, falsy, has_error), enough for specs written for
-- both runners (tests/lua/cuda_spec.lua). What it is not: busted; no tags, mocks or output formats.
-- Exit status: 0 when every test passed, 1 otherwise; a spec that calls os.exit(77) (nothing to
-- test here) ends the run with 77.
-- NR_SPEC_FILTER=TEXT runs only the tests whose full name contains TEXT (plain text; several
-- separated by '|'), e.g. to rerun what failed on a GPU without the rest.
-- A failed test is followed by a probe of the GPU (synchronise, then a tiny kernel and read-back):
-- when the GPU no longer works (a sticky CUDA error such as an illegal address poisons the
-- process's context, so every later test would fail with it), the runner prints
-- 'STICKY  <test>: <probe error>', runs nothing more and exits with 3; tests/gpu/run.sh then
-- resumes in a fresh process with NR_SPEC_AFTER='<test>' (the tests up to and including that
-- one are skipped). NR_SPEC_TRACE=1 prints 'start <test>' before each test, so a hang or a crash
-- names its test (the last line of the log).
local specs = {...}
local passed, failed, skipped, failures = 0, 0, 0, {}
local filters = {}
for f in (os.getenv('NR_SPEC_FILTER') or ''):gmatch('[^|]+') do filters[#filters + 1] = f end
local function wanted(full)
   if #filters == 0 then return true end
   for _, f in ipairs(filters) do if full:find(f, 1, true) then return true end end
   return false
end
local stack, before = {}, {}
local after = os.getenv('NR_SPEC_AFTER')
if after == '' then after = nil end
local trace = os.getenv('NR_SPEC_TRACE') == '1'
local resumed_skips, broken = 0, nil -- broken: the test after which the GPU stopped working

-- nil when the GPU (if any) still works, else the error that shows it does not.
local function gpu_broken()
   local okr, nr = pcall(require, 'nr')
   if not okr or type(nr) ~= 'table' or not nr.cuda or not nr.cuda.available() then return nil end
   local okp, err = pcall(function()
      nr.cuda.synchronize()
      local t = nr.zeros({4}, {device = 'cuda'})
      if t:add(1):sum() ~= 4 then error('a 4-element sum on the GPU is wrong') end
   end)
   if not okp then return tostring(err) end
end

local function same(a, b)
   if type(a) ~= 'table' or type(b) ~= 'table' then return a == b end
   for k, v in pairs(a) do if not same(v, b[k]) then return false end end
   for k in pairs(b) do if a[k] == nil then return false end end
   return true
end

local A = setmetatable({}, {__call = function(_, cond, msg, ...)
   if not cond then error(msg or 'assertion failed', 2) end
   return cond, msg, ...
end})
function A.is_true(v, msg) if v ~= true then error(msg or ('expected true, got ' .. tostring(v)), 2) end end
function A.is_false(v, msg) if v ~= false then error(msg or ('expected false, got ' .. tostring(v)), 2) end end
function A.truthy(v, msg) if not v then error(msg or ('expected a truthy value, got ' .. tostring(v)), 2) end end
function A.falsy(v, msg) if v then error(msg or ('expected a falsy value, got ' .. tostring(v)), 2) end end
function A.equal(want, got, msg)
   if want ~= got then error(msg or string.format('expected %s, got %s', tostring(want), tostring(got)), 2) end
end
A.equals, A.are_equal = A.equal, A.equal
function A.same(want, got, msg) if not same(want, got) then error(msg or 'tables differ', 2) end end
A.are_same = A.same
function A.has_error(fn, msg) if pcall(fn) then error(msg or 'expected an error', 2) end end
A.has_no_error = function(fn) fn() end

_G.assert = A
_G.describe = function(name, fn)
   stack[#stack + 1] = name
   local saved = #before
   fn()
   for i = #before, saved + 1, -1 do before[i] = nil end
   stack[#stack] = nil
end
_G.before_each = function(fn) before[#before + 1] = fn end
_G.it = function(name, fn)
   local full = table.concat(stack, ' ') .. ' ' .. name
   if not wanted(full) then
      skipped = skipped + 1
      return
   end
   if after or broken then -- before the resume point, or after the GPU broke
      if after and full == after then after = nil end
      resumed_skips = resumed_skips + 1
      return
   end
   if trace then
      io.write('start ' .. full .. '\n')
      io.flush()
   end
   local t0 = os.clock()
   local ok, err = xpcall(function()
      for _, b in ipairs(before) do b() end
      fn()
   end, debug.traceback)
   if ok then
      passed = passed + 1
      io.write(string.format('ok    %s (%.2fs cpu)\n', full, os.clock() - t0))
   else
      failed = failed + 1
      failures[#failures + 1] = full .. '\n' .. tostring(err)
      io.write(string.format('FAIL  %s\n%s\n', full, tostring(err)))
      local why = gpu_broken()
      if why then
         broken = full
         io.write(string.format('STICKY  %s: the GPU no longer works after this test (%s); no later test runs here\n',
                                full, (why:gsub('\n.*', ''))))
      end
   end
   io.flush()
end
_G.pending = function(name) io.write('skip  ' .. tostring(name) .. '\n') end

for _, path in ipairs(specs) do
   io.write('== ' .. path .. '\n')
   local chunk, err = loadfile(path)
   if not chunk then
      failed = failed + 1
      failures[#failures + 1] = path .. ': ' .. tostring(err)
      io.write('FAIL  loading ' .. path .. ': ' .. tostring(err) .. '\n')
   else
      local ok, e = xpcall(chunk, debug.traceback)
      if not ok then
         failed = failed + 1
         failures[#failures + 1] = path .. ': ' .. tostring(e)
         io.write('FAIL  running ' .. path .. ': ' .. tostring(e) .. '\n')
      end
   end
end
io.write(string.format('%d passed, %d failed%s%s\n', passed, failed,
   skipped > 0 and string.format(', %d not selected by NR_SPEC_FILTER', skipped) or '',
   resumed_skips > 0 and string.format(', %d not run (%s)', resumed_skips,
                                       broken and 'after the GPU broke' or 'before NR_SPEC_AFTER') or ''))
if after then
   io.write('NR_SPEC_AFTER=' .. after .. ' names no test\n')
   os.exit(1)
end
if #filters > 0 and passed + failed == 0 then
   io.write('NR_SPEC_FILTER=' .. os.getenv('NR_SPEC_FILTER') .. ' selected no test (a typo?)\n')
   os.exit(1)
end
if broken then os.exit(3) end
os.exit(failed == 0 and 0 or 1)

-- The nrlua executable: version/help, -e, running files with arguments, script errors, and the
-- REPL fed from a pipe (expressions print, multi-line statements, errors do not end the session).
local nrffi = require 'nr.ffi'

local util = require 'tests.lua.spec_util'
local nrlua, run = util.nrlua, util.run

local tmp = os.getenv('NR_TEST_TMP') or '/tmp'
os.execute('mkdir -p ' .. tmp)

-- Writes text to path; returns path.
local function write(path, text)
   local g = assert(io.open(path, 'w'))
   g:write(text)
   g:close()
   return path
end

-- Runs the REPL with text on its stdin (through a file): output, exit status.
local function piped(exe, text)
   return run(exe .. ' < ' .. write(tmp .. '/repl_input.txt', text))
end

describe('nrlua', function()
   local exe = nrlua()

   it('prints its version and help', function()
      local out, rc = run(exe .. ' -v')
      assert.equal(0, rc)
      assert.matches('nrlua 0%.1%.0', out)
      out, rc = run(exe .. ' --help')
      assert.equal(0, rc)
      assert.matches('usage: nrlua', out)
      out, rc = run(exe .. ' --bogus')
      assert.equal(2, rc)
      assert.matches('unknown option', out)
   end)

   it('runs -e code with nr available', function()
      local out, rc = run(exe .. [[ -e "local nr = require 'nr'; print(nr.zeros({2, 3}):numel())"]])
      assert.equal(0, rc)
      assert.matches('^6', out)
   end)

   it('applies NR_THREADS whenever the library loads, not only through require "nr"', function()
      -- a recipe that never requires 'nr' reaches the library through nr.train -> nr.ffi
      local out, rc = run('NR_THREADS=3 ' .. exe .. [[ -e "print(require('nr.ffi').C.nr_get_num_threads())"]])
      assert.equal(0, rc)
      assert.matches('^3', out)
      out, rc = run('NR_THREADS=two ' .. exe .. [[ -e "require 'nr'"]])
      assert.not_equal(0, rc)
      assert.matches('NR_THREADS must be a whole number of threads in 0%.%.4096 %(0 = all cores%), got "two"', out)
   end)

   it('runs a file with arguments in arg', function()
      local path = tmp .. '/args.lua'
      local f = io.open(path, 'w')
      f:write("print(arg[0], arg[1], arg[2], select('#', ...))\n")
      f:close()
      local out, rc = run(exe .. ' ' .. path .. ' a b')
      assert.equal(0, rc)
      assert.matches('args%.lua\ta\tb\t2', out)
   end)

   it('reports script errors with a traceback and a non-zero status', function()
      local path = tmp .. '/err.lua'
      local f = io.open(path, 'w')
      f:write("local nr = require 'nr'\nlocal function f(t) return t.x.y end\nf({})\n")
      f:close()
      local out, rc = run(exe .. ' ' .. path)
      assert.equal(1, rc)
      assert.truthy(out:find("err.lua:2: attempt to index field 'x'", 1, true), out)
      assert.matches('stack traceback', out)
      -- a tensor method's check (a shape mismatch), called as a method or through an operator:
      -- at the user's line, the method named, no traceback through the library
      for _, expr in ipairs({'a:add(nr.zeros({4}))', 'a + nr.zeros({4})', 'a:mul_(nr.zeros({4}))'}) do
         f = io.open(path, 'w')
         f:write("local nr = require 'nr'\nlocal a = nr.zeros({2, 3})\nlocal b = " .. expr .. "\n")
         f:close()
         out, rc = run(exe .. ' ' .. path)
         assert.equal(1, rc)
         assert.truthy(out:find('err.lua:3: Tensor:' .. (expr:match(':([%a_]+)') or 'add') .. ': shapes (2, 3) and (4) do not broadcast',
            1, true), out)
         assert.is_nil(out:find('stack traceback', 1, true), out)
      end
      -- a message without a code position (the library about the user's configuration) comes
      -- alone, unless NR_TRACEBACK=1
      local cfg = tmp .. '/cfg.lua'
      f = io.open(cfg, 'w')
      f:write("error('nr.train: epochs must be >= 1, got 0', 0)\n")
      f:close()
      out, rc = run(exe .. ' ' .. cfg)
      assert.equal(1, rc)
      assert.matches('epochs must be >= 1', out)
      assert.is_nil(out:find('stack traceback', 1, true))
      out, rc = run('NR_TRACEBACK=1 ' .. exe .. ' ' .. cfg)
      assert.equal(1, rc)
      assert.truthy(out:find('stack traceback', 1, true))
      -- a script written to tmp/name and run (with args): it fails; its output
      local function fails(name, text, args)
         local fh = io.open(tmp .. '/' .. name, 'w')
         fh:write(text)
         fh:close()
         local o, r = run(exe .. ' ' .. tmp .. '/' .. name .. (args and (' ' .. args) or ''))
         assert.equal(1, r, o)
         return o
      end
      -- a syntax error: its position is in the user's file; no traceback into nrlua's loader
      out = fails('syn.lua', 'local x = = 1\n')
      assert.truthy(out:find('syn.lua:1: unexpected symbol near', 1, true), out)
      assert.is_nil(out:find('stack traceback', 1, true), out)
      -- a check of the library raised inside the library (a recipe section nr.train hands on):
      -- the message alone, not a position inside nrlua and a traceback through it
      local loader = "local nr, train = require 'nr', require 'nr.train'\n"
         .. "local l = train.memory_loader(nr.randn({8, 1, 4, 4}), nr.zeros({8}, {dtype = 'int64'}), {batch = 4})\n"
      out = fails('badopt.lua', loader
         .. "return {model = nr.nn.Sequential(nr.nn.Conv2d(1, 2, 3), nr.nn.BatchNorm2d(2), nr.nn.GlobalAvgPool2d()),\n"
         .. "   data = {train = l}, classes = 2, nr = {lambda = {dL = 1}}}\n", '--out ' .. tmp .. '/badopt')
      assert.truthy(out:find('nrlua: nr.rejuvenate.attach (lambda): unknown option "dL"', 1, true), out)
      assert.is_nil(out:find('stack traceback', 1, true), out)
      assert.is_nil(out:find('/lua/nr/', 1, true), out)
      -- called from the user's code: shown at the user's line (still no traceback into nrlua)
      out = fails('direct.lua', "local nr = require 'nr'\n"
         .. "local m = nr.nn.Sequential(nr.nn.Conv2d(3, 4, 3), nr.nn.BatchNorm2d(4))\n"
         .. "local u = nr.utilization(m, {3, 8, 8}, {threshold = 'x'})\n")
      assert.truthy(out:find('direct.lua:3: nr.utilization: threshold must be', 1, true), out)
      assert.is_nil(out:find('stack traceback', 1, true), out)
      -- the zoo's checks (models/*.lua, its own and those of the shared helpers) the same way
      for _, call in ipairs({'nr.models.resnet{depht = 50}', 'nr.models.resnet{depth = 20}',
                             "nr.models.densenet{dataset = 'cifar10', growth = 1/0}"}) do
         out = fails('zoo.lua', "local nr = require 'nr'\n\nlocal m = " .. call .. "\n")
         assert.truthy(out:find('nrlua: [^\n]*zoo.lua:3: nr.models.%a+: '), out)
         assert.is_nil(out:find('stack traceback', 1, true), out)
      end
      -- an error in the recipe's own code inside the training loop (a hook): the traceback is
      -- the one from where it happened (the trainer's catch-and-raise replaced it with its own)
      out = fails('hookerr.lua', loader
         .. "local function my_check(tr) if tr.step == 2 then error('my hook failed') end end\n"
         .. "return {model = nr.nn.Sequential(nr.nn.Conv2d(1, 2, 3), nr.nn.GlobalAvgPool2d()), data = {train = l},\n"
         .. "   classes = 2, epochs = 1, device = 'cpu', progress = false,\n"
         .. "   hooks = {after_step = function(tr) my_check(tr) end}}\n", '--overwrite --out ' .. tmp .. '/hookrun')
      assert.truthy(out:find('hookerr.lua:3: my hook failed\nstack traceback:\n\t[^\n]*hookerr.lua:3: in function \'my_check\''), out)
      assert.truthy(out:find('hookerr.lua:6: in function', 1, true), out)
      local _, n = out:gsub('stack traceback:', '')
      assert.equal(1, n, out)
   end)

   it('-i FILE runs the REPL after the script; - reads the script from stdin', function()
      local path = tmp .. '/setglob.lua'
      local f = io.open(path, 'w'); f:write('y = 42\n'); f:close()
      local out, rc = run(exe .. ' -i ' .. path .. ' < ' .. write(tmp .. '/repl_i.txt', 'print("in repl", y)\n'))
      assert.equal(0, rc)
      assert.truthy(out:find('in repl\t42', 1, true), out)
      out, rc = run(exe .. ' - a b < ' .. write(tmp .. '/stdin_script.lua', 'print("from stdin", ...)\n'))
      assert.equal(0, rc)
      assert.truthy(out:find('from stdin\ta\tb', 1, true), out)
   end)

   it('NRLUA_LIB and NRLUA_HOME name what runs: one that cannot be used is an error, not replaced', function()
      local out, rc = run('NRLUA_LIB=/nonexistent/libnr.so ' .. exe .. [[ -e "require 'nr'"]])
      assert.equal(1, rc)
      assert.truthy(out:find('cannot load NRLUA_LIB=/nonexistent/libnr.so', 1, true), out)
      out, rc = run('NRLUA_HOME=/nonexistent ' .. exe .. ' -e "print(1)"')
      assert.equal(1, rc)
      assert.truthy(out:find('NRLUA_HOME=/nonexistent has no lua/nr/init.lua', 1, true), out)
      out, rc = run('NR_THREADS=0x2 ' .. exe .. [[ -e "require 'nr'"]])
      assert.equal(1, rc)
      assert.truthy(out:find('got "0x2"', 1, true), out)
      -- an empty NR_DATA is unset, as in nr.data.dataset: the recipes' roots are data/...
      out, rc = run('NR_DATA= ' .. exe .. [[ -e "print(require('nr.data').root('imagenet'))"]])
      assert.equal(0, rc)
      assert.truthy(out:find('^data/imagenet'), out)
      out = run('NR_DATA=/d ' .. exe .. [[ -e "print(require('nr.data').root('cifar10'))"]])
      assert.truthy(out:find('^/d/cifar10'), out)
   end)

   it('evaluates piped REPL input: values, multi-line statements, errors', function()
      local script = table.concat({
         'x = nr.ones({2, 2})',
         'x:sum()',
         'for i = 1, 2 do',
         '  print("line", i)',
         'end',
         'nr.zeros({2}):add(nr.zeros({3}))',
         '1 + 1',
         'function f(a)',
         '  return a * 3',
         'end',
         'f(5)',
      }, '\n')
      local out, rc = piped(exe, script .. '\n')
      -- the session goes on after an error, and a piped session reports it in its exit status
      assert.equal(1, rc)
      assert.matches('\n?4\n', out)
      assert.matches('line\t1\nline\t2', out)
      assert.matches('do not broadcast', out)
      assert.matches('\n2\n', out)
      assert.matches('15', out)
      -- nr.models raises for names it lacks: shown as a table, not as a failed module probe
      local o8, rc8 = piped(exe, 'nr.models\n')
      assert.equal(0, rc8, o8)
      assert.truthy(o8:find('resnet = function', 1, true), o8)
      local o2, rc2 = piped(exe, 'y = 2\ny * 3\n1, nil, 3\n')
      assert.equal(0, rc2)
      assert.matches('6\n1\nnil\n3\n', o2)
      local o3, rc3 = piped(exe, 'error("boom")\n')          -- the position survives (no tail call)
      assert.equal(1, rc3)
      assert.truthy(o3:find('stdin:1: boom', 1, true), o3)
      local o4, rc4 = piped(exe, 'for i = 1, 2 do\nprint(i)\n')  -- unfinished at the end of input
      assert.equal(1, rc4)
      assert.truthy(o4:find("'end' expected", 1, true), o4)
      local o6, rc6 = piped(exe, 'error(setmetatable({}, {__tostring = function() error("bad") end}))\nprint("after")\n')
      assert.equal(1, rc6)                                        -- an error object that cannot be shown
      assert.truthy(o6:find('an error object whose __tostring failed', 1, true) and o6:find('after', 1, true), o6)
      -- exit / quit as in Python's REPL: alone they say how to leave, called they leave
      local o7, rc7 = piped(exe, 'exit\nquit\nprint("still here")\nexit(3)\nprint("gone")\n')
      assert.equal(3, rc7)
      assert.truthy(o7:find('use exit() or Ctrl-D to leave nrlua\nuse quit() or Ctrl-D to leave nrlua\nstill here\n', 1, true), o7)
      assert.is_nil(o7:find('gone', 1, true), o7)
      local o5, rc5 = piped(exe, 'setmetatable({}, {__tostring = function() error("bad tostring") end})\nprint("after")\n')
      assert.equal(1, rc5)                                        -- printing the value failed
      assert.truthy(o5:find('bad tostring', 1, true) and o5:find('after', 1, true), o5)
   end)

   it('keeps top-level locals between REPL inputs (pasted snippets work); =expr prints', function()
      local script = table.concat({
         "local nr = require 'nr'",
         'local x, n = nr.ones({2, 3}), 2',
         'local unset',
         'local function twice(v) local inner = v; return inner * n end',
         'x:sum(), twice(4), unset, inner',
         'for i = 1, 1 do local loopvar = i end',
         '= loopvar',
         "s = 'local q = 1' -- local r = 2",
         '= q, r',
         "local type, table --[[ names the library calls ]] = 'float32', {}",
         'local a, --[[ two ]] b = 3, 4',
         '= nr.zeros({2}):add(a + b):sum(), type, _G.type == nil',
         '= loadstring("return a + b")()',                -- other chunks see the session's names
      }, '\n')
      local out, rc = piped(exe, script .. '\n')
      assert.equal(0, rc, out)
      -- only the top level: a function's or a loop's locals stay local; strings and comments untouched;
      -- the session's names never replace the globals the library calls
      assert.equal('6\n8\nnil\nnil\nnil\nnil\nnil\n14\nfloat32\nfalse\n7\n', out)
   end)

   it('completes names in the nr namespace', function()
      local cli = require 'nr.cli'
      _G.nr = require 'nr'
      local c = cli.complete('nr.ze', 'nr.ze')
      assert.same({'nr.zeros'}, c)
      local n = cli.complete('nr.n', 'nr.n')
      local found = false
      for _, v in ipairs(n) do if v == 'nr.nn' then found = true end end
      assert.is_true(found)
      -- a lazily loaded name not yet used is offered too (nr.checkpoint, nr.dist and nr.profile
      -- were missing from a list of their own)
      for _, name in ipairs({'checkpoint', 'profile', 'dist'}) do
         local loaded = rawget(nr, name)
         rawset(nr, name, nil)
         local got = cli.complete('nr.' .. name:sub(1, 3), 'nr.' .. name:sub(1, 3))
         rawset(nr, name, loaded)
         local has = false
         for _, v in ipairs(got) do has = has or v == 'nr.' .. name end
         assert.is_true(has, name .. ': ' .. table.concat(got, ' '))
      end
   end)

   it('finds the package from its own location', function()
      assert.is_truthy(nrffi.home)
      assert.is_truthy(io.open(nrffi.home .. '/lua/nr/init.lua'))
   end)
   -- Ctrl-C: the host's SIGINT hook raises "interrupted" at the next Lua instruction. The loops run
   -- with the JIT off: a loop compiled into one trace checks no hooks (a second SIGINT kills it).
   -- `set -m`: a non-interactive shell starts background jobs with SIGINT ignored. A SIGINT ignored
   -- when this spec started (ctest run as a background job: `ctest &`, nohup) passes to every child
   -- and no shell can undo it, so nrlua keeps ignoring it (as it should) and the loop never ended:
   -- the shell gets SIGINT's default action from here. The kill waits for "ready" as long as the
   -- process lives (a fixed wait sent it early on a loaded machine, before the hook was set).
   local ffi = require 'ffi'
   pcall(ffi.cdef, 'typedef void (*nr_spec_sighandler)(int); nr_spec_sighandler signal(int sig, nr_spec_sighandler h);')
   local function interrupt(cmd, sig)
      local out = tmp .. '/sigint_out.txt'
      os.remove(out)
      local was = ffi.C.signal(2, nil)   -- SIGINT: SIG_DFL for the shell below
      local ok, text, rc = pcall(run, "bash -c 'set -m; " .. cmd .. " > " .. out .. " 2>&1 & pid=$!; " ..
         "while kill -0 $pid 2>/dev/null && ! grep -q ready " .. out .. "; do sleep 0.1; done; " ..
         "kill -" .. (sig or 'INT') .. " $pid; wait $pid; echo \"::status=$?\"; cat " .. out .. "'")
      ffi.C.signal(2, was)
      assert(ok, text)
      return text, rc
   end

   it('ends a script on SIGINT with "interrupted" and status 130', function()
      local f = write(tmp .. '/sigint_loop.lua',
         "jit.off()\nio.write('ready\\n') io.flush()\nlocal t = 0\nwhile true do t = t + math.sin(t) end\n")
      local out = interrupt(exe .. ' ' .. f)
      assert.matches('::status=130', out, 1, true)
      assert.matches('nrlua: interrupted\n', out, 1, true)
      assert.is_nil(out:find('traceback', 1, true))
   end)

   it('ends a script on SIGTERM as on SIGINT (the run says how to resume), with status 143', function()
      local f = write(tmp .. '/sigterm_loop.lua',
         "jit.off()\nio.write('ready\\n') io.flush()\nlocal t = 0\nwhile true do t = t + math.sin(t) end\n")
      local out = interrupt(exe .. ' ' .. f, 'TERM')
      assert.matches('::status=143', out, 1, true)
      assert.matches('nrlua: interrupted\n', out, 1, true)
      -- the REPL: the statement unwinds, then the process ends (a SIGINT only cancels it)
      f = write(tmp .. '/sigterm_repl.txt',
         "x = 41\njit.off(); io.write('ready\\n'); io.flush(); while true do x = x + 0 end\nprint('after', x + 1)\n")
      out = interrupt(exe .. ' < ' .. f, 'TERM')
      assert.matches('::status=143', out, 1, true)
      assert.is_nil(out:find('after', 1, true), out)
   end)

   it('the Ctrl-C hint repeats the command with its flags, --resume in place of --out', function()
      local cli = require 'nr.cli'
      local was_args, was_train = cli.args, package.loaded['nr.train']
      local dir = tmp .. '/hint run'
      os.execute(string.format("mkdir -p '%s/checkpoint' && echo step-00000003 > '%s/checkpoint/latest'", dir, dir))
      cli.args = {'--epochs', '3', '--out', dir, '--overwrite', '--data.train_batches', '30', '--lr=0.1'}
      package.loaded['nr.train'] = {running = {metrics = true, out = dir, epoch = 1, step = 5}}
      local ok, msg = pcall(cli.interrupted, 'recipes/x.lua')
      cli.args, package.loaded['nr.train'] = was_args, was_train
      assert(ok, msg)
      assert.equal(string.format("interrupted at epoch 1 step 5; %s resumes from its last checkpoint (step-00000003): "
         .. "nrlua recipes/x.lua --epochs 3 --data.train_batches 30 --lr=0.1 --resume '%s'", dir, dir), msg)
      -- before the first checkpoint: the same command starts it again
      os.remove(dir .. '/checkpoint/latest')
      cli.args = {'--out', dir, '--epochs', '1'}
      package.loaded['nr.train'] = {running = {metrics = true, out = dir, epoch = 1, step = 2}}
      ok, msg = pcall(cli.interrupted, 'recipes/x.lua')
      cli.args, package.loaded['nr.train'] = was_args, was_train
      assert(ok, msg)
      assert.equal(string.format("interrupted at epoch 1 step 2; %s has no checkpoint yet (the first is written at the end "
         .. "of an epoch); nrlua recipes/x.lua --epochs 1 --resume '%s' starts it again from the beginning", dir, dir), msg)
   end)

   it('a recipe with progress = false prints nothing; the run folder still has its log', function()
      local dir = tmp .. '/quiet'
      os.execute(string.format("mkdir -p '%s'", dir))
      local f = assert(io.open(dir .. '/quiet.lua', 'w'))
      f:write([[
local nr = require 'nr'
local train = require 'nr.train'
nr.manual_seed(1)
local x, y = nr.randn({64, 1, 8, 8}), nr.randint(0, 3, {64}, {dtype = 'int64'})
return {
   model = nr.nn.Sequential(nr.nn.Conv2d(1, 4, 3, {padding = 1}), nr.nn.ReLU(), nr.nn.GlobalAvgPool2d(),
      nr.nn.Linear(4, 3)),
   data = {train = train.memory_loader(x, y, {batch = 16}), val = train.memory_loader(x, y, {batch = 32})},
   classes = 3, epochs = 1, device = 'cpu', log_every = 1, progress = false,
}
]])
      f:close()
      local out, rc = run(string.format("%s '%s/quiet.lua' --out '%s/run' --overwrite", nrlua(), dir, dir))
      assert.equal(0, rc, out)
      assert.equal('', out)
      local m = assert(io.open(dir .. '/run/metrics.jsonl'))
      assert.truthy(m:read('*a'):find('"kind":"epoch"', 1, true))
      m:close()
   end)

   it('cancels the running REPL input on SIGINT and goes on', function()
      local f = write(tmp .. '/sigint_repl.txt',
         "x = 41\njit.off(); io.write('ready\\n'); io.flush(); while true do x = x + 0 end\nprint('after', x + 1)\n")
      local out = interrupt(exe .. ' < ' .. f)
      assert.matches('interrupted\n', out, 1, true)
      assert.matches('after\t42', out, 1, true)
      assert.matches('::status=1\n', out, 1, true)   -- piped: a failed input is the exit status
   end)
end)

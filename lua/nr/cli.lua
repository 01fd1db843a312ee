-- nr.cli — what the nrlua host calls: run a file or a chunk, evaluate REPL input, complete
-- names. A file that returns a table is a recipe: it is handed to nr.recipe.run with the
-- command-line arguments (--field value overrides). REPL inputs run in a session table (M.env),
-- their top-level locals carry over (globalize_locals) and `=expr` prints; after a Ctrl-C,
-- M.interrupted says how to resume the run. The host (core/host/nrlua.c) owns line editing,
-- history and the SIGINT hook; this file owns Lua semantics so it can be tested without a terminal.
local M = {}

-- An error shown as its message alone: the host adds a traceback to messages that start with a
-- position, and a syntax error's position is in the user's file, not in a call chain worth showing.
local function plain_error(msg)
   error(setmetatable({}, {__tostring = function() return msg end}), 0)
end

-- Loads and runs a file ('-': standard input, as lua and luajit); recipes (returning a table)
-- go to nr.recipe.run.
function M.run_file(path, args)
   M.args = args or {}   -- for the --resume hint after a Ctrl-C
   local chunk, err = loadfile(path ~= '-' and path or nil)
   if not chunk then plain_error(err) end
   local results = {chunk(unpack(args or {}))}
   local r = results[1]
   if type(r) == 'table' and select('#', unpack(results)) == 1 and not getmetatable(r) then
      require('nr.recipe').run(r, args or {}, path)
   end
end

-- Ctrl-C ended the run of a file (the host then exits with status 130): the message to show.
-- While nr.train runs (train.running: the trainer, its metrics file open), it names the run
-- folder and how to continue it.
function M.interrupted(path)
   local tr = package.loaded['nr.train']
   local run = type(tr) == 'table' and tr.running
   if type(run) == 'table' and run.metrics and run.out then
      local f = io.open(run.out .. '/checkpoint/latest')
      local latest = f and f:read('*l')
      if f then f:close() end
      local at = string.format('interrupted at epoch %s step %s; ', tostring(run.epoch), tostring(run.step))
      -- the same command with its flags (the recipe is rebuilt from them), --resume in place of --out
      local quote, args, skip = require('nr.checkpoint').shell.quote, {}, {['--out'] = 1, ['--resume'] = 1, ['--overwrite'] = 0}
      local function q(a) return a:match('^[%w_./:=+%-]+$') and a or quote(a) end
      local i = 1
      while M.args and i <= #M.args do
         local a = M.args[i]
         local flag = a:match('^(%-%-[%w_.%-]+)=') or a
         if skip[flag] then
            i = i + ((a:find('=', 1, true) or skip[flag] == 0) and 1 or 2)
            if flag == '--overwrite' and M.args[i] and M.args[i]:match('^[tf]') then i = i + 1 end
         else
            args[#args + 1] = q(a)
            i = i + 1
         end
      end
      args[#args + 1] = '--resume ' .. q(run.out)
      local command = string.format('nrlua %s %s', q(path), table.concat(args, ' '))
      if not latest then
         return string.format('%s%s has no checkpoint yet (the first is written at the end of an epoch); %s starts it '
            .. 'again from the beginning', at, run.out, command)
      end
      return string.format('%s%s resumes from its last checkpoint (%s): %s', at, run.out, latest, command)
   end
   if type(tr) == 'table' then return 'interrupted (a run folder resumes from its last checkpoint: --resume DIR)' end
   return 'interrupted'
end

function M.run_code(code)
   local chunk, err = loadstring(code, '=(command line)')
   if not chunk then error(err, 0) end
   chunk()
end

-- Whether v is an nr.nn module (asked under pcall: nr.models raises for names it does not have).
local function is_module(v)
   local ok, yes = pcall(function() return type(v.forward) == 'function' and type(v.tree) == 'function' end)
   return ok and yes
end

-- Readable rendering of a REPL result.
local function show(v)
   local mt = type(v) == 'table' and getmetatable(v)
   if mt and mt.__typename == 'nr.Tensor' then return tostring(v) end
   if type(v) == 'table' and is_module(v) then return v:tree() end
   if type(v) == 'table' and not (mt and mt.__tostring) then
      local parts, n = {}, 0
      for k, x in pairs(v) do
         n = n + 1
         if n > 20 then parts[#parts + 1] = '...'; break end
         local xs = type(x) == 'table' and (getmetatable(x) and tostring(x):match('^[^\n]*') or '{...}') or tostring(x)
         parts[#parts + 1] = (type(k) == 'string' and k or ('[' .. tostring(k) .. ']')) .. ' = ' .. xs
      end
      return '{' .. table.concat(parts, ', ') .. '}'
   end
   return tostring(v)
end
M.show = show

-- Evaluates one REPL input. Returns true when the input is an incomplete statement (the host
-- then reads a continuation line). Expressions print their values; an error prints its message
-- and traceback (without the REPL's own frames) and the session goes on.
-- M.failures counts the inputs that failed (the host's exit status when stdin is not a terminal).
M.failures = 0
local function report(msg)
   local ok, text = pcall(tostring, msg) -- an error object whose __tostring fails is a failed input too
   if not ok then text = '(an error object whose __tostring failed: ' .. tostring(text) .. ')' end
   local tb = text:gsub('\n%s*%[C%]: in function \'xpcall\'.*$', '')
   if text:match('^[^\n]*interrupted\n') then tb = 'interrupted' end  -- Ctrl-C (the host's hook)
   io.stderr:write(tb, '\n')
   io.stderr:flush()
   M.failures = M.failures + 1
end

-- every value, nils included (unpack / # stop at the first hole)
local function pack(...) return {n = select('#', ...), ...} end

-- REPL inputs are chunks of their own, so a `local` would be gone by the next line (DESIGN.md
-- and README snippets start with `local nr = require 'nr'`). globalize_locals rewrites the
-- declarations at the chunk's top level into global assignments (`local x = 1` -> `x = 1`,
-- `local x` -> `x = nil`, `local function f` -> `function f`); locals inside functions and blocks
-- stay local. It scans tokens, skipping strings and comments, and counts block depth (function,
-- if, do, repeat open; end, until close: a while/for body opens with its `do`).
local OPEN = {['function'] = true, ['if'] = true, ['do'] = true, ['repeat'] = true}
local CLOSE = {['end'] = true, ['until'] = true}
local function long_bracket_end(src, i)  -- i at '[': the end of a [[...]] / [==[...]==] long string, or nil
   local eq = src:match('^%[(=*)%[', i)
   if not eq then return nil end
   local _, e = src:find(']' .. eq .. ']', i + #eq + 2, true)
   return e or #src
end
-- The first position at or after j that is not whitespace or a comment.
local function skip_blank(src, j)
   while true do
      local k = src:match('^%s*()', j)
      if src:sub(k, k + 1) ~= '--' then return k end
      local e = src:sub(k + 2, k + 2) == '[' and long_bracket_end(src, k + 2)
      j = (e or src:find('\n', k, true) or #src) + 1
   end
end

function M.globalize_locals(src)
   local out, depth, i, n = {}, 0, 1, #src
   local last = 1 -- src[last..] is not yet copied to out
   while i <= n do
      local c = src:sub(i, i)
      if c == '-' and src:sub(i, i + 1) == '--' then
         local e = src:sub(i + 2, i + 2) == '[' and long_bracket_end(src, i + 2)
         i = (e or (src:find('\n', i, true) or n)) + 1
      elseif c == '"' or c == "'" then
         local j = i + 1
         while j <= n and src:sub(j, j) ~= c do j = j + (src:sub(j, j) == '\\' and 2 or 1) end
         i = j + 1
      elseif c == '[' and long_bracket_end(src, i) then
         i = long_bracket_end(src, i) + 1
      elseif c:match('[%a_]') then
         local word = src:match('^[%w_]+', i)
         local after = i + #word
         if OPEN[word] then depth = depth + 1
         elseif CLOSE[word] then depth = depth - 1
         elseif word == 'local' and depth == 0 and not src:sub(i - 1, i - 1):match('[%w_.:]') then
            local fn = src:match('^%s+function%f[^%w_]', after)
            if fn then
               out[#out + 1] = src:sub(last, i - 1)
               last = after + #fn - #'function'  -- keeps `function NAME`: its body opens a block below
            else
               -- the name list NAME {, NAME} (comments may sit anywhere in it), then `=` or not
               local j = skip_blank(src, after)
               local name = src:match('^[%a_][%w_]*', j)
               if name then
                  local list, names_end = {name}, j + #name
                  while true do
                     local k = skip_blank(src, names_end)
                     if src:sub(k, k) ~= ',' then break end
                     k = skip_blank(src, k + 1)
                     local more = src:match('^[%a_][%w_]*', k)
                     if not more then break end
                     list[#list + 1], names_end = more, k + #more
                  end
                  local k = skip_blank(src, names_end)
                  out[#out + 1] = src:sub(last, i - 1)
                  if src:sub(k, k) == '=' and src:sub(k + 1, k + 1) ~= '=' then
                     last = after                                  -- only `local` goes
                  else
                     out[#out + 1] = table.concat(list, ', ') .. ' = nil'
                     last = names_end
                  end
               end
            end
         end
         i = after
      elseif c:match('%d') then
         i = i + #src:match('^[%w_.]+', i)
      else
         i = i + 1
      end
   end
   out[#out + 1] = src:sub(last)
   return table.concat(out)
end

-- The REPL's globals: what the session assigns goes to _G (dofile'd scripts and loadstring see
-- it, as in the standard REPL), except the names of the globals present when the REPL started
-- (`type`, `next`, `table`, ...): those stay in the session table, so a `local type = 'float32'`
-- never replaces what the library's code calls.
local STARTUP = {}
for k in pairs(_G) do STARTUP[k] = true end
M.env = setmetatable({}, {__index = _G, __newindex = function(t, k, v)
   if STARTUP[k] then rawset(t, k, v) else _G[k] = v end
end})
-- `exit` / `quit` as Python's REPL has them: called, they end the session (os.exit(code)); typed
-- alone, they say how (a bare `exit` printed nil)
for _, name in ipairs({'exit', 'quit'}) do
   rawset(M.env, name, setmetatable({}, {
      __call = function(_, code) os.exit(code == nil and 0 or code) end,
      __tostring = function() return 'use ' .. name .. '() or Ctrl-D to leave nrlua' end,
   }))
end

-- final: no more input will come, so an incomplete statement is an error, not a request for more.
-- `=expr` prints expr, as in the standard Lua REPL.
function M.eval(src, final)
   if src:match('^%s*=') then src = src:gsub('^%s*=', '', 1) end
   -- an expression's values are returned through select, not as a tail call: `error("x")` keeps
   -- its "stdin:1:" position (a tail call drops the chunk's frame); the newline lets src end in a
   -- comment
   local chunk, err = loadstring('local __nr_select = select; return __nr_select(1, ' .. src .. '\n)', '=stdin')
   if not chunk then
      chunk, err = loadstring(M.globalize_locals(src), '=stdin')
      if not chunk then
         if err:match('<eof>') and not final then return true end
         report(err)
         return false
      end
   end
   setfenv(chunk, M.env)
   local results = pack(xpcall(chunk, debug.traceback))
   if not results[1] then
      report(results[2])
      return false
   end
   for i = 2, results.n do
      local ok, text = xpcall(show, debug.traceback, results[i])   -- a failing __tostring is an input error too
      if not ok then
         report(text)
         return false
      end
      io.write(text, '\n')
   end
   io.flush()
   return false
end

-- Completion candidates for `text` (the word under the cursor), e.g. "nr.nn.Co" -> {...}.
function M.complete(line, text)
   local prefix, sep, partial = text:match('^(.*)([%.:])([%w_]*)$')
   local base
   if prefix then
      base = M.env
      for part in prefix:gmatch('[^%.:]+') do
         if type(base) ~= 'table' then return {} end
         base = base[part]
      end
   else
      base, prefix, sep, partial = M.env, '', '', text
   end
   local out, seen = {}, {}
   local function add_keys(tbl)
      if type(tbl) ~= 'table' then return end
      for k in pairs(tbl) do
         if type(k) == 'string' and k:sub(1, #partial) == partial and not seen[k] and k:sub(1, 2) ~= '__' then
            seen[k] = true
            out[#out + 1] = prefix .. sep .. k
         end
      end
   end
   add_keys(base)
   local mt = getmetatable(base)
   -- lazily loaded names (nr.checkpoint before its first use): offer them too
   for _, k in ipairs(mt and mt.lazy_names or {}) do
      if k:sub(1, #partial) == partial and not seen[k] then seen[k] = true; out[#out + 1] = prefix .. sep .. k end
   end
   while mt and type(mt.__index) == 'table' do
      add_keys(mt.__index)
      mt = getmetatable(mt.__index)
   end
   table.sort(out)
   return out
end

return M

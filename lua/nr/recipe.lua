-- nr.recipe — recipes on the command line: `nrlua recipes/X.lua --epochs 3 --lr 0.05 ...`.
--
-- What it is: nr.recipe.run(tbl, args, path) (called by nr.cli for a file that returns a table)
-- applies command-line overrides to the recipe and runs it with nr.train; --help lists every
-- field with its value; nr.recipe.apply(tbl, args) is the parser alone (tests, tools).
-- Overrides: any field by its dotted path (--optim.lr 0.05, --nr.lambda.value 3e-4,
-- --schedule.milestones 150,225, --flag=value also works) and short aliases (ALIASES below).
-- Values are parsed by the field's type: numbers, integers, booleans (true/false/on/off/yes/no/
-- 1/0), strings, lists (comma separated); `--nr off` (or --nr on) switches a table's `enabled`.
-- An unknown flag or a value of the wrong type is an error that names the flag.
-- What it is not: the trainer (nr.train) or the place defaults live (nr.train.DEFAULTS).
local train = require 'nr.train'
local ck = require 'nr.checkpoint'

local M = {}

M.ALIASES = {
   lr = 'optim.lr', momentum = 'optim.momentum', wd = 'optim.weight_decay', ['weight-decay'] = 'optim.weight_decay',
   batch = 'data.batch', data = 'data.root', dataset = 'data.dataset', augment = 'data.augment',
   schedule = 'schedule.name', workers = 'data.threads',
}

-- Fields whose default is nil (so a table walk cannot see them) and integer fields.
M.TYPES = {
   name = 'string', out = 'string', resume = 'string', device = 'string', overwrite = 'boolean',
   epochs = 'integer', seed = 'integer', threads = 'integer', log_every = 'integer', eval_every = 'integer',
   checkpoint_every = 'integer', keep = 'integer',
   ['data.dataset'] = 'string', ['data.root'] = 'string', ['data.batch'] = 'integer',
   ['data.eval_batch'] = 'integer', ['data.threads'] = 'integer', ['data.size'] = 'integer',
   ['data.train_batches'] = 'cap', ['data.val_batches'] = 'cap', ['data.seed'] = 'integer',
   ['data.train_split'] = 'string', ['data.val_split'] = 'split_or_off', ['data.augment'] = 'augment',
   ['data.output'] = 'string', ['data.drop_last'] = 'boolean',
   -- one augmentation setting (a recipe without an augment table gets one holding it: it replaces
   -- the dataset's default, so nr.train asks for data.augment.normalize too)
   ['data.augment.flip'] = 'boolean', ['data.augment.pad'] = 'integer', ['data.augment.crop'] = 'integer',
   ['data.augment.resize'] = 'integer', ['data.augment.center_crop'] = 'integer',
   ['data.augment.random_resized_crop'] = 'integer', ['data.augment.normalize'] = 'boolean',
   ['data.augment.channels'] = 'integer', ['data.augment.fast_decode'] = 'boolean',
   -- data parallelism (nr.dist.attach's options; docs/DISTRIBUTED.md), also where the recipe has no dist table
   ['dist.timeout'] = 'number', ['dist.algo'] = 'string', ['dist.bucket_mb'] = 'number', ['dist.overlap'] = 'boolean',
   ['dist.check_every'] = 'integer', ['dist.buffers'] = 'string', ['dist.enabled'] = 'boolean', ['dist.sync_bn'] = 'boolean',
   ['optim.name'] = 'string', ['optim.lr'] = 'number', ['optim.momentum'] = 'number',
   ['optim.weight_decay'] = 'number', ['optim.nesterov'] = 'boolean', ['optim.no_decay_bn_bias'] = 'boolean',
   ['optim.betas'] = 'list', ['optim.eps'] = 'number', ['optim.amsgrad'] = 'boolean',
   ['schedule.name'] = 'string', ['schedule.warmup'] = 'number', ['schedule.milestones'] = 'list',
   ['schedule.gamma'] = 'number', ['schedule.step_size'] = 'number', ['schedule.min_lr'] = 'number',
   ['schedule.warmup_start'] = 'number', ['schedule.epochs'] = 'number', ['schedule.granularity'] = 'string',
   ['loss.label_smoothing'] = 'number', max_epochs = 'integer', memory_format = 'string', clip_grad_norm = 'number',
   init = 'init', ['init.path'] = 'string', ['init.names'] = 'string', ['init.skip'] = 'list', eval = 'string',
   -- Neural Rejuvenation (nr.rejuvenate.attach's options; docs/NR.md)
   nr = 'switch', ['nr.enabled'] = 'boolean', ['nr.target'] = 'number', ['nr.budget'] = 'number',
   ['nr.constraint'] = 'string', ['nr.scheme'] = 'string', ['nr.rescale'] = 'boolean', ['nr.times'] = 'integer',
   ['nr.threshold'] = 'number', ['nr.abs_min'] = 'number', ['nr.gamma0'] = 'number', ['nr.active_epochs'] = 'integer',
   ['nr.hold_schedule'] = 'boolean', ['nr.extend_epochs'] = 'boolean', ['nr.optim_state'] = 'string',
   ['nr.linear_init'] = 'string', ['nr.generations'] = 'string', ['nr.lambda.mode'] = 'string', ['nr.lambda.init'] = 'number',
   ['nr.lambda.value'] = 'number', ['nr.lambda.dt'] = 'epoch_or_steps', ['nr.lambda.dr'] = 'number',
   ['nr.lambda.dl'] = 'number', ['nr.input_shape'] = 'list', ['nr.count.conv'] = 'boolean', ['nr.count.linear'] = 'boolean',
   ['nr.count.bn'] = 'boolean', ['nr.count.bias'] = 'boolean',
}

local BOOL = {['true'] = true, ['false'] = false, on = true, off = false, yes = true, no = false, ['1'] = true, ['0'] = false}

local function is_module(x) return type(x) == 'table' and type(x.forward) == 'function' end

local function type_of_value(v)
   if v == nil then return nil end
   local t = type(v)
   if t == 'number' then return math.floor(v) == v and 'number' or 'number' end
   if t == 'table' then
      if is_module(v) then return 'module' end
      if #v > 0 then return 'list' end
      return 'table'
   end
   return t
end

-- The type of a dotted path in the recipe (recipe value first, then TYPES, then defaults).
local function field_type(recipe, path)
   local known = M.TYPES[path]
   local v, d = recipe, train.DEFAULTS
   local exists = true
   for part in path:gmatch('[^.]+') do
      if type(v) ~= 'table' or is_module(v) then
         if type(v) == 'function' or is_module(v) then return nil, 'defined in the recipe file as code' end
         v, exists = nil, false
      else
         v = v[part]
      end
      d = type(d) == 'table' and d[part] or nil
   end
   if v ~= nil then
      local t = type_of_value(v)
      if known == 'integer' and t == 'number' then return 'integer' end
      if known == 'switch' or known == 'augment' or known == 'epoch_or_steps' or known == 'split_or_off' or known == 'init'
         or known == 'cap' then
         return known
      end
      if (t == 'table' or t == 'list') and known == 'list' then return 'list' end
      -- a recipe value of another type than its field's (out = 5): the flag takes the field's type
      -- (it was parsed as the wrong value's: "--out: expected a number")
      local SCALAR = {string = true, number = true, integer = true, boolean = true}
      if SCALAR[known] and SCALAR[t] then return known end
      return t
   end
   if known then return known end
   if d ~= nil then return type_of_value(d) end
   return nil, exists and 'not a field of this recipe' or 'not a field of this recipe'
end

-- Every flag path a recipe takes (the typed ones, nr.train's defaults, the recipe's own fields),
-- sorted: the candidates an unknown flag is matched against.
local function known_paths(recipe)
   local seen, out = {}, {}
   local function add(p) if not seen[p] then seen[p] = true; out[#out + 1] = p end end
   for p in pairs(M.TYPES) do add(p) end
   local function walk(t, prefix, depth)
      for k, v in pairs(t) do
         if type(k) == 'string' then
            local p = prefix and (prefix .. '.' .. k) or k
            if type(v) == 'table' and not is_module(v) and depth < 3 then walk(v, p, depth + 1) else add(p) end
         end
      end
   end
   walk(train.DEFAULTS, nil, 1)
   walk(recipe, nil, 1)
   table.sort(out)
   return out
end

local function parse_value(flag, ty, s, current)
   local function bad(what)
      error(string.format('%s: expected %s, got %q', flag, what, s), 0)
   end
   if ty == 'number' then
      return tonumber(s) or bad('a number')
   elseif ty == 'integer' then
      local n = tonumber(s)
      if not n or n ~= math.floor(n) then bad('an integer') end
      return n
   elseif ty == 'boolean' then
      local b = BOOL[s:lower()]
      if b == nil then bad('true or false') end
      return b
   elseif ty == 'string' then
      return s
   elseif ty == 'list' then
      local out = {}
      for item in s:gmatch('[^,%s]+') do out[#out + 1] = tonumber(item) or item end
      if #out == 0 and s:match('%S') then bad('a comma-separated list') end
      return out
   elseif ty == 'switch' then
      local b = BOOL[s:lower()]
      if b == nil then bad('on or off') end
      if type(current) == 'table' then
         local t = {}
         for k, v in pairs(current) do t[k] = v end
         t.enabled = b
         return t
      end
      return b and {enabled = true} or false
   elseif ty == 'init' then
      -- --init PATH: the path of the init table (a recipe's names and skip kept; --init.skip may follow)
      local t = {}
      for k, v in pairs(type(current) == 'table' and current or {}) do t[k] = v end
      t.path = s
      return t
   elseif ty == 'epoch_or_steps' then
      if s == 'epoch' then return s end
      local n = tonumber(s)
      if not n or n ~= math.floor(n) or n < 1 then bad('"epoch" or a number of steps >= 1') end
      return n
   elseif ty == 'cap' then
      -- a number of batches, or all: no cap (one a resumed or evaluated run had is lifted)
      if s == 'all' then return nil end
      local n = tonumber(s)
      if not n or n ~= math.floor(n) then bad('an integer, or all') end
      return n
   elseif ty == 'split_or_off' then
      -- a split name, or off / false / none for no evaluation ("false" was taken as a split name)
      if BOOL[s:lower()] == false or s == 'none' then return false end
      return s
   elseif ty == 'augment' then
      local b = BOOL[s:lower()]
      if b == false or s == 'none' then return false end
      if b == true or s == 'default' then return nil end
      bad('off, default')
   end
   bad('a value for a field of type ' .. tostring(ty))
end

local function set_path(recipe, path, value)
   local parts = {}
   for part in path:gmatch('[^.]+') do parts[#parts + 1] = part end
   local t = recipe
   for i = 1, #parts - 1 do
      local v = t[parts[i]]
      -- a section that is off (false, e.g. schedule = false for a constant LR) is turned on by
      -- setting one of its fields
      if v == nil or v == false then
         v = {}
         t[parts[i]] = v
      elseif type(v) ~= 'table' then
         error(string.format('--%s: %s is a %s in the recipe, not a table of fields', path,
            table.concat(parts, '.', 1, i), type(v)), 0)
      end
      t = v
   end
   t[parts[#parts]] = value
end

local function get_path(recipe, path)
   local v = recipe
   for part in path:gmatch('[^.]+') do
      if type(v) ~= 'table' then return nil end
      v = v[part]
   end
   return v
end

-- Flattened "path = value" listing of a recipe merged with the trainer's defaults.
function M.fields(recipe)
   local merged = train.resolve(recipe)
   local out = {}
   local function walk(v, prefix)
      if type(v) == 'table' and not is_module(v) and #v == 0 and next(v) ~= nil and prefix ~= 'hooks' and prefix ~= 'progress'
         and not (type(v) == 'table' and v.nbatches) then
         local keys = {}
         for k in pairs(v) do keys[#keys + 1] = k end
         table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
         for _, k in ipairs(keys) do walk(v[k], prefix == '' and tostring(k) or (prefix .. '.' .. tostring(k))) end
      else
         out[#out + 1] = {path = prefix, value = v}
      end
   end
   walk(merged, '')
   -- fields the trainer knows whose default is nil
   local seen = {}
   for _, f in ipairs(out) do seen[f.path] = true end
   -- (another optimizer's settings are not this recipe's flags: betas under sgd, momentum under adam)
   local optim_keys = require('nr.optim').config_keys(merged.optim and merged.optim.name)
   for path in pairs(M.TYPES) do
      local okey = path:match('^optim%.(.+)$')
      if okey and optim_keys and not optim_keys[okey] then seen[path] = true end
      if not seen[path] and get_path(merged, path) == nil then
         local parent = path:match('^(.*)%.[^.]+$')
         if not parent or type(get_path(merged, parent)) == 'table' then out[#out + 1] = {path = path, value = nil} end
      end
   end
   table.sort(out, function(a, b) return a.path < b.path end)
   return out
end

local function show(v)
   if v == nil then return '(unset)' end
   if type(v) == 'function' then return '<function>' end
   if is_module(v) then return '<module ' .. v:typename() .. '>' end
   if type(v) == 'table' then
      if #v > 0 then
         local parts = {}
         for i, x in ipairs(v) do parts[i] = tostring(x) end
         return table.concat(parts, ',')
      end
      return next(v) == nil and '{}' or '{...}'
   end
   return tostring(v)
end

-- Types --help shows by another name than the parser's.
local SHOWN_TYPE = {split_or_off = 'split|off', init = 'path', cap = 'int|all'}

function M.help(recipe, path)
   local lines = {}
   lines[#lines + 1] = string.format('usage: nrlua %s [--field value ...]', path or 'RECIPE.lua')
   lines[#lines + 1] = ''
   lines[#lines + 1] = 'Fields (override any with --path value; dotted paths reach into tables):'
   for _, f in ipairs(M.fields(recipe)) do
      if f.path ~= '' then
         local ty = field_type(recipe, f.path) or type(f.value)
         if ty == 'function' or ty == 'module' then
            lines[#lines + 1] = string.format('  %-30s %-9s %s', f.path, 'code', '(defined in the recipe file; not a flag)')
         else
            -- the internal type name split_or_off (10 characters) pushed its value out of the column
            lines[#lines + 1] = string.format('  --%-28s %-9s %s', f.path, SHOWN_TYPE[ty] or ty,
               show(f.value))
         end
      end
   end
   lines[#lines + 1] = ''
   lines[#lines + 1] = 'Short flags:'
   local names = {}
   for k in pairs(M.ALIASES) do names[#names + 1] = k end
   table.sort(names)
   for _, k in ipairs(names) do lines[#lines + 1] = string.format('  --%-12s = --%s', k, M.ALIASES[k]) end
   lines[#lines + 1] = '  --nr off|on      switch Neural Rejuvenation (nr.enabled)'
   lines[#lines + 1] = '  --data.val_split off   train without evaluation (no best checkpoint)'
   lines[#lines + 1] = '  --schedule off   a constant learning rate (schedule = false)'
   lines[#lines + 1] = '  --resume DIR     continue a run from its last complete checkpoint, with its own settings'
   lines[#lines + 1] = '                   (DIR/recipe.json) where no flag is given now'
   lines[#lines + 1] = '  --overwrite      start afresh in an out folder that holds a run (its checkpoints and metrics go)'
   lines[#lines + 1] = '  --eval PATH      evaluate a run\'s best checkpoint (or a step folder, a weights file) on the'
   lines[#lines + 1] = '                   evaluation split, with the run\'s settings; trains and writes nothing'
   lines[#lines + 1] = '  --init PATH      start a new run from these weights (also --init.names torchvision,'
   lines[#lines + 1] = '                   --init.skip fc: modules left as built)'
   return table.concat(lines, '\n')
end

-- apply(recipe, args) -> new recipe table with overrides, what ('help' when --help was given: the
-- table holds the flags before it), notes (lines for the console).
function M.apply(recipe, args)
   local r = {}
   for k, v in pairs(recipe) do r[k] = train.deep_copy(v) end
   local i = 1
   local set_paths = {}
   local schedule_off -- the flag that turned the schedule off (--schedule off)
   local help = false
   args = args or {}
   while i <= #args do
      local a = args[i]
      if a == '--help' or a == '-h' then help = true; break end   -- (the flags before it shape the listing)
      local name, value = a:match('^%-%-([%w_%.%-]+)=(.*)$')
      local bare = false
      if not name then
         name = a:match('^%-%-([%w_%.%-]+)$')
         if not name then
            error(string.format('unexpected argument %q (overrides look like --field value; see --help)', a), 0)
         end
         bare = true
      end
      i = i + 1
      local flag = '--' .. name
      local path = M.ALIASES[name] or name:gsub('%-', '_')
      if path == 'nr.policy' or path:match('^nr%.policy%.') then
         error(string.format('%s: NR policies are Lua functions; set them in the recipe file (nr = {policy = '
            .. '{reallocate = function(layers, budget) ... end}}, docs/NR.md "Policies")', flag), 0)
      end
      local ty, why = field_type(r, path)
      if not ty then
         local guess = train.guess_field(path, known_paths(r))
         -- a section (--optimizer: optim) is set through its fields: its name, where it has one
         if guess and field_type(r, guess) == 'table' then guess = field_type(r, guess .. '.name') and (guess .. '.name') or nil end
         error(string.format('%s: unknown flag (%s is %s; %ssee --help)', flag, path, why or 'not a field of this recipe',
            guess and string.format('did you mean --%s? ', guess) or ''), 0)
      end
      -- --schedule off (or false, none): a constant LR, as schedule = false in a recipe
      if path == 'schedule.name' and (value or args[i]) and ({off = true, ['false'] = true, none = true})[value or args[i]] then
         if not value then i = i + 1 end
         r.schedule = false
         set_paths[path], schedule_off = true, flag
         goto continue
      end
      if bare then
         -- a boolean flag alone means true (--overwrite); otherwise the next argument is the value
         local nxt = args[i]
         if ty == 'boolean' and (nxt == nil or nxt:match('^%-%-')) then
            value = 'true'
         else
            if nxt == nil then error(string.format('%s: missing value', flag), 0) end
            value = nxt
            i = i + 1
         end
      end
      if ty == 'table' or ty == 'module' then
         error(string.format('%s: %s is a table; set its fields (e.g. --%s.FIELD value)', flag, path, path), 0)
      end
      if ty == 'function' then error(string.format('%s: %s is code in the recipe file', flag, path), 0) end
      set_path(r, path, parse_value(flag, ty, value, get_path(r, path)))
      set_paths[path] = true
      ::continue::
   end
   if schedule_off then
      for p in pairs(set_paths) do
         if p:match('^schedule%.') and p ~= 'schedule.name' then
            error(string.format('--%s: the schedule is off (%s off: a constant LR), so it has no %s', p, schedule_off, p), 0)
         end
      end
      r.schedule = false
   end
   -- Another schedule (--schedule cosine on a step recipe): the recipe's step settings were its
   -- own (nr.schedule refuses milestones on a cosine schedule); flags given for them stay, and are
   -- refused there
   if set_paths['schedule.name'] and type(r.schedule) == 'table' and r.schedule.name ~= 'step'
      and r.schedule.name ~= 'multistep' then
      for _, k in ipairs({'milestones', 'step_size', 'gamma'}) do
         if not set_paths['schedule.' .. k] then r.schedule[k] = nil end
      end
   end
   -- A new dataset without a new root: the recipe's root belonged to the old dataset (e.g.
   -- $NR_DATA/imagenet), so fall back to the new dataset's default location.
   if set_paths['data.dataset'] and not set_paths['data.root'] and type(r.data) == 'table'
      and r.data.dataset ~= (type(recipe.data) == 'table' and recipe.data.dataset or nil) then
      r.data.root = nil
   end
   -- Another optimizer (--optim.name adamw on an sgd recipe): the recipe's optim settings were
   -- tuned for its own (sgd's lr 0.1 and momentum), so the new one starts from its defaults
   -- (nr.optim.RECIPE_DEFAULTS) plus the optim flags given; no_decay_bn_bias (which parameters
   -- decay, not how) stays.
   local notes = {}
   local old_optim = type(recipe.optim) == 'table' and recipe.optim or {}
   if set_paths['optim.name'] and type(r.optim) == 'table' and type(r.optim.name) == 'string'
      and r.optim.name:lower() ~= tostring(old_optim.name or 'sgd'):lower() then
      local o = {name = r.optim.name, no_decay_bn_bias = old_optim.no_decay_bn_bias}
      local dropped = {}
      for k in pairs(old_optim) do
         if k ~= 'name' and k ~= 'no_decay_bn_bias' and not set_paths['optim.' .. k] then dropped[#dropped + 1] = k end
      end
      for p in pairs(set_paths) do
         local k = p:match('^optim%.(.+)$')
         if k then o[k] = r.optim[k] end
      end
      r.optim = o
      if #dropped > 0 then
         table.sort(dropped)
         notes[#notes + 1] = string.format('--optim.name %s: the recipe\'s %s settings (%s) are not used; %s starts from its '
            .. 'defaults (set them with --optim.FIELD)', r.optim.name, tostring(old_optim.name or 'sgd'), table.concat(dropped, ', '),
            r.optim.name)
      end
   end
   return r, help and 'help' or nil, notes
end

-- --resume DIR from the command line: the run's own settings (DIR/recipe.json, the resolved
-- recipe it started with) replace the recipe file's, and the flags given now apply on top
-- (--resume DIR --lr 0.01 changes only the LR), so the command that started a run plus --resume
-- continues that run. Code (functions, modules, loaders) always comes from the recipe file;
-- placeholders the JSON holds for it ("<function>") are ignored. A section the run had is
-- restored whole (a field the run did not have is dropped: a root it left out stays out).
-- Not restored: the run's folder and name, and what belongs to this process or machine.
local NOT_RESUMED = {out = true, resume = true, overwrite = true, name = true, device_resolved = true,
                     model_built = true, progress = true, hooks = true, device = true, threads = true,
                     ['data.threads'] = true, ['dist.timeout'] = true}

local function is_code(v)
   return type(v) == 'function' or type(v) == 'userdata' or is_module(v) or (type(v) == 'table' and v.nbatches ~= nil)
end

-- cur: the recipe file's value, sv: the saved one, at path.
local function restore(cur, sv, path)
   if NOT_RESUMED[path] or is_code(cur) then return cur end
   if type(sv) == 'string' and sv:match('^<.*>$') then return cur end
   if type(sv) ~= 'table' then return sv end
   local out = {}
   if sv[1] == nil and type(cur) == 'table' then
      for k, v in pairs(sv) do out[k] = restore(cur[k], v, path .. '.' .. tostring(k)) end
      for k, v in pairs(cur) do
         if out[k] == nil and (is_code(v) or NOT_RESUMED[path .. '.' .. tostring(k)]) then out[k] = v end
      end
      return out
   end
   return train.deep_copy(sv)
end

-- Plain values of a resolved recipe by path (for saying what the resume changed).
local function flatten(v, path, out)
   for k, x in pairs(v) do
      local p = path and (path .. '.' .. tostring(k)) or tostring(k)
      if type(x) == 'table' and not is_code(x) then flatten(x, p, out)
      elseif not is_code(x) then out[p] = x end
   end
   return out
end

-- Returns the recipe to resume DIR with (the flags are applied to it afterwards) and the list of
-- "path value" it changed, or the recipe as it was and a note when recipe.json cannot be used.
function M.resume_base(recipe, dir)
   local path = train.expand_path(dir, 'recipe.resume')
   -- not a run folder: said as that, not as a recipe.json that will be done without
   train.need_run_folder(path)
   local run = train.run_folder_of(path)
   if not ck.exists(run .. '/recipe.json') and not ck.exists(run .. '/metrics.jsonl') and not ck.is_dir(run .. '/checkpoint') then
      error(string.format('nr.train: cannot resume %s: it holds no run (no checkpoint, recipe.json or metrics.jsonl)', run), 0)
   end
   local saved = train.run_recipe(run)
   if not saved then
      return recipe, nil, string.format('%s/recipe.json is missing or damaged: the recipe file\'s settings and the '
         .. 'flags given now are used', run)
   end
   local base = {}
   for k, v in pairs(recipe) do base[k] = v end
   for k, v in pairs(saved) do
      if type(k) == 'string' then base[k] = restore(recipe[k], v, k) end
   end
   local before, after = flatten(train.resolve(recipe), nil, {}), flatten(train.resolve(base), nil, {})
   local changed = {}
   for p, v in pairs(after) do
      if before[p] ~= v and not (type(v) == 'string' and v:match('^<.*>$')) then changed[#changed + 1] = p .. ' ' .. tostring(v) end
   end
   table.sort(changed)
   return base, changed
end

-- r with the settings of the run in dir (its recipe.json) where no flag in args gives them, and
-- what that changed said on the console (who: 'resume' or 'eval').
local function with_run_settings(recipe, r, args, dir, who)
   local base, changed, note = M.resume_base(recipe, dir)
   if note then io.write(who, ': ', note, '\n') end
   if changed and #changed > 0 then
      io.write(string.format('%s: the run\'s own settings from its recipe.json: %s (flags given now override)\n', who,
         table.concat(changed, ', ')))
      return (M.apply(base, args))
   end
   return r
end

-- --eval PATH: the run's own settings from its recipe.json (as --resume; flags given now
-- override, e.g. --data.val_split train), its weights evaluated, one line printed.
function M.evaluate(recipe, r, args, path)
   local dir = r.eval
   if type(dir) ~= 'string' or dir == '' then error('--eval: expected a run folder, checkpoint or weights file', 0) end
   local run = train.run_folder_of(train.expand_path(dir, 'eval'))
   if ck.exists(run .. '/recipe.json') then r = with_run_settings(recipe, r, args, run, 'eval') end
   r.eval = nil
   if r.name == nil and path then r.name = path:match('([^/]+)%.lua$') or path end
   local res = train.evaluate(r, dir)
   io.write(string.format('eval: %s: loss %.4f, top-1 %.2f%%, top-5 %.2f%% on %d images of %s\n', res.weights, res.loss,
      res.top1, res.top5, res.n, tostring(res.split)))
   return res
end

-- run(tbl, args, path): the CLI entry for recipe files. Returns the summary (nil for --help).
function M.run(recipe, args, path)
   local r, what, notes = M.apply(recipe, args)
   if what == 'help' then
      io.write(M.help(r, path), '\n')   -- (with the flags given before --help: --optim.name adamw --help)
      return nil
   end
   for _, n in ipairs(notes) do io.write(n, '\n') end
   if r.eval ~= nil then return M.evaluate(recipe, r, args, path) end
   if type(r.resume) == 'string' then r = with_run_settings(recipe, r, args, r.resume, 'resume') end
   -- --resume DIR continues in DIR: the recipe file's own out (the zoo's runs/<name>) is for new
   -- runs; it used to win, so the resumed run went on in another folder (--out DIR still moves it)
   if type(r.resume) == 'string' then
      local out_given = false
      for _, a in ipairs(args or {}) do
         if a == '--out' or tostring(a):match('^%-%-out=') then out_given = true end
      end
      if not out_given then r.out = nil end
   end
   if r.name == nil and path then r.name = path:match('([^/]+)%.lua$') or path end
   local summary = train.train(r)
   return summary
end

return M

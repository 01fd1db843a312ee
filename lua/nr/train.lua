-- nr.train — the training loop: nr.train(recipe) builds a trainer from a recipe table, runs
-- epochs of training and evaluation, and returns a summary.
--
-- What it is: model / data / optimizer / schedule construction from a recipe, the loop (loss,
-- top-1, top-5, images/s), hooks, the run folder (recipe.json, metrics.jsonl, checkpoint/),
-- progress output, crash-safe checkpoints and exact resume. The contract other parts code
-- against (NR, distributed) is docs/ARCHITECTURE.md "Trainer contract": tr.model, tr.criterion,
-- tr.optimizer, tr.recipe, tr.epoch, tr.step, tr.out, tr.device, tr.schedule_hold,
-- tr.extend_held, tr.held_epochs, tr:planned_epochs(), tr:add_hook, tr:register_state, tr:log,
-- plus tr.schedule, tr:evaluate(), tr:save_checkpoint().
-- What it is not: the CLI (nr.recipe parses flags) or NR's policy (nr.rejuvenate attaches hooks).
-- Invariants:
--   * tr.epoch is 1-based and current; tr.step is global, counted from 1, and names the step
--     being run (after_backward, after_step) or the last one run (epoch_end).
--   * the schedule's position advances only while tr.schedule_hold is false (per iteration and
--     per epoch), before the epoch_end hooks run, except inside its warm-up, which always runs.
--     An epoch during which a hook released the hold counts as held too (the schedule goes back to
--     where the release found it). An epoch that ends held is counted in
--     tr.held_epochs (at the same point); with tr.extend_held the run trains rc.epochs schedule
--     epochs plus the held ones, at most rc.max_epochs in all (tr:planned_epochs()).
--   * a checkpoint is written after epoch_end hooks (so NR's state is the post-hook state); a
--     run resumed from the checkpoint of epoch k reaches the same weights as an uninterrupted
--     run (bit-identical on the CPU with the same thread count).
--   * accuracies are percentages (0..100); losses are means over samples.
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local ck = require 'nr.checkpoint'
local progress = require 'nr.progress'
local schedule = require 'nr.schedule'
local clip_grad_norm = require('nr.optim').clip_grad_norm
local ffi, C = nrffi.ffi, nrffi.C

local M = {}

local HOOKS = {train_begin = true, epoch_begin = true, after_backward = true, after_step = true,
               epoch_end = true, train_end = true}

-- ---- defaults ----------------------------------------------------------------------------------

-- Defaults of every recipe field the trainer reads (nr.recipe lists them in --help).
M.DEFAULTS = {
   name = 'run',
   model = nil,            -- {name = 'resnet', ...} for nr.models, a module, or function(recipe) -> module
   data = {
      dataset = nil,       -- 'fashion-mnist', 'mnist', 'cifar10', 'cifar100', 'imagefolder'
      root = nil,          -- folder holding the dataset ($VARS and ~ expand)
      batch = 128,
      eval_batch = nil,    -- default: batch
      threads = nil,       -- loader worker threads; nil: NR_DATA_THREADS, else 2 on the CPU and the
                           -- host's free cores on a GPU (data_threads)
      size = nil,          -- input side; images are resized when the dataset's differs
      augment = nil,       -- nil: the dataset's default; false: none; or a table of loader options
      train_split = 'train', val_split = 'test',  -- val_split false (--data.val_split off): no evaluation
      train_batches = nil, val_batches = nil,  -- cap batches per epoch (quick runs, tests)
      output = nil,        -- images from the loaders: 'uint8' (finished, /255 and normalize, on the
                           -- device: a quarter of the bytes to copy) or 'float32'; nil: uint8 on CUDA
      drop_last = false,   -- training loader: drop the last partial batch (as PyTorch's DataLoader)
   },
   optim = require('nr.optim').RECIPE_DEFAULTS.sgd,   -- (sgd's; another optim.name gets nr.optim.RECIPE_DEFAULTS[name])
   schedule = {name = 'cosine', warmup = 0},
   loss = {label_smoothing = 0},
   epochs = 10,            -- schedule epochs (epochs the run trains unless held epochs extend it)
   max_epochs = nil,       -- cap on all epochs when held epochs extend the run (tr.extend_held); nil: 2 x epochs
   clip_grad_norm = nil,   -- a number > 0: each step scales the gradients so their total 2-norm is at most
                           -- that (nr.optim.clip_grad_norm, after NR's L1 term and the ranks' averaging)
   init = nil,             -- weights a new run starts from: a path (as nr.checkpoint.load_weights takes) or
                           -- {path = ..., names = 'torchvision' | table | function, skip = {'fc', ...}}
                           -- (module paths left as built: a new classifier); a resumed run has its checkpoint
   device = 'auto',        -- 'auto' (CUDA when available), 'cpu', 'cuda'
   precision = 'fp32',     -- 'fp32', or 'bf16': mixed precision on CUDA (bf16 activations on tensor
                           -- cores; weights, gradients, BN statistics and the loss stay fp32)
   memory_format = nil,    -- activations' layout on CUDA: 'contiguous' (NCHW) or 'channels_last'
                           -- (NHWC); nil: channels_last under bf16, else contiguous
   seed = 1,
   threads = 0,            -- CPU kernel threads; 0 = all cores (NR_THREADS also sets it)
   out = nil,              -- run folder; default runs/<name>-<date> ($VARS and ~ expand)
   resume = nil,           -- a run folder (or checkpoint folder) to continue from
   overwrite = false,      -- start afresh in an out folder that already holds a run (else an error)
   log_every = 50,         -- steps between metrics records and plain progress lines
   eval_every = 1,         -- epochs between evaluations (the last epoch is always evaluated)
   checkpoint_every = 1,   -- epochs between checkpoints (the last epoch and a new best always); 0: none
   keep = 2,               -- complete checkpoints kept
   nr = nil,               -- Neural Rejuvenation (nr.rejuvenate); false or {enabled = false}: off
   dist = nil,             -- data parallelism options for nr.dist.attach (under mpirun)
   hooks = nil,            -- {hook_name = function(tr, info) ... end}
   progress = nil,         -- {stream = io.stdout, tty = nil (auto), every = log_every}
}

-- Default augmentation by dataset, in nr.data.loader's terms: train(size) and eval(size) give
-- the augment tables (size: recipe.data.size or nil). Evaluation only resizes, crops centrally
-- and normalizes.
local function cifar_train(size) return {pad = 4, crop = size or 32, flip = true, normalize = true} end
M.AUGMENT = {
   cifar10 = {train = cifar_train, eval = function() return {normalize = true} end},
   cifar100 = {train = cifar_train, eval = function() return {normalize = true} end},
   ['fashion-mnist'] = {train = function() return {normalize = true} end, eval = function() return {normalize = true} end},
   mnist = {train = function() return {normalize = true} end, eval = function() return {normalize = true} end},
   imagefolder = {
      train = function(size) return {random_resized_crop = size or 224, flip = true, normalize = true} end,
      eval = function(size)
         size = size or 224
         return {resize = math.floor(size / 0.875 + 0.5), center_crop = size, normalize = true}
      end,
   },
}

-- What to tell a user whose dataset is missing.
M.DATASET_HINTS = {
   ['fashion-mnist'] = 'install it with `apt-get install dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist)'
      .. ' or point --data at a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,'
      .. ' t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz',
   mnist = 'point --data at a folder holding the four MNIST idx files (train-images-idx3-ubyte.gz, ...)',
   cifar10 = 'download the binary version (cifar-10-binary.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and point --data at the folder',
   cifar100 = 'download cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and point --data at the folder',
   imagefolder = 'point --data at a folder with train/ and val/ subfolders of class folders',
}

-- Copies plain tables; objects (tensors, modules, loaders, streams: anything with a metatable or
-- a forward/write/nbatches method) are shared, not copied.
local function deep_copy(v, seen)
   if type(v) ~= 'table' or getmetatable(v) ~= nil or type(v.forward) == 'function'
      or type(v.write) == 'function' or type(v.nbatches) == 'function' then
      return v
   end
   seen = seen or {}
   if seen[v] then return seen[v] end
   local out = {}
   seen[v] = out
   for k, x in pairs(v) do out[k] = deep_copy(x, seen) end
   return setmetatable(out, getmetatable(v))
end
M.deep_copy = deep_copy

local function is_module(x) return type(x) == 'table' and type(x.forward) == 'function' and type(x.parameters) == 'function' end

-- Message handler of the trainer's own pcalls (an epoch, an evaluation), which restore state and
-- raise the error again: an error raised in the user's code (a hook, a policy, a model's forward;
-- its position outside nrlua's package) keeps the traceback of where it happened, which the
-- re-raise would otherwise replace with the trainer's frames (the host shows a message that
-- already has a traceback as it is).
function M.user_traceback(e)
   if type(e) ~= 'string' or e:find('\nstack traceback:', 1, true) then return e end
   local file = e:match('^([^\n]-):%d+: ')
   if not file or file:find('/lua/nr/', 1, true) then return e end
   -- from the frame that raised it (LuaJIT's levels here: 1 that frame, or the C error() the user's
   -- frame called, which is skipped)
   local raised_by_error = debug.getinfo(2, 'S').what == 'C'
   return debug.traceback(e, raised_by_error and 2 or 1)
end

-- Fills defaults into a copy of the recipe (tables merged one level deep).
function M.resolve(recipe)
   check.arg(type(recipe) == 'table', 'nr.train', 'recipe must be a table, got %s', type(recipe))
   -- sections that are tables (a scalar here failed later inside the trainer as a raw Lua error);
   -- schedule = false is a constant LR, dist/hooks/progress = false are none
   local may_be_false = {schedule = true, dist = true, hooks = true, progress = true}
   for _, k in ipairs({'data', 'optim', 'schedule', 'loss', 'dist', 'hooks', 'progress'}) do
      local v = recipe[k]
      if v ~= nil and type(v) ~= 'table' and not (v == false and may_be_false[k]) then
         error(string.format('nr.train: recipe.%s must be a table%s, got %s', k, may_be_false[k] and ' or false' or '',
            check.show(v)), 0)
      end
   end
   if recipe.nr ~= nil and recipe.nr ~= false and type(recipe.nr) ~= 'table' then
      error(string.format('nr.train: recipe.nr must be a table or false, got %s', check.show(recipe.nr)), 0)
   end
   if type(recipe.nr) == 'table' and recipe.nr.policy ~= nil and type(recipe.nr.policy) ~= 'table' then
      error(string.format('nr.train: recipe.nr.policy must be a table of functions, got %s', check.show(recipe.nr.policy)), 0)
   end
   local r = {}
   for k, v in pairs(recipe) do r[k] = deep_copy(v) end
   -- the optimizer's defaults are those of the one the recipe names (sgd's momentum would be an
   -- unknown setting for adamw)
   local optim_name = type(r.optim) == 'table' and type(r.optim.name) == 'string' and r.optim.name:lower() or 'sgd'
   local defaults = setmetatable({optim = require('nr.optim').RECIPE_DEFAULTS[optim_name] or M.DEFAULTS.optim},
                                 {__index = M.DEFAULTS})
   for k in pairs(M.DEFAULTS) do
      local d = defaults[k]
      if r[k] == nil then
         r[k] = deep_copy(d)
      elseif type(d) == 'table' and type(r[k]) == 'table' and not is_module(r[k]) then
         for kk, dv in pairs(d) do if r[k][kk] == nil then r[k][kk] = deep_copy(dv) end end
      end
   end
   -- the schedule and optimizer names default even when a recipe gives a partial table
   r.optim.name = r.optim.name or 'sgd'
   return r
end

-- ---- helpers ---------------------------------------------------------------------------------------

local function expand_path(p, what)
   if type(p) ~= 'string' then return p end
   -- ~ and ~/...: the home folder (~user/... is left as written: '~nouser' became '/rootnouser')
   local home = os.getenv('HOME')
   if home and (p == '~' or p:sub(1, 2) == '~/') then p = home .. p:sub(2) end
   p = p:gsub('%$(%b{})', function(n)
      return os.getenv(n:sub(2, -2)) or error(string.format('%s: environment variable %s is not set (in %q)', what, n:sub(2, -2), p), 0)
   end)
   p = p:gsub('%$([%a_][%w_]*)', function(n) return os.getenv(n) or error(string.format('%s: environment variable %s is not set', what, n), 0) end)
   return p
end
M.expand_path = expand_path

-- The run folder a path names: the folder itself, or the run of its checkpoint/, a step folder,
-- a file in one (model.safetensors) or a `best` / `latest` pointer (trailing slashes dropped).
local function run_folder_of(path)
   return (path:gsub('/+$', ''):gsub('/checkpoint/step%-%d+/[^/]+$', ''):gsub('/checkpoint/step%-%d+$', '')
      :gsub('/checkpoint/best$', ''):gsub('/checkpoint/latest$', ''):gsub('/checkpoint$', ''))
end
M.run_folder_of = run_folder_of

-- The recipe a run folder recorded (its recipe.json, decoded), or nil when missing or damaged.
function M.run_recipe(run)
   local text = ck.read_file(run .. '/recipe.json')
   local ok, saved = pcall(ck.json_decode, text or '')
   if text and ok and type(saved) == 'table' and saved[1] == nil then return saved end
end

-- A --resume path that is no folder is an error (a file in a run folder: that folder named).
function M.need_run_folder(path)
   if ck.is_dir(path) then return end
   local parent = path:match('^(.*)/[^/]+$')
   error(string.format('nr.train: resume: no run folder %s (give the folder of the run to continue%s)', path,
      ck.exists(path) and parent and (', e.g. ' .. run_folder_of(parent)) or ''), 0)
end

local function pick_device(dev)
   if dev == nil or dev == 'auto' then
      local ok, cuda = pcall(require, 'nr.cuda')
      if ok and type(cuda) == 'table' and cuda.available then
         local ok2, avail = pcall(cuda.available)
         if ok2 and avail then return 'cuda' end
      end
      return 'cpu'
   end
   if dev == 'cpu' then return 'cpu' end
   if dev == 'cuda' or (type(dev) == 'string' and dev:match('^cuda:%d+$')) then
      if C.nr_has_cuda() == 0 then error('nr.train: device = "cuda" but this nrlua was built without CUDA', 0) end
      local ok, cuda = pcall(require, 'nr.cuda')
      if ok and cuda.available and not cuda.available() then error('nr.train: device = "cuda" but no GPU is available', 0) end
      return dev
   end
   error(string.format('nr.train: unknown device %q (auto, cpu, cuda, cuda:N)', tostring(dev)), 0)
end
M.pick_device = pick_device

local function date_tag() return os.date('!%Y%m%d-%H%M%S') end

-- The files of a run in its folder: metrics.jsonl, and in checkpoint/ the step folders and the
-- latest / best pointers (nr.train's names); recipe.json and report.html go with them. Anything
-- else in the folder (or in checkpoint/) is the user's and is never touched.
local function run_files(dir)
   local out = {}
   local ckdir = dir .. '/checkpoint'
   if ck.is_dir(ckdir) then
      for _, name in ipairs(ck.list(ckdir)) do
         if name == 'latest' or name == 'best' or name:match('^step%-%d+$') then out[#out + 1] = 'checkpoint/' .. name end
      end
   end
   local metrics = dir .. '/metrics.jsonl'
   if ck.exists(metrics) and not ck.is_link(metrics) then out[#out + 1] = 'metrics.jsonl' end
   if #out == 0 then return out end   -- not a run folder: recipe.json / report.html alone are not ours
   for _, f in ipairs({'recipe.json', 'report.html'}) do
      if ck.exists(dir .. '/' .. f) and not ck.is_link(dir .. '/' .. f) then out[#out + 1] = f end
   end
   return out
end

-- A fresh run (no resume) into a folder that holds another run would mix the two: metrics
-- appended to the old ones, checkpoints interleaved, a later --resume trimming the old run's
-- records. Refused unless overwrite, which removes exactly the old run's files (run_files;
-- links are removed, never followed). Checked when the run starts writing (Trainer:run), so a
-- trainer built only to load a checkpoint is fine.
local function claim_run_folder(dir, overwrite)
   local found = run_files(dir)
   if #found == 0 then return end
   if not overwrite then
      local shown = {}
      for i = 1, math.min(#found, 4) do shown[i] = found[i] end
      if #found > 4 then shown[#shown + 1] = '...' end
      error(string.format('nr.train: %s already holds a run (%s): --resume %s continues it, --out DIR starts a new '
         .. 'one elsewhere, --overwrite replaces it', dir, table.concat(shown, ', '), dir), 0)
   end
   for _, f in ipairs(found) do ck.remove_tree(dir .. '/' .. f) end
   local ckdir = dir .. '/checkpoint'
   if ck.is_dir(ckdir) and not ck.is_link(ckdir) and #ck.list(ckdir) == 0 then ck.remove_tree(ckdir) end
end

local function rng_state()
   local s = ffi.new('uint64_t[4]')
   C.nr_rng_get_state(s)
   local out = {}
   for i = 0, 3 do out[i + 1] = (tostring(s[i]):gsub('U?LL$', '')) end
   return out
end

local function set_rng_state(words)
   check.arg(type(words) == 'table' and #words == 4, 'nr.train', 'checkpoint has no RNG state (4 words)')
   local s = ffi.new('uint64_t[4]')
   for i = 1, 4 do
      local v = ffi.new('uint64_t', 0)
      for d in tostring(words[i]):gmatch('%d') do v = v * 10 + tonumber(d) end
      s[i - 1] = v
   end
   C.nr_rng_set_state(s)
end
M.rng_state, M.set_rng_state = rng_state, set_rng_state

-- ---- running metrics ---------------------------------------------------------------------------

-- Loss and top-1 / top-5 hits of the batches seen, summed on the model's device
-- (nr_batch_metrics_add) and read back (one 16-byte copy) only when a value is shown, logged or
-- returned: a GPU step never waits for the GPU to finish. Each read folds the device sums into
-- Lua numbers (epoch and window totals) and zeroes them; the f32 counts stay exact because a read
-- is due before 2^22 samples are pending. A non-finite loss is an error at the read.
local Meter = {}
Meter.__index = Meter
local METER_PENDING_MAX = 2 ^ 22

-- strict: a non-finite loss is an error at the read (training); otherwise it is summed (an
-- evaluation reports a NaN loss as it is).
function M.meter(device, strict)
   local m = setmetatable({acc = T.zeros({4}, {device = device}), host = device == 'cpu', strict = strict}, Meter)
   m:reset()
   return m
end

function Meter:reset()
   if self.pending and self.pending > 0 then self.acc:zero() end
   self.pending, self.first_step = 0, nil
   self.n, self.loss, self.top1, self.top5 = 0, 0, 0, 0
   self.win_n, self.win_loss, self.win_top1 = 0, 0, 0
end

-- Adds a batch: logits (N, K), labels (N) and loss (the batch's mean as a 1-element tensor, or nil).
function Meter:add(logits, labels, loss, step)
   check.status(C.nr_batch_metrics_add(logits.c, labels.c, loss and loss.c, self.acc.c), 'nr.train: batch metrics')
   self.pending = self.pending + logits:size(1)
   self.first_step = self.first_step or step
   self.last_step = step
end

-- Whether a read is due whatever the caller shows: on the CPU reads cost nothing (and name the
-- exact step of a non-finite loss); elsewhere only before the f32 counts could lose exactness.
function Meter:due() return self.host or self.pending >= METER_PENDING_MAX end

-- Folds the pending device sums into the totals. what (and lr, when training) name the pass in
-- a non-finite-loss error.
function Meter:read(what, lr)
   if self.pending == 0 then return self end
   local a = self.acc:to('cpu')
   local loss, h1, h5, n = a:get(1), a:get(2), a:get(3), a:get(4)
   self.acc:zero()
   if self.strict and (loss ~= loss or loss == math.huge or loss == -math.huge) then
      local at = self.first_step == self.last_step and string.format('step %d', self.last_step)
         or string.format('a step from %d to %d', self.first_step, self.last_step)
      error(string.format('nr.train: the loss is %s at %s of %s%s; lower the learning rate?', tostring(loss / n), at, what,
         lr and string.format(' (lr %g)', lr) or ''), 0)
   end
   self.pending, self.first_step = 0, nil
   self.n, self.loss, self.top1, self.top5 = self.n + n, self.loss + loss, self.top1 + h1, self.top5 + h5
   self.win_n, self.win_loss, self.win_top1 = self.win_n + n, self.win_loss + loss, self.win_top1 + h1
   return self
end

-- The window since the last call: {n, loss (mean), top1 (%)}, then a new window begins.
function Meter:take_window()
   local w = {n = self.win_n, loss = self.win_loss / self.win_n, top1 = 100 * self.win_top1 / self.win_n}
   self.win_n, self.win_loss, self.win_top1 = 0, 0, 0
   return w
end

-- Copies host tensor h ahead to the device (nr_cuda_prefetch): into `full` (a device buffer
-- reused while h fits its shape; a smaller last batch takes a leading slice of it) or a new
-- one. Returns {t = the device view, ticket = the copy's ticket or nil}, and the buffer. A CPU
-- destination is a plain copy.
function M.prefetch(h, full, device)
   if h:is_cuda() then return {t = h}, full end -- a loader that yields device tensors
   if not h:is_contiguous() then h = h:contiguous() end
   local shape = h:shape()
   local fits = full and full:dtype() == h:dtype() and full:dim() == #shape and shape[1] <= full:size(1)
   for d = 2, #shape do fits = fits and shape[d] == full:size(d) end
   if not fits then full = T.empty(shape, {dtype = h:dtype(), device = device}) end
   local t = shape[1] == full:size(1) and full or full:narrow(1, 1, shape[1])
   if not t:is_cuda() then return {t = t:copy(h)}, full end
   local ticket = ffi.new('int64_t[1]')
   check.status(C.nr_cuda_prefetch(t.c, h.c, ticket), 'nr.train: input prefetch')
   return {t = t, ticket = ticket[0]}, full
end

-- Labels checked on the host (a cheap loop) before they are copied, so the criterion can skip
-- its check on the GPU and the synchronisation that costs. true when y was checked here.
local function check_host_labels(y, num_classes)
   if y:is_cuda() then return false end
   require('nr.nn').check_class_ids(y, num_classes)
   return true
end

-- A hook's info for one step: info.loss reads the step's loss on first access only (a hook that
-- never looks at it costs no synchronisation); read it during the hook call (the criterion's
-- buffer holds the next step's loss after that step's forward).
local STEP_INFO = {__index = function(t, k)
   if k ~= 'loss' then return nil end
   local v = rawget(t, '_loss_t'):get(1)
   rawset(t, 'loss', v)
   return v
end}
local function step_info(loss_t, bn) return setmetatable({batch = bn, _loss_t = loss_t}, STEP_INFO) end

-- ---- an in-memory loader (tests, small experiments) ------------------------------------------------

-- A deterministic shuffle from (seed, epoch): xorshift64*, independent of the global generator.
local function permutation(n, seed, epoch)
   local s = ffi.new('uint64_t', seed * 1000003 + epoch * 7919 + 88172645463325252ULL)
   local perm = {}
   for i = 1, n do perm[i] = i - 1 end
   for i = n, 2, -1 do
      s = bit.bxor(s, bit.rshift(s, 12)); s = bit.bxor(s, bit.lshift(s, 25)); s = bit.bxor(s, bit.rshift(s, 27))
      local r = s * 2685821657736338717ULL
      local j = tonumber(r % i) + 1
      perm[i], perm[j] = perm[j], perm[i]
   end
   return perm
end

local MemoryLoader = {}
MemoryLoader.__index = MemoryLoader

-- memory_loader(x (N, ...) f32, y (N) int64, {batch = 32, shuffle = false, seed = 1}): the
-- loader interface nr.train needs (nbatches(), epoch(e) iterator of x, y batches).
function M.memory_loader(x, y, opts)
   opts = check.options(opts, {batch = true, shuffle = true, seed = true, drop_last = true}, 'nr.train.memory_loader')
   check.arg(T.is_tensor(x) and T.is_tensor(y) and x:size(1) == y:size(1), 'nr.train.memory_loader', 'x and y must be tensors with the same first dimension')
   -- batch 0 gave inf batches per epoch, named only by the schedule ("iters_per_epoch ... got inf")
   if opts.batch ~= nil then check.int32(opts.batch, 'nr.train.memory_loader', 'batch', 1) end
   if opts.seed ~= nil then check.int(opts.seed, 'nr.train.memory_loader', 'seed', 0, 2 ^ 53) end
   return setmetatable({x = x, y = y, batch = opts.batch or 32, shuffle = opts.shuffle or false,
                        seed = opts.seed or 1, drop_last = opts.drop_last or false}, MemoryLoader)
end

function MemoryLoader:nbatches()
   local n = self.x:size(1)
   if self.drop_last then return math.floor(n / self.batch) end
   return math.ceil(n / self.batch)
end

function MemoryLoader:size() return self.x:size(1) end

function MemoryLoader:epoch(e)
   local n, b = self.x:size(1), self.batch
   local nb = self:nbatches()
   local i = 0
   local order = self.shuffle and permutation(n, self.seed, e or 1) or nil
   return function()
      i = i + 1
      if i > nb then return nil end
      local from, len = (i - 1) * b, math.min(b, n - (i - 1) * b)
      if not order then return self.x:narrow(1, from + 1, len), self.y:narrow(1, from + 1, len) end
      local idx = {}
      for k = 1, len do idx[k] = order[from + k] end
      return self.x:index_select(1, idx), self.y:index_select(1, idx)
   end
end
M.MemoryLoader = MemoryLoader

-- ---- the trainer ---------------------------------------------------------------------------------

local Trainer = {}
Trainer.__index = Trainer
M.Trainer = Trainer

function Trainer:add_hook(name, fn)
   check.arg(HOOKS[name], 'Trainer:add_hook', 'unknown hook %q (train_begin, epoch_begin, after_backward, after_step, epoch_end, train_end)', tostring(name))
   check.type(fn, 'function', 'Trainer:add_hook', 'fn')
   local list = self.hooks[name]
   list[#list + 1] = fn
end

function Trainer:call(name, info)
   for _, fn in ipairs(self.hooks[name]) do fn(self, info) end
end

function Trainer:register_state(name, spec)
   check.type(name, 'string', 'Trainer:register_state', 'name')
   check.arg(type(spec) == 'table' and type(spec.save) == 'function' and type(spec.load) == 'function',
      'Trainer:register_state', 'spec must be {save = fn, load = fn [, before_weights = bool]}')
   check.arg(not self.states[name], 'Trainer:register_state', 'state %q is already registered', name)
   self.states[name] = spec
   self.state_order[#self.state_order + 1] = name
end

-- Appends a record to metrics.jsonl; adds time (seconds since the run began), epoch, step.
function Trainer:log(record)
   check.arg(type(record) == 'table', 'Trainer:log', 'record must be a table')
   local r = {}
   for k, v in pairs(record) do r[k] = v end
   r.kind = r.kind or 'info'
   if r.epoch == nil then r.epoch = self.epoch end
   if r.step == nil then r.step = self.step end
   r.time = r.time or (progress.now() - self.t_start + (self.time_offset or 0))
   if self.metrics then
      -- a full disk must not silently cut metrics.jsonl short
      local ok, err = self.metrics:write(ck.json_encode(r), '\n')
      if ok then ok, err = self.metrics:flush() end
      if not ok then error(string.format('nr.train: cannot write %s/metrics.jsonl: %s', self.out, tostring(err)), 0) end
   end
   -- not kept in memory as well: a list of every record grew by one table per log_every steps for
   -- the whole run (metrics.jsonl is the history)
end

function Trainer:print(text) self.progress:line(text) end

-- Adds fn(trainer) -> text or nil to the end of every epoch's console line (after the LR and
-- ETA, "  |  text"): NR shows its utilization and λ there while it sparsifies.
function Trainer:add_status(fn)
   check.type(fn, 'function', 'Trainer:add_status', 'fn')
   self.status[#self.status + 1] = fn
end

-- Builds the model from recipe.model: a module, a function(recipe) -> module, or a table for
-- nr.models ({name = 'resnet', depth = 18, ...}).
local function build_model(rc)
   local m = rc.model
   if is_module(m) then return m end
   if type(m) == 'function' then
      local built = m(rc)
      check.arg(is_module(built), 'nr.train', 'recipe.model() must return an nr.nn module, got %s', type(built))
      return built
   end
   check.arg(type(m) == 'table' and type(m.name) == 'string', 'nr.train',
      'recipe.model must be a module, a function returning one, or a table {name = ..., ...} for nr.models')
   return require('nr.models').build(m)
end

-- Keys of an augment table that are deterministic (kept for evaluation).
local EVAL_KEYS = {resize = true, center_crop = true, channels = true, normalize = true}

-- Loader threads when recipe.data.threads is nil: NR_DATA_THREADS (>= 1) if set; else on the CPU
-- 2, as the loader shares the cores with the kernels; on a GPU the cores are the loader's: all
-- this process may use but one (the trainer's), divided among the ranks on the machine (their
-- bindings may overlap, so at worst this under-uses cores), 2..32 (decoding JPEGs is what feeds
-- an ImageNet run there).
local function data_threads(d, device)
   if d.threads then return d.threads end
   local env = require('nr.data').env_threads()
   if env then return env end
   if device == 'cpu' then return 2 end
   local avail, online = C.nr_cpu_available(), C.nr_cpu_online()
   local dist = package.loaded['nr.dist']
   local ranks = type(dist) == 'table' and dist.local_size and dist.local_size() or 1
   if ranks > 1 then avail = math.floor(math.min(avail, online) / ranks) end
   return math.max(2, math.min(32, avail - 1))
end
M.data_threads = data_threads

-- Loader options for a split, from recipe.data: the dataset's default augmentation unless
-- data.augment is given (false: none; a table: used for training, and its resize /
-- center_crop / channels / normalize for evaluation). data.size resizes datasets whose
-- native size differs; grey images are replicated when the model wants 3 channels.
local function loader_opts(d, train, seed, model, ds, device, as_trained)
   check.arg(d.output == nil or d.output == 'uint8' or d.output == 'float32', 'nr.train',
      'data.output must be "uint8" or "float32", got %s', check.show(d.output))
   local o = {batch = train and d.batch or (d.eval_batch or d.batch), shuffle = train, seed = seed,
              threads = data_threads(d, device), drop_last = train and d.drop_last or nil,
              output = d.output or (device ~= 'cpu' and 'uint8' or 'float32')}
   if d.shard then o.shard = d.shard end
   local defaults = M.AUGMENT[d.dataset]
   local a = {}
   if d.augment == nil then
      if defaults then a = (train and defaults.train or defaults.eval)(d.size) end
   elseif d.augment then
      check.arg(type(d.augment) == 'table', 'nr.train', 'data.augment must be a table, false or nil')
      -- the table replaces the dataset's default whole: without a word on normalisation the run
      -- trained (and evaluated) on unnormalised inputs, as the default's flip alone would
      -- (a run that trained so, resumed or evaluated, goes on as it was: its recipe.json has it)
      local def = defaults and defaults.train(d.size)
      if train and d.augment.normalize == nil and def and def.normalize and not as_trained then
         local shown = {}
         for k, v in pairs(def) do shown[#shown + 1] = k .. ' = ' .. tostring(v) end
         table.sort(shown)
         error(string.format('nr.train: data.augment replaces the dataset\'s default augmentation (for training {%s}), '
            .. 'normalisation included: say normalize = true (the dataset\'s statistics), {mean = ..., std = ...} or false '
            .. '(--data.augment.normalize true|false)', table.concat(shown, ', ')), 0)
      end
      for k, v in pairs(d.augment) do
         if train or EVAL_KEYS[k] then a[k] = v end
      end
   end
   local native = ds and ds.height and ds.height > 0 and ds.height or nil
   if d.size and native and native ~= d.size and not a.resize and not a.random_resized_crop then
      a.resize = {d.size, d.size}
   end
   local info = model and rawget(model, 'nr_info')
   if info and info.input_channels and not a.channels then a.channels = info.input_channels end
   if next(a) then o.augment = a end
   return o
end

-- Every key recipe.data may hold (an unknown one, e.g. a misspelt batch, is an error, not ignored).
local DATA_KEYS = {dataset = true, root = true, batch = true, eval_batch = true, threads = true, size = true, augment = true,
                   train_split = true, val_split = true, train_batches = true, val_batches = true, output = true,
                   drop_last = true, seed = true, shard = true, train = true, val = true}

local function build_data(tr, rc)
   local d = rc.data
   for k in pairs(d) do
      if not DATA_KEYS[k] then
         local names = {}
         for n in pairs(DATA_KEYS) do names[#names + 1] = n end
         table.sort(names)
         error(string.format('nr.train: recipe.data has no option %q (options: %s)', tostring(k), table.concat(names, ', ')), 0)
      end
   end
   -- names and switches of the wrong type: root = true failed in nr.checkpoint as a raw Lua error,
   -- dataset = 5 was reported as not set, drop_last = 'yes' meant true
   for _, f in ipairs({{'dataset', 'string'}, {'root', 'string'}, {'train_split', 'string'}, {'val_split', 'string'},
                       {'drop_last', 'boolean'}}) do
      local v = d[f[1]]
      if v ~= nil and type(v) ~= f[2] and not (f[1] == 'val_split' and v == false) then
         error(string.format('nr.train: recipe.data.%s must be a %s%s, got %s', f[1], f[2],
            f[1] == 'val_split' and ' or false (no evaluation)' or '', check.show(v)), 0)
      end
   end
   -- no batches per epoch would only fail deep inside (the schedule's iters_per_epoch)
   local tb = d.train_batches
   if not (tb == nil or (type(tb) == 'number' and tb >= 1 and tb == math.floor(tb))) then
      error('nr.train: data.train_batches must be an integer >= 1 (a cap on batches per epoch), got ' .. check.show(tb), 0)
   end
   if d.train then
      -- ready-made loaders (objects with nbatches() and epoch(e))
      for _, k in ipairs({'train', 'val'}) do
         local l = d[k]
         if l ~= nil and not (type(l) == 'table' and type(l.nbatches) == 'function' and type(l.epoch) == 'function') then
            error(string.format('nr.train: recipe.data.%s must be a loader (with nbatches() and epoch(e) methods), got %s',
               k, check.show(l)), 0)
         end
      end
      tr.train_loader, tr.val_loader = d.train, d.val
      if tr.train_loader:nbatches() < 1 then
         error('nr.train: the training data (recipe.data.train, a ready-made loader) is empty: it gives 0 batches per epoch', 0)
      end
      -- an empty one evaluated nothing, silently: every epoch's val columns and the summary stayed empty
      if tr.val_loader and tr.val_loader:nbatches() < 1 then
         error('nr.train: the evaluation data (recipe.data.val, a ready-made loader) is empty: it gives 0 batches '
            .. '(leave data.val out to train without evaluation)', 0)
      end
      return
   end
   check.arg(type(d.dataset) == 'string', 'nr.train', 'recipe.data.dataset is not set (e.g. --dataset fashion-mnist)')
   local root = expand_path(d.root, 'recipe.data.root')
   local hint = M.DATASET_HINTS[d.dataset]
   if not hint then
      error(string.format('nr.train: unknown dataset %q (fashion-mnist, mnist, cifar10, cifar100, imagefolder)', d.dataset), 0)
   end
   -- an input side within the loader's limit (core/data_internal.h NR_AUG_MAX_SIDE)
   if d.size ~= nil then check.int32(d.size, 'nr.train', 'data.size', 1, 2 ^ 20) end
   if root and not ck.is_dir(root) then
      error(string.format('nr.train: dataset %s not found: %s is not a folder.%s', d.dataset, root,
         hint and ('\n  To get it: ' .. hint .. '.') or ''), 0)
   end
   local data = require 'nr.data'
   -- classes: the training split, whose class ids an image folder's validation split takes
   local function open(split, classes)
      local ok, ds = pcall(data.dataset, {name = d.dataset, root = root, split = split, classes = classes})
      if not ok then
         local msg = tostring(ds)
         -- how to get the dataset is no answer to a split it does not have
         local helpful = msg:find('--data', 1, true) or msg:find('apt-get', 1, true) or msg:find('given classes', 1, true)
            or msg:find('split must be', 1, true)
         error(string.format('nr.train: cannot open the %s split of %s in %s: %s%s', split, d.dataset, root or 'its default folder',
            msg, (hint and not helpful) and ('\n  To get it: ' .. hint .. '.') or ''), 0)
      end
      return ds
   end
   local seed = d.seed or rc.seed
   tr.train_set = open(d.train_split or 'train')
   local as_trained = rc.resume ~= nil or tr.evaluating   -- (a run that exists goes on with its own augment)
   tr.train_loader = data.loader(tr.train_set, loader_opts(d, true, seed, tr.model, tr.train_set, tr.device, as_trained))
   -- a batch larger than the split with drop_last: no step at all (said by the schedule as
   -- "iters_per_epoch must be a finite integer >= 1, got 0")
   if tr.train_loader:nbatches() < 1 then
      error(string.format('nr.train: the %s split of %s gives no batch per epoch: %d samples%s, batch %d with drop_last '
         .. '(lower data.batch, or data.drop_last = false keeps the partial batch)', tr.train_set.split, d.dataset,
         tr.train_loader:samples(), d.shard and ' in this shard' or '', tr.train_loader.batch), 0)
   end
   if d.val_split then
      tr.val_set = open(d.val_split, d.dataset == 'imagefolder' and tr.train_set or nil)
      tr.val_loader = data.loader(tr.val_set, loader_opts(d, false, seed, tr.model, tr.val_set, tr.device))
   end
end

-- The error for a model with k outputs per sample on dataset ds, or nil when they agree (or ds
-- does not say how many classes it has).
local function outputs_mismatch(k, ds)
   if not (ds and type(ds.classes) == 'number' and ds.classes > 0 and k ~= ds.classes) then return nil end
   return string.format('nr.train: the model gives %d outputs per sample but the %s dataset has %d classes: its last '
      .. 'layer should have %d outputs (class ids 0..%d)', k, tostring(ds.name or 'training'), ds.classes, ds.classes,
      ds.classes - 1)
end

-- The model against the data, before the run starts (and before its folder is claimed): one
-- sample's shape through the model (a VGG pool head sized for another input fails here, not at
-- the first forward) and its outputs against the dataset's classes (a mismatch otherwise surfaced
-- as a bad label at the first step). The user's own model (no nr_info) is checked where every one
-- of its modules computes its shape; else at its first forward (Trainer:note_outputs).
local function check_model_fits_data(tr)
   local info, l, ds = rawget(tr.model, 'nr_info'), tr.train_loader, tr.train_set
   if not (l and type(l.shape) == 'table' and #l.shape == 4) then return end
   local sample = {l.shape[2], l.shape[3], l.shape[4]}
   local ok, out = pcall(tr.model.outputShape, tr.model, sample)
   if type(info) ~= 'table' then
      -- trusted only when every module computes its own shape: a custom module without
      -- outputShape inherits the identity, which may not be what its forward does
      local default = require('nr.nn.module').outputShape
      for _, m in ipairs(tr.model:listModules()) do
         if m.outputShape == default then return end
      end
      local msg = ok and type(out) == 'table' and #out == 1 and type(out[1]) == 'number' and outputs_mismatch(out[1], ds)
      if msg then error(msg, 0) end
      return
   end
   if not ok then
      error(string.format('nr.train: the model does not take the data\'s samples (%s): %s\n  Set --model.input (the model) '
         .. 'or --data.size (the data) so that they agree.', table.concat(sample, ' x '), tostring(out)), 0)
   end
   local k, classes = info.classes, ds and ds.classes
   if type(k) == 'number' and type(classes) == 'number' and classes > 0 and k ~= classes then
      error(string.format('nr.train: the model has %d outputs but the %s dataset has %d classes (--model.classes %d)',
         k, tostring(ds.name or 'training'), classes, classes), 0)
   end
end

-- A JSON-able view of the resolved recipe (modules and functions described, not serialized).
local function recipe_json(rc)
   local function conv(v, seen)
      if is_module(v) then return {module = v:typename(), params = v:nParameters()} end
      if type(v) == 'function' then return '<function>' end
      if type(v) == 'userdata' then return '<userdata>' end
      if type(v) ~= 'table' then return v end
      if T.is_tensor(v) then return '<' .. v:describe() .. '>' end
      if seen[v] then return '<cycle>' end
      seen[v] = true
      local out = {}
      for k, x in pairs(v) do
         if not (type(x) == 'table' and x.nbatches) then out[k] = conv(x, seen) else out[k] = '<loader>' end
      end
      seen[v] = nil
      return out
   end
   local r = conv(rc, {})
   r.progress = nil
   -- ready-made loaders: their batch sizes are the run's, not the recipe's defaults
   local d = rc.data
   if type(d) == 'table' and type(r.data) == 'table' then
      if type(d.train) == 'table' and type(d.train.batch) == 'number' then r.data.batch = d.train.batch end
      if type(d.val) == 'table' and type(d.val.batch) == 'number' then r.data.eval_batch = d.val.batch end
   end
   return r
end
M.recipe_json = recipe_json

-- Top-level recipe fields the trainer reads (those with nil defaults are not keys of DEFAULTS).
local TOP_FIELDS = {model = true, nr = true, dist = true, hooks = true, progress = true, out = true, resume = true,
                    max_epochs = true, memory_format = true, clip_grad_norm = true, init = true}
for k in pairs(M.DEFAULTS) do TOP_FIELDS[k] = true end

-- A top-level field nr.train does not read is left to the recipe's own functions (a model
-- function may read rc.width); a near miss of one it reads (epoch, checkpoint_evry), or a
-- command-line alias written at the top (lr for optim.lr), would silently train with the default:
-- an error naming the field meant (refuse_typos; a recipe's own field that happens to be one is
-- renamed).
-- PyTorch / Lightning / timm names for fields nr.train reads elsewhere (learning_rate = 0.3 at the
-- top trained at optim.lr's default: too far from every field for the near-miss test)
local FOREIGN_NAMES = {learning_rate = 'optim.lr', batch_size = 'data.batch', weight_decay = 'optim.weight_decay',
                       num_epochs = 'epochs', n_epochs = 'epochs', max_epoch = 'max_epochs', nesterov = 'optim.nesterov',
                       num_workers = 'data.threads', label_smoothing = 'loss.label_smoothing', warmup = 'schedule.warmup',
                       warmup_epochs = 'schedule.warmup', milestones = 'schedule.milestones', optimizer = 'optim',
                       scheduler = 'schedule', lr_scheduler = 'schedule', drop_last = 'data.drop_last'}

-- The field a name k probably meant: nrlua's field for a PyTorch / Lightning / timm name, else
-- a near miss among fields (a list of names, tried in order); nil when none is close.
function M.guess_field(k, fields)
   if FOREIGN_NAMES[k] then return FOREIGN_NAMES[k] end
   -- a field given without its section (--target for nr.target), or a near miss of one
   for _, f in ipairs(fields) do
      if f:sub(-#k - 1) == '.' .. k then return f end
   end
   local near = check.near_miss(k, fields)
   if near or k:find('.', 1, true) then return near end
   for _, f in ipairs(fields) do
      local last = f:match('%.([^.]+)$')
      if last and check.near_miss(k, {last}) then return f end
   end
end

local function refuse_typos(recipe)
   local fields, names = {}, {}
   for f in pairs(TOP_FIELDS) do fields[#fields + 1] = f end
   table.sort(fields)
   for k in pairs(recipe) do if type(k) == 'string' and not TOP_FIELDS[k] then names[#names + 1] = k end end
   table.sort(names)
   local aliases = require('nr.recipe').ALIASES
   for _, k in ipairs(names) do
      local guess = aliases[k] or M.guess_field(k, fields)
      -- an error: a note on the console scrolled away while the run trained at the default
      if guess then
         error(string.format('nr.train: recipe.%s is not a field nr.train reads (did you mean %s?); as it is, the run '
            .. 'would train with %s at its default', k, guess, guess), 0)
      end
   end
end

-- A load_weights error said for init / evaluate: without its function's name (load_weights
-- raises at its caller, so no position inside lua/nr precedes it; a user's names function keeps its own).
local function weights_error(err)
   return (tostring(err):gsub('^nr%.checkpoint%.load_weights: ', ''))
end

-- recipe.init as {path, names, skip} (nil: none), its fields checked before anything is built.
local function init_spec(init)
   if init == nil or init == false then return nil end
   if type(init) == 'string' then init = {path = init} end
   check.arg(type(init) == 'table', 'nr.train', 'init must be a path or a table {path = ..., names = ..., skip = ...}, got %s',
      check.show(init))
   for k in pairs(init) do
      check.arg(k == 'path' or k == 'names' or k == 'skip', 'nr.train', 'init has no field %s (fields: path, names, skip)',
         check.show(k))
   end
   check.arg(type(init.path) == 'string' and init.path ~= '', 'nr.train', 'init.path must be a path, got %s',
      check.show(init.path))
   return {path = M.expand_path(init.path, 'recipe.init.path'), names = init.names, skip = init.skip}
end

-- Loads recipe.init into a new run's model (before its first step; the optimizer holds the same
-- tensors, which are overwritten in place, so a rejuvenated model's file, whose layers differ, is
-- refused: `--resume RUN --out NEW` continues such a run in a new folder).
function Trainer:load_init()
   local init = self.init
   local ok, err = pcall(ck.load_weights, self.model, init.path, {names = init.names, skip = init.skip, rejuvenated = false})
   if not ok then
      error('nr.train: init: ' .. weights_error(err), 0)
   end
   local skip = type(init.skip) == 'string' and {init.skip} or init.skip
   self:print(string.format('initialized from %s%s%s', init.path,
      init.names == 'torchvision' and ' (torchvision names)' or (init.names and ' (renamed)' or ''),
      skip and #skip > 0 and ('; left as built: ' .. table.concat(skip, ', ')) or ''))
end

-- Creates the trainer (model, data, optimizer, schedule, run folder); does not train.
-- evaluating: for M.evaluate, which writes nothing (the run folder is not created).
function M.new(recipe, evaluating)
   local rc = M.resolve(recipe)
   local tr = setmetatable({recipe = rc, hooks = {}, states = {}, state_order = {}, status = {}, evaluating = evaluating,
                            schedule_hold = false, extend_held = false, held_epochs = 0, epoch = 0, step = 0, best_top1 = nil,
                            train_images = 0, train_time = 0}, Trainer)
   for h in pairs(HOOKS) do tr.hooks[h] = {} end
   refuse_typos(recipe)   -- before anything is built
   check.arg(type(rc.epochs) == 'number' and rc.epochs >= 1, 'nr.train', 'epochs must be >= 1, got %s', check.show(rc.epochs))
   -- counts are whole numbers in range: 1e300 epochs ran for ever, checkpoint_every -1 wrote no
   -- checkpoint at all, val_batches 0 skipped evaluation (0 means none only where documented)
   for _, f in ipairs({{'epochs', 1}, {'log_every', 1}, {'eval_every', 0}, {'checkpoint_every', 0}, {'keep', 1}}) do
      if rc[f[1]] ~= nil then check.int32(rc[f[1]], 'nr.train', f[1], f[2]) end
   end
   if type(rc.data) == 'table' and rc.data.val_batches ~= nil then
      check.int32(rc.data.val_batches, 'nr.train', 'data.val_batches', 1)
   end
   check.arg(rc.max_epochs == nil or (type(rc.max_epochs) == 'number' and rc.max_epochs >= rc.epochs), 'nr.train',
      'max_epochs must be >= epochs (%s), got %s', tostring(rc.epochs), check.show(rc.max_epochs))
   check.arg(not rc.clip_grad_norm or (type(rc.clip_grad_norm) == 'number' and rc.clip_grad_norm > 0), 'nr.train',
      'clip_grad_norm must be a number > 0 (or nil: no clipping), got %s', check.show(rc.clip_grad_norm))
   tr.init = init_spec(rc.init)
   -- the bounds of nr.set_num_threads and nr.manual_seed, so a recipe value cannot wrap at the FFI
   if rc.threads ~= nil then check.int32(rc.threads, 'nr.train', 'threads', 0, nrffi.MAX_THREADS) end
   if rc.seed ~= nil then check.int(rc.seed, 'nr.train', 'seed', 0, 2 ^ 53) end
   if rc.threads and rc.threads > 0 then C.nr_set_num_threads(rc.threads) end
   if rc.seed then C.nr_rng_seed(rc.seed) end
   tr.device = pick_device(rc.device)
   rc.device_resolved = tr.device
   -- device 'cuda:N': GPU N becomes the current one, so what the run creates lives there
   local gpu = tr.device:match('^cuda:(%d+)$')
   if gpu then require('nr.cuda').set_device(tonumber(gpu)) end
   check.arg(rc.precision == 'fp32' or rc.precision == 'bf16', 'nr.train', 'precision must be "fp32" or "bf16", got %s',
      check.show(rc.precision))
   if rc.precision == 'bf16' and tr.device == 'cpu' then
      error(string.format('nr.train: precision = "bf16" computes on CUDA only, but the device is %s%s', tr.device,
         rc.device == 'auto' and ' (no GPU found)' or ''), 0)
   end
   tr.precision = rc.precision
   local fmt = rc.memory_format
   if fmt == nil then fmt = (rc.precision == 'bf16' and 'channels_last' or 'contiguous') end
   check.arg(fmt == 'contiguous' or fmt == 'channels_last', 'nr.train',
      'memory_format must be "contiguous" or "channels_last", got %s', check.show(fmt))
   if fmt == 'channels_last' and tr.device == 'cpu' then
      error(string.format('nr.train: memory_format = "channels_last" is a CUDA layout, but the device is %s%s', tr.device,
         rc.device == 'auto' and ' (no GPU found)' or ''), 0)
   end
   tr.memory_format = fmt
   tr.t_start = progress.now()

   -- data parallelism (nr.dist; a no-op outside an MPI launch): before the model moves to its
   -- GPU and before the loaders are built, so each rank gets its shard (docs in lua/nr/dist.lua)
   local dist = package.searchpath('nr.dist', package.path) and require('nr.dist') or nil
   if type(dist) == 'table' and type(dist.attach) == 'function' then
      dist.attach(tr, rc.dist)
   else
      tr.rank, tr.world_size, tr.is_main = 0, 1, true
   end

   -- model and loss
   tr.model = build_model(rc)
   if tr.device ~= 'cpu' then tr.model:to(tr.device) end
   do
      local ok, tree = pcall(tr.model.tree, tr.model)
      rc.model_built = {module = tr.model:typename(), params = tr.model:nParameters(), tree = ok and tree or nil}
   end
   local nn = require 'nr.nn'
   -- as recipe.data's keys: a misspelt option (label_smooth) trained without smoothing, silently
   for k in pairs(rc.loss) do
      if k ~= 'label_smoothing' then
         error(string.format('nr.train: recipe.loss has no option %s (options: label_smoothing)', check.show(k)), 0)
      end
   end
   tr.criterion = nn.CrossEntropyLoss({label_smoothing = rc.loss.label_smoothing or 0})
   if tr.device ~= 'cpu' and tr.criterion.to then tr.criterion:to(tr.device) end

   -- data
   build_data(tr, rc)
   check_model_fits_data(tr)
   tr.iters_per_epoch = tr.train_loader:nbatches()
   if rc.data.train_batches then tr.iters_per_epoch = math.min(tr.iters_per_epoch, rc.data.train_batches) end

   -- optimizer and schedule
   tr.optimizer = require('nr.optim').build(rc.optim, tr.model)
   tr.base_lr = rc.optim.lr
   if rc.schedule then
      tr.schedule = schedule.build(rc.schedule, {base_lr = rc.optim.lr, epochs = rc.epochs, iters_per_epoch = tr.iters_per_epoch})
   end

   -- run folder
   local name = rc.name or 'run'
   -- the default run folder is runs/<name>-<date>: a name with a / (../../x) would put it elsewhere
   if type(name) ~= 'string' or name == '' or name:find('/', 1, true) or name == '.' or name == '..' then
      error(string.format('nr.train: name must be a plain folder name (no /), got %s', check.show(name)), 0)
   end
   -- folder names are strings (out = 5 failed deep in nr.checkpoint as a raw Lua error)
   for _, k in ipairs({'out', 'resume'}) do
      if rc[k] ~= nil and type(rc[k]) ~= 'string' then
         error(string.format('nr.train: %s must be a folder name (a string), got %s', k, check.show(rc[k])), 0)
      end
   end
   rc.resume = expand_path(rc.resume, 'recipe.resume')
   -- an empty folder name (--out '' or an unset $VAR) would put the run in the current folder or /
   for _, k in ipairs({'out', 'resume'}) do
      if rc[k] == '' or (type(rc[k]) == 'string' and expand_path(rc[k], 'recipe.' .. k) == '') then
         error(string.format('nr.train: %s is an empty folder name', k), 0)
      end
   end
   if rc.resume then M.need_run_folder(rc.resume) end
   local resume_run = rc.resume and run_folder_of(rc.resume)
   tr.out = expand_path(rc.out, 'recipe.out') or resume_run or ('runs/' .. name .. '-' .. date_tag())
   rc.out = tr.out
   -- progress = false: nothing on the console (the run's folder still gets its log)
   local popts = rc.progress or {}
   if rc.progress == false then popts = {stream = progress.NULL_STREAM, tty = false} end
   tr.progress = progress.new({stream = popts.stream or io.stdout, tty = popts.tty, every = popts.every or rc.log_every})

   -- user hooks, then NR (which registers its hooks and states)
   for hname, fn in pairs(rc.hooks or {}) do
      if type(fn) == 'table' then
         for _, f in ipairs(fn) do tr:add_hook(hname, f) end
      else
         tr:add_hook(hname, fn)
      end
   end
   local nrc = rc.nr
   if nrc ~= nil and nrc ~= false and nrc ~= 'off' and not (type(nrc) == 'table' and nrc.enabled == false) then
      local ok, rej = pcall(require, 'nr.rejuvenate')
      if not ok then error('nr.train: recipe.nr is set but nr.rejuvenate cannot be loaded: ' .. tostring(rej), 0) end
      check.arg(type(rej.attach) == 'function', 'nr.train', 'nr.rejuvenate has no attach(trainer, cfg)')
      rej.attach(tr, nrc)
   end
   -- made last: a recipe refused above (a bad NR setting, a hook) leaves no empty run folder
   if not evaluating then ck.mkdirs(tr.out) end
   return tr
end

-- Parameter shapes (name -> shape), recorded in checkpoints as the architecture.
local function shapes_of(model)
   local out = {}
   for _, e in ipairs(model:namedParameters()) do out[e.name] = e.param:shape() end
   return out
end

-- Writes a checkpoint of the current state into <out>/checkpoint.
-- model.safetensors' metadata: the epoch, the step and the layer sizes (nr.checkpoint.load_weights
-- loads the file into a freshly built model, rejuvenated or not).
function Trainer:checkpoint_metadata()
   local meta = ck.arch_metadata(self.model)
   meta.epoch, meta.step = self.epoch, self.step
   return meta
end

function Trainer:save_checkpoint(opts)
   opts = opts or {}
   local rc = self.recipe
   local states = {}
   for _, name in ipairs(self.state_order) do states[name] = self.states[name].save() end
   local arch = {shapes = shapes_of(self.model)}
   if type(rc.model) == 'table' and not is_module(rc.model) then arch.model = recipe_json(rc.model) end
   if opts.best then self.best_checkpoint = ck.step_name(self.step) end
   local state = {
      version = 1,
      epoch = self.epoch, step = self.step,
      architecture = arch,
      optimizer = self.optimizer:state(),
      schedule = self.schedule and self.schedule:state() or nil,
      schedule_hold = self.schedule_hold,
      rng = rng_state(),
      trainer = {best_top1 = self.best_top1, best_epoch = self.best_epoch, train_images = self.train_images,
                 -- the folder holding the best weights: `best` is set back to it on resume
                 best_checkpoint = self.best_checkpoint,
                 held_epochs = self.held_epochs, last_val = self.last_val,
                 train_time = self.train_time, time = progress.now() - self.t_start + (self.time_offset or 0)},
      states = states,
      threads = C.nr_get_num_threads(),
      device = self.device,
   }
   local ckdir = self.out .. '/checkpoint'
   local ok, dir = pcall(ck.save, ckdir, {step = self.step, weights = ck.model_tensors(self.model), state = state,
                                          keep = rc.keep, best = opts.best, metadata = self:checkpoint_metadata()})
   if not ok then
      -- a full disk: said with what is left to continue from, not as a position inside nr.checkpoint
      local prev = ck.find(ckdir)
      error(string.format('nr.train: cannot write the checkpoint of epoch %d (step %d) into %s: %s\n  %s', self.epoch,
         self.step, ckdir, (tostring(dir):gsub('^[^\n]-%.lua:%d+: ', '')), prev and string.format('The last complete '
         .. 'checkpoint, %s, is intact: --resume %s continues from it.', prev, self.out) or 'No earlier checkpoint exists.'), 0)
   end
   self.last_checkpoint = dir
   return dir
end

-- Restores everything from a checkpoint (path: a run folder, its checkpoint/ or a step folder).
function Trainer:load_checkpoint(path, found)
   local r = ck.load(path, found)
   local s = r.state
   if r.passed_over then
      -- the epochs after this checkpoint are trained again: said, not left to the step count
      self:print(string.format('note: checkpoint/latest names a damaged checkpoint (%s): continuing from %s', r.passed_over, r.dir))
   end
   if type(s.epoch) ~= 'number' or type(s.step) ~= 'number' then
      error(string.format('nr.train: %s/state.json has no epoch and step: not a checkpoint of nr.train', r.dir), 0)
   end
   local function whole(v) return v >= 0 and v < 2 ^ 31 and v == math.floor(v) end
   if not (whole(s.epoch) and s.step >= 0 and s.step < 2 ^ 53 and s.step == math.floor(s.step)) then
      error(string.format('nr.train: %s/state.json is damaged: epoch %s, step %s', r.dir, tostring(s.epoch),
         tostring(s.step)), 0)
   end
   -- the sections read below, by type (a string where a table belongs failed as a raw Lua error)
   local t0 = type(s.trainer) == 'table' and s.trainer or {}
   for _, f in ipairs({{'optimizer', s.optimizer, 'table'}, {'schedule', s.schedule, 'table'}, {'rng', s.rng, 'table'},
                       {'trainer', s.trainer, 'table'}, {'states', s.states, 'table'}, {'threads', s.threads, 'number'},
                       {'trainer.time', t0.time, 'number'}, {'trainer.held_epochs', t0.held_epochs, 'number'},
                       {'trainer.train_images', t0.train_images, 'number'}, {'trainer.train_time', t0.train_time, 'number'}}) do
      if f[2] ~= nil and type(f[2]) ~= f[3] then
         error(string.format('nr.train: %s/state.json is damaged: %s must be a %s, got %s', r.dir, f[1], f[3],
            check.show(f[2])), 0)
      end
   end
   -- architecture first (NR restores widths / split layers), then weights
   for _, name in ipairs(self.state_order) do
      local spec = self.states[name]
      if spec.before_weights and s.states and s.states[name] ~= nil then spec.load(s.states[name]) end
   end
   -- a rejuvenated run resumed with NR off (--nr off): its model is the rejuvenated one all the same
   local nr_state = type(s.states) == 'table' and s.states.nr
   if not self.states.nr and type(nr_state) == 'table' and nr_state.arch then
      require('nr.rejuvenate').restore_arch(self, nr_state.arch)
   end
   local weights = r.weights
   if self.device ~= 'cpu' then
      for k, w in pairs(weights) do weights[k] = w:to(self.device) end
   end
   local loaded, err = pcall(ck.load_into, self.model, weights, r.dir)
   if not loaded then
      -- weights that do not fit: most often another recipe file than the run's (its name says)
      local rec = M.run_recipe(run_folder_of(r.dir))
      local was = rec and type(rec.name) == 'string' and rec.name
      if was and was ~= (self.recipe.name or 'run') then
         err = string.format('%s (the run was made by the recipe named "%s", this one is "%s": resume it with the recipe '
            .. 'file that made it)', tostring(err), was, tostring(self.recipe.name or 'run'))
      end
      error(err, 0)
   end
   self.optimizer:refresh()
   -- state (momentum, step count, schedule position) comes from the checkpoint; hyperparameters
   -- (lr, momentum, weight decay, base LR) from the recipe, so `--resume DIR --lr 0.01` means it
   if s.optimizer then
      local os_ = {}
      for k, v in pairs(s.optimizer) do if k ~= 'config' and k ~= 'groups' then os_[k] = v end end
      self.optimizer:load_state(os_)
   end
   if self.schedule and s.schedule then
      self.schedule:load_state({name = s.schedule.name, epoch = s.schedule.epoch, iter = s.schedule.iter})
   elseif self.schedule and (s.epoch or 0) > 0 then
      -- its position is unknown: it would start from its beginning in the middle of the run
      error(string.format('nr.train: %s was trained without a schedule; resuming with schedule %q would start it '
         .. 'from its first epoch at epoch %d: resume without it, or start a new run (--out) from these weights',
         r.dir, self.schedule.name, (s.epoch or 0) + 1), 0)
   end
   -- a hold of a run that had NR was NR's (it releases it): resumed with NR off, nothing would
   -- release it; a hold a hook of the user's set is restored
   local nr_dropped = type(s.states) == 'table' and s.states.nr ~= nil and self.states.nr == nil
   self.schedule_hold = not nr_dropped and s.schedule_hold or false
   if s.rng then set_rng_state(s.rng) end
   self.epoch, self.step = s.epoch or 0, s.step or 0
   local t = s.trainer or {}
   self.best_top1, self.best_epoch = t.best_top1, t.best_epoch
   self.best_checkpoint = type(t.best_checkpoint) == 'string' and t.best_checkpoint or nil
   -- the latest evaluation, for the summary of a run resumed after its last epoch
   self.last_val = type(t.last_val) == 'table' and t.last_val or nil
   self.train_images, self.train_time = t.train_images or 0, t.train_time or 0
   self.time_offset = t.time
   -- held epochs (they extend the run); checkpoints without the field: epochs the schedule missed
   self.held_epochs = t.held_epochs
      or (s.schedule and s.schedule.epoch and math.max(0, (s.epoch or 0) - s.schedule.epoch)) or 0
   for _, name in ipairs(self.state_order) do
      local spec = self.states[name]
      if not spec.before_weights and s.states and s.states[name] ~= nil then spec.load(s.states[name]) end
   end
   if s.threads and s.threads ~= C.nr_get_num_threads() then
      self:print(string.format('note: the checkpoint was written with %d threads, this run uses %d (results may differ in the last bits)',
         s.threads, C.nr_get_num_threads()))
   end
   return r.dir
end

-- A device batch in the dtype and memory format the model computes in: the activations follow
-- the input's, so the images become bfloat16 under precision 'bf16' and channels-last under
-- memory_format 'channels_last', converted on the device into one reused buffer (as is when
-- they already are). uint8 images (a loader with output = 'uint8') are finished there by
-- loader:normalize, in the same pass.
function Trainer:as_model_input(xd, loader)
   local dt = self.precision == 'bf16' and 'bfloat16' or 'float32'
   local fmt = xd:dim() == 4 and self.memory_format or 'contiguous'
   local bytes = xd:dtype() == 'uint8'
   if not bytes and xd:dtype() == dt and fmt == 'contiguous' then return xd end
   local b = rawget(self, '_x_dev')
   if not b or not T.same_shape(b:shape(), xd:shape()) or b:dtype() ~= dt then
      b = T.empty(xd:shape(), {dtype = dt, device = self.device, memory_format = fmt})
      self._x_dev = b
   end
   if not bytes then return b:copy(xd) end
   if not (loader and type(loader.normalize) == 'function') then
      error('nr.train: the loader yields uint8 images but has no normalize(x, out) to finish them', 0)
   end
   return loader:normalize(xd, b)
end

-- The batches of epoch e of a loader (at most `limit`) on the training device, as the model
-- takes them (as_model_input):
--   for xd, yd, bn, checked in tr:device_batches(loader, e, limit [, purpose]) do ... end
-- bn is the batch size; checked says the labels were range-checked on the host (so the
-- criterion need not check them on the GPU). On the CPU the batches pass through. On a GPU each
-- host batch is copied ahead on the copy stream (nr_cuda_prefetch) into one of two device
-- buffers while the step before it computes; the next host batch is fetched only after the
-- current one was staged, because loaders recycle their host buffers.
function Trainer:device_batches(loader, e, limit, purpose)
   check.arg(type(loader) == 'table' and type(loader.epoch) == 'function', 'Trainer:device_batches',
      'expected a loader (epoch(e)) and an epoch, got %s', type(loader))
   local taken = 0
   local it = loader:epoch(e)
   if self.device == 'cpu' then
      return function()
         if limit and taken >= limit then return nil end
         local x, y = it()
         if x == nil then return nil end
         taken = taken + 1
         if x:dtype() == 'uint8' then x = self:as_model_input(x, loader) end
         return x, y, x:size(1), false
      end
   end
   -- slots per purpose ('train', 'eval'): an evaluation inside a training epoch (from a hook)
   -- must not overwrite the training batch staged ahead
   local all = rawget(self, '_prefetch')
   if not all then
      all = {}
      self._prefetch = all
   end
   purpose = purpose or 'train'
   local slots = all[purpose]
   if not slots then
      slots = {{}, {}}
      all[purpose] = slots
   end
   local turn = 0
   -- copies host batch (x, y) ahead into the next slot; returns that slot
   local function stage(x, y)
      turn = turn % 2 + 1
      local s = slots[turn]
      local classes = rawget(self, '_classes')
      s.checked = classes ~= nil and check_host_labels(y, classes)
      s.bn = x:size(1)
      s.x, s.full_x = M.prefetch(x, s.full_x, self.device)
      s.y, s.full_y = M.prefetch(y, s.full_y, self.device)
      s.ticket = s.y.ticket
      return s
   end
   local nxt
   local function fetch()
      if limit and taken >= limit then return nil end
      local x, y = it()
      if x == nil then return nil end
      taken = taken + 1
      return stage(x, y)
   end
   nxt = fetch()
   return function()
      local cur = nxt
      if not cur then return nil end
      nxt = fetch()   -- its copy overlaps the step of `cur`, queued after this returns
      if cur.ticket then check.status(C.nr_cuda_prefetch_wait(cur.y.t.c.device_index, cur.ticket), 'nr.train: input prefetch') end
      return self:as_model_input(cur.x.t, loader), cur.y.t, cur.bn, cur.checked
   end
end

-- The trainer's metrics accumulator for 'train' (strict: a non-finite loss stops the run) or
-- 'eval', reset; one of each per trainer (their device buffers are reused), so an evaluation a
-- hook runs mid-epoch leaves the epoch's sums alone.
function Trainer:meter(kind)
   local meters = rawget(self, '_meters')
   if not meters then
      meters = {}
      self._meters = meters
   end
   local m = meters[kind]
   if not m then
      m = M.meter(self.device, kind == 'train')
      meters[kind] = m
   end
   m:reset()
   return m
end

-- Evaluates on the validation loader: {loss, top1, top5, n}.
function Trainer:evaluate(loader)
   loader = loader or self.val_loader
   if not loader then return nil end
   local model, crit = self.model, self.criterion
   local limit = self.recipe.data.val_batches
   local meter = self:meter('eval')
   -- a shard of a sharded dataset loader ends with repeats (nr.data's Loader:unique_samples): not counted
   local unique = type(loader.unique_samples) == 'function' and loader:unique_samples() or nil
   local function pass()
      local b, counted = 0, 0
      for xd, yd, _, checked in self:device_batches(loader, 1, limit, 'eval') do
         b = b + 1
         local out = model:forward(xd)
         self:note_outputs(out)
         local rows = out:size(1)
         if unique and counted + rows > unique then rows = math.max(0, unique - counted) end
         if rows > 0 then
            if rows < out:size(1) then out, yd = out:narrow(1, 1, rows), yd:narrow(1, 1, rows) end
            meter:add(out, yd, crit:loss_tensor(out, yd, checked), b)
            counted = counted + rows
         end
         if meter:due() then meter:read('the evaluation') end
      end
      meter:read('the evaluation')
   end
   model:evaluate()
   -- gradients off, as torch.no_grad(): lets the model fold Conv2d + BN + ReLU for inference
   local grad_mode = require('nr.nn.module')
   local grad_was = grad_mode.set_grad_enabled(false)
   local ok, err = xpcall(pass, M.user_traceback)
   grad_mode.set_grad_enabled(grad_was)
   model:training()
   if not ok then error(err, 0) end
   local n = meter.n
   if n == 0 then return nil end
   return {loss = meter.loss / n, top1 = 100 * meter.top1 / n, top5 = 100 * meter.top5 / n, n = n}
end

-- Cap on all epochs of a run extended by held epochs: rc.max_epochs, default 2 x rc.epochs.
function Trainer:max_epochs()
   local rc = self.recipe
   return rc.max_epochs or 2 * rc.epochs
end

-- Epochs the run trains: rc.epochs, plus the epochs that ended with the schedule held when
-- tr.extend_held is set (so the schedule still completes rc.epochs epochs), capped by
-- max_epochs. pending: count the current epoch as held too (a projection while it runs held).
function Trainer:planned_epochs(pending)
   local rc = self.recipe
   if not self.extend_held then return rc.epochs end
   return math.min(rc.epochs + self.held_epochs + (pending and 1 or 0), self:max_epochs())
end

-- Scales the model's gradients so their total 2-norm is at most max_norm (recipe.clip_grad_norm):
-- after the after_backward hooks (NR's L1 term, the ranks' averaging), before the step; the norm
-- stays on the device (self.grad_norm, a one-element tensor: reading it waits for the GPU).
function Trainer:clip_gradients(max_norm)
   local t = rawget(self, 'grad_norm')
   if not t then -- (on the run's device, where the model is)
      t = T.zeros({1}, {device = self.device})
      self.grad_norm = t
   end
   clip_grad_norm(self.model, max_norm, {out = t})
end

-- One epoch of training: returns {loss, top1, images, time}.
function Trainer:train_epoch(epoch)
   local model = self.model
   model:training()
   -- nothing here reads the gradient for the input batch: its first layer skips it (as PyTorch
   -- does for inputs that do not require grad); the model's own setting is back after the epoch
   local input_grad_was = model.setInputGrad and not rawget(model, '_noInputGrad')
   if model.setInputGrad then model:setInputGrad(false) end
   -- also when the epoch fails (a hook's error, the NaN-loss stop, Ctrl-C): a model used after the
   -- run (its error caught) kept returning nil from backward
   local ok, res = xpcall(self._train_steps, M.user_traceback, self, epoch)
   if model.setInputGrad then model:setInputGrad(input_grad_was) end
   if not ok then error(res, 0) end
   return res
end

-- The steps of train_epoch (which restores the model's input-gradient setting around them).
function Trainer:_train_steps(epoch)
   local rc = self.recipe
   local model, crit, opt, sched = self.model, self.criterion, self.optimizer, self.schedule
   local total = self.iters_per_epoch
   self.progress:begin_epoch(epoch, self:planned_epochs(self.schedule_hold), total)
   local t0 = progress.now()
   local meter = self:meter('train')
   local what = 'epoch ' .. epoch
   local n, win_t = 0, t0
   local i = 0
   local log_every = rc.log_every or 50
   for xd, yd, bn, checked in self:device_batches(self.train_loader, epoch, total, 'train') do
      i = i + 1
      self.step = self.step + 1
      if sched then opt.config.lr = sched:lr() end
      local out = model:forward(xd)
      self:note_outputs(out)
      local loss_t = crit:loss_tensor(out, yd, checked)
      meter:add(out, yd, loss_t, self.step)
      -- the loss is checked before the step changes any weight wherever reading it is free
      if meter:due() then meter:read(what, opt.config.lr) end
      model:zeroGradParameters()
      local g = crit:backward(out, yd, 1, checked)
      model:backward(xd, g)
      self:call('after_backward', step_info(loss_t, bn))
      if rc.clip_grad_norm then self:clip_gradients(rc.clip_grad_norm) end
      opt:step()
      local held_before = self.schedule_hold
      self:call('after_step', step_info(loss_t, bn))
      -- a hook released the hold mid-epoch (NR's Δt-steps check): where the held schedule stood
      -- (inside a warm-up it was not standing: the warm-up runs while held); only a run that
      -- held epochs lengthen (extend_held) gives the schedule those steps back at the epoch end
      if sched and held_before and not self.schedule_hold and not self.release_iter and self.extend_held
         and not sched:in_warmup() then
         self.release_iter = sched.iter
      end
      if sched and (not self.schedule_hold or sched:in_warmup()) then
         sched:step()
         -- a warm-up that ran while held left the schedule part way into an epoch: it crosses
         -- that epoch's end inside this one (the epoch's end then does not advance it again);
         -- left to the epoch's end, its LR stood still for the rest of this epoch
         if not self.schedule_hold and not self.schedule_rolled and i < total and sched.iter >= sched.iters_per_epoch then
            sched:next_epoch()
            self.schedule_rolled = true
         end
      end
      n = n + bn
      local log_now = i % log_every == 0 or i == total
      local show = self.progress:due(i)
      -- a terminal's bar redraws 10 times a second: it shows the sums of the last read instead of
      -- draining the GPU each time (plain progress lines and log points read)
      if log_now or (show and not self.progress.tty) then meter:read(what, opt.config.lr) end
      if log_now or show then
         local now = progress.now()
         local seen = meter.n > 0
         self.progress:update(i, {loss = seen and meter.loss / meter.n or nil, acc = seen and 100 * meter.top1 / meter.n or nil,
                                  ips = n / math.max(now - t0, 1e-9)})
         if log_now then
            local w = meter:take_window()
            self:log({kind = 'step', epoch = epoch, iter = i, loss = w.loss, top1 = w.top1,
                      lr = opt.config.lr, images_per_s = w.n / math.max(now - win_t, 1e-9)})
            win_t = now
         end
      end
   end
   meter:read(what, opt.config.lr)
   local dt = progress.now() - t0
   n = meter.n
   return {loss = n > 0 and meter.loss / n or nil, top1 = n > 0 and 100 * meter.top1 / n or nil, images = n, time = dt}
end

-- The loss check catches a step that diverges before the next forward; the epoch's last step has
-- no next forward in the epoch, so NaN / inf weights it made were evaluated, reported as a
-- finished epoch and checkpointed as the latest (even the best) weights. Checked once an epoch.
function Trainer:check_weights(epoch)
   local function bad(list, what)
      for _, e in ipairs(list) do
         if not e.t:all_finite() then
            local last = self.last_checkpoint and ('; the last checkpoint is ' .. self.last_checkpoint) or ''
            error(string.format('nr.train: the run diverged in epoch %d: %s %s holds NaN or inf after step %d (lr %g), '
               .. 'though the losses were finite; nothing of this epoch is evaluated or checkpointed%s; lower the '
               .. 'learning rate?', epoch, what, e.name, self.step, self.optimizer.config.lr, last), 0)
         end
      end
   end
   local params, buffers = {}, {}
   for _, e in ipairs(self.model:namedParameters()) do params[#params + 1] = {name = e.name, t = e.param} end
   for _, e in ipairs(self.model:namedBuffers()) do buffers[#buffers + 1] = {name = e.name, t = e.tensor} end
   bad(params, 'parameter')
   bad(buffers, 'buffer')
end

-- The user's own model (the zoo's is checked before the run, check_model_fits_data) against the
-- dataset's classes, at its first forward: more outputs than classes trained silently (the extra
-- ones are never a label, yet count in top-1 / top-5), fewer failed only at the first label past
-- them. Ready-made loaders name no classes: not checked.
function Trainer:note_outputs(out)
   local k = out:size(2)
   local msg = rawget(self, '_classes') == nil and outputs_mismatch(k, self.train_set)
   if msg then error(msg, 0) end
   self._classes = k
end

local function fmt(v, f) return v and string.format(f, v) or '-' end

-- --resume of a run that stopped before writing its first checkpoint (killed in epoch 1): the
-- folder holds the run (recipe.json / metrics.jsonl) but no checkpoint, so there is nothing to
-- continue (a step folder without state.json, a first save cut short, is none) and the run starts
-- from the beginning, its partial files replaced (as Lightning's resume from a missing last
-- checkpoint). Decided from files every rank of nr.dist sees alike;
-- a rank's own folder under the run (<run>/ranks/<r>) is not checked again, as rank 0 may be
-- clearing the run's files meanwhile. A folder that holds no run, checkpoints that exist but fail
-- validation, or another --out than the run stay errors: nothing is discarded silently.
-- Returns true and what ck.find found (for ck.load) when the run can be resumed.
-- The run a resume path names (trailing slashes dropped), whether tr.out is that run's own folder
-- (compared as real paths) and whether it is, under nr.dist, a rank's own folder in it.
local function resume_target(tr, path)
   local named = (path:gsub('/+$', ''):gsub('^%./+', ''))
   local run = run_folder_of(named)
   local real_run, out = ck.realpath(run), ck.realpath(tr.out)
   local own_rank = out:sub(1, #real_run + 7) == real_run .. '/ranks/' and out:match('/ranks/%d+$') ~= nil
   return named, run, out == real_run, own_rank
end

local function resumable(tr, path)
   local found, why, passed_over = ck.find(path)
   if found then return true, {dir = found, state = why, passed_over = passed_over} end
   local named, run, own, own_rank = resume_target(tr, path)
   local function refuse(what)
      error(string.format('nr.train: cannot resume %s: %s', path, what), 0)
   end
   local damaged = named:match('step%-%d+$') or ck.exists(named .. '/state.json')   -- one named checkpoint
   -- a step folder without state.json is a save that never completed (killed, or a full disk, during
   -- the first checkpoint; nr.checkpoint ignores and prunes it): no checkpoint yet. One with it is damaged.
   for _, name in ipairs(ck.list(run .. '/checkpoint')) do
      damaged = damaged or (name:match('^step%-%d+$') and ck.exists(run .. '/checkpoint/' .. name .. '/state.json'))
   end
   -- damaged checkpoints first: "drop --out" (a restart) is no answer to them
   if damaged then refuse(why .. ((own or own_rank) and '; --overwrite starts the run again from the beginning' or '')) end
   if not own and not own_rank then refuse(why .. ' (a run restarts only in its own folder: drop --out)') end
   if not own_rank and not (ck.exists(run .. '/recipe.json') or ck.exists(run .. '/metrics.jsonl')) then
      refuse('it holds no run (no checkpoint, recipe.json or metrics.jsonl)')
   end
   tr:print(string.format('no checkpoint in %s yet (the run stopped before its first one): starting it from the '
      .. 'beginning', path))
   claim_run_folder(tr.out, true)
   return false
end

-- One writer per run folder: a second run into the same folder (a job started twice, another
-- terminal, another machine on a shared file system) would interleave its checkpoints and metrics
-- with this one's, or clear them (--overwrite). The lock (<out>/.nrlua.lock, flock) is taken before
-- anything in the folder is read or written and lasts until the run ends, or its process does.
function Trainer:_lock_out()
   if self.out_lock then self.out_lock:release() end
   local h, holder = ck.lock(self.out .. '/.nrlua.lock')
   if not h then
      error(string.format('nr.train: %s is in use by another run (%s): wait for it to end, or give another --out',
         self.out, holder > 0 and ('process ' .. holder) or 'its process has just started'), 0)
   end
   if h.unsupported then
      self:print(string.format('note: %s is on a file system without file locks: a second run into it would not be '
         .. 'refused', self.out))
   end
   self.out_lock = h
end

-- Runs the remaining epochs; returns the summary.
function Trainer:run()
   local rc = self.recipe
   self:_lock_out()
   -- a kill inside an atomic write (recipe.json; metrics.jsonl, rewritten whole by a resume) leaves
   -- <file>.tmp.<pid> behind, which nothing removed; the folder is this run's now (locked)
   for _, n in ipairs(ck.list(self.out)) do
      if n:match('^recipe%.json%.tmp%.%d+$') or n:match('^metrics%.jsonl%.tmp%.%d+$') then os.remove(self.out .. '/' .. n) end
   end
   local resume, found = false, nil
   if rc.resume then resume, found = resumable(self, rc.resume) end
   if resume then
      -- continued into another folder (--resume A --out B): B is a new run's, so another run there
      -- is refused unless --overwrite (its metrics and checkpoints were mixed with this one's)
      local _, run, own, own_rank = resume_target(self, rc.resume)
      local forked = not own and not own_rank
      if forked then claim_run_folder(self.out, rc.overwrite) end
      local dir = self:load_checkpoint(rc.resume, found)
      if forked then
         -- B's history starts with A's (trimmed to the checkpoint below): its report and --resume
         -- of B show the whole run, not only what came after the fork (rank 0's: nr.dist's other
         -- ranks keep their own folders' records). Written once A's checkpoint has loaded: a
         -- refused resume left A's metrics in B, which then refused a new run as "holds a run"
         local history = not self.out:match('/ranks/%d+$') and ck.read_file(run .. '/metrics.jsonl')
         if history then ck.write_atomic(self.out .. '/metrics.jsonl', history) end
      end
      -- this run's `best` pointer, when it names weights of epochs after the checkpoint
      self.best_checkpoint = ck.resumed(self.out .. '/checkpoint', self.step, self.best_checkpoint)
      self:print(string.format('resumed from %s (epoch %d, step %d%s)', dir, self.epoch, self.step,
         self.held_epochs > 0 and string.format(', %d held', self.held_epochs) or ''))
      -- drop metrics written after that checkpoint (a run killed mid-epoch)
      self:_trim_metrics()
   elseif not rc.resume then
      -- init first: one that fails, or that reads the run --overwrite replaces, finds the folder
      -- as it was (claimed first, the old run was gone before a misspelt skip was even read)
      if self.init then self:load_init() end
      -- each rank its own folder (nr.dist: rank 0 the run folder, the others <out>/ranks/<r>)
      claim_run_folder(self.out, rc.overwrite)
   elseif self.init then
      self:load_init()   -- a run stopped before its first checkpoint, started again
   end
   ck.write_atomic(self.out .. '/recipe.json', ck.json_encode(recipe_json(rc), true) .. '\n')
   self.metrics = assert(io.open(self.out .. '/metrics.jsonl', 'a'))
   M.running = self   -- Ctrl-C names this run's folder (nr.cli.interrupted) while self.metrics is open
   local start = self.epoch + 1
   self:log({kind = 'run', event = resume and 'resume' or 'begin', epochs = rc.epochs, device = self.device,
             precision = self.precision, memory_format = self.memory_format,
             max_epochs = self.extend_held and self:max_epochs() or nil,
             threads = C.nr_get_num_threads(), params = self.model:nParameters(), iters_per_epoch = self.iters_per_epoch})
   local plan = tostring(rc.epochs)
   if self.extend_held then plan = string.format('%d (+ held ones, at most %d)', rc.epochs, self:max_epochs()) end
   local loading = rawget(self.train_loader, 'threads')
   local threads = C.nr_get_num_threads()
   self:print(string.format('nrlua: %s on %s%s, %d thread%s%s, %d parameters, %s epoch%s of %d steps -> %s', rc.name or 'run',
      self.device, (self.precision == 'bf16' and ' (bf16 mixed precision)' or '') ..
         (self.memory_format == 'channels_last' and ' (channels-last)' or ''), threads, threads == 1 and '' or 's',
      type(loading) == 'number' and string.format(' (+%d loading)', loading) or '', self.model:nParameters(), plan,
      (rc.epochs == 1 and not self.extend_held) and '' or 's', self.iters_per_epoch, self.out))
   self:call('train_begin', {})
   if resume and self.epoch >= self:planned_epochs() then
      self:print(string.format('the run has trained %d epoch%s, which covers the %d planned: nothing to train (a larger '
         .. '--epochs continues it)', self.epoch, self.epoch == 1 and '' or 's', self:planned_epochs()))
   end
   -- a while loop: with tr.extend_held every held epoch adds one to the planned total
   while self.epoch < self:planned_epochs() do
      local epoch = self.epoch + 1
      self.epoch = epoch
      self:call('epoch_begin', {epoch = epoch})
      if self.schedule then self.optimizer.config.lr = self.schedule:lr() end
      local lr = self.optimizer.config.lr   -- the LR this epoch starts with
      local train = self:train_epoch(epoch)
      self:check_weights(epoch)
      self.train_images = self.train_images + train.images
      self.train_time = self.train_time + train.time
      -- held at its end = not a schedule epoch; counted before the hooks (NR releases the hold there).
      -- A warm-up runs even while held (held at its start the LR would stay at warmup_start, 0 by
      -- default): an epoch that ends still inside it was a schedule epoch.
      local held = self.schedule_hold and not (self.schedule and self.schedule:in_warmup())
      -- released mid-epoch: the epoch was not a whole schedule epoch, so it counts as held and the
      -- schedule goes back to where the release found it (the steps since ran the schedule's first
      -- part, which the next epoch runs again from the start); counted as a schedule epoch, the
      -- schedule's first epoch would have been skipped
      if self.release_iter then
         held = true
         self.schedule.iter = self.release_iter
      end
      self.release_iter = nil
      if held then self.held_epochs = self.held_epochs + 1 end
      local planned = self:planned_epochs()
      local last = epoch >= planned
      local val
      if last or (rc.eval_every and rc.eval_every > 0 and epoch % rc.eval_every == 0) then
         val = self:evaluate()
      end
      if self.schedule and not held and not self.schedule_rolled then self.schedule:next_epoch() end
      self.schedule_rolled = nil
      local best = false
      if val then
         self.last_val = {top1 = val.top1, top5 = val.top5, loss = val.loss, epoch = epoch}
         if not self.best_top1 or val.top1 > self.best_top1 then
            self.best_top1, self.best_epoch, best = val.top1, epoch, true
         end
      end
      local lr_end = self.optimizer.config.lr    -- the LR of the epoch's last step
      local lr_text = string.format('%.4g', lr)
      if math.abs(lr_end - lr) > 1e-12 * math.max(1, lr) then lr_text = string.format('%.4g->%.4g', lr, lr_end) end
      local ips = train.images / math.max(train.time, 1e-9)
      local elapsed = progress.now() - self.t_start
      local eta = (planned - epoch) * (elapsed / (epoch - start + 1))
      local extra = ''
      if self.extend_held and self.held_epochs > 0 then
         extra = planned < rc.epochs + self.held_epochs and string.format(' (+%d held, max %d)', self.held_epochs, planned)
            or string.format(' (+%d held)', self.held_epochs)
      end
      local notes = {}
      for _, fn in ipairs(self.status) do
         local text = fn(self)
         if text ~= nil then notes[#notes + 1] = '  |  ' .. tostring(text) end
      end
      -- an epoch without evaluation (data.val_split off, or between eval_every epochs) says so
      local val_text = val and string.format('val loss %s top1 %s%% top5 %s%%', fmt(val.loss, '%.4f'), fmt(val.top1, '%.2f'),
         fmt(val.top5, '%.2f')) or (self.val_loader and 'not evaluated this epoch' or 'no evaluation')
      self.progress:end_epoch(string.format('epoch %d/%d%s  train loss %s top1 %s%%  |  %s  |  %.1fs %d img/s lr %s  eta %s%s',
         epoch, planned, extra, fmt(train.loss, '%.4f'), fmt(train.top1, '%.2f'), val_text, train.time,
         math.floor(ips + 0.5), lr_text, progress.format_duration(eta), table.concat(notes)))
      local info = {epoch = epoch, train = {loss = train.loss, top1 = train.top1}, val = val,
                    lr = lr, time = train.time, images_per_s = ips}
      self:call('epoch_end', info)
      self:log({kind = 'epoch', epoch = epoch, lr = lr, lr_end = lr_end, train = info.train, val = val, time_s = train.time,
                images_per_s = ips, schedule_hold = self.schedule_hold or nil, held = held or nil,
                epochs_planned = planned, held_epochs = self.held_epochs > 0 and self.held_epochs or nil})
      local every = rc.checkpoint_every or 1
      -- an epoch that improves on the best evaluation is saved whatever checkpoint_every says, so
      -- checkpoint/best always holds the best weights (as Lightning's ModelCheckpoint on a metric)
      if every > 0 and (epoch % every == 0 or last or epoch >= self:planned_epochs() or best) then
         self:save_checkpoint({best = best})
      end
   end
   -- the cap cut the extension: the schedule did not complete (e.g. NR never reached T_r)
   local capped = self.extend_held and rc.epochs + self.held_epochs > self:max_epochs() and self.epoch >= self:max_epochs()
   if capped then
      local done = self.schedule and self.schedule.epoch or (self.epoch - self.held_epochs)
      self:log({kind = 'run', event = 'capped', max_epochs = self:max_epochs(), held_epochs = self.held_epochs, schedule_epochs = done})
      self:print(string.format('note: stopped at max_epochs = %d with %d held epochs; the schedule ran %d of its %d epochs',
         self:max_epochs(), self.held_epochs, done, rc.epochs))
   end
   local last_val = self.last_val
   local summary = {
      final_top1 = last_val and last_val.top1, final_top5 = last_val and last_val.top5,
      final_loss = last_val and last_val.loss, best_top1 = self.best_top1, best_epoch = self.best_epoch,
      epochs = self.epoch, schedule_epochs = rc.epochs, held_epochs = self.held_epochs, capped = capped or nil,
      steps = self.step,
      time_s = progress.now() - self.t_start + (self.time_offset or 0),
      train_time_s = self.train_time,
      images_per_s = self.train_images / math.max(self.train_time, 1e-9),
      out = self.out, device = self.device,
   }
   self:call('train_end', summary)
   self:log({kind = 'summary', summary = summary})
   -- a run without evaluation (--data.val_split off) has no top-1: said so, not as "-% (best -% at epoch nil)"
   local result = not self.val_loader and 'no evaluation' or string.format('top1 %s%% (best %s%% at epoch %s)',
      fmt(summary.final_top1, '%.2f'), fmt(summary.best_top1, '%.2f'), summary.best_epoch and tostring(summary.best_epoch) or '-')
   self:print(string.format('done: %s, %s, %d img/s -> %s', result, progress.format_duration(summary.time_s),
      math.floor(summary.images_per_s + 0.5), self.out))
   self.metrics:close()
   self.metrics = nil
   self.out_lock:release()
   self.out_lock = nil
   -- the run is over: M.running kept the whole trainer (model, optimizer, loaders with their threads and
   -- batch buffers) alive after nr.train returned, until the next run
   if M.running == self then M.running = nil end
   return summary
end

-- Rewrites metrics.jsonl without records newer than the restored step (atomic).
function Trainer:_trim_metrics()
   local path = self.out .. '/metrics.jsonl'
   local text = ck.read_file(path)
   if not text then return end
   local keep = {}
   for line in text:gmatch('[^\n]+') do
      local ok, r = pcall(ck.json_decode, line)
      if ok and type(r) == 'table' then
         local newer = (r.step and r.step > self.step) or (r.kind == 'epoch' and r.epoch and r.epoch > self.epoch)
            or r.kind == 'summary'
         if not newer then keep[#keep + 1] = line end
      end
   end
   ck.write_atomic(path, #keep > 0 and (table.concat(keep, '\n') .. '\n') or '')
end

-- What the library says about a recipe while building the run ("nr.train: precision must be ...",
-- "nr.optim.SGD: config.lr must be ...") carries a position inside lua/nr, which tells a user
-- nothing: it is raised again without it (nrlua then shows no traceback). Any other error (a bug
-- in a recipe's model function, say) is raised again as it came, with its position.
local function recipe_error(e)
   if type(e) ~= 'string' then return e end
   -- (the zoo, models/*.lua, says what is wrong with a recipe's model table the same way)
   local rest = e:match('^[^\n]-/lua/nr/[^:\n]+%.lua:%d+: (.*)$') or e:match('^[^\n]-models/[%w_]+%.lua:%d+: (nr%.models%..*)$')
   if rest and rest:match('^nr%.[%w_.]+: ') then return rest end
   return e
end

-- nr.train(recipe) -> summary {final_top1, best_top1, time_s, images_per_s, ...}
function M.train(recipe)
   local ok, tr = xpcall(M.new, M.user_traceback, recipe)
   if not ok then error(recipe_error(tr), 0) end
   return tr:run(), tr
end

-- Evaluates trained weights on the recipe's evaluation split (`nrlua RECIPE --eval PATH`): path
-- as nr.checkpoint.load_weights takes it (a run folder: the checkpoint `best` names, else the
-- newest; a step folder; a weights file), the model built by the recipe and, for a rejuvenated
-- run, rebuilt to its layers. Writes nothing. Returns {loss, top1, top5, n, weights = the file,
-- split}.
function M.evaluate(recipe, path)
   check.arg(type(path) == 'string' and path ~= '', 'nr.train.evaluate', 'path must be a run folder, checkpoint or weights '
      .. 'file, got %s', check.show(path))
   check.arg(type(recipe) == 'table', 'nr.train.evaluate', 'recipe must be a table, got %s', check.show(recipe))
   local r = {}
   for k, v in pairs(recipe) do r[k] = v end
   path = expand_path(path, 'eval')
   r.resume, r.init, r.out = nil, nil, path -- (not created: nothing is written)
   -- no NR machinery: the weights file rebuilds a rejuvenated model's layers by itself, and a
   -- policy read back from recipe.json is only its name ("<function>")
   r.nr = false
   local d = r.data
   if type(d) == 'table' and d.val_split == false then
      error('nr.train.evaluate: the recipe evaluates on no split (data.val_split off): give one, e.g. --data.val_split test', 0)
   end
   local ok, tr = xpcall(M.new, M.user_traceback, r, true)
   if not ok then error(recipe_error(tr), 0) end
   local loaded, err = pcall(ck.load_weights, tr.model, path)
   if not loaded then
      error('nr.train.evaluate: ' .. weights_error(err), 0)
   end
   local file = ck.weights_file(path)
   local res = tr:evaluate()
   if not res then error('nr.train.evaluate: the evaluation split has no samples', 0) end
   res.weights, res.split = file, tr.recipe.data.val_split
   return res
end

setmetatable(M, {__call = function(_, recipe) return M.train(recipe) end})

return M

-- nr.data — datasets and the batch loader (the C side is core/data_*.c, declared in core/nr.h).
--
-- What it is: nr.data.dataset{...} opens MNIST / Fashion-MNIST (IDX, gzipped or not), CIFAR-10 /
-- CIFAR-100 (binary) or an image folder (root/<split>/<class>/*.png|jpg, ImageNet layout);
-- nr.data.loader(ds, opts) decodes and augments on background C threads and yields f32
-- (B, C, H, W) images (or uint8 ones that nr.data.normalize finishes, e.g. on a GPU) and int64
-- (B) labels in order; nr.data.stats(name) gives mean/std;
-- nr.data.read_image / write_png / write_jpeg handle single image files.
-- Invariants:
--  * Sample indices are 1-based here (ds:get(i)), class ids 0-based (as the datasets store them).
--  * The loader's output depends only on (dataset, options, seed, epoch): the shuffle comes from
--    (seed, epoch) and each sample's augmentation from (seed, epoch, sample index), never from
--    the global generator (nr.manual_seed), so thread count, timing and resuming at epoch k do
--    not change what is seen.
--  * The x, y yielded by loader:epoch(e) are the loader's own buffers, recycled: they stay valid
--    until the next iteration step (or loader:close()); clone() them to keep them. No memory is
--    allocated per batch in steady state.
--  * Bad data is a Lua error naming the file and what is wrong, raised when the dataset is
--    opened where it can be detected then (missing files, magic, sizes, counts, labels, layout),
--    else by the iteration step that reaches the bad sample (undecodable image), which also
--    ends the epoch without leaving threads behind.
local nrffi = require 'nr.ffi'
local T = require 'nr.tensor'
local check = require 'nr.check'
local ffi, C = nrffi.ffi, nrffi.C

local M = {}

local FASHION_ROOT = '/usr/share/datasets/fashion-mnist'

local STATS = {
   mnist = {mean = {0.1307}, std = {0.3081}},
   ['fashion-mnist'] = {mean = {0.2860}, std = {0.3530}},
   cifar10 = {mean = {0.4914, 0.4822, 0.4465}, std = {0.2470, 0.2435, 0.2616}},
   cifar100 = {mean = {0.5071, 0.4865, 0.4409}, std = {0.2673, 0.2564, 0.2762}},
   imagenet = {mean = {0.485, 0.456, 0.406}, std = {0.229, 0.224, 0.225}},
}
STATS.imagefolder = STATS.imagenet

local CLASS_NAMES = {
   ['fashion-mnist'] = {'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                        'Bag', 'Ankle boot'},
   mnist = {'0', '1', '2', '3', '4', '5', '6', '7', '8', '9'},
   cifar10 = {'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'},
}

-- Per-channel mean/std (fractions of 255) of a known dataset: {mean = {...}, std = {...}}.
function M.stats(name)
   local s = STATS[name]
   if not s then
      local known = {}
      for k in pairs(STATS) do known[#known + 1] = k end
      table.sort(known)
      error(string.format('nr.data.stats: no statistics for %q (known: %s)', tostring(name), table.concat(known, ', ')), 2)
   end
   return {mean = {unpack(s.mean)}, std = {unpack(s.std)}}
end

-- ---- helpers -------------------------------------------------------------------------------

local function exists(path)
   local f = io.open(path, 'rb')
   if f then f:close() return true end
   return false
end

local function expand(path, fname)
   return (path:gsub('%$([%w_]+)', function(v)
      local val = os.getenv(v)
      if not val or val == '' then
         error(string.format('%s: root %q uses $%s, which is not set', fname, path, v), 5)
      end
      return val
   end))
end

local function c_error(where, level)
   error(where .. ': ' .. ffi.string(C.nr_last_error()), level + 1)
end

-- ---- datasets ------------------------------------------------------------------------------

local Dataset = {}
Dataset.__index = Dataset
Dataset.__typename = 'nr.data.Dataset'

local function live_ds(ds)
   local c = rawget(ds, 'c')
   if c == nil then error('nr.data.Dataset: use of a closed dataset', 3) end
   return c
end

function Dataset:size() return tonumber(C.nr_dataset_size(live_ds(self))) end
Dataset.__len = Dataset.size

-- Label (class id, 0-based) of sample i (1-based).
-- i, checked as a sample of ds (fname names the method)
local function sample_arg(ds, i, fname)
   check.arg(type(i) == 'number' and i >= 1 and i <= ds:size() and i == math.floor(i), fname,
      'sample must be a whole number in 1..%d, got %s', ds:size(), check.show(i))
end

function Dataset:label(i)
   local c = live_ds(self)
   sample_arg(self, i, 'Dataset:label')
   return tonumber(C.nr_dataset_label(c, i - 1))
end

-- File of sample i (image folders), else nil.
function Dataset:path(i)
   local c = live_ds(self)
   sample_arg(self, i, 'Dataset:path')
   local p = C.nr_dataset_path(c, i - 1)
   if p == nil then return nil end
   return ffi.string(p)
end

-- Sample i (1-based) as (uint8 (C, H, W) tensor, class id).
function Dataset:get(i)
   local c = live_ds(self)
   sample_arg(self, i, 'Dataset:get')
   local p = C.nr_dataset_image(c, i - 1)
   if p == nil then c_error('Dataset:get', 2) end
   return T.Tensor._wrap(p), tonumber(C.nr_dataset_label(c, i - 1))
end

function Dataset:close()
   local c = rawget(self, 'c')
   if c ~= nil then
      ffi.gc(c, nil)
      C.nr_dataset_free(c)
      self.c = nil
   end
end

function Dataset:__tostring()
   if rawget(self, 'c') == nil then return string.format('nr.data.Dataset %s %s (closed)', self.name, self.split) end
   return string.format('nr.data.Dataset %s %s (%d samples, %d classes, %s)', self.name, self.split, self:size(), self.classes,
      self.height and string.format('%dx%dx%d', self.channels, self.height, self.width) or 'varying size')
end

local function wrap_dataset(p, info)
   local ds = setmetatable(info, Dataset)
   ds.c = ffi.gc(p, C.nr_dataset_free)
   ds.classes = C.nr_dataset_classes(p)
   ds.channels = C.nr_dataset_channels(p)
   local h, w = C.nr_dataset_height(p), C.nr_dataset_width(p)
   if h > 0 then ds.height, ds.width = h, w end
   return ds
end

local IDX_NAMES = {
   train = {'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 'train-images.idx3-ubyte', 'train-labels.idx1-ubyte'},
   test = {'t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 't10k-images.idx3-ubyte', 't10k-labels.idx1-ubyte'},
}

local function find_idx(root, split)
   local names = IDX_NAMES[split]
   for k = 1, #names, 2 do
      for _, ext in ipairs({'.gz', ''}) do
         local im, lb = root .. '/' .. names[k] .. ext, root .. '/' .. names[k + 1] .. ext
         if exists(im) then
            for _, ext2 in ipairs({'.gz', ''}) do
               local l2 = root .. '/' .. names[k + 1] .. ext2
               if exists(l2) then return im, l2 end
            end
            return im, lb -- labels missing: reported below
         end
      end
   end
   return nil
end

local function open_idx(name, root, split)
   local title = name == 'mnist' and 'MNIST' or 'Fashion-MNIST'
   local how = name == 'fashion-mnist'
      and ('install it with `apt-get install dataset-fashion-mnist` (files go to ' .. FASHION_ROOT .. ') or download the four '
           .. '*-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist and point --data at their folder')
      or 'download the four *-ubyte.gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...) and point --data at their folder'
   if not exists(root) then
      error(string.format('nr.data.dataset: %s not found: folder %s does not exist; %s', title, root, how), 3)
   end
   local im, lb = find_idx(root, split)
   if not im then
      error(string.format('nr.data.dataset: %s not found in %s: no %s(.gz); %s', title, root, IDX_NAMES[split][1], how), 3)
   end
   if not exists(lb) then
      error(string.format('nr.data.dataset: %s: %s is present but its labels %s(.gz) are missing; %s', title, im, IDX_NAMES[split][2], how), 3)
   end
   local p = C.nr_dataset_open_idx(im, lb, 10)
   if p == nil then c_error('nr.data.dataset', 3) end
   return p
end

local DATASET_OPTS = {name = true, root = true, split = true, coarse = true, classes = true}

-- The class list of opts.classes (imagefolder): {names, where} where `where` describes their
-- origin in errors. classes: a dataset (its class_names; e.g. the training split when opening
-- the validation split) or a list of unique non-empty class names.
local function given_classes(classes, fname)
   local function bad(fmt, ...) error(string.format('%s: classes: ' .. fmt, fname, ...), 4) end -- at the user's call
   if getmetatable(classes) == Dataset then
      if type(classes.class_names) ~= 'table' then bad('the dataset given has no class names') end
      return classes.class_names, string.format('the classes of the %s split %s', classes.split, classes.dir or classes.root)
   end
   if not (type(classes) == 'table' and #classes >= 1) then
      bad('expected a dataset (the training split) or a list of class names, got %s', check.show(classes))
   end
   local seen = {}
   for k, c in ipairs(classes) do
      if not (type(c) == 'string' and c ~= '') then bad('entry %d must be a non-empty string, got %s', k, check.show(c)) end
      if seen[c] then bad('%q is listed twice', c) end
      seen[c] = true
   end
   return classes, 'the classes given'
end

-- $NR_DATA, the datasets root, or nil when unset or empty.
local function nr_data()
   local env = os.getenv('NR_DATA')
   return env ~= '' and env or nil
end

-- The folder of dataset `name` under the datasets root: $NR_DATA/name, or data/name when NR_DATA
-- is unset or empty (the recipes' default; an empty NR_DATA meant /name in some places).
function M.root(name)
   check.type(name, 'string', 'nr.data.root', 'name')
   return (nr_data() or 'data') .. '/' .. name
end

-- nr.data.dataset{name = 'fashion-mnist'|'mnist'|'cifar10'|'cifar100'|'imagefolder', root = DIR,
--                 split = 'train'|'test' (imagefolder: any subfolder, 'test' falls back to 'val'),
--                 coarse = false (CIFAR-100: the 20 coarse labels instead of the 100 fine),
--                 classes = nil (imagefolder: the class ids of another split, as torchvision's
--                   shared class_to_idx: a dataset, e.g. the training split, or a list of class
--                   names; class k + 1 of the list gets id k, every class folder of this split
--                   must be in it, and ds.classes / ds.class_names are the list's)}
-- Validation / test splits of an image folder should pass classes = the training split: class ids
-- otherwise follow this split's own folders, which differ when it lacks a class.
-- An empty dataset (no samples) is an error naming it.
function M.dataset(opts)
   local fname = 'nr.data.dataset'
   check.arg(type(opts) == 'table', fname, 'expected a table {name = ..., root = ..., split = ...}')
   check.options(opts, DATASET_OPTS, fname)
   local name, split = opts.name, opts.split or 'train'
   check.arg(type(name) == 'string', fname, 'name must be a string (fashion-mnist, mnist, cifar10, cifar100, imagefolder)')
   check.arg(type(split) == 'string', fname, 'split must be a string')
   -- an unknown name first: else it would be asked for a root folder it cannot use
   local KNOWN = {['fashion-mnist'] = true, mnist = true, cifar10 = true, cifar100 = true, imagefolder = true}
   if not KNOWN[name] then
      error(string.format('%s: unknown dataset %q (known: fashion-mnist, mnist, cifar10, cifar100, imagefolder)', fname, name), 2)
   end
   local root = opts.root
   if root == nil then
      if name == 'fashion-mnist' then root = FASHION_ROOT
      elseif nr_data() then root = nr_data() .. '/' .. name
      else error(string.format('%s: %s needs root = DIR (or set NR_DATA, then $NR_DATA/%s is used)', fname, name, name), 2) end
   end
   check.arg(type(root) == 'string', fname, 'root must be a string')
   root = expand(root, fname)
   check.arg(opts.classes == nil or name == 'imagefolder', fname,
      'classes = ... applies to image folders (imagefolder); %s has fixed class ids', name)
   local p, info = nil, {name = name, split = split, root = root}
   if name == 'mnist' or name == 'fashion-mnist' then
      check.arg(split == 'train' or split == 'test', fname, 'split must be train or test, got %q', split)
      p = open_idx(name, root, split)
   elseif name == 'cifar10' or name == 'cifar100' then
      check.arg(split == 'train' or split == 'test', fname, 'split must be train or test, got %q', split)
      p = C.nr_dataset_open_cifar(root, name == 'cifar10' and 10 or 100, split == 'train' and 1 or 0, opts.coarse and 1 or 0)
      if p == nil then c_error(fname, 2) end
   elseif name == 'imagefolder' then
      if not exists(root) then
         error(string.format('%s: image folder %s does not exist (expected %s/{train,val}/<class>/*.jpg|png, ImageNet layout; '
            .. 'point --data at it)', fname, root, root), 2)
      end
      local dir = root .. '/' .. split
      if not exists(dir) then
         local alt = split == 'test' and 'val' or split == 'val' and 'test' or nil
         if alt and exists(root .. '/' .. alt) then dir = root .. '/' .. alt
         else
            error(string.format('%s: image folder %s has no %s/ subfolder (expected %s/%s/<class>/*.jpg|png, ImageNet layout; '
               .. 'point --data at the folder that holds train/ and val/)', fname, root, split, root, split), 2)
         end
      end
      info.dir = dir
      if opts.classes ~= nil then
         local names, where = given_classes(opts.classes, fname)
         local arr = ffi.new('const char *[?]', #names)
         for k, c in ipairs(names) do arr[k - 1] = c end -- the strings stay alive in names
         p = C.nr_dataset_open_imagefolder_classes(dir, arr, #names)
         if p == nil then
            error(string.format('%s: opening %s with %s: %s', fname, dir, where, ffi.string(C.nr_last_error())), 2)
         end
      else
         p = C.nr_dataset_open_imagefolder(dir)
         if p == nil then c_error(fname, 2) end
      end
   else
      error(string.format('%s: unknown dataset %q (fashion-mnist, mnist, cifar10, cifar100, imagefolder)', fname, name), 2)
   end
   if C.nr_dataset_size(p) == 0 then
      C.nr_dataset_free(p)
      error(string.format('%s: the %s split of %s in %s is empty (0 samples)', fname, split, name, info.dir or root), 2)
   end
   local ds = wrap_dataset(p, info)
   if name == 'imagefolder' then
      local names = {}
      for k = 0, ds.classes - 1 do names[k + 1] = ffi.string(C.nr_dataset_class_name(p, k)) end
      ds.class_names = names
   elseif CLASS_NAMES[name] then
      ds.class_names = {unpack(CLASS_NAMES[name])}
   end
   return ds
end

-- ---- images --------------------------------------------------------------------------------

-- uint8 (C, H, W) tensor from a PNG or JPEG file; channels 0 (as stored), 1, 3 or 4. The stored
-- values (gAMA ignored, as PIL); 16-bit PNG samples give their high byte (as PIL for colour; PIL
-- clips 16-bit grey to 255, not copied here). A header over Pillow's decompression-bomb limit
-- (178956970 pixels) is an error.
function M.read_image(path, channels)
   check.type(path, 'string', 'nr.data.read_image', 'path')
   if channels ~= nil then check.int32(channels, 'nr.data.read_image', 'channels', 0, 4) end
   local p = C.nr_image_read(path, channels or 0)
   if p == nil then c_error('nr.data.read_image', 2) end
   return T.Tensor._wrap(p)
end

-- img: uint8 (C, H, W) CPU tensor, C in 1, 3, 4.
function M.write_png(img, path)
   check.arg(T.is_tensor(img), 'nr.data.write_png', 'img must be a uint8 (C, H, W) tensor')
   check.type(path, 'string', 'nr.data.write_png', 'path')
   check.status(C.nr_image_write_png(img.c, path), 'nr.data.write_png')
end

-- img: uint8 (C, H, W) CPU tensor, C in 1, 3; quality 1..100 (default 90).
function M.write_jpeg(img, path, quality)
   check.arg(T.is_tensor(img), 'nr.data.write_jpeg', 'img must be a uint8 (C, H, W) tensor')
   check.type(path, 'string', 'nr.data.write_jpeg', 'path')
   quality = quality or 90
   check.int32(quality, 'nr.data.write_jpeg', 'quality', 1, 100)
   check.status(C.nr_image_write_jpeg(img.c, path, quality), 'nr.data.write_jpeg')
end

-- float32's smallest normal and largest values: options the C side holds as float must stay
-- within them (1e-50 became 0, which C reads as "not set"; 1e300 became inf).
local FLT_MIN, FLT_MAX = 2 ^ -126, 3.4028234663852886e38

-- nr.data.normalize(x, out [, {mean = {...}, std = {...}}]): images as a model takes them from
-- uint8 (B, C, H, W) x (contiguous, C <= 4, on the CPU or a GPU): out <- (x / 255 - mean[c]) /
-- std[c] per channel (one value applies to every channel), or x / 255 without statistics, with
-- the loader's arithmetic. out: float32 or bfloat16 of x's shape on x's device, contiguous or
-- channels-last. Returns out.
-- Statistics {mean = {...}, std = {...}} (tables of 1 or c numbers; one applies to every channel)
-- into the float arrays mean_out / std_out for c channels (at most 4); what names them in errors
-- (finite means, finite std > 0 and results within float32: checked here to name the option; the C
-- entry points check the first two again for their other callers).
local function stats_into(stats, c, mean_out, std_out, fname, what)
   local function bad(fmt, ...) error(string.format('%s: %s: ' .. fmt, fname, what, ...), 4) end -- at the user's call
   local nm, ns = #stats.mean, #stats.std
   if not (nm == ns and (nm == 1 or nm == c)) then
      bad('mean and std need %s for %d channel%s, got %d and %d', c == 1 and '1 value each' or ('1 or ' .. c .. ' values'),
         c, c == 1 and '' or 's', nm, ns)
   end
   for k = 1, math.min(c, 4) do
      local im, is = nm == 1 and 1 or k, ns == 1 and 1 or k
      local m, sd = stats.mean[im], stats.std[is]
      if type(m) ~= 'number' or type(sd) ~= 'number' then bad('bad mean/std for channel %d', k) end
      if not (m == m and math.abs(m) <= FLT_MAX) then
         bad('mean[%d] must be finite within float32, got %s', im, check.show(m))
      end
      if not (sd >= FLT_MIN and sd <= FLT_MAX) then
         bad('std[%d] must be > 0 and finite within float32, got %s', is, check.show(sd))
      end
      -- x / 255 is in [0, 1], so |out| <= (1 + |mean|) / std: past float32 it is inf (mean 1e30 with
      -- std 1e-30 gave inf batches); 1e38 leaves room for mean and std rounded to float
      local reach = (1 + math.abs(m)) / sd
      if reach > 1e38 then
         bad('mean[%d] = %s with std[%d] = %s gives values up to %.3g, past float32 (3.4e38)', im, tostring(m), is,
            tostring(sd), reach)
      end
      mean_out[k - 1], std_out[k - 1] = m, sd
   end
end

function M.normalize(x, out, stats)
   local fname = 'nr.data.normalize'
   check.arg(T.is_tensor(x) and T.is_tensor(out), fname, 'expected (x, out) tensors')
   local mean, std = nil, nil
   if stats then
      check.arg(type(stats) == 'table' and type(stats.mean) == 'table' and type(stats.std) == 'table', fname,
         'statistics must be {mean = {...}, std = {...}}')
      mean, std = ffi.new('float[4]'), ffi.new('float[4]')
      stats_into(stats, x:dim() == 4 and x:size(2) or 0, mean, std, fname, 'statistics')
   end
   check.status(C.nr_images_normalize(x.c, mean, std, out.c), fname)
   return out
end

-- ---- loader --------------------------------------------------------------------------------

local Loader = {}
Loader.__index = Loader
Loader.__typename = 'nr.data.Loader'

local LOADER_OPTS = {batch = true, shuffle = true, drop_last = true, seed = true, threads = true, prefetch = true,
                     augment = true, shard = true, output = true}
local AUGMENT_OPTS = {pad = true, crop = true, flip = true, resize = true, random_resized_crop = true,
                      center_crop = true, channels = true, normalize = true, scale = true, ratio = true,
                      fast_decode = true}

-- Augmentation option checks: a bad value is an error naming augment.<name> and the value (never
-- replaced by a default), raised at the caller of nr.data.loader.
local function show(v)
   if type(v) ~= 'table' then return tostring(v) end
   local parts = {}
   for k = 1, math.max(#v, 1) do parts[k] = tostring(v[k]) end
   return '{' .. table.concat(parts, ', ') .. '}'
end

-- Image sides (pad, crop, resize, ...): C keeps them in int32 and refuses more than
-- NR_AUG_MAX_SIDE (core/data_internal.h, 2^20), a size no image pipeline needs; the same bound
-- here names the Lua option.
local MAX_SIDE = 2 ^ 20
local function size_opt(v, fname, name, min)
   if v == nil or v == false then return 0 end
   check.int32(v, fname, 'augment.' .. name, min or 1, MAX_SIDE, 3)
   return v
end

-- {lo, hi} with 0 < lo <= hi <= max, both within float32 (random_resized_crop's scale and ratio).
local function range_opt(v, fname, name, max, what)
   local lo, hi = type(v) == 'table' and v[1], type(v) == 'table' and v[2]
   if not (type(v) == 'table' and #v == 2 and type(lo) == 'number' and type(hi) == 'number' and lo >= FLT_MIN
           and lo <= hi and hi <= max and hi <= FLT_MAX) then
      error(string.format('%s: augment.%s must be {lo, hi} with 0 < lo <= hi%s, both within float32 (%s), got %s',
         fname, name, max < math.huge and (' <= ' .. max) or '', what, show(v)), 3)
   end
   return lo, hi
end

local function bool_opt(v, fname, name, what)
   if v == nil then return 0 end
   if type(v) ~= 'boolean' then
      error(string.format('%s: augment.%s must be true (%s) or false, got %s', fname, name, what, show(v)), 3)
   end
   return v and 1 or 0
end

-- Decoding threads a loader may start (each is a pthread with its own decoder).
local MAX_THREADS = C.NR_LOADER_MAX_THREADS

-- $NR_DATA_THREADS as a number, or nil when unset or empty; anything else names the variable
-- (0 or "abc" were ignored without a word, 2000 refused as "threads").
function M.env_threads()
   local s = os.getenv('NR_DATA_THREADS')
   if s == nil or s:match('^%s*$') then return nil end
   local n = s:match('^%s*%d+%s*$') and tonumber(s) -- decimal digits only (tonumber took 0x2, 1e1)
   if not (n and n >= 1 and n <= MAX_THREADS and n == math.floor(n)) then
      error(string.format('NR_DATA_THREADS must be a whole number of loader threads, 1..%d, got %q', MAX_THREADS, s), 0)
   end
   return n
end

-- $NR_DATA_THREADS, else half the compute threads, at least 2 and at most 8.
local function default_threads()
   local env = M.env_threads()
   if env then return env end
   return math.max(2, math.min(8, math.floor(C.nr_get_num_threads() / 2)))
end

-- l._x[s], l._y[s]: tensors viewing the loader's batch buffers of slot s (1-based), the batches
-- its epochs yield. Made again when the user freed the ones handed out (the buffers stay the
-- loader's; a freed view had poisoned the slot for the loader's life).
local function slot_views(l, s, fname)
   local p = l.c
   local x, y = C.nr_loader_buffer(p, s - 1, 0), C.nr_loader_buffer(p, s - 1, 1)
   local z4, z1 = ffi.new('int64_t[4]'), ffi.new('int64_t[1]', 1)
   for d = 0, 3 do z4[d] = x.stride[d] end
   l._x[s] = T.Tensor._wrap(check.pointer(C.nr_tensor_view(x, 4, x.shape, z4, 0), fname, 3))
   l._y[s] = T.Tensor._wrap(check.pointer(C.nr_tensor_view(y, 1, y.shape, z1, 0), fname, 3))
   l._part[s] = nil
end

-- nr.data.loader(ds, {batch = 128, shuffle = false, drop_last = false, seed = 0, threads = (see
--   default_threads), prefetch = 4, augment = {...}, shard = {rank = 0, size = 1},
--   output = 'float32'})
-- prefetch batches are decoded ahead while the consumer holds one: memory is
-- (prefetch + 1) * batch * C * H * W * 4 bytes (1 byte with output = 'uint8').
-- output = 'uint8': images come out as bytes 0..255, before /255 and normalize, and
--   loader:normalize(x, out) finishes them (exactly the values 'float32' gives). nr.train uses it
--   on a GPU: a batch is copied to the device at a quarter of the size and finished there.
-- augment: pad = P, crop = S (random crop after zero padding P; crop defaults to the input
--   size; larger than the padded image is an error, as torchvision's RandomCrop), flip = true,
--   resize = N (shorter side) | {h, w}, random_resized_crop = S (with scale = {0.08, 1},
--   ratio = {3/4, 4/3}), center_crop = S (larger than the image: zero borders, floor((S - n)/2)
--   before, as torchvision), channels = 1|3 (1 -> 3 replicates),
--   normalize = true (nr.data.stats of the dataset) | {mean = {...}, std = {...}} (one value
--   applies to every channel), fast_decode = true (JPEGs decode reduced by DCT scaling when the
--   resize / random-resized crop shrinks them anyway: several times faster for small outputs such
--   as 128; not the full decode's pixels: a different reduction filter, measured at a mean
--   |difference| of 6-7 of 255 on 150-500 px JPEGs resized to 64, up to ~90 at sharp edges).
--   Order: random_resized_crop |
--   resize, center_crop, pad + crop, flip, channels, /255, normalize.
function M.loader(ds, opts)
   local fname = 'nr.data.loader'
   check.arg(getmetatable(ds) == Dataset, fname, 'first argument must be a dataset from nr.data.dataset')
   opts = check.options(opts, LOADER_OPTS, fname)
   local aug = check.options(opts.augment, AUGMENT_OPTS, fname .. ' augment')
   local cfg = ffi.new('nr_loader_config')
   local batch = opts.batch or 128
   check.int32(batch, fname, 'batch', 1)
   cfg.batch = batch
   cfg.shuffle = opts.shuffle and 1 or 0
   cfg.drop_last = opts.drop_last and 1 or 0
   local seed = opts.seed or 0
   check.int(seed, fname, 'seed', 0)
   cfg.seed = seed
   local threads = opts.threads or default_threads()
   check.int32(threads, fname, 'threads', 1, MAX_THREADS)
   cfg.threads = threads
   local prefetch = opts.prefetch or 4
   check.int32(prefetch, fname, 'prefetch', 1)
   cfg.prefetch = prefetch
   local shard = opts.shard or {}
   check.arg(type(shard) == 'table', fname, 'shard must be {rank = r, size = n}')
   local rank, size = shard.rank or 0, shard.size or 1
   check.int32(size, fname, 'shard.size', 1)
   check.int32(rank, fname, 'shard.rank', 0)
   check.arg(rank < size, fname, 'shard.rank %d must be < shard.size %d', rank, size)
   cfg.shard_rank, cfg.shard_size = rank, size
   cfg.pad = size_opt(aug.pad, fname, 'pad', 0)   -- (0: none, as torchvision's RandomCrop(padding=0))
   cfg.crop = size_opt(aug.crop, fname, 'crop')
   cfg.flip = bool_opt(aug.flip, fname, 'flip', 'a horizontal flip with probability 1/2; no other probability is supported')
   cfg.fast_decode = bool_opt(aug.fast_decode, fname, 'fast_decode', 'decode JPEGs reduced when they are shrunk anyway')
   cfg.center_crop = size_opt(aug.center_crop, fname, 'center_crop')
   if type(aug.resize) == 'table' then
      check.arg(#aug.resize == 2 and aug.resize[1] ~= nil and aug.resize[2] ~= nil, fname,
         'augment.resize must be N (the shorter side) or {h, w}, got %s', show(aug.resize))
      cfg.resize_h = size_opt(aug.resize[1], fname, 'resize[1]')
      cfg.resize_w = size_opt(aug.resize[2], fname, 'resize[2]')
   else
      cfg.resize_h = size_opt(aug.resize, fname, 'resize')
   end
   cfg.random_resized_crop = size_opt(aug.random_resized_crop, fname, 'random_resized_crop')
   for _, k in ipairs({'scale', 'ratio'}) do
      check.arg(aug[k] == nil or cfg.random_resized_crop > 0, fname,
         'augment.%s = %s applies to random_resized_crop, which is not set', k, show(aug[k]))
   end
   cfg.scale_lo, cfg.scale_hi = 0.08, 1.0
   cfg.ratio_lo, cfg.ratio_hi = 3 / 4, 4 / 3
   if aug.scale ~= nil then cfg.scale_lo, cfg.scale_hi = range_opt(aug.scale, fname, 'scale', 1, 'fractions of the area') end
   if aug.ratio ~= nil then
      cfg.ratio_lo, cfg.ratio_hi = range_opt(aug.ratio, fname, 'ratio', math.huge, 'aspect ratios width / height')
   end
   local channels = aug.channels or ds.channels
   check.arg(channels == 1 or channels == 3, fname, 'augment.channels must be 1 or 3, got %s', check.show(channels))
   cfg.channels = channels
   local norm = aug.normalize
   if norm == true then
      check.arg(STATS[ds.name] ~= nil, fname, 'augment.normalize = true needs known statistics for %q; pass {mean = ..., std = ...}', ds.name)
      norm = STATS[ds.name]
   end
   if norm then
      check.arg(type(norm) == 'table' and type(norm.mean) == 'table' and type(norm.std) == 'table', fname,
         'augment.normalize must be true or {mean = {...}, std = {...}}')
      cfg.normalize = 1
      stats_into(norm, channels, cfg.mean, cfg.std, fname, 'augment.normalize')
   end
   -- a crop larger than every image (one size, no resize before it) is refused here, not at the
   -- first batch (core/data_augment.c says the same per image)
   local h, w = tonumber(ds.height) or 0, tonumber(ds.width) or 0
   if cfg.crop > 0 and h > 0 and w > 0 and cfg.resize_h == 0 and cfg.random_resized_crop == 0 then
      local side_h = (cfg.center_crop > 0 and cfg.center_crop or h) + 2 * cfg.pad
      local side_w = (cfg.center_crop > 0 and cfg.center_crop or w) + 2 * cfg.pad
      check.arg(cfg.crop <= side_h and cfg.crop <= side_w, fname, 'augment.crop %d is larger than the images (%dx%d, padded by '
         .. '%d): lower crop or raise pad', cfg.crop, side_h - 2 * cfg.pad, side_w - 2 * cfg.pad, cfg.pad)
   end
   local output = opts.output or 'float32'
   check.arg(output == 'float32' or output == 'uint8', fname, 'output must be "float32" or "uint8", got %s', check.show(output))
   cfg.output_u8 = output == 'uint8' and 1 or 0
   local p = C.nr_loader_new(live_ds(ds), cfg)
   if p == nil then
      local msg = ffi.string(C.nr_last_error())
      if msg:find('memory', 1, true) or msg:find('too large', 1, true) then
         -- the batch buffers hold batch x channels x side^2: name the options setting the side
         msg = msg .. string.format(' (batches of %d images of side resize %d, crop %d, center_crop %d, random_resized_crop %d:'
            .. ' lower augment sizes, i.e. data.size in nr.train, or the batch)', batch, cfg.resize_h, cfg.crop, cfg.center_crop,
            cfg.random_resized_crop)
      end
      error(fname .. ': ' .. msg, 2)
   end
   -- _cfg: the copy of the config whose mean / std Loader:normalize hands to C (kept alive here)
   local l = setmetatable({dataset = ds, c = ffi.gc(p, C.nr_loader_free), batch = batch, threads = threads, output = output,
                           _cfg = cfg, _x = {}, _y = {},
                           _part = {}}, Loader)
   local shape = ffi.new('int64_t[4]')
   C.nr_loader_output_shape(p, shape)
   l.shape = {tonumber(shape[0]), tonumber(shape[1]), tonumber(shape[2]), tonumber(shape[3])}
   for s = 1, C.nr_loader_nslots(p) do slot_views(l, s, fname) end
   return l
end

local function live_loader(l)
   local c = rawget(l, 'c')
   if c == nil then error('nr.data.Loader: use of a closed loader', 3) end
   return c
end

function Loader:nbatches() return tonumber(C.nr_loader_nbatches(live_loader(self))) end
-- Samples per epoch seen by this shard (before drop_last).
function Loader:samples() return tonumber(C.nr_loader_samples(live_loader(self))) end

-- Samples of this shard that are not repeats: a shard of a sharded loader holds ceil(n/size)
-- samples, and the last one of some shards wraps around to the start of the order (as PyTorch's
-- DistributedSampler pads), so only ceil((n - rank) / size) of them are the shard's own. An
-- evaluation counts these, so every sample counts once over the ranks.
function Loader:unique_samples()
   local rank, size = self._cfg.shard_rank or 0, self._cfg.shard_size or 1
   if size <= 1 then return self:samples() end
   return math.min(self:samples(), math.max(0, math.ceil((self.dataset:size() - rank) / size)))
end

-- The epoch's order for this shard: int64 tensor of 0-based dataset indices.
function Loader:indices(e)
   local c = live_loader(self)
   check.int(e, 'Loader:indices', 'epoch', 1)
   local out = T.empty({self:samples()}, {dtype = 'int64'})
   check.status(C.nr_loader_indices(c, e, out.c), 'Loader:indices')
   return out
end

-- for x, y in loader:epoch(e) do ... end; e is the 1-based epoch. x, y are recycled buffers.
function Loader:epoch(e)
   local c = live_loader(self)
   check.int(e, 'Loader:epoch', 'epoch', 1)
   check.status(C.nr_loader_start(c, e), 'Loader:epoch')
   local run = (self._run or 0) + 1
   self._run = run
   local B = self.batch
   local done = false
   return function()
      if done then return nil end
      if rawget(self, 'c') == nil then error('nr.data.Loader: the loader was closed during its epoch', 2) end
      if self._run ~= run then error('nr.data.Loader: this epoch was replaced by a later loader:epoch() call', 2) end
      -- (out-parameters are fresh per call: see nr.tensor's double1)
      local slot, count = ffi.new('int32_t[1]'), ffi.new('int32_t[1]')
      local st = C.nr_loader_next(c, slot, count)
      if st ~= 0 then
         done = true
         error('nr.data.Loader:epoch(' .. e .. '): ' .. ffi.string(C.nr_last_error()), 2)
      end
      local n = count[0]
      if n == 0 then
         done = true
         return nil
      end
      local s = slot[0] + 1
      if not (rawget(self._x[s], 'c') and rawget(self._y[s], 'c')) then slot_views(self, s, 'Loader:epoch') end
      if n == B then return self._x[s], self._y[s] end
      local part = self._part[s]
      if not part or part.n ~= n or not (rawget(part.x, 'c') and rawget(part.y, 'c')) then
         part = {n = n, x = self._x[s]:narrow(1, 1, n), y = self._y[s]:narrow(1, 1, n)}
         self._part[s] = part
      end
      return part.x, part.y
   end
end

-- Finishes a uint8 batch of this loader (output = 'uint8'), or its copy on a GPU: out <- what
-- output = 'float32' would have yielded (nr.data.normalize with the loader's statistics, read
-- from its config: nothing is converted per call).
function Loader:normalize(x, out)
   check.arg(T.is_tensor(x) and T.is_tensor(out), 'Loader:normalize', 'expected (x, out) tensors')
   local cfg = self._cfg
   local norm = cfg.normalize == 1
   check.status(C.nr_images_normalize(x.c, norm and cfg.mean or nil, norm and cfg.std or nil, out.c), 'Loader:normalize')
   return out
end

-- Stops the workers and frees the buffers (tensors the loader yielded become invalid).
function Loader:close()
   local c = rawget(self, 'c')
   if c == nil then return end
   ffi.gc(c, nil)
   C.nr_loader_free(c)
   self.c = nil
   for _, list in ipairs({self._x, self._y}) do
      for _, t in ipairs(list) do t:free() end
   end
   for _, part in pairs(self._part) do part.x:free(); part.y:free() end
   self._x, self._y, self._part = {}, {}, {}
end

function Loader:__tostring()
   return string.format('nr.data.Loader %s (%d batches of [%s], %d threads)', self.dataset.name,
      rawget(self, 'c') and self:nbatches() or 0, table.concat(self.shape, ' x '), self.threads)
end

M.Dataset, M.Loader = Dataset, Loader
return M

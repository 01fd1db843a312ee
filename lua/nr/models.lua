-- nr.models — the model zoo loader and the helpers the zoo's files share.
--
--   nr.models.vgg{depth = 19, dataset = 'cifar10'}      -> models/vgg.lua
--   nr.models.resnet{depth = 50}                        -> models/resnet.lua
--   nr.models.densenet{depth = 121}                     -> models/densenet.lua
--   nr.models.mobilenet{width = 0.25, input = 128}      -> models/mobilenet.lua
--   nr.models.build{name = 'resnet', depth = 18, ...}   (a recipe's `model` table)
--
-- Each models/NAME.lua returns a table with `build(opts)`; the nrlua home is on package.path as
-- `?.lua`, so `require('models.NAME')` finds it. A model is an ordinary nr.nn module tree built from
-- public nr.nn classes only; the root carries `nr_info` ({gamma0, input_channels, input_size,
-- classes, ...}) for Neural Rejuvenation. This file is not a registry of weights or checkpoints.
-- Invariant: the helpers below draw from nr's global generator, so nr.manual_seed makes a model's
-- initial weights reproducible.
local check = require 'nr.check'

local M = {}

M.names = {'vgg', 'resnet', 'densenet', 'mobilenet'}

local loaded = {}
local function family(name)
   if not loaded[name] then
      local ok = false
      for _, n in ipairs(M.names) do ok = ok or n == name end
      if not ok then
         error(string.format('nr.models: unknown model %q (known: %s)', tostring(name),
            table.concat(M.names, ', ')), 3)
      end
      loaded[name] = require('models.' .. name)
   end
   return loaded[name]
end

for _, name in ipairs(M.names) do
   M[name] = function(opts)
      local f = family(name)
      return f.build(opts or {})
   end
end

-- Builds from a recipe's model table: {name = 'resnet', depth = 50, ...}; `name` is removed.
function M.build(spec)
   check.arg(type(spec) == 'table', 'nr.models.build', 'expected a table {name = ..., ...}, got %s', type(spec))
   check.arg(type(spec.name) == 'string', 'nr.models.build', 'spec.name must be one of %s', table.concat(M.names, ', '))
   local opts = {}
   for k, v in pairs(spec) do if k ~= 'name' then opts[k] = v end end
   return family(spec.name).build(opts)
end

-- The names torchvision gives a zoo model's tensors: {nrlua name -> torchvision name} for every
-- parameter and buffer (nr.checkpoint's `names = 'torchvision'` reads and writes them). Only the
-- ImageNet ResNets have a torchvision twin; any other model is an error that says why.
local NO_TORCHVISION = {
   vgg = 'the ImageNet VGG-16 here is the NR paper\'s (BN, 1x1 convs in place of the FC layers), not torchvision\'s',
   densenet = 'the DenseNets here are post-activation (the NR paper\'s), torchvision\'s are pre-activation',
   mobilenet = 'torchvision has no MobileNet v1',
}
-- fname, level: the caller's name and error level (a function calling this for its own caller).
function M.torchvision_names(model, fname, level)
   fname, level = fname or 'nr.models.torchvision_names', (level or 1) + 1
   local info = type(model) == 'table' and rawget(model, 'nr_info')
   if type(info) ~= 'table' or type(info.name) ~= 'string' then
      error(string.format('%s: not a model nr.models built (torchvision names exist for its ImageNet ResNets)', fname), level)
   end
   local kind = info.name:match('^%a+')
   local why = NO_TORCHVISION[kind]
      or (info.dataset ~= 'imagenet' and string.format('%s is the %s variant, which torchvision does not have', info.name,
         tostring(info.dataset)))
   if why then error(string.format('%s: no torchvision names for %s: %s', fname, info.name, why), level) end
   local rename = family(kind).torchvision_name
   local names = {}
   for _, e in ipairs(model:namedParameters()) do names[#names + 1] = e.name end
   for _, e in ipairs(model:namedBuffers()) do names[#names + 1] = e.name end
   local map = {}
   for _, name in ipairs(names) do
      map[name] = rename(name)
      if not map[name] then
         error(string.format('%s: %s has no torchvision counterpart (a layer NR-CR / NR-CA split)', fname, name), level)
      end
   end
   return map
end

-- ---- helpers shared by models/*.lua ------------------------------------------------------------

local util = {}
M.util = util

local DATASET_CLASSES = {imagenet = 1000, cifar10 = 10, cifar100 = 100}
util.DATASET_CLASSES = DATASET_CLASSES

-- Validates the options common to every model: returns opts with dataset, classes filled in.
-- allowed: table of extra allowed keys (true) for this family.
function util.common(opts, allowed, fname)
   -- errors at level 3: the user's line that called the model's build (nr.models.NAME tail-calls it)
   if type(opts) ~= 'table' then error(string.format('%s: options must be a table, got %s', fname, check.show(opts)), 3) end
   local keys = {dataset = true, classes = true, input = true}
   for k in pairs(allowed) do keys[k] = true end
   check.options(opts, keys, fname, 3)
   local o = {}
   for k, v in pairs(opts) do o[k] = v end
   o.dataset = o.dataset or 'imagenet'
   if not DATASET_CLASSES[o.dataset] then
      error(string.format('%s: unknown dataset %s (known: cifar10, cifar100, imagenet)', fname, check.show(o.dataset)), 3)
   end
   o.classes = o.classes or DATASET_CLASSES[o.dataset]
   -- 2^31: the layers take int32 sizes (inf equals its floor and passed, to fail inside nr.nn)
   local function whole(v) return type(v) == 'number' and v == math.floor(v) and v >= 1 and v < 2 ^ 31 end
   if not whole(o.classes) then
      error(string.format('%s: classes must be a positive integer, got %s', fname, check.show(o.classes)), 3)
   end
   if o.input ~= nil and not whole(o.input) then
      error(string.format('%s: input must be a positive integer (image side in pixels), got %s', fname, check.show(o.input)), 3)
   end
   return o
end

-- Error for a value outside a list: "fname: unknown depth 20 (valid: 18, 34, 50)".
function util.choice(value, valid, fname, what, where)
   for _, v in ipairs(valid) do if v == value then return value end end
   local names = {}
   for i, v in ipairs(valid) do names[i] = tostring(v) end
   error(string.format('%s: unknown %s %s%s (valid: %s)', fname, what, check.show(value), where and (' for ' .. where) or '',
      table.concat(names, ', ')), 3)
end

-- t <- N(0, std) drawn from the global generator (in place, one pass: nr_rng_normal).
function util.normal_(t, std)
   local C = require('nr.ffi').C
   check.status(C.nr_rng_normal(t.c, 0, std), 'nr.models (init)')
   return t
end

-- Kaiming (He) normal, mode fan_out, gain sqrt(2): std = sqrt(2 / (cout * kh * kw)), PyTorch's
-- fan_out for a (cout, cin/groups, kh, kw) weight (groups do not divide it).
function util.kaiming_fan_out_(conv)
   local k = conv.kernel_size
   local std = math.sqrt(2 / (conv.out_channels * k[1] * k[2]))
   util.normal_(conv.weight, std)
   if conv.bias then conv.bias:fill(0) end
   return conv
end

function util.bn_(bn, gamma)
   bn.weight:fill(gamma)
   bn.bias:fill(0)
   return bn
end

-- Classifier: weight N(0, 0.01), bias 0.
function util.linear_(lin)
   util.normal_(lin.weight, 0.01)
   if lin.bias then lin.bias:fill(0) end
   return lin
end

-- Initializes every Conv2d / BatchNorm2d / Linear below root as the paper / torchvision do.
function util.init(root, gamma0)
   for _, m in ipairs(root:listModules()) do
      local t = m:typename()
      if t == 'Conv2d' then util.kaiming_fan_out_(m)
      elseif t == 'BatchNorm2d' then util.bn_(m, gamma0)
      elseif t == 'Linear' then util.linear_(m) end
   end
   return root
end

-- Sequential whose children carry names: named{{'features', m1}, {'fc', m2}} -> paths 'features.3'.
function util.named(list)
   local nn = require 'nr.nn'
   local mods = {}
   for i, p in ipairs(list) do mods[i] = p[2] end
   local s = nn.Sequential(mods)
   for i, p in ipairs(list) do s.modules[i]._key = p[1] end
   return s
end

-- conv (bias=false) -> BN -> [ReLU]; returns the modules as a list (to splice into a Sequential)
-- and the conv and BN themselves.
function util.conv_bn(cin, cout, k, opts, relu)
   local nn = require 'nr.nn'
   opts = opts or {}
   local conv = nn.Conv2d(cin, cout, k, {stride = opts.stride or 1, padding = opts.padding or 0,
                                         groups = opts.groups or 1, bias = false})
   local bn = nn.BatchNorm2d(cout)
   local mods = {conv, bn}
   if relu ~= false then mods[3] = nn.ReLU{inplace = true} end
   return mods, conv, bn
end

-- Marks a conv and its BN as Neural Rejuvenation "fixed" (main stream: never pruned, no L1).
function util.fix(...)
   for _, m in ipairs({...}) do m.nr_fixed = true end
end

-- nr.models.resnett{...}: a misspelt name is an error that lists the models, not "attempt to call
-- a nil value" (rawget(nr.models, name) asks without raising).
setmetatable(M, {__index = function(_, k)
   error(string.format('nr.models: no model or field %s (models: %s; nr.models.build{name = ...} builds from a '
      .. 'recipe\'s model table)', check.show(k), table.concat(M.names, ', ')), 2)
end})

return M

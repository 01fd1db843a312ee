-- models/densenet.lua — DenseNet-BC, post-activation as Neural Rejuvenation changes it.
--
--   nr.models.densenet{depth = 121}                                    ImageNet, k = 32
--   nr.models.densenet{depth = 100, growth = 40, dataset = 'cifar10'}  CIFAR DenseNet-100-40
--
-- The paper (4.3) turns DenseNet's pre-activation BN-ReLU-conv into post-activation conv-BN-ReLU
-- so that every conv is directly followed by its BatchNorm (NR's liveliness), and uses the same
-- change on CIFAR (4.4). As in the authors' code: a dense layer is
-- Concat{Identity(), Sequential{conv1x1 (4k) BN ReLU, conv3x3 (k) BN ReLU}}; a transition is
-- conv1x1 (compression 0.5) BN ReLU AvgPool2d(2); there is no final BN (the last layer's output
-- is already normalised); GAP and one FC close the net.
-- ImageNet: depth 121/169/201 (blocks 6-12-24-16 / 6-12-32-32 / 6-12-48-32), 64 initial features,
-- stem conv7x7/2 BN ReLU max-pool 3x3/2. CIFAR: depth 6n+4 (n bottleneck layers per block, 3
-- blocks), stem conv3x3 3 -> 2k, growth default 40 (the paper's DenseNet-100-40). Every CIFAR
-- DenseNet here is the BC variant (bottleneck + compression): depth 40 is DenseNet-BC-40
-- (0.17M parameters at growth 12), not Huang et al.'s plain DenseNet-40.
-- No conv is NR-fixed. Init: convs Kaiming normal fan_out, BN γ = 1, β = 0, classifier
-- N(0, 0.01), bias 0. Convs have bias = false.
local nn = require 'nr.nn'
local check = require 'nr.check'
local models = require 'nr.models'
local util = models.util

local M = {}

local FNAME = 'nr.models.densenet'

local BLOCKS = {[121] = {6, 12, 24, 16}, [169] = {6, 12, 32, 32}, [201] = {6, 12, 48, 32}}
local MAX_CIFAR_DEPTH = 1000
M.depths = {imagenet = {121, 169, 201}}

local function splice(list, mods) for _, m in ipairs(mods) do list[#list + 1] = m end end

local function dense_layer(cin, growth, bn_size)
   local path = {}
   splice(path, (util.conv_bn(cin, bn_size * growth, 1)))
   splice(path, (util.conv_bn(bn_size * growth, growth, 3, {padding = 1})))
   return nn.Concat{nn.Identity(), nn.Sequential(path)}
end

local function transition(cin, cout)
   local mods = util.conv_bn(cin, cout, 1)
   mods[#mods + 1] = nn.AvgPool2d(2, {stride = 2})
   return nn.Sequential(mods)
end

-- a width (an int32 of the layers; inf, which equals its floor, refused too), at build's caller
local function check_width(v, what) check.int32(v, FNAME, what, 1, nil, 3) end

function M.build(opts)
   local o = util.common(opts, {depth = true, growth = true, bn_size = true, compression = true,
                                init_features = true}, FNAME)
   local cifar = o.dataset ~= 'imagenet'
   local blocks, stem
   if cifar then
      o.depth = o.depth or 100
      -- at most 1000 layers deep (DenseNet-BC-190 is the largest in use; a depth of 1e17 built
      -- layers until memory ran out)
      if type(o.depth) ~= 'number' or o.depth < 10 or o.depth > MAX_CIFAR_DEPTH or (o.depth - 4) % 6 ~= 0 then
         error(string.format('%s: unknown depth %s for %s (valid: 6n+4 with n >= 1, up to %d, e.g. 100, 190; DenseNet-BC)',
            FNAME, check.show(o.depth), o.dataset, MAX_CIFAR_DEPTH), 2)
      end
      o.growth = o.growth or 40
      check_width(o.growth, 'growth')
      local n = (o.depth - 4) / 6
      blocks = {n, n, n}
      o.init_features = o.init_features or 2 * o.growth
      check_width(o.init_features, 'init_features') -- before the stem is built with it
      o.input = o.input or 32
      stem = util.conv_bn(3, o.init_features, 3, {padding = 1})
   else
      o.depth = util.choice(o.depth or 121, M.depths.imagenet, FNAME, 'depth')
      o.growth = o.growth or 32
      check_width(o.growth, 'growth')
      blocks = BLOCKS[o.depth]
      o.init_features = o.init_features or 64
      check_width(o.init_features, 'init_features')
      o.input = o.input or 224
      stem = util.conv_bn(3, o.init_features, 7, {stride = 2, padding = 3})
      stem[#stem + 1] = nn.MaxPool2d(3, {stride = 2, padding = 1})
   end
   o.bn_size = o.bn_size or 4
   check_width(o.bn_size, 'bn_size')
   o.compression = o.compression or 0.5
   if type(o.compression) ~= 'number' or not (o.compression > 0 and o.compression <= 1) then -- NaN too
      error(FNAME .. ': compression must be in (0, 1], got ' .. check.show(o.compression), 2)
   end
   local parts = {{'stem', nn.Sequential(stem)}}
   local c = o.init_features
   for b, n in ipairs(blocks) do
      local layers = {}
      for i = 1, n do
         layers[i] = dense_layer(c, o.growth, o.bn_size)
         c = c + o.growth
      end
      parts[#parts + 1] = {'block' .. b, nn.Sequential(layers)}
      if b < #blocks then
         local cout = math.floor(c * o.compression)
         if cout < 1 then
            error(string.format('%s: compression %s leaves no channel after dense block %d (%d channels)', FNAME,
               check.show(o.compression), b, c), 2)
         end
         parts[#parts + 1] = {'trans' .. b, transition(c, cout)}
         c = cout
      end
   end
   parts[#parts + 1] = {'pool', nn.GlobalAvgPool2d()}
   parts[#parts + 1] = {'fc', nn.Linear(c, o.classes)}
   local model = util.named(parts)
   util.init(model, 1)
   model.nr_info = {gamma0 = 1, input_channels = 3, input_size = o.input, classes = o.classes,
                    dataset = o.dataset, name = 'densenet' .. o.depth .. (cifar and ('-' .. o.growth) or ''),
                    growth = o.growth}
   model.name = model.nr_info.name
   return model
end

return M

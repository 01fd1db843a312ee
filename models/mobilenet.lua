-- models/mobilenet.lua — MobileNet v1 (Howard et al. 2017) with a width multiplier.
--
--   nr.models.mobilenet{width = 0.25, input = 128}      the paper's Table 3 setting (ImageNet)
--   nr.models.mobilenet{width = 0.5, dataset = 'cifar10'}
--
-- Stem conv3x3/2 (3 -> 32w) BN ReLU, then 13 depthwise-separable blocks — depthwise conv3x3
-- (groups = channels) BN ReLU, pointwise conv1x1 BN ReLU — with widths 64w..1024w (Table 1 of
-- the MobileNet paper; width w in {0.25, 0.5, 0.75, 1}, channels int(c * w)), GAP, one FC. On
-- CIFAR the stem has stride 1 (32x32 -> final 2x2 map); everything else is unchanged.
-- The network is fully convolutional, so `input` (default 128 on ImageNet, 32 on CIFAR) only
-- records the intended resolution (nr_info.input_size, used by nr.count / recipes).
-- No conv is NR-fixed. Init: convs Kaiming normal fan_out (PyTorch fan_out = cout*kh*kw, also for
-- depthwise), BN γ = 1, β = 0, classifier N(0, 0.01), bias 0. Convs have bias = false.
local nn = require 'nr.nn'
local models = require 'nr.models'
local util = models.util

local M = {}

local FNAME = 'nr.models.mobilenet'

-- (out channels, stride) of the 13 depthwise-separable blocks
local CFG = {{64, 1}, {128, 2}, {128, 1}, {256, 2}, {256, 1}, {512, 2},
             {512, 1}, {512, 1}, {512, 1}, {512, 1}, {512, 1}, {1024, 2}, {1024, 1}}
M.widths = {0.25, 0.5, 0.75, 1.0}

local function splice(list, mods) for _, m in ipairs(mods) do list[#list + 1] = m end end

function M.build(opts)
   local o = util.common(opts, {width = true}, FNAME)
   o.width = util.choice(o.width or 1.0, M.widths, FNAME, 'width')
   local cifar = o.dataset ~= 'imagenet'
   o.input = o.input or (cifar and 32 or 128)
   local c = math.floor(32 * o.width)
   local feats = {}
   splice(feats, (util.conv_bn(3, c, 3, {stride = cifar and 1 or 2, padding = 1})))
   for _, b in ipairs(CFG) do
      local cout = math.floor(b[1] * o.width)
      splice(feats, (util.conv_bn(c, c, 3, {stride = b[2], padding = 1, groups = c})))
      splice(feats, (util.conv_bn(c, cout, 1)))
      c = cout
   end
   local model = util.named{
      {'features', nn.Sequential(feats)},
      {'pool', nn.GlobalAvgPool2d()},
      {'fc', nn.Linear(c, o.classes)},
   }
   util.init(model, 1)
   model.nr_info = {gamma0 = 1, input_channels = 3, input_size = o.input, classes = o.classes,
                    dataset = o.dataset, name = string.format('mobilenet%03d', math.floor(o.width * 100 + 0.5)),
                    width = o.width}
   model.name = model.nr_info.name
   return model
end

return M

-- models/vgg.lua — VGG as Neural Rejuvenation (Qiao et al., CVPR 2019) modifies it.
--
--   nr.models.vgg{depth = 16}                          ImageNet VGG-16 (paper 4.3, Table 2)
--   nr.models.vgg{depth = 19, dataset = 'cifar10'}     CIFAR VGG-19 (paper 4.4, Table 4)
--
-- ImageNet (depth 11/13/16/19, configurations A/B/D/E): every conv3x3 is followed by BatchNorm and
-- ReLU; the three FC layers are replaced by two 1x1 convs with 4096 outputs (+BN+ReLU), a global
-- average pool and one FC. head = 'pool' (default, the authors' code models/imagenet/vgg_ori.py
-- and the only layout that gives Table 2's 37.7M / 15.3G): the 5th max-pool is dropped and the
-- 14x14 map is average-pooled to 1x1 before the two 4096 convs. head = 'conv' (the paper's text
-- order): 5 max-pools, the 4096 convs run on the 7x7 map, then GAP: same parameters, 16.3G MACs.
-- See models/README.md. With head = 'pool' the pooling window is fixed at construction from
-- `input` (default 224), as in the authors' AvgPool2d(14).
-- CIFAR (depth 19): 16 conv3x3+BN+ReLU with VGG-19 widths, max-pools (2x2) only after the 4th and
-- the 10th conv (32 -> 16 -> 8), GAP, one FC; BN γ initialised to 0.5 as the authors (and Network
-- Slimming) do.
-- Init: convs Kaiming normal fan_out, BN γ = gamma0 (1 on ImageNet, 0.5 on CIFAR), β = 0,
-- classifier N(0, 0.01), bias 0. No conv is NR-fixed in VGG. Convs have bias = false.
local nn = require 'nr.nn'
local models = require 'nr.models'
local util = models.util

local M = {}

local FNAME = 'nr.models.vgg'

-- ImageNet configurations (widths; 'M' = max-pool 2x2/2), as torchvision.
local CFG = {
   [11] = {64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'},
   [13] = {64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'},
   [16] = {64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'},
   [19] = {64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M'},
}
-- CIFAR VGG-19 of NR: pools after the 4th and 10th conv only.
local CFG_CIFAR = {
   [19] = {64, 64, 128, 128, 'M', 256, 256, 256, 256, 512, 512, 'M', 512, 512, 512, 512, 512, 512},
}

M.depths = {imagenet = {11, 13, 16, 19}, cifar = {19}}

local function features(cfg, drop_last_pool)
   local mods, c = {}, 3
   local last = #cfg
   for i, v in ipairs(cfg) do
      if v == 'M' then
         if not (drop_last_pool and i == last) then mods[#mods + 1] = nn.MaxPool2d(2, {stride = 2}) end
      else
         for _, m in ipairs((util.conv_bn(c, v, 3, {padding = 1}))) do mods[#mods + 1] = m end
         c = v
      end
   end
   return nn.Sequential(mods), c
end

function M.build(opts)
   local o = util.common(opts, {depth = true, head = true, gamma0 = true}, FNAME)
   local cifar = o.dataset ~= 'imagenet'
   local model, info
   if cifar then
      o.depth = util.choice(o.depth or 19, M.depths.cifar, FNAME, 'depth', o.dataset)
      if o.head ~= nil then error(FNAME .. ': head applies to ImageNet VGG only', 2) end
      o.input = o.input or 32
      local feats, c = features(CFG_CIFAR[o.depth], false)
      model = util.named{
         {'features', feats},
         {'pool', nn.GlobalAvgPool2d()},
         {'fc', nn.Linear(c, o.classes)},
      }
      info = {gamma0 = o.gamma0 or 0.5}
   else
      o.depth = util.choice(o.depth or 16, M.depths.imagenet, FNAME, 'depth')
      o.head = util.choice(o.head or 'pool', {'pool', 'conv'}, FNAME, 'head')
      o.input = o.input or 224
      local pool_head = o.head == 'pool'
      local feats, c = features(CFG[o.depth], pool_head)
      local head = {}
      if pool_head then
         -- side of the last feature map: 4 max-pools halve the input
         local side = o.input
         for _ = 1, 4 do side = math.floor(side / 2) end
         if side < 1 then error(string.format('%s: input %d is too small (needs >= 16)', FNAME, o.input), 2) end
         head[#head + 1] = nn.AvgPool2d(side, {stride = side})
      end
      for _, m in ipairs((util.conv_bn(c, 4096, 1))) do head[#head + 1] = m end
      for _, m in ipairs((util.conv_bn(4096, 4096, 1))) do head[#head + 1] = m end
      model = util.named{
         {'features', feats},
         {'head', nn.Sequential(head)},
         {'pool', nn.GlobalAvgPool2d()},
         {'fc', nn.Linear(4096, o.classes)},
      }
      info = {gamma0 = o.gamma0 or 1}
   end
   local g0 = info.gamma0
   if type(g0) ~= 'number' or not (g0 > 0 and g0 < math.huge) then -- NaN and inf too
      error(FNAME .. ': gamma0 must be a positive number', 2)
   end
   util.init(model, info.gamma0)
   info.input_channels = 3
   info.input_size = o.input
   info.classes = o.classes
   info.dataset = o.dataset
   info.name = 'vgg' .. o.depth
   model.nr_info = info
   model.name = info.name
   return model
end

return M

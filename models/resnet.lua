-- models/resnet.lua — ResNets for ImageNet and CIFAR, with Neural Rejuvenation's fixed convs.
--
--   nr.models.resnet{depth = 50}                            ImageNet, torchvision layout
--   nr.models.resnet{depth = 18, dataset = 'cifar10'}       3x3 stride-1 stem, no max-pool
--   nr.models.resnet{depth = 164, dataset = 'cifar10'}      post-activation bottleneck (paper, authors' code)
--   nr.models.resnet{depth = 164, dataset = 'cifar10', preact = true}    pre-activation (Network Slimming's)
--
-- ImageNet: depth 18/34 basic blocks, 50/101/152 bottlenecks with the stride on the 3x3 (v1.5,
-- torchvision). Stem conv7x7/2 + BN + ReLU + max-pool 3x3/2. The same block stacks with a
-- conv3x3/1 stem and no max-pool serve CIFAR for depth 18..152.
-- CIFAR ResNet-164: 3 stages x 18 bottlenecks (planes 16/32/64, expansion 4, outputs
-- 64/128/256). Default: post-activation bottlenecks (conv-BN-ReLU x2, conv-BN, add, ReLU;
-- projection conv+BN), as the paper's [23] and the authors' code, and as NR assumes (every conv
-- directly followed by its BN). preact = true: Network Slimming's pre-activation ResNet-164
-- (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1, identity add; projection = conv1x1 on the
-- block's raw input, not He et al.'s "both_preact"; a final BN-ReLU before the pool; γ starts at 1,
-- where Network Slimming starts it at 0.5).
-- A block is Sequential{Residual(main, shortcut | nil), ReLU} (post-activation) or
-- Residual(main, shortcut | nil) (pre-activation); shortcut nil is identity.
-- NR flags: `nr_fixed = true` on every main-stream conv — the stem, each block's last conv and
-- the projection shortcuts — and on the BatchNorm that goes with it (post-activation: the BN after
-- it; pre-activation: the BNs that act on main-stream channels, i.e. each block's first BN and the
-- final BN). These are never pruned and get no L1 (paper 4.3). Convs have bias = false.
-- Init: convs Kaiming normal fan_out, BN γ = 1, β = 0, classifier N(0, 0.01), bias 0.
local nn = require 'nr.nn'
local check = require 'nr.check'
local models = require 'nr.models'
local util = models.util

local M = {}

local FNAME = 'nr.models.resnet'

-- depth -> {block kind, blocks per stage}
local STAGES = {
   [18] = {'basic', {2, 2, 2, 2}},
   [34] = {'basic', {3, 4, 6, 3}},
   [50] = {'bottleneck', {3, 4, 6, 3}},
   [101] = {'bottleneck', {3, 4, 23, 3}},
   [152] = {'bottleneck', {3, 8, 36, 3}},
}
M.depths = {imagenet = {18, 34, 50, 101, 152}, cifar = {18, 34, 50, 101, 152, 164}}

local function splice(list, mods) for _, m in ipairs(mods) do list[#list + 1] = m end end

-- Projection shortcut conv1x1(stride) + BN, both fixed.
local function projection(cin, cout, stride, with_bn)
   local conv = nn.Conv2d(cin, cout, 1, {stride = stride, bias = false})
   util.fix(conv)
   if not with_bn then return conv end
   local bn = nn.BatchNorm2d(cout)
   util.fix(bn)
   return nn.Sequential{conv, bn}
end

-- Post-activation block (basic or bottleneck), torchvision v1.5; returns the block, its out width.
local function post_block(kind, cin, planes, stride)
   local main = {}
   local cout
   if kind == 'basic' then
      cout = planes
      splice(main, (util.conv_bn(cin, planes, 3, {stride = stride, padding = 1})))
      local mods, conv, bn = util.conv_bn(planes, planes, 3, {padding = 1}, false)
      splice(main, mods)
      util.fix(conv, bn)
   else
      cout = planes * 4
      splice(main, (util.conv_bn(cin, planes, 1)))
      splice(main, (util.conv_bn(planes, planes, 3, {stride = stride, padding = 1})))
      local mods, conv, bn = util.conv_bn(planes, cout, 1, {}, false)
      splice(main, mods)
      util.fix(conv, bn)
   end
   local shortcut
   if stride ~= 1 or cin ~= cout then shortcut = projection(cin, cout, stride, true) end
   return nn.Sequential{nn.Residual(nn.Sequential(main), shortcut), nn.ReLU{inplace = true}}, cout
end

-- Pre-activation bottleneck (He et al. 2016, "Identity mappings"), as in the CIFAR ResNet-164.
local function pre_bottleneck(cin, planes, stride)
   local cout = planes * 4
   local bn0 = nn.BatchNorm2d(cin)
   util.fix(bn0)
   local main = {bn0, nn.ReLU{inplace = true}, nn.Conv2d(cin, planes, 1, {bias = false}),
                 nn.BatchNorm2d(planes), nn.ReLU{inplace = true},
                 nn.Conv2d(planes, planes, 3, {stride = stride, padding = 1, bias = false}),
                 nn.BatchNorm2d(planes), nn.ReLU{inplace = true}}
   local last = nn.Conv2d(planes, cout, 1, {bias = false})
   util.fix(last)
   main[#main + 1] = last
   local shortcut
   if stride ~= 1 or cin ~= cout then shortcut = projection(cin, cout, stride, false) end
   return nn.Residual(nn.Sequential(main), shortcut), cout
end

local function imagenet_style(o, cifar)
   local kind, counts = STAGES[o.depth][1], STAGES[o.depth][2]
   local parts = {}
   local stem, sconv, sbn
   if cifar then
      stem, sconv, sbn = util.conv_bn(3, 64, 3, {padding = 1})
   else
      stem, sconv, sbn = util.conv_bn(3, 64, 7, {stride = 2, padding = 3})
      stem[#stem + 1] = nn.MaxPool2d(3, {stride = 2, padding = 1})
   end
   util.fix(sconv, sbn)
   parts[1] = {'stem', nn.Sequential(stem)}
   local c = 64
   for s, n in ipairs(counts) do
      local blocks = {}
      for b = 1, n do
         local stride = (b == 1 and s > 1) and 2 or 1
         blocks[b], c = post_block(kind, c, 64 * 2 ^ (s - 1), stride)
      end
      parts[#parts + 1] = {'layer' .. s, nn.Sequential(blocks)}
   end
   parts[#parts + 1] = {'pool', nn.GlobalAvgPool2d()}
   parts[#parts + 1] = {'fc', nn.Linear(c, o.classes)}
   return util.named(parts)
end

local function cifar164(o)
   local n = (o.depth - 2) / 9
   local parts = {}
   local c = 16
   if o.preact then
      local conv = nn.Conv2d(3, 16, 3, {padding = 1, bias = false})
      util.fix(conv)
      parts[1] = {'stem', nn.Sequential{conv}}
   else
      local stem, sconv, sbn = util.conv_bn(3, 16, 3, {padding = 1})
      util.fix(sconv, sbn)
      parts[1] = {'stem', nn.Sequential(stem)}
   end
   for s = 1, 3 do
      local blocks = {}
      for b = 1, n do
         local stride = (b == 1 and s > 1) and 2 or 1
         local planes = 16 * 2 ^ (s - 1)
         if o.preact then
            blocks[b], c = pre_bottleneck(c, planes, stride)
         else
            blocks[b], c = post_block('bottleneck', c, planes, stride)
         end
      end
      parts[#parts + 1] = {'layer' .. s, nn.Sequential(blocks)}
   end
   if o.preact then
      local bn = nn.BatchNorm2d(c)
      util.fix(bn)
      parts[#parts + 1] = {'post', nn.Sequential{bn, nn.ReLU{inplace = true}}}
   end
   parts[#parts + 1] = {'pool', nn.GlobalAvgPool2d()}
   parts[#parts + 1] = {'fc', nn.Linear(c, o.classes)}
   return util.named(parts)
end

-- torchvision's name for a tensor of this file's ImageNet ResNets ('layer1.0.0.main.3.weight' ->
-- 'layer1.0.conv2.weight'; the main stream's slots 0/1, 3/4, 6/7 are conv1/bn1, conv2/bn2,
-- conv3/bn3, the projection is downsample), nil for a name torchvision's has no twin of (the
-- split layers of NR-CR / NR-CA, whose names carry one more part).
local MAIN_SLOT = {['0'] = 'conv1', ['1'] = 'bn1', ['3'] = 'conv2', ['4'] = 'bn2', ['6'] = 'conv3', ['7'] = 'bn3'}
function M.torchvision_name(name)
   local head, field = name:match('^(.+)%.([%a_]+)$')
   if not head then return nil end
   if head == 'stem.0' then return 'conv1.' .. field end
   if head == 'stem.1' then return 'bn1.' .. field end
   if head == 'fc' then return 'fc.' .. field end
   local stage, block, slot = head:match('^layer(%d)%.(%d+)%.0%.main%.(%d+)$')
   if stage and MAIN_SLOT[slot] then return string.format('layer%s.%s.%s.%s', stage, block, MAIN_SLOT[slot], field) end
   stage, block, slot = head:match('^layer(%d)%.(%d+)%.0%.shortcut%.([01])$')
   if stage then return string.format('layer%s.%s.downsample.%s.%s', stage, block, slot, field) end
   return nil
end

function M.build(opts)
   local o = util.common(opts, {depth = true, preact = true}, FNAME)
   if o.preact ~= nil and type(o.preact) ~= 'boolean' then
      error(string.format('%s: preact must be true or false, got %s', FNAME, check.show(o.preact)), 2)
   end
   local cifar = o.dataset ~= 'imagenet'
   local model
   if cifar then
      o.depth = util.choice(o.depth or 164, M.depths.cifar, FNAME, 'depth', o.dataset)
      o.input = o.input or 32
      if o.depth == 164 then
         if o.preact == nil then o.preact = false end
         model = cifar164(o)
      else
         if o.preact then error(FNAME .. ': preact applies to the CIFAR ResNet-164 only', 2) end
         model = imagenet_style(o, true)
      end
   else
      o.depth = util.choice(o.depth or 50, M.depths.imagenet, FNAME, 'depth')
      if o.preact then error(FNAME .. ': preact applies to the CIFAR ResNet-164 only', 2) end
      o.input = o.input or 224
      model = imagenet_style(o, false)
   end
   util.init(model, 1)
   model.nr_info = {gamma0 = 1, input_channels = 3, input_size = o.input, classes = o.classes,
                    dataset = o.dataset, name = 'resnet' .. o.depth, preact = o.preact or false}
   model.name = model.nr_info.name
   return model
end

return M

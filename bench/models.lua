-- bench/models.lua — the benchmark models, equivalent layer for layer to the PyTorch side
-- (../shared/bench/torch_baseline.py), built from nr.nn.
--
-- What it is: name -> {build(), shape (C, H, W), classes, train batches, infer batches}, with the
-- same names, inputs and batch sizes as torch_baseline.py's MODELS table. MobileNet-0.25@128,
-- the CIFAR VGG-19 of NR and ResNet-18-CIFAR come from nr.models (same topology as the PyTorch
-- classes: conv bias off before BN, 3x3 stride-1 stem without max-pool, pools after conv 4 and 10);
-- the Fashion-MNIST convnet is defined here.
-- What it is not: a model zoo (models/*.lua is). Initial values differ from PyTorch's (they do not
-- affect speed; both sides run fp32 on synthetic inputs).
local M = {}

local function fmnist_cnn(classes)
   local nn = require('nr').nn
   return nn.Sequential{
      nn.Conv2d(1, 32, 3, {padding = 1, bias = false}), nn.BatchNorm2d(32), nn.ReLU{inplace = true},
      nn.MaxPool2d(2, {stride = 2}),
      nn.Conv2d(32, 64, 3, {padding = 1, bias = false}), nn.BatchNorm2d(64), nn.ReLU{inplace = true},
      nn.MaxPool2d(2, {stride = 2}),
      nn.Flatten(),
      nn.Linear(64 * 7 * 7, 128), nn.ReLU{inplace = true},
      nn.Linear(128, classes),
   }
end

local function zoo(name, opts)
   return function() return require('nr').models[name](opts) end
end

-- Same order and settings as torch_baseline.py.
M.order = {'mobilenet_v1_025', 'vgg19_nr', 'resnet18_cifar', 'fmnist_cnn'}
M.models = {
   mobilenet_v1_025 = {build = zoo('mobilenet', {width = 0.25, input = 128, classes = 1000}),
                       shape = {3, 128, 128}, classes = 1000, train = {32, 64}, infer = {64}},
   vgg19_nr = {build = zoo('vgg', {depth = 19, dataset = 'cifar10'}),
               shape = {3, 32, 32}, classes = 10, train = {64}, infer = {64}},
   resnet18_cifar = {build = zoo('resnet', {depth = 18, dataset = 'cifar10'}),
                     shape = {3, 32, 32}, classes = 10, train = {64}, infer = {64}},
   fmnist_cnn = {build = function() return fmnist_cnn(10) end,
                 shape = {1, 28, 28}, classes = 10, train = {64}, infer = {64}},
}

return M

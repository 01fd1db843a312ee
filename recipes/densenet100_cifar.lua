-- recipes/densenet100_cifar.lua — DenseNet-BC-100, k = 40 (post-activation) on CIFAR-10 with
-- Neural Rejuvenation as a compression method (paper 4.4, Table 4: T_r = 0.25, rejuvenated to half
-- of the original parameters, NR-CR).
--
-- Training (the authors' cifar.py and README): SGD momentum 0.9 (no Nesterov), lr 0.1, weight
-- decay 1e-4, batch 64, 300 epochs, lr x0.1 at epochs 150 and 225 (the schedule is held while
-- the net sparsifies and restarts after rejuvenation, as the authors shift the milestones).
-- Augmentation: random crop 32 with 4 zero padding, horizontal flip, per-channel normalisation.
-- NR: cost = parameters; T_r = 0.25; budget 0.5 (Table 4); NR-CR (cross connections removed);
-- no neural rescaling on CIFAR (the authors' code); λ constant as the authors' README:
-- 1e-4 on CIFAR-10, 2e-4 on CIFAR-100 (--nr.lambda.value 2e-4 with --dataset cifar100, which also
-- needs --model.classes 100).
return {
   name     = 'densenet100_cifar',
   model    = {name = 'densenet', depth = 100, growth = 40, dataset = 'cifar10', classes = 10, input = 32},
   data     = {dataset = 'cifar10', root = require('nr.data').root('cifar10'), batch = 64, size = 32},
   optim    = {name = 'sgd', lr = 0.1, momentum = 0.9, weight_decay = 1e-4, nesterov = false},
   schedule = {name = 'step', milestones = {150, 225}, gamma = 0.1, warmup = 0},
   epochs   = 300,
   nr       = {
      enabled    = true,
      target     = 0.25,       -- T_r: rejuvenate when the utilization r drops to 0.25
      budget     = 0.5,        -- ... back to 0.5 x the original parameters (compression mode)
      constraint = 'params',
      scheme     = 'CR',       -- NR-CR: survived and rejuvenated neurons not cross-connected
      rescale    = false,
      times      = 1,
      lambda     = {mode = 'constant', value = 1e-4},
      policy     = {},
   },
   device   = 'auto', seed = 1, out = 'runs/densenet100_cifar',
}

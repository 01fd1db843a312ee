-- recipes/resnet18.lua — ResNet-18 on ImageNet (224x224), baseline schedule of the NR paper (sec. 4.3)
-- with Neural Rejuvenation NR-CA-BR (cross attention + neural rescaling, paper 4.2/4.3).
--
-- Paper 4.3: batch 256, 90 epochs, "the learning rate is initialized as 0.1, and then divided by 10
-- at the 31st, 61st, and 91st epoch" -> step milestones {30, 60, 90} (epochs 31.. use 0.01; the
-- 91st is only reached by the batch-128 / 100-epoch variant the paper uses when memory is short).
-- Momentum 0.9, weight decay 1e-4, no Nesterov (the authors' imagenet.py). NR (paper 4.1): T_r =
-- 0.5, λ adaptive from 0 (Δt = 1 epoch, Δr = 0.01, Δλ = 5e-5), NR checks only during the first 30
-- epochs (LR 0.1), one rejuvenation back to the full budget; the schedule is held while the net
-- sparsifies and restarts after rejuvenation (authors' code shifts the milestones). constraint:
-- 'params' (Table 2 reports both; 'params' is the authors' default, --nr.constraint flops for the
-- FLOPs column). Data: RandomResizedCrop(224) + flip; validation resize 256, center crop 224.
-- Not a script: nrlua recipes/resnet18.lua [--field value ...] runs it with nr.train.
return {
   name     = 'resnet18',
   model    = {name = 'resnet', depth = 18, classes = 1000, input = 224},
   data     = {dataset = 'imagefolder', root = require('nr.data').root('imagenet'), batch = 256, size = 224},
   optim    = {name = 'sgd', lr = 0.1, momentum = 0.9, weight_decay = 1e-4, nesterov = false},
   schedule = {name = 'step', milestones = {30, 60, 90}, gamma = 0.1, warmup = 0},
   epochs   = 90,
   nr       = {
      enabled    = true,
      target     = 0.5,        -- T_r: rejuvenate when the utilization r drops to 0.5
      budget     = 1.0,        -- rejuvenate back to budget x the original cost (ImageNet keeps the cost)
      constraint = 'params',   -- the cost c(A): 'params' or 'flops' (multiply-adds, nr.count)
      scheme     = 'CA',       -- NR-CA: cross attention between survived and rejuvenated neurons
      rescale    = true,       -- neural rescaling (BR) to γ0
      times      = 1,          -- one rejuvenation on ImageNet (paper 4.1)
      active_epochs = 30,      -- NR monitoring only while the LR is 0.1 (paper 4.1)
      lambda     = {mode = 'adaptive', init = 0, dt = 'epoch', dr = 0.01, dl = 5e-5},
      policy     = {},
   },
   device   = 'auto', seed = 1, out = 'runs/resnet18',
}

-- recipes/mobilenet025.lua — MobileNet v1 width 0.25 at 128x128 on ImageNet with Neural
-- Rejuvenation keeping the FLOPs (paper Table 3: "The image size is 128x128 for both training and
-- testing. The FLOPs are maintained"; "the learning rate follows the cosine learning rate schedule
-- starting from 0.1").
--
-- Where the numbers come from: cosine from 0.1 — the paper (4.3, citing [49]); batch 256 — the
-- paper's ImageNet setting (4.3); epochs 150 — not given by the paper (nor by the authors' code,
-- which has no MobileNet): the project's choice from docs/DESIGN.md §1, a common length for
-- cosine-schedule MobileNet training; weight decay 4e-5 — MobileNet's own training setup (Howard
-- et al. 2017, TF-slim), not stated in the NR paper. Momentum 0.9, no Nesterov.
-- NR (paper 4.1 / Table 3): T_r = 0.5, λ adaptive (Δt = 1 epoch, Δr = 0.01, Δλ = 5e-5), cost =
-- FLOPs (multiply-adds), NR-CA with neural rescaling, one rejuvenation back to the full budget.
-- Other datasets: the trainer's overrides (e.g. --dataset fashion-mnist) keep model.input = 128
-- and data.size = 128: images are resized to 128x128 and grey images replicated to the 3 input
-- channels the model expects (model.nr_info.input_channels).
return {
   name     = 'mobilenet025',
   model    = {name = 'mobilenet', width = 0.25, classes = 1000, input = 128},
   data     = {dataset = 'imagefolder', root = require('nr.data').root('imagenet'), batch = 256, size = 128},
   optim    = {name = 'sgd', lr = 0.1, momentum = 0.9, weight_decay = 4e-5, nesterov = false},
   schedule = {name = 'cosine', warmup = 0},
   epochs   = 150,
   nr       = {
      enabled    = true,
      target     = 0.5,        -- T_r
      budget     = 1.0,        -- rejuvenate back to the full FLOPs
      constraint = 'flops',    -- Table 3 keeps the FLOPs
      scheme     = 'CA',
      rescale    = true,
      times      = 1,
      lambda     = {mode = 'adaptive', init = 0, dt = 'epoch', dr = 0.01, dl = 5e-5},
      policy     = {},
   },
   device   = 'auto', seed = 1, out = 'runs/mobilenet025',
}

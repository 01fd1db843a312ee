-- nr.nn CrossEntropyLoss — softmax cross-entropy over logits (N, K) and int64 class ids
-- 0..K-1 (N), mean over the batch, optional label smoothing (PyTorch's CrossEntropyLoss), on
-- nr_softmax_xent_forward/backward (core/nn_loss.c).
--   local crit = nr.nn.CrossEntropyLoss({label_smoothing = 0.1})
--   local loss = crit:forward(logits, labels)       -- a Lua number
--   local g    = crit:backward(logits, labels)      -- (N, K), owned by the criterion
-- Invariants: labels are checked (dtype, shape, range: the offending value and its position are
-- named) before anything is computed; the softmax of the last forward (_probs) drives the
-- backward, so backward must follow a forward of the same logits.
local class = require 'nr.class'
local Module = require 'nr.nn.module'
local T = require 'nr.tensor'
local check = require 'nr.check'
local U = require 'nr.nn.layer_util'
local C = require('nr.ffi').C

local CrossEntropyLoss = class('CrossEntropyLoss', Module)
local FN = 'CrossEntropyLoss'

function CrossEntropyLoss:__init(opts)
   Module.__init(self)
   opts = check.options(opts, {label_smoothing = true}, 'nr.nn.CrossEntropyLoss')
   self.label_smoothing = U.opt_num(opts.label_smoothing, 'label_smoothing', 'nr.nn.CrossEntropyLoss', 0, 0, 1)
end

local function args(logits, labels)
   if not T.is_tensor(logits) or logits:dim() ~= 2 or not U.ACT_DTYPES[logits:dtype()] then
      error(string.format('%s: logits must be a float32 or bfloat16 (N, K) tensor, got %s', FN,
         T.is_tensor(logits) and logits:describe() or type(logits)), 4)
   end
   if not T.is_tensor(labels) then
      error(string.format('%s: labels must be an int64 tensor of class ids 0..%d, got %s', FN, logits:size(2) - 1,
         type(labels)), 4)
   end
   if labels:dtype() ~= 'int64' then
      error(string.format('%s: labels must be int64 class ids 0..%d, got %s (convert with :long())', FN,
         logits:size(2) - 1, labels:describe()), 4)
   end
   if labels:dim() ~= 1 or labels:size(1) ~= logits:size(1) then
      error(string.format('%s: labels must have shape [%d] (one class id per row of logits %s), got %s', FN,
         logits:size(1), U.shape_str(logits:shape()), U.shape_str(labels:shape())), 4)
   end
   if labels:device() ~= logits:device() then
      error(string.format('%s: labels on %s but logits on %s', FN, labels:device(), logits:device()), 4)
   end
   return logits:contiguous(), labels:contiguous()
end

local function raise(status)
   if status ~= 0 then
      local msg = require('nr.ffi').ffi.string(C.nr_last_error())
      error(FN .. ': ' .. msg, 4)
   end
end

-- Returns the mean loss as a Lua number.
function CrossEntropyLoss:updateOutput(logits, labels)
   logits, labels = args(logits, labels)
   local probs = U.buffer(self, '_probs', logits:shape(), logits)
   local loss = U.buffer(self, '_loss', {1}, logits)
   raise(C.nr_softmax_xent_forward(logits.c, labels.c, loss.c, probs.c, self.label_smoothing))
   self.output = loss:get(1)
   return self.output
end

-- gradInput (N, K) = dLoss/dlogits, times scale (dL/dloss, default 1).
function CrossEntropyLoss:updateGradInput(logits, labels, scale)
   logits, labels = args(logits, labels)
   local probs = rawget(self, '_probs')
   if not probs or not T.same_shape(probs:shape(), logits:shape()) then
      error(FN .. ': backward needs a forward of the same logits first', 3)
   end
   local gi = U.grad_buffer(self, logits:shape(), logits)
   raise(C.nr_softmax_xent_backward(probs.c, labels.c, gi.c, self.label_smoothing, scale or 1))
   return gi
end

function CrossEntropyLoss:forward(logits, labels) return self:updateOutput(logits, labels) end
function CrossEntropyLoss:backward(logits, labels, scale) return self:updateGradInput(logits, labels, scale) end
function CrossEntropyLoss:__call(logits, labels) return self:updateOutput(logits, labels) end

function CrossEntropyLoss:extra()
   return self.label_smoothing ~= 0 and string.format('label_smoothing=%g', self.label_smoothing) or ''
end

return {CrossEntropyLoss = CrossEntropyLoss}

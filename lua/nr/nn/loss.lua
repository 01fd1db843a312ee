-- nr.nn CrossEntropyLoss — softmax cross-entropy over logits (N, K) and int64 class ids
-- 0..K-1 (N), mean over the batch, optional label smoothing (PyTorch's CrossEntropyLoss), on
-- nr_softmax_xent_forward/backward (core/nn_loss.c).
--   local crit = nr.nn.CrossEntropyLoss({label_smoothing = 0.1})
--   local loss = crit:forward(logits, labels)       -- a Lua number
--   local g    = crit:backward(logits, labels)      -- (N, K), owned by the criterion
--   local lt   = crit:loss_tensor(logits, labels)   -- the loss as a 1-element tensor on the
--                                                   -- logits' device, not read back (no sync)
-- Invariants: labels are checked (dtype, shape, range: the offending value and its position are
-- named) before anything is computed; the softmax of the last forward (_probs) drives the
-- backward, so backward must follow a forward of the same logits. On a GPU the range check
-- reads a flag back (a stream synchronisation): a caller that checked the labels on the host
-- (nr.nn.check_class_ids, before copying them) passes labels_checked = true to skip it.
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
   opts = check.options(opts, {label_smoothing = true}, 'nr.nn.CrossEntropyLoss', 3)
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

-- The mean loss as a 1-element f32 tensor on the logits' device (the criterion's buffer,
-- overwritten by the next forward); nothing is read back.
function CrossEntropyLoss:loss_tensor(logits, labels, labels_checked)
   logits, labels = args(logits, labels)
   local probs = U.buffer(self, '_probs', logits:shape(), logits)
   local loss = U.buffer(self, '_loss', {1}, logits)
   raise(C.nr_softmax_xent_forward(logits.c, labels.c, loss.c, probs.c, self.label_smoothing, labels_checked and 1 or 0))
   return loss
end

-- Returns the mean loss as a Lua number.
function CrossEntropyLoss:updateOutput(logits, labels)
   self.output = self:loss_tensor(logits, labels):get(1)
   return self.output
end

-- gradInput (N, K) = dLoss/dlogits, times scale (dL/dloss, default 1).
function CrossEntropyLoss:updateGradInput(logits, labels, scale, labels_checked)
   logits, labels = args(logits, labels)
   local probs = rawget(self, '_probs')
   if not probs or not T.same_shape(probs:shape(), logits:shape()) then
      error(FN .. ': backward needs a forward of the same logits first', 3)
   end
   local gi = U.grad_buffer(self, logits:shape(), logits)
   raise(C.nr_softmax_xent_backward(probs.c, labels.c, gi.c, self.label_smoothing, scale or 1, labels_checked and 1 or 0))
   return gi
end

function CrossEntropyLoss:forward(logits, labels) return self:updateOutput(logits, labels) end
function CrossEntropyLoss:backward(logits, labels, scale, labels_checked)
   return self:updateGradInput(logits, labels, scale, labels_checked)
end
function CrossEntropyLoss:__call(logits, labels) return self:updateOutput(logits, labels) end

function CrossEntropyLoss:extra()
   return self.label_smoothing ~= 0 and string.format('label_smoothing=%g', self.label_smoothing) or ''
end

-- Checks that every label (int64 tensor (N)) is a class id in 0..num_classes-1; the error names
-- the first bad value and its position. Cheap on the host; on a GPU it synchronises the stream.
local function check_class_ids(labels, num_classes)
   check.arg(T.is_tensor(labels) and labels:dtype() == 'int64' and labels:dim() == 1, 'nr.nn.check_class_ids',
      'labels must be a 1-d int64 tensor, got %s', T.is_tensor(labels) and labels:describe() or type(labels))
   check.arg(type(num_classes) == 'number' and num_classes >= 1 and num_classes % 1 == 0, 'nr.nn.check_class_ids',
      'num_classes must be a positive integer, got %s', tostring(num_classes))
   check.status(C.nr_check_class_ids(labels.c, num_classes), 'nr.nn.check_class_ids')
end

return {CrossEntropyLoss = CrossEntropyLoss, check_class_ids = check_class_ids}

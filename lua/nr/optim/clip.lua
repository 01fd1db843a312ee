-- nr.optim.clip_grad_norm — gradient clipping by the norm of all gradients together, PyTorch's
-- torch.nn.utils.clip_grad_norm_ (nr_clip_grad_norm, core/optim.c; one pass on CUDA that reads
-- nothing back).
--
--   local total = nr.optim.clip_grad_norm(model, 1.0)          -- a module's gradients
--   nr.optim.clip_grad_norm(opt, 1.0, {norm_type = math.huge})  -- an optimizer's (largest |g|)
--   nr.optim.clip_grad_norm({g1, g2}, 5)                        -- gradient tensors (or one)
--
-- Returns the norm before clipping as a one-element tensor on the gradients' device (:item()
-- reads it, which waits for the GPU). Every gradient is scaled in place by
-- min(1, max_norm / (total + 1e-6)). opts: norm_type (2 or math.huge), out (a one-element f32
-- tensor on that device to write the total into: no allocation per call). The 2-norm is summed
-- in double: totals past ~1.8e19, whose squares overflow PyTorch 1.13's float sum to inf (and
-- its gradients to 0), are exact here; otherwise the two agree to float rounding.
local T = require 'nr.tensor'
local check = require 'nr.check'
local nrffi = require 'nr.ffi'
local C, ffi = nrffi.C, nrffi.ffi

local FN = 'nr.optim.clip_grad_norm'

-- (errors without a position: the exported function raises them at its caller's line)
local function fail(fmt, ...) error(FN .. ': ' .. string.format(fmt, ...), 0) end

-- The distinct gradient tensors of target (a module, an optimizer or a list of tensors), and
-- what each is called in an error (the user's index in a list; a module's parameter name).
local function gradients(target)
   local list, names = {}, {}
   if type(target) == 'table' and type(target.parameters) == 'function' and type(target.forward) == 'function' then
      local _, grads = target:parameters()
      for _, g in ipairs(grads) do list[#list + 1] = g end
      names = function(g) -- (looked up only for an error)
         for _, e in ipairs(target:namedParameters()) do
            if e.grad == g then return 'the gradient of parameter ' .. e.name end
         end
         return 'a gradient of the module'
      end
   elseif type(target) == 'table' and type(target.each_stepped) == 'function' then
      for _, grp in ipairs(target.groups) do target:each_stepped(grp, function(_, g) list[#list + 1] = g end) end
      names = function(g)
         for i, h in ipairs(list) do if h == g then return "the optimizer's gradient " .. i end end
      end
   elseif T.is_tensor(target) then -- one gradient tensor (PyTorch takes one too)
      list[1] = target
      names = function() return 'the gradient' end
   elseif type(target) == 'table' and not getmetatable(target) then
      -- a list: every key 1..n (ipairs would stop at a hole, and a table keyed by names would
      -- clip nothing, both without a word)
      local n = 0
      for k in pairs(target) do
         if type(k) ~= 'number' or k < 1 or k % 1 ~= 0 then
            fail('grads must be a list of tensors, got a table with the key %s', check.show(k))
         end
         n = math.max(n, k)
      end
      for i = 1, n do
         if not T.is_tensor(target[i]) then fail('grads[%d] must be a tensor, got %s', i, check.show(target[i])) end
         if rawget(target[i], 'c') == nil then fail('grads[%d] is a freed tensor', i) end
         list[i] = target[i]
         names[target[i]] = names[target[i]] or string.format('grads[%d]', i)
      end
      local tbl = names
      names = function(g) return tbl[g] end
   else
      fail('expected a module, an optimizer, a gradient tensor or a list of them, got %s', check.show(target))
   end
   local seen, out = {}, {}
   for _, g in ipairs(list) do -- (a tensor shared by two layers is one gradient, scaled once)
      if not seen[g] then
         seen[g] = true
         out[#out + 1] = g
      end
   end
   -- what the C call checks too, said here with the user's name for the tensor (a module's
   -- gradient field set to a number, or a freed tensor, failed inside this file)
   for _, g in ipairs(out) do
      if not T.is_tensor(g) or rawget(g, 'c') == nil then
         fail('%s is %s, not a live tensor', names(g), T.is_tensor(g) and 'a freed tensor' or check.show(g))
      end
   end
   for _, g in ipairs(out) do
      if g:dtype() ~= 'float32' or not g:is_contiguous() or g:device() ~= out[1]:device() then
         fail('%s must be a contiguous float32 tensor on %s, like the first, got %s', names(g), out[1]:device(),
            g:describe())
      end
   end
   return out
end

local OPTS = {norm_type = true, out = true}

local function clip(target, max_norm, opts)
   opts = opts or {}
   if type(opts) ~= 'table' then fail('options must be a table, got %s', check.show(opts)) end
   for k in pairs(opts) do
      if not OPTS[k] then fail('unknown option %s (allowed: norm_type, out)', check.show(k)) end
   end
   if not (type(max_norm) == 'number' and max_norm > 0) then fail('max_norm must be a number > 0, got %s', check.show(max_norm)) end
   local norm_type = opts.norm_type or 2
   if not (norm_type == 2 or norm_type == math.huge) then
      fail('norm_type must be 2 or math.huge (the largest |g|), got %s', check.show(norm_type))
   end
   local grads = gradients(target)
   local total = opts.out
   if total == nil then
      total = T.zeros({1}, {device = grads[1] and grads[1]:device() or 'cpu'})
   elseif not (T.is_tensor(total) and total:numel() == 1) then
      fail('out must be a one-element tensor, got %s', check.show(total))
   end
   local arr = ffi.new('nr_tensor *[?]', math.max(#grads, 1))
   for i, g in ipairs(grads) do arr[i - 1] = g.c end
   if C.nr_clip_grad_norm(arr, #grads, total.c, max_norm, norm_type == 2 and 2 or 0) ~= 0 then
      fail('%s', ffi.string(C.nr_last_error()))
   end
   return total
end

return function(target, max_norm, opts)
   local ok, res = pcall(clip, target, max_norm, opts)
   if not ok then error(res, 2) end
   return res
end

-- nr.nn.layer_util — helpers shared by the layer files (conv, batchnorm, pool, linear, ...):
-- option parsing ({h, w} pairs), input checks with readable messages, buffer reuse, and the
-- default initialisation. Not a layer file: it is not listed in nr.nn's FILES.
-- Invariants: buffers are reallocated only when the wanted shape, dtype or device changes, so a
-- model run repeatedly on the same shapes allocates nothing; init draws from the global RNG.
local nrffi = require 'nr.ffi'
local T = require 'nr.tensor'
local check = require 'nr.check'
local C = nrffi.C

local U = {}

function U.shape_str(s)
   if type(s) ~= 'table' then return check.show(s) end -- a message about a wrong argument
   return '[' .. table.concat(s, ' x ') .. ']'
end

-- A per-sample shape as outputShape and tree take it: a non-empty table of integers >= 0.
function U.check_shape(s, fname)
   local ok, shown = type(s) == 'table' and #s > 0, {}
   for i, v in ipairs(type(s) == 'table' and s or {}) do
      ok = ok and type(v) == 'number' and v >= 0 and v == math.floor(v)
      shown[i] = check.show(v)
   end
   if not ok then
      error(string.format('%s: the input shape must be a table of integers >= 0 (one sample, e.g. {3, 32, 32}), got %s',
                          fname, type(s) == 'table' and '{' .. table.concat(shown, ', ') .. '}' or check.show(s)), 3)
   end
end

-- number or {h, w} -> h, w (integers >= min that C takes as int32: a stride of 2^32 + 1 or inf was
-- wrapped at the FFI and reported as stride -2147483648). Errors name the element: stride[2], and
-- the line that called the layer's constructor: depth counts the helper frames between that
-- constructor and this call (0 when the constructor calls U.pair itself).
function U.pair(v, name, fname, min, depth)
   local level = 4 + (depth or 0)
   if type(v) == 'number' then
      check.int32(v, fname, name, min, nil, level)
      return v, v
   elseif type(v) == 'table' and #v == 2 then
      check.int32(v[1], fname, name .. '[1]', min, nil, level)
      check.int32(v[2], fname, name .. '[2]', min, nil, level)
      return v[1], v[2]
   end
   error(string.format('%s: %s must be a number or a {h, w} pair, got %s', fname, name, check.show(v)), level)
end

-- A size or count given to C as an int32, >= min (default 1).
function U.posint(v, name, fname, min)
   check.int32(v, fname, name, min or 1, nil, 4) -- not a tail call: the level counts this frame
   return v
end

-- Activation dtypes: float32, and bfloat16 for mixed precision (its kernels run on CUDA; the C
-- checks say so for a CPU bf16 tensor). Parameters, their gradients and BN statistics stay float32.
local ACT_DTYPES = {float32 = true, bfloat16 = true}
U.ACT_DTYPES = ACT_DTYPES

-- Whether activation t is channels-last on CUDA, where the layers compute in that layout and
-- give their outputs the same (on the CPU they read a channels-last input through one
-- conversion to contiguous).
local function cuda_channels_last(t) return t:is_cuda() and t:memory_format() == 'channels_last' end
U.cuda_channels_last = cuda_channels_last

-- x as the layer kernels take it (contiguous, or channels-last on CUDA), after raising (level 0)
-- unless x is a float32 or bfloat16 tensor.
function U.float_input(x, what)
   if not T.is_tensor(x) then
      error(string.format('expected %s tensor as input, got %s', what or 'a', type(x)), 0)
   end
   if not ACT_DTYPES[x:dtype()] then
      error(string.format('expected a float32 (or bfloat16) input, got %s', x:describe()), 0)
   end
   if cuda_channels_last(x) then return x:contiguous('channels_last') end
   return x:contiguous()
end

-- Raises (level 0: Module:forward adds the module's path) unless x is a float32/bfloat16 tensor
-- with ndim dimensions and, when channels is given, channels in dimension 2.
function U.input(x, ndim, channels, what)
   x = U.float_input(x, what)
   if x:dim() ~= ndim then
      error(string.format('expected a %d-d input%s, got %s', ndim, what and (' ' .. what) or '', U.shape_str(x:shape())), 0)
   end
   if channels and x:size(2) ~= channels then
      error(string.format('expected input with %d channels, got %s', channels, U.shape_str(x:shape())), 0)
   end
   return x
end

-- Checks that g (gradOutput) matches the module's output shape; returns it in the output's
-- memory format (the layer kernels take one format per call).
function U.grad(g, like, what)
   if not T.is_tensor(g) then error('gradOutput must be a tensor, got ' .. type(g), 0) end
   if not like then error('backward called before forward', 0) end
   if not T.same_shape(g:shape(), like:shape()) then
      error(string.format('gradOutput %s does not match the %s %s', U.shape_str(g:shape()), what or 'output',
         U.shape_str(like:shape())), 0)
   end
   if cuda_channels_last(like) then return g:contiguous('channels_last') end
   return g:contiguous()
end

-- The memory format of a buffer of `shape` computed from like: channels_last when like is
-- channels-last on CUDA and the buffer is 4-d, else contiguous.
function U.format_for(shape, like)
   return #shape == 4 and cuda_channels_last(like) and 'channels_last' or 'contiguous'
end

-- Whether buffer t is laid out in fmt ('contiguous' or 'channels_last', as U.format_for gives).
function U.has_format(t, fmt)
   if fmt == 'channels_last' then return t:memory_format() == 'channels_last' end
   return t:is_contiguous()
end

-- self[key] as a tensor of the given shape on like's device (dtype default float32) in
-- U.format_for(shape, like); reused while shape, dtype, device and format match. like is the input
-- the buffer is computed from: when it is (a view of) the buffer itself, as for a module applied
-- to its own output (m:forward(m:forward(x)), PyTorch's loops over one layer), the kernel would
-- read what it writes, so a second buffer (self['_spare_' .. key]) takes over and the two
-- alternate from then on.
function U.buffer(self, key, shape, like, dtype)
   dtype = dtype or 'float32'
   local dev, fmt = like:device(), U.format_for(shape, like)
   local function fits(b)
      return b and rawget(b, 'c') and b:dtype() == dtype and b:device() == dev and T.same_shape(b:shape(), shape)
         and U.has_format(b, fmt)
   end
   local b = rawget(self, key)
   if fits(b) then
      if not b:same_storage(like) then return b end
      local spare_key = '_spare_' .. key
      local s = rawget(self, spare_key)
      self[spare_key] = b
      if fits(s) and not s:same_storage(like) then
         self[key] = s
         return s
      end
   end
   b = T.empty(shape, {dtype = dtype, device = dev, memory_format = fmt})
   self[key] = b
   return b
end

-- self[key] as an activation buffer of `shape` with like's dtype (float32 or bfloat16) and device.
function U.act_buffer(self, key, shape, like) return U.buffer(self, key, shape, like, like:dtype()) end

-- The module's gradInput (N-d, like's dtype and device): a block of the model's gradient pool during
-- a root backward (nr.nn.gradpool), else a buffer of its own.
function U.grad_buffer(self, shape, like) return require('nr.nn.gradpool').buffer(self, shape, like) end

-- Fills t with U(-bound, bound) from the global generator.
function U.uniform_(t, bound)
   check.status(C.nr_rng_uniform(t.c, -bound, bound), 'init', 3)
   return t
end

-- PyTorch's default for Conv2d/Linear: kaiming_uniform(a = sqrt(5)) on the weight, which is
-- U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
function U.default_init(weight, bias, fan_in)
   local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
   U.uniform_(weight, bound)
   if bias then U.uniform_(bias, bound) end
end

-- The output size (ho, wo) of a convolution module (kernel_size, stride, padding, dilation as
-- {h, w}) on an h x w input; an error when the input is too small.
function U.conv_out_hw(self, h, w)
   local k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
   local ho = math.floor((h + 2 * p[1] - d[1] * (k[1] - 1) - 1) / s[1]) + 1
   local wo = math.floor((w + 2 * p[2] - d[2] * (k[2] - 1) - 1) / s[2]) + 1
   if ho < 1 or wo < 1 then
      error(string.format('input %dx%d is too small for kernel %dx%d (stride %dx%d, padding %dx%d, dilation %dx%d)',
         h, w, k[1], k[2], s[1], s[2], p[1], p[2], d[1], d[2]), 0)
   end
   return ho, wo
end

-- outputShape of a convolution module (Conv2d, NRConv2d): (in_channels, H, W) -> (out_channels, Ho, Wo).
function U.conv_output_shape(self, s)
   if type(s) ~= 'table' or #s ~= 3 or s[1] ~= self.in_channels then
      error(string.format('expected a (%d, H, W) input, got %s', self.in_channels, U.shape_str(s)), 0)
   end
   local ho, wo = U.conv_out_hw(self, s[2], s[3])
   return {self.out_channels, ho, wo}
end

-- Whether two per-sample shapes can be concatenated on channels (Concat): the same rank and the
-- same sizes past the first.
function U.concatenable(a, b)
   if #a ~= #b then return false end
   for d = 2, #a do if a[d] ~= b[d] then return false end end
   return true
end

-- The C handle of a module's tensor field (what names it: 'weight', 'bias', ...): an error
-- (level 0: Module adds the path) when it is freed or not a tensor; nil when optional and absent.
-- (A freed optional bias passed NULL, which C takes for "no bias": the output silently lost it.)
function U.tensor_c(t, what, optional)
   if t == nil and optional then return nil end
   if not T.is_tensor(t) then error(string.format('%s must be a tensor, got %s', what, check.show(t)), 0) end
   local c = rawget(t, 'c')
   if not c then error(what .. ': use of a freed tensor', 0) end
   return c
end

-- Raises the C message of a failed call (Module:forward adds the module's path).
function U.call(status)
   if status ~= 0 then error(require('nr.ffi').ffi.string(C.nr_last_error()), 0) end
end

-- (depth as U.pair's)
function U.opt_bool(v, name, fname, default, depth)
   if v == nil then return default end
   if type(v) ~= 'boolean' then
      error(string.format('%s: %s must be a boolean, got %s', fname, name, tostring(v)), 4 + (depth or 0))
   end
   return v
end

function U.opt_num(v, name, fname, default, lo, hi, lo_open)
   if v == nil then v = default end
   if type(v) ~= 'number' or v ~= v or v < lo or v > hi or (lo_open and v == lo) then
      error(string.format('%s: %s must be a number in %s%g, %g], got %s', fname, name, lo_open and '(' or '[', lo, hi,
         tostring(v)), 4)
   end
   return v
end

return U

-- bfloat16, the activation dtype of mixed precision: what works on every machine (conversions,
-- element access, safetensors) and the errors that say bf16 computes on CUDA only. The GPU side
-- (every layer in bf16 against its f32 CPU twin, a bf16 training run) is in cuda_spec.lua.
-- Reference for rounding: PyTorch's own float32 -> bfloat16 conversion (round to nearest even),
-- when /usr/bin/python3 has torch; hand-picked values with known results otherwise too.
local nr = require 'nr'
local st = require 'nr.safetensors'

local TMP = os.getenv('TMPDIR') or '/tmp'
TMP = TMP .. '/nr_bf16_spec_' .. tostring(os.time()) .. '_' .. tostring(math.random(1e6))
os.execute('mkdir -p ' .. TMP)

local function err_of(f, ...)
   local ok, e = pcall(f, ...)
   assert.is_false(ok, 'expected an error')
   return tostring(e)
end

-- The f32 value of each element after a round trip through bfloat16.
local function through_bf16(values)
   return nr.tensor(values):bfloat16():float():totable()
end

describe('bfloat16 tensors', function()
   it('round to nearest even, keep signed zeros, infinities and NaN', function()
      local u = 2 ^ -8 -- half a bf16 ulp at 1.0 (bf16 keeps 7 fraction bits)
      local got = through_bf16({1.0, 1 + u, 1 + 3 * u, 1 + u + 2 ^ -20, -(1 + 3 * u), 65536 + 255, 3.4028234663852886e38,
                                -0.0, math.huge, -math.huge, 1e-40, 65536 + 257})
      assert.equal(1.0, got[1])
      assert.equal(1.0, got[2])                   -- tie between 1 (even) and 1+2u (odd)
      assert.equal(1 + 4 * u, got[3])             -- tie between 1+2u (odd) and 1+4u (even)
      assert.equal(1 + 2 * u, got[4])             -- just above the tie rounds up
      assert.equal(-(1 + 4 * u), got[5])
      assert.equal(65536, got[6])                 -- ulp 512 at 2^16: 255 below half rounds down
      assert.equal(65536 + 512, got[12])          -- 257 above half rounds up
      assert.equal(math.huge, got[7])             -- FLT_MAX overflows to inf, as PyTorch
      assert.equal(0, got[8]); assert.equal(-math.huge, 1 / got[8])
      assert.equal(math.huge, got[9]); assert.equal(-math.huge, got[10])
      assert.equal(2 ^ -133, got[11])             -- a subnormal stays one (top 7 of its bits kept)
      local nan = through_bf16({0 / 0})[1]
      assert.is_true(nan ~= nan)
   end)

   it('match PyTorch bit for bit on 20000 random values of every magnitude', function()
      local ok = os.execute('/usr/bin/python3 -c "import torch" >/dev/null 2>&1')
      if ok ~= 0 and ok ~= true then pending('no /usr/bin/python3 with torch'); return end
      nr.manual_seed(11)
      -- normal draws scaled by 2^k for k in -30..30: rounding at every exponent
      local x = nr.randn({20000})
      local scale = nr.randint(-30, 31, {20000}):float()
      local px, ps = x:data(), scale:data()
      for i = 0, 19999 do px[i] = px[i] * 2 ^ ps[i] end
      x:save(TMP .. '/x.npy')
      local script = TMP .. '/bf16.py'
      local f = assert(io.open(script, 'w'))
      f:write([[
import sys, numpy, torch
x = torch.from_numpy(numpy.load(sys.argv[1]))
numpy.save(sys.argv[2], x.to(torch.bfloat16).to(torch.float32).numpy())
]])
      f:close()
      local rc = os.execute(string.format('/usr/bin/python3 %s %s/x.npy %s/want.npy', script, TMP, TMP))
      assert.is_true(rc == 0 or rc == true, 'the PyTorch reference script failed')
      local want = nr.load(TMP .. '/want.npy')
      local got = x:bfloat16():float()
      local pg, pw = got:data(), want:data()
      local bad = 0
      for i = 0, 19999 do if pg[i] ~= pw[i] then bad = bad + 1 end end
      assert.equal(0, bad, 'elements whose bf16 rounding differs from PyTorch')
   end)

   it('convert in copies (strided too), fill, get and set', function()
      local a = nr.tensor({{1.5, -2.25, 3}, {4, 5.0078125, 6}})
      local b = a:t():bfloat16() -- a strided source
      assert.equal('bfloat16', b:dtype())
      assert.same({{1.5, 4}, {-2.25, 5}, {3, 6}}, b:totable()) -- 5.0078125 rounds to 5 (ulp 1/32)
      b:set(1, 0.1)
      assert.near(0.1, b:get(1), 0.1 * 2 ^ -8)
      assert.is_true(b:get(1) ~= 0.1) -- stored in bf16, not f32
      b:fill(7.1)
      assert.same({7.09375, 7.09375}, {b:get(1), b:get(6)})
      local c = nr.empty({3, 2}, {dtype = 'bf16'})
      c:copy(a:t())
      assert.same(b:fill(0):copy(a:t()):totable(), c:totable())
      assert.matches('bf16 cpu', tostring(c))
      assert.equal(0x3FC0, c:data()[0]) -- raw bf16 words: 1.5 is 0x3FC0 (the top half of f32 0x3FC00000)
   end)

   it('random draws: the f32 draws rounded, so seeds reproduce across dtypes', function()
      for _, draw in ipairs({function(o) return nr.randn({300}, o) end, function(o) return nr.rand({300}, o) end}) do
         nr.manual_seed(4)
         local f = draw()
         nr.manual_seed(4)
         local b = draw({dtype = 'bfloat16'})
         assert.equal('bfloat16', b:dtype())
         assert.same(f:bfloat16():totable(), b:totable())
      end
   end)

   it('argmax reads a bf16 tensor as f32 (the same positions)', function()
      local t = nr.tensor({{0.5, 3, -1}, {7, 2, 2.5}})
      assert.equal(t:argmax(), t:bfloat16():argmax())
      assert.same(t:argmax(2):totable(), t:bfloat16():argmax(2):totable())
   end)

   it('round trip through safetensors as BF16 (PyTorch reads it too)', function()
      local a = nr.tensor({{1, -2}, {0.5, 3}}):bfloat16()
      local path = TMP .. '/bf.safetensors'
      st.save(path, {a = a})
      local back = st.load(path)
      assert.equal('bfloat16', back.a:dtype())
      assert.same(a:totable(), back.a:totable())
   end)

   it('refuse to compute on the CPU, naming the tensor and the fix', function()
      local x = nr.randn({2, 3, 4, 4}):bfloat16()
      local e = err_of(function() return x:add(x) end)
      assert.matches('bf16 tensors compute on CUDA only', e)
      assert.matches(':float%(%)', e)
      local conv = nr.nn.Conv2d(3, 4, 3)
      e = err_of(conv.forward, conv, x)
      assert.matches('x: bf16 tensors compute on CUDA only', e)
      local relu = nr.nn.ReLU()
      assert.matches('bf16 tensors compute on CUDA only', err_of(relu.forward, relu, x))
      e = err_of(function() return nr.randn({3}):add(nr.randn({3}):bfloat16()) end)
      assert.matches('b: bf16 tensors compute on CUDA only', e)
      assert.matches('no bfloat16', err_of(function() x:save(TMP .. '/x16.npy') end))
   end)

   it('precision = "bf16" in nr.train needs CUDA and says so', function()
      local nn = nr.nn
      local train = require 'nr.train'
      local x, y = nr.randn({8, 1, 2, 2}), nr.tensor({0, 1, 0, 1, 0, 1, 0, 1}, {dtype = 'int64'})
      local function recipe(precision, out, memory_format)
         return {model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), device = 'cpu', precision = precision, epochs = 1,
                 data = {train = train.memory_loader(x, y, {batch = 4})}, out = out, memory_format = memory_format,
                 progress = {stream = io.open('/dev/null', 'w')}}
      end
      local e = err_of(nr.train, recipe('bf16', TMP .. '/run'))
      assert.matches('precision = "bf16" computes on CUDA only, but the device is cpu', e, 1, true)
      e = err_of(nr.train, recipe('fp16', TMP .. '/run2'))
      assert.matches('precision must be "fp32" or "bf16", got "fp16"', e, 1, true)
      -- its companion, the channels-last layout (the default under bf16), is a CUDA layout too
      e = err_of(nr.train, recipe('fp32', TMP .. '/run3', 'channels_last'))
      assert.matches('memory_format = "channels_last" is a CUDA layout, but the device is cpu', e, 1, true)
      e = err_of(nr.train, recipe('fp32', TMP .. '/run4', 'nhwc'))
      assert.matches('memory_format must be "contiguous" or "channels_last", got "nhwc"', e, 1, true)
   end)
end)

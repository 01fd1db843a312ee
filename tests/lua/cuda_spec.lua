-- cuda_spec — every CUDA kernel against its CPU reference: tensor ops, copies, RNG, layer kernels,
-- SGD and the NR primitives (liveliness masks, L1 step, cross attention, surgery placement),
-- called through the C API (so the spec does not depend on the Lua layer modules).
--
-- Tolerance (fp32): |gpu - cpu| <= 1e-4 * max(|cpu|, 1e-2 * max|cpu|, 1e-6) elementwise, i.e.
-- 1e-4 relative, measured against the reference's own scale for values near zero; integer results
-- (indices, masks, argmax, live counts) must match exactly. The first differing values are printed.
-- Layer kernels also run with bf16 activations (mixed precision) against the f32 CPU reference on
-- bf16-rounded inputs, within 1.5e-2 (RTOL16, below); a bf16 training run must learn like fp32.
-- Both precisions run again with channels-last (NHWC) GPU activations against the same NCHW CPU
-- reference and tolerances.
-- Without a GPU (or in a build without CUDA) the spec prints why and exits with status 77, which
-- ctest reports as skipped. Runs under busted or under tests/gpu/spec_runner.lua (the GPU machine
-- has no busted), so it uses only describe / it and plain error().
local nr = require 'nr'
local nrffi = require 'nr.ffi'
local C, ffi = nrffi.C, nrffi.ffi

if not nr.cuda.available() then
   print('cuda_spec: skipped: no usable GPU (' .. tostring(nr.cuda.unavailable_reason()) .. ')')
   os.exit(77)
end

local RTOL = 1e-4

local function ok(status, what)
   if status ~= 0 then error(what .. ': ' .. ffi.string(C.nr_last_error()), 2) end
end

-- Compares a GPU result with the CPU reference (both nr.Tensor, same shape).
local function close(what, cpu, gpu, rtol)
   rtol = rtol or RTOL
   local exact = cpu:dtype() ~= 'float32' and cpu:dtype() ~= 'bfloat16'
   local function host(t) return exact and t:contiguous():cpu() or t:contiguous():to('cpu', 'float32') end
   local a, b = host(cpu), host(gpu)
   assert(a:numel() == b:numel(), what .. ': element counts differ')
   local n = a:numel()
   local pa, pb = a:data(), b:data()
   local maxabs = 0
   for i = 0, n - 1 do
      local v = math.abs(tonumber(pa[i]) or 0)
      if v > maxabs and v < math.huge then maxabs = v end -- (the finite scale: an inf would pass anything)
   end
   local bad, shown = 0, {}
   for i = 0, n - 1 do
      local x, y = tonumber(pa[i]), tonumber(pb[i])
      -- LuaJIT reads a float NaN with the sign bit and a payload (garbage memory) as nil
      if x == nil then x = 0 / 0 end
      if y == nil then y = 0 / 0 end
      local okv
      if exact then okv = x == y
      elseif x ~= x then okv = y ~= y
      else okv = x == y or math.abs(x - y) <= rtol * math.max(math.abs(x), 1e-2 * maxabs, 1e-6) end -- (x == y: infinities)
      if not okv then
         bad = bad + 1
         if #shown < 5 then shown[#shown + 1] = string.format('[%d] cpu %.9g gpu %.9g', i, x, y) end
      end
   end
   if bad > 0 then
      error(string.format('%s: %d of %d elements differ (tolerance %g relative): %s', what, bad, n, rtol,
                          table.concat(shown, ', ')), 2)
   end
end

local function randn(shape) return nr.randn(shape) end
local function twin(t) return t, t:cuda() end
local function pair(shape, dtype)
   return nr.zeros(shape, {dtype = dtype}), nr.zeros(shape, {dtype = dtype, device = 'cuda'})
end

describe('nr.cuda runtime', function()
   it('reports devices and memory', function()
      assert(nr.cuda.device_count() >= 1)
      assert(type(nr.cuda.device_name(0)) == 'string')
      local m = nr.cuda.memory()
      assert(m.total and m.total > 0 and m.cached >= 0)
      nr.cuda.synchronize()
   end)

   it('reports memory per GPU (nr.cuda.memory(i)) and summed over GPUs (nr.memory().cuda)', function()
      local n, MiB4 = nr.cuda.device_count(), 4 * 1024 * 1024
      local last = n - 1 -- a GPU other than the current one where there are two
      local before = {}
      for i = 0, last do before[i] = nr.cuda.memory(i) end
      local total = nr.memory().cuda.in_use
      local t = nr.empty({1024, 1024}, {device = 'cuda:' .. last})
      for i = 0, last do
         local m = nr.cuda.memory(i)
         assert(m.in_use - before[i].in_use == (i == last and MiB4 or 0),
            string.format('cuda:%d in_use grew by %d after a 4 MiB tensor on cuda:%d', i, m.in_use - before[i].in_use, last))
         assert(m.allocations - before[i].allocations == (i == last and 1 or 0), 'allocations of cuda:' .. i)
         assert(m.peak >= m.in_use and m.total > 0)
      end
      assert(nr.memory().cuda.in_use - total == MiB4, 'nr.memory().cuda sums the GPUs')
      t:free()
      assert(nr.cuda.memory(last).in_use == before[last].in_use)
      assert(nr.cuda.memory(last).peak >= before[last].in_use + MiB4)
      nr.cuda.reset_peak_memory(last)
      assert(nr.cuda.memory(last).peak == before[last].in_use, 'reset_peak_memory starts the peak from in_use')
      assert(nr.cuda.memory().in_use == nr.cuda.memory(nr.cuda.current_device()).in_use, 'default: the current GPU')
      local okm, errm = pcall(nr.cuda.memory, n)
      assert(not okm and tostring(errm):find('no device cuda:' .. n, 1, true), tostring(errm))
      okm, errm = pcall(nr.cuda.memory, 'x')
      assert(not okm and tostring(errm):find('nr.cuda.memory', 1, true), tostring(errm))
   end)

   it('caches freed blocks, empties the cache, and reports out-of-memory with sizes', function()
      local t = nr.empty({1024, 1024}, {device = 'cuda'})
      t:free()
      assert(nr.cuda.memory().cached >= 4 * 1024 * 1024, 'a freed 4 MiB block should stay cached')
      nr.cuda.empty_cache()
      assert(nr.cuda.memory().cached == 0)
      local okk, err = pcall(nr.empty, {400 * 1024 * 1024 * 1024 / 4}, {device = 'cuda'}) -- 400 GiB
      assert(not okk, 'a 400 GiB tensor was allocated?')
      assert(tostring(err):find('out of GPU memory') and tostring(err):find('allocating'), tostring(err))
      local again = nr.zeros({8}, {device = 'cuda'}) -- the device is usable after the failure
      assert(again:sum() == 0)
   end)

   it('prefetches on the copy stream: values arrive, tickets order, a freed destination is safe', function()
      local ticket = ffi.new('int64_t[1]')
      local hosts, devs, tickets = {}, {}, {}
      for k = 1, 10 do -- more than the 8 ticket slots, so slots are retired and reused
         hosts[k] = randn({64, 3, 16, 16})
         devs[k] = nr.empty({64, 3, 16, 16}, {device = 'cuda'})
         ok(C.nr_cuda_prefetch(devs[k].c, hosts[k].c, ticket), 'prefetch ' .. k)
         tickets[k] = tonumber(ticket[0])
         assert(k == 1 or tickets[k] == tickets[k - 1] + 1, 'tickets count up')
      end
      ok(C.nr_cuda_prefetch_wait(0, tickets[10]), 'wait')
      for k = 1, 10 do close('prefetched batch ' .. k, hosts[k], devs[k]) end
      -- the host source may change as soon as the call returns (its bytes were staged)
      local h, d = randn({1000}), nr.empty({1000}, {device = 'cuda'})
      local want = h:clone()
      ok(C.nr_cuda_prefetch(d.c, h.c, ticket), 'prefetch')
      h:fill(0)
      ok(C.nr_cuda_prefetch_wait(0, ticket[0]), 'wait')
      close('source overwritten after the call', want, d)
      -- a destination freed before its wait: the block is handed out again only after the copy
      local big = randn({4194304})
      local dst = nr.empty({4194304}, {device = 'cuda'})
      ok(C.nr_cuda_prefetch(dst.c, big.c, ticket), 'prefetch into a tensor freed next')
      dst:free()
      local again = nr.zeros({4194304}, {device = 'cuda'}) -- likely the same cached block
      assert(again:sum() == 0, 'the pending copy landed in a reallocated block')
      -- errors
      assert(C.nr_cuda_prefetch_wait(0, ticket[0] + 5) ~= 0, 'a future ticket was accepted')
      assert(ffi.string(C.nr_last_error()):find('no prefetch ticket', 1, true))
      assert(C.nr_cuda_prefetch(nr.empty({4}, {device = 'cuda'}).c, nr.empty({4}, {dtype = 'int64'}).c, ticket) ~= 0)
      assert(C.nr_cuda_prefetch(nr.empty({4}, {device = 'cuda'}).c, nr.empty({5}).c, ticket) ~= 0)
      nr.cuda.synchronize()
   end)

   it('the profiler in sync mode times each layer with its kernels', function()
      local prof = require 'nr.profile'
      local net = nr.nn.Sequential{nr.nn.Conv2d(3, 8, 3, {padding = 1}), nr.nn.ReLU()}:to('cuda')
      local x = randn({4, 3, 32, 32}):cuda()
      net:forward(x) -- first call: cuDNN's search, not timed
      prof.reset(); prof.enable({sync = true})
      assert(prof.syncs(), 'sync mode should be on with a GPU')
      for _ = 1, 3 do net:forward(x) end
      prof.disable()
      local conv
      for _, l in ipairs(prof.data().layers) do if l.type == 'Conv2d' then conv = l end end
      assert(conv and conv.nf == 3 and conv.fwd > 0, 'the conv was timed')
   end)

   it('places tensors on a named GPU and keeps them there (cuda:N)', function()
      local a = nr.randn({3, 4}, {device = 'cuda:0'})
      assert(a:device() == 'cuda:0' and a:device_index() == 0, a:device())
      assert(a:to('cuda') == a and a:to('cuda:0') == a, 'to() of the same GPU is the tensor itself')
      assert(a:clone():device() == 'cuda:0' and a:to('cuda', 'bfloat16'):device() == 'cuda:0')
      if nr.cuda.device_count() >= 2 then
         local b = a:to('cuda:1')
         assert(b:device() == 'cuda:1' and nr.cuda.current_device() == 0, 'placement must not change the current GPU')
         assert(b:clone():device() == 'cuda:1' and b:add(b):device() == 'cuda:1')
         assert(b:to('cuda'):device() == 'cuda:0', "to('cuda') is the current GPU, as PyTorch")
         close('copy to cuda:1 and back', a, b:to('cuda:0'))
      end
      local okd, err = pcall(nr.empty, {2}, {device = 'cuda:' .. nr.cuda.device_count()})
      assert(not okd and tostring(err):find('cuda:' .. nr.cuda.device_count(), 1, true), tostring(err))
   end)

   it('copies between host and device, strided and converting', function()
      local h = randn({5, 7})
      local d = h:cuda()
      close('h2d/d2h', h, d)
      close('d2d transpose', h:t():contiguous(), d:t():contiguous())
      close('strided d2h', h:t(), d:t())
      local dn = nr.zeros({7, 5}, {device = 'cuda'})
      dn:copy(h:t())
      close('strided h2d', h:t():contiguous(), dn)
      local u = nr.randint(0, 255, {4, 6}, {dtype = 'uint8'})
      close('u8 -> f32 on the device', u:to('cpu', 'float32'), u:cuda():to('cuda', 'float32'))
      local l = nr.randint(-50, 50, {9}, {dtype = 'int64'})
      close('int64 round trip', l, l:cuda())
      close('narrow view', h:narrow(2, 2, 3), d:narrow(2, 2, 3))
      local g = d:clone()
      g:set(3, 42)
      assert(g:get(3) == 42 and g:cpu():get(3) == 42)
      local big = nr.randn({3, 1000, 1000})
      close('large copy (staged in chunks)', big, big:cuda())
      -- conversions as the CPU's: int64 -> float32 rounded once, int64 -> uint8 wrapped, NaN and
      -- out-of-range floats -> int64 give INT64_MIN
      local li = nr.empty({3}, {dtype = 'int64'})
      local lp = li:data()
      lp[0], lp[1], lp[2] = 0x1000001000000001LL, 0x10000000005LL, -1LL
      local ld = li:cuda()
      close('int64 -> f32 on the device', li:to('cpu', 'float32'), ld:to('cuda', 'float32'), 0)
      close('int64 -> u8 on the device', li:to('cpu', 'uint8'), ld:to('cuda', 'uint8'), 0)
      local fl = nr.tensor({0 / 0, 1e30, -2.5, 300})
      close('f32 -> int64 on the device', fl:to('cpu', 'int64'), fl:cuda():to('cuda', 'int64'), 0)
      close('f32 -> u8 on the device', fl:narrow(1, 3, 2):to('cpu', 'uint8'), fl:narrow(1, 3, 2):cuda():to('cuda', 'uint8'), 0)
      -- copy() from the host into a device tensor of another dtype: uploaded to a temporary block,
      -- converted there (the emulator poisons a freed block in stream order: freeing it before
      -- the conversion ran reads NaN)
      local into = nr.empty({3}, {device = 'cuda'})
      into:copy(li)
      close('copy int64 host -> f32 device', li:to('cpu', 'float32'), into, 0)
      local into16 = nr.empty({5, 7}, {device = 'cuda', dtype = 'bfloat16'})
      into16:copy(h)
      close('copy f32 host -> bf16 device', h:cuda():bfloat16():float(), into16:float(), 0)
   end)

   it('fills and draws the same random numbers as the CPU', function()
      local a, b = pair({3, 4})
      a:fill(2.5); b:fill(2.5)
      close('fill', a, b)
      local c, d = pair({3, 4}, 'int64')
      c:fill(7); d:fill(7)
      close('fill int64', c, d)
      a:fill(-0.0); b:fill(-0.0)                   -- the sign of zero survives a dense fill
      assert(1 / b:cpu():get(1) == -math.huge, 'fill(-0.0) on the GPU stored +0')
      nr.manual_seed(5)
      local x = nr.randn({100})
      nr.manual_seed(5)
      local y = nr.randn({100}, {device = 'cuda'})
      close('randn', x, y, 0)
   end)
end)

describe('tensor math on the GPU', function()
   it('copy refuses overlapping dense views as the CPU does; disjoint views and a clone work', function()
      local t = nr.tensor({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}):cuda()
      local okc, err = pcall(function() t:narrow(1, 2, 9):copy(t:narrow(1, 1, 9)) end)
      assert(not okc and tostring(err):find('overlap in memory', 1, true), tostring(err))
      t:narrow(1, 2, 9):copy(t:narrow(1, 1, 9):clone())
      t:narrow(1, 1, 5):copy(t:narrow(1, 6, 5))
      local got = t:cpu():totable()
      assert(table.concat(got, ',') == '4,5,6,7,8,4,5,6,7,8', table.concat(got, ','))
   end)

   it('binary ops: same shape, broadcast, one-element b', function()
      local a, b = randn({4, 5}), randn({4, 5})
      local bc, b1 = randn({4, 1}), nr.tensor({{0.75}})
      for op = 0, 5 do
         local oc, og = pair({4, 5})
         ok(C.nr_binary(a.c, b.c, oc.c, op), 'cpu'); ok(C.nr_binary(a:cuda().c, b:cuda().c, og.c, op), 'gpu')
         close('binary ' .. op, oc, og)
         ok(C.nr_binary(a.c, bc.c, oc.c, op), 'cpu'); ok(C.nr_binary(a:cuda().c, bc:cuda().c, og.c, op), 'gpu')
         close('binary broadcast ' .. op, oc, og)
         ok(C.nr_binary(a.c, b1.c, oc.c, op), 'cpu'); ok(C.nr_binary(a:cuda().c, b1:cuda().c, og.c, op), 'gpu')
         close('binary one-element ' .. op, oc, og)
         ok(C.nr_binary_scalar(a.c, -0.3, oc.c, op), 'cpu'); ok(C.nr_binary_scalar(a:cuda().c, -0.3, og.c, op), 'gpu')
         close('binary scalar ' .. op, oc, og)
      end
      local at = a:t()
      local oc, og = pair({5, 4})
      ok(C.nr_binary(at.c, b:t().c, oc.c, 0), 'cpu'); ok(C.nr_binary(a:cuda():t().c, b:cuda():t().c, og.c, 0), 'gpu')
      close('binary strided', oc, og)
      -- PyTorch broadcasting through the Tensor methods: a column + a row (a expanded, stride 0)
      -- and a lower-rank operand, GPU against CPU
      local col, row, vec = randn({4, 1}), randn({1, 5}), randn({5})
      close('broadcast column + row', col:add(row), col:cuda():add(row:cuda()))
      close('broadcast lower rank', a:mul(vec), a:cuda():mul(vec:cuda()))
      close('broadcast lower rank first', vec:sub(a), vec:cuda():sub(a:cuda()))
   end)

   it('unary ops and axpy', function()
      local a = randn({6, 7})
      local pos = a:abs():add(0.1)
      for op = 0, 9 do
         local src = (op == 3 or op == 4) and pos or a
         local oc, og = pair({6, 7})
         ok(C.nr_unary(src.c, oc.c, op), 'cpu'); ok(C.nr_unary(src:cuda().c, og.c, op), 'gpu')
         close('unary ' .. op, oc, og)
      end
      local y, yg = twin(randn({6, 7}))
      ok(C.nr_axpy(a.c, y.c, 0.5), 'cpu'); ok(C.nr_axpy(a:cuda().c, yg.c, 0.5), 'gpu')
      close('axpy', y, yg)
   end)

   it('reductions and argmax over every dim, contiguous or not', function()
      local a = randn({3, 4, 50})
      for _, src in ipairs({a, a:transpose(1, 3)}) do
         local g = src:cuda()
         if not src:is_contiguous() then g = a:cuda():transpose(1, 3) end
         for op = 0, 3 do
            for dim = -1, src:dim() - 1 do
               local shape = src:shape()
               if dim >= 0 then shape[dim + 1] = 1 else shape = {1} end
               local oc, og = pair(shape)
               ok(C.nr_reduce(src.c, dim, oc.c, op), 'cpu'); ok(C.nr_reduce(g.c, dim, og.c, op), 'gpu')
               close(string.format('reduce op %d dim %d', op, dim), oc, og)
               if op == 0 then
                  local ic, ig = pair(shape, 'int64')
                  ok(C.nr_argmax(src.c, dim, ic.c), 'cpu'); ok(C.nr_argmax(g.c, dim, ig.c), 'gpu')
                  close('argmax dim ' .. dim, ic, ig)
               end
            end
         end
      end
   end)

   it('reductions over short rows with many outputs (one thread per output), every op and argmax', function()
      -- a reduced length <= 64 with >= 4096 outputs takes the one-thread-per-output kernel
      local a = randn({5000, 8})
      local g = a:cuda()
      for op = 0, 3 do
         local oc, og = pair({5000, 1})
         ok(C.nr_reduce(a.c, 1, oc.c, op), 'cpu'); ok(C.nr_reduce(g.c, 1, og.c, op), 'gpu')
         close(string.format('short-row reduce op %d', op), oc, og)
      end
      local ic, ig = pair({5000, 1}, 'int64')
      ok(C.nr_argmax(a.c, 1, ic.c), 'cpu'); ok(C.nr_argmax(g.c, 1, ig.c), 'gpu')
      close('short-row argmax', ic, ig)
   end)

   it('matmul with transposes, alpha and beta', function()
      for ta = 0, 1 do
         for tb = 0, 1 do
            local a = ta == 1 and randn({13, 9}) or randn({9, 13})
            local b = tb == 1 and randn({11, 13}) or randn({13, 11})
            local oc, og = twin(randn({9, 11}))
            ok(C.nr_matmul(a.c, b.c, oc.c, ta, tb, 0.7, 0.3), 'cpu')
            ok(C.nr_matmul(a:cuda().c, b:cuda().c, og.c, ta, tb, 0.7, 0.3), 'gpu')
            close(string.format('matmul ta %d tb %d', ta, tb), oc, og)
         end
      end
   end)

   it('index_select and index_copy with host or device indices, and range errors', function()
      local src = randn({4, 6, 3})
      local idx = nr.tensor({5, 0, 2, 2}, {dtype = 'int64'})
      local oc, og = pair({4, 4, 3})
      ok(C.nr_tensor_index_select(src.c, 1, idx.c, oc.c), 'cpu')
      ok(C.nr_tensor_index_select(src:cuda().c, 1, idx.c, og.c), 'gpu (host index)')
      close('index_select', oc, og)
      og:zero()
      ok(C.nr_tensor_index_select(src:cuda().c, 1, idx:cuda().c, og.c), 'gpu (device index)')
      close('index_select device index', oc, og)
      local idx2 = nr.tensor({1, 3}, {dtype = 'int64'})
      local dc, dg = twin(randn({4, 6, 3}))
      local s2 = randn({4, 2, 3})
      ok(C.nr_tensor_index_copy(dc.c, 1, idx2.c, s2.c), 'cpu')
      ok(C.nr_tensor_index_copy(dg.c, 1, idx2:cuda().c, s2:cuda().c), 'gpu')
      close('index_copy', dc, dg)
      local badi = nr.tensor({0, 6}, {dtype = 'int64'}):cuda()
      local o2 = nr.zeros({4, 2, 3}, {device = 'cuda'})
      assert(C.nr_tensor_index_select(src:cuda().c, 1, badi.c, o2.c) ~= 0)
      local msg = ffi.string(C.nr_last_error())
      assert(msg:find('out of range'), msg)
   end)
end)

-- ---- layers ---------------------------------------------------------------------------------

-- Every layer test runs in each precision: f32 (tolerance RTOL) and bf16 activations (mixed
-- precision). For bf16 the CPU reference runs in f32 on the inputs rounded to bf16 (so both sides
-- see the same values; conv and matmul weights too, which the GPU rounds per call), and results are
-- compared within RTOL16, a few bf16 ulps (2^-8 = 0.4%): the GPU rounds what it stores to bf16.
-- Parameters, their gradients and statistics are f32 on both sides.
local RTOL16 = 1.5e-2
local PRECISIONS = {{name = 'f32', dtype = 'float32', rtol = RTOL}, {name = 'bf16', dtype = 'bfloat16', rtol = RTOL16},
                    {name = 'f32 nhwc', dtype = 'float32', rtol = RTOL, nhwc = true},
                    {name = 'bf16 nhwc', dtype = 'bfloat16', rtol = RTOL16, nhwc = true}}

-- Helpers of one precision p: ref(t) the CPU reference input, dev(t) the GPU activation,
-- pair(shape) CPU f32 and GPU activation zeros, gpu(shape, dtype) a GPU per-element companion
-- (indices, masks) in the activations' format, check(what, cpu, gpu) the comparison. With
-- p.nhwc, 4-d GPU activations and companions are channels-last.
local function precision(p)
   local h = {name = p.name, bf16 = p.dtype == 'bfloat16'}
   local function fmt(shape) return p.nhwc and #shape == 4 and 'channels_last' or nil end
   function h.ref(t) return p.dtype == 'bfloat16' and t:bfloat16():float() or t end
   function h.dev(t)
      local g = t:to('cuda', p.dtype)
      return fmt(t:shape()) and g:contiguous('channels_last') or g
   end
   function h.gpu(shape, dtype) return nr.zeros(shape, {dtype = dtype, device = 'cuda', memory_format = fmt(shape)}) end
   function h.pair(shape) return nr.zeros(shape), h.gpu(shape, p.dtype) end
   function h.check(what, cpu, gpu) close(p.name .. ' ' .. what, cpu, gpu, p.rtol) end
   return h
end

-- slices: the sample counts of the calls a split convolution makes (nil: one call). In bf16 each
-- call's weight gradient is rounded to bf16 before it is folded into the f32 one, so the reference
-- rounds per slice too (partial sums that cancel would else leave only the roundings to compare).
local function conv_case(h, n, cin, h_, w, cout, k, stride, pad, dil, groups, bias, slices)
   local x = h.ref(randn({n, cin, h_, w}))
   local wt = randn({cout, cin / groups, k, k}):mul(0.2)
   local wr = h.ref(wt) -- what the GPU computes with (it rounds the f32 weight itself)
   local b = bias and randn({cout}) or nil
   local ho = math.floor((h_ + 2 * pad - dil * (k - 1) - 1) / stride) + 1
   local wo = math.floor((w + 2 * pad - dil * (k - 1) - 1) / stride) + 1
   local tag = string.format('conv %dx%d s%d p%d d%d g%d', k, k, stride, pad, dil, groups)
   local yc, yg = h.pair({n, cout, ho, wo})
   if h.bf16 and b then
      -- the GPU rounds twice, the conv's output and then with the bias added (as PyTorch), so
      -- the reference does too: else where conv ~ -bias the first rounding is all that is left
      ok(C.nr_conv2d_forward(x.c, yc.c, wr.c, nil, stride, stride, pad, pad, dil, dil, groups), tag)
      yc = h.ref(yc)
      ok(C.nr_bias_add(yc.c, b.c), tag)
   else
      ok(C.nr_conv2d_forward(x.c, yc.c, wr.c, b and b.c, stride, stride, pad, pad, dil, dil, groups), tag)
   end
   ok(C.nr_conv2d_forward(h.dev(x).c, yg.c, wt:cuda().c, b and b:cuda().c, stride, stride, pad, pad, dil, dil, groups), tag)
   h.check(tag .. ' forward', yc, yg)
   local dy = h.ref(randn({n, cout, ho, wo}))
   local dxc, dxg = h.pair({n, cin, h_, w})
   ok(C.nr_conv2d_backward_data(dy.c, dxc.c, wr.c, stride, stride, pad, pad, dil, dil, groups), tag)
   ok(C.nr_conv2d_backward_data(h.dev(dy).c, dxg.c, wt:cuda().c, stride, stride, pad, pad, dil, dil, groups), tag)
   h.check(tag .. ' backward data', dxc, dxg)
   local dw0 = randn(wt:shape())
   local dwc, dwg = dw0:clone(), dw0:cuda()
   local dbc, dbg
   if bias then dbc, dbg = twin(randn({cout})) end
   -- the CPU reference: dw <- acc * dw + scale * (the gradient, or the sum of the per-call ones)
   local function ref_weight(dw, db, scale, acc)
      if not (h.bf16 and slices) then
         ok(C.nr_conv2d_backward_weight(x.c, dy.c, dw.c, db and db.c, stride, stride, pad, pad, dil, dil, groups, scale,
                                        acc), tag)
         return
      end
      if db then ok(C.nr_bias_backward(dy.c, db.c, scale, acc), tag) end
      if acc == 0 then dw:fill(0) end
      local n0 = 1
      for _, ns in ipairs(slices) do
         local g = nr.zeros(wt:shape())
         ok(C.nr_conv2d_backward_weight(x:narrow(1, n0, ns):contiguous().c, dy:narrow(1, n0, ns):contiguous().c, g.c, nil,
                                        stride, stride, pad, pad, dil, dil, groups, 1, 0), tag)
         dw:axpy_(scale, h.ref(g))
         n0 = n0 + ns
      end
      assert(n0 == n + 1, 'slices do not cover the batch')
   end
   ref_weight(dwc, dbc, 0.5, 1)
   ok(C.nr_conv2d_backward_weight(h.dev(x).c, h.dev(dy).c, dwg.c, dbg and dbg.c, stride, stride, pad, pad, dil, dil,
                                  groups, 0.5, 1), tag)
   -- what was accumulated (bf16: the gradient is rounded before it is added, so dw0 + 0.5 g may
   -- cancel to a value whose relative error says nothing about the kernel)
   h.check(tag .. ' backward weight (acc 1, scale 0.5)', dwc:sub(dw0), dwg:cpu():sub(dw0))
   if bias then h.check(tag .. ' backward bias', dbc, dbg) end
   dwc:fill(0 / 0); dwg:fill(0 / 0)
   ref_weight(dwc, nil, 1, 0)
   ok(C.nr_conv2d_backward_weight(h.dev(x).c, h.dev(dy).c, dwg.c, nil, stride, stride, pad, pad, dil, dil, groups, 1, 0), tag)
   h.check(tag .. ' backward weight (acc 0 over NaN)', dwc, dwg)
end

-- One batch-norm configuration (affine or not) in precision h: train, eval, both backwards, in
-- place, and with the fused ReLU (forward relu = 1, backward masked by the fused output).
local function bn_case(h, affine, shape)
   shape = shape or {4, 3, 5, 6} -- BatchNorm2d's; (N, C) and (N, C, L) are BatchNorm1d's
   local x = h.ref(randn(shape):mul(2):add(1))
   local xg = h.dev(x)
   local gamma = affine and randn({3}) or nil
   local beta = affine and randn({3}) or nil
   local G = function(t) return t and t:cuda().c end
   local rmc, rmg = twin(randn({3}))
   local rvc, rvg = twin(randn({3}):abs():add(0.5))
   local yc, yg = h.pair(shape)
   local smc, smg = pair({3})
   local sic, sig = pair({3})
   local dy = h.ref(randn(shape))
   local dyg = h.dev(dy)
   local dxc, dxg = h.pair(shape)
   local dgc, dgg, dbc, dbg
   if affine then dgc, dgg = twin(randn({3})); dbc, dbg = twin(randn({3})) end
   for relu = 0, 1 do
      local tag = relu == 1 and 'bn+relu' or 'bn'
      ok(C.nr_bn2d_forward_train(x.c, yc.c, smc.c, sic.c, gamma and gamma.c, beta and beta.c, rmc.c, rvc.c, 0.1, 1e-5, relu), tag)
      ok(C.nr_bn2d_forward_train(xg.c, yg.c, smg.c, sig.c, G(gamma), G(beta), rmg.c, rvg.c, 0.1, 1e-5, relu), tag)
      h.check(tag .. ' train y', yc, yg); h.check(tag .. ' save_mean', smc, smg); h.check(tag .. ' save_invstd', sic, sig)
      h.check(tag .. ' running_mean', rmc, rmg); h.check(tag .. ' running_var', rvc, rvg)
      local ryc, ryg = relu == 1 and yc.c or nil, relu == 1 and yg.c or nil
      ok(C.nr_bn2d_backward(x.c, dy.c, dxc.c, dgc and dgc.c, dbc and dbc.c, gamma and gamma.c, smc.c, sic.c, 1, 1, ryc), tag)
      ok(C.nr_bn2d_backward(xg.c, dyg.c, dxg.c, dgg and dgg.c, dbg and dbg.c, G(gamma), smg.c, sig.c, 1, 1, ryg), tag)
      h.check(tag .. ' backward dx', dxc, dxg)
      if affine then h.check(tag .. ' dgamma', dgc, dgg); h.check(tag .. ' dbeta', dbc, dbg) end
      if affine then -- parameter gradients only (no dx)
         ok(C.nr_bn2d_backward(x.c, dy.c, nil, dgc.c, dbc.c, gamma.c, smc.c, sic.c, 1, 0, ryc), tag)
         ok(C.nr_bn2d_backward(xg.c, dyg.c, nil, dgg.c, dbg.c, G(gamma), smg.c, sig.c, 1, 0, ryg), tag)
         h.check(tag .. ' dgamma without dx', dgc, dgg); h.check(tag .. ' dbeta without dx', dbc, dbg)
      end
      local dyi, dyig = dy:clone(), h.dev(dy) -- dx written over dy
      ok(C.nr_bn2d_backward(x.c, dyi.c, dyi.c, nil, nil, gamma and gamma.c, smc.c, sic.c, 1, 0, ryc), tag)
      ok(C.nr_bn2d_backward(xg.c, dyig.c, dyig.c, nil, nil, G(gamma), smg.c, sig.c, 1, 0, ryg), tag)
      h.check(tag .. ' backward dx in place of dy', dyi, dyig)
      ok(C.nr_bn2d_forward_eval(x.c, yc.c, gamma and gamma.c, beta and beta.c, rmc.c, rvc.c, 1e-5, relu), tag)
      ok(C.nr_bn2d_forward_eval(xg.c, yg.c, G(gamma), G(beta), rmg.c, rvg.c, 1e-5, relu), tag)
      h.check(tag .. ' eval y', yc, yg)
      ryc, ryg = relu == 1 and yc.c or nil, relu == 1 and yg.c or nil
      ok(C.nr_bn2d_backward_eval(x.c, dy.c, dxc.c, dgc and dgc.c, dbc and dbc.c, gamma and gamma.c, rmc.c, rvc.c, 1e-5, 2, 0,
                                 ryc), tag)
      ok(C.nr_bn2d_backward_eval(xg.c, dyg.c, dxg.c, dgg and dgg.c, dbg and dbg.c, G(gamma), rmg.c, rvg.c, 1e-5, 2, 0, ryg),
         tag)
      h.check(tag .. ' eval backward dx', dxc, dxg)
      if affine then h.check(tag .. ' eval dgamma', dgc, dgg); h.check(tag .. ' eval dbeta', dbc, dbg) end
   end
   -- evaluation-mode dx does not read x: an infinite input gives k * dy, as on the CPU
   local xinf = x:clone()
   xinf:set(7, math.huge)
   ok(C.nr_bn2d_backward_eval(xinf.c, dy.c, dxc.c, nil, nil, gamma and gamma.c, rmc.c, rvc.c, 1e-5, 1, 0, nil), 'inf cpu')
   ok(C.nr_bn2d_backward_eval(h.dev(xinf).c, dyg.c, dxg.c, nil, nil, G(gamma), rmg.c, rvg.c, 1e-5, 1, 0, nil), 'inf gpu')
   h.check('eval backward dx with an infinite x', dxc, dxg)
   -- in place (y = x)
   local xi, xig = x:clone(), h.dev(x)
   ok(C.nr_bn2d_forward_eval(xi.c, xi.c, gamma and gamma.c, beta and beta.c, rmc.c, rvc.c, 1e-5, 0), 'inplace cpu')
   ok(C.nr_bn2d_forward_eval(xig.c, xig.c, G(gamma), G(beta), rmg.c, rvg.c, 1e-5, 0), 'inplace gpu')
   h.check('bn eval in place', xi, xig)
end

describe('layer kernels on the GPU', function()
   for _, p in ipairs(PRECISIONS) do
      local h = precision(p)

      -- one test each, so that a first failure (no algorithm for one geometry) hides no other
      for _, c in ipairs({{'plain', {2, 3, 9, 8, 4, 3, 1, 1, 1, 1, true}},
                          {'strided', {2, 4, 11, 10, 6, 3, 2, 1, 1, 1, false}},
                          {'dilated', {1, 4, 12, 12, 4, 3, 1, 2, 2, 1, true}},
                          {'grouped', {2, 4, 8, 8, 6, 3, 1, 1, 1, 2, false}},
                          {'depthwise', {2, 6, 9, 9, 6, 3, 2, 1, 1, 6, false}},
                          {'1x1', {3, 8, 5, 5, 16, 1, 1, 0, 1, 1, false}}}) do
         it(h.name .. ' conv2d: ' .. c[1], function() conv_case(h, unpack(c[2])) end)
      end

      it(h.name .. ' conv2d: a batch past the per-call element limit runs as calls on slices of its samples', function()
         -- cuDNN's legacy API indexes in 32 bits, so batches of 2^31 elements or more are split;
         -- the limit is lowered here so that 7 samples of 5 x 9 x 9 = 405 elements (input and
         -- output) go as calls of 3, 3 and 1 samples: two new plans, equal results
         local was, plans = nr.cuda.conv_max_elements(), nr.cuda.conv_plans()
         nr.cuda.set_conv_max_elements(3 * 405)
         local okr, err = pcall(function()
            conv_case(h, 7, 5, 9, 9, 5, 3, 1, 1, 1, 1, true, {3, 3, 1})
            conv_case(h, 7, 5, 9, 9, 5, 3, 1, 1, 1, 5, false, {3, 3, 1}) -- depthwise, channels-last KRSC as is
         end)
         nr.cuda.set_conv_max_elements(nil)
         assert(okr, tostring(err))
         assert(nr.cuda.conv_max_elements() == was, 'limit not restored')
         assert(nr.cuda.conv_plans() >= plans + 4, 'the batch was not split: ' .. (nr.cuda.conv_plans() - plans) .. ' new plans')
      end)

      it(h.name .. ' conv2d: a slice less aligned than the first gets a plan of its own (the key holds the alignment)', function()
         -- 7 samples of 5 x 9 x 9 into 6 x 9 x 9 in calls of 3, 3 and 1: the second slice starts
         -- 3 x 405 input elements in (2430 bytes in bf16, 4860 in f32: 2- and 4-byte aligned), so
         -- its algorithm, searched on 16-byte aligned memory for the first, gets a plan of its
         -- own: three forward plans (slices of 3 aligned, 3 unaligned, 1) where shapes alone made
         -- two (a shape no other test uses: plans are cached for the process)
         local was = nr.cuda.conv_max_elements()
         nr.cuda.set_conv_max_elements(3 * 486)
         local x, w = h.dev(h.ref(randn({7, 5, 9, 9}))), randn({6, 5, 3, 3}):cuda()
         local _, y = h.pair({7, 6, 9, 9})
         local plans = nr.cuda.conv_plans()
         local okr, err = pcall(function() ok(C.nr_conv2d_forward(x.c, y.c, w.c, nil, 1, 1, 1, 1, 1, 1, 1), 'sliced') end)
         local made = nr.cuda.conv_plans() - plans
         nr.cuda.set_conv_max_elements(was)
         assert(okr, tostring(err))
         assert(made == 3, made .. ' new plans (want 3: the unaligned slice of 3 shared the aligned one\'s)')
      end)

      it(h.name .. ' conv2d: split batches keep every slice 256-byte aligned where the samples allow', function()
         -- 8 samples of 2 x 4 x 4 = 32 elements (64 bytes each in bf16, 128 in f32): a limit of 5
         -- samples per call becomes calls of 4, so every slice starts on a 256-byte boundary: one
         -- new plan (slices of 5 and 3 were two, the second 64 or 128 bytes off alignment)
         local was = nr.cuda.conv_max_elements()
         nr.cuda.set_conv_max_elements(5 * 32)
         local plans = nr.cuda.conv_plans()
         local okr, err = pcall(conv_case, h, 8, 2, 4, 4, 2, 3, 1, 1, 1, 1, false, {4, 4})
         local made = nr.cuda.conv_plans() - plans
         nr.cuda.set_conv_max_elements(was)
         assert(okr, tostring(err))
         assert(made == 1, made .. ' new plans: the slices were not all of one aligned size')
      end)

      it(h.name .. ' conv2d: no input channels gives the bias alone, as on the CPU', function()
         local x, w, b = nr.zeros({2, 0, 5, 5}), nr.zeros({4, 0, 3, 3}), randn({4})
         local yc, yg = h.pair({2, 4, 3, 3})
         yg:fill(0 / 0) -- what was there must not survive
         ok(C.nr_conv2d_forward(x.c, yc.c, w.c, b.c, 1, 1, 0, 0, 1, 1, 1), 'cpu')
         ok(C.nr_conv2d_forward(h.dev(x).c, yg.c, w:cuda().c, b:cuda().c, 1, 1, 0, 0, 1, 1, 1), 'gpu')
         h.check('conv2d with 0 input channels', yc, yg)
      end)

      it(h.name .. ' batch norm: train, eval, both backwards, fused ReLU, with and without affine', function()
         bn_case(h, true)
         bn_case(h, false)
      end)

      it(h.name .. ' batch norm over (N, C) and (N, C, L) (BatchNorm1d)', function()
         bn_case(h, true, {24, 3})
         bn_case(h, false, {24, 3})
         bn_case(h, true, {4, 3, 7})
         bn_case(h, false, {4, 3, 7})
      end)

      it(h.name .. ' relu, sigmoid, dropout, bias', function()
         local x = h.ref(randn({3, 4, 5, 2}))
         local dy = h.ref(randn({3, 4, 5, 2}))
         for _, k in ipairs({{'relu', C.nr_relu_forward, C.nr_relu_backward},
                             {'sigmoid', C.nr_sigmoid_forward, C.nr_sigmoid_backward}}) do
            local yc, yg = h.pair({3, 4, 5, 2})
            ok(k[2](x.c, yc.c), k[1]); ok(k[2](h.dev(x).c, yg.c), k[1])
            h.check(k[1] .. ' forward', yc, yg)
            local dc, dg = h.pair({3, 4, 5, 2})
            -- the backward reads the forward output: give the CPU the GPU's (rounded) one
            local yr = yg:to('cpu', 'float32'):contiguous() -- NCHW: CPU kernels take no channels-last
            ok(k[3](yr.c, dy.c, dc.c), k[1]); ok(k[3](yg.c, h.dev(dy).c, dg.c), k[1])
            h.check(k[1] .. ' backward', dc, dg)
         end
         local yc, yg = h.pair({3, 4, 5, 2})
         local mc, mg = nr.zeros({3, 4, 5, 2}), h.gpu({3, 4, 5, 2}, 'float32') -- the mask is f32 in both precisions
         nr.manual_seed(9); ok(C.nr_dropout_forward(x.c, yc.c, mc.c, 0.3), 'dropout cpu')
         nr.manual_seed(9); ok(C.nr_dropout_forward(h.dev(x).c, yg.c, mg.c, 0.3), 'dropout gpu')
         close('dropout mask', mc, mg); h.check('dropout y', yc, yg)
         local dc, dg = h.pair({3, 4, 5, 2})
         ok(C.nr_dropout_backward(dy.c, mc.c, dc.c), 'cpu'); ok(C.nr_dropout_backward(h.dev(dy).c, mg.c, dg.c), 'gpu')
         h.check('dropout backward', dc, dg)
         local b = randn({4})
         local bc, bg = x:clone(), h.dev(x)
         ok(C.nr_bias_add(bc.c, b.c), 'cpu'); ok(C.nr_bias_add(bg.c, b:cuda().c), 'gpu')
         h.check('bias_add', bc, bg)
         local dbc, dbg = twin(randn({4}))
         ok(C.nr_bias_backward(dy.c, dbc.c, 0.5, 1), 'cpu'); ok(C.nr_bias_backward(h.dev(dy).c, dbg.c, 0.5, 1), 'gpu')
         h.check('bias_backward', dbc, dbg)
         -- a Linear output wider than a grid row of channels (65535): the row kernel takes it
         local wide = h.ref(randn({3, 70001}))
         local wc, wg = twin(randn({70001}))
         ok(C.nr_bias_backward(wide.c, wc.c, 1, 0), 'cpu'); ok(C.nr_bias_backward(h.dev(wide).c, wg.c, 1, 0), 'gpu wide bias')
         h.check('bias_backward 70001 wide', wc, wg)
      end)

      it(h.name .. ' tanh, ReLU6, leaky ReLU, ELU, SiLU, GELU, Hardswish, Hardsigmoid (NaN, past the kinks, negative slopes)', function()
         local x = h.ref(randn({3, 4, 5, 2}):mul_(4))
         x:narrow(1, 1, 1):narrow(2, 1, 1):fill(0 / 0)
         local dy = h.ref(randn({3, 4, 5, 2}))
         for _, k in ipairs({{'tanh', C.NR_ACT_TANH, 0}, {'relu6', C.NR_ACT_RELU6, 0}, {'leaky', C.NR_ACT_LEAKY_RELU, 0.1},
                             {'leaky negative', C.NR_ACT_LEAKY_RELU, -0.5}, {'elu', C.NR_ACT_ELU, 0.7},
                             {'elu negative', C.NR_ACT_ELU, -0.3}, {'silu', C.NR_ACT_SILU, 0}, {'gelu', C.NR_ACT_GELU, 0},
                             {'gelu tanh', C.NR_ACT_GELU_TANH, 0}, {'hardswish', C.NR_ACT_HARDSWISH, 0},
                             {'hardsigmoid', C.NR_ACT_HARDSIGMOID, 0}}) do
            local yc, yg = h.pair({3, 4, 5, 2})
            ok(C.nr_activation_forward(x.c, yc.c, k[2], k[3]), k[1]); ok(C.nr_activation_forward(h.dev(x).c, yg.c, k[2], k[3]), k[1])
            h.check(k[1] .. ' forward', yc, yg)
            -- the backward reads the forward output (tanh, ReLU6: the GPU's) or its input (the others)
            local from_output = k[2] == C.NR_ACT_TANH or k[2] == C.NR_ACT_RELU6
            local saved = from_output and yg:to('cpu', 'float32'):contiguous() or x
            local dc, dg = h.pair({3, 4, 5, 2})
            ok(C.nr_activation_backward(saved.c, dy.c, dc.c, k[2], k[3]), k[1])
            ok(C.nr_activation_backward(from_output and yg.c or h.dev(x).c, h.dev(dy).c, dg.c, k[2], k[3]), k[1])
            h.check(k[1] .. ' backward', dc, dg)
         end
      end)

      it(h.name .. ' softmax and log-softmax over the last dimension (a NaN row, a row wider than a block)', function()
         for _, shape in ipairs({{5, 7}, {2, 3, 300}, {4}}) do
            local x = h.ref(randn(shape):mul_(3))
            if #shape == 2 then x:narrow(1, 2, 1):narrow(2, 3, 1):fill(0 / 0) end   -- row 2: NaN out, the others unchanged
            local dy = h.ref(randn(shape))
            for _, lg in ipairs({0, 1}) do
               local tag = (lg == 1 and 'log_softmax ' or 'softmax ') .. table.concat(shape, 'x')
               local yc, yg = h.pair(shape)
               ok(C.nr_softmax_forward(x.c, yc.c, lg), tag); ok(C.nr_softmax_forward(h.dev(x).c, yg.c, lg), tag)
               h.check(tag .. ' forward', yc, yg)
               local dc, dg = h.pair(shape)
               local yr = yg:to('cpu', 'float32')   -- the backward reads the forward output: the GPU's (rounded) one
               ok(C.nr_softmax_backward(yr.c, dy.c, dc.c, lg), tag); ok(C.nr_softmax_backward(yg.c, h.dev(dy).c, dg.c, lg), tag)
               h.check(tag .. ' backward', dc, dg)
            end
         end
      end)

      it(h.name .. ' max, average (windowed and adaptive) and global pooling', function()
         local x = h.ref(randn({2, 3, 9, 8}))
         local xg = h.dev(x)
         -- ceil mode (PyTorch's rule: a last window that would start past the input and its left
         -- padding is dropped): 9x8 with {3, 3, 1} gives 4 rows but 3 columns, the others one more
         -- row or column than floor mode
         local function side(n, k, s, pd, cm)
            local o = (cm == 1 and math.ceil or math.floor)((n + 2 * pd - k) / s) + 1
            if cm == 1 and (o - 1) * s >= n + pd then o = o - 1 end
            return o
         end
         for _, cfg in ipairs({{3, 2, 1, 0}, {2, 2, 0, 0}, {3, 1, 1, 0}, {3, 2, 1, 1}, {2, 2, 0, 1}, {3, 3, 1, 1}}) do
            local k, s, pd, cm = cfg[1], cfg[2], cfg[3], cfg[4]
            local ho, wo = side(9, k, s, pd, cm), side(8, k, s, pd, cm)
            local yc, yg = h.pair({2, 3, ho, wo})
            local ic, ig = nr.zeros({2, 3, ho, wo}, {dtype = 'int64'}), h.gpu({2, 3, ho, wo}, 'int64')
            ok(C.nr_maxpool2d_forward(x.c, yc.c, ic.c, k, k, s, s, pd, pd, cm), 'max cpu')
            ok(C.nr_maxpool2d_forward(xg.c, yg.c, ig.c, k, k, s, s, pd, pd, cm), 'max gpu')
            h.check('maxpool y ceil ' .. cm, yc, yg); close('maxpool indices', ic, ig)
            local dy = h.ref(randn({2, 3, ho, wo}))
            local dc, dg = h.pair({2, 3, 9, 8})
            ok(C.nr_maxpool2d_backward(dy.c, ic.c, dc.c, k, k, s, s, pd, pd, cm), 'cpu')
            ok(C.nr_maxpool2d_backward(h.dev(dy).c, ig.c, dg.c, k, k, s, s, pd, pd, cm), 'gpu')
            h.check('maxpool backward', dc, dg)
            for inc = 0, 1 do
               ok(C.nr_avgpool2d_forward(x.c, yc.c, k, k, s, s, pd, pd, inc, cm), 'avg cpu')
               ok(C.nr_avgpool2d_forward(xg.c, yg.c, k, k, s, s, pd, pd, inc, cm), 'avg gpu')
               h.check('avgpool y inc ' .. inc, yc, yg)
               ok(C.nr_avgpool2d_backward(dy.c, dc.c, k, k, s, s, pd, pd, inc, cm), 'cpu')
               ok(C.nr_avgpool2d_backward(h.dev(dy).c, dg.c, k, k, s, s, pd, pd, inc, cm), 'gpu')
               h.check('avgpool backward inc ' .. inc, dc, dg)
            end
         end
         -- adaptive windows: uneven and overlapping (9x8 -> 4x3, 2x5), more outputs than inputs (13x11)
         for _, size in ipairs({{4, 3}, {2, 5}, {1, 1}, {13, 11}}) do
            local tag = ' adaptive ' .. size[1] .. 'x' .. size[2]
            local yc, yg = h.pair({2, 3, size[1], size[2]})
            local ic, ig = nr.zeros({2, 3, size[1], size[2]}, {dtype = 'int64'}), h.gpu({2, 3, size[1], size[2]}, 'int64')
            ok(C.nr_adaptive_maxpool2d_forward(x.c, yc.c, ic.c), 'max cpu' .. tag)
            ok(C.nr_adaptive_maxpool2d_forward(xg.c, yg.c, ig.c), 'max gpu' .. tag)
            h.check('maxpool y' .. tag, yc, yg); close('maxpool indices' .. tag, ic, ig)
            local dy = h.ref(randn({2, 3, size[1], size[2]}))
            local dc, dg = h.pair({2, 3, 9, 8})
            ok(C.nr_adaptive_maxpool2d_backward(dy.c, ic.c, dc.c), 'cpu' .. tag)
            ok(C.nr_adaptive_maxpool2d_backward(h.dev(dy).c, ig.c, dg.c), 'gpu' .. tag)
            h.check('maxpool backward' .. tag, dc, dg)
            ok(C.nr_adaptive_avgpool2d_forward(x.c, yc.c), 'avg cpu' .. tag)
            ok(C.nr_adaptive_avgpool2d_forward(xg.c, yg.c), 'avg gpu' .. tag)
            h.check('avgpool y' .. tag, yc, yg)
            ok(C.nr_adaptive_avgpool2d_backward(dy.c, dc.c), 'cpu' .. tag)
            ok(C.nr_adaptive_avgpool2d_backward(h.dev(dy).c, dg.c), 'gpu' .. tag)
            h.check('avgpool backward' .. tag, dc, dg)
         end
         local yc, yg = h.pair({2, 3})
         ok(C.nr_global_avgpool_forward(x.c, yc.c), 'cpu'); ok(C.nr_global_avgpool_forward(xg.c, yg.c), 'gpu')
         h.check('global avgpool', yc, yg)
         local dy = h.ref(randn({2, 3}))
         local dc, dg = h.pair({2, 3, 9, 8})
         ok(C.nr_global_avgpool_backward(dy.c, dc.c), 'cpu'); ok(C.nr_global_avgpool_backward(h.dev(dy).c, dg.c), 'gpu')
         h.check('global avgpool backward', dc, dg)
      end)

      it(h.name .. ' softmax cross-entropy with label smoothing; bad labels are a clear error', function()
         local logits = h.ref(randn({6, 10}):mul(3))
         local lg16 = h.dev(logits)
         local labels = nr.tensor({0, 9, 3, 3, 7, 1}, {dtype = 'int64'})
         -- labels_checked (the caller checked them on the host) skips only the GPU's range check
         for _, case in ipairs({{ls = 0, checked = 0}, {ls = 0.1, checked = 0}, {ls = 0.1, checked = 1}}) do
            local ls = case.ls
            local lc, lg = pair({1})      -- the loss and the probabilities are f32 in both precisions
            local pc, pg = pair({6, 10})
            ok(C.nr_softmax_xent_forward(logits.c, labels.c, lc.c, pc.c, ls, 0), 'cpu')
            ok(C.nr_softmax_xent_forward(lg16.c, labels:cuda().c, lg.c, pg.c, ls, case.checked), 'gpu')
            close(h.name .. ' xent loss ls ' .. ls, lc, lg); close(h.name .. ' xent probs', pc, pg)
            local dc, dg = h.pair({6, 10})
            ok(C.nr_softmax_xent_backward(pc.c, labels.c, dc.c, ls, 2, 0), 'cpu')
            ok(C.nr_softmax_xent_backward(pg.c, labels:cuda().c, dg.c, ls, 2, case.checked), 'gpu')
            h.check('xent backward', dc, dg)
         end
         local bad = nr.tensor({0, 9, 3, 10, 7, 1}, {dtype = 'int64'}):cuda()
         local lg, pg = nr.zeros({1}, {device = 'cuda'}), nr.zeros({6, 10}, {device = 'cuda'})
         assert(C.nr_softmax_xent_forward(lg16.c, bad.c, lg.c, pg.c, 0, 0) ~= 0, 'bad label accepted')
         local msg = ffi.string(C.nr_last_error())
         assert(msg:find('nr_softmax_xent_forward: labels%[3%] = 10 is outside 0..9'), msg)
         assert(C.nr_check_class_ids(bad.c, 10) ~= 0, 'nr_check_class_ids accepted a bad label')
         msg = ffi.string(C.nr_last_error())
         assert(msg:find('nr_check_class_ids: labels%[3%] = 10 is outside 0..9'), msg)
         ok(C.nr_check_class_ids(bad.c, 11), 'labels within 11 classes')
         nr.cuda.synchronize() -- the device is still healthy (no device assert)
      end)

      it(h.name .. ' labels_checked skips the GPU label check; a wrong promise never faults', function()
         local lg16 = h.dev(h.ref(randn({6, 10})))
         local bad = nr.tensor({0, 9, 3, 10, 7, -1}, {dtype = 'int64'}):cuda()
         local lg, pg = nr.zeros({1}, {device = 'cuda'}), nr.zeros({6, 10}, {device = 'cuda'})
         ok(C.nr_softmax_xent_forward(lg16.c, bad.c, lg.c, pg.c, 0, 1), 'unchecked forward')
         local dg = h.dev(randn({6, 10}))
         ok(C.nr_softmax_xent_backward(pg.c, bad.c, dg.c, 0, 1, 1), 'unchecked backward')
         nr.cuda.synchronize() -- the device is still healthy (no device assert, no fault)
         assert(lg:cpu():get(1) == lg:cpu():get(1), 'the loss is a number')
      end)

      it(h.name .. ' batch metrics (loss sum, top-1 / top-5 hits) match the CPU, ties and NaNs included', function()
         local x = randn({37, 12})
         -- ties: row 1 all equal (label 0 wins the tie, label 11 loses it); row 3 ties its label with 4 others
         for j = 1, 12 do x:set(j, 0.5); x:set(12 + j, 0.5) end -- get / set index the flat elements
         for j = 1, 5 do x:set(24 + j, 2) end
         -- NaNs rank above every number: row 4 all NaN, row 5 one NaN beside its label's logit
         for j = 1, 12 do x:set(36 + j, 0 / 0) end
         x:set(48 + 3, 0 / 0)
         local logits = h.ref(x)
         local ids = {}
         for i = 1, 37 do ids[i] = (i * 7) % 12 end
         ids[1], ids[2], ids[3] = 0, 11, 4
         local labels = nr.tensor(ids, {dtype = 'int64'})
         local loss = nr.tensor({1.25})
         local ac, ag = nr.zeros({4}), nr.zeros({4}, {device = 'cuda'})
         for _ = 1, 2 do -- accumulates
            ok(C.nr_batch_metrics_add(logits.c, labels.c, loss.c, ac.c), 'cpu')
            ok(C.nr_batch_metrics_add(h.dev(logits).c, labels:cuda().c, loss:cuda().c, ag.c), 'gpu')
         end
         ok(C.nr_batch_metrics_add(logits.c, labels.c, nil, ac.c), 'cpu, no loss')
         ok(C.nr_batch_metrics_add(h.dev(logits).c, labels:cuda().c, nil, ag.c), 'gpu, no loss')
         local g = ag:cpu()
         for k = 1, 4 do assert.equal(ac:get(k), g:get(k)) end
         assert.equal(3 * 37, ac:get(4)); assert.equal(2 * 37 * 1.25, ac:get(1))
         -- a label outside the classes is never a hit and never read out of bounds
         labels:set(5, 99)
         local a2 = nr.zeros({4}, {device = 'cuda'})
         ok(C.nr_batch_metrics_add(h.dev(logits).c, labels:cuda().c, nil, a2.c), 'gpu, a bad label')
         local c2 = nr.zeros({4})
         ok(C.nr_batch_metrics_add(logits.c, labels.c, nil, c2.c), 'cpu, a bad label')
         for k = 1, 4 do assert.equal(c2:get(k), a2:cpu():get(k)) end
      end)

      it(h.name .. ' NR-CA cross attention, forward and backward (fused kernels)', function()
         local a, b, g = h.ref(randn({2, 5, 4, 3}):mul(2)), h.ref(randn({2, 5, 4, 3})), h.ref(randn({2, 5, 4, 3}))
         local oc, og = h.pair({2, 5, 4, 3})
         local sc, sg = h.pair({2, 5, 4, 3})
         ok(C.nr_cross_attention_forward(a.c, b.c, oc.c, sc.c), 'cpu')
         ok(C.nr_cross_attention_forward(h.dev(a).c, h.dev(b).c, og.c, sg.c), 'gpu')
         h.check('cross attention out', oc, og); h.check('cross attention gate', sc, sg)
         local dac, dag = h.pair({2, 5, 4, 3})
         local dbc, dbg = h.pair({2, 5, 4, 3})
         local sr = sg:to('cpu', 'float32'):contiguous() -- the GPU's (rounded) gate on both sides, NCHW
         ok(C.nr_cross_attention_backward(sr.c, b.c, g.c, dac.c, dbc.c), 'cpu')
         ok(C.nr_cross_attention_backward(sg.c, h.dev(b).c, h.dev(g).c, dag.c, dbg.c), 'gpu')
         h.check('cross attention da', dac, dag); h.check('cross attention db', dbc, dbg)
      end)
   end
end)

describe('mixed precision (bf16) on the GPU', function()
   local h = precision(PRECISIONS[2])

   it('tensor math in bf16: binary, unary, axpy, reductions, argmax', function()
      local a, b = h.ref(randn({4, 5})), h.ref(randn({4, 5}))
      local pos = h.ref(a:abs():add(0.1))
      for op = 0, 5 do
         local oc, og = h.pair({4, 5})
         ok(C.nr_binary(a.c, b.c, oc.c, op), 'cpu'); ok(C.nr_binary(h.dev(a).c, h.dev(b).c, og.c, op), 'gpu')
         h.check('binary ' .. op, oc, og)
      end
      for op = 0, 9 do
         local src = (op == 3 or op == 4) and pos or a
         local oc, og = h.pair({4, 5})
         ok(C.nr_unary(src.c, oc.c, op), 'cpu'); ok(C.nr_unary(h.dev(src).c, og.c, op), 'gpu')
         h.check('unary ' .. op, oc, og)
      end
      local y = h.ref(randn({4, 5}))
      local yg = h.dev(y)
      ok(C.nr_axpy(a.c, y.c, 0.5), 'cpu'); ok(C.nr_axpy(h.dev(a).c, yg.c, 0.5), 'gpu')
      h.check('axpy', y, yg)
      for dim = -1, 1 do
         local shape = dim < 0 and {1} or (dim == 0 and {1, 5} or {4, 1})
         local oc, og = h.pair(shape)
         ok(C.nr_reduce(a.c, dim, oc.c, 0), 'cpu'); ok(C.nr_reduce(h.dev(a).c, dim, og.c, 0), 'gpu')
         h.check('sum dim ' .. dim, oc, og)
         local ic, ig = pair(shape, 'int64')
         ok(C.nr_argmax(a.c, dim, ic.c), 'cpu'); ok(C.nr_argmax(h.dev(a).c, dim, ig.c), 'gpu')
         close('bf16 argmax dim ' .. dim, ic, ig)
      end
   end)

   it('matmul mixes bf16 activations with f32 weights and gradients, as Linear does', function()
      local x, w = h.ref(randn({9, 13})), randn({11, 13})
      local wr = h.ref(w)
      local yc, yg = h.pair({9, 11})
      ok(C.nr_matmul(x.c, wr.c, yc.c, 0, 1, 1, 0), 'cpu'); ok(C.nr_matmul(h.dev(x).c, w:cuda().c, yg.c, 0, 1, 1, 0), 'gpu')
      h.check('forward x @ w^T (bf16 out)', yc, yg)
      local gy = h.ref(randn({9, 11}))
      local gxc, gxg = h.pair({9, 13})
      ok(C.nr_matmul(gy.c, wr.c, gxc.c, 0, 0, 1, 0), 'cpu'); ok(C.nr_matmul(h.dev(gy).c, w:cuda().c, gxg.c, 0, 0, 1, 0), 'gpu')
      h.check('backward data gy @ w', gxc, gxg)
      local gwc, gwg = twin(randn({11, 13}))
      ok(C.nr_matmul(gy.c, x.c, gwc.c, 1, 0, 0.5, 1), 'cpu')
      ok(C.nr_matmul(h.dev(gy).c, h.dev(x).c, gwg.c, 1, 0, 0.5, 1), 'gpu')
      h.check('weight gradient gy^T @ x into f32 (beta 1)', gwc, gwg)
      assert(C.nr_matmul(x:cuda().c, w:cuda().c, yg.c, 0, 1, 1, 0) ~= 0, 'an f32 product into a bf16 result was accepted')
      assert(ffi.string(C.nr_last_error()):find('needs a bf16 operand'), ffi.string(C.nr_last_error()))
   end)

   it('max-pool backward in bf16 with overlapping 3x3/s2 windows (sums of up to 4 dy, accumulated in f32)', function()
      local x = h.ref(randn({2, 4, 15, 15}))
      local yg = nr.zeros({2, 4, 7, 7}, {dtype = 'bfloat16', device = 'cuda'})
      local ig = nr.zeros({2, 4, 7, 7}, {dtype = 'int64', device = 'cuda'})
      ok(C.nr_maxpool2d_forward(h.dev(x).c, yg.c, ig.c, 3, 3, 2, 2, 0, 0, 0), 'forward')
      local dy = h.dev(randn({2, 4, 7, 7}))
      local dg = nr.zeros({2, 4, 15, 15}, {dtype = 'bfloat16', device = 'cuda'})
      ok(C.nr_maxpool2d_backward(dy.c, ig.c, dg.c, 3, 3, 2, 2, 0, 0, 0), 'gpu')
      local dc = nr.zeros({2, 4, 15, 15})
      ok(C.nr_maxpool2d_backward(dy:to('cpu', 'float32').c, ig:cpu().c, dc.c, 3, 3, 2, 2, 0, 0, 0), 'cpu')
      -- one rounding of the f32 sum: at most half an ulp, 2^-8 relative; 2^-7 leaves room for the
      -- order of the f32 additions (still tighter than RTOL16)
      close('bf16 maxpool backward vs CPU', dc, dg, 2 ^ -7)
   end)

   it('refuses mixed activation dtypes with a message naming both', function()
      local a16 = randn({3, 4}):to('cuda', 'bfloat16')
      local out = nr.zeros({3, 4}, {device = 'cuda'})
      assert(C.nr_binary(a16.c, a16.c, out.c, 0) ~= 0)
      assert(ffi.string(C.nr_last_error()):find('must have one dtype'), ffi.string(C.nr_last_error()))
      local y = nr.zeros({3, 4}, {device = 'cuda'})
      assert(C.nr_relu_forward(a16.c, y.c) ~= 0)
      assert(ffi.string(C.nr_last_error()):find('must have one dtype'), ffi.string(C.nr_last_error()))
   end)

   it('nr.train with precision = "bf16" learns separable images like fp32', function()
      local train = require 'nr.train'
      local nn = nr.nn
      nr.manual_seed(21)
      local n = 256
      local x = nr.randn({n, 1, 8, 8}):mul(0.3)
      local y = nr.empty({n}, {dtype = 'int64'})
      local xp, yp = x:data(), y:data()
      for i = 0, n - 1 do -- class k: a bright 3x3 blob in quadrant k
         local k = i % 4
         yp[i] = k
         local r0, c0 = (k < 2) and 1 or 4, (k % 2 == 0) and 1 or 4
         for r = r0, r0 + 2 do for c = c0, c0 + 2 do xp[i * 64 + r * 8 + c] = xp[i * 64 + r * 8 + c] + 1.5 end end
      end
      local tmp = (os.getenv('TMPDIR') or '/tmp') .. '/nr_cuda_bf16_' .. tostring(os.time())
      local function run(prec)
         return train.train({
            name = 'bf16', device = 'cuda', precision = prec, epochs = 3, seed = 5, out = tmp .. '-' .. prec,
            model = function() return nn.Sequential{nn.Conv2d(1, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8),
                                                     nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)} end,
            data = {train = train.memory_loader(x, y, {batch = 32, shuffle = true, seed = 3}),
                    val = train.memory_loader(x, y, {batch = 64})},
            optim = {lr = 0.05, momentum = 0.9}, progress = {stream = io.open('/dev/null', 'w')},
         })
      end
      local s16, s32 = run('bf16'), run('fp32')
      assert(s16.best_top1 >= 95, 'bf16 top-1 ' .. tostring(s16.best_top1) .. '%')
      assert(math.abs(s16.best_top1 - s32.best_top1) <= 5, string.format('bf16 %.1f%% vs fp32 %.1f%%', s16.best_top1, s32.best_top1))
   end)
end)

-- ---- the model zoo through the Lua modules, as training runs them ----------------------------

-- Norm-wise relative error ||got - want|| / ||want|| (both read on the host as f32).
local function nrel(got, want)
   local g, w = got:to('cpu', 'float32'):contiguous(), want:to('cpu', 'float32'):contiguous()
   local d = g:sub(w)
   return math.sqrt(d:mul(d):sum()) / math.max(1e-30, math.sqrt(w:mul(w):sum()))
end

describe('the model zoo on the GPU (Lua modules) against the CPU', function()
   -- the NR zoo fixtures: five models at small inputs, BN state randomised, some channels dead
   local fixtures = require 'tests.lua.nr_zoo'
   -- norm-wise tolerances through the whole depth; bf16 gradients only within 3 (one rounding per
   -- layer per direction: the CUDA emulator puts them at 0.07-1.18 on these damaged nets; a GPU's
   -- other algorithms may round otherwise), which still catches NaN, inf and gradients blown up by
   -- a wrong kernel (the layers are compared one by one, within 1.5e-2, above)
   local TOL = {f32 = {out = 1e-3, grad = 1e-3}, bf16 = {out = 5e-2, grad = 3}}
   TOL['f32 nhwc'], TOL['bf16 nhwc'] = TOL.f32, TOL.bf16
   for zi, z in ipairs(fixtures.ZOO) do
      local name, spec, shape = z[1], z[2], z[3]
      it(name .. ': forward and backward (f32 and bf16, NCHW and NHWC), inference with folding, and a CA rejuvenation', function()
         nr.manual_seed(300 + zi)
         local cpu = nr.models.build(spec)
         fixtures.damage(cpu, shape, 0.3)
         local x = randn({2, shape[1], shape[2], shape[3]})
         local gpu = cpu:clone():to('cuda')
         -- forward and backward in evaluation mode (BN with running statistics): training-mode BN at
         -- batch 2 turns 1e-7 input differences into 10-50% output differences on these depths,
         -- which would test the conditioning, not the kernels (those are compared one by one above)
         local ct = cpu:clone()
         ct:evaluate()
         local y = ct:forward(x)
         local g = randn(y:shape())
         ct:zeroGradParameters()
         local gx = ct:backward(x, g):clone()
         local _, grads = ct:parameters()
         for _, prec in ipairs({'f32', 'bf16', 'f32 nhwc', 'bf16 nhwc'}) do
            local dt = prec:find('bf16') and 'bfloat16' or 'float32'
            local xg = x:to('cuda', dt):contiguous(prec:find('nhwc') and 'channels_last' or nil)
            local pg = gpu:clone()
            pg:evaluate()
            local yg = pg:forward(xg)
            pg:zeroGradParameters()
            local gxg = pg:backward(xg, g:to('cuda', dt))
            if xg:is_cuda() then -- (the CPU layers compute channels-last inputs as NCHW)
               assert(gxg:memory_format() == xg:memory_format(), prec .. ': the input gradient is ' .. gxg:memory_format())
            end
            local _, ggrads = pg:parameters()
            local eo, ei, eg = nrel(yg, y), nrel(gxg, gx), 0
            for i = 1, #grads do
               local e = nrel(ggrads[i], grads[i])
               eg = e == e and math.max(eg, e) or math.huge -- math.max drops a NaN
            end
            print(string.format('  %s %s: output %.2e, input grad %.2e, worst parameter grad %.2e', name, prec, eo, ei, eg))
            local tol = TOL[prec]
            assert(eo <= tol.out and ei <= tol.grad and eg <= tol.grad,
               string.format('%s %s: errors %.3g / %.3g / %.3g above %g / %g', name, prec, eo, ei, eg, tol.out, tol.grad))
         end
         -- inference inside no_grad (Conv2d + BN + ReLU folded on both devices)
         cpu:evaluate(); gpu:evaluate()
         local yi = nr.no_grad(function() return cpu:forward(x):clone() end)
         local yig = nr.no_grad(function() return gpu:forward(x:cuda()) end)
         assert(nrel(yig, yi) <= TOL.f32.out, string.format('%s inference: %.3g', name, nrel(yig, yi)))
         -- one rejuvenation with cross attention: same surgery on both devices (the random init is
         -- counter-based, so it is the same draw), then the same function
         nr.manual_seed(77); nr.rejuvenate(cpu, {input_shape = shape, scheme = 'CA'})
         nr.manual_seed(77); nr.rejuvenate(gpu, {input_shape = shape, scheme = 'CA'})
         assert(cpu:nParameters() == gpu:nParameters(), 'rejuvenated parameter counts differ')
         local e = nrel(gpu:forward(x:cuda()), cpu:forward(x))
         print(string.format('  %s after CA rejuvenation: output %.2e', name, e))
         assert(e <= TOL.f32.out, string.format('%s after rejuvenation: %.3g', name, e))
      end)
   end

   it('tensor ops and models keep the bf16 dtype of their input', function()
      local m = nr.models.build({name = 'mobilenet', width = 0.25, classes = 10}):to('cuda')
      local y = m:forward(randn({2, 3, 32, 32}):to('cuda', 'bfloat16'))
      assert(y:dtype() == 'bfloat16' and y:is_cuda(), 'a bf16 input should give a bf16 output on the GPU')
      local a = randn({4, 5}):to('cuda', 'bfloat16')
      assert(a:add(a):dtype() == 'bfloat16' and a:exp():dtype() == 'bfloat16' and a:sum(1):dtype() == 'bfloat16')
      assert(a:matmul(randn({5, 3}):cuda()):dtype() == 'bfloat16')
      assert(type(a:sum()) == 'number' and a:argmax() == a:to('cpu', 'float32'):argmax())
   end)
end)

describe('channels-last (NHWC) activations on the GPU', function()
   local fixtures = require 'tests.lua.nr_zoo'

   -- cl fed the channels-last batch xc against ref fed x (on the GPU or the CPU): every 4-d output
   -- of cl (itself included) is channels-last, and the output, the input gradient (channels-last
   -- too) and the parameter gradients agree within 1e-4 norm-wise.
   local function matches_channels_last(ref, x, cl, xc)
      local y, ycl = ref:forward(x), cl:forward(xc)
      for _, m in ipairs(cl:listModules()) do
         local o = rawget(m, 'output')
         if o and o:dim() == 4 then
            assert(o:memory_format() == 'channels_last', m:typename() .. ' output is ' .. o:memory_format())
         end
      end
      assert(nrel(ycl, y) <= 1e-4, 'outputs differ: ' .. nrel(ycl, y))
      local g = randn(y:shape())
      ref:zeroGradParameters(); cl:zeroGradParameters()
      local gc = g:cuda()
      if gc:dim() == 4 then gc = gc:contiguous('channels_last') end
      local gx, gxc = ref:backward(x, g:to(y:device())), cl:backward(xc, gc)
      assert(gxc:memory_format() == 'channels_last', 'gradInput is ' .. gxc:memory_format())
      assert(nrel(gxc, gx) <= 1e-4, 'input gradients differ: ' .. nrel(gxc, gx))
      local _, ga = ref:parameters()
      local _, gb = cl:parameters()
      for i = 1, #ga do assert(nrel(gb[i], ga[i]) <= 1e-4, 'parameter gradient ' .. i .. ': ' .. nrel(gb[i], ga[i])) end
   end

   it('a model fed a channels-last batch keeps the format through every layer and matches NCHW', function()
      nr.manual_seed(41)
      local net = fixtures.layout_net():to('cuda')
      local x = randn({4, 3, 8, 8}):cuda()
      matches_channels_last(net, x, net:clone(), x:contiguous('channels_last'))
   end)

   it('adaptive pools and a BatchNorm1d head equal the CPU (training forward, evaluation backward); channels-last kept', function()
      nr.manual_seed(43)
      local nn = nr.nn
      local cpu = nn.Sequential{nn.Conv2d(3, 6, 3, {padding = 1}), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveMaxPool2d({5, 3}),
         nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8),
         nn.ReLU{inplace = true}, nn.Linear(8, 3)}
      local gpu = cpu:clone():to('cuda')
      local x, g = randn({8, 3, 9, 7}), randn({8, 3})
      local xg = x:cuda()
      -- training mode: outputs and the running statistics the forward updates
      local y, yg = cpu:forward(x), gpu:forward(xg)
      assert(nrel(yg, y) <= 1e-4, 'training outputs differ: ' .. nrel(yg, y))
      local bc, bg = cpu.modules[9], gpu.modules[9]
      assert(nrel(bg.running_mean, bc.running_mean) <= 1e-5 and nrel(bg.running_var, bc.running_var) <= 1e-5,
         'BatchNorm1d running statistics differ')
      -- gradients in evaluation mode (in training mode the BNs cancel the batch sums of the
      -- gradients before them, and what is left of the earlier bias and β gradients is rounding)
      cpu:evaluate(); gpu:evaluate()
      y, yg = cpu:forward(x), gpu:forward(xg)
      cpu:zeroGradParameters(); gpu:zeroGradParameters()
      local gx, gxg = cpu:backward(x, g), gpu:backward(xg, g:cuda())
      assert(nrel(yg, y) <= 1e-4, 'outputs differ: ' .. nrel(yg, y))
      assert(nrel(gxg, gx) <= 1e-4, 'input gradients differ: ' .. nrel(gxg, gx))
      local _, ga = cpu:parameters()
      local _, gb = gpu:parameters()
      for i = 1, #ga do assert(nrel(gb[i], ga[i]) <= 1e-4, 'parameter gradient ' .. i .. ': ' .. nrel(gb[i], ga[i])) end
      gpu:training()
      matches_channels_last(gpu, xg, gpu:clone(), xg:contiguous('channels_last'))
   end)

   it('channel gathers (index_select / index_copy) on channels-last tensors equal the NCHW ones', function()
      nr.manual_seed(43)
      local x = randn({3, 5, 4, 6})
      local xg = x:cuda():contiguous('channels_last')
      for dim, ix in ipairs({{2, 0}, {4, 1, 1}, {3, 0}, {5, 2}}) do
         local got = xg:index_select(dim, ix)
         assert(got:memory_format() == 'channels_last', 'index_select gave ' .. got:memory_format())
         close('channels-last index_select dim ' .. dim, x:index_select(dim, ix), got, 0)
         local back = nr.zeros(x:shape(), {device = 'cuda', memory_format = 'channels_last'})
         back:index_copy(dim, ix, got)
         local ref = nr.zeros(x:shape())
         ref:index_copy(dim, ix, x:index_select(dim, ix))
         close('channels-last index_copy dim ' .. dim, ref, back, 0)
      end
   end)

   it('an NR-CA layer (NRConv2d) fed a channels-last batch keeps the format through every layer and matches the CPU', function()
      nr.manual_seed(44)
      -- scattered input groups (index gathers), a cross-attention output group and an orphan
      local m = nr.nn.NRConv2d{in_channels = 7, out_channels = 7, kernel_size = 3, stride = 1, padding = 1, bias = true,
         scheme = 'CA', in_groups = {{gen = 0, idx = {0, 1, 4, 5}}, {gen = 1, idx = {2, 3, 6}}},
         out_groups = {{gen = 0, first = 0, n = 3}, {gen = 1, first = 3, n = 2}, {gen = 2, first = 5, n = 2}}}
      for _, b in ipairs(m.blocks) do
         b.conv.weight:copy(randn(b.conv.weight:shape()):mul_(0.3))
         if b.conv.bias then b.conv.bias:copy(randn(b.conv.bias:shape()):mul_(0.3)) end -- cross blocks have none
      end
      local x = randn({2, 7, 6, 6})
      matches_channels_last(m, x, m:clone():to('cuda'), x:cuda():contiguous('channels_last'))
   end)

   it('refuses mixed memory formats in one call, naming both tensors', function()
      local x = randn({2, 3, 4, 5}):cuda():contiguous('channels_last')
      local y = nr.zeros({2, 3, 4, 5}, {device = 'cuda'})
      assert(C.nr_relu_forward(x.c, y.c) ~= 0, 'relu with a channels-last x and an NCHW y was accepted')
      local msg = ffi.string(C.nr_last_error())
      assert(msg:find('memory format') and msg:find('channels%-last'), msg)
      local w = randn({4, 3, 3, 3}):cuda()
      local yc = nr.zeros({2, 4, 2, 3}, {device = 'cuda'})
      assert(C.nr_conv2d_forward(x.c, yc.c, w.c, nil, 1, 1, 0, 0, 1, 1, 1) ~= 0, 'conv with mixed formats was accepted')
      local idx = nr.zeros({2, 3, 2, 2}, {dtype = 'int64', device = 'cuda'})
      local yp = nr.zeros({2, 3, 2, 2}, {device = 'cuda', memory_format = 'channels_last'})
      assert(C.nr_maxpool2d_forward(x.c, yp.c, idx.c, 2, 2, 2, 2, 0, 0, 0) ~= 0, 'NCHW indices for NHWC y were accepted')
      assert(ffi.string(C.nr_last_error()):find('indices'), ffi.string(C.nr_last_error()))
   end)

   it('tensor ops keep the format; conversions both ways and to the host are exact', function()
      local x = randn({2, 5, 3, 4})
      local g = x:cuda():contiguous('channels_last')
      assert(g:memory_format() == 'channels_last' and g:clone():memory_format() == 'channels_last')
      assert(g:add(g):memory_format() == 'channels_last' and g:exp():memory_format() == 'channels_last')
      close('channels-last round trip', x, g:contiguous():cpu(), 0)
      close('channels-last add', x:add(x), g:add(g), 0)
      close('channels-last bf16', x:bfloat16():float(), g:bfloat16():float(), 0)
   end)
end)

describe('input batches as bytes (loader output = "uint8") on the GPU', function()
   it('nr_images_normalize finishes uint8 batches on the device as the CPU does, in every output layout', function()
      nr.manual_seed(31)
      for _, c in ipairs({3, 1}) do
         local u = nr.randint(0, 256, {5, c, 7, 9}, {dtype = 'uint8'})
         local mean, std = ffi.new('float[4]', {0.485, 0.456, 0.406}), ffi.new('float[4]', {0.229, 0.224, 0.225})
         for _, stats in ipairs({true, false}) do
            local m, sd = stats and mean or nil, stats and std or nil
            local want = nr.empty(u:shape())
            ok(C.nr_images_normalize(u.c, m, sd, want.c), 'normalize on the CPU')
            local ud = u:cuda()
            for _, case in ipairs({{'float32', 'contiguous'}, {'float32', 'channels_last'},
                                    {'bfloat16', 'contiguous'}, {'bfloat16', 'channels_last'}}) do
               local out = nr.empty(u:shape(), {dtype = case[1], device = 'cuda', memory_format = case[2]})
               ok(C.nr_images_normalize(ud.c, m, sd, out.c), 'normalize on the GPU')
               -- the same arithmetic (multiply and add rounded separately) on both: the same bits,
               -- and bf16 is their rounding
               local ref = case[1] == 'float32' and want or want:bfloat16():float()
               close(string.format('normalize C=%d stats=%s %s %s', c, tostring(stats), case[1], case[2]), ref, out, 0)
            end
         end
      end
   end)

   it('nr_images_normalize refuses a CPU destination for GPU bytes', function()
      local u = nr.randint(0, 256, {2, 3, 4, 4}, {dtype = 'uint8'}):cuda()
      assert(C.nr_images_normalize(u.c, nil, nil, nr.empty(u:shape()).c) ~= 0, 'a CPU destination was accepted')
      assert(ffi.string(C.nr_last_error()):find('dst', 1, true), ffi.string(C.nr_last_error()))
   end)

   it('nr.train on the GPU copies uint8 batches and finishes them there; the run matches float32 batches', function()
      local train = require 'nr.train'
      local nn = nr.nn
      -- an MNIST-layout dataset on disk: class k is a bright 3x3 blob in quadrant k of an 8x8 picture
      local dir = (os.getenv('TMPDIR') or '/tmp') .. '/nr_cuda_u8_' .. tostring(os.time())
      assert(os.execute('mkdir -p ' .. dir) == 0)
      local function be32(v) return string.char(math.floor(v / 16777216) % 256, math.floor(v / 65536) % 256, math.floor(v / 256) % 256, v % 256) end
      local n, seed = 256, 12345
      local pix, lab = {be32(0x803), be32(n), be32(8), be32(8)}, {be32(0x801), be32(n)}
      for i = 0, n - 1 do
         local k = i % 4
         lab[#lab + 1] = string.char(k)
         local r0, c0 = (k < 2) and 1 or 4, (k % 2 == 0) and 1 or 4
         for r = 0, 7 do for c = 0, 7 do
            seed = (seed * 1103515245 + 12345) % 2147483648
            local v = 30 + seed % 60
            if r >= r0 and r < r0 + 3 and c >= c0 and c < c0 + 3 then v = v + 140 end
            pix[#pix + 1] = string.char(v)
         end end
      end
      for name, parts in pairs({['train-images-idx3-ubyte'] = pix, ['train-labels-idx1-ubyte'] = lab}) do
         local f = assert(io.open(dir .. '/' .. name, 'wb'))
         f:write(table.concat(parts))
         f:close()
      end
      local function run(output, prec)
         local tr = train.new({
            name = 'u8', device = 'cuda', precision = prec, epochs = 3, seed = 5, log_every = 100,
            out = dir .. '/run-' .. tostring(output) .. '-' .. prec,
            model = function() return nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8),
                                                     nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)} end,
            -- grey replicated to 3 channels with per-channel statistics: the bf16 run's channels-last
            -- input has C = 3, so the kernel's NHWC branch runs inside the trainer too
            data = {dataset = 'mnist', root = dir, batch = 32, threads = 2, val_split = 'train', eval_batch = 64,
                    augment = {pad = 1, crop = 8, channels = 3, normalize = {mean = {0.3, 0.4, 0.5}, std = {0.3, 0.25, 0.2}}},
                    output = output},
            optim = {lr = 0.05, momentum = 0.9}, progress = {stream = io.open('/dev/null', 'w')},
         })
         local s = tr:run()
         local ps = {}
         for i, p in ipairs(tr.model:parameters()) do ps[i] = p:cpu() end
         return tr, s, ps
      end
      nr.cuda.set_deterministic(true)
      local okr, err = pcall(function()
         local tr8, s8, p8 = run(nil, 'fp32')
         assert(tr8.train_loader.output == 'uint8' and tr8.val_loader.output == 'uint8', 'the GPU default is uint8 batches')
         local _, s32, p32 = run('float32', 'fp32')
         for i = 1, #p8 do
            local e = nrel(p8[i], p32[i])
            assert(e < 1e-4, string.format('parameter %d: uint8 vs float32 batches differ by %g (norm-wise)', i, e))
         end
         assert(math.abs(s8.final_loss - s32.final_loss) <= 1e-4 * math.max(1, s32.final_loss), 'final loss')
         assert(s8.best_top1 >= 95, 'uint8 batches: top-1 ' .. tostring(s8.best_top1))
         -- bf16 channels-last: the bytes become bf16 NHWC in the same kernel
         local _, s16 = run(nil, 'bf16')
         assert(s16.best_top1 >= 90, 'bf16 from uint8 batches: top-1 ' .. tostring(s16.best_top1))
      end)
      nr.cuda.set_deterministic(false)
      assert(okr, tostring(err))
   end)
end)

describe('Neural Rejuvenation inside nr.train on the GPU', function()
   -- nr_train_spec's run on the GPU, in both precisions: the monitor, the adaptive L1, the surgery
   -- with momentum remapping and the NR-CA layers all run on device tensors
   local train = require 'nr.train'
   local fixtures = require 'tests.lua.nr_zoo'
   local model, synthetic = fixtures.small_net, fixtures.synthetic
   local x, y = synthetic(2048, 5)
   local vx, vy = synthetic(256, 6)
   for _, prec in ipairs({'fp32', 'bf16'}) do
      it(prec .. ': sparsifies to T_r, rejuvenates once (CA), keeps training with a finite loss', function()
         local tr = train.new({
            name = 'nr_gpu', model = model, device = 'cuda', precision = prec, epochs = 3, seed = 1, log_every = 10,
            out = (os.getenv('TMPDIR') or '/tmp') .. '/nr_cuda_nr_' .. prec .. '_' .. tostring(os.time()),
            optim = {name = 'sgd', lr = 0.05, momentum = 0.9, weight_decay = 1e-4}, schedule = {name = 'cosine'},
            data = {train = train.memory_loader(x, y, {batch = 64, shuffle = true, seed = 1}),
                    val = train.memory_loader(vx, vy, {batch = 128})},
            progress = {stream = io.open('/dev/null', 'w')},
            nr = {target = 0.5, budget = 1.0, constraint = 'params', scheme = 'CA', rescale = true, times = 1,
                  threshold = 0.05, lambda = {mode = 'adaptive', init = 0, dt = 4, dr = 0.01, dl = 4e-3}},
         })
         local summary = tr:run()
         local rep = tr.nr.reports[1]
         assert(tr.nr.rejuvenations == 1, 'rejuvenations: ' .. tostring(tr.nr.rejuvenations))
         print(string.format('  %s: r_params %.3f -> %.3f at step %d, final loss %.3f, best top-1 %.1f%%', prec,
            rep.before.r_params, rep.after.r_params, rep.step, summary.final_loss, summary.best_top1))
         assert(rep.before.r_params < 0.5 and rep.after.r_params > 0.99, 'utilisation before/after')
         assert(#tr.model:findModules('NRConv2d') > 0, 'no NR-CA layer after the rejuvenation')
         assert(summary.final_loss == summary.final_loss and summary.final_loss < 10, 'loss ' .. tostring(summary.final_loss))
         assert(summary.best_top1 >= 80, 'best top-1 ' .. tostring(summary.best_top1))
      end)
   end
end)

describe('reproducible GPU training', function()
   it('with nr.cuda.set_deterministic(true) two runs from one seed end with the same bits', function()
      local train = require 'nr.train'
      local fixtures = require 'tests.lua.nr_zoo'
      local x, y = fixtures.synthetic(512, 8)
      local function run(tag, device)
         local tr = train.new({
            name = 'det', model = fixtures.small_net, device = device, epochs = 1, seed = 3, log_every = 100,
            out = (os.getenv('TMPDIR') or '/tmp') .. '/nr_cuda_det_' .. tag .. '_' .. tostring(os.time()),
            optim = {lr = 0.05, momentum = 0.9, weight_decay = 1e-4}, schedule = {name = 'cosine'},
            data = {train = train.memory_loader(x, y, {batch = 64, shuffle = true, seed = 2})},
            progress = {stream = io.open('/dev/null', 'w')},
         })
         tr:run()
         local ps = tr.model:parameters()
         local out = {}
         for i, p in ipairs(ps) do out[i] = p:cpu() end
         return out
      end
      nr.cuda.set_deterministic(true)
      -- the second run names the GPU ('cuda:0'): the same device, the same bits
      local okr, a, b = pcall(function() return run('a', 'cuda'), run('b', 'cuda:0') end)
      nr.cuda.set_deterministic(false)
      assert(okr, tostring(a))
      for i = 1, #a do
         local d = a[i]:sub(b[i]):abs():max()
         assert(d == 0, string.format('parameter %d differs by %g between two deterministic runs', i, d))
      end
   end)

   it('an evaluation run by a hook mid-epoch leaves the batches staged ahead and the epoch sums alone', function()
      local train = require 'nr.train'
      local fixtures = require 'tests.lua.nr_zoo'
      local x, y = fixtures.synthetic(384, 9)
      local vx, vy = fixtures.synthetic(100, 10)
      local function run(tag, hook)
         local tr = train.new({
            name = 'mid', model = fixtures.small_net, device = 'cuda', epochs = 1, seed = 4, log_every = 100,
            out = (os.getenv('TMPDIR') or '/tmp') .. '/nr_cuda_mid_' .. tag .. '_' .. tostring(os.time()),
            optim = {lr = 0.05, momentum = 0.9}, data = {train = train.memory_loader(x, y, {batch = 64, seed = 2, shuffle = true}),
                                                       val = train.memory_loader(vx, vy, {batch = 32})},
            progress = {stream = io.open('/dev/null', 'w')},
            hooks = hook and {after_step = function(t) if t.step == 2 then t:evaluate() end end} or nil,
         })
         local epoch_info
         tr:add_hook('epoch_end', function(_, info) epoch_info = info end)
         tr:run()
         return tr.model:parameters(), epoch_info.train
      end
      nr.cuda.set_deterministic(true)
      local okr, pa, ta = pcall(run, 'plain')
      local okh, pb, tb = pcall(run, 'hooked', true)
      nr.cuda.set_deterministic(false)
      assert(okr and okh, tostring(okr and pb or pa))
      for i = 1, #pa do
         local d = pa[i]:sub(pb[i]):abs():max()
         assert(d == 0, string.format('parameter %d differs by %g after a mid-epoch evaluation', i, d))
      end
      assert(ta.loss == tb.loss and ta.top1 == tb.top1, string.format('epoch sums %s/%s vs %s/%s', ta.loss, ta.top1, tb.loss, tb.top1))
   end)
end)

describe('SGD and NR primitives on the GPU', function()
   it('sgd_step matches torch.optim.SGD semantics on the CPU', function()
      for _, cfg in ipairs({{0, 0, 0}, {0.9, 5e-4, 0}, {0.9, 1e-4, 1}}) do
         local mu, wd, nest = cfg[1], cfg[2], cfg[3]
         local pc, pg = twin(randn({7, 3}))
         local bc, bg = pair({7, 3})
         for _ = 1, 3 do
            local g = randn({7, 3})
            ok(C.nr_sgd_step(pc.c, g.c, mu ~= 0 and bc.c or nil, 0.1, mu, wd, nest), 'cpu')
            ok(C.nr_sgd_step(pg.c, g:cuda().c, mu ~= 0 and bg.c or nil, 0.1, mu, wd, nest), 'gpu')
         end
         close(string.format('sgd param mu %g wd %g nesterov %d', mu, wd, nest), pc, pg)
         if mu ~= 0 then close('sgd momentum buffer', bc, bg) end
      end
   end)

   it('surgery placement: gathered, given and random blocks; the batched call is all or nothing', function()
      local function i64(list) return nr.tensor(list, {dtype = 'int64'}) end
      local function pairs_t(keep, dst) return nr.tensor({keep, dst}, {dtype = 'int64'}) end
      nr.manual_seed(12)
      local old = randn({20, 16, 3, 3})
      local fixtures = require 'tests.lua.nr_zoo'
      local pick, without = fixtures.pick, fixtures.without
      local rk, rd, ck, cd = pick(15, 20), pick(15, 24), pick(12, 16), pick(12, 18)
      local br, bc = i64(without(24, rd)), i64(without(18, cd))
      local ar, ac = pairs_t(rk, rd), pairs_t(ck, cd)
      local b = randn({br:numel(), bc:numel(), 3, 3})
      for _, o in ipairs({{b = b, std = 0}, {std = 0.3}}) do
         local dc, dg = pair({24, 18, 3, 3})
         ok(C.nr_surgery_place(dc.c, 0.25, old.c, ar.c, ac.c, o.b and o.b.c, br.c, bc.c, o.std, 77), 'cpu')
         ok(C.nr_surgery_place(dg.c, 0.25, old:cuda().c, ar.c, ac.c, o.b and o.b:cuda().c, br.c, bc.c, o.std, 77), 'gpu')
         -- the random block: device logf/cosf/sinf may differ from glibc's by an ulp or two
         close(o.b and 'surgery place (given b)' or 'surgery place (random b)', dc, dg, o.b and 0 or RTOL)
      end
      -- a CPU operand with a GPU dst is an error, not a crash
      local dg = nr.zeros({24, 18, 3, 3}, {device = 'cuda'})
      assert(C.nr_surgery_place(dg.c, 0, old.c, ar.c, ac.c, nil, nil, nil, 0, 0) ~= 0, 'a CPU source was accepted')
      -- job 1 is invalid (no a_rows): job 0's dst must stay untouched
      local jobs = ffi.new('nr_place_job[2]')
      local d0, d1 = nr.zeros({24, 18, 3, 3}, {device = 'cuda'}), nr.zeros({24, 18, 3, 3}, {device = 'cuda'})
      local og = old:cuda()
      jobs[0].dst, jobs[0].a, jobs[0].a_rows, jobs[0].a_cols, jobs[0].fill = d0.c, og.c, ar.c, ac.c, 5
      jobs[1].dst, jobs[1].a = d1.c, og.c
      assert(C.nr_surgery_place_many(jobs, 2) ~= 0, 'an invalid job was accepted')
      assert(ffi.string(C.nr_last_error()):find('job 1'), ffi.string(C.nr_last_error()))
      close('place_many wrote nothing', nr.zeros({24, 18, 3, 3}), d0, 0)
   end)

   it('surgery placement: a batch of jobs (shapes, fills, given and random blocks) equals the CPU batch', function()
      local fixtures = require 'tests.lua.nr_zoo'
      local pick, without = fixtures.pick, fixtures.without
      local function i64(list) return nr.tensor(list, {dtype = 'int64'}) end
      nr.manual_seed(31)
      local shapes = {{20, 16, 3, 3}, {40, 7}, {33}, {12, 1, 3, 3}}
      local n = #shapes
      local jc, jg = ffi.new('nr_place_job[?]', n), ffi.new('nr_place_job[?]', n)
      local hold, dsts = {}, {}
      for i, s in ipairs(shapes) do
         -- grow dims 0 and 1 (the only ones surgery changes): survivors scattered among new ones
         local s0, s1 = s[1], s[2] or 1
         local d0, d1 = s0 + 4, #s > 1 and s[2] + (s[2] > 1 and 3 or 0) or 1
         local dshape = {d0}
         for k = 2, #s do dshape[k] = s[k] end
         if #s > 1 then dshape[2] = d1 end
         local rk, rd = pick(s0 - 2, s0), pick(s0 - 2, d0)
         local ck, cd = pick(math.max(s1 - 1, 1), s1), pick(math.max(s1 - 1, 1), d1)
         local br, bc = without(d0, rd), without(d1, cd)
         local a = randn(s)
         local bshape = {#br}
         for k = 2, #dshape do bshape[k] = dshape[k] end
         if #s > 1 then bshape[2] = #bc end
         local b = (i % 2 == 1 and #bc > 0) and randn(bshape) or nil
         local ag, bg = a:cuda(), b and b:cuda()
         local t = {nr.tensor({rk, rd}, {dtype = 'int64'}), nr.tensor({ck, cd}, {dtype = 'int64'}), i64(br), i64(bc),
                    a, ag, b, bg}
         hold[i] = t
         dsts[i] = {pair(dshape)}
         for side, j in ipairs({jc, jg}) do
            local e = j[i - 1]
            e.dst = dsts[i][side].c
            e.a = (side == 1 and a or ag).c
            -- a 1-d dst (a bias) has rows only
            e.a_rows, e.b_rows = t[1].c, t[3].c
            if #s > 1 then e.a_cols, e.b_cols = t[2].c, t[4].c end
            e.b = b and (side == 1 and b or bg).c or nil
            e.fill, e.b_std, e.b_seed = i % 3 == 0 and 1 or 0, b and 0 or 0.2, 500 + i
         end
      end
      ok(C.nr_surgery_place_many(jc, n), 'cpu batch')
      ok(C.nr_surgery_place_many(jg, n), 'gpu batch')
      for i = 1, n do
         -- the random blocks: device logf/cosf/sinf may differ from glibc's by an ulp or two
         close('batched surgery job ' .. i, dsts[i][1], dsts[i][2], hold[i][7] and 0 or RTOL)
      end
   end)

   it('sgd_step_many: one launch for a group of parameters (one spans several chunks) equals the CPU', function()
      local shapes = {{7, 3}, {300000}, {1}, {16, 8, 3, 3}}
      local pc, pg, bc, bg, gs = {}, {}, {}, {}, {}
      for i, sh in ipairs(shapes) do
         pc[i], pg[i] = twin(randn(sh))
         bc[i], bg[i] = pair(sh)
         gs[i] = randn(sh)
      end
      local jc, jg = ffi.new('nr_sgd_job[4]'), ffi.new('nr_sgd_job[4]')
      local gg = {}
      for i = 1, 4 do
         gg[i] = gs[i]:cuda()
         jc[i - 1].param, jc[i - 1].grad, jc[i - 1].momentum_buf = pc[i].c, gs[i].c, bc[i].c
         jg[i - 1].param, jg[i - 1].grad, jg[i - 1].momentum_buf = pg[i].c, gg[i].c, bg[i].c
      end
      for _ = 1, 3 do
         ok(C.nr_sgd_step_many(jc, 4, 0.1, 0.9, 5e-4, 1), 'cpu'); ok(C.nr_sgd_step_many(jg, 4, 0.1, 0.9, 5e-4, 1), 'gpu')
      end
      for i = 1, 4 do close('sgd_step_many param ' .. i, pc[i], pg[i]); close('sgd_step_many momentum ' .. i, bc[i], bg[i]) end
   end)

   it('adam_step_many (Adam and AdamW, amsgrad, per-parameter steps, a parameter over several chunks) equals the CPU', function()
      local shapes = {{7, 3}, {300000}, {1}, {16, 8, 3, 3}}
      for _, variant in ipairs({{0, false}, {1, false}, {0, true}}) do
         local decoupled, ams = variant[1], variant[2]
         local pc, pg, mc, mg, vc, vg, gs, gg, xc, xg = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
         for i, sh in ipairs(shapes) do
            pc[i], pg[i] = twin(randn(sh))
            mc[i], mg[i] = pair(sh)
            vc[i], vg[i] = pair(sh)
            xc[i], xg[i] = pair(sh)
            gs[i] = randn(sh)
            gg[i] = gs[i]:cuda()
         end
         local jc, jg = ffi.new('nr_adam_job[4]'), ffi.new('nr_adam_job[4]')
         for i = 1, 4 do
            jc[i - 1].param, jc[i - 1].grad, jc[i - 1].exp_avg, jc[i - 1].exp_avg_sq = pc[i].c, gs[i].c, mc[i].c, vc[i].c
            jg[i - 1].param, jg[i - 1].grad, jg[i - 1].exp_avg, jg[i - 1].exp_avg_sq = pg[i].c, gg[i].c, mg[i].c, vg[i].c
            if ams then jc[i - 1].max_exp_avg_sq, jg[i - 1].max_exp_avg_sq = xc[i].c, xg[i].c end
         end
         for step = 1, 3 do
            for i = 1, 4 do jc[i - 1].step = step + i; jg[i - 1].step = step + i end   -- each parameter its own count
            -- (amsgrad: a small beta2 lets exp_avg_sq fall below its maximum, so the maximum matters)
            local beta2 = ams and 0.5 or 0.999
            for _, g in ipairs(gs) do g:copy(randn(g:shape())) end
            for i = 1, 4 do gg[i]:copy(gs[i]) end
            ok(C.nr_adam_step_many(jc, 4, 1e-2, 0.9, beta2, 1e-8, 1e-2, decoupled), 'cpu')
            ok(C.nr_adam_step_many(jg, 4, 1e-2, 0.9, beta2, 1e-8, 1e-2, decoupled), 'gpu')
         end
         for i = 1, 4 do
            close('adam_step_many param ' .. i, pc[i], pg[i])
            close('adam_step_many exp_avg ' .. i, mc[i], mg[i])
            close('adam_step_many exp_avg_sq ' .. i, vc[i], vg[i])
            if ams then close('adam_step_many max_exp_avg_sq ' .. i, xc[i], xg[i]) end
         end
      end
   end)

   it('clip_grad_norm (2-norm and the largest |g|; a gradient over several chunks; NaN, inf, an inf max_norm) equals the CPU', function()
      local shapes = {{7, 3}, {300000}, {1}, {16, 8, 3, 3}}
      -- {norm_type, max_norm, a NaN or an inf in one gradient}
      for _, case in ipairs({{2, 1.0}, {2, 1e6}, {math.huge, 0.5}, {2, 1.0, 0 / 0}, {math.huge, 0.5, 0 / 0},
                             {2, math.huge}, {2, math.huge, math.huge}}) do
         local gc, gg = {}, {}
         for i, sh in ipairs(shapes) do gc[i], gg[i] = twin(randn(sh)) end
         if case[3] then gc[2]:set(12345, case[3]); gg[2]:copy(gc[2]) end
         local tc = nr.optim.clip_grad_norm(gc, case[2], {norm_type = case[1]})
         local tg = nr.optim.clip_grad_norm(gg, case[2], {norm_type = case[1]})
         assert(tg:is_cuda(), 'the total lives on the GPU')
         close('clip_grad_norm total ' .. tostring(case[1]), tc, tg)
         for i = 1, #shapes do close('clip_grad_norm grad ' .. i, gc[i], gg[i]) end
      end
      -- no gradient at all: the total is 0, nothing else happens
      local t = nr.optim.clip_grad_norm({}, 1, {out = nr.zeros({1}, {device = 'cuda'})})
      assert.equal(0, t:item())
   end)

   it('bn_live_mask and l1_sign_add', function()
      local gamma = nr.tensor({0.5, -0.001, 0.2, 0, -0.9, 0.004})
      for _, cfg in ipairs({{0.01, 1e-3}, {0.5, 1e-3}, {0.01, 10}}) do
         local mc, mg = pair({6}, 'uint8')
         local lc, lg = ffi.new('int64_t[1]'), ffi.new('int64_t[1]')
         ok(C.nr_bn_live_mask(gamma.c, mc.c, cfg[1], cfg[2], lc), 'cpu')
         ok(C.nr_bn_live_mask(gamma:cuda().c, mg.c, cfg[1], cfg[2], lg), 'gpu')
         close('live mask', mc, mg)
         assert(lc[0] == lg[0], 'live counts differ: ' .. tostring(lc[0]) .. ' vs ' .. tostring(lg[0]))
      end
      local gc, gg = twin(randn({6}))
      ok(C.nr_l1_sign_add(gamma.c, gc.c, 1e-2), 'cpu'); ok(C.nr_l1_sign_add(gamma:cuda().c, gg.c, 1e-2), 'gpu')
      close('l1_sign_add', gc, gg)
   end)
end)

-- NaN as PyTorch propagates it (docs/DESIGN.md): the CUDA kernels keep the CPU's rule, so a
-- diverging run reaches the trainer's NaN-loss check on a GPU too.
describe('NaN propagates on the GPU as on the CPU', function()
   local nn = nr.nn
   local nan = 0 / 0
   local function is_nan(v) return v ~= v end
   local nan_positions = require('tests.lua.spec_util').nan_positions
   local function same(want, got, what)
      if table.concat(want, ',') ~= table.concat(got, ',') then
         error(string.format('%s: NaN at {%s} on the CPU, {%s} on the GPU', what, table.concat(want, ','), table.concat(got, ',')), 2)
      end
   end

   it('ReLU, fused BN + ReLU, the conv fold, relu / maximum / minimum / max / min', function()
      nr.manual_seed(6)
      local x = nr.randn({2, 3, 4, 4})
      x:set(5, nan); x:set(40, nan)
      local t = nr.tensor({nan, 1, -1, 0, nan})
      for k, op in ipairs({function(v) return v:relu() end, function(v) return v:maximum(0) end,
                           function(v) return v:minimum(0) end, function(v) return v:maximum(v:neg()) end}) do
         same(nan_positions(op(t)), nan_positions(op(t:cuda()):cpu()), 'elementwise op ' .. k)
      end
      assert(is_nan(t:cuda():max()) and is_nan(t:cuda():min()), 'max / min of a tensor holding NaN')
      assert(is_nan(x:cuda():max(2):cpu():sum()), 'max over a dim holding NaN')
      for _, mode in ipairs({'training', 'evaluate'}) do
         for _, fuse in ipairs({true, false}) do
            nr.manual_seed(7)
            local net = nn.Sequential{nn.Conv2d(3, 4, 3, {padding = 1}), nn.BatchNorm2d(4), nn.ReLU{inplace = true}}
            net.noFusion = not fuse
            net[mode](net)
            local g = net:clone():to('cuda')
            local want = nan_positions(net:forward(x))
            assert(#want > 0, 'the CPU forward lost the NaN')
            same(want, nan_positions(g:forward(x:cuda()):cpu()), mode .. (fuse and ' fused' or ''))
            if mode == 'evaluate' then
               same(want, nr.no_grad(function() return nan_positions(g:forward(x:cuda()):cpu()) end), 'folded')
            end
            same(nan_positions(nn.ReLU():forward(x)), nan_positions(nn.ReLU():to('cuda'):forward(x:cuda()):cpu()), 'ReLU')
         end
      end
   end)
end)

-- Tensor basics: construction, views, copies, arithmetic, reductions, matmul, npy round trip,
-- index select/copy, RNG reproducibility, memory release, and errors on bad input.
local nr = require 'nr'


describe('nr.Tensor', function()
   it('builds from nested tables and reports shape, dtype, device', function()
      local t = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      assert.same({2, 3}, t:shape())
      assert.equal('float32', t:dtype())
      assert.equal('cpu', t:device())
      assert.equal(6, t:numel())
      assert.same({{1, 2, 3}, {4, 5, 6}}, t:totable())
      local l = nr.tensor({0, 3, 9}, {dtype = 'int64'})
      assert.equal('int64', l:dtype())
      assert.same({0, 3, 9}, l:totable())
   end)

   it('views share storage: narrow, select, transpose, reshape', function()
      local t = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      local n = t:narrow(2, 2, 2)
      assert.same({{2, 3}, {5, 6}}, n:totable())
      n:fill(0)
      assert.same({{1, 0, 0}, {4, 0, 0}}, t:totable())
      assert.same({4, 0, 0}, t:select(1, 2):totable())
      assert.same({{1, 4}, {0, 0}, {0, 0}}, t:t():totable())
      assert.same({3, 2}, t:reshape(3, -1):shape())
      assert.is_false(t:t():is_contiguous())
      assert.same({{1, 4}, {0, 0}, {0, 0}}, t:t():contiguous():totable())
   end)

   it('does arithmetic with broadcasting and reductions', function()
      local a = nr.tensor({{1, 2}, {3, 4}})
      local b = nr.tensor({{10}, {20}})
      assert.same({{11, 12}, {23, 24}}, a:add(b):totable())
      local out = nr.full({2, 2}, 99)
      assert.is_true(rawequal(out, a:add(b, out)))   -- into a given tensor, as torch.add(..., out=)
      assert.same({{11, 12}, {23, 24}}, out:totable())
      assert.same({{2, 4}, {6, 8}}, (a * 2):totable())
      assert.same({{-1, -2}, {-3, -4}}, (-a):totable())
      assert.equal(10, a:sum())
      assert.equal(2.5, a:mean())
      assert.same({{3}, {7}}, a:sum(2):totable())
      assert.same({{3, 4}}, a:max(1):totable())
      assert.same({{1}, {1}}, a:argmax(2):totable())
   end)

   it('broadcasts as PyTorch: a lower-rank operand, and a result larger than either side', function()
      local a = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      assert.same({{11, 22, 33}, {14, 25, 36}}, a:add(nr.tensor({10, 20, 30})):totable())   -- (3) into (2, 3)
      assert.same({{11, 22, 33}, {14, 25, 36}}, (a + nr.tensor({10, 20, 30})):totable())
      local col, row = nr.tensor({{1}, {2}}), nr.tensor({{10, 20, 30}})
      assert.same({{11, 21, 31}, {12, 22, 32}}, col:add(row):totable())                      -- (2, 1) + (1, 3)
      assert.same({{10, 20, 30}, {20, 40, 60}}, (col * row):totable())
      assert.same({{{2, 4, 6}, {5, 7, 9}}}, nr.tensor({1, 2, 3}):add(a:unsqueeze(1)):totable())  -- (3) + (1, 2, 3)
      -- in place keeps the destination's shape: b may broadcast into it, not grow it
      local c = a:clone()
      c:sub_(nr.tensor({1, 1, 1}))
      assert.same({{0, 1, 2}, {3, 4, 5}}, c:totable())
      local function err(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(err(function() local x = col:clone(); x:add_(row) end)
         :find('Tensor:add_: in place, the result must keep the shape of', 1, true))
      assert.truthy(err(function() return a:add(nr.tensor({1, 2})) end)
         :find('Tensor:add: shapes (2, 3) and (2) do not broadcast: sizes 3 and 2 meet at dimension 2', 1, true))
      -- one rank: the same message (it was the C kernel's "nr_binary: shape mismatch"); in place
      -- named as such; an out of another shape than the result named
      assert.truthy(err(function() return a:add(nr.ones({2, 4})) end)
         :find('Tensor:add: shapes (2, 3) and (2, 4) do not broadcast', 1, true))
      assert.truthy(err(function() local x = nr.ones({3}); x:add_(nr.ones({4})) end)
         :find('Tensor:add_: shapes (3) and (4) do not broadcast', 1, true))
      assert.truthy(err(function() return row:add(nr.ones({4, 3}), row) end)
         :find('Tensor:add: out is float32 cpu [1 x 3], the result has shape (4, 3)', 1, true))
   end)

   it('unsqueeze, squeeze, permute and expand are views; nr.cat and nr.stack join tensors', function()
      local a = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      assert.same({1, 2, 3}, a:unsqueeze(1):shape())
      assert.same({2, 3, 1}, a:unsqueeze(-1):shape())
      assert.same({2, 1, 3}, a:unsqueeze(2):shape())
      assert.same({{{1, 2, 3}}, {{4, 5, 6}}}, a:unsqueeze(2):totable())
      assert.same({2, 3}, a:unsqueeze(1):unsqueeze(4):squeeze():shape())
      assert.same({1, 2, 3}, a:unsqueeze(1):squeeze(2):shape())   -- not size 1: unchanged
      assert.same({2, 3}, a:unsqueeze(1):squeeze(1):shape())
      local p = a:permute(2, 1)
      assert.same({{1, 4}, {2, 5}, {3, 6}}, p:totable())
      assert.same({3, 2}, a:permute({-1, 1}):shape())
      local e = nr.tensor({{1}, {2}}):expand(2, 3)
      assert.same({{1, 1, 1}, {2, 2, 2}}, e:totable())
      assert.same({4, 2, 3}, a:expand({4, -1, -1}):shape())
      -- views share the storage
      a:unsqueeze(1):select(1, 1):select(1, 2):fill(0)
      assert.same({0, 0, 0}, a:select(1, 2):totable())
      a:select(1, 2):copy(nr.tensor({4, 5, 6}))
      -- cat and stack, along any dimension
      local b = nr.tensor({{7, 8, 9}})
      assert.same({{1, 2, 3}, {4, 5, 6}, {7, 8, 9}}, nr.cat({a, b}, 1):totable())
      assert.same({{1, 2, 3, 1, 2, 3}, {4, 5, 6, 4, 5, 6}}, nr.cat({a, a}, -1):totable())
      assert.same({2, 2, 3}, nr.stack({a, a}):shape())
      assert.same({{{1, 2, 3}, {1, 2, 3}}, {{4, 5, 6}, {4, 5, 6}}}, nr.stack({a, a}, 2):totable())
      assert.same({2, 3, 2}, nr.stack({a, a}, -1):shape())
      local function err(f) local ok, m = pcall(f); assert.is_false(ok); return tostring(m) end
      assert.truthy(err(function() return a:expand(2, 4) end):find('cannot expand dimension 2', 1, true))
      assert.truthy(err(function() return a:permute(1, 1) end):find('dimension 1 is given twice', 1, true))
      assert.truthy(err(function() return a:permute(1) end):find('expected 2 dimensions', 1, true))
      assert.truthy(err(function() return nr.cat({a, b}, 2) end):find('does not join', 1, true))
      assert.truthy(err(function() return nr.stack({a, b}) end):find('stacked tensors have one shape', 1, true))
      assert.truthy(err(function() return nr.cat({}) end):find('expected a non-empty list of tensors', 1, true))
      local unset = nil   -- (an unassigned variable)
      assert.truthy(err(function() return nr.cat({a, unset, b}) end):find('nr.cat: entry 2 is nil', 1, true))
      assert.truthy(err(function() return nr.stack({a, unset, a}) end):find('nr.stack: entry 2 is nil', 1, true))
      -- a write through an expanded view is refused (its elements share memory)
      assert.truthy(err(function() local v = nr.zeros({1, 3}):expand(2, 3); v:add_(1) end):find('share memory', 1, true))
   end)

   it('reductions take keepdim = false (PyTorch\'s default) and dimensions counted from the end', function()
      local a = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      assert.same({6, 15}, a:sum(2, false):totable())
      assert.same({6, 15}, a:sum(-1, false):totable())
      assert.same({{5, 7, 9}}, a:sum(1, true):totable())
      assert.same({2.5, 3.5, 4.5}, a:mean(-2, false):totable())
      assert.same({3, 6}, a:max(2, false):totable())
      assert.same({2, 2}, a:argmax(-1, false):totable())
      -- views and index ops count from the end too
      assert.same({{2, 3}, {5, 6}}, a:narrow(-1, 2, 2):totable())
      assert.same({4, 5, 6}, a:select(-2, 2):totable())
      assert.same({3, 2}, a:transpose(1, -1):shape())
      assert.same({{3, 1}, {6, 4}}, a:index_select(-1, {2, 0}):totable())
      -- a wrong keepdim or dimension is named (a second argument was ignored before)
      local function err(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(err(function() return a:sum(2, 'no') end):find('Tensor:sum: keepdim must be true or false, got "no"', 1, true))
      assert.truthy(err(function() return a:sum(nil, false) end):find('Tensor:sum: keepdim needs a dimension', 1, true))
      assert.truthy(err(function() return a:mean(3) end):find('Tensor:mean: dimension 3 out of range 1..2 (or -2..-1)', 1, true))
      assert.truthy(err(function() return a:narrow(-3, 1, 1) end):find('Tensor:narrow: dimension -3 out of range', 1, true))
      -- a 0-d tensor takes dimension 1 or -1 (PyTorch's 0 and -1) and gives a 0-d result
      local z = nr.tensor(5)
      assert.same({0, 5, 0, 5, 0}, {z:sum(1):dim(), z:sum(-1, false):item(), z:mean(1, true):dim(), z:max(-1):item(),
                                    z:argmax(1):item()})
      assert.equal(0, z:squeeze(-1):dim())
      assert.truthy(err(function() return z:sum(2) end):find('Tensor:sum: dimension 2 out of range 1..1', 1, true))
   end)

   it('multiplies matrices through BLAS, with transposes', function()
      local a = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      local b = nr.tensor({{1, 0}, {0, 1}, {1, 1}})
      assert.same({{4, 5}, {10, 11}}, a:matmul(b):totable())
      assert.same({{17, 22, 27}, {22, 29, 36}, {27, 36, 45}}, a:matmul(a, {trans_a = true}):totable())
      assert.has_error(function() a:matmul(a) end, nil)
      -- operands of another rank are named (a vector b used to fail inside the size lookup)
      local function err(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(err(function() return a:matmul(nr.ones({3})) end)
         :find('Tensor:matmul: b must be a matrix (2-d), got float32 cpu [3] (a vector: reshape it', 1, true))
      assert.truthy(err(function() return nr.ones({2}):matmul(b, {trans_a = true}) end)
         :find('Tensor:matmul: a must be a matrix (2-d)', 1, true))
      assert.truthy(err(function() return a:matmul(nr.ones({3, 2, 1})) end):find('b must be a matrix (2-d), got float32 cpu [3 x 2 x 1]', 1, true))
   end)

   it('matmul on every path (narrow own kernel, OpenBLAS, split over threads) matches a double reference', function()
      -- narrow: C with <= 64 columns, a multiple of 8, B not transposed (core/gemm.c); row and
      -- column tails, A transposed, alpha / beta; then thread-count independence of a split product
      nr.manual_seed(21)
      local function ref(a, b, c0, ta, tb, alpha, beta)
         local A, B, C0 = a:totable(), b:totable(), c0:totable()
         local m = ta and #A[1] or #A
         local k = ta and #A or #A[1]
         local n = tb and #B or #B[1]
         local out = {}
         for i = 1, m do
            out[i] = {}
            for j = 1, n do
               local s = 0
               for p = 1, k do s = s + (ta and A[p][i] or A[i][p]) * (tb and B[j][p] or B[p][j]) end
               out[i][j] = alpha * s + beta * C0[i][j]
            end
         end
         return out
      end
      local worst, cases = 0, 0
      for _, m in ipairs({1, 5, 6, 7, 13}) do
         for _, n in ipairs({8, 16, 24, 64, 72, 9}) do
            for _, k in ipairs({1, 3, 37}) do
               for _, t in ipairs({{false, false}, {true, false}, {false, true}}) do
                  local ta, tb = t[1], t[2]
                  local a = nr.randn(ta and {k, m} or {m, k})
                  local b = nr.randn(tb and {n, k} or {k, n})
                  local c = nr.randn({m, n})
                  local want = ref(a, b, c, ta, tb, 0.7, 0.3)
                  local got = a:matmul(b, {trans_a = ta, trans_b = tb, alpha = 0.7, beta = 0.3, out = c}):totable()
                  for i = 1, m do
                     for j = 1, n do
                        local e = math.abs(got[i][j] - want[i][j])
                        worst = e == e and math.max(worst, e) or math.huge -- math.max drops a NaN
                     end
                  end
                  cases = cases + 1
               end
            end
         end
      end
      assert.are.equal(270, cases)
      assert.is_true(worst < 1e-4, 'max difference ' .. worst)
      -- large enough to be split over threads (> 4 MFLOP): the narrow kernel gives the same bits
      -- on 1 and 2 threads; OpenBLAS's blocks may round differently (as its own threading did)
      for _, n in ipairs({64, 200}) do
         local a, b = nr.randn({300, 256}), nr.randn({256, n})
         local threads = nr.get_num_threads()
         nr.set_num_threads(1)
         local one = a:matmul(b)
         nr.set_num_threads(2)
         local two = a:matmul(b)
         nr.set_num_threads(threads)
         if n == 64 then
            assert.are.same(one:totable(), two:totable())
         else
            assert.is_true((one - two):abs():max() < 1e-3)
         end
      end
   end)

   it('matmul reads any strided operand (a copy where BLAS cannot) and refuses an out BLAS cannot write', function()
      local base = nr.tensor({1, 2, 3, 4, 5, 6, 7, 8, 9})
      local cases = {
         {base:as_strided({1000, 4}, {0, 1}, 0), 'rows sharing one row (stride 0)'},
         {base:as_strided({3, 4}, {1, 1}, 0), 'overlapping rows'},
         {base:as_strided({3, 3}, {-3, 1}, 6), 'reversed rows'},
         {base:as_strided({3, 3}, {1, 3}, 0), 'a transposed view'},
      }
      for _, c in ipairs(cases) do
         local a = c[1]
         local b = nr.randn({a:size(2), 8})
         local want = a:contiguous():matmul(b)
         assert.are.equal(0, (a:matmul(b) - want):abs():max(), c[2])
         assert.are.equal(0, (b:t():matmul(a, {trans_b = true}) - want:t()):abs():max(), c[2] .. ' as b')
      end
      local out = nr.zeros({8}):as_strided({1000, 8}, {0, 1}, 0)
      local ok, e = pcall(function() return nr.ones({1000, 4}):matmul(nr.ones({4, 8}), {out = out}) end)
      assert.is_false(ok)
      assert.truthy(tostring(e):find('out f32 cpu (1000, 8) is not a matrix layout BLAS takes', 1, true), tostring(e))
      assert.truthy(tostring(e):find('write into a contiguous out', 1, true))
      -- empty operands: an empty product, or zeros when the inner dimension is empty (as PyTorch)
      local z = nr.full({3, 4}, 7)
      nr.zeros({3, 0}):matmul(nr.zeros({0, 4}), {out = z})
      assert.equal(0, z:abs():max())
      assert.same({3, 0}, nr.ones({3, 2}):matmul(nr.ones({2, 0})):shape())
      assert.same({0, 4}, nr.zeros({0, 3}):matmul(nr.zeros({3, 4})):shape())
   end)

   it('elementwise ops refuse an out that shares memory with an input other than as the same view', function()
      local function refused(fn, what)
         local ok, e = pcall(fn)
         assert.is_false(ok, what)
         assert.truthy(tostring(e):find('share memory', 1, true) or tostring(e):find('overlap in memory', 1, true), tostring(e))
      end
      local a = nr.tensor({{1, 2}, {3, 4}, {5, 6}})
      refused(function() a:add_(a:narrow(1, 1, 1)) end, 'a row of itself, broadcast')
      local b = nr.tensor({{1, 2}, {3, 4}})
      refused(function() b:add_(b:t()) end, 'its transpose')
      refused(function() b:axpy_(1, b:t()) end, 'axpy from its transpose')
      local x = nr.tensor({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})
      refused(function() x:narrow(1, 1, 6):mul(2, x:narrow(1, 2, 6)) end, 'an out shifted by one')
      refused(function() nr.ones({1}):as_strided({3}, {0}, 0):neg_() end, 'a unary op in place on stride 0')
      refused(function() nr.zeros({1}):as_strided({3}, {0}, 0):add_(1) end, 'stride 0')
      refused(function() nr.zeros({6}):as_strided({3, 4}, {1, 1}, 0):add_(1) end, 'sliding windows')
      assert.same({{1, 2}, {3, 4}, {5, 6}}, a:totable())           -- nothing was written
      -- in place on the same view, and disjoint views of one tensor, stay fine
      b:add_(b):mul_(0.5):square_()
      assert.same({{1, 4}, {9, 16}}, b:totable())
      local y = nr.tensor({1, 2, 3, 4})
      y:narrow(1, 1, 2):add_(y:narrow(1, 3, 2))
      assert.same({4, 6, 3, 4}, y:totable())
      local z = nr.zeros({2, 3})
      nr.ones({3, 2}):mul(3, z:t())                                  -- a transposed out of its own memory
      assert.same({{3, 3, 3}, {3, 3, 3}}, z:totable())
      -- strided views whose memory ranges meet are computed (as PyTorch), reading the input first:
      -- column blocks of one matrix, interleaved elements, and strided views that share elements
      local m = nr.tensor({{1, 2, 3, 4}, {5, 6, 7, 8}})
      m:narrow(2, 1, 2):add_(m:narrow(2, 3, 2))
      assert.same({{4, 6, 3, 4}, {12, 14, 7, 8}}, m:totable())
      local v = nr.tensor({1, 2, 3, 4, 5, 6})
      v:as_strided({3}, {2}, 0):add_(v:as_strided({3}, {2}, 1))
      assert.same({3, 2, 7, 4, 11, 6}, v:totable())
      local w = nr.tensor({1, 2, 3, 4, 5, 6, 7})
      w:as_strided({3}, {2}, 2):add_(w:as_strided({3}, {2}, 0))        -- reads 1, 3, 5 before writing 3, 5, 7
      assert.same({1, 2, 4, 4, 8, 6, 12}, w:totable())
   end)

   it('a reduction refuses an out that overlaps its input', function()
      local C = require('nr.ffi').C
      local a = nr.tensor({{1, 2}, {3, 4}})
      local out = a:as_strided({2, 1}, {1, 1}, 0)
      assert.are_not.equal(0, C.nr_reduce(a.c, 1, out.c, C.NR_RED_SUM))
      assert.truthy(require('ffi').string(C.nr_last_error()):find('overlaps', 1, true))
      assert.same({{1, 2}, {3, 4}}, a:totable())
   end)

   it('selects and copies along a dimension (channel surgery)', function()
      local w = nr.tensor({{1, 2, 3}, {4, 5, 6}, {7, 8, 9}})
      local s = w:index_select(1, {2, 0})
      assert.same({{7, 8, 9}, {1, 2, 3}}, s:totable())
      local c = w:index_select(2, {1})
      assert.same({{2}, {5}, {8}}, c:totable())
      local z = nr.zeros({4, 3})
      z:index_copy(1, {3, 1}, s)
      assert.same({{0, 0, 0}, {1, 2, 3}, {0, 0, 0}, {7, 8, 9}}, z:totable())
      local idx = nr.tensor({1}, {dtype = 'int64'})
      assert.same({{4, 5, 6}}, w:index_select(1, idx):totable())
      assert.has_error(function() w:index_select(1, {3}) end)
      -- channels-last operands: gathered in their own element order, along every dimension, equal
      -- to the contiguous result; an out buffer is filled in place; mixed layouts are refused
      nr.manual_seed(3)
      local x = nr.randn({3, 5, 4, 6})
      local xc = x:contiguous('channels_last')
      for dim, ix in ipairs({{2, 0}, {4, 1, 1}, {3, 0}, {5, 2}}) do
         local want = x:index_select(dim, ix)
         local got = xc:index_select(dim, ix)
         assert.equal('channels_last', got:memory_format())
         assert.equal(0, (got:contiguous() - want):abs():max(), 'dim ' .. dim)
         local back = nr.zeros(x:shape(), {memory_format = 'channels_last'})
         back:index_copy(dim, ix, got)
         local ref = nr.zeros(x:shape())
         ref:index_copy(dim, ix, want)
         assert.equal(0, (back:contiguous() - ref):abs():max(), 'index_copy dim ' .. dim)
      end
      local into = nr.empty({3, 2, 4, 6}, {memory_format = 'channels_last'})
      assert.equal(into, xc:index_select(2, {4, 0}, into))
      assert.equal(0, (into:contiguous() - x:index_select(2, {4, 0})):abs():max())
      local ok, err = pcall(xc.index_select, xc, 2, {4, 0}, nr.empty({3, 2, 4, 6}))
      assert.is_false(ok)
      assert.matches('must both be contiguous or both channels%-last', tostring(err))
   end)

   it('reproduces random draws from a seed', function()
      nr.manual_seed(7)
      local a = nr.randn({100})
      nr.manual_seed(7)
      local b = nr.randn({100})
      assert.same(a:totable(), b:totable())
      local mean, var = a:mean(), a:square():mean()
      assert.is_true(math.abs(mean) < 0.35 and var > 0.5 and var < 1.5)
      local p = nr.randperm(10):totable()
      table.sort(p)
      assert.same({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, p)
   end)

   it('round-trips .npy files', function()
      local dir = os.getenv('NR_TEST_TMP') or '/tmp'
      os.execute('mkdir -p ' .. dir)
      local path = dir .. '/t.npy'
      local t = nr.randn({3, 4, 5})
      t:save(path)
      local u = nr.load(path)
      assert.same(t:shape(), u:shape())
      assert.same(t:totable(), u:totable())
      local l = nr.tensor({1, 2, 3}, {dtype = 'int64'})
      l:save(path)
      assert.same({1, 2, 3}, nr.load(path):totable())
      local ok, err = pcall(nr.load, dir .. '/does-not-exist.npy')
      assert.is_false(ok)
      assert.matches('does%-not%-exist%.npy', err)
   end)

   it('refuses a .npy header promising more data than the file holds, before allocating it', function()
      -- found by fuzzing nr.load: a 96-byte file with shape (4000000000,) allocated 32 GB first
      -- ("out of host memory" on a small machine, the memory taken for nothing on a big one)
      local dir = os.getenv('NR_TEST_TMP') or '/tmp'
      os.execute('mkdir -p ' .. dir)
      local path = dir .. '/lying_header.npy'
      local function write(shape)
         local h = "{'descr': '<i8', 'fortran_order': False, 'shape': " .. shape .. ", }"
         h = h .. string.rep(' ', (64 - (10 + #h + 1) % 64) % 64) .. '\n'
         local f = assert(io.open(path, 'wb'))
         f:write('\147NUMPY\1\0', string.char(#h % 256, math.floor(#h / 256)), h, string.rep('\0', 16))
         f:close()
      end
      write('(4000000000,)')
      local peak = nr.memory().cpu.peak
      local ok, err = pcall(nr.load, path)
      assert.is_false(ok)
      assert.matches('truncated data: the header\'s shape %(4000000000%) needs more than the 16 bytes after it', err)
      assert.equals(peak, nr.memory().cpu.peak)
      write('(0, 1000000000000)') -- an empty array needs no bytes, whatever its other sizes
      local e = nr.load(path)
      assert.same({0, 1000000000000}, e:shape())
      assert.same({0, 1000000000000}, e:clone():shape()) -- and is a tensor like any other
      -- ... up to 2^40 per dimension, as nr.empty: a larger size loaded, then every copy refused it
      write('(0, 4611686018427387904)')
      ok, err = pcall(nr.load, path)
      assert.is_false(ok)
      assert.truthy(tostring(err):find(path .. ': bad shape in header: size 4611686018427387904 of dimension 2 is more than 2^40', 1, true), err)
      write('(2,)')
      assert.same({0, 0}, nr.load(path):totable())
   end)

   it('reads each .npy header key at its own value', function()
      -- the header was searched for substrings: 'fortran_order':True without numpy's space read as
      -- C order, and a '<f4' anywhere in the header (another key) made a float16 file float32
      local dir = os.getenv('NR_TEST_TMP') or '/tmp'
      os.execute('mkdir -p ' .. dir)
      local path = dir .. '/header_keys.npy'
      local function load(header, data)
         local h = header .. string.rep(' ', (64 - (10 + #header + 1) % 64) % 64) .. '\n'
         local f = assert(io.open(path, 'wb'))
         f:write('\147NUMPY\1\0', string.char(#h % 256, math.floor(#h / 256)), h, data)
         f:close()
         return pcall(nr.load, path)
      end
      local two_f32 = '\0\0\128\63\0\0\0\64' -- 1.0, 2.0
      local ok, t = load("{'descr':'<f4','fortran_order':False,'shape':(2,),}", two_f32)
      assert.is_true(ok, t)
      assert.same({1, 2}, t:totable())
      local err
      ok, err = load("{'descr': '<f4', 'fortran_order':True, 'shape': (2,), }", two_f32)
      assert.is_false(ok)
      assert.matches('Fortran%-ordered arrays are not supported', err)
      ok, err = load("{'descr': '<f2', 'fortran_order': False, 'shape': (4,), 'note': '<f4', }", two_f32)
      assert.is_false(ok)
      assert.matches("unsupported dtype in header {'descr': '<f2'", err)
      ok, err = load("{'descr': '<f4', 'shape': (2,), }", two_f32)
      assert.is_false(ok)
      assert.matches("lacks 'descr', 'fortran_order' or 'shape'", err)
   end)

   it('releases memory on free and reports it', function()
      -- earlier tests' garbage is finalized now and the collector held still, so that no tensor
      -- freed by a GC step in between moves the process-wide count (this flaked once in CI)
      collectgarbage('collect')
      collectgarbage('collect')
      collectgarbage('stop')
      local ok, err = pcall(function()
         local before = nr.memory().cpu.in_use
         local t = nr.empty({1024, 1024})
         assert.is_true(nr.memory().cpu.in_use >= before + 4 * 1024 * 1024)
         t:free()
         assert.equal(before, nr.memory().cpu.in_use)
         assert.has_error(function() t:numel() end, 'nr.Tensor: use of a freed tensor')
      end)
      collectgarbage('restart')
      assert(ok, err)
   end)

   it('get keeps each value when compiled into a hot loop (two reads in one expression)', function()
      -- values read back through one shared buffer came out as the last read's once LuaJIT
      -- compiled the loop: a:get(i) == b:get(i) held for a ~= b, math.max(a, b) gave b's
      local a = nr.tensor({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {dtype = 'int64'})
      local b = nr.zeros({10}, {dtype = 'int64'})
      local f = nr.tensor({0.5, 1.5, 2.5, 3.5})
      local equal, sum, pairs_ok = 0, 0, true
      for _ = 1, 200 do
         for i = 1, 10 do
            if a:get(i) == b:get(i) then equal = equal + 1 end
         end
      end
      for _ = 1, 200 do
         for i = 1, 10 do sum = sum + math.max(a:get(i), b:get(i)) end
      end
      for _ = 1, 200 do
         local u, v, w, x = f:get(1), f:get(2), f:get(3), f:get(4)
         pairs_ok = pairs_ok and u == 0.5 and v == 1.5 and w == 2.5 and x == 3.5
      end
      assert.are.equal(0, equal)
      assert.are.equal(200 * 55, sum)
      assert.is_true(pairs_ok)
   end)

   it('gives clear errors on bad input', function()
      local a = nr.zeros({2, 3})
      local ok, err = pcall(function() return a:add(nr.zeros({3, 2})) end)
      assert.is_false(ok)
      assert.matches('do not broadcast', err)
      assert.matches('%(2, 3%)', err)
      -- raised at the caller's line (the method, the in-place one and the operator alike)
      for _, f in ipairs({function() local r = a:add(nr.zeros({3, 2})); return r end,
                          function() local r = a:mul_(nr.zeros({3, 2})); return r end,
                          function() local r = a - nr.zeros({3, 2}); return r end}) do
         local line = debug.getinfo(f, 'S').linedefined
         ok, err = pcall(f)
         assert.truthy(err:find('tensor_spec.lua:' .. line .. ': Tensor:[%a_]+: shapes %(2, 3%) and %(3, 2%) do not broadcast'), err)
      end
      ok, err = pcall(nr.zeros, {2, -1})
      assert.is_false(ok)
      assert.matches('non%-negative', err)
      local line = debug.getinfo(1, 'l').currentline + 1
      ok, err = pcall(function() local r = a:add('x'); return r end)
      assert.truthy(err:find('tensor_spec.lua:' .. line .. ': Tensor:add: operand must be a number or a tensor, got "x"', 1, true), err)
      ok, err = pcall(nr.tensor, a)
      assert.truthy(err:find('nr.tensor: values is a tensor already', 1, true), err)
      -- t[i] from a PyTorch habit: said (it gave nil), other fields still look up as before
      ok, err = pcall(function() return a[1] end)
      assert.is_false(ok)
      assert.truthy(err:find('Tensor: t[1] is not indexing; use t:get(i)', 1, true), err)
      assert.is_nil(a.no_such_field)
      local s = nr.nn.Sequential{nr.nn.ReLU(), nr.nn.Identity()}
      assert.are.equal('Identity', s:get(2):typename())
      for _, i in ipairs({0, 3, 1.5}) do
         ok, err = pcall(s.get, s, i)
         assert.truthy(err:find('Sequential:get: index ' .. i .. ' is outside 1..2 (modules are numbered from 1 here', 1, true), err)
      end
      ok, err = pcall(nr.zeros, {2}, {dtype = 'float16'})
      assert.is_false(ok)
      assert.matches('unknown dtype', err)
      ok, err = pcall(function() return a:narrow(2, 3, 2) end)
      assert.is_false(ok)
      assert.matches('outside', err)
      ok, err = pcall(function() return a:reshape(4, 2) end)
      assert.is_false(ok)
      assert.matches('cannot reshape', err)
      ok, err = pcall(nr.zeros, {2}, {device = 'tpu'})
      assert.matches('unknown device', err)
      ok, err = pcall(nr.zeros, {2}, {device = 'cuda:x'})
      assert.matches('"cpu", "cuda" or "cuda:N"', err)
      assert.equal(0, a:device_index())
      if not nr.cuda.available() then  -- a GPU index that cannot be selected is named
         ok, err = pcall(nr.zeros, {2}, {device = 'cuda:3'})
         assert.is_false(ok)
         assert.truthy(tostring(err):find(nr.cuda.built() and 'cuda:3' or 'built without CUDA', 1, true), err)
      end
   end)

   it('nr.cuda.versions reports the CUDA libraries without a GPU (nil without the backend)', function()
      local v = nr.cuda.versions()
      if not nr.cuda.built() then
         assert.is_nil(v)
         return
      end
      assert.is_true(v.runtime >= 11000, 'runtime ' .. v.runtime)
      assert.is_true(v.cudnn >= 90000 and v.cudnn_built >= 90000, 'cuDNN ' .. v.cudnn .. ' built ' .. v.cudnn_built)
      assert.is_true(v.cublas >= 110000 and v.cublas_built >= 110000, 'cuBLAS ' .. v.cublas .. ' built ' .. v.cublas_built)
      assert.is_true(v.driver >= 0)
   end)

   it('nr.cuda.memory works without a GPU (zeros for cuda:0) and names a device that is not there', function()
      local n = nr.cuda.device_count()
      local m = nr.cuda.memory()
      assert.is_true(m.in_use >= 0 and m.peak >= m.in_use and m.cached >= 0)
      if n == 0 then assert.same({0, 0, 0}, {m.in_use, m.allocations, m.cached}) end
      for _, bad in ipairs({math.max(n, 1), 2 ^ 40}) do -- 2^40 was truncated to int32 by the FFI: cuda:0
         local ok, err = pcall(nr.cuda.memory, bad)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(string.format('no device cuda:%d (%d visible)', bad, n), 1, true), err)
      end
      local ok, err = pcall(nr.cuda.reset_peak_memory, -1)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('nr.cuda.reset_peak_memory: device must be a non-negative integer', 1, true), err)
   end)

   it('copy refuses dense views of one memory that overlap, as PyTorch does', function()
      local t = nr.tensor({0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
      local ok, err = pcall(function() t:narrow(1, 2, 9):copy(t:narrow(1, 1, 9)) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('overlap in memory; copy from a clone of src', 1, true), err)
      t:narrow(1, 2, 9):copy(t:narrow(1, 1, 9):clone())   -- through a clone it works
      assert.same({0, 0, 1, 2, 3, 4, 5, 6, 7, 8}, t:totable())
      t:copy(t)                                          -- the same view: nothing to do
      t:view({2, 5}):copy(t)                             -- row-major views of one memory: the same order
      t:narrow(1, 1, 5):copy(t:narrow(1, 6, 5))          -- disjoint halves
      assert.same({4, 5, 6, 7, 8, 4, 5, 6, 7, 8}, t:totable())
      -- the same memory read in another layout overlaps too (an in-place transpose)
      local x = nr.randn({2, 3, 4, 4})
      local cl = x:as_strided({2, 3, 4, 4}, require('nr.tensor').channels_last_stride({2, 3, 4, 4}))
      ok, err = pcall(function() cl:copy(x) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('overlap in memory', 1, true), err)
   end)

   it('copy between views of one memory: a transpose onto itself is refused, strided views copy as from a clone', function()
      -- a:copy(a:t()) read elements it had already overwritten ({1, 3, 3, 4}); PyTorch refuses it
      local a = nr.tensor({{1, 2}, {3, 4}})
      local ok, err = pcall(function() a:copy(a:t()) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('overlap in memory; copy from a clone of src', 1, true), err)
      assert.same({{1, 2}, {3, 4}}, a:totable())                 -- nothing written
      a:copy(a:t():clone())
      assert.same({{1, 3}, {2, 4}}, a:totable())
      -- interleaved views that share no element: a column into its neighbour, both ways
      local m = nr.tensor({{1, 2, 3}, {4, 5, 6}, {7, 8, 9}})
      m:select(2, 1):copy(m:select(2, 2))
      assert.same({{2, 2, 3}, {5, 5, 6}, {8, 8, 9}}, m:totable())
      m:select(2, 3):copy(m:select(2, 2))
      assert.same({{2, 2, 2}, {5, 5, 5}, {8, 8, 8}}, m:totable())
      -- strided views that do share elements: the result is src's values before the copy
      m = nr.tensor({{1, 2, 3, 4}, {5, 6, 7, 8}})
      m:narrow(2, 2, 3):copy(m:narrow(2, 1, 3))
      assert.same({{1, 1, 2, 3}, {5, 5, 6, 7}}, m:totable())
      m = nr.tensor({{1, 2, 3, 4}, {5, 6, 7, 8}})
      m:narrow(2, 1, 3):copy(m:narrow(2, 2, 3))
      assert.same({{2, 3, 4, 4}, {6, 7, 8, 8}}, m:totable())
      -- a strided destination over a dense source it overlaps (every other element <- the first half)
      local t = nr.tensor({1, 2, 3, 4, 5, 6})
      t:as_strided({3}, {2}, 0):copy(t:narrow(1, 1, 3))
      assert.same({1, 2, 2, 4, 3, 6}, t:totable())
      t = nr.tensor({1, 2, 3, 4, 5, 6})
      t:narrow(1, 4, 3):copy(t:as_strided({3}, {2}, 1))          -- 2, 4, 6 into the second half
      assert.same({1, 2, 3, 2, 4, 6}, t:totable())
      -- a copy into a transposed view of another tensor is untouched by all this
      local b = nr.zeros({2, 2})
      b:t():copy(nr.tensor({{1, 2}, {3, 4}}))
      assert.same({{1, 3}, {2, 4}}, b:totable())
   end)

   it('nr.tensor with dtype bfloat16 stores the values rounded to bf16 (nearest even), as :bfloat16()', function()
      local vals = {1.5, 2, -3, 100, 1 + 2 ^ -8, 1 + 3 * 2 ^ -8, -0.1, 3.0e38}
      local b = nr.tensor(vals, {dtype = 'bfloat16'})
      assert.equal('bfloat16', b:dtype())
      assert.same(nr.tensor(vals):bfloat16():totable(), b:totable())
      local got = b:totable()
      assert.same({1.5, 2, -3, 100, 1, 1 + 2 ^ -6}, {got[1], got[2], got[3], got[4], got[5], got[6]})
      assert.is_true(math.abs(got[7] + 0.1) < 0.001 and got[7] ~= -0.1, tostring(got[7]))
      assert.same({{1.5, -2}, {0.25, 8}}, nr.tensor({{1.5, -2}, {0.25, 8}}, {dtype = 'bf16'}):totable())
      assert.same(nr.tensor({1, 2}, {dtype = 'int64'}):totable(), {1, 2})   -- other dtypes as before
   end)

   it('NaN read back from tensor memory is a Lua NaN whatever its bits (get, item, totable, reductions, print)', function()
      local ffi = require 'ffi'
      -- LuaJIT keeps type tags in NaN payloads: these patterns used to come back as nil
      local t = nr.zeros({4})
      local bits = ffi.cast('uint32_t *', t:data())
      bits[0], bits[1], bits[2], bits[3] = 0xFFFFFFFF, 0xFFFD0000, 0x7FC00000, 0xFFC00001
      local function is_nan(v) return type(v) == 'number' and v ~= v end
      for i = 1, 4 do assert.is_true(is_nan(t:get(i)), 'get(' .. i .. ') gave ' .. type(t:get(i))) end
      for i, v in ipairs(t:totable()) do assert.is_true(is_nan(v), 'totable()[' .. i .. ']') end
      assert.equal(4, #t:totable())
      assert.is_true(is_nan(t:narrow(1, 2, 1):item()))
      assert.is_true(is_nan(t:narrow(1, 1, 1):item() + 1))
      assert.is_true(is_nan(t:sum()))
      assert.is_true(is_nan(t:mean()))
      assert.is_true(is_nan(t:max()))
      assert.equal('nr.Tensor f32 cpu [4] {nan, nan, nan, nan}', tostring(t))
      assert.truthy(tostring(nr.zeros({10}):copy(nr.tensor({1, 2, 3, 4, 5, 6, 7, 8, 9, 10})):narrow(1, 1, 6):contiguous()))
      local big = nr.zeros({8})
      ffi.cast('uint32_t *', big:data())[3] = 0xFFFFFFFF
      assert.truthy(tostring(big):find('1 non-finite', 1, true), tostring(big))
      -- bf16 raw bits, and through a conversion
      local h = nr.zeros({2}, {dtype = 'bfloat16'})
      local hb = ffi.cast('uint16_t *', h:data())
      hb[0], hb[1] = 0xFFFF, 0xFFFD
      assert.is_true(is_nan(h:get(1)) and is_nan(h:get(2)))
      assert.is_true(is_nan(h:float():get(2)))
      -- an .npy file whose bytes are all 0xff
      local dir = os.getenv('NR_TEST_TMP') or '/tmp'
      os.execute('mkdir -p ' .. dir)
      local path = dir .. '/nan_ff.npy'
      local hd = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
      hd = hd .. string.rep(' ', (64 - (10 + #hd + 1) % 64) % 64) .. '\n'
      local f = assert(io.open(path, 'wb'))
      f:write('\147NUMPY\1\0' .. string.char(#hd % 256, math.floor(#hd / 256)) .. hd .. string.rep('\255', 8))
      f:close()
      local l = nr.load(path)
      assert.is_true(is_nan(l:get(1)) and is_nan(l:sum()))
   end)

   it('NaN propagates through the vectorised loops too (100003 elements, NaNs anywhere)', function()
      local n = 100003
      local a, b = nr.randn({n}), nr.randn({n})
      a:set(50001, 0 / 0); b:set(70001, 0 / 0); a:set(n, 0 / 0)
      local function isnan(v) return v ~= v end
      for _, op in ipairs({'maximum', 'minimum'}) do
         local r = a[op](a, b)
         assert.is_true(isnan(r:get(50001)) and isnan(r:get(70001)) and isnan(r:get(n)) and not isnan(r:get(1)), op)
         local s = a[op](a, 0)
         assert.is_true(isnan(s:get(50001)) and isnan(s:get(n)) and not isnan(s:get(1)), op .. ' with a scalar')
      end
      local r = a:relu()
      assert.is_true(isnan(r:get(50001)) and isnan(r:get(n)) and r:get(2) >= 0)
      assert.is_true(isnan(a:abs():get(n)) and isnan(a:add(b):get(70001)))
   end)

   it('NaN propagates as in PyTorch: relu, maximum/minimum, max/min, argmax (the first NaN)', function()
      local function is_nan(v) return type(v) == 'number' and v ~= v end
      local nan = 0 / 0
      local x = nr.tensor({nan, 1, -1, 0, nan})
      local r = x:relu():totable()
      assert.is_true(is_nan(r[1]) and is_nan(r[5]))
      assert.same({1, 0, 0}, {r[2], r[3], r[4]})
      r = x:clone():relu_():totable()
      assert.is_true(is_nan(r[1]) and r[2] == 1 and r[3] == 0)
      r = x:maximum(0):totable()
      assert.is_true(is_nan(r[1]) and r[2] == 1 and r[3] == 0 and is_nan(r[5]))
      r = x:minimum(0):totable()
      assert.is_true(is_nan(r[1]) and r[2] == 0 and r[3] == -1 and is_nan(r[5]))
      r = nr.tensor({1, -1}):maximum(nan):totable()                 -- a NaN operand propagates too
      assert.is_true(is_nan(r[1]) and is_nan(r[2]))
      r = nr.tensor({1, 5}):maximum(nr.tensor({nan, 2})):totable()
      assert.is_true(is_nan(r[1]) and r[2] == 5)
      r = nr.tensor({1, 5}):minimum(nr.tensor({nan, 2})):totable()
      assert.is_true(is_nan(r[1]) and r[2] == 2)
      assert.is_true(is_nan(x:max()) and is_nan(x:min()))
      assert.is_true(is_nan(nr.tensor({1, 2, nan}):max()) and is_nan(nr.tensor({nan, 2, 1}):min()))
      assert.equal(3, nr.tensor({1, 2, 3}):max())
      assert.equal(1, nr.tensor({1, nan, 3}):argmax())
      assert.equal(1, nr.tensor({1, nan, 3, nan}):argmax())       -- the first NaN
      assert.equal(0, nr.tensor({nan, 9}):argmax())
      assert.equal(2, nr.tensor({1, 0, 3, 3}):argmax())           -- no NaN: the first maximum
      local m = nr.tensor({{1, nan, 3}, {4, 5, 6}, {nan, 0, nan}})
      assert.same({{1}, {2}, {0}}, m:argmax(2):totable())
      assert.same({{2, 0, 2}}, m:argmax(1):totable())
      local mx = m:max(2):totable()
      assert.is_true(is_nan(mx[1][1]) and mx[2][1] == 6 and is_nan(mx[3][1]))
      local mn = m:min(2):totable()
      assert.is_true(is_nan(mn[1][1]) and mn[2][1] == 4 and is_nan(mn[3][1]))
      mn = m:narrow(1, 1, 2):min(1):totable()[1]
      assert.is_true(mn[1] == 1 and is_nan(mn[2]) and mn[3] == 3)
   end)

   it('view never copies: writes go through, and an impossible view is an error that says to reshape', function()
      local a = nr.zeros({2, 3})
      local ok, err = pcall(function() return a:t():view(6) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("view size is not compatible with input tensor's size and stride", 1, true), err)
      assert.truthy(tostring(err):find('[3 x 2] (strides {1, 3}) as {6}', 1, true), err)
      assert.truthy(tostring(err):find(':reshape', 1, true), err)
      assert.same({{0, 0}, {0, 0}, {0, 0}}, a:t():reshape(3, 2):totable())
      assert.same({6}, a:t():reshape(6):shape())
      assert.is_false(a:t():reshape(6):same_storage(a))                       -- no view exists: a copy
      -- where a view exists reshape is one, as PyTorch: writes through it reach the tensor
      local x = nr.zeros({4, 4})
      x:narrow(2, 1, 3):reshape(4, 3, 1):fill(7)
      assert.equal(84, x:sum())
      assert.is_true(x:t():reshape(4, 4):same_storage(x))
      -- an empty view narrows and selects as an empty tensor does
      local e = nr.empty({0}):view(4, 0)
      assert.same({1, 0}, e:narrow(1, 4, 1):shape())
      assert.same({0}, e:select(1, 3):shape())
      -- views that exist on non-contiguous tensors: split or merge within a contiguous run
      local b = nr.zeros({4, 6})
      local n = b:narrow(2, 2, 4)                                   -- (4, 4), strides (6, 1)
      local v = n:view(4, 2, 2)
      assert.same({6, 2, 1}, v:stride())
      v:fill(1)
      assert.equal(16, b:sum())
      assert.error_matches(function() n:view(16) end, 'view size is not compatible')
      assert.error_matches(function() n:view(-1) end, 'view size is not compatible')
      local tv = b:t():view(3, 2, 4)                                -- (6, 4) strides (1, 6): split dim 1
      assert.same({2, 1, 6}, tv:stride())
      tv:select(1, 1):fill(5)                                       -- columns 1 and 2 of b
      assert.same({5, 5, 1, 1, 1, 0}, b:select(1, 1):totable())
      assert.same({24}, b:view(-1):shape())
      assert.same({1, 1}, nr.tensor(5):view(1, 1):shape())
      assert.same({0, 3}, nr.zeros({3, 0}):t():view(0, 3):shape())
      assert.error_matches(function() b:view(5, 5) end, 'Tensor:view: cannot reshape')
   end)

   it('get / set take one flat position or one index per dimension; extra indices are errors', function()
      local t = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      assert.equal(2, t:get(1, 2)); assert.equal(6, t:get(2, 3)); assert.equal(5, t:get(5))
      assert.equal(6, t:t():get(3, 2)); assert.equal(4, t:t():get(2))        -- views index logically
      t:set(2, 1, 40); assert.equal(40, t:get(4))
      t:set(1, 10); assert.equal(10, t:get(1, 1))
      local function err(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(err(function() return t:get(1, 2, 3) end):find('one index per dimension (2), got 3 indices', 1, true))
      assert.truthy(err(function() return t:get(3, 1) end):find('index 1 is 3, outside 1..2 of dimension 1', 1, true))
      assert.truthy(err(function() return t:set(1, 2, 3, 4) end):find('got 3 indices', 1, true))
      assert.truthy(err(function() return t:set(1) end):find('must be a number, got nil', 1, true))
      assert.truthy(err(function() return t:set(2, 3, nil) end):find('must be a number, got nil', 1, true))
      t:set(1, 2, 5LL)                                                    -- an int64 cdata value converts
      assert.equal(5, t:get(1, 2))
      -- a flat position out of range is named as given (1-based) with the valid range
      assert.truthy(err(function() return t:get(7) end):find('Tensor:get: position 7 is outside 1..6 (6 elements)', 1, true))
      assert.truthy(err(function() return t:get(0) end):find('Tensor:get: position 0 is outside 1..6', 1, true))
      assert.truthy(err(function() return t:set(-1, 3) end):find('Tensor:set: position -1 is outside 1..6', 1, true))
   end)

   it('positions and dimensions must be integers: 1.5 is an error naming the argument, never floored', function()
      local a = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      local cases = {
         {function() return a:get(1.5) end, 'Tensor:get: position must be an integer, got 1.5'},
         {function() return a:set(2.5, 0) end, 'Tensor:set: position must be an integer, got 2.5'},
         {function() return a:get(0 / 0) end, 'Tensor:get: position must be an integer'},
         {function() return a:narrow(1, 1.5, 1) end, 'Tensor:narrow: start must be an integer, got 1.5'},
         {function() return a:narrow(1, 1, 0.5) end, 'Tensor:narrow: length must be an integer, got 0.5'},
         {function() return a:narrow(1.5, 1, 1) end, 'Tensor:narrow: dimension must be an integer, got 1.5'},
         {function() return a:select(1, 1.5) end, 'Tensor:select: index must be an integer, got 1.5'},
         {function() return a:select(2.2, 1) end, 'Tensor:select: dimension must be an integer, got 2.2'},
         {function() return a:transpose(1.5, 2) end, 'Tensor:transpose: dimension 1 must be an integer, got 1.5'},
         {function() return a:size(1.5) end, 'Tensor:size: dimension must be an integer, got 1.5'},
         {function() return a:sum(1.5) end, 'Tensor:sum: dimension must be an integer, got 1.5'},
         {function() return a:max(2.5) end, 'Tensor:max: dimension must be an integer, got 2.5'},
         {function() return a:argmax(1.5) end, 'Tensor:argmax: dimension must be an integer, got 1.5'},
         {function() return a:index_select(1, {0.5}) end, 'Tensor:index_select: index 1 must be an integer position, got 0.5'},
         {function() return a:index_select(1.5, {0}) end, 'Tensor:index_select: dimension must be an integer, got 1.5'},
         {function() return a:clone():index_copy(1, {1, 0.5}, nr.zeros({2, 3})) end,
          'Tensor:index_copy: index 2 must be an integer position, got 0.5'},
         {function() return a:as_strided({2}, {1}, 0.5) end, 'Tensor:as_strided: offset must be an integer, got 0.5'},
         {function() return a:as_strided({2}, {1.5}) end, 'Tensor:as_strided: stride 1 must be an integer, got 1.5'},
      }
      for _, c in ipairs(cases) do
         local ok, err = pcall(c[1])
         assert.is_false(ok, c[2])
         assert.truthy(tostring(err):find(c[2], 1, true), tostring(err) .. ' (expected: ' .. c[2] .. ')')
      end
      -- integral floats are integers
      assert.equal(5, a:get(5.0))
      assert.same({2, 5}, a:select(2, 2.0):totable())
   end)
end)

describe('memory formats', function()
   it('channels_last tensors: NHWC strides, same values, conversions both ways', function()
      local x = nr.randn({2, 3, 4, 5})
      assert.equal('contiguous', x:memory_format())
      local y = x:contiguous('channels_last')
      assert.same({60, 1, 15, 3}, y:stride())
      assert.equal('channels_last', y:memory_format())
      assert.is_true(y:is_contiguous('channels_last'))
      assert.is_false(y:is_contiguous())
      assert.is_false(y:same_storage(x))
      assert.same(x:totable(), y:totable())
      -- the data in memory is N, H, W, C: element (n=1, c=2, h=1, w=1) is the second stored value
      assert.equal(x:totable()[1][2][1][1], y:data()[1])
      local back = y:contiguous()
      assert.equal('contiguous', back:memory_format())
      assert.same(x:totable(), back:totable())
      assert.is_true(rawequal(y, y:contiguous('channels_last')))
      local e = nr.zeros({2, 3, 4, 5}, {memory_format = 'channels_last'})
      assert.equal('channels_last', e:memory_format())
      assert.equal(0, e:sum())
   end)

   it('clone, to, and elementwise results keep channels_last; reductions and views do not need to', function()
      local y = nr.randn({2, 3, 4, 5}):contiguous('channels_last')
      for what, t in pairs({clone = y:clone(), to = y:to('cpu', 'bfloat16'), add = y:add(1), mul = y * y,
                            exp = y:exp(), relu = y:relu()}) do
         assert.equal('channels_last', t:memory_format(), what)
      end
      assert.same(y:add(y):totable(), y:contiguous():add(y:contiguous()):totable())
      assert.near(y:sum(), y:contiguous():sum(), 1e-4)
      assert.equal('strided', nr.randn({2, 3, 4, 5}):transpose(3, 4):memory_format())
   end)

   it('sizes of 1: a channels-last (N, 1, H, W) or (N, C, 1, 1) view keeps its tag without a copy', function()
      local x = nr.randn({2, 1, 4, 5})
      local y = x:contiguous('channels_last')
      assert.is_true(y:same_storage(x))
      assert.equal('channels_last', y:memory_format())
      assert.is_true(y:is_contiguous() and y:is_contiguous('channels_last'))
      local z = nr.randn({2, 3, 1, 1}):contiguous('channels_last')
      assert.equal('channels_last', z:memory_format())
      assert.equal('contiguous', nr.randn({2, 3, 1, 1}):memory_format())
   end)

   it('errors name the bad format or shape', function()
      assert.error_matches(function() nr.empty({2, 3}, {memory_format = 'channels_last'}) end, 'needs a 4%-d')
      assert.error_matches(function() nr.empty({2, 3, 4, 5}, {memory_format = 'nhwc'}) end, 'unknown memory_format "nhwc"')
      assert.error_matches(function() nr.randn({2, 3}):contiguous('channels_last') end, 'needs a 4%-d')
      assert.error_matches(function() nr.randn({2, 3, 4, 5}):is_contiguous('nchw') end, 'unknown memory_format')
   end)
end)

-- Hostile input (the audit in the commit messages): every bad argument is an error that names the
-- function, the argument and the value, raised at the caller's line (this file).
describe('hostile input', function()
   -- f() must fail with a message containing `text` (plain) that points at this spec file.
   local function raises(text, f)
      local ok, err = pcall(f)
      assert.is_false(ok, 'no error; expected ' .. text)
      err = tostring(err)
      assert.truthy(err:find(text, 1, true), err)
      assert.truthy(err:find('tensor_spec.lua:', 1, true), 'error not at the caller: ' .. err)
   end

   it('errors raised a few calls deep in the library still name the caller\'s line', function()
      -- (each named lua/nr/tensor.lua before check.user_level)
      raises('nr.tensor: unknown dtype "double"', function() local t = nr.tensor({1}, {dtype = 'double'}); return t end)
      raises('nr.zeros: unknown option "devcie"', function() local t = nr.zeros({1}, {devcie = 'cuda'}); return t end)
      raises('nr.randn: options must be a table, got number', function() local t = nr.randn(2, 3); return t end)
      raises('out of host memory', function() local t = nr.empty({1e6, 1e6}); return t end)
      raises('use of a freed tensor', function()
         local t = nr.zeros({2})
         t:free()
         local s = t:sum()
         return s
      end)
   end)

   it('views with more than 8 dimensions are refused before the int64_t[8] arrays are written', function()
      local a = nr.randn({3, 4})
      local ones = {1, 1, 1, 1, 1, 1, 1, 1, 1}
      raises('Tensor:as_strided: at most 8 dimensions, got 9', function() local v = a:as_strided(ones, ones); return v end)
      local b = nr.randn({1})
      raises('Tensor:reshape: at most 8 dimensions, got 9', function() local v = b:reshape(ones); return v end)
      raises('Tensor:view: at most 8 dimensions, got 9', function() local v = b:view(1, 1, 1, 1, 1, 1, 1, 1, 1); return v end)
      -- the write past the arrays corrupted LuaJIT's heap: the next collection crashed
      for i = 1, 100000 do local t = {i, tostring(i), {}}; t[3][1] = t end
      collectgarbage()
      assert.equal(8, b:reshape(1, 1, 1, 1, 1, 1, 1, 1):dim())
   end)

   it('beta ~= 0 needs opts.out: a new result has no values to accumulate (it read uninitialised memory)', function()
      local a = nr.randn({3, 4})
      raises('Tensor:matmul: beta 1 needs opts.out', function() local r = a:matmul(a, {trans_b = true, beta = 1}); return r end)
      -- with out: out <- a a^T + beta * out; beta 0 without out is the plain product
      local ref = a:matmul(a, {trans_b = true})
      local out = nr.ones({3, 3})
      a:matmul(a, {trans_b = true, beta = 2, out = out})
      assert.near(0, out:sub(ref):sub(2):abs():max(), 1e-5)
      assert.near(0, a:matmul(a, {trans_b = true, beta = 0}):sub(ref):abs():max(), 0)
   end)

   it('integers given to C are finite and in range: inf, NaN and 2^31+ are named, not wrapped at the FFI', function()
      local a = nr.zeros({2, 3})
      raises('nr.empty: size 1 must be a non-negative integer <= 2^40, got inf', function() local t = nr.empty({math.huge}); return t end)
      raises('nr.zeros: size 2 must be a non-negative integer <= 2^40, got 1099511627777', function()
         local t = nr.zeros({0, 2 ^ 40 + 1}); return t end)
      raises('nr.empty: size 2 must be a non-negative integer <= 2^40, got nil', function() local t = nr.empty({2, nil, 3}); return t end)
      raises('nr.arange: n must be a non-negative integer <= 2^40, got nan', function() local t = nr.arange(0 / 0); return t end)
      raises('Tensor:reshape: size 1 must be a non-negative integer <= 2^40, got nil', function() local t = a:reshape(nil, -1); return t end)
      raises('Tensor:reshape: size 2 must be a non-negative integer <= 2^40, got nil', function()
         local t = a:reshape({2, nil, 3}); return t end)
      raises('Tensor:view: size 2 must be a non-negative integer <= 2^40, got "x"', function() local t = a:view(6, 'x'); return t end)
      raises('Tensor:get: position must be an integer <= 2^53, got 1.1805916207174e+21', function() local v = a:get(2 ^ 70); return v end)
      raises('Tensor:set: position must be an integer, got inf', function() local v = a:set(math.huge, 1); return v end)
      raises('Tensor:as_strided: stride 1 must be an integer, got -inf', function()
         local v = a:as_strided({2}, {-math.huge}); return v end)
      -- layer geometry is int32 in C: a stride of 2^32 + 1 was reported as "stride -2147483648"
      raises('nr.nn.Conv2d: stride must be an integer in [1, 2^31 - 1], got 4294967297', function()
         local m = nr.nn.Conv2d(1, 1, 1, {stride = 2 ^ 32 + 1}); return m end)
      raises('nr.nn.Conv2d: kernel_size must be an integer in [1, 2^31 - 1], got inf', function()
         local m = nr.nn.Conv2d(1, 1, math.huge); return m end)
      raises('nr.nn.Conv2d: kernel_size[2] must be an integer in [1, 2^31 - 1], got table', function()
         local m = nr.nn.Conv2d(1, 1, {3, {}}); return m end)
      raises('nr.nn.Conv2d: padding[1] must be a non-negative integer <= 2^31 - 1, got -1', function()
         local m = nr.nn.Conv2d(1, 1, 3, {padding = {-1, 0}}); return m end)
      raises('nr.nn.Linear: in_features must be an integer in [1, 2^31 - 1], got 2147483648', function()
         local m = nr.nn.Linear(2 ^ 31, 1); return m end)
      local ok, err = pcall(nr.nn.MaxPool2d, math.huge) -- (pool.lua adds a frame: the level is not this file)
      assert.is_false(ok)
      assert.truthy(err:find('nr.nn.MaxPool2d: kernel_size must be an integer in [1, 2^31 - 1], got inf', 1, true), err)
      local threads = nr.get_num_threads()
      raises('nr.set_num_threads: n must be a non-negative integer <= 4096, got 2147483648', function() nr.set_num_threads(2 ^ 31) end)
      assert.equal(threads, nr.get_num_threads())
      raises('nr.manual_seed: seed must be a non-negative integer <= 2^53, got inf', function() nr.manual_seed(math.huge) end)
      raises('nr.manual_seed: seed must be a non-negative integer <= 2^53, got 1.5', function() nr.manual_seed(1.5) end)
      nr.manual_seed(2 ^ 53)
      assert.equal(0, nr.empty({0, 2 ^ 40}):numel()) -- the limits themselves are fine
   end)

   it('numbers stored into int64/uint8 must fit (NaN, inf, 300 into uint8 were silent casts); randint bounds too', function()
      local i64, u8 = {dtype = 'int64'}, {dtype = 'uint8'}
      raises('nr.tensor: element 2 = 300 cannot be converted to type uint8 without overflow', function()
         local t = nr.tensor({1, 300}, u8); return t end)
      raises('nr.tensor: element 1 = -1 cannot be converted to type uint8 without overflow', function()
         local t = nr.tensor({-1}, u8); return t end)
      raises('nr.tensor: element 3 = inf cannot be converted to type int64 without overflow', function()
         local t = nr.tensor({1, 2, math.huge}, i64); return t end)
      raises('nr.tensor: element 1 = 9.2233720368548e+18 cannot be converted to type int64 without overflow', function()
         local t = nr.tensor({2 ^ 63}, i64); return t end)
      raises('nr.tensor: value -1 cannot be converted to type uint8 without overflow', function()
         local t = nr.tensor(-1, u8); return t end)
      raises('Tensor:fill: value nan cannot be converted to type int64 without overflow', function()
         local t = nr.zeros({2}, i64):fill(0 / 0); return t end)
      raises('nr.full: value 256 cannot be converted to type uint8 without overflow', function()
         local t = nr.full({2}, 256, u8); return t end)
      raises('Tensor:set: value 300 cannot be converted to type uint8 without overflow', function()
         local t = nr.zeros({2}, u8):set(1, 300); return t end)
      raises('Tensor:set: value -inf cannot be converted to type int64 without overflow', function()
         local t = nr.zeros({2, 2}, i64):set(1, 2, -math.huge); return t end)
      -- in range: a fraction truncates toward zero (as PyTorch); the extremes are fine
      assert.same({1, -2, 2 ^ 63 - 1024, -2 ^ 63}, nr.tensor({1.7, -2.7, 2 ^ 63 - 1024, -2 ^ 63}, i64):totable())
      assert.same({255, 0}, nr.tensor({255, 0.5}, u8):totable())
      assert.same({7, 7}, nr.full({2}, 7.9, u8):totable())
      -- float tensors take any number
      assert.equal(math.huge, nr.tensor({math.huge}):get(1))
      -- randint: finite integer bounds whose values all fit the dtype
      raises('nr.randint: hi must be an integer in [1, 2^53], got inf', function() local t = nr.randint(0, math.huge, {3}); return t end)
      raises('nr.randint: lo must be an integer in [-2^53, 2^53 - 1], got -inf', function()
         local t = nr.randint(-math.huge, 0, {3}); return t end)
      raises('nr.randint: lo must be an integer in [-2^53, 2^53 - 1], got 0.5', function()
         local t = nr.randint(0.5, 1.5, {3}); return t end)
      raises('nr.randint: hi must be an integer in [1, 256], got 1000', function()
         local t = nr.randint(0, 1000, {6}, u8); return t end)
      raises('nr.randint: hi must be an integer in [1, 2^53], got 1.844674407371e+19', function()
         local t = nr.randint(0, 2 ^ 64, {3}); return t end)
      -- a floating dtype gets whole numbers in [lo, hi), as PyTorch's randint(dtype=torch.float32)
      local f = nr.randint(-3, 3, {200}, {dtype = 'float32'})
      assert.equal('float32', f:dtype())
      for _, v in ipairs(f:totable()) do assert.is_true(v == math.floor(v) and v >= -3 and v < 3, tostring(v)) end
      -- only where every integer is exact: a draw could round out of [lo, hi)
      raises('nr.randint: lo must be an integer in [-256, 255], got 511', function()
         local t = nr.randint(511, 512, {2}, {dtype = 'bfloat16'}); return t end)
      raises('nr.randint: lo must be an integer in [-2^24, 2^24 - 1], got 16777217', function()
         local t = nr.randint(2 ^ 24 + 1, 2 ^ 24 + 2, {2}, {dtype = 'float32'}); return t end)
      local lo, hi = math.huge, -math.huge -- (reductions are float-only: read the values)
      for _, v in ipairs(nr.randint(0, 256, {1000}, u8):totable()) do lo, hi = math.min(lo, v), math.max(hi, v) end
      assert.is_true(lo >= 0 and hi <= 255 and hi > 200)
      for _, v in ipairs(nr.randint(-2 ^ 53, 2 ^ 53, {100}):totable()) do assert.is_true(v >= -2 ^ 53 and v < 2 ^ 53) end
      -- past 2^53 the draw is still uniform over integers: odd values occur on both sides of 0
      local wide = nr.randint(-2 ^ 53, 2 ^ 53, {4000})
      local p, odd = wide:data(), {pos = 0, neg = 0}
      for i = 0, 3999 do
         if p[i] % 2 ~= 0 then local side = p[i] >= 0 and 'pos' or 'neg'; odd[side] = odd[side] + 1 end
      end
      assert.is_true(odd.pos > 700 and odd.neg > 700, string.format('odd draws: %d >= 0, %d < 0', odd.pos, odd.neg))
   end)

   it('int64 converts directly: one rounding to float32, wrapping into uint8 (as PyTorch)', function()
      local t = nr.empty({3}, {dtype = 'int64'})
      local p = t:data()
      p[0] = 0x1000001000000001LL                                 -- 2^60 + 2^36 + 1: just past a float32 tie
      p[1] = 0x10000000005LL                                      -- 2^40 + 5
      p[2] = -1LL
      assert.equal(2 ^ 60 + 2 ^ 37, t:float():get(1))           -- through a double it tied down to 2^60
      assert.same({1, 5, 255}, t:to('cpu', 'uint8'):totable())   -- mod 256
      -- NaN and out-of-range floats into int64 give INT64_MIN (x86's value), never C's undefined cast
      local f = nr.tensor({0 / 0, 1e30, -2.5})
      local i = f:to('cpu', 'int64')
      assert.equal(-2 ^ 63, i:get(1))
      assert.equal(-2 ^ 63, i:get(2))
      assert.equal(-2, i:get(3))
      -- a fill with -0.0 keeps the sign (a contiguous fill used to memset +0)
      assert.equal(-math.huge, 1 / nr.full({4}, -0.0):get(1))
      assert.equal(-math.huge, 1 / nr.zeros({4}, {dtype = 'bfloat16'}):fill(-0.0):float():get(2))
   end)

   it('uniform draws stay in [lo, hi) after rounding to the dtype (float32 and bfloat16)', function()
      local b = nr.rand({20000}, {dtype = 'bfloat16'})
      assert.is_true(b:float():max() < 1, 'a bfloat16 draw rounded to 1')
      -- a range one float32 step wide: every draw rounds to lo or hi; none may be hi
      local C = require('nr.ffi').C
      local t = nr.empty({1000})
      assert.equal(0, C.nr_rng_uniform(t.c, 1, 1 + 2 ^ -23))
      assert.equal(1, t:max())
      local tb = nr.empty({1000}, {dtype = 'bfloat16'})
      assert.equal(0, C.nr_rng_uniform(tb.c, -2, -1.9921875))      -- one bfloat16 step below -1.9921875
      assert.equal(-2, tb:float():max())
      assert.equal(0, C.nr_rng_uniform(t.c, 1, 1 + 1e-12))           -- narrower than a float32 step
      assert.equal(1, t:min())
      -- integer draws over the whole int64 range (the C API; Lua bounds stop at 2^53), and bounds
      -- that are not whole int64 values are refused
      local wide = nr.empty({200}, {dtype = 'int64'})
      assert.equal(0, C.nr_rng_uniform(wide.c, -2 ^ 63, 2 ^ 63))
      local p, neg, pos = wide:data(), 0, 0
      for i = 0, 199 do if p[i] < 0 then neg = neg + 1 else pos = pos + 1 end end
      assert.is_true(neg > 50 and pos > 50, neg .. ' negative, ' .. pos .. ' non-negative')
      assert.are_not.equal(0, C.nr_rng_uniform(wide.c, 0.5, 3))
      assert.are_not.equal(0, C.nr_rng_uniform(wide.c, 0, 2 ^ 64))
      assert.are_not.equal(0, C.nr_rng_uniform(nr.empty({4}, {dtype = 'uint8'}).c, 250, 260))
   end)

   it('wrong Lua types are errors naming the function and argument, not LuaJIT/FFI internals', function()
      local a = nr.randn({2, 2})
      local cases = {
         {'Tensor:add: expected a tensor for out, got number', function() local r = a:add(1, 5); return r end},
         {'Tensor:same_storage: expected a tensor for other, got nil', function() local r = a:same_storage(nil); return r end},
         {'Tensor:axpy_: expected a tensor for x, got nil', function() local r = a:axpy_(1, nil); return r end},
         {'Tensor:axpy_: alpha must be a number, got nil', function() local r = a:axpy_(nil, a); return r end},
         {'Tensor:matmul: expected a tensor for b, got nil', function() local r = a:matmul(nil); return r end},
         {'Tensor:matmul: options must be a table, got number', function() local r = a:matmul(a, 5); return r end},
         {'Tensor:matmul: opts.alpha must be a number, got string', function() local r = a:matmul(a, {alpha = 'x'}); return r end},
         {'Tensor:matmul: expected a tensor for opts.out, got table', function() local r = a:matmul(a, {out = {}}); return r end},
         {'Tensor:matmul: unknown option "transpose_b"', function() local r = a:matmul(a, {transpose_b = true}); return r end},
         {'Tensor:index_copy: expected a tensor for src, got nil', function() local r = a:index_copy(1, {0}, nil); return r end},
         {'Tensor:index_select: expected a tensor for out, got string', function() local r = a:index_select(1, {0}, 'x'); return r end},
         {'Tensor:reshape: size 1 must be a non-negative integer <= 2^40, got nil', function() local r = a:reshape(nil, -1); return r end},
         {'nr.tensor: options must be a table, got number', function() local r = nr.tensor({1}, 5); return r end},
         {'nr.arange: n must be a non-negative integer <= 2^40, got nil', function() local r = nr.arange(nil); return r end},
         {'nr.randperm: n must be a non-negative integer <= 2^40, got "3"', function() local r = nr.randperm('3'); return r end},
         {'nr.randint: hi must be an integer in [1, 2^53], got nil', function() local r = nr.randint(0, nil, {2}); return r end},
         {'nr.empty_like: expected a tensor for t, got nil', function() local r = nr.empty_like(nil); return r end},
      }
      for _, c in ipairs(cases) do raises(c[1], c[2]) end
      -- the good forms still work
      assert.is_true(a:same_storage(a:view(4)))
      assert.same({2, 2}, a:matmul(a, {alpha = 2, out = nr.empty({2, 2})}):shape())
      assert.same({1}, nr.tensor({1}, {dtype = 'int64'}):shape())
   end)
end)

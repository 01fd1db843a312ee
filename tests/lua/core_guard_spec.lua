-- Guards of the C core against hostile input (the hostile-input audit's findings): views whose
-- span or element count overflows int64, in-place aliasing in matmul and index select/copy,
-- cross-entropy with -inf or float-range logits, augmentation sizes past int, read_image on a
-- directory; and the strided copy / fill paths (coalesced runs) against an element-wise
-- reference: narrows, transposes, reversed and reshaping views, dtype conversion, threads.
-- Tolerances: exact (copies move bits; the loss values are PyTorch's to 1e-6).
local nr = require 'nr'
local bit = require 'bit'

local util = require 'tests.lua.spec_util'

local BASE = util.temp_dir('nr-guard-spec-')
local sh = util.sh
local function be32(n)
   return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
      bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
end
-- an MNIST-layout IDX dataset of n blank h x w images, labels 0
local function idx_dataset(dir, n, h, w)
   sh('mkdir -p "' .. dir .. '"')
   local f = assert(io.open(dir .. '/train-images-idx3-ubyte', 'wb'))
   f:write(be32(0x803), be32(n), be32(h), be32(w), string.rep('\0', n * h * w))
   f:close()
   f = assert(io.open(dir .. '/train-labels-idx1-ubyte', 'wb'))
   f:write(be32(0x801), be32(n), string.rep('\0', n))
   f:close()
   return nr.data.dataset{name = 'mnist', root = dir}
end

local function flat(t) return t:contiguous():reshape(t:numel()):totable() end

describe('core guards', function()
   teardown(function() os.execute('rm -rf "' .. BASE .. '"') end)

   describe('views', function()
      it('refuse strides whose span overflows int64 (no out-of-bounds view)', function()
         local a = nr.randn({3, 4})
         -- (sizes and strides past 2^53 stop in Lua; these pass it and overflow the byte span in C)
         assert.error_matches(function() a:as_strided({2 ^ 13 + 1}, {2 ^ 50}) end,
            'nr_tensor_view: stride 1125899906842624 of dimension 0 %(size 8193%): view too large')
         assert.error_matches(function() a:as_strided({2, 2 ^ 13 + 2}, {1, -2 ^ 50}, 11) end, 'stride %-1125899906842624')
         assert.error_matches(function() a:as_strided({3}, {6}) end, 'view %[0, 12%] lies outside its storage of 12')
         assert.same({0, 5, 10}, flat(nr.arange(12):as_strided({3}, {5})))
      end)

      it('refuse element counts past 2^40 (stride-0 views included)', function()
         local a = nr.randn({3, 4})
         assert.error_matches(function() a:as_strided({2 ^ 30, 2 ^ 20}, {0, 0}) end,
            'nr_tensor_view: tensor too large: shape 1073741824x1048576 has more than 2%^40 elements')
         assert.equal(2 ^ 20, a:as_strided({2 ^ 10, 2 ^ 10}, {0, 0}):numel())
      end)
   end)

   describe('aliasing', function()
      it('matmul refuses an out that overlaps a or b; disjoint parts of one storage are fine', function()
         nr.manual_seed(3)
         local s = nr.randn({3, 3})
         assert.error_matches(function() s:matmul(s, {out = s}) end, 'nr_matmul: out .* overlaps a ')
         local b = nr.randn({3, 3})
         assert.error_matches(function() b:matmul(s, {out = s}) end, 'nr_matmul: out .* overlaps b ')
         local big = nr.randn({6, 3})
         local top, bottom = big:narrow(1, 1, 3), big:narrow(1, 4, 3)
         local want = top:matmul(s)
         top:matmul(s, {out = bottom})
         assert.same(flat(want), flat(bottom))
      end)

      it('index_select refuses out overlapping src, index_copy src overlapping dst', function()
         local s2 = nr.arange(9):reshape(3, 3)
         assert.error_matches(function() s2:index_select(1, {2, 1, 0}, s2) end,
            'nr_tensor_index_select: out .* overlaps src ')
         local s3 = nr.arange(6):reshape(3, 2)
         assert.error_matches(function() s3:index_copy(1, {2, 1, 0}, s3) end,
            'nr_tensor_index_copy: dst .* overlaps src ')
         assert.same({6, 7, 8, 3, 4, 5, 0, 1, 2}, flat(s2:index_select(1, {2, 1, 0})))
         s3:index_copy(1, {2, 1, 0}, s3:clone())
         assert.same({4, 5, 2, 3, 0, 1}, flat(s3))
      end)

      it('copy refuses a destination that repeats one element (stride 0)', function()
         local a = nr.zeros({3})
         assert.error_matches(function() a:as_strided({3}, {0}):copy(nr.arange(3)) end, 'repeats one element')
         a:as_strided({3}, {0}):fill(7) -- a fill writes one value: fine
         assert.same({7, 0, 0}, a:totable())
         -- empty tensors (a size-0 dimension gives the ones before it stride 0) copy and clone
         assert.same({2, 0}, nr.zeros({2, 0}):clone():shape())
         assert.same({3, 0}, nr.zeros({0, 3}):t():contiguous():shape())
         assert.same({4, 0}, nr.randn({4, 5}):narrow(2, 1, 0):clone():shape())
      end)
   end)

   describe('CrossEntropyLoss', function()
      it('is finite for -inf (masked) logits and logits spanning the float range, as PyTorch', function()
         local crit = nr.nn.CrossEntropyLoss()
         local lab = nr.tensor({1}, {dtype = 'int64'})
         assert.near(0.6931472, crit:forward(nr.tensor({{-1 / 0, 0, 0}}), lab), 1e-6)
         assert.equal(0, crit:forward(nr.tensor({{-3e38, 3e38, 0}}), lab))
         -- label smoothing still weighs in the mean over classes: 0.9 * nll + 0.1 * mean(-log p)
         local ls = nr.nn.CrossEntropyLoss({label_smoothing = 0.1})
         local x = nr.tensor({{1, 2, 3}})
         local lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
         assert.near(0.9 * (lse - 2) + 0.1 * (lse - 2), ls:forward(x, lab), 1e-6)
      end)
   end)

   describe('augmentation sizes', function()
      it('refuse pad, crop and resize past the side limit, naming the option and value', function()
         local ds = idx_dataset(BASE .. '/small', 2, 4, 4)
         assert.error_matches(function() nr.data.loader(ds, {batch = 2, threads = 1, augment = {pad = 2 ^ 31 - 1}}) end,
            'augment.pad must be a non%-negative integer <= 2%^20, got 2147483647')
         assert.error_matches(function() nr.data.loader(ds, {batch = 2, threads = 1, augment = {crop = 2 ^ 30}}) end,
            'augment.crop must be an integer in %[1, 2%^20%], got 1073741824')
         local l = nr.data.loader(ds, {batch = 2, threads = 1, augment = {pad = 3}})
         for x in l:epoch(1) do assert.same({2, 1, 4, 4}, x:shape()) end
         l:close()
      end)

      it('refuse a resize whose output side overflows, naming resize and the size', function()
         local ds = idx_dataset(BASE .. '/tall', 2, 4000, 1)
         assert.error_matches(function()
            nr.data.loader(ds, {batch = 1, threads = 1, prefetch = 1, augment = {resize = 2 ^ 20}})
         end, 'resize 1048576 of the 4000x1 samples of .* gives 4194304000x1048576, over the limit of 1048576 a side')
      end)

      it('refuse a per-sample resize past int (image folders, with a center crop)', function()
         local root = BASE .. '/strip'
         sh('mkdir -p "' .. root .. '/train/a"')
         nr.data.write_png(nr.zeros({1, 1, 4000}, {dtype = 'uint8'}), root .. '/train/a/strip.png')
         local ds = nr.data.dataset{name = 'imagefolder', root = root}
         local aug = {resize = 2 ^ 20, center_crop = 2}
         local l = nr.data.loader(ds, {batch = 1, threads = 1, prefetch = 1, augment = aug})
         assert.error_matches(function() for _ in l:epoch(1) do end end,
            'strip.png: resize 1048576 of this 1x4000 image gives 1048576x4194304000, over 2%^31 %- 1 a side')
         l:close()
      end)
   end)

   it('read_image refuses a directory, naming it', function()
      sh('mkdir -p "' .. BASE .. '/adir"')
      assert.error_matches(function() nr.data.read_image(BASE .. '/adir') end, 'adir is a directory, not an image file')
   end)

   describe('strided copy and fill', function()
      -- dst:copy(src) against the element-wise reference: src's values in row-major order
      local function check_copy(dst, src)
         local want = flat(src)
         dst:copy(src)
         local got = flat(dst)
         for i = 1, #want do
            if got[i] ~= want[i] then error(('element %d: got %s, want %s'):format(i, got[i], want[i])) end
         end
      end

      it('copies into and out of channel slices, transposes and reversed views', function()
         nr.manual_seed(5)
         local out = nr.zeros({4, 11, 3, 5})
         local src = nr.randn({4, 6, 3, 5})
         check_copy(out:narrow(2, 3, 6), src)                     -- into a channel slice
         local before = out:narrow(2, 1, 2)
         assert.same(flat(nr.zeros({4, 2, 3, 5})), flat(before))  -- outside the slice untouched
         check_copy(nr.empty({4, 6, 3, 5}), out:narrow(2, 3, 6))  -- and back out
         check_copy(nr.empty({5, 3}), src:select(1, 2):select(1, 4):t())
         check_copy(nr.zeros({5, 3}):t(), nr.randn({3, 5}))       -- into a transpose
         check_copy(nr.empty({5, 4, 3}), nr.randn({3, 4, 5}):transpose(1, 3))
         local a = nr.arange(12)
         check_copy(nr.empty({12}), a:as_strided({12}, {-1}, 11)) -- reversed
         check_copy(nr.empty({2, 3}), a:as_strided({2, 3}, {-6, 2}, 7))
         check_copy(nr.empty({3, 4}), nr.randn({3, 4, 2}):select(3, 2))
      end)

      it('copies between views of other shapes (same count) and converts dtypes on strided views', function()
         nr.manual_seed(6)
         local src = nr.randn({4, 6}):t()                          -- (6, 4) not contiguous
         check_copy(nr.zeros({4, 2, 6}):narrow(3, 2, 3), src)      -- (4, 2, 3) strided: via a temporary
         check_copy(nr.empty({24}), src)
         check_copy(nr.zeros({2, 12}):t(), nr.arange(24))          -- contiguous source, other shape
         local ints = nr.tensor({{1, -2, 3}, {40, 50, -60}})
         check_copy(nr.zeros({3, 2}, {dtype = 'int64'}), ints:t())
         check_copy(nr.zeros({3, 4}):narrow(2, 2, 2), ints:t():long())
         check_copy(nr.zeros({2, 6}, {dtype = 'uint8'}):narrow(2, 2, 3), nr.tensor({{1, 2, 3}, {250, 7, 9}}))
      end)

      it('gives the same bits on 1 and 2 threads for large strided copies (parallel pieces)', function()
         nr.manual_seed(7)
         local src = nr.randn({8, 80, 60, 62})       -- 9.5 MB: parallel memmoves
         local big = nr.zeros({8, 90, 60, 62})
         local long = nr.randn({300000})
         local res = {}
         for _, t in ipairs({1, 2}) do
            nr.set_num_threads(t)
            big:zero()
            check_copy(big:narrow(2, 5, 80), src)
            local every2 = nr.zeros({150000})
            check_copy(every2, long:as_strided({150000}, {2}))      -- one long strided run, cut in pieces
            res[t] = {big:sum(), every2:sum()}
         end
         nr.set_num_threads(0)
         assert.same(res[1], res[2])
      end)

      it('fills strided views of every dtype, leaving the rest', function()
         for _, dt in ipairs({'float32', 'int64', 'uint8'}) do
            local t = nr.zeros({3, 4}, {dtype = dt})
            t:narrow(2, 2, 2):fill(5)
            t:t():narrow(1, 4, 1):fill(9)
            assert.same({{0, 5, 5, 9}, {0, 5, 5, 9}, {0, 5, 5, 9}}, t:totable())
         end
         local r = nr.zeros({6})
         r:as_strided({3}, {-2}, 5):fill(1)
         assert.same({0, 1, 0, 1, 0, 1}, r:totable())
         -- through the C API (Lua checks 0..255): a uint8 fill wraps the integer mod 256 whether the
         -- tensor is contiguous (one memset) or strided, never a cast past int's range
         local C = require('nr.ffi').C
         local u = nr.zeros({4}, {dtype = 'uint8'})
         assert.equal(0, C.nr_tensor_fill(u.c, 4294967297))
         assert.same({1, 1, 1, 1}, u:totable())
         assert.equal(0, C.nr_tensor_fill(u:as_strided({2}, {2}, 0).c, 4294967298))
         assert.same({2, 1, 2, 1}, u:totable())
      end)
   end)

   it('NR primitives refuse a NULL gamma with an error, not a crash', function()
      local C = require('nr.ffi').C
      local live = require('ffi').new('int64_t[1]')
      assert.are_not.equal(0, C.nr_bn_live_mask(nil, nr.zeros({2}, {dtype = 'uint8'}).c, 0.01, 1e-3, live))
      assert.are_not.equal(0, C.nr_l1_sign_add(nil, nr.zeros({2}).c, 0.1))
   end)
end)

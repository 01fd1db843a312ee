-- The gradient pool (lua/nr/nn/gradpool.lua): a model's backward shares gradInput blocks across
-- layers. Checks: gradients are bit-identical to the per-module-buffer path (the children's
-- backward run by hand, outside any root backward, where every leaf keeps its own buffer) on
-- Sequential / Residual (identity and projection shortcuts) / Concat / Flatten nets; a deep chain
-- needs a bounded number of blocks (not one per layer); tensor memory after a training step is
-- lower than with one buffer per module; blocks that go unused after a shape change are dropped.
local nr = require 'nr'
local nn = nr.nn

local function max_diff(a, b)
   local d = a:clone():sub_(b):abs_()
   return d:max()
end

-- Reference backward: children in reverse by hand (no root backward, so no pool).
local function reference_backward(seq, x, g)
   local mods = seq.modules
   for i = #mods, 1, -1 do
      local input = i > 1 and mods[i - 1].output or x
      g = mods[i]:updateGradInput(input, g):clone()
   end
   return g
end

local function nets()
   local block = nn.Residual(nn.Sequential{
      nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU{inplace = true},
      nn.Conv2d(8, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8),
   })
   local proj = nn.Residual(
      nn.Sequential{nn.Conv2d(8, 16, 3, {stride = 2, padding = 1, bias = false}), nn.BatchNorm2d(16)},
      nn.Sequential{nn.Conv2d(8, 16, 1, {stride = 2, bias = false}), nn.BatchNorm2d(16)})
   local dense = nn.Concat{nn.Identity(), nn.Sequential{nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3, {padding = 1})}}
   return {
      resnetish = nn.Sequential{
         nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU{inplace = true},
         block, nn.ReLU{inplace = true}, proj, nn.ReLU(), dense,
         nn.GlobalAvgPool2d(), nn.Flatten(), nn.Linear(20, 5),
      },
      vggish = nn.Sequential{
         nn.Conv2d(3, 8, 3, {padding = 1}), nn.ReLU(), nn.MaxPool2d(2, {stride = 2}),
         nn.Conv2d(8, 8, 3, {padding = 1}), nn.Sigmoid(), nn.AvgPool2d(2, {stride = 2}),
         nn.Flatten(), nn.Dropout(0.0), nn.Linear(8 * 4 * 4, 5),
      },
   }
end

describe('gradient pool', function()
   for _, name in ipairs({'resnetish', 'vggish'}) do
      it(name .. ': input gradient identical to the per-module-buffer path', function()
         nr.manual_seed(3)
         local net = nets()[name]
         local x = nr.randn({4, 3, 16, 16})
         local y = net:forward(x)
         local g = nr.randn(y:shape())
         local pooled = net:backward(x, g):clone()
         net:forward(x)
         local ref = reference_backward(net, x, g)
         assert.are.same(ref:shape(), pooled:shape())
         assert.are.equal(0, max_diff(ref, pooled))
      end)
   end

   it('a deep chain uses a bounded number of blocks, not one per layer', function()
      local mods = {}
      for i = 1, 30 do mods[#mods + 1] = nn.Linear(64, 64); mods[#mods + 1] = nn.ReLU() end
      local net = nn.Sequential(mods)
      local x = nr.randn({32, 64})
      for _ = 1, 3 do net:backward(x, net:forward(x)) end
      local pool = net:transient().gradpool
      assert.is_truthy(pool)
      assert.is_true(#pool.blocks >= 2 and #pool.blocks <= 3, string.format('%d blocks for a 60-module chain', #pool.blocks))
   end)

   it('NR-CA layers hand their blocks\' gradients back: a chain of them needs a bounded number of blocks', function()
      nr.manual_seed(5)
      local mods = {}
      for _ = 1, 6 do
         mods[#mods + 1] = nn.NRConv2d{in_channels = 8, out_channels = 8, kernel_size = 3, padding = 1, scheme = 'CA',
            in_groups = {{gen = 0, idx = {0, 1, 2, 3}}, {gen = 1, idx = {4, 5, 6, 7}}},
            out_groups = {{gen = 0, first = 0, n = 4}, {gen = 1, first = 4, n = 4}}}
         mods[#mods + 1] = nn.ReLU()
      end
      local net = nn.Sequential(mods)
      local x = nr.randn({4, 8, 16, 16})
      for _ = 1, 2 do net:backward(x, net:forward(x)) end
      local pool = net:transient().gradpool
      assert.is_truthy(pool)
      -- 6 layers of 4 blocks each held one block apiece (25) before the blocks' gradients were released
      assert.is_true(#pool.blocks <= 4, string.format('%d blocks for 6 NR-CA layers', #pool.blocks))
   end)

   it('tensor memory after a training step is lower than with one gradient buffer per module', function()
      local function peak_after_step(use_pool)
         nr.manual_seed(1)
         local mods = {nn.Conv2d(3, 8, 3, {padding = 1})}
         for _ = 1, 6 do
            for _, m in ipairs({nn.BatchNorm2d(8), nn.ReLU{inplace = true}, nn.Conv2d(8, 8, 3, {padding = 1})}) do
               mods[#mods + 1] = m
            end
         end
         for _, m in ipairs({nn.MaxPool2d(2, {stride = 2}), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)}) do mods[#mods + 1] = m end
         local net = nn.Sequential(mods)
         local x = nr.randn({64, 3, 16, 16})
         local y = net:forward(x)
         local g = nr.randn(y:shape())
         if use_pool then net:backward(x, g) else reference_backward(net, x, g) end
         local bytes = 0
         for _, m in ipairs(net:listModules()) do
            local gi = rawget(m, 'gradInput')
            if gi and not m.modules then bytes = bytes + gi:numel() * 4 end
         end
         -- distinct storages only: pooled gradInputs are views of a few blocks
         if use_pool then bytes = net:transient().gradpool:bytes() end
         return bytes
      end
      local pooled, separate = peak_after_step(true), peak_after_step(false)
      assert.is_true(pooled > 0 and pooled < separate / 4, string.format('pool %d bytes vs %d with per-module buffers', pooled, separate))
   end)

   it('blocks unused after a shape change are dropped at the next pass', function()
      local net = nn.Sequential{nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)}
      local big = nr.randn({256, 16})
      net:backward(big, net:forward(big))
      local pool = net:transient().gradpool
      local before = pool:bytes()
      local small = nr.randn({2, 16})
      for _ = 1, 3 do net:backward(small, net:forward(small)) end
      assert.is_true(pool:bytes() <= before, 'pool grew')
      -- the big blocks are reused (best fit) or dropped; a fresh pass on small inputs needs little
      net:transient().gradpool = nil
      net:backward(small, net:forward(small))
      assert.is_true(net:transient().gradpool:bytes() < before / 8)
   end)

   it('a root gradInput stays valid until the next backward; errors restore the previous pool', function()
      local GP = require 'nr.nn.gradpool'
      local net = nn.Sequential{nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)}
      local x = nr.randn({3, 4})
      local gi = net:backward(x, net:forward(x))
      local copy = gi:clone()
      net:forward(x)   -- a forward does not touch gradients
      assert.are.equal(0, max_diff(gi, copy))
      assert.is_nil(GP.current)
      assert.has_error(function() net:backward(x, nr.randn({3, 5})) end)
      assert.is_nil(GP.current)
   end)

   it('setInputGrad(false): no input gradient, the same parameter gradients, nested first children, restorable', function()
      local function build()
         nr.manual_seed(17)
         return nn.Sequential{
            nn.Sequential{nn.Conv2d(3, 8, 3, {padding = 1}), nn.BatchNorm2d(8), nn.ReLU{inplace = true}},
            nn.Conv2d(8, 4, 3, {padding = 1}), nn.GlobalAvgPool2d(), nn.Flatten(), nn.Linear(4, 5)}
      end
      local x, g = nr.randn({2, 3, 6, 6}), nr.randn({2, 5})
      local a, b = build(), build()
      a:zeroGradParameters(); b:zeroGradParameters()
      a:forward(x)
      local gi = a:backward(x, g)
      assert.is_true(nr.is_tensor(gi))
      b:setInputGrad(false)
      b:forward(x)
      assert.is_nil(b:backward(x, g))
      local _, ga = a:parameters()
      local _, gb = b:parameters()
      assert.are.equal(#ga, #gb)
      for i = 1, #ga do assert.are.equal(0, max_diff(ga[i], gb[i])) end
      -- a first layer that is not a Conv2d / Linear still computes it (here: a Residual)
      local r = nn.Sequential{nn.Residual(nn.Conv2d(3, 3, 1)), nn.Flatten()}
      r:setInputGrad(false)
      r:forward(x)
      assert.is_true(nr.is_tensor(r:backward(x, nr.randn({2, 108}))))
      -- and back on
      b:setInputGrad(true)
      b:forward(x)
      assert.is_true(nr.is_tensor(b:backward(x, g)))
      assert.are.equal(0, max_diff(b:backward(x, g), gi))
   end)
end)

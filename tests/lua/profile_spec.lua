-- nr.profile: enabling wraps forward/backward and records every leaf and container call with
-- its path, self times are non-negative and add up to no more than the wall time measured around
-- the calls, the report prints the layers, and disable() restores the original methods exactly.
-- No timing thresholds: only counts, structure and the inequality self <= wall.
local nr = require 'nr'
local prof = require 'nr.profile'

describe('nr.profile', function()
   it('records per-layer forward/backward calls and restores the methods', function()
      local nn = nr.nn
      local f0, b0, sb0 = nn.Module.forward, nn.Module.backward, nn.Sequential.backward
      local lt0 = nn.CrossEntropyLoss.loss_tensor
      local net = nn.Sequential{nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)}
      local crit = nn.CrossEntropyLoss()
      local x, y = nr.randn({5, 4}), nr.tensor({0, 1, 2, 1, 0}, {dtype = 'int64'})
      prof.reset()
      prof.enable()
      local t0 = prof.now()
      for i = 1, 3 do
         local out = net:forward(x)
         if i == 3 then crit:loss_tensor(out, y) else crit:forward(out, y) end   -- nr.train's way counts too
         net:backward(x, crit:backward(out, y))
      end
      local wall = prof.now() - t0
      prof.disable()
      assert.are.equal(lt0, nn.CrossEntropyLoss.loss_tensor)
      assert.are.equal(f0, nn.Module.forward)
      assert.are.equal(b0, nn.Module.backward)
      assert.are.equal(sb0, nn.Sequential.backward)
      local d = prof.data()
      local by = {}
      for _, l in ipairs(d.layers) do by[l.where] = l end
      local lin = by['0 (Linear 4->8)']
      assert.truthy(lin, 'no row for the first Linear')
      assert.are.equal(3, lin.nf)
      assert.are.equal(3, lin.nb)
      assert.are.equal(3, by['1 (ReLU)'].nf)
      local ce
      for _, l in ipairs(d.layers) do if l.type == 'CrossEntropyLoss' then ce = l end end
      assert.are.equal(3, ce.nf)                       -- forward (which calls loss_tensor) counted once
      for _, l in ipairs(d.layers) do
         assert.is_true(l.fwd >= 0 and l.bwd >= 0, l.where)
      end
      assert.is_true(d.total_fwd + d.total_bwd <= wall, 'self times exceed the wall time')
      local lines = {}
      prof.report({write = function(_, s) lines[#lines + 1] = s end, flush = function() end})
      local text = table.concat(lines)
      assert.truthy(text:find('Linear', 1, true), text)
      assert.truthy(text:find('CrossEntropyLoss', 1, true), text)
      prof.reset()
      assert.are.equal(0, #prof.data().layers)
   end)
   it('sync mode waits for the GPU only when there is one, and is off after disable', function()
      prof.enable({sync = true})
      assert.equal(nr.cuda.available(), prof.syncs())
      local net = nr.nn.Sequential{nr.nn.Linear(4, 3)}
      prof.reset()
      net:forward(nr.randn({2, 4}))
      assert.equal(1, prof.data().layers[2].nf)
      prof.disable()
      assert.is_false(prof.syncs())
      prof.enable()
      assert.is_false(prof.syncs())
      prof.disable()
   end)

   it('a failing GPU wait is raised and leaves the call stack sound; enable() keeps the mode', function()
      local cuda = require 'nr.cuda'
      local saved = {cuda.built, cuda.available, cuda.synchronize}
      -- waits: 1 before Sequential, 2 before Linear, 3 after Linear (the one that fails)
      local fail, waits = false, 0
      cuda.built, cuda.available = function() return true end, function() return true end
      cuda.synchronize = function()
         waits = waits + 1
         if fail and waits == 3 then error('device lost') end
      end
      local net = nr.nn.Sequential{nr.nn.Linear(4, 3)}
      local x = nr.randn({2, 4})
      local ok, err = pcall(function()
         prof.reset()
         prof.enable({sync = true})
         prof.enable()                       -- already on: stays in sync mode
         assert.is_true(prof.syncs())
         fail, waits = true, 0
         local okf, e = pcall(net.forward, net, x)
         assert.is_false(okf)
         assert.truthy(tostring(e):find('device lost', 1, true))
         fail = false
         prof.reset()
         net:forward(x)                      -- timed normally again: the stack was unwound
         local by = {}
         for _, l in ipairs(prof.data().layers) do by[l.type] = l end
         assert.equal(1, by['Sequential (self)'].nf)
      end)
      prof.disable()
      cuda.built, cuda.available, cuda.synchronize = saved[1], saved[2], saved[3]
      assert(ok, err)
   end)
end)

-- nr.optim: SGD against PyTorch's torch.optim.SGD (momentum, Nesterov, weight decay; golden
-- values below, produced by the script in the comment), parameter groups, writable config,
-- state()/load_state round trip by names, state_of/set_state_of/refresh after "surgery", and
-- errors. Tolerance: 1e-6 relative (float32 arithmetic in the same order as PyTorch).
--
-- Golden values: /usr/bin/python3 with torch 2.x:
--   import torch
--   p0 = [1.0, -2.0, 0.5, 3.0]
--   grads = [[0.1, -0.2, 0.3, -0.4], [0.5, 0.25, -0.125, 1.0], [-0.3, 0.7, 0.2, -0.1]]
--   for cfg in [dict(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False),
--               dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
--               dict(lr=0.05, momentum=0.0, weight_decay=5e-4, nesterov=False)]:
--       p = torch.tensor(p0, dtype=torch.float32, requires_grad=True)
--       opt = torch.optim.SGD([p], **cfg)
--       for g in grads:
--           p.grad = torch.tensor(g, dtype=torch.float32); opt.step(); print(p.tolist())
local nr = require 'nr'
local class = require 'nr.class'
local Module = require 'nr.nn.module'

local P0 = {1.0, -2.0, 0.5, 3.0}
local GRADS = {{0.1, -0.2, 0.3, -0.4}, {0.5, 0.25, -0.125, 1.0}, {-0.3, 0.7, 0.2, -0.1}}
local GOLDEN = {
   {cfg = {lr = 0.1, momentum = 0.9, weight_decay = 0.0, nesterov = false},
    out = {{0.99000001, -1.98000002, 0.469999999, 3.03999996},
           {0.930999994, -1.98699999, 0.455500007, 2.97600007},
           {0.907899976, -2.06329989, 0.422450006, 2.92840004}}},
   {cfg = {lr = 0.1, momentum = 0.9, weight_decay = 1e-2, nesterov = true},
    out = {{0.979099989, -1.95819998, 0.44205001, 3.0703001},
           {0.873329699, -1.98415935, 0.440255105, 2.90443659},
           {0.879358292, -2.1160152, 0.388951063, 2.86140418}}},
   {cfg = {lr = 0.05, momentum = 0.0, weight_decay = 5e-4, nesterov = false},
    out = {{0.994974971, -1.98994994, 0.484987497, 3.01992512},
           {0.96995008, -2.00240016, 0.491225362, 2.96984959},
           {0.984925807, -2.03735018, 0.481213093, 2.97477531}}},
}

-- first differing element, or nil
local function differ(got, want, tol)
   for i = 1, #want do
      if math.abs(got[i] - want[i]) > tol * math.max(1, math.abs(want[i])) then
         return string.format('element %d: got %.9g, want %.9g (tol %g)', i, got[i], want[i], tol)
      end
   end
end

-- A minimal leaf with weight/bias, so the spec does not depend on the layer files.
local Leaf = class('Leaf', Module)
function Leaf:__init(w, b)
   Module.__init(self)
   self.weight = nr.tensor(w)
   self.gradWeight = nr.zeros({#w})
   if b then self.bias = nr.tensor(b); self.gradBias = nr.zeros({#b}) end
end
local Norm = class('BatchNormLike', Leaf)
Norm.typename = function() return 'BatchNorm2d' end

describe('nr.optim.SGD', function()
   for k, case in ipairs(GOLDEN) do
      it(string.format('matches torch.optim.SGD (case %d: momentum %g, nesterov %s, wd %g)', k,
            case.cfg.momentum, tostring(case.cfg.nesterov), case.cfg.weight_decay), function()
         local m = Leaf(P0)
         local opt = nr.optim.SGD(m, case.cfg)
         for s = 1, 3 do
            m.gradWeight:copy(nr.tensor(GRADS[s]))
            opt:step()
            local d = differ(m.weight:totable(), case.out[s], 1e-6)
            assert(d == nil, 'step ' .. s .. ': ' .. tostring(d))
         end
         assert.equal(3, opt.t)
      end)
   end

   it('agrees with a hand computation of the first momentum step (buf = grad)', function()
      local m = Leaf({1, 2})
      local opt = nr.optim.SGD(m, {lr = 0.5, momentum = 0.9})
      m.gradWeight:copy(nr.tensor({0.5, -1}))
      opt:step()
      assert.same({0.75, 2.5}, m.weight:totable())
      assert.same({0.5, -1}, opt:state_of(m.weight).momentum:totable())
      opt:step()  -- buf = 0.9 * buf + g = {0.95, -1.9}; p -= 0.5 * buf
      local w = m.weight:totable()
      assert(math.abs(w[1] - (0.75 - 0.475)) < 1e-6 and math.abs(w[2] - (2.5 + 0.95)) < 1e-6)
   end)

   it('reads config.lr at every step (writable)', function()
      local m = Leaf({1})
      local opt = nr.optim.SGD(m, {lr = 1})
      m.gradWeight:fill(1)
      opt:step()
      opt.config.lr = 0.25
      opt:step()
      assert.same({-0.25}, m.weight:totable())
      assert.equal(0.25, opt:lr())
   end)

   it('builds parameter groups: no decay on biases and normalization parameters', function()
      local net = nr.nn.Sequential{Leaf({1, 1}, {1}), Norm({1}, {1})}
      local groups = nr.optim.param_groups(net, {no_decay_bn_bias = true})
      local names = {}
      for _, e in ipairs(groups[1].params) do names[#names + 1] = e.name end
      assert.same({'0.weight'}, names)
      names = {}
      for _, e in ipairs(groups[2].params) do names[#names + 1] = e.name end
      assert.same({'0.bias', '1.weight', '1.bias'}, names)
      local opt = nr.optim.SGD(groups, {lr = 1, weight_decay = 0.5})
      -- zero gradients: only decayed parameters move (p -= lr * wd * p)
      opt:step()
      assert.same({0.5, 0.5}, net.modules[1].weight:totable())
      assert.same({1}, net.modules[1].bias:totable())
      assert.same({1}, net.modules[2].weight:totable())
      -- the same through the config flag
      local net2 = nr.nn.Sequential{Leaf({1, 1}, {1})}
      local opt2 = nr.optim.SGD(net2, {lr = 1, weight_decay = 0.5, no_decay_bn_bias = true})
      opt2:step()
      assert.same({1}, net2.modules[1].bias:totable())
      assert.same({0.5, 0.5}, net2.modules[1].weight:totable())
   end)

   it('accepts explicit groups of tensors with their gradients and per-group settings', function()
      local a, ga = nr.tensor({1}), nr.tensor({1})
      local b, gb = nr.tensor({1}), nr.tensor({1})
      local opt = nr.optim.SGD({{params = {a}, grads = {ga}}, {params = {b}, grads = {gb}, lr_mult = 0.5}}, {lr = 0.2})
      opt:step()
      assert(math.abs(a:item() - 0.8) < 1e-7 and math.abs(b:item() - 0.9) < 1e-7)
   end)

   it('refuses a tensor listed twice (it would be stepped twice per step)', function()
      local w, g = nr.randn({3}), nr.zeros({3})
      local ok, e = pcall(nr.optim.SGD, {{params = {w, w}, grads = {g, g}}}, {lr = 0.1})
      assert.is_false(ok)
      assert.truthy(tostring(e):find('is the same tensor as', 1, true), tostring(e))
   end)

   it('round-trips state() / load_state() by parameter names', function()
      local m1 = Leaf({1, 2}, {3})
      local o1 = nr.optim.SGD(m1, {lr = 0.1, momentum = 0.9, nesterov = true})
      m1.gradWeight:copy(nr.tensor({0.1, 0.2})); m1.gradBias:fill(0.3)
      o1:step()
      local s = o1:state()
      assert.equal(1, s.t)
      local mw = s.params.weight.momentum:totable()
      assert(math.abs(mw[1] - 0.1) < 1e-7 and math.abs(mw[2] - 0.2) < 1e-7, 'momentum after one step = grad')
      local m2 = Leaf({1, 2}, {3})
      m2.weight:copy(m1.weight); m2.bias:copy(m1.bias)
      local o2 = nr.optim.SGD(m2, {lr = 0.5, momentum = 0.9, nesterov = true})
      o2:load_state(s)
      assert.equal(0.1, o2.config.lr)
      for _, o in ipairs({{o1, m1}, {o2, m2}}) do
         o[2].gradWeight:copy(nr.tensor({-0.3, 0.4})); o[2].gradBias:fill(-1)
         o[1]:step()
      end
      assert.same(m1.weight:totable(), m2.weight:totable())
      assert.same(m1.bias:totable(), m2.bias:totable())
      -- the loaded buffer is a copy, not shared
      assert.is_false(o2:state_of(m2.weight).momentum:same_storage(o1:state_of(m1.weight).momentum))
   end)

   it('keeps state across surgery with set_state_of + refresh, and flags stale parameters', function()
      local m = Leaf({1, 2, 3}, {0})
      local opt = nr.optim.SGD(m, {lr = 0.1, momentum = 0.9})
      m.gradWeight:fill(1); m.gradBias:fill(1)
      opt:step()
      local old = opt:state_of(m.weight).momentum
      -- surgery: keep elements 1 and 3
      local neww = m.weight:index_select(1, {0, 2})
      local newm = old:index_select(1, {0, 2})
      m.weight, m.gradWeight = neww, nr.zeros({2})
      assert.has_error(function() opt:step() end)
      local ok, err = pcall(opt.step, opt)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('refresh', 1, true))
      opt:set_state_of(neww, {momentum = newm})
      opt:refresh()
      assert.same({1, 1}, opt:state_of(m.weight).momentum:totable())
      assert.is_not_nil(opt:state_of(m.bias))
      -- the old tensor's state was dropped
      assert.is_nil(opt:state_of(old))
      opt:step()  -- grads zero: buf = 0.9, p -= 0.09
      local w = m.weight:totable()
      assert(math.abs(w[1] - (0.9 - 0.09)) < 1e-6 and math.abs(w[2] - (2.9 - 0.09)) < 1e-6)
   end)

   it('rejects bad configurations and mismatched state with clear errors', function()
      local m = Leaf({1})
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      assert.truthy(msg(function() nr.optim.SGD(m, {lr = 0.1, momentom = 0.9}) end):find('momentom', 1, true))
      assert.truthy(msg(function() nr.optim.SGD(m, {lr = 0.1, nesterov = true}) end):find('nesterov', 1, true))
      assert.truthy(msg(function() nr.optim.SGD(m, {}) end):find('lr', 1, true))
      local opt = nr.optim.SGD(m, {lr = 0.1, momentum = 0.5})
      assert.truthy(msg(function() opt:load_state({params = {nope = {momentum = nr.zeros({1})}}}) end):find('nope', 1, true))
      assert.truthy(msg(function() opt:load_state({params = {weight = {momentum = nr.zeros({2})}}}) end):find('weight', 1, true))
      assert.truthy(msg(function() opt:set_state_of(m.weight, {momentum = nr.zeros({3})}) end):find('shape', 1, true))
      assert.truthy(msg(function() opt:load_state({t = 'x'}) end):find('state.t', 1, true))
      assert.truthy(msg(function() opt:load_state({t = 0 / 0}) end):find('state.t', 1, true))
      assert.truthy(msg(function() nr.optim.build({name = 'adagrad', lr = 1}, m) end):find('unknown optimizer "adagrad"', 1, true))
   end)

   it('refuses settings that are not finite numbers >= 0 (config and groups, at construction and step), a non-boolean nesterov and a non-string name', function()
      local m = Leaf({1, 2})
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      local nan, inf = 0 / 0, math.huge
      local function group(k, v) return {{params = m:namedParameters(), [k] = v}} end
      for _, c in ipairs({
         {m, {lr = inf}, 'config.lr must be a finite number >= 0, got inf'},
         {m, {lr = 0.1, momentum = inf}, 'config.momentum must be a finite number >= 0, got inf'},
         {m, {lr = 0.1, weight_decay = nan}, 'config.weight_decay must be a finite number >= 0, got nan'},
         {m, {lr = 0.1, momentum = 0.9, nesterov = 'x'}, 'config.nesterov must be a boolean, got "x"'},
         {group('lr_mult', nan), {lr = 0.1}, 'group 1: lr_mult must be a finite number >= 0, got nan'},
         {group('lr_mult', -1), {lr = 0.1}, 'group 1: lr_mult must be a finite number >= 0, got -1'},
         {group('lr_mult', 'x'), {lr = 0.1}, 'group 1: lr_mult must be a finite number >= 0, got "x"'},
         {group('momentum', inf), {lr = 0.1}, 'group 1: momentum must be a finite number >= 0, got inf'},
         {group('nesterov', 1), {lr = 0.1}, 'group 1: nesterov must be a boolean, got 1'},
      }) do
         local e = msg(function() nr.optim.SGD(c[1], c[2]) end)
         assert.truthy(e:find('nr.optim.SGD: ' .. c[3], 1, true), e)
      end
      -- config and groups stay writable: a bad value is refused at the step, before any update
      local opt = nr.optim.SGD(m, {lr = 0.1})
      opt.groups[1].lr_mult = inf
      assert.truthy(msg(function() opt:step() end):find('SGD:step: group 1: lr_mult must be a finite number >= 0, got inf', 1, true))
      assert.same({1, 2}, m.weight:totable())
      assert.truthy(msg(function() nr.optim.build({name = 5, lr = 0.1}, m) end):find('nr.optim.build: name must be a string, got 5', 1, true))
      -- Torch7's habit, the lists of m:parameters(): pointed to the module (it read the gradients'
      -- list as the config: 'unknown option "1"')
      local lin = nr.nn.Linear(2, 2)
      assert.truthy(msg(function() nr.optim.SGD(lin:parameters()) end)
         :find('nr.optim.SGD: got a list of tensors (m:parameters()?): pass the model itself', 1, true))
   end)

   it('nr_sgd_step_many equals nr_sgd_step per parameter, bit for bit, and is all or nothing', function()
      local ffi, C = require('ffi'), require('nr.ffi').C
      for _, cfg in ipairs({{0, 0, 0}, {0.9, 5e-4, 0}, {0.9, 1e-4, 1}}) do
         local mu, wd, nest = cfg[1], cfg[2], cfg[3]
         nr.manual_seed(3)
         local shapes = {{7, 3}, {200000}, {1}, {16, 8, 3, 3}}
         local one, many, grads = {}, {}, {}
         for i, sh in ipairs(shapes) do
            local p = nr.randn(sh)
            one[i] = {p = p:clone(), b = nr.zeros(sh)}
            many[i] = {p = p:clone(), b = nr.zeros(sh)}
            grads[i] = nr.randn(sh)
         end
         local jobs = ffi.new('nr_sgd_job[?]', #shapes)
         for _ = 1, 3 do
            for i = 1, #shapes do
               assert.equal(0, C.nr_sgd_step(one[i].p.c, grads[i].c, mu ~= 0 and one[i].b.c or nil, 0.1, mu, wd, nest))
               jobs[i - 1].param, jobs[i - 1].grad = many[i].p.c, grads[i].c
               jobs[i - 1].momentum_buf = mu ~= 0 and many[i].b.c or nil
            end
            assert.equal(0, C.nr_sgd_step_many(jobs, #shapes, 0.1, mu, wd, nest))
         end
         for i = 1, #shapes do
            assert.equal(0, one[i].p:sub(many[i].p):abs():max())
            assert.equal(0, one[i].b:sub(many[i].b):abs():max())
         end
      end
      -- job 1 is bad: job 0 must be untouched, and the message names the job
      local p0, g0, p1 = nr.randn({4}), nr.randn({4}), nr.randn({3})
      local before = p0:clone()
      local jobs = ffi.new('nr_sgd_job[2]')
      jobs[0].param, jobs[0].grad = p0.c, g0.c
      jobs[1].param, jobs[1].grad = p1.c, nr.randn({5}).c
      assert.are_not.equal(0, C.nr_sgd_step_many(jobs, 2, 0.1, 0, 0, 0))
      assert.truthy(ffi.string(C.nr_last_error()):find('nr_sgd_step_many (job 1): grad: expected', 1, true))
      assert.equal(0, before:sub(p0):abs():max())
      assert.are_not.equal(0, C.nr_sgd_step_many(nil, 2, 0.1, 0, 0, 0))
      assert.equal(0, C.nr_sgd_step_many(jobs, 0, 0.1, 0, 0, 0))
   end)

   it('a refused step or state changes nothing (every group and the whole state checked first)', function()
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      -- group 2's settings are bad: group 1 must not have stepped, nor the step count moved
      local p1, g1, p2, g2 = nr.tensor({1, 1}), nr.tensor({1, 1}), nr.tensor({1, 1}), nr.tensor({1, 1})
      local o = nr.optim.SGD({{params = {p1}, grads = {g1}}, {params = {p2}, grads = {g2}}}, {lr = 0.1})
      o.groups[2].lr = -1
      assert.truthy(msg(function() o:step() end):find('group 2: lr must be', 1, true))
      assert.same({1, 1}, p1:totable())
      assert.equal(0, o.t)
      -- group 2's tensors fail C's checks (a gradient of another shape): likewise
      o.groups[2].lr = nil
      local p3 = nr.tensor({1, 1, 1})
      local o2 = nr.optim.SGD({{params = {p1}, grads = {g1}}, {params = {p3}, grads = {nr.tensor({1, 1})}}}, {lr = 0.1})
      assert.truthy(msg(function() o2:step() end):find('SGD:step (group2.1)', 1, true))
      assert.same({1, 1}, p1:totable())
      -- a rejected state leaves config, groups, step count and momentum as they were
      local q1, h1, q2, h2 = nr.ones({5}), nr.ones({5}), nr.ones({3}), nr.ones({3})
      local opt = nr.optim.SGD({{params = {q1}, grads = {h1}}, {params = {q2}, grads = {h2}}}, {lr = 0.1, momentum = 0.9})
      opt:step()
      local mom = opt:state_of(q2).momentum:totable()
      assert.truthy(msg(function()
         opt:load_state({t = 99, config = {lr = 5, momentum = 0.1, weight_decay = 0}, groups = {{lr_mult = 3}, {}},
                         params = {['group1.1'] = {momentum = nr.zeros({2, 2})}}})
      end):find('group1.1: momentum has shape [2 x 2] but the parameter is [5]', 1, true))
      assert.equal(0.1, opt.config.lr); assert.equal(0.9, opt.config.momentum); assert.equal(1, opt.t)
      assert.is_nil(opt.groups[1].lr_mult)
      assert.same(mom, opt:state_of(q2).momentum:totable())
      -- groups must be this optimizer's: their number and the parameters each one's settings belong to
      local net = nr.nn.Sequential{nr.nn.Linear(3, 3), nr.nn.Linear(3, 2)}
      local e = net:namedParameters()
      local A = nr.optim.SGD({{params = {e[1], e[2]}, lr = 0.5}, {params = {e[3], e[4]}}}, {lr = 0.1, momentum = 0.9})
      local B = nr.optim.SGD({{params = {e[3]}}, {params = {e[1], e[2], e[4]}}}, {lr = 0.1, momentum = 0.9})
      assert.truthy(msg(function() B:load_state(A:state()) end):find('group 1 holds 1 parameters, the state\'s 2', 1, true))
      local B3 = nr.optim.SGD({{params = {e[1], e[3]}}, {params = {e[2], e[4]}}}, {lr = 0.1, momentum = 0.9})
      assert.truthy(msg(function() B3:load_state(A:state()) end):find('group 1, parameter 2 is 1.weight, the state\'s is 0.bias', 1, true))
      local one = nr.optim.SGD(net, {lr = 0.1})
      assert.truthy(msg(function() one:load_state(A:state()) end):find('state has 2 parameter groups, this optimizer 1', 1, true))
      local same = nr.optim.SGD({{params = {e[1], e[2]}}, {params = {e[3], e[4]}}}, {lr = 0.1, momentum = 0.9})
      same:load_state(A:state())
      assert.equal(0.5, same:lr(1)); assert.equal(0.1, same:lr(2))
   end)

   it('a group without momentum under a nesterov config steps as plain SGD (as PyTorch)', function()
      local p, g = nr.tensor({1, 2}), nr.tensor({1, 1})
      local o = nr.optim.SGD({{params = {p}, grads = {g}, momentum = 0}}, {lr = 0.1, momentum = 0.9, nesterov = true})
      o:step()
      -- torch.optim.SGD([{'params': [p], 'momentum': 0}], lr=0.1, momentum=0.9, nesterov=True): [0.9, 1.9]
      assert.is_true(math.abs(p:get(1) - 0.9) < 1e-7 and math.abs(p:get(2) - 1.9) < 1e-7)
   end)

   it('checks shapes in C and names the parameter', function()
      local m = Leaf({1, 2})
      m.gradWeight = nr.zeros({3})
      local opt = nr.optim.SGD(m, {lr = 0.1})
      local ok, err = pcall(opt.step, opt)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('weight', 1, true))
      assert.truthy(tostring(err):find('nr_sgd_check_many (job 0): grad', 1, true))
      assert.truthy(tostring(err):find('SGD:step (weight)', 1, true))
   end)
end)

-- Adam / AdamW (also with amsgrad) against torch.optim.Adam / AdamW (PyTorch 1.13, /usr/bin/python3):
--   p0 = [1.0, -2.0, 0.5, 3.0, 0.0]
--   grads = [[0.1, -0.2, 0.3, -0.4, 0.0], [0.5, 0.25, -0.125, 1.0, 1e-7], [-0.3, 0.7, 0.2, -0.1, -2.0],
--            [0.05, 0.0, -0.6, 0.4, 0.3]]
--   for name, cfg in ADAM_GOLDEN's cases:
--       p = torch.tensor(p0, dtype=torch.float32, requires_grad=True)
--       opt = getattr(torch.optim, name)([p], **cfg)
--       for g in grads:
--           p.grad = torch.tensor(g, dtype=torch.float32); opt.step(); print(p.tolist())
local ADAM_P0 = {1.0, -2.0, 0.5, 3.0, 0.0}
local ADAM_GRADS = {{0.1, -0.2, 0.3, -0.4, 0.0}, {0.5, 0.25, -0.125, 1.0, 1e-7}, {-0.3, 0.7, 0.2, -0.1, -2.0},
                    {0.05, 0.0, -0.6, 0.4, 0.3}}
local ADAM_GOLDEN = {
   {'Adam', {lr = 0.1},
    {{0.899999976, -1.89999998, 0.400000006, 3.0999999, 0},
     {0.813895345, -1.91627324, 0.366785914, 3.0557785, -0.0651958957},
     {0.788942516, -1.97960281, 0.311422944, 3.02765083, -0.00131454319},
     {0.76367712, -2.03147864, 0.336157352, 2.98586845, 0.0418089665}}},
   {'Adam', {lr = 0.05, weight_decay = 1e-2, betas = {0.8, 0.99}, eps = 1e-6},
    {{0.950000465, -1.95000029, 0.450000167, 3.04999995, 0},
     {0.905072093, -1.95671856, 0.435179085, 3.02369809, -0.00259390078},
     {0.893961787, -1.99079537, 0.407285124, 3.00693631, 0.0327215977},
     {0.88216579, -2.01597476, 0.424072891, 2.98262405, 0.0544346422}}},
   {'AdamW', {lr = 0.1, weight_decay = 0.1},
    {{0.889999986, -1.88, 0.395000011, 3.06999993, 0},
     {0.794995368, -1.87747324, 0.357835919, 2.99507856, -0.0651958957},
     {0.76209259, -1.92202806, 0.298894584, 2.93700004, -0.000662587583},
     {0.729206264, -1.95468354, 0.320640057, 2.86584759, 0.0424675494}}},
   {'AdamW', {lr = 0.01, weight_decay = 1e-2, betas = {0.5, 0.9}, eps = 1e-3},
    {{0.989998996, -1.98984969, 0.489983201, 3.00967503, 0},
     {0.979995668, -1.99402344, 0.489198416, 3.00250959, -6.66618291e-07},
     {0.980310202, -2.00338721, 0.483565211, 2.99944592, 0.00939849764},
     {0.979529619, -2.00848413, 0.490588844, 2.99395823, 0.0129982047}}},
   -- amsgrad (the 4th step of the first case differs from plain Adam in its second element)
   {'Adam', {lr = 0.1, amsgrad = true},
    {{0.899999976, -1.89999998, 0.400000006, 3.0999999, 0},
     {0.813895345, -1.91627324, 0.366785914, 3.0557785, -0.0651958957},
     {0.788942516, -1.97960281, 0.311422944, 3.02765083, -0.00131454319},
     {0.76367712, -2.03145266, 0.336157352, 2.98586845, 0.0418089665}}},
   {'AdamW', {lr = 0.05, weight_decay = 0.1, betas = {0.8, 0.9}, amsgrad = true},
    {{0.944999993, -1.94000006, 0.44749999, 3.03500009, 0},
     {0.896638274, -1.94128001, 0.43109715, 2.99548221, -0.0336506106},
     {0.882422268, -1.96580899, 0.401297092, 2.96650124, 0.000251404941},
     {0.867997289, -1.98148167, 0.416002065, 2.92949104, 0.0206667352}}},
}

-- |got - want| within 1e-6 relative to max(1, |want|), and within 1e-6 absolute of the tiny ones
local function adam_differ(got, want)
   return differ(got, want, 1e-6)
end

describe('nr.optim.Adam and AdamW', function()
   for k, case in ipairs(ADAM_GOLDEN) do
      it(string.format('matches torch.optim.%s (case %d)', case[1], k), function()
         local m = Leaf(ADAM_P0)
         local opt = nr.optim[case[1]](m, case[2])
         for s = 1, 4 do
            m.gradWeight:copy(nr.tensor(ADAM_GRADS[s]))
            opt:step()
            local d = adam_differ(m.weight:totable(), case[3][s])
            assert(d == nil, 'step ' .. s .. ': ' .. tostring(d))
         end
         assert.equal(4, opt:state_of(m.weight).step)
      end)
   end

   it('round-trips state() / load_state() (moments and the per-parameter step) and continues as PyTorch', function()
      local case = ADAM_GOLDEN[3]
      local m1 = Leaf(ADAM_P0)
      local o1 = nr.optim.AdamW(m1, case[2])
      for s = 1, 2 do m1.gradWeight:copy(nr.tensor(ADAM_GRADS[s])); o1:step() end
      local st = o1:state()
      assert.equal('adamw', st.name)
      assert.equal(2, st.params.weight.step)
      assert.truthy(nr.is_tensor(st.params.weight.exp_avg) and nr.is_tensor(st.params.weight.exp_avg_sq))
      local m2 = Leaf(ADAM_P0)
      m2.weight:copy(m1.weight)
      local o2 = nr.optim.AdamW(m2, {lr = 0.5})
      o2:load_state(st)
      for s = 3, 4 do m2.gradWeight:copy(nr.tensor(ADAM_GRADS[s])); o2:step() end
      assert.is_nil(adam_differ(m2.weight:totable(), case[3][4]))
      -- another optimizer's state is refused by name
      local sgd = nr.optim.SGD(Leaf(ADAM_P0), {lr = 0.1, momentum = 0.9})
      local ok, e = pcall(sgd.load_state, sgd, st)
      assert.is_false(ok)
      assert.truthy(tostring(e):find('state is for optimizer "adamw", not sgd', 1, true), tostring(e))
      ok, e = pcall(o2.load_state, o2, {params = {weight = {momentum = nr.zeros({5})}}})
      assert.is_false(ok)
      assert.truthy(tostring(e):find('weight: unknown state "momentum" for AdamW (it keeps: exp_avg, exp_avg_sq, max_exp_avg_sq, step)', 1, true),
         tostring(e))
      ok, e = pcall(o2.load_state, o2, {params = {weight = {step = -1}}})
      assert.is_false(ok)
      assert.truthy(tostring(e):find('weight.step', 1, true), tostring(e))
   end)

   it('dropping a parameter\'s state restarts its moments and bias corrections (a fresh Adam from there)', function()
      local m1 = Leaf(ADAM_P0)
      local o1 = nr.optim.Adam(m1, {lr = 0.1})
      for s = 1, 2 do m1.gradWeight:copy(nr.tensor(ADAM_GRADS[s])); o1:step() end
      o1:set_state_of(m1.weight, nil)
      local m2 = Leaf(m1.weight:totable())
      local o2 = nr.optim.Adam(m2, {lr = 0.1})
      for s = 3, 4 do
         for _, m in ipairs({m1, m2}) do m.gradWeight:copy(nr.tensor(ADAM_GRADS[s])) end
         o1:step(); o2:step()
      end
      assert.same(m2.weight:totable(), m1.weight:totable())
      assert.equal(2, o1:state_of(m1.weight).step)
   end)

   it('refuses bad settings with clear errors', function()
      local m = Leaf({1})
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      for _, c in ipairs({
         {{lr = 0.1, betas = {0.9, 1}}, 'config.betas must be two numbers in [0, 1)'},
         {{lr = 0.1, betas = 0.9}, 'config.betas must be two numbers in [0, 1)'},
         {{lr = 0.1, eps = -1}, 'config.eps must be a finite number >= 0, got -1'},
         {{lr = 0 / 0}, 'config.lr must be a finite number >= 0, got nan'},
         {{lr = 0.1, momentum = 0.9}, 'momentum'},
      }) do
         local e = msg(function() nr.optim.AdamW(m, c[1]) end)
         assert.truthy(e:find(c[2], 1, true), e)
         assert.truthy(e:find('nr.optim.AdamW', 1, true), e)
      end
      -- a recipe's sgd settings under --optim.name adamw: named as sgd's
      local e = msg(function() nr.optim.build({name = 'adamw', lr = 1e-3, momentum = 0.9, nesterov = false}, m) end)
      assert.truthy(e:find("nr.optim: adamw takes no momentum (sgd's), nesterov (sgd's); remove them from the optim table", 1, true), e)
      -- the trainer fills the named optimizer's defaults, not sgd's
      local r = require('nr.train').resolve({optim = {name = 'adamw'}})
      assert.same({0.9, 0.999}, r.optim.betas)
      assert.is_nil(r.optim.momentum)
      assert.equal(1e-2, r.optim.weight_decay)
      local opt = nr.optim.build(r.optim, m)
      assert.equal('AdamW', opt.NAME)
      assert.equal(1e-2, opt.config.weight_decay)
   end)

   it('nr_adam_step_many checks every job first and names the bad one', function()
      local ffi, C = require('ffi'), require('nr.ffi').C
      local p0, p1 = nr.randn({4}), nr.randn({3})
      local before = p0:clone()
      local jobs = ffi.new('nr_adam_job[2]')
      jobs[0].param, jobs[0].grad, jobs[0].exp_avg, jobs[0].exp_avg_sq, jobs[0].step = p0.c, nr.randn({4}).c, nr.zeros({4}).c,
         nr.zeros({4}).c, 1
      jobs[1].param, jobs[1].grad, jobs[1].exp_avg, jobs[1].exp_avg_sq, jobs[1].step = p1.c, nr.randn({3}).c, nr.zeros({3}).c,
         nr.zeros({2}).c, 1
      assert.are_not.equal(0, C.nr_adam_step_many(jobs, 2, 0.1, 0.9, 0.999, 1e-8, 0, 1))
      assert.truthy(ffi.string(C.nr_last_error()):find('nr_adam_step_many (job 1): exp_avg_sq: expected', 1, true))
      assert.equal(0, before:sub(p0):abs():max())
      jobs[1].exp_avg_sq = nr.zeros({3}).c
      jobs[1].step = 0
      assert.are_not.equal(0, C.nr_adam_step_many(jobs, 2, 0.1, 0.9, 0.999, 1e-8, 0, 1))
      assert.truthy(ffi.string(C.nr_last_error()):find('step must be >= 1', 1, true))
      jobs[1].step = 1
      assert.are_not.equal(0, C.nr_adam_step_many(jobs, 2, 0.1, 1.0, 0.999, 1e-8, 0, 1))
      assert.truthy(ffi.string(C.nr_last_error()):find('betas must be in [0, 1)', 1, true))
      assert.equal(0, before:sub(p0):abs():max())
   end)
end)

describe('nr.optim: state ownership, settings as floats, clear errors (review findings)', function()
   local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end

   it('each Adam owns its default betas (config and state() are copies, not the class table)', function()
      local a, b = nr.optim.Adam(Leaf({1}), {lr = 0.1}), nr.optim.Adam(Leaf({1}), {lr = 0.1})
      a.config.betas[1] = 0.5
      assert.equal(0.9, b.config.betas[1])
      assert.equal(0.9, nr.optim.Adam(Leaf({1}), {lr = 0.1}).config.betas[1])
      b:state().config.betas[2] = 0.5
      assert.equal(0.999, b.config.betas[2])
   end)

   it('set_state_of copies a tensor another parameter\'s state (or the same call) already uses; a step alone is no state', function()
      local m1, m2 = Leaf({1, 2}), Leaf({3, 4})
      local opt = nr.optim.SGD({{params = {m1.weight, m2.weight}, grads = {m1.gradWeight, m2.gradWeight}}}, {lr = 0.1, momentum = 0.9})
      opt:set_state_of(m1.weight, {momentum = nr.tensor({1, 1})})
      opt:set_state_of(m2.weight, opt:state_of(m1.weight))
      assert.is_false(opt:state_of(m1.weight).momentum:same_storage(opt:state_of(m2.weight).momentum))
      local t = nr.zeros({2})
      local a = nr.optim.Adam({{params = {m1.weight}, grads = {m1.gradWeight}}}, {lr = 0.1})
      a:set_state_of(m1.weight, {exp_avg = t, exp_avg_sq = t, step = 2})
      local st = a:state_of(m1.weight)
      assert.is_false(st.exp_avg:same_storage(st.exp_avg_sq))
      -- a step count without moments: no state (set_state_of and load_state alike)
      a:set_state_of(m1.weight, {step = 1000})
      assert.is_nil(a:state_of(m1.weight))
      a:load_state({params = {['group1.1'] = {step = 1000}}})
      assert.is_nil(a:state_of(m1.weight))
      m1.gradWeight:fill(1)
      a:step()
      assert.equal(1, a:state_of(m1.weight).step)
   end)

   it('settings are used as floats: past 3.4e38 (inf as a float), or a beta that rounds to 1, is refused at once', function()
      local m = Leaf({1})
      for _, c in ipairs({{'SGD', {lr = 1e39}, 'config.lr must be a finite number >= 0 (at most 3.4e38'},
                          {'SGD', {lr = 0.1, momentum = 1e39}, 'config.momentum'},
                          {'AdamW', {lr = 0.1, weight_decay = 1e39}, 'config.weight_decay'},
                          {'Adam', {lr = 0.1, betas = {0.9, 0.99999999999}}, 'config.betas must be two numbers in [0, 1)'}}) do
         local e = msg(function() nr.optim[c[1]](m, c[2]) end)
         assert.truthy(e:find(c[3], 1, true), e)
      end
      -- 1 - beta and the bias corrections in double, as PyTorch: after one step with beta2 = 0.9999
      -- the update is lr * g / (|g| + eps) exactly (float(1 - beta2) / (1 - beta2) cancels)
      local l = Leaf({0, 0})
      local o = nr.optim.Adam(l, {lr = 1, betas = {0.9, 0.9999}, eps = 0})
      l.gradWeight:copy(nr.tensor({3, -0.5}))
      o:step()
      local w = l.weight:totable()
      assert.is_true(math.abs(w[1] + 1) < 1e-6 and math.abs(w[2] - 1) < 1e-6, w[1] .. ' ' .. w[2])
   end)

   it('names what is wrong, at the caller\'s line', function()
      local here = debug.getinfo(1, 'S').short_src
      local m = Leaf({1, 2})
      local sgd = nr.optim.SGD(m, {lr = 0.1, momentum = 0.9})
      for _, c in ipairs({
         {function() sgd:set_state_of(m.weight, {momentum = nr.zeros({3})}) end, 'momentum has shape [3] but the parameter is [2]'},
         {function() sgd:set_state_of(m.weight, {momentum = 5}) end, 'momentum must be a tensor of the parameter\'s shape [2], got 5'},
         {function() sgd:load_state({params = {weight = {momentum = nr.zeros({3})}}}) end, 'weight: momentum has shape [3]'},
         {function() nr.optim.AdamW(m, {lr = 0.1, betas = {0.9}}) end, 'config.betas must be two numbers in [0, 1) such as {0.9, 0.999}, got {0.9}'},
         {function() nr.optim.Adam({{params = m.weight}}, {lr = 0.1}) end, 'group 1: params must be a list of parameters, got one tensor'},
         {function() nr.optim.AdamW(m, {lr = 0.1, no_decay_bn_bias = 'false'}) end, 'config.no_decay_bn_bias must be true or false, got "false"'},
         {function() nr.optim.Adam(m, {lr = 0.1, name = 'sgd'}) end, 'config.name is "sgd", but this is Adam ("adam")'},
         {function() sgd:lr(5) end, 'SGD:lr: group 5 does not exist (this optimizer has 1)'},
      }) do
         local e = msg(c[1])
         assert.truthy(e:find(c[2], 1, true), e)
         assert.equal(here, e:match('^(.-):%d+:'), e)
      end
      -- a setting or group key written later is checked at the step
      local a = nr.optim.Adam(m, {lr = 0.1})
      a.config.betas = nil
      assert.truthy(msg(function() a:step() end):find('Adam:step: config.betas must be two numbers', 1, true))
      local s2 = nr.optim.SGD(m, {lr = 0.1})
      s2.groups[1].momentun = 0.9
      assert.truthy(msg(function() s2:step() end):find('group 1: unknown setting "momentun"', 1, true))
      m.gradWeight = 5
      assert.truthy(msg(function() nr.optim.SGD(m, {lr = 0.1}):step() end)
         :find('parameter weight: its gradient (gradWeight) is a number, not a tensor', 1, true))
   end)
end)

describe('nr.optim.clip_grad_norm', function()
   -- Golden values: /usr/bin/python3 with torch 1.13:
   --   grads0 = [[0.1, -0.2, 0.3, -0.4], [[0.5, 0.25], [-0.125, 1.0]], [3.0, -4.0, 12.0]]
   --   for max_norm, nt in [(1.0, 2.0), (20.0, 2.0), (0.5, float('inf'))]:
   --       ps = [torch.zeros(torch.tensor(g).shape, requires_grad=True) for g in grads0]
   --       for p, g in zip(ps, grads0): p.grad = torch.tensor(g, dtype=torch.float32)
   --       tot = torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type=nt)
   --       print(tot.item(), [p.grad.flatten().tolist() for p in ps])
   local G0 = {{0.1, -0.2, 0.3, -0.4}, {{0.5, 0.25}, {-0.125, 1.0}}, {3.0, -4.0, 12.0}}
   local CLIP_GOLDEN = {
      {max_norm = 1.0, norm_type = 2, total = 13.062470436096191,
       out = {{0.00765551953, -0.0153110391, 0.0229665581, -0.0306220781},
              {0.0382775962, 0.0191387981, -0.00956939906, 0.0765551925}, {0.229665577, -0.30622077, 0.91866231}}},
      {max_norm = 20.0, norm_type = 2, total = 13.062470436096191,
       out = {{0.100000001, -0.200000003, 0.300000012, -0.400000006}, {0.5, 0.25, -0.125, 1.0}, {3.0, -4.0, 12.0}}},
      {max_norm = 0.5, norm_type = math.huge, total = 12.0,
       out = {{0.00416666642, -0.00833333284, 0.0125000002, -0.0166666657},
              {0.0208333321, 0.010416666, -0.00520833302, 0.0416666642}, {0.124999993, -0.166666657, 0.49999997}}},
   }
   local function flat(t) return t:contiguous():reshape({t:numel()}):totable() end

   it('matches torch.nn.utils.clip_grad_norm_ (2-norm clipped and not, the largest |g|)', function()
      for ci, c in ipairs(CLIP_GOLDEN) do
         local grads = {}
         for i, g in ipairs(G0) do grads[i] = nr.tensor(g) end
         local total = nr.optim.clip_grad_norm(grads, c.max_norm, {norm_type = c.norm_type})
         assert(math.abs(total:item() - c.total) <= 1e-6 * c.total, 'case ' .. ci .. ' total ' .. total:item())
         for i, g in ipairs(grads) do
            local d = differ(flat(g), c.out[i], 1e-6)
            assert(d == nil, string.format('case %d grad %d: %s', ci, i, tostring(d)))
         end
      end
   end)

   it('takes a module (its gradients once each) or an optimizer; the norm does not depend on the thread count', function()
      nr.manual_seed(4)
      local shared = nr.nn.Linear(300, 300)
      local net = nr.nn.Sequential{shared, nr.nn.ReLU(), shared}   -- one layer at two places: one gradient
      local x = nr.randn({8, 300})
      net:forward(x)
      net:zeroGradParameters()
      net:backward(x, nr.randn({8, 300}))
      local _, grads = shared:parameters()
      local before = {grads[1]:clone(), grads[2]:clone()}
      local sq = 0
      for _, g in ipairs(before) do for _, v in ipairs(flat(g)) do sq = sq + v * v end end
      local was = nr.get_num_threads()
      local totals = {}
      for i, threads in ipairs({1, 2}) do
         nr.set_num_threads(threads)
         grads[1]:copy(before[1]); grads[2]:copy(before[2])
         totals[i] = nr.optim.clip_grad_norm(i == 1 and net or nr.optim.SGD(net, {lr = 0.1}), 0.5):item()
      end
      nr.set_num_threads(was)
      assert.equal(totals[1], totals[2])
      assert(math.abs(totals[1] - math.sqrt(sq)) <= 1e-6 * math.sqrt(sq), totals[1] .. ' vs ' .. math.sqrt(sq))
      local k = (1 / (totals[1] + 1e-6)) * 0.5
      local d = differ(flat(grads[1]), flat(before[1]:mul(k)), 1e-6)
      assert(d == nil, tostring(d))
   end)

   it('writes into out, clips nothing at math.huge, and refuses bad arguments at the caller\'s line', function()
      local g = nr.tensor({3, 4})
      local out = nr.zeros({1})
      assert.equal(out, nr.optim.clip_grad_norm({g}, math.huge, {out = out}))
      assert.same({5, {3, 4}}, {out:item(), g:totable()})
      local nan = nr.tensor({0 / 0, 1})
      assert.is_true(nr.optim.clip_grad_norm({nan}, 1):item() ~= nr.optim.clip_grad_norm({nan}, 1):item())
      -- an inf total under an inf max_norm: PyTorch's expression gives NaN gradients (inf x 0)
      local inf = nr.tensor({math.huge, 1})
      nr.optim.clip_grad_norm({inf}, math.huge)
      assert.is_true(inf:totable()[2] ~= inf:totable()[2])
      -- a total whose square overflows float (PyTorch 1.13 gives inf and zeros) is exact here
      local big = nr.tensor({2e19, 1})
      assert.is_true(math.abs(nr.optim.clip_grad_norm({big}, 1):item() - 2e19) <= 1e-6 * 2e19)
      assert.is_true(math.abs(big:totable()[1] - 1) < 1e-6)
      local here = debug.getinfo(1, 'S').short_src
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      for _, c in ipairs({{function() local t = nr.optim.clip_grad_norm({g}, 0) return t end, 'max_norm must be a number > 0, got 0'},
                          {function() local t = nr.optim.clip_grad_norm({g}, 1, {norm_type = 1}) return t end, 'norm_type must be 2 or math.huge'},
                          {function() local t = nr.optim.clip_grad_norm({g, 5}, 1) return t end, 'grads[2] must be a tensor, got 5'},
                          {function() local t = nr.optim.clip_grad_norm('model', 1) return t end, 'expected a module, an optimizer'},
                          {function() local t = nr.optim.clip_grad_norm({g}, 1, {out = nr.zeros({2})}) return t end, 'out must be a one-element tensor'},
                          {function() local t = nr.optim.clip_grad_norm({g, nr.tensor({1}, {dtype = 'int64'})}, 1) return t end,
                           'grads[2] must be a contiguous float32 tensor on cpu, like the first, got int64'},
                          {function() local t = nr.optim.clip_grad_norm({g, g, nr.randn({2, 2}):transpose(1, 2)}, 1) return t end,
                           'grads[3] must be a contiguous float32 tensor'},
                          -- a list with a hole (ipairs would stop there), a table keyed by names
                          {function() local t = nr.optim.clip_grad_norm({nil, g, g}, 1) return t end, 'grads[1] must be a tensor, got nil'},
                          {function() local t = nr.optim.clip_grad_norm({weight = g}, 1) return t end,
                           'grads must be a list of tensors, got a table with the key "weight"'}}) do
         local e = msg(c[1])
         assert(e:sub(1, #here + 1) == here .. ':' and e:find(c[2], 1, true), e)
      end
      -- a module's gradient is named by its parameter
      local net = nr.nn.Sequential{nr.nn.Linear(3, 2), nr.nn.ReLU(), nr.nn.Linear(2, 2)}
      net:get(3).gradWeight = nr.zeros({2, 2}):transpose(1, 2)
      local e = msg(function() local t = nr.optim.clip_grad_norm(net, 1) return t end)
      assert.truthy(e:find('the gradient of parameter 2.weight must be a contiguous float32 tensor', 1, true), e)
      -- a gradient field set to a number, a freed tensor: named, at the caller's line (they failed inside clip.lua)
      net:get(3).gradWeight = nr.zeros({2, 2})
      net:get(3).gradBias = 5
      e = msg(function() local t = nr.optim.clip_grad_norm(net, 1) return t end)
      assert(e:sub(1, #here + 1) == here .. ':' and e:find('the gradient of parameter 2.bias is 5, not a live tensor', 1, true), e)
      local freed = nr.zeros({2})
      freed:free()
      e = msg(function() local t = nr.optim.clip_grad_norm({g, freed}, 1) return t end)
      assert(e:sub(1, #here + 1) == here .. ':' and e:find('grads[2] is a freed tensor', 1, true), e)
      -- one tensor, as torch.nn.utils.clip_grad_norm_ takes
      local one = nr.tensor({3, 4})
      assert.equal(5, nr.optim.clip_grad_norm(one, 1):item())
      assert.is_true(math.abs(one:totable()[1] - 0.6) < 1e-6)
   end)
end)

-- nr.safetensors and nr.checkpoint: the safetensors byte layout (checked byte by byte here and
-- by an independent reader in Python/PyTorch when /usr/bin/python3 has torch), the round trip
-- of weights + state with tensors inside, the JSON encoder, and crash safety: a leftover temp
-- file, a half-written newer checkpoint or a damaged `latest` target never prevents loading the
-- last good checkpoint.
local nr = require 'nr'
local st = require 'nr.safetensors'
local ck = require 'nr.checkpoint'
local nrffi = require 'nr.ffi'
local ffi, C = nrffi.ffi, nrffi.C

local TMP = (os.getenv('NR_TEST_TMP') or '/tmp') .. '/nr_checkpoint_spec_' .. tostring(os.time()) .. '_' .. tostring(math.random(1e6))
ck.mkdirs(TMP)

local function u64le(s, at)
   local n = 0
   for i = at + 7, at, -1 do n = n * 256 + s:byte(i) end
   return n
end

local function write(path, s) local f = assert(io.open(path, 'wb')); f:write(s); f:close() end

-- ck.save(dir, opts) killed at the atomic write of the first path matching pattern (a process
-- killed mid-save); returns pcall's status.
local function save_killed(pattern, dir, opts)
   local write_atomic = ck.write_atomic
   ck.write_atomic = function(path, text)
      if path:match(pattern) then error('killed', 0) end
      return write_atomic(path, text)
   end
   local ok = pcall(ck.save, dir, opts)
   ck.write_atomic = write_atomic
   return ok
end

describe('nr.safetensors', function()
   it('writes the documented layout: u64 header length, JSON header, packed data', function()
      local a = nr.tensor({{1, 2, 3}, {4, 5, 6}})
      local b = nr.tensor({7, -8}, {dtype = 'int64'})
      local c = nr.tensor({255, 0, 1}, {dtype = 'uint8'})
      local path = TMP .. '/layout.safetensors'
      st.save(path, {['w.a'] = a, b = b, c = c}, {note = 'hi'})
      local bytes = ck.read_file(path)
      local n = u64le(bytes, 1)
      assert.equal(0, (8 + n) % 8, 'data buffer aligned to 8 bytes')
      local hdr = require('cjson').decode(bytes:sub(9, 8 + n))
      assert.same({note = 'hi', format = nil}, {note = hdr.__metadata__.note})
      assert.same({dtype = 'I64', shape = {2}, data_offsets = {0, 16}}, hdr.b)
      assert.same({dtype = 'U8', shape = {3}, data_offsets = {16, 19}}, hdr.c)
      assert.same({dtype = 'F32', shape = {2, 3}, data_offsets = {19, 43}}, hdr['w.a'])
      assert.equal(8 + n + 43, #bytes)
      -- int64 7 little-endian at the start of the data
      assert.equal(7, bytes:byte(8 + n + 1))
      assert.equal(0, bytes:byte(8 + n + 2))
      -- -8 as two's complement
      assert.equal(0xf8, bytes:byte(8 + n + 9)); assert.equal(0xff, bytes:byte(8 + n + 16))
      local back, meta = st.load(path)
      assert.same(a:totable(), back['w.a']:totable())
      assert.same({7, -8}, back.b:totable())
      assert.equal('int64', back.b:dtype())
      assert.same({255, 0, 1}, back.c:totable())
      assert.equal('hi', meta.note)
   end)

   it('is read by an independent Python reader into the same torch tensors', function()
      local ok = os.execute('/usr/bin/python3 -c "import torch" >/dev/null 2>&1')
      if ok ~= 0 and ok ~= true then pending('no /usr/bin/python3 with torch'); return end
      nr.manual_seed(3)
      local w = nr.randn({4, 3, 3, 3})
      local path = TMP .. '/py.safetensors'
      st.save(path, {['features.0.weight'] = w, ['labels'] = nr.tensor({1, 2, 3}, {dtype = 'int64'})})
      -- safetensors is not installed for Python: parse the format by hand, as its spec says
      local script = TMP .. '/read.py'
      write(script, [==[
import json, struct, sys, torch
DT = {'F32': torch.float32, 'I64': torch.int64, 'U8': torch.uint8}
raw = open(sys.argv[1], 'rb').read()
(n,) = struct.unpack('<Q', raw[:8])
hdr = json.loads(raw[8:8 + n].decode('utf-8'))
data = raw[8 + n:]
for name in sorted(k for k in hdr if k != '__metadata__'):
    e = hdr[name]
    b, s = e['data_offsets']
    t = torch.frombuffer(bytearray(data[b:s]), dtype=DT[e['dtype']]).reshape(e['shape'])
    print(name, list(t.shape), repr(t.double().sum().item()), repr(t.flatten()[0].item()))
]==])
      local p = io.popen('/usr/bin/python3 ' .. script .. ' ' .. path)
      local out = p:read('*a'); p:close()
      local lines = {}
      for l in out:gmatch('[^\n]+') do lines[#lines + 1] = l end
      assert.equal(2, #lines, out)
      local name, shape, sum, first = lines[1]:match('^(%S+) %[(.-)%] (%S+) (%S+)$')
      assert.equal('features.0.weight', name)
      assert.equal('4, 3, 3, 3', shape)
      local want = 0
      for i = 1, w:numel() do want = want + w:get(i) end
      assert(math.abs(tonumber(sum) - want) < 1e-9, 'sum ' .. sum .. ' vs ' .. want)
      assert.equal(w:get(1), tonumber(first))
      assert.equal('labels [3] 6.0 1', lines[2])
   end)

   it('loads empty tensors wherever their offsets sit (ties with the tensor starting there)', function()
      -- an empty tensor [k, k] and the tensor [k, k + n] start at the same offset; their order in
      -- the header table is pairs' order, which differs with the names: 20 name sets
      for i = 1, 20 do
         local path = string.format('%s/empty%d.safetensors', TMP, i)
         local p = 'v' .. i .. '_'
         st.save(path, {[p .. 'a'] = nr.zeros({0}), [p .. 'b'] = nr.ones({4}), [p .. 'c'] = nr.zeros({2, 0}),
                        [p .. 'd'] = nr.full({2}, 3), [p .. 'e'] = nr.zeros({0, 5}, {dtype = 'int64'})})
         local back = st.load(path)
         assert.same({1, 1, 1, 1}, back[p .. 'b']:totable())
         assert.same({3, 3}, back[p .. 'd']:totable())
         assert.same({0, 5}, back[p .. 'e']:shape())
      end
   end)

   it('rejects truncated and corrupt files with a message naming the file', function()
      local path = TMP .. '/trunc.safetensors'
      st.save(path, {x = nr.ones({100})})
      local bytes = ck.read_file(path)
      write(path, bytes:sub(1, #bytes - 10))
      local ok, err = pcall(st.load, path)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('trunc.safetensors', 1, true))
      assert.truthy(tostring(err):find('truncated', 1, true))
      write(path, 'garbage')
      assert.has_error(function() st.load(path) end)
   end)

   it('checks the type of every header field, naming the file and the tensor', function()
      local path = TMP .. '/fields.safetensors'
      local function u64(n)
         local b = {}
         for i = 1, 8 do b[i] = string.char(n % 256); n = math.floor(n / 256) end
         return table.concat(b)
      end
      for _, c in ipairs({
         {'"dtype":5,"shape":[1],"data_offsets":[0,4]', 'dtype must be a string, got 5'},
         {'"dtype":"F32","shape":[null],"data_offsets":[0,4]', 'shape must be an array of non-negative integers, got [null]'},
         {'"dtype":"F32","shape":["x"],"data_offsets":[0,4]', 'shape must be an array of non-negative integers, got ["x"]'},
         {'"dtype":"F32","shape":4,"data_offsets":[0,4]', 'shape must be an array of non-negative integers, got 4'},
         {'"dtype":"F32","shape":[-1,-1],"data_offsets":[0,4]', 'shape must be an array of non-negative integers, got [-1,-1]'},
         {'"dtype":"F32","shape":[1.5],"data_offsets":[0,4]', 'shape must be an array of non-negative integers'},
         -- an object is not an array (it used to load as a 0-d tensor)
         {'"dtype":"F32","shape":{"x":1},"data_offsets":[0,4]', 'shape must be an array of non-negative integers, got {"x":1}'},
         {'"dtype":"F32","data_offsets":[0,4]', 'shape must be an array of non-negative integers, got null'},
         {'"dtype":"F32","shape":[1],"data_offsets":["0","4"]', 'data_offsets must be an array of two non-negative integers, got ["0","4"]'},
         {'"dtype":"F32","shape":[1],"data_offsets":[0,4,8]', 'data_offsets must be an array of two non-negative integers'},
         -- shapes nrlua cannot hold: named here, before a checkpoint holding the file is trusted
         {'"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]', '10 dimensions, more than the 8 nrlua holds'},
         {'"dtype":"F32","shape":[0,4503599627370496],"data_offsets":[0,0]', 'a size of 4503599627370496, more than the 2^40'},
      }) do
         local header = '{"a":{' .. c[1] .. '}}'
         write(path, u64(#header) .. header .. '\0\0\0\0')
         local ok, err = pcall(st.load, path)
         assert.is_false(ok)
         assert.truthy(tostring(err):find(path .. ' is not a valid safetensors file: tensor "a": ' .. c[2], 1, true), tostring(err))
      end
      -- metadata is a map of strings (a number failed as "attempt to index local 'meta'")
      for _, m in ipairs({{'5', 'got 5'}, {'{"k":3}', 'its entry "k" is 3'}}) do
         local h = '{"__metadata__":' .. m[1] .. ',"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
         write(path, u64(#h) .. h .. '\0\0\0\0')
         local ok, err = pcall(st.load, path)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('is not a valid safetensors file: __metadata__ must be an object of strings', 1, true), err)
         assert.truthy(tostring(err):find(m[2], 1, true), err)
      end
      -- a 0-d tensor's shape is the empty array
      local header = '{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}'
      write(path, u64(#header) .. header .. '\0\0\0\0')
      assert.same({}, st.load(path).a:shape())
   end)
end)

describe('nr.checkpoint', function()
   it('encodes JSON deterministically with exact numbers', function()
      local s = ck.json_encode({b = 0.1, a = {1, 2, 3}, c = {x = true}, d = 1 / 3, e = ck.array()})
      assert.equal('{"a":[1,2,3],"b":0.1,"c":{"x":true},"d":0.3333333333333333,"e":[]}', s)
      assert.equal(1 / 3, ck.json_decode(s).d)
   end)

   it('lock: one holder per file; a new lock in this process takes it over; release unlocks', function()
      pcall(ffi.cdef, 'int getpid(void);')
      local me = ffi.C.getpid()
      ck.mkdirs(TMP)
      local path = TMP .. '/run.lock'
      -- another holder's attempt (a second open of the file is a second holder, as another process)
      local function probe()
         local fd, holder = ffi.new('int32_t[1]', 7), ffi.new('int64_t[1]')
         if C.nr_file_lock(path, fd, holder) == 0 then
            C.nr_file_unlock(fd[0])
            return 'free'
         end
         assert.equal(-1, fd[0])
         local msg = ffi.string(C.nr_last_error())
         assert.truthy(msg:find(path .. ' is locked by process ' .. tonumber(holder[0]), 1, true), msg)
         return tonumber(holder[0])
      end
      assert.equal('free', probe())
      local h = ck.lock(path)
      assert.equal(me, probe())                       -- held, and the file names this process
      assert.equal(me .. '\n', ck.read_file(path))
      local h2 = assert(ck.lock(path))                -- this process again: taken over, not refused
      h:release()                                      -- the old handle no longer unlocks it
      assert.equal(me, probe())
      h2:release()
      assert.equal('free', probe())
      h2:release()                                     -- twice is harmless
      assert.equal('free', probe())
      ck.lock(path)                                    -- a handle dropped without release keeps it
      collectgarbage(); collectgarbage()
      assert.equal(me, probe())
      ck.lock(path):release()
      assert.equal('free', probe())
      local ok, e = pcall(ck.lock, TMP .. '/no/such/folder/run.lock')
      assert.is_false(ok)
      assert.truthy(tostring(e):find('nr.checkpoint.lock: .*cannot open ' .. TMP:gsub('%p', '%%%0')
         .. '/no/such/folder/run.lock'), tostring(e))
   end)

   it('round-trips weights and a state holding tensors', function()
      local dir = TMP .. '/rt'
      local w = {['0.weight'] = nr.randn({3, 2}), ['0.bias'] = nr.zeros({3})}
      local m = nr.randn({3, 2})
      local path = ck.save(dir, {step = 10, weights = w, state = {epoch = 2, optimizer = {params = {['0.weight'] = {momentum = m}}}, rng = {'0x1'}}})
      assert.equal(dir .. '/step-00000010', path)
      assert.equal('step-00000010\n', ck.read_file(dir .. '/latest'))
      local r = ck.load(dir)
      assert.equal(path, r.dir)
      assert.same(w['0.weight']:totable(), r.weights['0.weight']:totable())
      assert.same(m:totable(), r.state.optimizer.params['0.weight'].momentum:totable())
      assert.equal(2, r.state.epoch)
      assert.same({'0x1'}, r.state.rng)
   end)

   it('keeps the last good checkpoint loadable through crashes at any point', function()
      local dir = TMP .. '/crash'
      ck.save(dir, {step = 1, weights = {x = nr.full({4}, 1)}, state = {epoch = 1}})
      ck.save(dir, {step = 2, weights = {x = nr.full({4}, 2)}, state = {epoch = 2}})
      -- a kill during the next save: temp files and a newer folder without state.json
      ck.mkdirs(dir .. '/step-00000003')
      write(dir .. '/step-00000003/model.safetensors.tmp.999', 'partial')
      write(dir .. '/step-00000003/model.safetensors', ck.read_file(dir .. '/step-00000002/model.safetensors'):sub(1, 20))
      write(dir .. '/latest.tmp.999', 'step-00000003\n')
      local r = ck.load(dir)
      assert.equal(2, r.state.epoch)
      assert.same({2, 2, 2, 2}, r.weights.x:totable())
      -- latest names a damaged folder (weights truncated after the fact): fall back to step 1
      local good2 = ck.read_file(dir .. '/step-00000002/model.safetensors')
      write(dir .. '/step-00000002/model.safetensors', good2:sub(1, #good2 - 4))
      r = ck.load(dir)
      assert.equal(1, r.state.epoch)
      assert.equal('step-00000002: model.safetensors has ' .. (#good2 - 4) .. ' bytes, state.json says ' .. #good2, r.passed_over)
      -- a newer folder with state.json but a short weights file is skipped too
      write(dir .. '/step-00000002/model.safetensors', good2)
      ck.mkdirs(dir .. '/step-00000004')
      write(dir .. '/step-00000004/state.json', ck.read_file(dir .. '/step-00000002/state.json'))
      write(dir .. '/step-00000004/model.safetensors', good2:sub(1, 30))
      os.remove(dir .. '/latest')
      r = ck.load(dir)
      assert.equal(2, r.state.epoch)
      assert.is_nil(r.passed_over)                       -- no latest: nothing it named was passed over
      -- the next save prunes the debris and keeps `keep` complete checkpoints
      ck.save(dir, {step = 5, weights = {x = nr.full({4}, 5)}, state = {epoch = 5}, keep = 2})
      local names = ck.list(dir)
      assert.same({'latest', 'step-00000002', 'step-00000005'}, names)
   end)

   it('finds a file changed after it was written by its CRC-32 and falls back', function()
      local dir = TMP .. '/bitrot'
      ck.save(dir, {step = 1, weights = {x = nr.full({4}, 1)}, state = {epoch = 1, m = nr.full({2}, 1)}})
      ck.save(dir, {step = 2, weights = {x = nr.full({4}, 2)}, state = {epoch = 2, m = nr.full({2}, 2)}})
      -- one bit of a weight flipped on disk: the size and header still hold, the values do not
      for _, f in ipairs({'model.safetensors', 'state.safetensors'}) do
         local path = dir .. '/step-00000002/' .. f
         local good = ck.read_file(path)
         write(path, good:sub(1, #good - 1) .. string.char(bit.bxor(good:byte(#good), 1)))
         local r = ck.load(dir)
         assert.equal(1, r.state.epoch)
         assert.same({1, 1, 1, 1}, r.weights.x:totable())
         local ok, err = pcall(ck.load, dir .. '/step-00000002')
         assert.is_false(ok)
         assert.truthy(tostring(err):find(f .. ' has CRC%-32 %x+, state.json says %x+: the file changed after it was written'), err)
         write(path, good)
      end
      assert.equal(2, ck.load(dir).state.epoch)
   end)

   it('a kill between the pointers leaves best naming a complete checkpoint (written before latest)', function()
      local dir = TMP .. '/pointers'
      ck.save(dir, {step = 1, weights = {x = nr.full({4}, 1)}, state = {epoch = 1}, best = true})
      local ok = save_killed('/latest$', dir, {step = 2, weights = {x = nr.full({4}, 2)}, state = {epoch = 2}, best = true})
      assert.is_false(ok)
      assert.equal('step-00000001\n', ck.read_file(dir .. '/latest'))     -- the resume starts from step 1 ...
      assert.equal('step-00000002\n', ck.read_file(dir .. '/best'))       -- ... and step 2, the best, is kept
      assert.equal(2, ck.load(dir .. '/step-00000002').state.epoch)
   end)

   it('a step saved again replaces its folder in one step: a kill mid-write keeps the old one whole', function()
      local dir = TMP .. '/resave'
      ck.save(dir, {step = 3, weights = {x = nr.full({4}, 1)}, state = {epoch = 1}, best = true})
      -- the second save of step 3 is killed after its weights are written (before state.json)
      local ok = save_killed('state%.json$', dir, {step = 3, weights = {x = nr.full({4}, 2)}, state = {epoch = 2}, best = true})
      assert.is_false(ok)
      local r = ck.load(dir) -- latest and best still name a complete step 3: the first save's
      assert.equal(1, r.state.epoch)
      assert.same({1, 1, 1, 1}, r.weights.x:totable())
      assert.is_nil(r.passed_over)
      assert.same({'best', 'latest', 'step-00000003'}, ck.list(dir)) -- the attempt's folder is gone
      -- a kill after the new folder's files are complete, before the exchange: still the old one
      ck.mkdirs(dir .. '/step-00000003.new')
      write(dir .. '/step-00000003.new/model.safetensors', 'partial')
      assert.equal(1, ck.load(dir).state.epoch)
      -- the save that completes replaces it (and removes the debris)
      local path = ck.save(dir, {step = 3, weights = {x = nr.full({4}, 3)}, state = {epoch = 3}, best = true})
      assert.equal(dir .. '/step-00000003', path)
      assert.equal(3, ck.load(dir).state.epoch)
      assert.same({3, 3, 3, 3}, ck.load(dir).weights.x:totable())
      assert.same({'best', 'latest', 'step-00000003'}, ck.list(dir))
      -- the exchange itself: folder contents swap, a missing target is a plain rename
      ck.mkdirs(dir .. '/a'); write(dir .. '/a/f', 'A')
      ck.mkdirs(dir .. '/b'); write(dir .. '/b/f', 'B')
      assert.equal(0, C.nr_dir_replace(dir .. '/a', dir .. '/b'))
      assert.equal('A', ck.read_file(dir .. '/b/f'))
      assert.equal('B', ck.read_file(dir .. '/a/f'))
      assert.equal(0, C.nr_dir_replace(dir .. '/a', dir .. '/c'))
      assert.equal('B', ck.read_file(dir .. '/c/f'))
      assert.is_false(ck.is_dir(dir .. '/a'))
      assert.is_true(C.nr_dir_replace(dir .. '/missing', dir .. '/c') ~= 0)
      assert.truthy(ffi.string(C.nr_last_error()):find('missing', 1, true))
   end)

   it('reports a clear error when nothing is loadable', function()
      local ok, err = pcall(ck.load, TMP .. '/nothing-here')
      assert.is_false(ok)
      assert.truthy(tostring(err):find('no checkpoint', 1, true))
      -- a state.json that is JSON but not a checkpoint record is not loadable (it was taken as a
      -- checkpoint at epoch 0)
      local dir = TMP .. '/garbage'
      local w = {w = nr.ones({2})}
      local step_dir = ck.save(dir, {step = 1, weights = w, state = {epoch = 1, step = 1}})
      for _, text in ipairs({'[1, 2, 3]', '{"step": "x"}', '{"checkpoint": {"step": 1}, "files": {"model.safetensors": 5}}'}) do
         ck.write_atomic(step_dir .. '/state.json', text)
         local ok2, e2 = pcall(ck.load, dir)
         assert.is_false(ok2)
         assert.truthy(tostring(e2):find('no complete checkpoint', 1, true), tostring(e2))
      end
   end)

   it('loads weights into a model strictly, naming missing and mismatched tensors', function()
      local Module = require 'nr.nn.module'
      local m = Module()
      m.weight = nr.zeros({2, 2}); m.gradWeight = nr.zeros({2, 2})
      ck.load_into(m, {weight = nr.ones({2, 2})})
      assert.same({{1, 1}, {1, 1}}, m.weight:totable())
      local ok, err = pcall(ck.load_into, m, {weight = nr.ones({3, 2})})
      assert.is_false(ok); assert.truthy(tostring(err):find('[3 x 2]', 1, true))
      ok, err = pcall(ck.load_into, m, {wieght = nr.ones({2, 2})})
      assert.is_false(ok); assert.truthy(tostring(err):find('missing weight', 1, true)); assert.truthy(tostring(err):find('wieght', 1, true))
      -- a diverged checkpoint: named, and nothing of it is loaded
      local bad = nr.full({2, 2}, 3)
      bad:set(4, 0 / 0)
      ok, err = pcall(ck.load_into, m, {weight = bad})
      assert.is_false(ok); assert.truthy(tostring(err):find('weight holds non-finite values', 1, true))
      assert.same({{1, 1}, {1, 1}}, m.weight:totable())
   end)

   it('load_weights takes a run folder, its checkpoint folder, a step folder or the best / latest pointer', function()
      local nn = nr.nn
      local function build() return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GlobalAvgPool2d(), nn.Linear(2, 3)) end
      local run = TMP .. '/lw_run'
      local ckdir = run .. '/checkpoint'
      local w = {}
      for step = 1, 2 do
         nr.manual_seed(step)
         w[step] = build()
         ck.save(ckdir, {step = step, weights = ck.model_tensors(w[step]), best = step == 1})
      end
      local function loaded_from(path)
         local m = ck.load_weights(build(), path)
         for step = 1, 2 do
            if m:get(4).weight:sub(w[step]:get(4).weight):abs():max() == 0 then return step end
         end
      end
      -- a run or checkpoint folder: the best checkpoint (step 1), not the latest
      assert.are.same({1, 1, 1, 2, 2, 1}, {loaded_from(run), loaded_from(run .. '/'), loaded_from(ckdir),
         loaded_from(ckdir .. '/latest'), loaded_from(ckdir .. '/step-00000002'), loaded_from(ckdir .. '/best')})
      local ok, err = pcall(ck.load_weights, build(), TMP)
      assert.is_false(ok)
      assert.truthy(err:find('is a folder without model.safetensors, and no run checkpoint in it', 1, true), err)
   end)

   it('load_weights checks a checkpoint\'s files as a resume does (CRC-32): a changed file, a gone best, a bad pointer', function()
      local nn = nr.nn
      local function build() return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GlobalAvgPool2d(), nn.Linear(2, 3)) end
      local run = TMP .. '/lw_crc'
      local ckdir = run .. '/checkpoint'
      for step = 1, 2 do
         nr.manual_seed(step)
         ck.save(ckdir, {step = step, weights = ck.model_tensors(build()), best = step == 1, state = {momentum = nr.ones({5})}})
      end
      -- four bytes of step 1's weights changed in place (same size, headers intact)
      local file = ckdir .. '/step-00000001/model.safetensors'
      local f = assert(io.open(file, 'r+b'))
      local size = f:seek('end')
      f:seek('set', size - 6)
      f:write('XXXX')
      f:close()
      local function err_of(path)
         local ok, err = pcall(ck.load_weights, build(), path)
         assert.is_false(ok, path .. ' loaded')
         return tostring(err)
      end
      for _, path in ipairs({run, ckdir, ckdir .. '/best', ckdir .. '/step-00000001', file}) do
         local err = err_of(path)
         assert.truthy(err:find('step-00000001 is damaged: model.safetensors has CRC-32', 1, true), err)
         assert.truthy(err:find('the newest complete checkpoint is ' .. ckdir .. '/step-00000002', 1, true), err)
         assert.is_nil(err:find('lua/nr/', 1, true), err)   -- no library position
      end
      assert.truthy(err_of(run):find('best names ' .. ckdir .. '/step-00000001', 1, true))
      ck.load_weights(build(), ckdir .. '/step-00000002')   -- the sound one loads
      -- only the weights are checked: the optimizer state may be stripped from a shared checkpoint
      assert.is_true(os.remove(ckdir .. '/step-00000002/state.safetensors'))
      ck.load_weights(build(), ckdir .. '/step-00000002')
      ck.load_weights(build(), ckdir .. '/step-00000002/model.safetensors')
      -- best naming a folder that is gone: an error, not the newest one's weights instead
      os.execute('rm -rf "' .. ckdir .. '/step-00000001"')
      assert.truthy(err_of(run):find('best names ' .. ckdir .. '/step-00000001 is damaged: no state.json', 1, true))
      -- a pointer file that names no step folder
      local p = assert(io.open(ckdir .. '/latest', 'w'))
      p:write('../../etc\n')
      p:close()
      assert.truthy(err_of(ckdir .. '/latest'):find('latest is not a pointer to a step folder', 1, true))
   end)

   it('save_weights / load_weights: a rejuvenated model (CA, widths changed) loads into a freshly built one', function()
      local nn = nr.nn
      local function build()
         return nn.Sequential(nn.Conv2d(3, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, {padding = 1, bias = false}), nn.BatchNorm2d(12), nn.ReLU(),
            nn.GlobalAvgPool2d(), nn.Linear(12, 5))
      end
      nr.manual_seed(6)
      local m = build()
      for _, bn in ipairs(m:findModules('BatchNorm2d')) do
         for i = 1, bn.num_features, 3 do bn.weight:set(i, 0) end
      end
      nr.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = 'CA', policy = {reallocate = function(layers)
         local w = {}
         for _, l in ipairs(layers) do w[l.id] = l.live + 5 end -- widths no fresh model has
         return w
      end}})
      m:evaluate()
      local x = nr.randn({2, 3, 8, 8})
      local y = m:forward(x):clone()
      local path = TMP .. '/rejuvenated.safetensors'
      ck.save_weights(m, path, {metadata = {note = 'by hand'}})
      local fresh = build()
      assert.are.equal(fresh, ck.load_weights(fresh, path))
      fresh:evaluate()
      assert.are.equal(0, fresh:forward(x):clone():sub_(y):abs_():max())
      local cm, cf = nr.count(m, {3, 8, 8}), nr.count(fresh, {3, 8, 8})
      assert.same({cm.params, cm.flops}, {cf.params, cf.flops})
      assert.are.equal('NRConv2d', fresh:get(4):typename())
      local _, meta = require('nr.safetensors').load(path)
      assert.are.equal('by hand', meta.note)
      -- the rejuvenations so far come along (the merged layout does not count them): a second
      -- rejuvenation of either is the model's second
      assert.are.equal(1, fresh.nr_generation)
      local twice = {nr.rejuvenate(m, {input_shape = {3, 8, 8}, scheme = 'CA'}),
                     nr.rejuvenate(fresh, {input_shape = {3, 8, 8}, scheme = 'CA'})}
      assert.are.same({2, 2}, {twice[1].generation, twice[2].generation})
      ck.save_weights(m, path)
      local third = ck.load_weights(build(), path)
      assert.are.equal(3, nr.rejuvenate(third, {input_shape = {3, 8, 8}, scheme = 'CA'}).generation)
      -- another kind of model: the file and the mismatch are named, and the model is left as it was
      local function refused(target, want)
         local before = target:nParameters()
         local ok, err = pcall(ck.load_weights, target, path)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('nr.checkpoint.load_weights: ' .. path .. ' does not fit the model: ' .. want,
            1, true), tostring(err))
         assert.are.equal(before, target:nParameters())
      end
      refused(nn.Sequential(nn.Linear(4, 2)), 'checkpoint architecture has a Conv2d at 0, where the model has a Linear')
      refused(nn.Sequential(nn.Conv2d(3, 8, 3)), 'checkpoint architecture names 1, which the model does not have')
      refused(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12),
         nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(12, 5)), 'checkpoint architecture has a Conv2d at 0, where the model has a BatchNorm2d')
      -- what a rejuvenation never changes must match: the classes, the input channels
      local function variant(cin, classes)
         return nn.Sequential(nn.Conv2d(cin, 8, 3, {padding = 1, bias = false}), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, {padding = 1, bias = false}), nn.BatchNorm2d(12), nn.ReLU(),
            nn.GlobalAvgPool2d(), nn.Linear(12, classes))
      end
      refused(variant(3, 7), '7 gives 5 outputs in the checkpoint but 7 in the model')
      refused(variant(1, 5), '0 reads 3 input channels in the checkpoint but 1 in the model')
      -- a model no rejuvenation changed records no architecture: it loads strictly (load_into)
      local plain = build()
      ck.save_weights(plain, path)
      local _, pmeta = require('nr.safetensors').load(path)
      assert.is_nil(pmeta.nr_arch)
      local ok, err = pcall(ck.load_weights, variant(3, 7), path)
      assert.is_false(ok)
      assert.truthy(tostring(err):find('7.bias has shape [5] in the checkpoint but [7] in the model', 1, true),
         tostring(err))
      -- a submodule saved on its own loads into a fresh copy of that submodule (paths below it)
      local outer = nn.Sequential(m, nn.Identity())
      ck.save_weights(outer:get(1), path)
      local again = ck.load_weights(build(), path)
      again:evaluate()
      assert.are.equal(0, again:forward(x):clone():sub_(y):abs_():max())
   end)

   it('load_into refuses a missing weights table, non-tensor weights and a dtype other than the parameter\'s', function()
      local m = nr.nn.Linear(3, 2)
      local before = m.weight:totable()
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      local e = msg(function() ck.load_into(m, nil) end)
      assert.truthy(e:find('checkpoint_spec.lua:%d+: nr.checkpoint.load_into: weights must be a table of name %-> tensor, got nil'), e)
      e = msg(function() ck.load_into(m, {weight = m.weight:clone(), bias = 5}) end)
      assert.truthy(e:find('nr.checkpoint: checkpoint: bias must be a tensor, got number', 1, true), e)
      -- a non-module, where the weights go or come from (it failed as "attempt to call method")
      e = msg(function() ck.load_into({}, {}) end)
      assert.truthy(e:find('nr.checkpoint.load_into: model must be a module, got table', 1, true), e)
      e = msg(function() ck.save_weights('m.safetensors', (os.getenv('NR_TEST_TMP') or '/tmp') .. '/w.safetensors') end)
      assert.truthy(e:find('nr.checkpoint.save_weights: model must be a module, got "m.safetensors"', 1, true), e)
      -- int64 or uint8 values would otherwise be cast into the float32 weights without a word
      for _, dt in ipairs({'int64', 'uint8'}) do
         e = msg(function() ck.load_into(m, {weight = m.weight:to('cpu', dt), bias = m.bias:clone()}) end)
         assert.truthy(e:find('weight is ' .. dt .. ' in the checkpoint but float32 in the model', 1, true), e)
      end
      assert.same(before, m.weight:totable())
      -- floating weights convert, as PyTorch's load_state_dict: bf16 into float32
      local w16 = nr.tensor({{0.5, -1, 2}, {4, 0.25, -8}}, {dtype = 'bfloat16'})
      ck.load_into(m, {weight = w16, bias = m.bias:clone()})
      assert.same({{0.5, -1, 2}, {4, 0.25, -8}}, m.weight:totable())
   end)

   it('save refuses a step that is not a non-negative integer and a cyclic state, writing nothing', function()
      local dir = TMP .. '/badsave'
      local function msg(f) local ok, e = pcall(f); assert.is_false(ok); return tostring(e) end
      for _, step in ipairs({2.5, 0 / 0, -1, math.huge, '3'}) do
         local e = msg(function() ck.save(dir, {step = step}) end)
         assert.truthy(e:find('nr.checkpoint.save: opts.step must be a non-negative integer, got ' .. tostring(step), 1, true), e)
      end
      local a = {}
      a.b = {a = a}
      local e = msg(function() ck.save(dir, {step = 1, state = {x = a}}) end)
      assert.truthy(e:find('nr.checkpoint.save: opts.state is cyclic: x/b/a refers back to a table that contains it', 1, true), e)
      assert.is_false(ck.is_dir(dir))
      -- a table reached twice without a cycle is saved (as two copies)
      local shared = {1, 2}
      ck.save(dir, {step = 1, state = {x = shared, y = {shared}}})
      assert.same({1, 2}, ck.load(dir).state.y[1])
   end)

   it('cleans up its scratch folder', function()
      ck.remove_tree(TMP)
      assert.is_false(ck.is_dir(TMP))
   end)
   it('quotes paths in the shell fallbacks used without lua-filesystem', function()
      local base = TMP .. '_shell'
      local flag = base .. '_PWNED'
      os.remove(flag)
      local dir = base .. "/a b/it's \"q\" $(touch " .. flag .. ") `touch " .. flag .. "`"
      assert.equal("'it'\\''s $(x)'", ck.shell.quote("it's $(x)"))
      assert.is_true(ck.shell.mkdir(dir))
      assert.is_true(ck.shell.is_dir(dir))
      assert.is_false(ck.shell.is_link(dir))
      local f = assert(io.open(dir .. "/x'$(id) y", 'w'))
      f:close()
      assert.same({"x'$(id) y"}, ck.shell.list(dir))
      assert.is_nil(io.open(flag), 'a shell command in a path was run')
      os.execute("rm -rf -- " .. ck.shell.quote(base))
   end)
   it('nr.train: a failing metrics.jsonl write (a full disk) is an error naming the file', function()
      local Trainer = require('nr.train').Trainer
      local function trainer(metrics)
         return setmetatable({metrics = metrics, out = 'runs/full', epoch = 1, step = 2, t_start = 0},
            {__index = Trainer})
      end
      -- /dev/full: writes fail with ENOSPC (buffered: at the flush)
      local f = io.open('/dev/full', 'w')
      if f then
         local ok, err = pcall(Trainer.log, trainer(f), {kind = 'step', loss = 1})
         f:close()
         assert.is_false(ok)
         assert.matches('cannot write runs/full/metrics.jsonl: .*No space left', err)
      end
      -- a handle whose write fails
      local bad = {write = function() return nil, 'Disk quota exceeded' end, flush = function() return true end}
      local ok, err = pcall(Trainer.log, trainer(bad), {kind = 'step'})
      assert.is_false(ok)
      assert.equal('nr.train: cannot write runs/full/metrics.jsonl: Disk quota exceeded', err)
   end)
end)

describe('torchvision names (names = \'torchvision\')', function()
   local SCRIPT = 'tests/fixtures/torchvision_resnet.py'
   local function python(args)
      local ok = os.execute('/usr/bin/python3 -c "import torch" >/dev/null 2>&1')
      if ok ~= 0 and ok ~= true then return nil end
      local status = os.execute('/usr/bin/python3 ' .. SCRIPT .. ' ' .. args)
      assert.truthy(status == 0 or status == true, SCRIPT .. ' ' .. args .. ' failed')
      return true
   end
   local function max_rel(a, b) return a:clone():sub_(b):abs_():max() / b:abs():max() end
   setup(function() ck.mkdirs(TMP) end) -- the describe above removed it
   teardown(function() ck.remove_tree(TMP) end)

   for _, depth in ipairs({18, 50}) do
      it('ResNet-' .. depth .. ': a torchvision state_dict loads and computes what torchvision computes, and back', function()
         local w, io = TMP .. '/tv' .. depth .. '.safetensors', TMP .. '/tv_io' .. depth .. '.safetensors'
         if not python(('export %d %s %s'):format(depth, w, io)) then pending('no /usr/bin/python3 with torch'); return end
         local m = nr.models.resnet{depth = depth}
         ck.load_weights(m, w, {names = 'torchvision'})
         m:evaluate()
         local ref = st.load(io)
         assert.is_true(max_rel(m:forward(ref.x), ref.y) < 1e-5)
         -- nrlua's own weights (other BN statistics too), written with torchvision's names: a
         -- torchvision model's load_state_dict(strict = True) takes them and computes the same
         nr.manual_seed(depth)
         local mine = nr.models.resnet{depth = depth}
         for _, bn in ipairs(mine:findModules('BatchNorm2d')) do
            bn.running_mean:copy(nr.rand({bn.num_features}):mul_(0.2):add_(-0.1))
            bn.running_var:copy(nr.rand({bn.num_features}):add_(0.5))
            bn.bias:copy(nr.rand({bn.num_features}):mul_(0.2))
         end
         ck.save_weights(mine, w, {names = 'torchvision'})
         local names = st.read_header(w)
         assert.truthy(names['layer1.0.conv1.weight'] and names['fc.weight'] and not names['stem.0.weight'])
         python(('check %d %s %s'):format(depth, w, io))
         mine:evaluate()
         assert.is_true(max_rel(mine:forward(ref.x), st.load(io).y) < 1e-5)
      end)
   end

   it('says which models have no torchvision twin, and hints at the option for a torchvision file', function()
      local function err(f, ...) local ok, e = pcall(f, ...); assert.is_false(ok); return tostring(e) end
      local e = err(nr.models.torchvision_names, nr.models.vgg{depth = 16})
      assert.truthy(e:find("no torchvision names for vgg16: the ImageNet VGG-16 here is the NR paper's", 1, true), e)
      e = err(nr.models.torchvision_names, nr.models.resnet{depth = 18, dataset = 'cifar10'})
      assert.truthy(e:find('no torchvision names for resnet18: resnet18 is the cifar10 variant', 1, true), e)
      e = err(ck.save_weights, nr.nn.Linear(2, 2), TMP .. '/x.safetensors', {names = 'torchvision'})
      assert.truthy(e:find('nr.checkpoint.save_weights: not a model nr.models built', 1, true), e)
      -- a torchvision file loaded without the option: the names are listed (a dozen of each), and the option named
      local r18 = nr.models.resnet{depth = 18}
      local path = TMP .. '/tv_plain.safetensors'
      ck.save_weights(r18, path, {names = 'torchvision'})
      e = err(ck.load_weights, nr.models.resnet{depth = 18}, path)
      assert.truthy(e:find("and 88 more; unexpected bn1.bias, bn1.running_mean", 1, true), e)
      assert.truthy(e:find("(the file names a torchvision ResNet's tensors: load it with {names = 'torchvision'})", 1, true), e)
      -- into a deeper ResNet: what the file lacks is named as torchvision names it
      e = err(ck.load_weights, nr.models.resnet{depth = 34}, path, {names = 'torchvision'})
      assert.truthy(e:find('does not match the model: missing layer1.2.bn1.bias, ', 1, true), e)
   end)

   it('names may be a table or a function; bad ones are refused before anything is written or loaded', function()
      local nn = nr.nn
      local function build() return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GlobalAvgPool2d(), nn.Linear(2, 3)) end
      nr.manual_seed(3)
      local m = build()
      local path = TMP .. '/renamed.safetensors'
      local function rename(name) return (name:gsub('^0%.', 'features.conv.'):gsub('^3%.', 'head.')) end
      ck.save_weights(m, path, {names = rename})
      local hdr = st.read_header(path)
      assert.truthy(hdr['features.conv.weight'] and hdr['head.bias'] and hdr['1.running_var'])
      local back = ck.load_weights(build(), path, {names = rename})
      assert.are.same(m:get(4).weight:totable(), back:get(4).weight:totable())
      assert.are.same(m:get(1).weight:totable(), back:get(1).weight:totable())
      -- a table: names not in it keep their own; a name the file lacks is said in the file's terms
      local e = select(2, pcall(ck.load_weights, build(), path, {names = {['3.weight'] = 'head.weight'}}))
      assert.truthy(tostring(e):find('missing 0.bias, 0.weight, 3.bias; unexpected features.conv.bias, features.conv.weight, head.bias', 1, true), tostring(e))
      local function err(...) local ok, x = pcall(...); assert.is_false(ok); return tostring(x) end
      e = err(ck.save_weights, m, path, {names = function() return 'same' end})
      assert.truthy(e:find("nr.checkpoint.save_weights: names gives same for both 0.bias and 0.weight", 1, true), e)
      e = err(ck.load_weights, m, path, {names = {['0.weight'] = 5}})
      assert.truthy(e:find('nr.checkpoint.load_weights: names gives 5 for 0.weight; a file name must be a non-empty string', 1, true), e)
      e = err(ck.load_weights, m, path, {names = 'pytorch'})
      assert.truthy(e:find("names must be 'torchvision', a table {model name -> file name} or a function, got \"pytorch\"", 1, true), e)
      e = err(ck.save_weights, m, path, {name = 'torchvision'})
      assert.truthy(e:find('nr.checkpoint.save_weights: unknown option "name" (allowed: metadata, names)', 1, true), e)
      -- the file written before the refused calls is intact
      assert.are.same(m:get(4).weight:totable(), ck.load_weights(build(), path, {names = rename}):get(4).weight:totable())
   end)
end)

-- tests/dist/collectives.lua — (a) collectives are correct on every rank: allreduce (sum, mean,
-- max, min; ordered and MPI algorithms; f32 and int64; contiguous and strided; sizes smaller than
-- the number of ranks and not divisible by it), the nonblocking start/wait path, broadcast of
-- tensors and Lua values, decide, allgather/allreduce of numbers, barrier, and the ordered
-- algorithm's bit-identical result on every rank.
-- Run: mpirun -np 2 nrlua tests/dist/collectives.lua
local nr = require 'nr'
local dist = require 'nr.dist'
local H = require 'tests.dist.common'

-- before init, under a launcher, a collective is refused (each rank was its own rank 0 of 1)
local okp, errp = pcall(dist.allreduce, nr.ones({2}), {op = 'sum'})
local rank, size = dist.init{timeout = 60}
if okp or not tostring(errp):find('call nr.dist.init() first', 1, true) then H.fail('allreduce before init: %s', tostring(errp)) end
if not dist.active() then H.fail('expected an MPI launch with more than one rank (size %d)', size) end

for _, algo in ipairs({'ordered', 'mpi'}) do H.check_allreduce(algo) end
H.pass('allreduce')

-- strided (non-contiguous) tensor: a transposed view is reduced through a staging copy
local m = nr.tensor({{1, 2, 3}, {4, 5, 6}}):mul(rank + 1)
local v = m:t()
dist.allreduce(v, {op = 'sum'})
local want = size * (size + 1) / 2
local got = m:totable()
for i = 1, 2 do for j = 1, 3 do
   if got[i][j] ~= ((i - 1) * 3 + j) * want then H.fail('strided allreduce: [%d][%d] = %g', i, j, got[i][j]) end
end end
H.pass('allreduce of a strided view')

-- ordered: the same bits on every rank, also for values whose sum is order-sensitive
nr.manual_seed(100 + rank)
local r = nr.randn({4097}):mul(1e3)
dist.allreduce(r, {op = 'mean', algo = 'ordered'})
local fp = dist.fingerprint(nr.nn.Sequential{}, nil) -- empty model: fingerprint of nothing
local hashes = dist.allgather_numbers({tonumber(r:sum()), r:get(1), r:get(4097)})
for k = 2, #hashes do
   for j = 1, 3 do
      if hashes[k][j] ~= hashes[1][j] then H.fail('ordered allreduce gave rank %d different bits (%.17g vs %.17g)', k - 1, hashes[k][j], hashes[1][j]) end
   end
end
assert(fp)
H.pass('ordered allreduce is bit-identical across ranks')

-- broadcast of tensors (any dtype) and of Lua values
local b = nr.full({5, 3}, rank + 10)
dist.broadcast(b, size - 1)
for _, x in ipairs(b:reshape(15):totable()) do
   if x ~= size - 1 + 10 then H.fail('broadcast from rank %d: got %g', size - 1, x) end
end
local bi = nr.tensor({rank, rank * 2, -rank}, {dtype = 'int64'})
dist.broadcast(bi, 0)
if bi:get(1) ~= 0 or bi:get(2) ~= 0 then H.fail('int64 broadcast: %s', tostring(bi)) end
local obj = dist.broadcast_object(rank == 0 and {a = 1.5, list = {1, 2, 3}, s = 'x\n"y"\0z', nan = 0 / 0, inf = math.huge,
   nested = {keep = {0, 5, 9}, lambda = 1e-4}, flag = true} or {junk = true}, 0)
if obj.a ~= 1.5 or #obj.list ~= 3 or obj.s ~= 'x\n"y"\0z' or obj.nan == obj.nan or obj.inf ~= math.huge
   or obj.nested.keep[3] ~= 9 or obj.nested.lambda ~= 1e-4 or obj.flag ~= true or obj.junk then
   H.fail('broadcast_object gave %s', dist._serialize(obj, {}, 'obj'))
end
H.pass('broadcast')

-- decide: rank 0's result everywhere; rank 0's failure becomes every rank's error
local a, bb = dist.decide(function() return {keep = {rank, 7}}, 'rank' .. rank end)
if a.keep[1] ~= 0 or bb ~= 'rank0' then H.fail('decide returned %s, %s', dist._serialize(a, {}, 'a'), tostring(bb)) end
local okd, err = pcall(dist.decide, function() if rank == 0 then error('no plan') end return 1 end)
if okd or not tostring(err):match('failed on rank 0: .*no plan') then H.fail('decide did not propagate the error: %s', tostring(err)) end
H.pass('decide')

-- numbers
local rows = dist.allgather_numbers({rank, rank * 10})
for k = 1, size do if rows[k][1] ~= k - 1 or rows[k][2] ~= (k - 1) * 10 then H.fail('allgather_numbers row %d', k) end end
local s = dist.allreduce_numbers({rank + 1, 2}, 'sum')
if s[1] ~= size * (size + 1) / 2 or s[2] ~= 2 * size then H.fail('allreduce_numbers sum: %g %g', s[1], s[2]) end
dist.barrier()
H.pass('numbers and barrier')

-- errors are clear and raised (not hangs): wrong arguments
local okw, errw = pcall(dist.allreduce, nr.zeros({3}, {dtype = 'uint8'}))
if okw or not tostring(errw):match('float32 or int64') then H.fail('uint8 allreduce: %s', tostring(errw)) end
H.pass('argument errors')

-- ranks that disagree get the same error on every rank (one rank truncated, another got garbage)
local oks, errs = pcall(dist.allreduce, nr.ones({rank == 0 and 4 or 6}), {op = 'sum'})
if oks or not tostring(errs):find('the ranks\' tensors differ: rank 0 4 elements (float32), rank 1 6 elements', 1, true) then
   H.fail('allreduce of different sizes: %s', tostring(errs))
end
local okl, errl = pcall(dist.allreduce_numbers, rank == 0 and {1, 2} or {1, 2, 3}, 'sum')
if okl or not tostring(errl):find('lists differ in length: rank 0 2, rank 1 3', 1, true) then
   H.fail('allreduce_numbers of different lengths: %s', tostring(errl))
end
local oko, erro = pcall(dist.broadcast_object, rank == 0 and {f = print} or {}, 0)
if oko or not tostring(erro):find('object.f is a function', 1, true) then
   H.fail('broadcast_object of a function: %s', tostring(erro))
end
local x = nr.tensor({rank + 1}) -- and the collectives still work after those errors
dist.allreduce(x, {op = 'sum'})
if x:get(1) ~= size * (size + 1) / 2 then H.fail('allreduce after the refused ones: %g', x:get(1)) end
H.pass('disagreeing ranks refused together')

-- a recipe that names one GPU ('cuda:N') is refused under several ranks (every rank would take
-- that GPU); checked before any GPU is touched, so it runs on a machine without one
local fake = {device = 'cuda:1', recipe = {}, add_hook = function() end}
local okg, errg = pcall(dist.attach, fake, {})
if okg or not tostring(errg):find("device = \"cuda:1\" names one GPU for all " .. size .. " ranks", 1, true) then
   H.fail("attach with device 'cuda:1': %s", tostring(errg))
end
H.pass('one named GPU refused')

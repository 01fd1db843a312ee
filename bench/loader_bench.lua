-- bench/loader_bench.lua — images/s that nr.data.loader delivers on its own (no model), and
-- tensor allocations per batch in steady state (expected 0: buffers are recycled).
--
--   build/nrlua bench/loader_bench.lua [--threads 1,2] [--seconds 6] [--images 200] [--only fmnist|jpeg]
--                                      [--output float32,uint8]
--
-- Cases: Fashion-MNIST train (/usr/share/datasets/fashion-mnist) raw 28x28, upsampled to
-- 3x128x128 (the NR recipe's input), CIFAR-style pad+crop+flip; and a generated folder of
-- 500x375 JPEGs (ImageNet-like size, quality 90) with random-resized-crop 224 + flip + normalize
-- (training), resize 256 + center crop 224 (validation) and random-resized-crop 128 with and
-- without fast_decode (the MobileNet-at-128 recipes), generated once into
-- ${NR_TEST_TMP:-/tmp}/nr-loader-bench-jpeg and reused. Each case runs up to --seconds of
-- wall time after one warm-up batch; the rates are images delivered per wall second and per
-- CPU second of the whole process (the per-core cost, which a loaded machine does not distort).
-- --output: the loader's output dtypes to run each case with (uint8: bytes before /255 and
-- normalize, which nr.train on a GPU finishes on the device).
-- What it is not: a correctness test (tests/lua/data_spec.lua is).
local nr = require 'nr'

local args = {...}
local opts = {threads = '1,2', seconds = 6, images = 200, only = nil, output = 'float32'}
for i = 1, #args, 2 do
   local k = args[i]:match('^%-%-(.+)$')
   assert(k and opts[k] ~= nil or k == 'only', 'unknown argument ' .. tostring(args[i]))
   opts[k] = args[i + 1]
end
local thread_list = {}
for t in tostring(opts.threads):gmatch('%d+') do thread_list[#thread_list + 1] = tonumber(t) end
local seconds = tonumber(opts.seconds)
local outputs = {}
for o in tostring(opts.output):gmatch('[%w]+') do outputs[#outputs + 1] = o end

local now = require('nr.profile').now -- CLOCK_MONOTONIC (loading nr.profile enables nothing)

local function run_one(name, ds, lopts)
   local l = nr.data.loader(ds, lopts)
   local images, batches, t0, c0, allocs0 = 0, 0, nil, nil, nil
   local e = 1
   while true do
      local stop = false
      for x in l:epoch(e) do
         if not t0 then -- the first batch warms up (threads start, page faults)
            t0, c0 = now(), os.clock()
            allocs0 = nr.memory().cpu.allocations
         else
            images = images + x:size(1)
            batches = batches + 1
            if now() - t0 > seconds then stop = true break end
         end
      end
      if stop then break end
      e = e + 1
   end
   local dt, cpu = now() - t0, os.clock() - c0
   local allocs = nr.memory().cpu.allocations - allocs0
   print(string.format('%-46s %-7s threads %d  batch %3d  %9.0f images/s  %9.0f images/CPU-s  (%d in %.1f s, %.2f allocs/batch)',
      name, lopts.output or 'float32', lopts.threads, lopts.batch, images / dt, images / cpu, images, dt,
      allocs / math.max(batches, 1)))
   l:close()
   return images / dt
end

-- the case once per --output dtype
local function run(name, ds, lopts)
   for _, o in ipairs(outputs) do
      lopts.output = o ~= 'float32' and o or nil
      run_one(name, ds, lopts)
   end
end

print(string.format('nrlua %s loader benchmark, %s', nr.version, io.popen('nproc'):read('*l') .. ' cores'))

if opts.only == nil or opts.only == 'fmnist' then
   local ok, ds = pcall(nr.data.dataset, {name = 'fashion-mnist', split = 'train'})
   if not ok then
      print('skipping Fashion-MNIST: ' .. tostring(ds))
   else
      for _, t in ipairs(thread_list) do
         run('fashion-mnist raw 1x28x28', ds, {batch = 128, shuffle = true, threads = t})
         run('fashion-mnist pad4+crop28+flip+norm', ds, {batch = 128, shuffle = true, threads = t,
            augment = {pad = 4, crop = 28, flip = true, normalize = true}})
         run('fashion-mnist resize128 3ch flip norm', ds, {batch = 128, shuffle = true, threads = t,
            augment = {resize = 128, channels = 3, flip = true, normalize = true}})
      end
   end
end

if opts.only == nil or opts.only == 'jpeg' then
   local root = (os.getenv('NR_TEST_TMP') or '/tmp') .. '/nr-loader-bench-jpeg'
   local n = tonumber(opts.images)
   local per_class = math.ceil(n / 10)
   local marker = root .. '/train/c9/' .. string.format('%04d.jpg', per_class - 1)
   local f = io.open(marker, 'rb')
   if f then f:close() else
      -- four distinct 500x375 pictures: gradients plus noise (JPEG size ~ natural photos)
      local pics = {}
      local seed = 12345
      for k = 1, 4 do
         local t = nr.empty({3, 375, 500}, {dtype = 'uint8'})
         local p = t:data()
         for c = 0, 2 do for y = 0, 374 do for x = 0, 499 do
            seed = (seed * 1103515245 + 12345) % 2147483648
            local v = (x * (k + c) + y * (3 - c)) / 4 + 40 * math.sin((x + y * k) / 23) + (seed % 48)
            p[(c * 375 + y) * 500 + x] = math.max(0, math.min(255, math.floor(v % 256)))
         end end end
         pics[k] = t
      end
      for cls = 0, 9 do
         os.execute('mkdir -p ' .. root .. '/train/c' .. cls)
         for i = 0, per_class - 1 do
            nr.data.write_jpeg(pics[(cls + i) % 4 + 1], string.format('%s/train/c%d/%04d.jpg', root, cls, i), 90)
         end
      end
   end
   local ds = nr.data.dataset{name = 'imagefolder', root = root}
   for _, t in ipairs(thread_list) do
      run('jpeg 500x375 random_resized_crop224+flip+norm', ds, {batch = 32, shuffle = true, threads = t,
         augment = {random_resized_crop = 224, flip = true, normalize = true}})
      run('jpeg 500x375 resize256+center_crop224+norm', ds, {batch = 32, threads = t,
         augment = {resize = 256, center_crop = 224, normalize = true}})
      run('jpeg 500x375 rrc128+flip+norm', ds, {batch = 32, shuffle = true, threads = t,
         augment = {random_resized_crop = 128, flip = true, normalize = true}})
      run('jpeg 500x375 rrc128+flip+norm fast_decode', ds, {batch = 32, shuffle = true, threads = t,
         augment = {random_resized_crop = 128, flip = true, normalize = true, fast_decode = true}})
   end
end

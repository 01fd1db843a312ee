-- nr.recipe: command-line overrides (dotted paths, --flag=value, aliases, lists, booleans,
-- --nr off), errors that name the flag (unknown flag, wrong type, a table given a scalar,
-- stray arguments), --help listing fields with their values, and a recipe file run through the
-- nrlua executable with stdout going to a file (plain progress lines) and then resumed.
local R = require 'nr.recipe'
local ck = require 'nr.checkpoint'

local TMP = (os.getenv('NR_TEST_TMP') or '/tmp') .. '/nr_recipe_spec_' .. tostring(os.time()) .. '_' .. tostring(math.random(1e6))
ck.mkdirs(TMP)

local BASE = {
   model = {name = 'vgg', depth = 19, classes = 10},
   data = {dataset = 'cifar10', root = 'data/cifar10', batch = 64},
   optim = {name = 'sgd', lr = 0.1, momentum = 0.9, weight_decay = 1e-4, nesterov = false},
   schedule = {name = 'step', milestones = {150, 225}},
   nr = {enabled = true, target = 0.25, lambda = {mode = 'constant', value = 1.5e-4}},
   epochs = 300,
}

local function err_of(args)
   local ok, e = pcall(R.apply, BASE, args)
   assert.is_false(ok, 'expected an error for ' .. table.concat(args, ' '))
   return tostring(e)
end

describe('nr.recipe', function()
   it('overrides fields by dotted path and by alias, with typed values', function()
      local r = R.apply(BASE, {'--epochs', '3', '--batch', '128', '--lr', '0.05', '--data', '/d', '--dataset', 'cifar100',
                               '--optim.nesterov', 'true', '--nr.lambda.value=3e-4', '--schedule.milestones', '1,2',
                               '--model.depth', '16', '--out', '/tmp/x', '--threads', '2', '--seed', '7', '--device', 'cpu',
                               '--resume', '/tmp/r', '--data.size', '28'})
      assert.equal(3, r.epochs)
      assert.equal(128, r.data.batch)
      assert.equal(0.05, r.optim.lr)
      assert.equal('/d', r.data.root)
      assert.equal('cifar100', r.data.dataset)
      assert.is_true(r.optim.nesterov)
      assert.equal(3e-4, r.nr.lambda.value)
      assert.same({1, 2}, r.schedule.milestones)
      assert.equal(16, r.model.depth)
      assert.equal('/tmp/x', r.out)
      assert.equal(2, r.threads); assert.equal(7, r.seed); assert.equal('cpu', r.device)
      assert.equal('/tmp/r', r.resume)
      assert.equal(28, r.data.size)
      -- the original is untouched
      assert.equal(300, BASE.epochs); assert.equal(1.5e-4, BASE.nr.lambda.value)
   end)

   it('switches NR with --nr off / on', function()
      local r = R.apply(BASE, {'--nr', 'off'})
      assert.is_false(r.nr.enabled)
      assert.equal(0.25, r.nr.target)
      assert.is_true(R.apply(r, {'--nr', 'on'}).nr.enabled)
      assert.is_false(R.apply({epochs = 1}, {'--nr', 'off'}).nr)
      -- --init PATH: init = PATH, or the path of a recipe's init table (its other fields kept)
      assert.are.same({path = 'w.safetensors', skip = {'fc'}}, R.apply({epochs = 1}, {'--init', 'w.safetensors', '--init.skip', 'fc'}).init)
      assert.are.same({path = 'b', names = 'torchvision', skip = {'fc'}},
         R.apply({init = {path = 'a', names = 'torchvision'}}, {'--init', 'b', '--init.skip', 'fc'}).init)
   end)

   it('types every NR option, also those the recipe leaves out (Δt: "epoch" or a number of steps)', function()
      local epochwise = {epochs = 1, nr = {enabled = true, lambda = {mode = 'adaptive', dt = 'epoch'}}}
      local r = R.apply(epochwise, {'--nr.lambda.dt', '200', '--nr.lambda.mode', 'constant', '--nr.lambda.value', '3e-4',
                                    '--nr.active_epochs', '3', '--nr.threshold', '0.02', '--nr.rescale', 'on',
                                    '--nr.scheme', 'CR', '--nr.times', '2'})
      assert.equal(200, r.nr.lambda.dt); assert.equal('constant', r.nr.lambda.mode); assert.equal(3e-4, r.nr.lambda.value)
      assert.equal(3, r.nr.active_epochs); assert.equal(0.02, r.nr.threshold); assert.is_true(r.nr.rescale)
      assert.equal('CR', r.nr.scheme); assert.equal(2, r.nr.times)
      assert.equal('epoch', R.apply(r, {'--nr.lambda.dt', 'epoch'}).nr.lambda.dt)
      local ok, e = pcall(R.apply, epochwise, {'--nr.lambda.dt', '0'})
      assert.is_false(ok); assert.truthy(tostring(e):find('--nr.lambda.dt: expected "epoch" or a number of steps >= 1', 1, true))
      ok, e = pcall(R.apply, epochwise, {'--nr.times', '1.5'})
      assert.is_false(ok); assert.truthy(tostring(e):find('--nr.times: expected an integer', 1, true))
   end)

   it('dist and data options have flag types where the recipe leaves them out', function()
      local r = R.apply({epochs = 1}, {'--dist.timeout', '5', '--dist.sync_bn', '--dist.algo', 'ring', '--data.drop_last'})
      assert.equal(5, r.dist.timeout); assert.is_true(r.dist.sync_bn); assert.equal('ring', r.dist.algo)
      assert.is_true(r.data.drop_last)
      -- evaluation off from the command line ("false" was taken as the name of a split)
      for _, off in ipairs({'false', 'off', 'none'}) do
         assert.is_false(R.apply(BASE, {'--data.val_split', off}).data.val_split)
         assert.is_false(R.apply({epochs = 1}, {'--data.val_split', off}).data.val_split)
      end
      assert.equal('val', R.apply(BASE, {'--data.val_split', 'val'}).data.val_split)
   end)

   it('a boolean flag alone means true (--overwrite, --optim.nesterov)', function()
      local r = R.apply(BASE, {'--overwrite', '--optim.nesterov', '--epochs', '3'})
      assert.is_true(r.overwrite); assert.is_true(r.optim.nesterov); assert.equal(3, r.epochs)
      assert.is_true(R.apply(BASE, {'--epochs', '3', '--overwrite'}).overwrite)
      assert.is_false(R.apply(BASE, {'--overwrite', 'false'}).overwrite)
   end)

   it('--resume DIR takes the run\'s own settings from DIR/recipe.json; flags given now override', function()
      local dir = TMP .. '/resumed'
      ck.mkdirs(dir)
      -- what a run started with --epochs 7 --lr 0.3 --dataset cifar100 --augment off --nr off left
      ck.write_atomic(dir .. '/recipe.json', ck.json_encode({epochs = 7, out = '/elsewhere', name = 'other',
         optim = {name = 'sgd', lr = 0.3, momentum = 0.5, nesterov = false}, model = '<function>', nr = false,
         data = {batch = 32, dataset = 'cifar100', augment = false}, device = 'cuda', threads = 7,
         schedule = {name = 'step', milestones = {1, 2}}}))
      local base, changed = R.resume_base(BASE, dir)
      local r = R.apply(base, {'--resume', dir, '--lr', '0.01'})
      assert.equal(7, r.epochs); assert.equal(32, r.data.batch); assert.equal(0.5, r.optim.momentum)
      assert.is_false(r.optim.nesterov); assert.is_false(r.data.augment); assert.is_false(r.nr)
      assert.same({1, 2}, r.schedule.milestones)
      assert.is_nil(r.data.root)                              -- the run had none: the recipe's is not added
      assert.equal(0.01, r.optim.lr)                          -- given now
      assert.same(BASE.model, r.model)                        -- code comes from the recipe file
      assert.is_nil(r.out); assert.is_nil(r.device); assert.is_nil(r.threads) -- never the folder or the machine's
      assert.not_equal('other', r.name)
      assert.truthy(table.concat(changed, ', '):find('epochs 7', 1, true))
      -- the run's NR settings come back too, and --nr on at resume keeps them
      ck.write_atomic(dir .. '/recipe.json', ck.json_encode({nr = {enabled = true, target = 0.3, lambda = {dt = 7}}}))
      r = R.apply(R.resume_base({epochs = 1, nr = false}, dir), {'--resume', dir})
      assert.equal(0.3, r.nr.target); assert.equal(7, r.nr.lambda.dt)
      -- a damaged recipe.json is said, and the recipe file's settings are used
      ck.write_atomic(dir .. '/recipe.json', '[1, 2]')
      local same, none, note = R.resume_base(BASE, dir)
      assert.equal(BASE, same); assert.is_nil(none)
      assert.truthy(note:find('recipe.json is missing or damaged', 1, true))
      -- no run there: said as that (it was "recipe.json is missing ... used", then a failure)
      local function refused(path)
         local ok, err = pcall(R.resume_base, BASE, path)
         assert.is_false(ok)
         return err
      end
      ck.mkdirs(TMP .. '/not_a_run')
      assert.equal('nr.train: resume: no run folder ' .. TMP .. '/nope (give the folder of the run to continue)',
         refused(TMP .. '/nope'))
      assert.equal('nr.train: resume: no run folder ' .. dir .. '/recipe.json (give the folder of the run to continue, e.g. '
         .. dir .. ')', refused(dir .. '/recipe.json'))
      assert.equal('nr.train: cannot resume ' .. TMP .. '/not_a_run: it holds no run (no checkpoint, recipe.json or '
         .. 'metrics.jsonl)', refused(TMP .. '/not_a_run'))
   end)

   it('names the flag in every error', function()
      assert.truthy(err_of({'--epochz', '3'}):find('--epochz: unknown flag', 1, true))
      -- a near miss or a PyTorch name gets the flag it probably meant
      assert.truthy(err_of({'--epoch', '3'}):find('did you mean --epochs?', 1, true))
      assert.truthy(err_of({'--learning_rate', '3'}):find('did you mean --optim.lr?', 1, true))
      assert.truthy(err_of({'--optim.lrr', '3'}):find('did you mean --optim.lr?', 1, true))
      assert.is_nil(err_of({'--zzz', '3'}):find('did you mean', 1, true))
      assert.truthy(err_of({'--optimizer', 'sgd'}):find('did you mean --optim.name?', 1, true))
      -- a field without its section
      assert.truthy(err_of({'--target', '0.3'}):find('did you mean --nr.target?', 1, true))
      assert.truthy(err_of({'--milestone', '3'}):find('did you mean --schedule.milestones?', 1, true))
      -- a flag takes its field's type, not that of a wrong value in the recipe (out = 5)
      assert.are.equal('/tmp/x', R.apply({epochs = 1, out = 5}, {'--out', '/tmp/x'}).out)
      -- NR's options the recipe leaves out are typed too
      local typed = R.apply({epochs = 1}, {'--nr.input_shape', '1,28,28', '--nr.count.linear', 'on'})
      assert.are.same({{1, 28, 28}, true}, {typed.nr.input_shape, typed.nr.count.linear})
      -- a near miss in an options table (a recipe's nr = {targt = ...}) names the key it meant
      local aok, ae = pcall(require('nr.rejuvenate').attach, {}, {targt = 0.3})
      assert.is_false(aok)
      assert.truthy(tostring(ae):find('unknown option "targt" (did you mean "target"? allowed: ', 1, true), tostring(ae))
      assert.truthy(err_of({'--optim.lrr', '3'}):find('--optim.lrr', 1, true))
      assert.truthy(err_of({'--epochs', 'many'}):find('--epochs: expected an integer, got "many"', 1, true))
      assert.truthy(err_of({'--epochs', '2.5'}):find('--epochs: expected an integer', 1, true))
      assert.truthy(err_of({'--lr', 'fast'}):find('--lr: expected a number, got "fast"', 1, true))
      assert.truthy(err_of({'--optim.nesterov', 'maybe'}):find('--optim.nesterov: expected true or false', 1, true))
      assert.truthy(err_of({'--optim', 'adam'}):find('--optim: optim is a table', 1, true))
      assert.truthy(err_of({'--nr', 'sometimes'}):find('--nr: expected on or off', 1, true))
      assert.truthy(err_of({'--epochs'}):find('--epochs: missing value', 1, true))
      assert.truthy(err_of({'stray'}):find('unexpected argument "stray"', 1, true))
      -- policies are functions: the error says where they go instead of suggesting --nr.policy.FIELD
      for _, args in ipairs({{'--nr.policy', 'x'}, {'--nr.policy.reallocate', 'x'}}) do
         assert.truthy(err_of(args):find(args[1] .. ': NR policies are Lua functions; set them in the recipe file', 1, true))
      end
      local code = {model = function() end, epochs = 1}
      local ok, e = pcall(R.apply, code, {'--model.depth', '3'})
      assert.is_false(ok); assert.truthy(tostring(e):find('--model.depth', 1, true))
   end)

   it('lists the fields with their values for --help', function()
      local r, what = R.apply(BASE, {'--lr', '1', '--help', '--epochs', 'x'})
      assert.equal('help', what)
      assert.equal(1, r.optim.lr)   -- the flags before --help shape the listing; those after it are not read
      -- another optimizer's listing: its own settings, not sgd's
      local ha = R.help((R.apply(BASE, {'--optim.name', 'adamw', '--help'})), 'x.lua')
      assert.truthy(ha:find('%-%-optim%.betas%s+list%s+0%.9,0%.999\n'), ha)
      assert.falsy(ha:find('--optim.momentum ', 1, true))
      assert.falsy(R.help(BASE, 'x.lua'):find('--optim.betas', 1, true))
      local h = R.help(BASE, 'recipes/vgg19_cifar.lua')
      assert.truthy(h:find('usage: nrlua recipes/vgg19_cifar.lua', 1, true))
      assert.truthy(h:find('%-%-optim%.lr%s+number%s+0%.1\n'))
      assert.truthy(h:find('%-%-epochs%s+integer%s+300\n'))
      assert.truthy(h:find('%-%-schedule%.milestones%s+list%s+150,225\n'))
      assert.truthy(h:find('%-%-nr%.lambda%.value%s+number%s+0%.00015\n'))
      assert.truthy(h:find('%-%-data%.eval_batch%s+integer%s+%(unset%)\n'))
      assert.truthy(h:find('%-%-lr%s+= %-%-optim%.lr'))
      -- val_split takes a split name or off: said in the type column and under the short flags
      assert.truthy(h:find('\n  %-%-data%.val_split +split|off test\n'))
      assert.truthy(h:find('--data.val_split off', 1, true))
   end)

   it('runs a recipe file through nrlua, logs plainly to a file, and resumes with --resume', function()
      local exe = require('tests.lua.spec_util').nrlua()
      local file = TMP .. '/tiny.lua'
      local w = assert(io.open(file, 'w'))
      w:write([[
-- a tiny recipe: linear classifier on two Gaussian blobs, in-memory data
local nr = require 'nr'
local train = require 'nr.train'
nr.manual_seed(5)
local x = nr.randn({64, 1, 2, 2})
local y = nr.empty({64}, {dtype = 'int64'})
for i = 1, 64 do y:set(i, i % 2); if i % 2 == 1 then x:narrow(1, i, 1):add_(2) end end
return {
   model = function() return nr.nn.Sequential{nr.nn.Flatten(), nr.nn.Linear(4, 2)} end,
   data = {train = train.memory_loader(x, y, {batch = 16, shuffle = true}), val = train.memory_loader(x, y, {batch = 32})},
   optim = {lr = 0.1}, epochs = 2, log_every = 2,
}
]])
      w:close()
      local out, log = TMP .. '/run', TMP .. '/log.txt'
      local cmd = string.format('%s %s --epochs 3 --lr 0.2 --threads 1 --out %s > %s 2>&1', exe, file, out, log)
      local rc = os.execute(cmd)
      local text = ck.read_file(log) or ''
      assert(rc == 0 or rc == true, 'nrlua failed: ' .. text)
      assert.is_nil(text:find('\r', 1, true))
      assert.truthy(text:find('epoch 3/3 step 4/4 loss', 1, true), text)
      assert.truthy(text:find('done: top1', 1, true))
      assert.equal(3, ck.json_decode(ck.read_file(out .. '/recipe.json')).epochs)
      assert.equal(0.2, ck.json_decode(ck.read_file(out .. '/recipe.json')).optim.lr)
      -- continue the finished run for two more epochs
      rc = os.execute(string.format('%s %s --epochs 5 --lr 0.2 --threads 1 --resume %s > %s 2>&1', exe, file, out, log))
      text = ck.read_file(log) or ''
      assert(rc == 0 or rc == true, 'resume failed: ' .. text)
      assert.truthy(text:find('resumed from', 1, true), text)
      assert.is_nil(text:find('epoch 3/5', 1, true))
      assert.truthy(text:find('epoch 5/5  train loss', 1, true), text)
      -- a recipe with its own out (as the zoo's runs/<name>): --resume DIR continues in DIR
      local with_out = TMP .. '/tiny_out.lua'
      local src = ck.read_file(file):gsub('optim = {lr = 0.1}', 'out = ' .. string.format('%q', TMP .. '/default_out') .. ', optim = {lr = 0.1}')
      w = assert(io.open(with_out, 'w')); w:write(src); w:close()
      local run2 = TMP .. '/run2'
      rc = os.execute(string.format('%s %s --threads 1 --out %s > %s 2>&1', exe, with_out, run2, log))
      assert(rc == 0 or rc == true, 'nrlua failed: ' .. (ck.read_file(log) or ''))
      rc = os.execute(string.format('%s %s --epochs 3 --threads 1 --resume %s > %s 2>&1', exe, with_out, run2, log))
      text = ck.read_file(log) or ''
      assert(rc == 0 or rc == true, 'resume failed: ' .. text)
      assert.truthy(text:find('-> ' .. run2, 1, true), text)
      assert.is_nil(ck.read_file(TMP .. '/default_out/recipe.json'), 'the resumed run went on in the recipe\'s own out')
      assert.equal(3, ck.json_decode(ck.read_file(run2 .. '/recipe.json')).epochs)
      -- a bad flag fails with a message naming it
      rc = os.execute(string.format('%s %s --epoch 5 > %s 2>&1', exe, file, log))
      assert(rc ~= 0 and rc ~= true)
      assert.truthy((ck.read_file(log) or ''):find('--epoch: unknown flag', 1, true))
   end)

   it('drops the old root when --dataset changes and --data is not given', function()
      local base = {data = {dataset = 'imagefolder', root = '/data/imagenet', batch = 8}}
      local r = R.apply(base, {'--dataset', 'fashion-mnist'})
      assert.equal('fashion-mnist', r.data.dataset)
      assert.is_nil(r.data.root)
      r = R.apply(base, {'--dataset', 'fashion-mnist', '--data', '/elsewhere'})
      assert.equal('/elsewhere', r.data.root)
      assert.equal('/data/imagenet', base.data.root)
      -- a recipe without a data table (its loaders come from defaults) takes --dataset too
      assert.equal('fashion-mnist', R.apply({epochs = 1}, {'--dataset', 'fashion-mnist'}).data.dataset)
   end)

   it('--data.augment.FIELD sets one augmentation setting (it was an unknown flag)', function()
      local r = R.apply({data = {dataset = 'fashion-mnist'}}, {'--data.augment.flip', 'true', '--data.augment.pad', '2',
         '--data.augment.normalize', 'false'})
      assert.same({flip = true, pad = 2, normalize = false}, r.data.augment)
      -- over a recipe's table it adds or replaces one field; over augment = false it turns one on
      assert.same({crop = 24, flip = true}, R.apply({data = {augment = {crop = 28, flip = true}}}, {'--data.augment.crop', '24'}).data.augment)
      assert.same({flip = true}, R.apply({data = {augment = false}}, {'--data.augment.flip', 'on'}).data.augment)
      local ok, err = pcall(R.apply, {data = {}}, {'--data.augment.pad', 'x'})
      assert.is_false(ok)
      assert.truthy(tostring(err):find('--data.augment.pad: expected an integer', 1, true), err)
   end)

   it('--data.val_batches all lifts a cap (one a resumed or evaluated run carries from its recipe.json)', function()
      local base = {data = {dataset = 'fashion-mnist', val_batches = 2, train_batches = 3}}
      local r = R.apply(base, {'--data.val_batches', 'all', '--data.train_batches=all'})
      assert.is_nil(r.data.val_batches)
      assert.is_nil(r.data.train_batches)
      assert.equal(2, base.data.val_batches)
      assert.equal(5, R.apply(base, {'--data.val_batches', '5'}).data.val_batches)
      local ok, err = pcall(R.apply, base, {'--data.val_batches', 'none'})
      assert.is_false(ok)
      assert.truthy(tostring(err):find('--data.val_batches: expected an integer, or all, got "none"', 1, true), err)
   end)

   it('--schedule switching away from a step schedule drops the recipe\'s step settings, not the flags', function()
      local base = {schedule = {name = 'step', milestones = {150, 225}, gamma = 0.1, warmup = 2}}
      local r = R.apply(base, {'--schedule', 'cosine'})
      assert.same({name = 'cosine', warmup = 2}, r.schedule)
      assert.same({150, 225}, base.schedule.milestones)
      -- to another step schedule they stay; a flag for them stays (nr.schedule refuses it on cosine)
      assert.same({150, 225}, R.apply(base, {'--schedule', 'multistep'}).schedule.milestones)
      assert.equal(0.5, R.apply(base, {'--schedule', 'cosine', '--schedule.gamma', '0.5'}).schedule.gamma)
   end)

   it('--optim.name switching the optimizer starts it from its defaults plus the optim flags given', function()
      local base = {optim = {name = 'sgd', lr = 0.1, momentum = 0.9, weight_decay = 1e-4, nesterov = true, no_decay_bn_bias = true}}
      local r, _, notes = R.apply(base, {'--optim.name', 'adamw', '--lr', '3e-4', '--optim.betas', '0.9,0.98'})
      assert.same({name = 'adamw', lr = 3e-4, betas = {0.9, 0.98}, no_decay_bn_bias = true}, r.optim)
      assert.equal(1, #notes)
      assert.truthy(notes[1]:find("the recipe's sgd settings (momentum, nesterov, weight_decay) are not used", 1, true), notes[1])
      local resolved = require('nr.train').resolve(r)
      assert.equal(1e-8, resolved.optim.eps)
      assert.equal(1e-2, resolved.optim.weight_decay)
      require('nr.optim').build(resolved.optim, require('nr.nn').Linear(2, 2))   -- builds: no sgd setting left over
      -- the same optimizer named again keeps the recipe's settings
      r = R.apply(base, {'--optim.name', 'SGD'})
      assert.equal(0.9, r.optim.momentum)
   end)

   it('a section that is off (false) is turned on by setting one of its fields', function()
      local r = R.apply({epochs = 1, schedule = false, nr = false}, {'--schedule', 'cosine', '--nr.target', '0.5'})
      assert.equal('cosine', r.schedule.name)
      assert.equal(0.5, r.nr.target)
      -- and --schedule off (false, none) turns the schedule off: a constant LR
      for _, args in ipairs({{'--schedule', 'off'}, {'--schedule=false'}, {'--schedule', 'none', '--epochs', '2'}}) do
         r = R.apply(BASE, args)
         assert.is_false(r.schedule)
      end
      assert.equal(2, R.apply(BASE, {'--schedule', 'none', '--epochs', '2'}).epochs)
      -- with a field of the schedule, before or after it: a contradiction, said
      for _, args in ipairs({{'--schedule', 'off', '--schedule.warmup', '1'}, {'--schedule.warmup', '1', '--schedule=off'}}) do
         local ok, err = pcall(R.apply, BASE, args)
         assert.is_false(ok)
         assert.truthy(err:find('--schedule.warmup: the schedule is off (--schedule off: a constant LR), so it has no '
            .. 'schedule.warmup', 1, true), err)
      end
   end)

   it('cleans up', function() ck.remove_tree(TMP) end)
end)

-- nr.report and tools/report.lua: a report rendered from a short real run is one self-contained
-- HTML file (inline SVG, no external resources) with loss, accuracy and LR curves and the epoch
-- table; records of kind 'nr' add the utilization / λ charts and per-layer widths; a folder
-- that is not a run is a clear error.
local nr = require 'nr'
local ck = require 'nr.checkpoint'
local train = require 'nr.train'
local report = require 'nr.report'

local TMP = (os.getenv('NR_TEST_TMP') or '/tmp') .. '/nr_report_spec_' .. tostring(os.time()) .. '_' .. tostring(math.random(1e6))
ck.mkdirs(TMP)

local function count(s, pat)
   local n = 0
   for _ in s:gmatch(pat) do n = n + 1 end
   return n
end

describe('nr.report', function()
   local dir = TMP .. '/run'

   it('renders a short real run into a self-contained HTML file', function()
      nr.manual_seed(2)
      local x = nr.randn({96, 1, 4, 4})
      local y = nr.empty({96}, {dtype = 'int64'})
      for i = 1, 96 do y:set(i, i % 3); x:narrow(1, i, 1):narrow(3, i % 3 + 1, 1):add_(2) end
      local sink = {write = function() end, flush = function() end}
      nr.train{
         name = 'report-spec',
         model = function() return nr.nn.Sequential{nr.nn.Conv2d(1, 4, 3, {padding = 1}), nr.nn.ReLU(), nr.nn.Flatten(), nr.nn.Linear(64, 3)} end,
         data = {train = train.memory_loader(x, y, {batch = 16, shuffle = true}), val = train.memory_loader(x, y, {batch = 48})},
         optim = {lr = 0.05, momentum = 0.9}, schedule = {name = 'step', milestones = {2}}, epochs = 3, log_every = 2,
         out = dir, progress = {stream = sink, tty = false},
      }
      -- through the tool, as a user runs it
      local exe = require('tests.lua.spec_util').nrlua()
      local home = require('nr.ffi').home
      local rc = os.execute(string.format('%s %s/tools/report.lua %s > %s/tool.txt 2>&1', exe, home, dir, TMP))
      assert(rc == 0 or rc == true, ck.read_file(TMP .. '/tool.txt'))
      local html = ck.read_file(dir .. '/report.html')
      assert.truthy(html, 'report.html written')
      assert.truthy(html:find('^<!DOCTYPE html>'))
      assert.truthy(html:find('<h1>report%-spec</h1>'))
      assert.equal(3, count(html, '<svg '))
      for _, t in ipairs({'Loss', 'Accuracy', 'Learning rate'}) do assert.truthy(html:find('class="title">' .. t .. '<', 1, true), t) end
      assert(count(html, '<polyline') >= 6)
      assert.truthy(html:find('<td>3</td><td>0.005</td>', 1, true), 'epoch table with the stepped LR: ' .. (html:match('<tr><td>3</td>.-</tr>') or '?'))
      assert.is_nil(html:find('<script', 1, true))
      assert.is_nil(html:find('<link', 1, true))
      assert.is_nil(html:gsub('xmlns="http://www.w3.org/2000/svg"', ''):find('https?://'))
      assert.is_nil(html:find('Neural Rejuvenation', 1, true))
      assert.truthy(html:find('<td>status</td><td>finished</td>', 1, true))
      -- the same run cut short (no summary, a torn last line): said so, with the last top-1
      local cut = TMP .. '/cut'
      ck.mkdirs(cut)
      ck.write_atomic(cut .. '/recipe.json', ck.read_file(dir .. '/recipe.json'))
      local lines = {}
      for line in ck.read_file(dir .. '/metrics.jsonl'):gmatch('[^\n]+') do
         if not line:find('"kind":"summary"', 1, true) then lines[#lines + 1] = line end
      end
      ck.write_atomic(cut .. '/metrics.jsonl', table.concat(lines, '\n') .. '\n{"kind":"step","ep')
      local chtml = ck.read_file(report.write(cut))
      assert.truthy(chtml:find('<b>incomplete</b>: no summary record', 1, true))
      assert.truthy(chtml:find('1 unreadable line(s) in metrics.jsonl', 1, true))
      assert.truthy(chtml:find('<td>last top-1</td>', 1, true))
   end)

   it('adds utilization, λ and per-layer widths for NR records', function()
      local f = assert(io.open(dir .. '/metrics.jsonl', 'a'))
      f:write('{"kind":"nr","event":"check","epoch":1,"step":6,"r_params":0.8,"r_flops":0.7,"lambda":5e-05}\n')
      f:write('{"kind":"nr","event":"rejuvenate","epoch":2,"step":12,"index":1,"r_before":{"params":0.5,"flops":0.4},'
         .. '"r_after":{"params":1,"flops":0.97},"scheme":"CA","layers":{"1":{"name":"0","width_before":4,"live":2,"width_after":5}}}\n')
      f:write('not json\n')
      f:close()
      local html = ck.read_file(report.write(dir))
      assert.truthy(html:find('Neural Rejuvenation', 1, true))
      assert.truthy(html:find('Utilization r', 1, true))
      assert.truthy(html:find('λ', 1, true))
      assert.truthy(html:find('Per-layer widths', 1, true))
      assert.truthy(html:find('<tr><td>0</td><td>4</td><td>2</td><td>5</td></tr>', 1, true))
      assert.truthy(html:find('rejuvenation 1', 1, true))
      assert.truthy(html:find('1 unreadable line', 1, true))
   end)

   it('shows α, the model size and the policy info of a rejuvenation, held epochs and the size after', function()
      local d2 = TMP .. '/rej'
      ck.mkdirs(d2)
      ck.write_atomic(d2 .. '/metrics.jsonl', table.concat({
         '{"kind":"run","event":"begin","device":"cpu","threads":2,"params":6274}',
         '{"kind":"epoch","epoch":1,"lr":0.1,"lr_end":0.1,"held":true,"train":{"loss":1},"val":{"top1":50}}',
         '{"kind":"nr","event":"rejuvenate","epoch":1,"step":12,"index":1,"scheme":"NR","rescaled":0,"alpha":1.452,'
            .. '"alpha_sqrt":1.442,"size_before":{"params":6274,"flops":900},"size_after":{"params":10534,"flops":1500},'
            .. '"policy_info":{"t":0.25},"model_params":10534}',
         '{"kind":"epoch","epoch":2,"lr":0.1,"lr_end":0.05,"schedule_hold":true,"train":{"loss":0.5},"val":{"top1":60}}',
      }, '\n') .. '\n')
      local html = ck.read_file(report.write(d2))
      assert.truthy(html:find('6274 parameters as built, 10534 after Neural Rejuvenation', 1, true))
      assert.truthy(html:find('<td>expansion rate α</td><td>1.452 (the authors\' sqrt(cost / live cost) = 1.442)</td>', 1, true))
      assert.truthy(html:find('parameters 6274 → 10534, FLOPs 900 → 1500', 1, true))
      assert.truthy(html:find('{&quot;t&quot;:0.25}', 1, true))
      assert.truthy(html:find('<td>1 (held)</td><td>0.1</td>', 1, true))
      assert.truthy(html:find('<td>2</td><td>0.1 → 0.05</td>', 1, true))
      assert.falsy(html:find('rescaled', 1, true))    -- 0 channels rescaled is not "rescaled"
   end)

   it('skips records and a recipe.json of the wrong types (valid JSON), counting them, instead of failing', function()
      local d3 = TMP .. '/damaged'
      ck.mkdirs(d3)
      ck.write_atomic(d3 .. '/recipe.json', '{"data": 5, "schedule": {"warmup": "x"}}')
      ck.write_atomic(d3 .. '/metrics.jsonl', table.concat({
         '{"kind":"epoch","epoch":1,"lr":0.1,"train":{"loss":1},"val":{"top1":50}}',
         '{"kind":"epoch","epoch":"x","train":5}', '{"kind":"step","step":"s"}',
         '{"kind":"nr","event":"check","r_params":"x"}', '{"kind":"nr","event":"rejuvenate","layers":{"1":5}}',
      }, '\n') .. '\n')
      local html = ck.read_file(report.write(d3))
      assert.truthy(html:find('4 unreadable line(s) in metrics.jsonl', 1, true))
      assert.truthy(html:find('recipe.json could not be read (damaged)', 1, true))
      assert.truthy(html:find('<td>1</td><td>0.1</td>', 1, true))           -- the good epoch is still shown
      -- a run without a schedule (schedule = false) is not damaged, and a hook's own records pass
      ck.write_atomic(d3 .. '/recipe.json', '{"name": "nosched", "schedule": false, "optim": {"lr": 0.1}}')
      ck.write_atomic(d3 .. '/metrics.jsonl', '{"kind":"epoch","epoch":1,"lr":0.1}\n{"kind":"mine","epoch":"first"}\n')
      html = ck.read_file(report.write(d3))
      assert.falsy(html:find('could not be read', 1, true))
      assert.falsy(html:find('unreadable', 1, true))
   end)

   it('draws charts with nice ticks and tolerates empty series', function()
      local svg = report.chart{title = 'T', series = {{name = 'a', points = {{0, 0.1}, {1, 0.93}}}}}
      assert.truthy(svg:find('>1.0<', 1, true) or svg:find('>1.00<', 1, true))
      assert.truthy(report.chart{title = 'E', series = {{name = 'a', points = {}}}}:find('no data', 1, true))
      assert.equal('&lt;b&gt;', report.escape('<b>'))
   end)

   it('says when a folder is not a run', function()
      ck.mkdirs(TMP .. '/empty')
      local ok, err = pcall(report.render, TMP .. '/empty')
      assert.is_false(ok)
      assert.truthy(tostring(err):find('is it a run folder', 1, true))
   end)

   it('names the argument of the wrong type', function()
      for _, c in ipairs({{report.chart, {5}, 'nr.report.chart: the chart must be a table, got number'},
                          {report.chart, {{}}, 'nr.report.chart: series must be a table, got nil'},
                          {report.width_bars, {'t', 5}, 'nr.report.width_bars: layers must be a table, got number'},
                          {report.read_run, {5}, 'nr.report.read_run: the run folder must be a string, got number'},
                          {report.render, {{}}, 'nr.report.render: the run folder must be a string, got table'},
                          {report.write, {}, 'nr.report.write: the run folder must be a string, got nil'},
                          {report.write, {TMP, 3}, 'nr.report.write: path must be a string, got number'}}) do
         local ok, err = pcall(c[1], unpack(c[2]))
         assert.is_false(ok)
         assert.truthy(tostring(err):find(c[3], 1, true), tostring(err))
      end
   end)

   it('cleans up', function() ck.remove_tree(TMP) end)
end)

-- nr.report — a run folder's report: one self-contained HTML file with inline SVG plots.
--
-- What it is: render(run_dir) reads recipe.json and metrics.jsonl and returns HTML with a
-- summary, loss / accuracy / learning-rate curves and, when records of kind 'nr' exist (written
-- by nr.rejuvenate), the utilization r and λ over time with rejuvenations marked, and per
-- rejuvenation α, the NR cost before / after, the reallocation's info and the per-layer widths
-- before / live / after. Records of the kinds it draws whose fields have the wrong types, and a
-- damaged recipe.json, are skipped and counted (a hook's own records pass as they are).
-- write(run_dir [, path]) writes
-- run_dir/report.html (atomically). What it is not: a live dashboard; nothing is fetched from
-- the network (no scripts, fonts or styles from elsewhere), so the file can be mailed or archived.
-- Invariants: the x axis of the curves is in epochs (step records at fractional epochs);
-- unknown record kinds are ignored; a missing or partial metrics file still renders.
local ck = require 'nr.checkpoint'
local check = require 'nr.check'

local M = {}

local COLORS = {'#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f'}

local function esc(s)
   return (tostring(s):gsub('[&<>"]', {['&'] = '&amp;', ['<'] = '&lt;', ['>'] = '&gt;', ['"'] = '&quot;'}))
end
M.escape = esc

local function fnum(v, digits)
   if v == nil then return '–' end
   if type(v) ~= 'number' then return esc(v) end
   if v == math.floor(v) and math.abs(v) < 1e9 then return string.format('%d', v) end
   return string.format('%.' .. (digits or 4) .. 'g', v)
end

-- "Nice" axis ticks covering [lo, hi].
local function ticks(lo, hi, n)
   if hi <= lo then hi = lo + (lo == 0 and 1 or math.abs(lo) * 0.1) end
   local span = hi - lo
   local raw = span / (n or 5)
   local mag = 10 ^ math.floor(math.log10(raw))
   local step = mag
   for _, m in ipairs({1, 2, 2.5, 5, 10}) do
      if m * mag >= raw then step = m * mag; break end
   end
   local out = {}
   local t = math.floor(lo / step + 1e-9) * step
   local stop = math.ceil(hi / step - 1e-9) * step
   while t <= stop + step * 1e-9 do
      out[#out + 1] = math.abs(t) < step * 1e-9 and 0 or t
      t = t + step
   end
   return out, step
end

local function tick_label(v, step)
   if step >= 1 and v == math.floor(v) then return string.format('%d', v) end
   local digits = math.max(0, -math.floor(math.log10(step)) + 1)
   if math.abs(v) > 0 and (math.abs(v) < 1e-3 or math.abs(v) >= 1e5) then return string.format('%.1e', v) end
   return string.format('%.' .. math.min(digits, 6) .. 'f', v)
end

-- chart{title, xlabel, ylabel, series = {{name, points = {{x, y}, ...}, color, width, dash, opacity, dots}},
--       vlines = {{x, label}}, width = 560, height = 300, ymin, ymax} -> SVG string
function M.chart(c)
   check.type(c, 'table', 'nr.report.chart', 'the chart')
   check.type(c.series, 'table', 'nr.report.chart', 'series')
   local named = 0
   for _, s in ipairs(c.series) do if s.name then named = named + 1 end end
   local W = c.width or 560
   local legend_rows = math.ceil(named / 3)
   local H = (c.height or 300) + legend_rows * 16
   local L, R, Tp, B = 62, 16, 30, 44 + legend_rows * 16
   local xs, ys = {}, {}
   for _, s in ipairs(c.series) do
      for _, p in ipairs(s.points) do
         if p[2] == p[2] and p[2] ~= math.huge and p[2] ~= -math.huge then xs[#xs + 1] = p[1]; ys[#ys + 1] = p[2] end
      end
   end
   local parts = {}
   local function add(s) parts[#parts + 1] = s end
   add(string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" class="chart">', W, H, W, H))
   add(string.format('<text x="%d" y="18" class="title">%s</text>', L, esc(c.title or '')))
   if #xs == 0 then
      add(string.format('<text x="%d" y="%d" class="empty">no data</text></svg>', W / 2 - 25, H / 2))
      return table.concat(parts)
   end
   local xmin, xmax, ymin, ymax = math.huge, -math.huge, math.huge, -math.huge
   for i = 1, #xs do
      xmin, xmax = math.min(xmin, xs[i]), math.max(xmax, xs[i])
      ymin, ymax = math.min(ymin, ys[i]), math.max(ymax, ys[i])
   end
   for _, v in ipairs(c.vlines or {}) do xmin, xmax = math.min(xmin, v[1]), math.max(xmax, v[1]) end
   if c.ymin then ymin = math.min(ymin, c.ymin) end
   if c.ymax then ymax = math.max(ymax, c.ymax) end
   if c.xmin then xmin = c.xmin end
   local yt, ystep = ticks(ymin, ymax, 5)
   ymin, ymax = math.min(ymin, yt[1]), math.max(ymax, yt[#yt])
   if ymax == ymin then ymax = ymin + 1 end
   if xmax == xmin then xmax = xmin + 1 end
   local xt, xstep = ticks(xmin, xmax, 8)
   local pw, ph = W - L - R, H - Tp - B
   local function X(x) return L + (x - xmin) / (xmax - xmin) * pw end
   local function Y(y) return Tp + ph - (y - ymin) / (ymax - ymin) * ph end
   add(string.format('<rect x="%d" y="%d" width="%d" height="%d" class="plot"/>', L, Tp, pw, ph))
   for _, t in ipairs(yt) do
      if t >= ymin - 1e-12 and t <= ymax + 1e-12 then
         add(string.format('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" class="grid"/>', L, L + pw, Y(t), Y(t)))
         add(string.format('<text x="%d" y="%.1f" class="ytick">%s</text>', L - 6, Y(t) + 4, tick_label(t, ystep)))
      end
   end
   for _, t in ipairs(xt) do
      if t >= xmin - 1e-12 and t <= xmax + 1e-12 then
         add(string.format('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" class="grid"/>', X(t), X(t), Tp, Tp + ph))
         add(string.format('<text x="%.1f" y="%d" class="xtick">%s</text>', X(t), Tp + ph + 16, tick_label(t, xstep)))
      end
   end
   for _, v in ipairs(c.vlines or {}) do
      add(string.format('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" class="vline"/>', X(v[1]), X(v[1]), Tp, Tp + ph))
      if v[2] then add(string.format('<text x="%.1f" y="%d" class="vlabel">%s</text>', X(v[1]) + 3, Tp + 12, esc(v[2]))) end
   end
   for i, s in ipairs(c.series) do
      local color = s.color or COLORS[(i - 1) % #COLORS + 1]
      local pts = {}
      for _, p in ipairs(s.points) do
         if p[2] == p[2] and p[2] ~= math.huge and p[2] ~= -math.huge then pts[#pts + 1] = string.format('%.1f,%.1f', X(p[1]), Y(p[2])) end
      end
      if #pts > 0 then
         add(string.format('<polyline fill="none" stroke="%s" stroke-width="%s"%s%s points="%s"/>', color, s.width or 1.8,
            s.dash and (' stroke-dasharray="' .. s.dash .. '"') or '', s.opacity and (' stroke-opacity="' .. s.opacity .. '"') or '',
            table.concat(pts, ' ')))
         if s.dots or #pts == 1 then
            for _, p in ipairs(pts) do
               local x, y = p:match('([^,]+),(.+)')
               add(string.format('<circle cx="%s" cy="%s" r="2.8" fill="%s"/>', x, y, color))
            end
         end
      end
   end
   add(string.format('<text x="%.1f" y="%d" class="xlabel">%s</text>', L + pw / 2, Tp + ph + 32, esc(c.xlabel or 'epoch')))
   -- legend: rows of up to three entries under the x axis label
   local k = 0
   for i, s in ipairs(c.series) do
      if s.name then
         local color = s.color or COLORS[(i - 1) % #COLORS + 1]
         local lx = L + (k % 3) * math.floor(pw / 3)
         local ly = Tp + ph + 40 + math.floor(k / 3) * 16
         add(string.format('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="2.5"%s/>', lx, lx + 18, ly + 4, ly + 4, color,
            s.dash and (' stroke-dasharray="' .. s.dash .. '"') or ''))
         add(string.format('<text x="%d" y="%d" class="legend">%s</text>', lx + 24, ly + 8, esc(s.name)))
         k = k + 1
      end
   end
   add(string.format('<text transform="translate(14,%.1f) rotate(-90)" class="ylabel">%s</text>', Tp + ph / 2, esc(c.ylabel or '')))
   add('</svg>')
   return table.concat(parts, '\n')
end

-- Horizontal grouped bars of per-layer widths: layers = {{name, before, live, after}}.
function M.width_bars(title, layers)
   check.type(title, 'string', 'nr.report.width_bars', 'title')
   check.type(layers, 'table', 'nr.report.width_bars', 'layers')
   local rowh, L, W = 16, 170, 560
   local H = 40 + #layers * (rowh + 4) + 20
   local maxw = 1
   for _, l in ipairs(layers) do maxw = math.max(maxw, l.before or 0, l.after or 0, l.live or 0) end
   local parts = {string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" class="chart">', W, H, W, H),
                  string.format('<text x="8" y="18" class="title">%s</text>', esc(title))}
   local pw = W - L - 60
   local y = 34
   for _, l in ipairs(layers) do
      local function bar(v, color, dy, h)
         if not v then return end
         parts[#parts + 1] = string.format('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>', L, y + dy, v / maxw * pw, h, color)
      end
      parts[#parts + 1] = string.format('<text x="%d" y="%d" class="ytick">%s</text>', L - 6, y + 12, esc(l.name))
      bar(l.before, '#c7c7c7', 0, rowh)
      bar(l.after, '#1f77b4', 3, rowh - 6)
      bar(l.live, '#ff7f0e', 6, rowh - 12)
      parts[#parts + 1] = string.format('<text x="%.1f" y="%d" class="legend">%s → %s</text>', L + math.max(l.before or 0, l.after or 0) / maxw * pw + 4,
         y + 12, fnum(l.before), fnum(l.after))
      y = y + rowh + 4
   end
   parts[#parts + 1] = string.format('<text x="%d" y="%d" class="legend"><tspan fill="#999">■</tspan> before  '
      .. '<tspan fill="#ff7f0e">■</tspan> live (survived)  <tspan fill="#1f77b4">■</tspan> after rejuvenation</text>', L, y + 14)
   parts[#parts + 1] = '</svg>'
   return table.concat(parts, '\n')
end

-- ---- reading a run --------------------------------------------------------------------------


-- The types of the record fields the report reads. A record that is valid JSON but holds another
-- type there (a damaged or hand-edited metrics.jsonl) is skipped and counted with the unreadable
-- lines, instead of failing the whole report.
local NUM, STR, TAB = 'number', 'string', 'table'
local FIELDS = {kind = STR, event = STR, device = STR, precision = STR, memory_format = STR, scheme = STR,
                epoch = NUM, step = NUM, iter = NUM, lr = NUM, lr_end = NUM, loss = NUM, top1 = NUM, time = NUM,
                time_s = NUM, images_per_s = NUM, r_params = NUM, r_flops = NUM, lambda = NUM, cost = NUM,
                target_cost = NUM, cost_error = NUM, alpha = NUM, alpha_sqrt = NUM, index = NUM, held_epochs = NUM,
                epochs_planned = NUM, params = NUM, threads = NUM, model_params = NUM, train_time_s = NUM,
                final_top1 = NUM, best_top1 = NUM, iters_per_epoch = NUM, epochs = NUM,
                train = TAB, val = TAB, r_before = TAB, r_after = TAB, layers = TAB, size_before = TAB,
                size_after = TAB, lambda_history = TAB}
local NESTED = {train = {loss = NUM, top1 = NUM, top5 = NUM}, val = {loss = NUM, top1 = NUM, top5 = NUM},
                r_before = {params = NUM, flops = NUM}, r_after = {params = NUM, flops = NUM},
                size_before = {params = NUM, flops = NUM}, size_after = {params = NUM, flops = NUM}}
local LAYER = {name = STR, width_before = NUM, before = NUM, live = NUM, width_after = NUM, after = NUM}

-- (false stands for "none" where a table is expected: schedule = false is a constant LR)
local function fields_ok(t, types)
   for k, ty in pairs(types) do
      local v = t[k]
      if v ~= nil and type(v) ~= ty and not (v == false and ty == TAB) then return false end
   end
   return true
end

-- The same for recipe.json's fields the summary reads; a damaged one is left out as a whole.
local RECIPE = {name = STR, epochs = NUM, data = TAB, optim = TAB, schedule = TAB}
local RECIPE_NESTED = {data = {dataset = STR, root = STR, batch = NUM},
                       optim = {name = STR, lr = NUM, momentum = NUM, weight_decay = NUM},
                       schedule = {name = STR, warmup = NUM, milestones = TAB},
                       nr = {target = NUM, constraint = STR, scheme = STR}}

local function recipe_ok(rc)
   if type(rc) ~= 'table' or not fields_ok(rc, RECIPE) then return false end
   for k, types in pairs(RECIPE_NESTED) do
      if type(rc[k]) == 'table' and not fields_ok(rc[k], types) then return false end
   end
   return true
end

-- Only the kinds the report draws are checked: a hook's own records (tr:log) pass as they are.
local DRAWN = {epoch = true, step = true, nr = true, run = true, summary = true}

local function well_formed(r)
   if type(r) ~= 'table' then return false end
   if not DRAWN[r.kind] then return true end
   if not fields_ok(r, FIELDS) then return false end
   for k, types in pairs(NESTED) do
      if r[k] ~= nil and not fields_ok(r[k], types) then return false end
   end
   for _, l in pairs(r.layers or {}) do
      if type(l) ~= 'table' or not fields_ok(l, LAYER) then return false end
   end
   return true
end

function M.read_run(dir)
   check.type(dir, 'string', 'nr.report.read_run', 'the run folder')
   local run = {dir = dir, records = {}, bad_lines = 0}
   local rtext = ck.read_file(dir .. '/recipe.json')
   if rtext then
      local ok, r = pcall(ck.json_decode, rtext)
      run.recipe = ok and recipe_ok(r) and r or nil
      run.bad_recipe = not run.recipe
   end
   local mtext = ck.read_file(dir .. '/metrics.jsonl')
   if not mtext and not rtext then
      error(string.format('nr.report: %s has neither recipe.json nor metrics.jsonl (is it a run folder?)', dir), 2)
   end
   for line in (mtext or ''):gmatch('[^\n]+') do
      local ok, r = pcall(ck.json_decode, line)
      if ok and well_formed(r) then run.records[#run.records + 1] = r else run.bad_lines = run.bad_lines + 1 end
   end
   return run
end

local function by_kind(run, kind)
   local out = {}
   for _, r in ipairs(run.records) do if r.kind == kind then out[#out + 1] = r end end
   return out
end

-- x position (epochs) of a record: step records sit inside their epoch.
local function xpos(r, ipe)
   if r.kind == 'step' and r.iter and ipe and ipe > 0 then return (r.epoch or 1) - 1 + r.iter / ipe end
   if r.kind == 'epoch' then return r.epoch end
   if r.step and ipe and ipe > 0 then return r.step / ipe end
   return r.epoch or 0
end

local function list_of(v)
   if type(v) ~= 'table' then return {} end
   if #v > 0 then return v end
   local keys, out = {}, {}
   for k in pairs(v) do keys[#keys + 1] = k end
   table.sort(keys, function(a, b)
      local na, nb = tonumber(a), tonumber(b)
      if na and nb then return na < nb end
      return tostring(a) < tostring(b)
   end)
   for _, k in ipairs(keys) do out[#out + 1] = v[k] end
   return out
end

local CSS = [[
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px;margin-bottom:14px}
table.kv{border-collapse:collapse;font-size:13px} table.kv td{padding:3px 14px 3px 0;vertical-align:top}
table.kv td:first-child{color:#666}
table.grid{border-collapse:collapse;font-size:12px} table.grid td,table.grid th{border:1px solid #ddd;padding:3px 8px;text-align:right}
table.grid th{background:#f4f4f4} table.grid td:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #e4e4e4;border-radius:4px}
svg .title{font-size:13px;font-weight:600;fill:#333} svg .plot{fill:#fcfcfc;stroke:#ccc}
svg .grid{stroke:#eee} svg .ytick{font-size:10px;fill:#555;text-anchor:end} svg .xtick{font-size:10px;fill:#555;text-anchor:middle}
svg .xlabel,svg .ylabel{font-size:11px;fill:#444;text-anchor:middle} svg .legend{font-size:11px;fill:#333}
svg .vline{stroke:#9467bd;stroke-dasharray:4 3} svg .vlabel{font-size:10px;fill:#9467bd} svg .empty{fill:#999;font-size:12px}
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.big{font-size:26px;font-weight:600}
]]

-- render(dir) -> HTML string
function M.render(dir)
   check.type(dir, 'string', 'nr.report.render', 'the run folder')
   local run = M.read_run(dir)
   local rc = type(run.recipe) == 'table' and run.recipe or {}
   local steps, epochs, nrs = by_kind(run, 'step'), by_kind(run, 'epoch'), by_kind(run, 'nr')
   local runs, summaries = by_kind(run, 'run'), by_kind(run, 'summary')
   local ipe = runs[#runs] and runs[#runs].iters_per_epoch
   local summary = summaries[#summaries] and summaries[#summaries].summary
   local last_epoch = epochs[#epochs]
   local best
   for _, e in ipairs(epochs) do
      if e.val and e.val.top1 and (not best or e.val.top1 > best.val.top1) then best = e end
   end
   local h = {}
   local function add(s) h[#h + 1] = s end
   local title = rc.name or dir:match('([^/]+)/*$') or dir
   add('<!DOCTYPE html><html><head><meta charset="utf-8"><title>nrlua report: ' .. esc(title) .. '</title><style>' .. CSS .. '</style></head><body>')
   add('<h1>' .. esc(title) .. '</h1>')
   add('<div class="sub">nrlua run report · ' .. esc(dir) .. ' · generated ' .. os.date('!%Y-%m-%d %H:%M UTC') .. '</div>')

   -- summary
   local model = rc.model
   local built = rc.model_built
   if built and (model == nil or type(model) == 'string') then
      model = {module = built.module, params = built.params}
   end
   local model_s = type(model) == 'table' and (model.name and (model.name .. (model.depth and (' depth ' .. model.depth) or '')
      .. (model.width and (' width ' .. model.width) or ''))
      or model.module and (model.module .. ' (' .. fnum(model.params) .. ' parameters, defined in the recipe)')) or tostring(model or '?')
   local function section(v) return type(v) == 'table' and v or {} end -- (a damaged recipe.json)
   local data = section(rc.data)
   local optim = section(rc.optim)
   local sched = section(rc.schedule)
   add('<table class="kv">')
   local function kv(k, v) add('<tr><td>' .. esc(k) .. '</td><td>' .. v .. '</td></tr>') end
   -- a run without its summary record did not finish (still running, or stopped: --resume continues it)
   kv('status', summary and 'finished' or (last_epoch and ('<b>incomplete</b>: no summary record (still running, or stopped after '
      .. 'epoch ' .. last_epoch.epoch .. '; --resume continues it)') or '<b>incomplete</b>: no epoch finished')
      .. (run.bad_lines > 0 and (' · ' .. run.bad_lines .. ' unreadable line(s) in metrics.jsonl') or ''))
   kv(summary and 'final top-1' or 'last top-1', '<span class="big">' .. (last_epoch and last_epoch.val and fnum(last_epoch.val.top1, 4) .. '%' or '–') .. '</span>'
      .. (last_epoch and last_epoch.val and ('  top-5 ' .. fnum(last_epoch.val.top5, 4) .. '%') or ''))
   kv('best top-1', best and (fnum(best.val.top1, 4) .. '% at epoch ' .. best.epoch) or '–')
   local planned = last_epoch and last_epoch.epochs_planned or rc.epochs
   local held = last_epoch and last_epoch.held_epochs or 0
   kv('epochs', (last_epoch and last_epoch.epoch or 0) .. ' of ' .. fnum(planned)
      .. (held > 0 and string.format(' (%s schedule + %d held)', fnum(rc.epochs), held) or ''))
   kv('model', esc(model_s))
   kv('data', esc((data.dataset or '?') .. (data.root and (' (' .. data.root .. ')') or '') .. ', batch ' .. tostring(data.batch or '?')))
   local oname = tostring(optim.name or 'sgd'):lower()
   if oname == 'adam' or oname == 'adamw' then
      local b = type(optim.betas) == 'table' and optim.betas or {}
      kv('optimizer', esc(string.format('%s lr %s betas %s, %s eps %s weight decay %s', oname, fnum(optim.lr), fnum(b[1]), fnum(b[2]),
         fnum(optim.eps), fnum(optim.weight_decay))))
   else
      kv('optimizer', esc(string.format('%s lr %s momentum %s%s weight decay %s', oname, fnum(optim.lr), fnum(optim.momentum),
         optim.nesterov and ' (Nesterov)' or '', fnum(optim.weight_decay))))
   end
   kv('schedule', esc((sched.name or '-') .. (sched.warmup and sched.warmup > 0 and (', warm-up ' .. sched.warmup .. ' epochs') or '')
      .. (sched.milestones and (', milestones ' .. table.concat(sched.milestones, ', ')) or '')))
   if summary then
      kv('time', esc(require('nr.progress').format_duration(summary.time_s)) .. ' (training ' .. esc(require('nr.progress').format_duration(summary.train_time_s)) .. ')')
      kv('throughput', fnum(math.floor((summary.images_per_s or 0) + 0.5)) .. ' images/s (training)')
   elseif last_epoch then
      kv('throughput', fnum(math.floor((last_epoch.images_per_s or 0) + 0.5)) .. ' images/s (last epoch)')
   end
   local r0 = runs[1]
   if r0 then
      local resized -- the model's parameters after its last rejuvenation (the run record has the built ones)
      for _, r in ipairs(run.records) do
         if r.kind == 'nr' and r.event == 'rejuvenate' and r.model_params then resized = r.model_params end
      end
      kv('device', esc(string.format('%s%s%s, %s threads, %s parameters%s', tostring(r0.device),
         r0.precision == 'bf16' and ' (bf16 mixed precision)' or '',
         r0.memory_format == 'channels_last' and ' (channels-last)' or '', tostring(r0.threads), fnum(r0.params),
         resized and (' as built, ' .. fnum(resized) .. ' after Neural Rejuvenation') or '')))
   end
   if rc.nr and type(rc.nr) == 'table' and rc.nr.enabled ~= false then
      kv('Neural Rejuvenation', esc(string.format('target %s, constraint %s, scheme %s', fnum(rc.nr.target),
         tostring(rc.nr.constraint or 'params'), tostring(rc.nr.scheme or 'NR'))))
   end
   add('</table>')
   if built and built.tree then
      local rejuvenated = false
      for _, r in ipairs(run.records) do if r.kind == 'nr' and r.event == 'rejuvenate' then rejuvenated = true end end
      add('<details><summary class="sub">model structure' .. (rejuvenated and ' (as built, before Neural Rejuvenation resized it; '
         .. 'its widths after are under Per-layer widths)' or '') .. '</summary><pre>' .. esc(built.tree) .. '</pre></details>')
   end

   -- curves
   local train_loss_steps, lr_steps = {}, {}
   for _, r in ipairs(steps) do
      local x = xpos(r, ipe)
      if r.loss then train_loss_steps[#train_loss_steps + 1] = {x, r.loss} end
      if r.lr then lr_steps[#lr_steps + 1] = {x, r.lr} end
   end
   local tl, vl, ta, va, v5, lr_ep = {}, {}, {}, {}, {}, {}
   for _, e in ipairs(epochs) do
      if e.train and e.train.loss then tl[#tl + 1] = {e.epoch, e.train.loss} end
      if e.train and e.train.top1 then ta[#ta + 1] = {e.epoch, e.train.top1} end
      if e.val and e.val.loss then vl[#vl + 1] = {e.epoch, e.val.loss} end
      if e.val and e.val.top1 then va[#va + 1] = {e.epoch, e.val.top1} end
      if e.val and e.val.top5 then v5[#v5 + 1] = {e.epoch, e.val.top5} end
      if e.lr then lr_ep[#lr_ep + 1] = {e.epoch - 1, e.lr} end
   end
   local rej_lines = {}
   for _, r in ipairs(nrs) do
      if r.event == 'rejuvenate' then rej_lines[#rej_lines + 1] = {xpos(r, ipe), 'rejuvenation ' .. tostring(r.index or '')} end
   end
   add('<h2>Training curves</h2><div class="charts">')
   add(M.chart{title = 'Loss', ylabel = 'cross-entropy', xmin = 0, vlines = rej_lines, series = {
      {name = 'train (per log interval)', points = train_loss_steps, color = '#9ecae1', width = 1.2},
      {name = 'train (epoch)', points = tl, color = '#1f77b4', dots = true},
      {name = 'validation', points = vl, color = '#d62728', dots = true},
   }})
   add(M.chart{title = 'Accuracy', ylabel = 'percent', xmin = 0, vlines = rej_lines, series = {
      {name = 'train top-1', points = ta, color = '#1f77b4', dots = true},
      {name = 'val top-1', points = va, color = '#d62728', dots = true},
      {name = 'val top-5', points = v5, color = '#ff7f0e', dash = '5 3', dots = true},
   }})
   add(M.chart{title = 'Learning rate', ylabel = 'lr', xmin = 0, ymin = 0, vlines = rej_lines, series = {
      {name = 'lr', points = #lr_steps > 0 and lr_steps or lr_ep, color = '#2ca02c'},
   }})
   add('</div>')

   -- per-epoch table
   if #epochs > 0 then
      add('<h2>Epochs</h2><table class="grid"><tr><th>epoch</th><th>lr (start → end)</th><th>train loss</th><th>train top-1</th>'
         .. '<th>val loss</th><th>val top-1</th><th>val top-5</th><th>time (s)</th><th>images/s</th></tr>')
      for _, e in ipairs(epochs) do
         -- a held epoch (NR sparsifying, the schedule paused) is marked: it lengthens the run
         local lr = fnum(e.lr) .. (e.lr_end and e.lr_end ~= e.lr and (' → ' .. fnum(e.lr_end)) or '')
         local ep = fnum(e.epoch) .. (e.held and ' (held)' or '') -- (schedule_hold is the state after the epoch)
         add(string.format('<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>',
            ep, lr, fnum(e.train and e.train.loss), fnum(e.train and e.train.top1), fnum(e.val and e.val.loss),
            fnum(e.val and e.val.top1), fnum(e.val and e.val.top5), e.time_s and string.format('%.1f', e.time_s) or '–',
            e.images_per_s and string.format('%d', math.floor(e.images_per_s + 0.5)) or '–'))
      end
      add('</table>')
   end

   -- Neural Rejuvenation
   if #nrs > 0 then
      local rp, rf, lam = {}, {}, {}
      for _, r in ipairs(nrs) do
         local x = xpos(r, ipe)
         local rparams = r.r_params or (r.r_before and r.r_before.params)
         local rflops = r.r_flops or (r.r_before and r.r_before.flops)
         if r.event ~= 'rejuvenate' then
            if rparams then rp[#rp + 1] = {x, rparams} end
            if rflops then rf[#rf + 1] = {x, rflops} end
            if r.lambda then lam[#lam + 1] = {x, r.lambda} end
         else
            if rparams then rp[#rp + 1] = {x, rparams} end
            if rflops then rf[#rf + 1] = {x, rflops} end
            if r.r_after then
               if r.r_after.params then rp[#rp + 1] = {x, r.r_after.params} end
               if r.r_after.flops then rf[#rf + 1] = {x, r.r_after.flops} end
            end
         end
      end
      add('<h2>Neural Rejuvenation</h2><div class="charts">')
      add(M.chart{title = 'Utilization r (live / all)', ylabel = 'r', xmin = 0, ymin = 0, ymax = 1, vlines = rej_lines, series = {
         {name = 'r (parameters)', points = rp, color = '#1f77b4', dots = true},
         {name = 'r (FLOPs)', points = rf, color = '#ff7f0e', dash = '5 3', dots = true},
      }})
      add(M.chart{title = 'Sparsity weight λ', ylabel = 'λ', xmin = 0, ymin = 0, vlines = rej_lines, series = {
         {name = 'λ', points = lam, color = '#9467bd', dots = true},
      }})
      add('</div>')
      for _, r in ipairs(nrs) do
         if r.event == 'rejuvenate' then
            local layers = {}
            for _, l in ipairs(list_of(r.layers)) do
               layers[#layers + 1] = {name = l.name or '?', before = l.width_before or l.before, live = l.live, after = l.width_after or l.after}
            end
            add(string.format('<h2>Rejuvenation %s — epoch %s, step %s</h2>', esc(r.index or ''), esc(r.epoch or '?'), esc(r.step or '?')))
            add('<table class="kv">')
            if r.r_before then kv('r before', esc(string.format('params %s, FLOPs %s', fnum(r.r_before.params), fnum(r.r_before.flops)))) end
            if r.r_after then kv('r after', esc(string.format('params %s, FLOPs %s', fnum(r.r_after.params), fnum(r.r_after.flops)))) end
            if r.cost then kv('cost', esc(string.format('%s (target %s, error %s)', fnum(r.cost), fnum(r.target_cost), fnum(r.cost_error)))) end
            if r.alpha then
               kv('expansion rate α', esc(fnum(r.alpha, 4) .. (r.alpha_sqrt and (' (the authors\' sqrt(cost / live cost) = '
                  .. fnum(r.alpha_sqrt, 4) .. ')') or '')))
            end
            if r.size_before and r.size_after then
               kv('cost counted by NR', esc(string.format('parameters %s → %s, FLOPs %s → %s', fnum(r.size_before.params),
                  fnum(r.size_after.params), fnum(r.size_before.flops), fnum(r.size_after.flops))))
            end
            if r.scheme then
               -- rescaled: the number of channels rescaled (0: none; older logs: a boolean)
               local n = r.rescaled
               kv('scheme', esc(r.scheme) .. ((n == true and ', rescaled') or (type(n) == 'number' and n > 0
                  and (', rescaled (' .. fnum(n) .. ' channels)')) or ''))
            end
            if type(r.policy_info) == 'table' then kv('reallocation info', '<code>' .. esc(ck.json_encode(r.policy_info)) .. '</code>') end
            add('</table>')
            if #layers > 0 then
               add(M.width_bars('Per-layer widths (channels)', layers))
               add('<table class="grid"><tr><th>layer</th><th>before</th><th>live</th><th>after</th></tr>')
               for _, l in ipairs(layers) do
                  add(string.format('<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>', esc(l.name), fnum(l.before), fnum(l.live), fnum(l.after)))
               end
               add('</table>')
            end
         end
      end
   end

   if run.recipe then
      add('<h2>Recipe (resolved)</h2><pre>' .. esc(ck.json_encode(run.recipe, true)) .. '</pre>')
   elseif run.bad_recipe then
      add('<p class="sub">recipe.json could not be read (damaged): the summary lacks its settings.</p>')
   end
   if run.bad_lines > 0 then
      add('<p class="sub">' .. run.bad_lines .. ' unreadable line(s) in metrics.jsonl were skipped.</p>')
   end
   add('</body></html>')
   return table.concat(h, '\n')
end

-- write(dir [, path]) -> path of the written report (default dir/report.html).
function M.write(dir, path)
   check.type(dir, 'string', 'nr.report.write', 'the run folder')
   if path ~= nil then check.type(path, 'string', 'nr.report.write', 'path') end
   dir = dir:gsub('/+$', '')
   path = path or (dir .. '/report.html')
   ck.write_atomic(path, M.render(dir))
   return path
end

return M

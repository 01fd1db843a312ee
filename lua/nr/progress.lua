-- nr.progress — what the trainer prints while it runs.
--
-- On a terminal: one progress bar redrawn in place (at most 10 times a second):
--   epoch 3/10 [==========>         ] 234/469 loss 0.3121 acc 88.74% 2461 img/s eta 0:09
-- Not on a terminal (a log file, a pipe, CI): plain lines, one every `every` steps and at the
-- end of each epoch, so logs stay readable and greppable:
--   epoch 3/10 step 200/469 loss 0.3121 acc 88.74% 2461 img/s eta 0:11
-- Epoch summaries and messages are always plain lines. What it is not: the metrics log
-- (metrics.jsonl, written by nr.train) — nothing here is parsed back.
local nrffi = require 'nr.ffi'
local ffi = nrffi.ffi

local M = {}

-- ---- clocks and terminals ----------------------------------------------------------------------

local ok_sys, system = pcall(require, 'system')
-- Wall-clock seconds from an arbitrary origin (monotonic when available).
function M.now()
   if ok_sys and system.monotime then return system.monotime() end
   if ok_sys and system.gettime then return system.gettime() end
   return os.time()
end

local isatty
do
   local declared = pcall(function() return ffi.C.isatty end)
   if not declared then declared = pcall(ffi.cdef, 'int isatty(int fd);') end
   if declared then isatty = function(fd) return ffi.C.isatty(fd) == 1 end end
end

-- True when stream (io.stdout / io.stderr) is a terminal. NR_PROGRESS=plain|tty forces it.
function M.is_tty(stream)
   local force = os.getenv('NR_PROGRESS')
   if force == 'plain' then return false elseif force == 'tty' then return true end
   if not isatty then return false end
   if stream == io.stdout then return isatty(1) elseif stream == io.stderr then return isatty(2) end
   return false
end

-- "1:02:03", "2:03", "0:07"
function M.format_duration(s)
   if s == nil or s ~= s or s == math.huge then return '?' end
   s = math.max(0, math.floor(s + 0.5))
   local h, m, sec = math.floor(s / 3600), math.floor(s % 3600 / 60), s % 60
   if h > 0 then return string.format('%d:%02d:%02d', h, m, sec) end
   return string.format('%d:%02d', m, sec)
end

-- ---- the bar ---------------------------------------------------------------------------------------

local Progress = {}
Progress.__index = Progress

-- Progress.new{stream = io.stdout, tty = nil (auto), every = 50, width = 24}
-- A stream that drops what is written: recipe.progress = false, and the ranks other than 0.
M.NULL_STREAM = {write = function() end, flush = function() end}

function M.new(opts)
   opts = opts or {}
   local stream = opts.stream or io.stdout
   local tty = opts.tty
   if tty == nil then tty = M.is_tty(stream) end
   return setmetatable({stream = stream, tty = tty, every = opts.every or 50, width = opts.width or 24,
                        last_draw = -math.huge, drawn = false}, Progress)
end

function Progress:write(s)
   self.stream:write(s)
   if self.stream.flush then self.stream:flush() end
end

-- Clears a bar that is on screen (before printing a plain line).
function Progress:clear()
   if self.tty and self.drawn then
      self:write('\r\27[K')
      self.drawn = false
   end
end

-- Prints a plain line (clearing the bar first on a terminal).
function Progress:line(text)
   self:clear()
   self:write(text .. '\n')
end

function Progress:begin_epoch(epoch, epochs, total)
   self.epoch, self.epochs, self.total = epoch, epochs, total
   self.t0 = M.now()
   self.last_draw = -math.huge
end

local function body(self, i, s)
   local parts = {}
   if s.loss then parts[#parts + 1] = string.format('loss %.4f', s.loss) end
   if s.acc then parts[#parts + 1] = string.format('acc %.2f%%', s.acc) end
   if s.ips then parts[#parts + 1] = string.format('%d img/s', math.floor(s.ips + 0.5)) end
   local elapsed = M.now() - self.t0
   local eta = i > 0 and self.total and elapsed / i * (self.total - i) or nil
   parts[#parts + 1] = 'eta ' .. M.format_duration(eta)
   return table.concat(parts, ' ')
end

-- Whether update(i) would print now (callers that read their numbers back from a GPU ask first).
function Progress:due(i)
   if self.tty then return i == self.total or M.now() - self.last_draw >= 0.1 end
   return i % self.every == 0 or i == self.total
end

-- Step i (1-based, within the epoch) is done; s = {loss =, acc = (percent), ips = images/s}.
function Progress:update(i, s)
   local total = self.total
   if not self:due(i) then return end
   if self.tty then
      self.last_draw = M.now()
      local frac = total and total > 0 and math.min(i / total, 1) or 0
      local filled = math.floor(frac * self.width)
      local bar = string.rep('=', filled) .. (filled < self.width and '>' or '') .. string.rep(' ', self.width - filled - 1)
      self:write(string.format('\r\27[Kepoch %d/%d [%s] %d/%s %s', self.epoch, self.epochs, bar, i,
         total and tostring(total) or '?', body(self, i, s)))
      self.drawn = true
   else
      self:write(string.format('epoch %d/%d step %d/%s %s\n', self.epoch, self.epochs, i,
         total and tostring(total) or '?', body(self, i, s)))
   end
end

function Progress:end_epoch(text)
   self:clear()
   if text then self:write(text .. '\n') end
end

M.Progress = Progress
return M

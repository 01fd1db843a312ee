-- The FFI contract: the C functions the Lua package calls are declared in core/nr.h's FFI block
-- and exported by libnr, and the header block is FFI-clean (no macros or includes inside).
local nrffi = require 'nr.ffi'

local function lua_files()
   local p = io.popen('find "' .. nrffi.home .. '/lua" "' .. nrffi.home .. '/models" -name "*.lua" 2>/dev/null')
   local files = {}
   for f in p:lines() do files[#files + 1] = f end
   p:close()
   return files
end

describe('FFI contract', function()
   local declared = nrffi.declared_functions()

   it('declares a reasonable number of functions', function()
      local n = 0
      for _ in pairs(declared) do n = n + 1 end
      assert.is_true(n > 40, 'only ' .. n .. ' functions found in the FFI block')
   end)

   it('declares every nr_* function that Lua code calls through C.', function()
      local missing = {}
      for _, f in ipairs(lua_files()) do
         local fh = io.open(f)
         local src = fh:read('*a')
         fh:close()
         for name in src:gmatch('C%.(nr_[%w_]+)') do
            if not declared[name] and not name:match('^NR_') then missing[#missing + 1] = name .. ' (' .. f .. ')' end
         end
      end
      assert.are.same({}, missing)
   end)

   it('finds every declared function in the library it belongs to', function()
      local unresolved = {}
      for name in pairs(declared) do
         if not name:match('^nr_dist_') then -- libnr_dist is loaded separately (nr.dist)
            local ok = pcall(function() return nrffi.C[name] end)
            if not ok then unresolved[#unresolved + 1] = name end
         end
      end
      table.sort(unresolved)
      assert.are.same({}, unresolved)
   end)

   it('keeps the CUDA switches (TF32, deterministic convolutions) with or without a GPU', function()
      local cuda = require 'nr.cuda'
      for _, on in ipairs({true, false}) do
         cuda.set_allow_tf32(on); assert.equal(on and cuda.built(), cuda.allow_tf32())
         cuda.set_deterministic(on); assert.equal(on and cuda.built(), cuda.deterministic())
      end
      -- found by fuzzing: a table reached the FFI as "cannot convert 'table' to 'int64_t'"
      for _, bad in ipairs({{}, 'x', 0 / 0, 1.5, -1}) do
         local ok, err = pcall(cuda.set_conv_max_elements, bad)
         assert.is_false(ok)
         assert.truthy(tostring(err):find('nr.cuda.set_conv_max_elements: n must be a non-negative integer', 1, true), err)
      end
      cuda.set_conv_max_elements(nil)
      assert.equal(2 ^ 31 - 1, cuda.conv_max_elements())
   end)

   it('keeps the FFI block free of preprocessor lines', function()
      for line in nrffi.cdef_text:gmatch('[^\n]+') do
         assert.is_nil(line:match('^%s*#'), 'preprocessor line in FFI block: ' .. line)
      end
   end)
end)

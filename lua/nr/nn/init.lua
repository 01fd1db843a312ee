-- nr.nn — layers and containers. Each file returns a table of classes that is merged here;
-- the classes follow nr.nn.Module's contract (lua/nr/nn/module.lua); loss.lua also gives the
-- function check_class_ids.
local nn = {}
nn.Module = require 'nr.nn.module'

-- Files under lua/nr/nn/, merged in this order.
local FILES = {'containers', 'conv', 'batchnorm', 'activation', 'softmax', 'pool', 'linear', 'loss', 'dropout', 'flatten',
               'nr_conv'}

for _, f in ipairs(FILES) do
   for name, cls in pairs(require('nr.nn.' .. f)) do
      assert(nn[name] == nil, 'nr.nn: duplicate class ' .. name)
      nn[name] = cls
   end
end

return nn

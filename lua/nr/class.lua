-- nr.class — a minimal class system: class(name [, parent]) returns a class table; calling the
-- class constructs an instance and runs __init. Instances carry __typename for printing and
-- findModules. Metamethods (__tostring, __call) are inherited from the parent.
local function class(name, parent)
   local cls = {}
   cls.__typename = name
   cls.__index = cls
   if parent then
      for _, mm in ipairs({'__tostring', '__call', '__add', '__sub', '__mul', '__len'}) do
         if rawget(cls, mm) == nil and parent[mm] then cls[mm] = parent[mm] end
      end
   end
   cls.__parent = parent
   setmetatable(cls, {
      __index = parent,
      __call = function(c, ...)
         local obj = setmetatable({}, c)
         if c.__init then c.__init(obj, ...) end
         return obj
      end,
   })
   -- metamethods defined later on the class must be visible to instances: __index is the class,
   -- and Lua looks metamethods up with rawget on the metatable, so copy on definition instead
   return cls
end

return class

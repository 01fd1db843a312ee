-- luacheck configuration (Debian's lua-check): `luacheck lua models recipes tools bench tests`
std = 'luajit'
globals = {'_NRLUA'}
read_globals = {'describe', 'it', 'before_each', 'after_each', 'setup', 'teardown', 'pending',
                'assert', 'spy', 'stub', 'mock', 'finally', 'insulate', 'expose', 'lazy_setup', 'strict_setup'}
max_line_length = 170
unused_args = false
ignore = {'211/_.*', '212', '213', '311', '542'}
files['tests/run_busted.lua'] = {globals = {'arg'}}
files['lua/nr/cli.lua'] = {read_globals = {'nr'}}
files['tests/lua/cli_spec.lua'] = {globals = {'nr'}}
files['tests/lua/torch_parity_spec.lua'] = {ignore = {'581'}} -- not (x <= y) also catches NaN

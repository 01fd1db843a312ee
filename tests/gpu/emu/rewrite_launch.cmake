# rewrite_launch.cmake — turns a .cu file into C++ for the CUDA emulator (tests/gpu/emu/):
#   cmake -DIN=core/cuda/x.cu -DOUT=build/emu/x.cpp -P rewrite_launch.cmake
# Each launch `name<args><<<config>>>(` becomes `nr_emu::Launch("name<args>", config).run(name<args>, `;
# the launch's own closing parenthesis then closes run(. A #line directive keeps compiler
# messages pointing at the .cu file. Fails when a `<<<` is left over (a launch form it missed).
file(READ "${IN}" src)
set(name "[A-Za-z_][A-Za-z_0-9]*(<[^<>;()]*>)?")
set(config "([^>]|>[^>]|>>[^>])*")
string(REGEX REPLACE "(${name})<<<(${config})>>>\\(" "nr_emu::Launch(\"\\1\", \\3).run(\\1, " out "${src}")
string(FIND "${out}" "<<<" left)
if(NOT left EQUAL -1)
  message(FATAL_ERROR "rewrite_launch: a kernel launch in ${IN} was not rewritten")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${out}")
file(RENAME "${OUT}.tmp" "${OUT}")

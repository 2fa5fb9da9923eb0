# The interpreter the host embeds: the one building us (scikit-build-core passes Python_EXECUTABLE),
# or the first python3 on PATH for a plain CMake build.
find_package(Python 3.11 REQUIRED COMPONENTS Interpreter Development.Embed)
message(STATUS "pyagent-host embeds ${Python_EXECUTABLE} (${Python_VERSION}), libs ${Python_LIBRARIES}")

# Every C file builds warning-free with -Wall -Wextra; CI's test build adds -Werror.
add_compile_options(-Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter)
if(PYAGENT_WERROR)
  add_compile_options(-Werror)
endif()

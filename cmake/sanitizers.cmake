# ASan + UBSan for the test build (PYAGENT_SANITIZE=ON); never for release builds.
if(PYAGENT_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()

# jansson parses frames in C (heartbeats, protocol checks). Debian libjansson-dev.
find_package(PkgConfig REQUIRED)
pkg_check_modules(JANSSON REQUIRED IMPORTED_TARGET jansson)

# libuv from the system (Debian libuv1-dev). Release builds may link it statically later (DESIGN §2, uvloop note).
find_package(PkgConfig REQUIRED)
pkg_check_modules(LIBUV REQUIRED IMPORTED_TARGET libuv)

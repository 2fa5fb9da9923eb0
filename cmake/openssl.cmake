# OpenSSL 3 for TLS (memory BIOs) in the host.
find_package(OpenSSL 1.1.1 REQUIRED)

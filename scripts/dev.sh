#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine: install what pyagent needs, build it into .venv, then
#   scripts/dev.sh demo   run the demo (endpoint + agent + hello bundle)
#   scripts/dev.sh test   run every test: C unit tests (sanitizer build) and the Python suite against the real host
#   scripts/dev.sh setup  only install and build
# Safe to run again: apt and pip skip what is already there, the CMake build dirs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv

APT_PACKAGES=(gcc make cmake pkg-config git openssl libuv1-dev libssl-dev libjansson-dev python3 python3-dev python3-venv libcurl4 dpkg-dev debootstrap rpm wixl clang libclang-rt-14-dev)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_system_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python_packages() {
    # Debian's interpreter on purpose: the host links its libpython, as the .deb will.
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating $VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    echo "setup: building pyagent and pyagent-host into $VENV"
    # (pip's notes about unused local index locations on some machines are noise: filtered, errors still show)
    "$VENV/bin/python" -m pip install -q "$ROOT[test]" 2> >(grep -v "^WARNING: Location" >&2)
}

setup() {
    install_system_packages
    install_python_packages
}

run_c_tests() {
    local build=$ROOT/build/ctest
    cmake -S "$ROOT" -B "$build" -DPYAGENT_TESTS=ON -DPYAGENT_SANITIZE=ON -DPYAGENT_WERROR=ON \
        -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE="$VENV/bin/python" >/dev/null
    cmake --build "$build" -j"$(nproc)" >/dev/null
    ctest --test-dir "$build" --output-on-failure
}

run_fuzz() {
    # libFuzzer targets (tests/fuzz): clang + compiler-rt, each run for PYAGENT_FUZZ_SECONDS (20) from the committed corpus.
    local build=$ROOT/build/fuzz
    CC=clang cmake -S "$ROOT" -B "$build" -DPYAGENT_FUZZ=ON -DPYAGENT_FUZZ_SECONDS="${PYAGENT_FUZZ_SECONDS:-20}" \
        -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE="$VENV/bin/python" >/dev/null
    cmake --build "$build" --target pa-fuzz -j"$(nproc)" >/dev/null
    ctest --test-dir "$build" --output-on-failure
}

run_type_check() {
    echo "mypy --strict -p pyagent"
    (cd "$ROOT" && "$VENV/bin/mypy" --strict --cache-dir "$ROOT/build/mypy" -p pyagent)
}

run_python_tests() {
    PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; "$VENV/bin/pyagent" demo "$@" ;;
    test) setup; run_c_tests; run_fuzz; run_type_check; run_python_tests "$@" ;;
    *) echo "usage: scripts/dev.sh setup|demo|test" >&2; exit 2 ;;
esac

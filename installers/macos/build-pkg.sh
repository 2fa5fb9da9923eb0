#!/bin/sh
# Build pyagent.pkg on macOS (pkgbuild ships with Xcode's command line tools).
#   installers/macos/build-pkg.sh VERSION STAGE OUT.pkg
# STAGE holds bin/pyagent-host, python/, bundles/, agent.toml and ca.pem (what `pyagent package` stages on Linux).
set -eu
version=$1 stage=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -d "$root/usr/local/pyagent" "$root/Library/Application Support/pyagent" "$root/Library/LaunchDaemons"
cp -R "$stage/bin" "$stage/python" "$stage/bundles" "$root/usr/local/pyagent/"
cp "$stage/agent.toml" "$root/Library/Application Support/pyagent/agent.toml.new"
cp "$stage/ca.pem" "$root/Library/Application Support/pyagent/ca.pem"
cp "$here/com.pyagent.agent.plist" "$root/Library/LaunchDaemons/"
pkgbuild --root "$root" --scripts "$here/scripts" --identifier com.pyagent.agent --version "$version" \
    --install-location / "$out"

#!/bin/sh
# Builds the `bootstrap` binary and assembles the deployable directory dist/ = {bootstrap, function.yaml}.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
# Stripped and without debug info: a small binary is a fast cold start.
(cd "$root" && CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release -p provided-hello)
rm -rf "$here/dist"
mkdir -p "$here/dist"
cp "$target/release/bootstrap" "$here/dist/bootstrap"
chmod 0755 "$here/dist/bootstrap"
cp "$here/function.yaml" "$here/dist/function.yaml"
echo "assembled $here/dist"

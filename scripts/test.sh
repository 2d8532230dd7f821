#!/usr/bin/env bash
# Runs every test: host set-up, the runtime bootstrap tests, then the Rust workspace tests
# (unit tests, the sandbox suite and the black-box e2e suite against the real binary).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Test fixtures with third-party dependencies (cached: skipped when already vendored).
tests/fixtures/fx-ric-python/vendor.sh
scripts/build-wasm-guests.sh   # wasi:http guests: WAT, componentize-py, componentize-js
python3 runtimes/tests/test_bootstraps.py
cargo test --workspace --all-targets -- --test-threads=2

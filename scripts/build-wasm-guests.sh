#!/usr/bin/env bash
# Builds Skiff's WebAssembly guest fixtures (wasi:http/proxy components):
#
#   OUT_DIR/hello-http.wasm  hand-written WAT   (tests/fixtures/wasm/hello-http/hello.wat)
#   OUT_DIR/echo-http.wasm   hand-written WAT   (tests/fixtures/wasm/echo-http/echo.wat)
#   OUT_DIR/py-http.wasm     componentize-py    (tests/fixtures/wasm/py-http/app.py)
#   OUT_DIR/js-http.wasm     componentize-js    (tests/fixtures/wasm/js-http/app.js)
#
# usage: scripts/build-wasm-guests.sh [OUT_DIR]      (default: target/wasm-guests)
#
# Every guest is cached under OUT_DIR/cache/ by a hash of its inputs (sources,
# vendored WIT, tool versions, build recipe), so a second run only copies.
# Tools are installed on demand under OUT_DIR/tools/ (pip --target for
# componentize-py, npm ci for componentize-js); the `wasm-guests` Rust tool is
# built with cargo (debug profile, honours CARGO_TARGET_DIR) only when a WAT guest needs it.
# Each built component is checked to export wasi:http/incoming-handler@0.2.x.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/target/wasm-guests}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
CACHE="$OUT/cache"
TOOLS="$OUT/tools"
FIX="$ROOT/tests/fixtures/wasm"
WIT="$FIX/wit"
WORLD="wasi:http/proxy@0.2.12"
COMPONENTIZE_PY_VERSION="0.25.1"
# componentize-js (StarlingMonkey) hard-codes wasi:http 0.2.10 in its engine,
# so the JS guest is built against a 0.2.10 copy derived from the vendored WIT.
JS_WORLD="wasi:http/proxy@0.2.10"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$PWD/$TARGET_DIR"   # cargo runs from $ROOT
# Debug profile: compiles ~2x faster than release and the tool only does
# milliseconds of work per guest.
WASM_GUESTS_BIN="$TARGET_DIR/debug/wasm-guests"
mkdir -p "$CACHE" "$TOOLS"

log() { echo "build-wasm-guests: $*" >&2; }

hash_stream() { sha256sum | cut -c1-16; }

# Hash of files/dirs (paths relative to $ROOT are hashed too) plus extra strings.
hash_inputs() {
  local -a files=()
  local -a extra=()
  local a
  for a in "$@"; do
    if [[ -d "$a" ]]; then
      while IFS= read -r f; do files+=("$f"); done \
        < <(find "$a" -type f ! -path '*/__pycache__/*' | LC_ALL=C sort)
    elif [[ -f "$a" ]]; then
      files+=("$a")
    else
      extra+=("$a")
    fi
  done
  {
    local f
    for f in "${files[@]}"; do
      printf 'file %s\n' "${f#"$ROOT"/}"
      sha256sum < "$f"
    done
    printf 'extra %s\n' "${extra[@]}"
  } | hash_stream
}

# --- tools -------------------------------------------------------------------

TOOL_BUILT=0
ensure_wasm_guests_tool() {
  [[ $TOOL_BUILT == 1 ]] && return
  log "cargo build -p wasm-guests (CARGO_TARGET_DIR=$TARGET_DIR)"
  (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --quiet -p wasm-guests >&2)
  TOOL_BUILT=1
}

# Versions of the crates that decide the WAT guests' bytes (from Cargo.lock).
wat_toolchain_id() {
  awk '/^\[\[package\]\]/{n=""} /^name = /{n=$3} /^version = /{
         if (n ~ /^"(wit-component|wit-parser|wat|wast|wasm-encoder|wasmparser|wasm-metadata)"$/) print n, $3 }' \
    "$ROOT/Cargo.lock" | LC_ALL=C sort
}

PY_DIR="$TOOLS/py"
componentize_py() {
  PYTHONPATH="$PY_DIR${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    'import sys; from componentize_py import script; sys.argv[0] = "componentize-py"; sys.exit(script())' "$@"
}
ensure_componentize_py() {
  if [[ -d "$PY_DIR/componentize_py" ]] &&
     [[ "$(componentize_py --version 2>/dev/null)" == "componentize-py $COMPONENTIZE_PY_VERSION" ]]; then
    return
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    log "pip missing: trying ensurepip, then apt-get install python3-pip"
    python3 -m ensurepip --upgrade >&2 2>&1 ||
      { apt-get update >&2 && apt-get install -y python3-pip >&2; }
  fi
  log "installing componentize-py==$COMPONENTIZE_PY_VERSION into $PY_DIR"
  rm -rf "$PY_DIR"
  # --target skips the PEP 668 externally-managed check, so this works with a
  # Debian system python too.
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$PY_DIR" "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
  [[ "$(componentize_py --version)" == "componentize-py $COMPONENTIZE_PY_VERSION" ]]
}

JS_DIR="$TOOLS/js"
JS_LOCK="$ROOT/tools/wasm-guests/package-lock.json"
ensure_componentize_js() {
  local want
  want="$(hash_inputs "$ROOT/tools/wasm-guests/package.json" "$JS_LOCK")"
  if [[ -x "$JS_DIR/node_modules/.bin/componentize-js" && "$(cat "$JS_DIR/.stamp" 2>/dev/null)" == "$want" ]]; then
    return
  fi
  command -v npm >/dev/null || { log "npm is required for the js-http guest"; exit 1; }
  log "npm ci componentize-js into $JS_DIR"
  mkdir -p "$JS_DIR"
  cp "$ROOT/tools/wasm-guests/package.json" "$JS_LOCK" "$JS_DIR/"
  npm ci --prefix "$JS_DIR" --no-audit --no-fund --loglevel=error >&2
  echo "$want" > "$JS_DIR/.stamp"
}

# The JS guest's WIT: the vendored 0.2.12 WIT relabelled as 0.2.10 (the one
# item @since 0.2.12 in these files, wasi:cli/exit.exit-with-code, becomes
# @unstable as it was in 0.2.10; the proxy world does not use it).
make_js_wit() {
  local dst="$1"
  rm -rf "$dst"
  cp -r "$WIT" "$dst"
  find "$dst" -name '*.wit' -exec sed -i \
    -e 's/@0\.2\.12/@0.2.10/g' \
    -e 's/^\([[:space:]]*\)@since(version = 0\.2\.12)/\1@unstable(feature = cli-exit-with-code)/' {} +
  if grep -rq '0\.2\.1[12]' "$dst"; then
    log "derived 0.2.10 WIT still mentions 0.2.11/0.2.12:"; grep -rn '0\.2\.1[12]' "$dst" >&2; exit 1
  fi
}

# --- guests ------------------------------------------------------------------

check_exports() {
  local wasm="$1" want="$2"
  ensure_wasm_guests_tool
  if ! "$WASM_GUESTS_BIN" exports "$wasm" | grep -qx "$want"; then
    log "$wasm does not export $want; exports are:"
    "$WASM_GUESTS_BIN" exports "$wasm" >&2
    exit 1
  fi
}

now() { date +%s.%N; }

# build_guest NAME HASH BUILD_FN  -- BUILD_FN writes $tmp
build_guest() {
  local name="$1" hash="$2" fn="$3" export_re="$4"
  local cached="$CACHE/$name-$hash.wasm" status t0 t1
  t0="$(now)"
  if [[ -f "$cached" ]]; then
    status=cached
  else
    local tmp="$CACHE/.$name-$hash.tmp.wasm"
    rm -f "$tmp"
    "$fn" "$tmp"
    check_exports "$tmp" "$export_re"
    # drop older cache entries of this guest, keep the new one
    rm -f "$CACHE/$name"-*.wasm
    mv "$tmp" "$cached"
    status=built
  fi
  cmp -s "$cached" "$OUT/$name.wasm" 2>/dev/null || cp "$cached" "$OUT/$name.wasm"
  t1="$(now)"
  printf '%-10s %-6s %10d bytes  %6.1fs  %s\n' "$name" "$status" \
    "$(stat -c %s "$OUT/$name.wasm")" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$OUT/$name.wasm"
}

build_wat() {
  local src="$1" out="$2"
  ensure_wasm_guests_tool
  "$WASM_GUESTS_BIN" component --wit "$WIT" --world "$WORLD" "$src" -o "$out"
}
build_hello() { build_wat "$FIX/hello-http/hello.wat" "$1"; }
build_echo() { build_wat "$FIX/echo-http/echo.wat" "$1"; }

build_py() {
  ensure_componentize_py
  (cd "$FIX/py-http" &&
    componentize_py --quiet -d "$WIT" -w "$WORLD" componentize app -o "$1" >&2)
}

build_js() {
  ensure_componentize_js
  local wit="$CACHE/.js-wit-0.2.10"
  make_js_wit "$wit"
  (cd "$FIX/js-http" &&
    "$JS_DIR/node_modules/.bin/componentize-js" app.js \
      --wit "$wit" --world-name "$JS_WORLD" -o "$1" >&2)
  rm -rf "$wit"
}

WAT_TOOL_ID="$(wat_toolchain_id | tr '\n' ' ')"
WAT_TOOL_SRC=("$ROOT/tools/wasm-guests/src" "$ROOT/tools/wasm-guests/Cargo.toml")
EXPORT='wasi:http/incoming-handler@0\.2\.[0-9]*'

build_guest hello-http \
  "$(hash_inputs "$FIX/hello-http/hello.wat" "$WIT" "${WAT_TOOL_SRC[@]}" "$WAT_TOOL_ID" "world=$WORLD" wat-recipe-1)" \
  build_hello "$EXPORT"
build_guest echo-http \
  "$(hash_inputs "$FIX/echo-http/echo.wat" "$WIT" "${WAT_TOOL_SRC[@]}" "$WAT_TOOL_ID" "world=$WORLD" wat-recipe-1)" \
  build_echo "$EXPORT"
build_guest py-http \
  "$(hash_inputs "$FIX/py-http" "$WIT" "componentize-py==$COMPONENTIZE_PY_VERSION" "world=$WORLD" py-recipe-1)" \
  build_py "$EXPORT"
build_guest js-http \
  "$(hash_inputs "$FIX/js-http" "$WIT" "$JS_LOCK" "world=$JS_WORLD" js-recipe-1)" \
  build_js "$EXPORT"

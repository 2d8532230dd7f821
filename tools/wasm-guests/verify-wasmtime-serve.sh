#!/usr/bin/env bash
# Smoke-tests the built guests under `wasmtime serve` (reference behaviour for
# Skiff's Wasm tier). Needs a wasmtime CLI (48.x) and curl.
#
# usage: tools/wasm-guests/verify-wasmtime-serve.sh [GUEST_DIR] [WASMTIME]
#   GUEST_DIR defaults to target/wasm-guests (output of scripts/build-wasm-guests.sh)
#   WASMTIME  defaults to $WASMTIME or `wasmtime` on PATH
#
# Only loopback addresses are used. Prints one line per check and
# "N passed, N failed" at the end; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
G="${1:-$ROOT/target/wasm-guests}"
WASMTIME="${2:-${WASMTIME:-wasmtime}}"
BASE_PORT="${VERIFY_BASE_PORT:-18300}"
TMP="$(mktemp -d)"
PIDS=()
PASS=0
FAIL=0

cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

check() { # check NAME EXPECTED ACTUAL
  if [[ "$2" == "$3" ]]; then
    PASS=$((PASS + 1)); printf 'ok    %s\n' "$1"
  else
    FAIL=$((FAIL + 1)); printf 'FAIL  %s\n      expected: %q\n      actual:   %q\n' "$1" "$2" "$3"
  fi
}

serve() { # serve PORT WASM [extra wasmtime args...]; logs to $TMP/PORT.log
  local port="$1" wasm="$2"; shift 2
  "$WASMTIME" serve -Scli -Shttp "$@" --addr "127.0.0.1:$port" "$wasm" >"$TMP/$port.log" 2>&1 &
  PIDS+=("$!")
  local i
  for i in $(seq 1 1200); do   # up to 120 s: py-http takes ~25 s to compile under load
    if grep -q "Serving HTTP" "$TMP/$port.log" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "wasmtime serve on port $port did not start:"; cat "$TMP/$port.log"; return 1
}

# req URL [curl args...] -> "STATUS BODY"
req() { local url="$1"; shift; curl -sS --max-time 20 -o "$TMP/body" -w '%{http_code}' "$@" "$url" 2>/dev/null > "$TMP/code" || true; echo "$(cat "$TMP/code") $(cat "$TMP/body" 2>/dev/null)"; }

# --- upstream for /fetch --------------------------------------------------------
mkdir -p "$TMP/www" && printf 'upstream says hi\n' > "$TMP/www/upstream.txt"
UP=$((BASE_PORT + 9))
(cd "$TMP/www" && exec python3 -m http.server --bind 127.0.0.1 "$UP" >"$TMP/upstream.log" 2>&1) &
PIDS+=("$!")
head -c 1000000 /dev/urandom > "$TMP/rand.bin"

# --- hello-http -----------------------------------------------------------------
P=$((BASE_PORT + 1)); serve "$P" "$G/hello-http.wasm"
check "hello GET /" "200 hello from wasm" "$(req "http://127.0.0.1:$P/")"
check "hello content-type" "text/plain" "$(curl -sS -D - -o /dev/null "http://127.0.0.1:$P/" | tr -d '\r' | awk -F': ' 'tolower($1)=="content-type"{print $2}')"
ok=0; for i in $(seq 1 50); do [[ "$(curl -sS "http://127.0.0.1:$P/x$i")" == "hello from wasm" ]] && ok=$((ok + 1)); done
check "hello 50 sequential requests" 50 "$ok"

# --- echo-http ------------------------------------------------------------------
P=$((BASE_PORT + 2)); serve "$P" "$G/echo-http.wasm"
check "echo POST json" '200 {"event":1}' "$(req "http://127.0.0.1:$P/" -X POST -H 'content-type: application/json' --data-binary '{"event":1}')"
hdrs="$(curl -sS -D - -o /dev/null -X POST --data-binary x "http://127.0.0.1:$P/" | tr -d '\r')"
check "echo content-type" "application/json" "$(awk -F': ' 'tolower($1)=="content-type"{print $2}' <<<"$hdrs")"
check "echo x-echo-method POST" "POST" "$(awk -F': ' 'tolower($1)=="x-echo-method"{print $2}' <<<"$hdrs")"
check "echo x-echo-method custom" "FROB" "$(curl -sS -D - -o /dev/null -X FROB "http://127.0.0.1:$P/" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-echo-method"{print $2}')"
check "echo empty body" "200 " "$(req "http://127.0.0.1:$P/")"
curl -sS --max-time 20 -X PUT --data-binary @"$TMP/rand.bin" -o "$TMP/rand.out" "http://127.0.0.1:$P/"
check "echo 1 MB binary round trip" same "$(cmp -s "$TMP/rand.bin" "$TMP/rand.out" && echo same || echo differs)"

# --- py-http --------------------------------------------------------------------
P=$((BASE_PORT + 3)); serve "$P" "$G/py-http.wasm" --env SKIFF_TEST_VAR=hello-env -Wtimeout=5s
U="http://127.0.0.1:$P"
check "py /" "200 hello from python" "$(req "$U/")"
check "py /hello" "200 hello from python" "$(req "$U/hello")"
check "py /echo" '200 {"k":"v"}' "$(req "$U/echo" -X POST -H 'content-type: application/json' --data-binary '{"k":"v"}')"
curl -sS --max-time 20 -X POST --data-binary @"$TMP/rand.bin" -o "$TMP/rand.out" "$U/echo"
check "py /echo 1 MB binary" same "$(cmp -s "$TMP/rand.bin" "$TMP/rand.out" && echo same || echo differs)"
check "py /env set" "200 hello-env" "$(req "$U/env?name=SKIFF_TEST_VAR")"
check "py /env unset" "404 unset" "$(req "$U/env?name=SKIFF_NOT_SET")"
r="$(req "$U/read?path=/etc/hostname")"; echo "      /read -> $r"
check "py /read fails without preopens (500)" 500 "${r%% *}"
r="$(req "$U/fetch?url=http://127.0.0.1:$UP/upstream.txt")"
check "py /fetch local upstream" "$(printf '200 200\nupstream says hi')" "$r"
r="$(req "$U/fetch?url=http://127.0.0.1:1/")"; echo "      /fetch closed port -> $r"
check "py /fetch closed port (502)" 502 "${r%% *}"
check "py /alloc?mb=64" "200 ok" "$(req "$U/alloc?mb=64")"
check "py /nope" "404 not found" "$(req "$U/nope")"
r="$(req "$U/trap")"; echo "      /trap -> $r"
check "py /trap is not a 200" yes "$([[ "${r%% *}" != 200 ]] && echo yes || echo no)"
check "py still serves after /trap" "200 hello from python" "$(req "$U/")"
t0=$(date +%s); r="$(req "$U/spin")"; t1=$(date +%s); echo "      /spin -> ${r:0:80} after $((t1 - t0))s (-Wtimeout=5s)"
check "py /spin is cut off by -Wtimeout" yes "$([[ "${r%% *}" != 200 && $((t1 - t0)) -le 15 ]] && echo yes || echo no)"
check "py still serves after /spin" "200 hello from python" "$(req "$U/")"
echo "      wasmtime serve stderr (py, last lines):"; tail -n 12 "$TMP/$P.log" | sed 's/^/        /'

# --- js-http --------------------------------------------------------------------
P=$((BASE_PORT + 4)); serve "$P" "$G/js-http.wasm"
U="http://127.0.0.1:$P"
check "js /" "200 hello from js" "$(req "$U/")"
check "js /echo" "200 js body" "$(req "$U/echo" -X POST --data-binary 'js body')"
check "js / again" "200 hello from js" "$(req "$U/again")"
check "js /echo again" '200 {"n":2}' "$(req "$U/echo" -X POST -H 'content-type: application/json' --data-binary '{"n":2}')"

echo "$PASS passed, $FAIL failed"
[[ $FAIL == 0 ]]

#!/usr/bin/env bash
# Hello-world wasi:http throughput: Skiff's gateway against `wasmtime serve` (wasmtime-cli
# 48.0.8, the Wasmtime Skiff embeds) on the same component, same machine, same load
# generator (wrk over loopback), rounds interleaved in one run. Not part of CI.
#
# Usage: bench/wasm-serve.sh [--duration 10s] [--connections 32] [--rounds 3]
# Installs wrk (apt) and wasmtime-cli (cargo install --locked, ~10 min once) if missing;
# WASMTIME=/path/to/wasmtime skips the install.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
duration=10s connections=32 rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
tools=${SKIFF_BENCH_TOOLS:-$HOME/.cache/skiff-bench}
wasmtime=${WASMTIME:-$tools/bin/wasmtime}
if [ ! -x "$wasmtime" ]; then
  echo "installing wasmtime-cli 48.0.8 into $tools (once)..." >&2
  cargo install --locked --quiet wasmtime-cli --version 48.0.8 --root "$tools"
fi
"$wasmtime" --version | grep -q '^wasmtime 48.0.8' || { echo "need wasmtime 48.0.8, have: $("$wasmtime" --version)" >&2; exit 1; }

cargo build --release -q -p skiff-cli
scripts/build-wasm-guests.sh >/dev/null
guest=${CARGO_TARGET_DIR:-target}/wasm-guests/hello-http.wasm
skiff=${CARGO_TARGET_DIR:-$root/target}/release/skiff

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_http() { for _ in $(seq 200); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }

# wasmtime serve: its defaults (a fresh instance per request), stdio inherited to /dev/null.
"$wasmtime" serve -Scli --addr 127.0.0.1:18091 "$guest" >"$work/wasmtime.log" 2>&1 &
pids+=($!)
wait_http http://127.0.0.1:18091/

# Skiff: the same component as a function, served on /fn/hello-http/.
mkdir -p "$work/fn" "$work/data"
cp "$guest" "$work/fn/hello.wasm"
printf 'name: hello-http\nruntime: wasm\nhandler: hello.wasm\nconcurrency: 1000\n' >"$work/fn/function.yaml"
"$skiff" serve --data-dir "$work/data" --listen 127.0.0.1:18092 >"$work/skiff.log" 2>&1 &
pids+=($!)
wait_http http://127.0.0.1:18092/health
SKIFF_SERVER=http://127.0.0.1:18092 "$skiff" deploy "$work/fn" >/dev/null
wait_http http://127.0.0.1:18092/fn/hello-http/
[ "$(curl -fsS http://127.0.0.1:18092/fn/hello-http/)" = "$(curl -fsS http://127.0.0.1:18091/)" ] || { echo "the two servers answer differently" >&2; exit 1; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load: wrk -t1 -c$connections -d$duration --latency, $rounds interleaved rounds each"
run() { # name url -> "rps p50 p99"
  wrk -t1 -c"$connections" -d"$duration" --latency "$2" >"$work/wrk.out"
  local rps p50 p99 errs
  rps=$(awk '/^Requests\/sec/{print $2}' "$work/wrk.out")
  p50=$(awk '$1=="50%"{print $2}' "$work/wrk.out")
  p99=$(awk '$1=="99%"{print $2}' "$work/wrk.out")
  errs=$(awk '/Non-2xx|Socket errors/{print}' "$work/wrk.out" | tr '\n' ' ')
  printf '%-14s %10s req/s   p50 %-9s p99 %-9s %s\n' "$1" "$rps" "$p50" "$p99" "$errs"
  echo "$1 $rps" >>"$work/rps"
}
# Warm both up (first-request compilation/instantiation, connection setup).
wrk -t1 -c"$connections" -d2s http://127.0.0.1:18091/ >/dev/null
wrk -t1 -c"$connections" -d2s http://127.0.0.1:18092/fn/hello-http/ >/dev/null
for r in $(seq "$rounds"); do
  run "wasmtime-serve" http://127.0.0.1:18091/
  run "skiff" http://127.0.0.1:18092/fn/hello-http/
done
python3 - "$work/rps" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {n: statistics.median(float(r) for m, r in rows if m == n) for n in ("wasmtime-serve", "skiff")}
print(f"median req/s: wasmtime serve {med['wasmtime-serve']:.0f}, skiff {med['skiff']:.0f}; "
      f"skiff / wasmtime serve = {med['skiff'] / med['wasmtime-serve']:.2f}x")
EOF

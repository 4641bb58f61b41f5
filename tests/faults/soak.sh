#!/usr/bin/env bash
# The soak of docs/security-testing.md: the release server on a fresh PostgreSQL database under a fixed mixed load
# (per cycle one Observation create, two reads, one search; `examples/load.rs soak`) for MINUTES minutes, sampling
# the server's RSS and the p99 latency every SAMPLE_SECS seconds. Passes when no request failed and RSS and p99
# stayed flat (the last sample within RSS_GROWTH_PCT / P99_GROWTH_X of the second: the first sample includes the
# warm-up). Not run in CI (10 minutes + a release build).
#
#   bash tests/faults/soak.sh                       # MINUTES=10 RATE=100 CONC=8 PATIENTS=100
#   MINUTES=1 SAMPLE_SECS=10 bash tests/faults/soak.sh   # a quick check
#
# Needs: PostgreSQL at $PG_ADMIN_URL (a role that may create databases), psql, curl, python3.
# BIN=/path/to/release/carevault LOAD=/path/to/release/examples/load skip the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
MINUTES="${MINUTES:-10}"
SAMPLE_SECS="${SAMPLE_SECS:-60}"
RATE="${RATE:-100}"
CONC="${CONC:-8}"
PATIENTS="${PATIENTS:-100}"
PORT="${PORT:-18643}"
RSS_GROWTH_PCT="${RSS_GROWTH_PCT:-25}"
P99_GROWTH_X="${P99_GROWTH_X:-3}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$ROOT/tests/faults/results}"

if [ -z "${BIN:-}" ] || [ -z "${LOAD:-}" ]; then
  echo "::: build (release)"
  cargo build --release --locked --bin carevault --example load
  BIN="$TARGET/release/carevault"
  LOAD="$TARGET/release/examples/load"
fi
WORK="$(mktemp -d)"
cp "$BIN" "$WORK/carevault"
cp "$LOAD" "$WORK/load"
DB="carevault_soak_$$"
DB_URL="${PG_ADMIN_URL%/*}/$DB"
SERVER_PID=""
cleanup() {
  set +e
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $DB" >/dev/null
mkdir -p "$OUT" "$WORK/data"
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$WORK/password"
# One load client from one address: the per-address limit (1,000 req/s) is far above RATE and stays on.
printf 'database_url = "%s"\n' "$DB_URL" >"$WORK/soak.toml"
cv() { "$WORK/carevault" --data-dir "$WORK/data" --config "$WORK/soak.toml" "$@"; }

# Started directly (not through the `cv` function), so that $! is the server's own pid: its RSS is sampled.
"$WORK/carevault" --data-dir "$WORK/data" --config "$WORK/soak.toml" serve --listen "127.0.0.1:$PORT" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
  if [ -f "$WORK/data/tls/cert.pem" ] &&
    curl -sf --cacert "$WORK/data/tls/cert.pem" "https://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1; then
    break
  fi
  sleep 0.2
done
load() { "$WORK/load" --base "https://127.0.0.1:$PORT" --ca "$WORK/data/tls/cert.pem" --password-file "$WORK/password" "$@"; }
cv users add --username soak-frontdesk --role front_desk --password-stdin <"$WORK/password" >/dev/null
load --user soak-frontdesk setup --patients "$PATIENTS" >"$WORK/setup.json"
PRACTITIONER="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["practitioner"])' "$WORK/setup.json")"
cv users add --username soak-clinician --role clinician --practitioner "$PRACTITIONER" --password-stdin \
  <"$WORK/password" >/dev/null

echo "start: $(uptime)" | tee "$OUT/soak-machine.txt"
echo "::: soak: $MINUTES min at $RATE req/s from $CONC connections, a sample every $SAMPLE_SECS s"
status=0
load --user soak-clinician soak --setup "$WORK/setup.json" --concurrency "$CONC" --rate "$RATE" \
  --minutes "$MINUTES" --sample-secs "$SAMPLE_SECS" --pid "$SERVER_PID" | tee "$OUT/soak.jsonl" || status=$?
echo "end: $(uptime)" | tee -a "$OUT/soak-machine.txt"

echo "::: audit verify"
kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
cv audit verify | tail -n 2

python3 - "$OUT/soak.jsonl" "$RSS_GROWTH_PCT" "$P99_GROWTH_X" <<'PY' || status=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
samples = [r for r in rows if "sample" in r]
summary = next(r for r in rows if r.get("summary"))
rss_pct, p99_x = float(sys.argv[2]), float(sys.argv[3])
base = samples[1] if len(samples) > 1 else samples[0]
last = samples[-1]
rss_growth = 100.0 * (last["rss_kib"] - base["rss_kib"]) / max(base["rss_kib"], 1)
p99_ratio = last["p99_ms"] / max(base["p99_ms"], 0.001)
print(f"requests {summary['ok']}, errors {summary['errors']}; RSS {base['rss_kib']} -> {last['rss_kib']} KiB "
      f"({rss_growth:+.1f} %); p99 {base['p99_ms']:.1f} -> {last['p99_ms']:.1f} ms (x{p99_ratio:.2f}), "
      f"max p99 {summary['p99_max_ms']:.1f} ms")
bad = []
if summary["errors"]:
    bad.append("errors")
if rss_growth > rss_pct:
    bad.append(f"RSS grew more than {rss_pct} %")
if p99_ratio > p99_x:
    bad.append(f"p99 grew more than x{p99_x}")
if bad:
    print("SOAK FAILED: " + ", ".join(bad))
    sys.exit(1)
print("SOAK PASSED")
PY
exit "$status"

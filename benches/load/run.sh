#!/usr/bin/env bash
# The load benchmark of docs/benchmarks.md: the release server on a fresh PostgreSQL database, once per
# configuration (all safeguards on; each safeguard off alone; OTLP export of every trace, and of one in ten;
# everything off), plus raw
# PostgreSQL with pgbench at the same concurrency. Configurations are interleaved within each round so that the
# shared machine's drift spreads over all of them; the summary reports the median of the rounds.
#
#   bash benches/load/run.sh            # ROUNDS=3 SECS=8 CONC=16 PATIENTS=200 (about 9 minutes plus the build)
#
# Needs: PostgreSQL reachable at $PG_ADMIN_URL (a role that may create databases), pgbench, psql, curl, python3.
# The benchmark switches (`[benchmark] disable = [...]`) exist only for this; the production profile refuses them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-8}"
CONC="${CONC:-16}"
PATIENTS="${PATIENTS:-200}"
PORT="${PORT:-18443}"
SINK_PORT="${SINK_PORT:-14318}"
CONFIGS="${CONFIGS:-full encryption-off audit-off access-off telemetry-off export-on all-off}"
# BASELINE_BIN=/path/to/an/older/carevault adds the configuration `baseline`: that binary, every safeguard on,
# interleaved with the others (before/after comparisons in one run; docs/benchmarks.md).
BASELINE_BIN="${BASELINE_BIN:-}"
# The policy folder of that older binary (its checkout's `policies/`): policies name the types a binary serves.
BASELINE_POLICY_DIR="${BASELINE_POLICY_DIR:-}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$ROOT/benches/load/results}"

echo "::: build (release, once)"
cargo build --release --locked --features benchmark --bin carevault --example load --example audit_verify
WORK="$(mktemp -d)"
# Private copies: a later build in a shared target directory must not swap the binary mid-run.
cp "$TARGET/release/carevault" "$TARGET/release/examples/load" "$TARGET/release/examples/audit_verify" "$WORK/"
BIN="$WORK/carevault"
if [ -n "$BASELINE_BIN" ]; then
  cp "$BASELINE_BIN" "$WORK/baseline"
fi
LOAD="$WORK/load"
VERIFY="$WORK/audit_verify"
DB="carevault_bench_$$"
DB_URL="${PG_ADMIN_URL%/*}/$DB"
SERVER_PID=""
SINK_PID=""
cleanup() {
  set +e
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
  psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $DB" >/dev/null
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
# The machine is shared: record what else was running (load average) at the start and the end.
{ echo "start: $(uptime)"; nproc; } >"$OUT/machine.txt"

DATA="$WORK/data"
mkdir -p "$DATA"
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$WORK/password"

# One config file per configuration; only `benchmark.disable` differs.
disable_list() {
  case "$1" in
    full | export-on | export-sampled | baseline) echo '[]' ;;
    encryption-off) echo '["encryption"]' ;;
    audit-off) echo '["audit"]' ;;
    access-off) echo '["access"]' ;;
    telemetry-off) echo '["telemetry"]' ;;
    all-off) echo '["encryption", "audit", "access", "telemetry"]' ;;
    *) echo "unknown configuration $1" >&2; return 1 ;;
  esac
}
for c in $CONFIGS; do
  # The load comes from one address: lift the per-address rate limit, or it (not the server) sets the ceiling.
  printf 'database_url = "%s"\n[limits]\nrequests_per_second = 10000000\nburst = 10000000\n[benchmark]\ndisable = %s\n' \
    "$DB_URL" "$(disable_list "$c")" >"$WORK/$c.toml"
  if [ "$c" = baseline ] && [ -n "$BASELINE_POLICY_DIR" ]; then
    printf '[access]\npolicy_dir = "%s"\n' "$BASELINE_POLICY_DIR" >>"$WORK/$c.toml"
  fi
done

cv() { "$BIN" --data-dir "$DATA" --config "$WORK/$1.toml" "${@:2}"; }

start_server() { # config name
  local env=(env -u OTEL_EXPORTER_OTLP_ENDPOINT)
  if [ "$1" = export-on ]; then
    env=(env OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" OTEL_METRIC_EXPORT_INTERVAL=10000)
  elif [ "$1" = export-sampled ]; then
    # The deployment default (deploy/): every metric, one trace in ten (parent-based, so a trace is whole or absent).
    env=(env OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" OTEL_METRIC_EXPORT_INTERVAL=10000
      OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1)
  fi
  local bin="$BIN"
  if [ "$1" = baseline ]; then
    bin="$WORK/baseline"
  fi
  "${env[@]}" "$bin" --data-dir "$DATA" --config "$WORK/$1.toml" serve --listen "127.0.0.1:$PORT" \
    >"$WORK/server-$1.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    if [ -f "$DATA/tls/cert.pem" ] &&
      curl -sf --cacert "$DATA/tls/cert.pem" "https://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "server ($1) did not become ready" >&2
  cat "$WORK/server-$1.log" >&2
  return 1
}

stop_server() {
  kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

load() { "$LOAD" --base "https://127.0.0.1:$PORT" --ca "$DATA/tls/cert.pem" --password-file "$WORK/password" "$@"; }

# A sink for OTLP/HTTP export (answers 200 with an empty protobuf message, discards the body).
python3 - "$SINK_PORT" <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
SINK_PID=$!

echo "::: seed: front desk creates a practitioner, $PATIENTS patients and their care teams"
# The server first: it creates the database and keys; `users add` refuses a data directory without them.
start_server full
cv full users add --username bench-frontdesk --role front_desk --password-stdin <"$WORK/password" >/dev/null
load --user bench-frontdesk setup --patients "$PATIENTS" >"$WORK/setup.json"
PRACTITIONER="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["practitioner"])' "$WORK/setup.json")"
cv full users add --username bench-clinician --role clinician --practitioner "$PRACTITIONER" --password-stdin \
  <"$WORK/password" >/dev/null
stop_server

# Raw PostgreSQL: the same primary-key read (the id picked through a numbered copy of the Observation ids, in
# the same statement), and one durable insert of a row of the same size, at the same concurrency.
cat >"$WORK/pg-read.sql" <<'SQL'
\set k random(1, :nids)
SELECT r.content FROM bench_ids b JOIN resources r ON r.resource_type = 'Observation' AND r.id = b.id WHERE b.n = :k;
SQL
cat >"$WORK/pg-insert.sql" <<'SQL'
INSERT INTO bench_raw (id, content) VALUES (gen_random_uuid()::text, repeat('x', 1400));
SQL
pgbench_run() { # op script
  local nids tps
  nids="$(psql -qtA "$DB_URL" -c "SELECT count(*) FROM bench_ids")"
  tps="$(pgbench -n -M prepared -c "$CONC" -j 1 -T "$SECS" -D nids="$nids" -f "$2" "$DB_URL" 2>/dev/null |
    sed -n 's/^tps = \([0-9.]*\) .*/\1/p')"
  printf '{"label":"raw-postgres","op":"%s","concurrency":%s,"secs":%s,"rps":%s}\n' "$1" "$CONC" "$SECS" "$tps" \
    >>"$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
  for c in $CONFIGS; do
    echo "::: round $round/$ROUNDS: $c"
    start_server "$c"
    load --user bench-clinician run --setup "$WORK/setup.json" --concurrency "$CONC" --secs "$SECS" --label "$c" |
      tee -a "$RESULTS"
    stop_server
  done
  echo "::: round $round/$ROUNDS: raw PostgreSQL (pgbench)"
  psql -q "$DB_URL" >/dev/null <<'SQL'
DROP TABLE IF EXISTS bench_ids;
CREATE TABLE bench_ids AS SELECT row_number() OVER () AS n, id FROM resources WHERE resource_type = 'Observation';
CREATE UNIQUE INDEX ON bench_ids (n);
CREATE TABLE IF NOT EXISTS bench_raw (id TEXT PRIMARY KEY, content TEXT NOT NULL);
ANALYZE;
SQL
  pgbench_run read "$WORK/pg-read.sql"
  pgbench_run create "$WORK/pg-insert.sql"
  tail -n 2 "$RESULTS"
done

echo "::: audit verify over the whole trail (audit::store::verify, best of 3 walks)"
"$VERIFY" "$DB_URL" | tee "$OUT/verify.json"

echo "end: $(uptime)" >>"$OUT/machine.txt"
cat "$OUT/machine.txt"

echo "::: summary (medians of $ROUNDS rounds; $CONC connections; $SECS s each)"
python3 "$ROOT/benches/load/summary.py" "$RESULTS" | tee "$OUT/summary.md"

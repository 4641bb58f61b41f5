#!/usr/bin/env bash
# Ingest benchmark (docs/benchmarks.md, "Ingest"): the release server on a fresh PostgreSQL database, every
# safeguard on (default configuration: encryption, access control, audit, telemetry to a log file), loading the
# same kind of clinical entries (benches/ingest/ingest.py: units of an Encounter, 8 Observations, a Condition)
#   - transaction: `POST /fhir` transaction Bundles of $BATCH entries, $TX_CONC connections;
#   - import:      `carevault import --account bench-clinician --batch $BATCH` of an NDJSON file (in-process,
#                  one transaction at a time, the server running beside it on the same database);
#   - single:      the same entries `POST /fhir/{type}` one by one, $SINGLE_CONC connections;
#   - raw-copy / raw-insert: the same JSON (ids assigned) into a plain PostgreSQL table (id, type, patient,
#                  jsonb; primary key), by one `COPY`, and by `INSERT`s of $BATCH rows a transaction;
# interleaved in each of $ROUNDS rounds; the summary gives the median resources/s of each.
#
#   bash benches/ingest/run.sh     # ROUNDS=3 ENTRIES=2000 BATCH=100 TX_CONC=2 SINGLE_CONC=16 PATIENTS=20
#
# BIN=path/to/release/carevault skips the build. Needs PostgreSQL at $PG_ADMIN_URL (may create databases),
# psql, curl, python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
ROUNDS="${ROUNDS:-3}"
ENTRIES="${ENTRIES:-2000}"
BATCH="${BATCH:-100}"
TX_CONC="${TX_CONC:-2}"
SINGLE_CONC="${SINGLE_CONC:-16}"
PATIENTS="${PATIENTS:-20}"
PORT="${PORT:-18453}"
MODES="${MODES:-transaction import single raw-copy raw-insert}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$ROOT/benches/ingest/results}"
DRIVER="$ROOT/benches/ingest/ingest.py"

WORK="$(mktemp -d)"
if [ -z "${BIN:-}" ]; then
  echo "::: build (release, once)"
  nice cargo build --release --locked --bin carevault
  BIN="$TARGET/release/carevault"
fi
# A private copy: a later build in a shared target directory must not swap the binary mid-run.
cp "$BIN" "$WORK/carevault"
BIN="$WORK/carevault"
DB="carevault_ingest_$$"
DB_URL="${PG_ADMIN_URL%/*}/$DB"
SERVER_PID=""
cleanup() {
  set +e
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $DB" >/dev/null
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
{ echo "start: $(uptime)"; nproc; } >"$OUT/machine.txt"

DATA="$WORK/data"
mkdir -p "$DATA"
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$WORK/password"
# One client address: lift the per-address rate limit, or it (not the server) sets the ceiling.
printf 'database_url = "%s"\n[limits]\nrequests_per_second = 10000000\nburst = 10000000\n' "$DB_URL" >"$WORK/cv.toml"
cv() { "$BIN" --data-dir "$DATA" --config "$WORK/cv.toml" "$@"; }

"$BIN" --data-dir "$DATA" --config "$WORK/cv.toml" serve --listen "127.0.0.1:$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
  if [ -f "$DATA/tls/cert.pem" ] && curl -sf --cacert "$DATA/tls/cert.pem" "https://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1; then
    break
  fi
  sleep 0.2
done
curl -sf --cacert "$DATA/tls/cert.pem" "https://127.0.0.1:$PORT/health/ready" >/dev/null || {
  cat "$WORK/server.log" >&2
  exit 1
}
drive() { python3 "$DRIVER" "$1" --base "https://127.0.0.1:$PORT" --ca "$DATA/tls/cert.pem" --password-file "$WORK/password" "${@:2}"; }

echo "::: setup: a practitioner, $PATIENTS patients and their care teams (front desk)"
cv users add --username bench-frontdesk --role front_desk --password-stdin <"$WORK/password" >/dev/null
drive setup --username bench-frontdesk --patients "$PATIENTS" >"$WORK/setup.json"
PRACTITIONER="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["practitioner"])' "$WORK/setup.json")"
cv users add --username bench-clinician --role clinician --practitioner "$PRACTITIONER" --password-stdin \
  <"$WORK/password" >/dev/null
psql -q "$DB_URL" -c "CREATE TABLE bench_raw (id uuid PRIMARY KEY, resource_type text NOT NULL, patient text NOT NULL, content jsonb NOT NULL)" >/dev/null

record() { # mode resources secs extra-json
  python3 -c 'import json,sys; m,n,s,x=sys.argv[1:]; d={"mode":m,"resources":int(n),"secs":round(float(s),3),"rps":round(int(n)/float(s),1)}; d.update(json.loads(x)); print(json.dumps(d))' \
    "$1" "$2" "$3" "$4" | tee -a "$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
  seed=$((round * 100))
  for mode in $MODES; do
    echo "::: round $round/$ROUNDS: $mode"
    case "$mode" in
      transaction)
        drive run --username bench-clinician --setup "$WORK/setup.json" --mode transaction --entries "$ENTRIES" \
          --batch "$BATCH" --concurrency "$TX_CONC" --seed "$seed" | tee -a "$RESULTS"
        ;;
      single)
        drive run --username bench-clinician --setup "$WORK/setup.json" --mode single --entries "$ENTRIES" \
          --concurrency "$SINGLE_CONC" --seed "$((seed + 1))" | tee -a "$RESULTS"
        ;;
      import)
        python3 "$DRIVER" ndjson --setup "$WORK/setup.json" --entries "$ENTRIES" --seed "$((seed + 2))" >"$WORK/in.ndjson"
        rm -f "$WORK/in.ndjson.import-state"
        errs=0
        out="$(cv import --account bench-clinician --batch "$BATCH" --quiet "$WORK/in.ndjson" 2>"$WORK/import.err")" || {
          errs=1
          head -c 600 "$WORK/import.err" >&2
        }
        # The command's own timing (from the first chunk to the last; start-up and key loading excluded).
        n="$(echo "$out" | sed -n 's/^imported \([0-9]*\) resource(s) in \([0-9.]*\) s.*/\1/p')"
        secs="$(echo "$out" | sed -n 's/^imported \([0-9]*\) resource(s) in \([0-9.]*\) s.*/\2/p')"
        record import "${n:-0}" "${secs:-1}" "{\"batch\":$BATCH,\"concurrency\":1,\"errors\":$errs}"
        ;;
      raw-copy | raw-insert)
        python3 "$DRIVER" copy --setup "$WORK/setup.json" --entries "$ENTRIES" --seed "$((seed + 3))" >"$WORK/rows.tsv"
        n="$(wc -l <"$WORK/rows.tsv")"
        if [ "$mode" = raw-copy ]; then
          printf '\\copy bench_raw (resource_type, id, patient, content) FROM %s\n' "'$WORK/rows.tsv'" >"$WORK/rows.sql"
        else
          python3 - "$WORK/rows.tsv" "$BATCH" >"$WORK/rows.sql" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
b = int(sys.argv[2])
q = lambda s: "'" + s.replace("\\\\", "\\").replace("'", "''") + "'"
for i in range(0, len(rows), b):
    vals = ",".join(f"({q(r[1])},{q(r[0])},{q(r[2])},{q(r[3])})" for r in rows[i:i + b])
    print(f"BEGIN; INSERT INTO bench_raw (id, resource_type, patient, content) VALUES {vals}; COMMIT;")
PY
        fi
        # The statements' own time (psql's \timing: server round trips, commit included), not psql's start-up.
        secs="$( (echo '\timing on'; cat "$WORK/rows.sql") | psql -q "$DB_URL" |
          sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | python3 -c 'import sys; print(sum(map(float, sys.stdin)) / 1000)')"
        record "$mode" "$n" "$secs" "{\"batch\":$([ "$mode" = raw-copy ] && echo "$n" || echo "$BATCH"),\"concurrency\":1}"
        ;;
    esac
  done
done
echo "end: $(uptime)" >>"$OUT/machine.txt"

echo "::: summary (medians of $ROUNDS rounds, $ENTRIES entries each)"
python3 - "$RESULTS" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
modes = []
for r in rows:
    if r["mode"] not in modes:
        modes.append(r["mode"])
print("| mode | batch | connections | resources/s (median) | rounds | errors |")
print("| --- | ---: | ---: | ---: | --- | ---: |")
for m in modes:
    rs = [r for r in rows if r["mode"] == m]
    rps = [r["rps"] for r in rs]
    print(f"| {m} | {rs[0].get('batch', '')} | {rs[0].get('concurrency', '')} | {statistics.median(rps):,.0f} | "
          f"{', '.join(f'{x:,.0f}' for x in rps)} | {sum(r.get('errors', 0) for r in rs)} |")
PY

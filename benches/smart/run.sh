#!/usr/bin/env bash
# SMART launch round trip (docs/benchmarks.md): a release carevault in the demo profile on a fresh data dir
# (SQLite, or PostgreSQL with DATABASE_URL), one public app registered, then benches/smart/roundtrip.py.
#   BIN=target/release/carevault ROUNDS=30 [DATABASE_URL=postgres://…] bash benches/smart/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${BIN:-$ROOT/target/release/carevault}"
ROUNDS="${ROUNDS:-30}"
PORT="${PORT:-18471}"
DATA="$(mktemp -d)"
SERVER=
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$DATA"' EXIT
if [ -n "${DATABASE_URL:-}" ]; then export CAREVAULT_DATABASE_URL="$DATABASE_URL"; fi
"$BIN" --data-dir "$DATA" serve --demo --listen "127.0.0.1:$PORT" >"$DATA/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do
  grep -q "carevault is serving" "$DATA/server.log" 2>/dev/null && break
  sleep 0.5
done
CLIENT="$("$BIN" --data-dir "$DATA" apps add --name Bench --kind public --redirect-uri http://127.0.0.1:9/cb \
  --scopes "launch/patient openid fhirUser patient/*.rs" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["client_id"])')"
PASSWORD="$(awk '$1 == "demo-clinician" {print $3}' "$DATA/demo-credentials.txt")"
python3 "$ROOT/benches/smart/roundtrip.py" --base "https://127.0.0.1:$PORT" --ca "$DATA/tls/cert.pem" \
  --client-id "$CLIENT" --username demo-clinician --password "$PASSWORD" --rounds "$ROUNDS"

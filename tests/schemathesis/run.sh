#!/usr/bin/env bash
# schemathesis against a running carevault: `tests/schemathesis/run.sh [path/to/carevault]`.
#
# Builds nothing: uses the given binary, else $CARGO_TARGET_DIR/debug/carevault, else target/debug/carevault.
# Starts `carevault serve --demo` on a free port (port 0, read back from its output) with a temporary data
# directory, signs in the demo clinician, admin and nurse through POST /auth/login (passwords from the demo
# credentials file the seeding wrote), and runs `schemathesis run https://…/openapi.json` with the checks
# not_a_server_error, status_code_conformance and response_schema_conformance, verifying TLS against the
# server's generated certificate (DATA_DIR/tls/cert.pem). Three runs, one token each: the clinician every
# operation but /admin and /auth/logout, the admin /admin, the nurse /auth/logout (which ends its session).
# Bounded: SCHEMATHESIS_MAX_EXAMPLES examples per operation (default 6). Exits non-zero on any failure.
#
# Needs `schemathesis` on PATH, or SCHEMATHESIS=/path/to/schemathesis (CI: `pip install schemathesis==4.32.5`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${1:-}"
if [[ -z "$BIN" ]]; then
  for candidate in "${CARGO_TARGET_DIR:-$ROOT/target}/debug/carevault" "$ROOT/target/debug/carevault"; do
    [[ -x "$candidate" ]] && { BIN="$candidate"; break; }
  done
fi
[[ -n "$BIN" && -x "$BIN" ]] || { echo "no carevault binary (build it, or pass its path)" >&2; exit 2; }
ST="${SCHEMATHESIS:-schemathesis}"
command -v "$ST" >/dev/null || { echo "schemathesis not found (pip install schemathesis==4.32.5)" >&2; exit 2; }
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-6}"

DATA="$(mktemp -d)"
LOG="$DATA/server.log"
PID=""
cleanup() {
  if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

# Long-lived tokens for the run; the general rate limit well above what the run sends.
CAREVAULT_AUTH__ACCESS_TOKEN_TTL_SECS=900 CAREVAULT_LOG="${CAREVAULT_LOG:-warn}" \
  "$BIN" --data-dir "$DATA" serve --demo --listen 127.0.0.1:0 >"$LOG" 2>&1 &
PID=$!

BASE=""
for _ in $(seq 1 120); do
  BASE="$(sed -n 's/^carevault is serving on \(https:\/\/[^ ]*\).*/\1/p' "$LOG" | head -n 1)"
  [[ -n "$BASE" ]] && break
  kill -0 "$PID" 2>/dev/null || { echo "the server exited:" >&2; cat "$LOG" >&2; exit 1; }
  sleep 0.5
done
[[ -n "$BASE" ]] || { echo "the server did not start within 60 s" >&2; cat "$LOG" >&2; exit 1; }
CERT="$DATA/tls/cert.pem"
CREDS="$DATA/demo-credentials.txt"
echo "carevault at $BASE (data $DATA)"

token() {
  local user="$1" password
  password="$(awk -v u="$user" '$1 == u {print $3}' "$CREDS")"
  [[ -n "$password" ]] || { echo "no password for $user in $CREDS" >&2; return 1; }
  curl -sS --fail --cacert "$CERT" -X POST "$BASE/auth/login" -H 'content-type: application/json' \
    -d "{\"username\":\"$user\",\"password\":\"$password\"}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
CLINICIAN="$(token demo-clinician)"
ADMIN="$(token demo-admin)"
NURSE="$(token demo-nurse)"

CHECKS="not_a_server_error,status_code_conformance,response_schema_conformance"
run() {
  local name="$1" token="$2"; shift 2
  echo "::: schemathesis as $name"
  "$ST" run "$BASE/openapi.json" \
    --checks "$CHECKS" \
    --tls-verify "$CERT" \
    --header "Authorization: Bearer $token" \
    --max-examples "$MAX_EXAMPLES" \
    --seed 1 \
    --workers 1 \
    --request-timeout 20 \
    --max-redirects 0 \
    --no-color \
    "$@"
}

start=$SECONDS
status=0
run clinician "$CLINICIAN" --exclude-path-regex '^/admin/|^/auth/logout$' || status=1
run admin "$ADMIN" --include-path-regex '^/admin/' || status=1
run nurse "$NURSE" --include-path '/auth/logout' || status=1
echo "::: schemathesis finished in $((SECONDS - start)) s: $([[ $status == 0 ]] && echo 'no failures' || echo FAILURES)"
# An error of ours in the log fails the run too (actix's own "invalid Header provided" for the malformed
# requests schemathesis sends is the framework refusing them with 400, not a server error).
if grep '"level":"ERROR"' "$LOG" | grep -q '"target":"carevault'; then
  echo "the server logged errors:" >&2
  grep '"level":"ERROR"' "$LOG" | grep '"target":"carevault' | head -n 20 >&2
  status=1
fi
exit "$status"

#!/usr/bin/env bash
# TLS compliance (docs/security-testing.md): the server with a CA-issued test certificate (a throw-away CA and an
# ECDSA P-256 leaf for localhost/127.0.0.1, 90 days) scanned by sslyze against Mozilla's "intermediate"
# configuration. Exit 0 only when sslyze reports the server compliant. Run by .ci/run after `cargo test`.
#
#   bash tests/faults/sslyze.sh                 # BIN=target/debug/carevault SSLYZE=sslyze PORT=18743
#
# Needs: sslyze (PyPI: `python3 -m pip install sslyze`), openssl, curl. Under CI=true a missing tool fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${BIN:-$TARGET/debug/carevault}"
SSLYZE="${SSLYZE:-sslyze}"
PORT="${PORT:-18743}"
OUT="${OUT:-$ROOT/tests/faults/results}"

for tool in "$SSLYZE" openssl curl; do
  command -v "$tool" >/dev/null || { echo "sslyze.sh: $tool is missing" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "sslyze.sh: no server binary at $BIN (cargo build first, or set BIN)" >&2; exit 1; }

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  set +e
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# A test CA and a leaf it issues (never the server's own self-signed development certificate).
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 30 \
  -subj "/CN=carevault sslyze test CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -subj "/CN=localhost" \
  -keyout "$WORK/leaf.key" -out "$WORK/leaf.csr" 2>/dev/null
cat >"$WORK/leaf.ext" <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
openssl x509 -req -in "$WORK/leaf.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 90 -sha256 \
  -extfile "$WORK/leaf.ext" -out "$WORK/leaf.pem" 2>/dev/null
cat "$WORK/leaf.pem" "$WORK/ca.pem" >"$WORK/chain.pem"

mkdir -p "$WORK/data" "$OUT"
cat >"$WORK/carevault.toml" <<TOML
database_url = "sqlite://$WORK/data/carevault.db"
[tls]
cert_file = "$WORK/chain.pem"
key_file = "$WORK/leaf.key"
TOML
"$BIN" --data-dir "$WORK/data" --config "$WORK/carevault.toml" serve --listen "127.0.0.1:$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
  curl -sf --cacert "$WORK/ca.pem" "https://localhost:$PORT/health/live" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf --cacert "$WORK/ca.pem" "https://localhost:$PORT/health/live" >/dev/null || {
  echo "sslyze.sh: the server did not come up" >&2; cat "$WORK/server.log" >&2; exit 1; }

echo "::: sslyze --mozilla_config=intermediate localhost:$PORT (trusting the test CA only)"
status=0
"$SSLYZE" --mozilla_config=intermediate --certinfo_ca_file "$WORK/ca.pem" --json_out "$WORK/sslyze.json" \
  "localhost:$PORT{127.0.0.1}" >"$WORK/sslyze.txt" 2>&1 || status=$?
grep -E -A3 "Checking results against" "$WORK/sslyze.txt" | grep -v "^$" || true
python3 - "$WORK/sslyze.json" <<'PY' | tee "$OUT/sslyze-summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
r = doc["server_scan_results"][0]["scan_result"]
def accepted(name):
    res = r.get(name, {}).get("result") or {}
    return [s["cipher_suite"]["name"] for s in res.get("accepted_cipher_suites", [])]
for proto in ["ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"]:
    a = accepted(proto + "_cipher_suites")
    print(f"{proto}: {len(a)} suites accepted" + (f" ({', '.join(a)})" if a else ""))
curves = (r.get("elliptic_curves", {}).get("result") or {}).get("supported_curves", [])
print("curves:", ", ".join(c["name"] for c in curves))
cert = (r.get("certificate_info", {}).get("result") or {}).get("certificate_deployments", [{}])[0]
trusted = [v for v in cert.get("path_validation_results", []) if v.get("was_validation_successful")]
print("certificate chain validated against the test CA:", bool(trusted))
PY
if [ "$status" -ne 0 ]; then
  echo "sslyze: NOT compliant with Mozilla intermediate (exit $status)" >&2
  cat "$WORK/sslyze.txt" >&2
  exit 1
fi
echo "sslyze: compliant with Mozilla intermediate"

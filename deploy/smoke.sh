#!/usr/bin/env bash
# deploy/smoke.sh: the container smoke test (issue 17). Builds the carevault image from deploy/Dockerfile, runs
# `deploy init`, PostgreSQL and the api (demo profile) as containers on the host network, and checks:
#   1. demo data is served over TLS, verified with the CA that `deploy init` generated;
#   2. every demo account (one per role) can sign in;
#   3. `docker stop` ends the api within 10 s with exit code 0 (SIGTERM handled as PID 1, no SIGKILL);
#   4. a restart keeps the data (same patients, same logins);
#   5. the image's healthcheck (`carevault healthcheck`) passes.
#
# Works without an image registry: when debian:bookworm-slim cannot be pulled, a base image is made from
# Debian's packages (debootstrap + docker import); PostgreSQL is Debian's postgresql-15 on that base. The
# carevault binary is built on the host (`cargo build --release`) and copied in with `--target prebuilt`
# (set SMOKE_IN_IMAGE_BUILD=1 to compile inside the image instead, which needs the rust:1.95 image).
# Needs: root, docker (dockerd is started here when it is not running), curl, jq, cargo.
# Environment: SMOKE_API_PORT (18443), SMOKE_PG_PORT (55432), SMOKE_KEEP=1 keeps containers and volumes.

set -euo pipefail
cd "$(dirname "$0")/.."

API_PORT=${SMOKE_API_PORT:-18443}
PG_PORT=${SMOKE_PG_PORT:-55432}
BASE=carevault-smoke-base:bookworm
IMAGE=carevault:smoke
PG_IMAGE=carevault-smoke-postgres:15
P=carevault-smoke
WORK=$(mktemp -d)
FAILED=0

say() { printf '[smoke %s] %s\n' "$(date +%T)" "$*"; }
fail() { say "FAIL: $*"; FAILED=1; }
now() { date +%s.%N; }
# The api's logs, via a file: `docker logs | grep -q` would end docker with SIGPIPE (a failure under pipefail).
api_log() { docker logs "$P-api" >"$WORK/api.log" 2>&1; cat "$WORK/api.log"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
  if [ "${SMOKE_KEEP:-0}" != 1 ]; then
    docker rm -f "$P-api" "$P-pg" >/dev/null 2>&1 || true
    docker volume rm "$P-secrets" "$P-data" "$P-pg" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- the engine --------------------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"
  (dockerd >/tmp/carevault-smoke-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not start"; exit 1; }
fi
export DOCKER_BUILDKIT=0

# --- base images -------------------------------------------------------------------------------------------
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if timeout 60 docker pull debian:bookworm-slim >/dev/null 2>&1; then
    docker tag debian:bookworm-slim "$BASE"
  else
    say "no registry: making the Debian base image with debootstrap"
    command -v debootstrap >/dev/null || apt-get install -y debootstrap >/dev/null
    t=$(now)
    debootstrap --variant=minbase bookworm "$WORK/rootfs" >/dev/null
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
    say "base image made in $(since "$t") s"
  fi
fi
if ! docker image inspect "$PG_IMAGE" >/dev/null 2>&1; then
  mkdir -p "$WORK/pg"
  cat >"$WORK/pg/Dockerfile" <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
COPY entry.sh /entry.sh
USER postgres
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/bash", "/entry.sh"]
EOF
  cat >"$WORK/pg/entry.sh" <<'EOF'
set -e
bin=/usr/lib/postgresql/15/bin
D=/var/lib/postgresql/data/pgdata
if [ ! -s "$D/PG_VERSION" ]; then
  "$bin/initdb" -D "$D" -U carevault --pwfile=/secrets/postgres/password -A scram-sha-256 >/dev/null
  echo "CREATE DATABASE carevault;" | "$bin/postgres" --single -D "$D" postgres >/dev/null
fi
exec "$bin/postgres" -D "$D" -c listen_addresses=127.0.0.1 -c "port=${PG_PORT}" -c unix_socket_directories=/tmp
EOF
  nice -n 19 docker build --network host -q -t "$PG_IMAGE" "$WORK/pg" >/dev/null
fi
PG_UID=$(docker run --rm --entrypoint id "$PG_IMAGE" -u)

# --- the carevault image -----------------------------------------------------------------------------------
t=$(now)
if [ "${SMOKE_IN_IMAGE_BUILD:-0}" = 1 ]; then
  nice -n 19 docker build --network host -f deploy/Dockerfile --build-arg RUNTIME_IMAGE="$BASE" -t "$IMAGE" . >/dev/null
else
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} nice -n 19 cargo build --release --locked --bin carevault -j 2
  cp "${CARGO_TARGET_DIR:-target}/release/carevault" deploy/prebuilt/carevault
  nice -n 19 docker build --network host -f deploy/Dockerfile --target prebuilt \
    --build-arg RUNTIME_IMAGE="$BASE" -t "$IMAGE" . >/dev/null
  rm -f deploy/prebuilt/carevault
fi
say "image $IMAGE built in $(since "$t") s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# --- init, postgres, api -----------------------------------------------------------------------------------
docker rm -f "$P-api" "$P-pg" >/dev/null 2>&1 || true
docker volume rm "$P-secrets" "$P-data" "$P-pg" >/dev/null 2>&1 || true
init() {
  docker run --rm --user 0:0 --network none -v "$P-secrets:/secrets" \
    -v "$PWD/deploy/keycloak/carevault-realm.json:/realm.json:ro" "$IMAGE" \
    deploy init --dir /secrets --realm-template /realm.json --postgres-address "127.0.0.1:$PG_PORT" \
    --postgres-uid "$PG_UID" --url "API=https://localhost:$API_PORT/fhir/metadata"
}
t=$(now)
init >"$WORK/init1.txt"
say "deploy init: $(head -1 "$WORK/init1.txt") ($(since "$t") s)"
init >"$WORK/init2.txt"
grep -q ' 0 file(s) made' "$WORK/init2.txt" && say "deploy init again: $(head -1 "$WORK/init2.txt")" \
  || fail "a second deploy init made files: $(head -1 "$WORK/init2.txt")"
docker run --rm --user 0:0 --network none -v "$P-secrets:/s:ro" --entrypoint stat "$IMAGE" -c '%a %u %n' \
  /s/ca.pem /s/ca-key.pem /s/api /s/api/tls_key.pem /s/api/master_key /s/postgres/password /s/keycloak/tls_key.pem \
  >"$WORK/modes.txt"
sed 's/^/[smoke]   mode owner file: /' "$WORK/modes.txt"
docker run --rm --network none -v "$P-secrets:/s:ro" --entrypoint cat "$IMAGE" /s/ca.pem >"$WORK/ca.pem"

docker run -d --name "$P-pg" --network host -e PG_PORT="$PG_PORT" -v "$P-secrets:/secrets:ro" \
  -v "$P-pg:/var/lib/postgresql/data" "$PG_IMAGE" >/dev/null
for _ in $(seq 60); do
  docker exec "$P-pg" /usr/lib/postgresql/15/bin/pg_isready -h 127.0.0.1 -p "$PG_PORT" >/dev/null 2>&1 && break
  sleep 1
done

start_api() {
  docker run -d --name "$P-api" --network host --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges:true \
    --health-interval 2s --health-start-period 5s --health-timeout 5s --health-retries 30 \
    -v "$P-secrets:/secrets:ro" -v "$P-data:/var/lib/carevault" \
    -e CAREVAULT_PROFILE=demo -e CAREVAULT_LISTEN="127.0.0.1:$API_PORT" \
    -e CAREVAULT_DATABASE_URL_FILE=/secrets/api/database_url \
    -e CAREVAULT_TLS__CERT_FILE=/secrets/api/tls_cert.pem -e CAREVAULT_TLS__KEY_FILE=/secrets/api/tls_key.pem \
    -e CAREVAULT_KEYS__MASTER_KEY_FILE=/secrets/api/master_key -e RUST_LOG=info \
    -e CAREVAULT_DEMO_PASSWORDS_FILE=/secrets/api/demo_passwords \
    "$IMAGE" serve >/dev/null
}
wait_healthy() {
  local t; t=$(now)
  for _ in $(seq 120); do
    case "$(docker inspect -f '{{.State.Health.Status}}' "$P-api" 2>/dev/null)" in
      healthy) say "api healthy after $(since "$t") s (image HEALTHCHECK: carevault healthcheck)"; return 0 ;;
      *) sleep 0.5 ;;
    esac
    [ "$(docker inspect -f '{{.State.Running}}' "$P-api")" = true ] || break
  done
  fail "api not healthy"; api_log | tail -20; return 1
}

t=$(now)
start_api
wait_healthy || exit 1
docker exec "$P-api" carevault healthcheck >/dev/null && say "docker exec carevault healthcheck: exit 0" \
  || fail "carevault healthcheck failed"

# --- checks ------------------------------------------------------------------------------------------------
BASE_URL="https://localhost:$API_PORT"
C=(curl -sS --fail-with-body --cacert "$WORK/ca.pem")
"${C[@]}" "$BASE_URL/fhir/metadata" | jq -e '.resourceType == "CapabilityStatement"' >/dev/null \
  && say "TLS verified with the generated CA: /fhir/metadata is a CapabilityStatement" || fail "metadata over TLS"

api_log >/dev/null
awk '/^Demo logins/ {on=1; next} on && /^  demo-/ {print $1, $2, $3}' "$WORK/api.log" >"$WORK/logins.txt"
[ -s "$WORK/logins.txt" ] || fail "the api printed no demo logins"
login() { # username password -> access token
  "${C[@]}" -X POST "$BASE_URL/auth/login" -H 'content-type: application/json' \
    -d "$(jq -nc --arg u "$1" --arg p "$2" '{username: $u, password: $p}')" | jq -r .access_token
}
roles=0
while read -r user role password; do
  token=$(login "$user" "$password" || true)
  if [ -n "$token" ] && [ "$token" != null ]; then roles=$((roles + 1)); else fail "login $user ($role)"; fi
done <"$WORK/logins.txt"
say "logins: $roles of $(wc -l <"$WORK/logins.txt") demo accounts signed in ($(awk '{print $2}' "$WORK/logins.txt" | sort -u | tr '\n' ' '))"

count_patients() {
  local pw token
  pw=$(awk '$1 == "demo-front-desk" {print $3}' "$WORK/logins.txt")
  token=$(login demo-front-desk "$pw")
  "${C[@]}" "$BASE_URL/fhir/Patient?_summary=count" -H "authorization: Bearer $token" | jq -r .total
}
before=$(count_patients)
[ "$before" -ge 25 ] 2>/dev/null && say "demo data: $before synthetic patients" || fail "demo data: '$before' patients"

# docker stop: SIGTERM, at most 10 s before SIGKILL.
t=$(now)
docker stop -t 10 "$P-api" >/dev/null
stop_s=$(since "$t")
code=$(docker inspect -f '{{.State.ExitCode}}' "$P-api")
oom=$(docker inspect -f '{{.State.OOMKilled}}' "$P-api")
say "docker stop took $stop_s s, exit code $code"
awk -v s="$stop_s" 'BEGIN { exit !(s < 10) }' || fail "docker stop took $stop_s s (SIGKILL at 10 s)"
[ "$code" = 0 ] && [ "$oom" = false ] || fail "exit code $code after docker stop (137 = SIGKILL)"
api_log >/dev/null
grep -q '^carevault stopped' "$WORK/api.log" && say "api logged a clean stop" \
  || fail "no clean-stop line"

# Restart: same data, same logins.
t=$(now)
docker start "$P-api" >/dev/null
wait_healthy || exit 1
after=$(count_patients)
[ "$after" = "$before" ] && say "restart keeps data: $after patients, logins unchanged" \
  || fail "after restart: $after patients (before: $before)"
api_log >/dev/null
grep -q 'Demo data already seeded' "$WORK/api.log" || fail "restart re-seeded"

docker stop -t 10 "$P-api" >/dev/null
[ "$(docker inspect -f '{{.State.ExitCode}}' "$P-api")" = 0 ] || fail "second stop exit code"
if [ "$FAILED" = 0 ]; then say "PASS"; else say "FAILED"; fi
exit "$FAILED"

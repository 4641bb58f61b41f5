#!/usr/bin/env bash
# Installs the offline RustSec advisory-db snapshot where cargo-deny looks for it, so
# `cargo deny --offline check advisories` never touches the network.
#
# cargo-deny opens `<db-path>/<last url segment>-<xxhash64(url)>` and needs it to be a git
# repository (it reads the HEAD commit time to judge staleness). deny.toml sets
# db-path = "$CARGO_HOME/advisory-dbs" and db-urls = ["https://github.com/rustsec/advisory-db"],
# whose directory name is the constant below (printed by cargo-deny when it is missing).
#
# Usage: .ci/advisory-db.sh [SNAPSHOT_DIR]   (default: ../shared/rustsec-advisory-db beside the checkout)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
snapshot="${1:-${RUSTSEC_DB_SNAPSHOT:-$root/../shared/rustsec-advisory-db}}"
db_root="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
db="$db_root/advisory-db-3157b0e258782691"

if [[ ! -f "$snapshot/SNAPSHOT" || ! -d "$snapshot/crates" ]]; then
  echo "advisory-db: no snapshot at $snapshot (expected SNAPSHOT and crates/)" >&2
  exit 1
fi

stamp="$(cat "$snapshot/SNAPSHOT")"
if [[ -f "$db/.snapshot" && "$(cat "$db/.snapshot")" == "$stamp" ]] && git -C "$db" rev-parse -q --verify HEAD >/dev/null; then
  echo "advisory-db: up to date ($stamp)"
  exit 0
fi

rm -rf "$db"
mkdir -p "$db_root"
cp -R "$snapshot" "$db"
chmod -R u+w "$db"
printf '%s\n' "$stamp" > "$db/.snapshot"
# The commit carries the snapshot's own date, so `git log` shows how old the data is.
date="$(grep -oE '\([0-9]{4}-[0-9]{2}-[0-9]{2}\)' <<<"$stamp" | tr -d '()' || true)"
git -C "$db" init -q -b main
git -C "$db" add -A
GIT_AUTHOR_DATE="${date:+${date}T00:00:00Z}" GIT_COMMITTER_DATE="${date:+${date}T00:00:00Z}" \
  git -C "$db" -c user.name=carevault-ci -c user.email=ci@carevault.invalid -c commit.gpgsign=false \
  commit -q -m "RustSec advisory-db snapshot: $stamp"
echo "advisory-db: installed $stamp at $db"

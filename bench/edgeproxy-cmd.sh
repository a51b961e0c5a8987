#!/usr/bin/env bash
# Runs edgeproxy for ../shared/bench/run.sh: one listener, one backend.
#   edgeproxy-cmd.sh LISTEN_ADDR BACKEND_ADDR[,BACKEND_ADDR...] WORKDIR
# Env: EDGEPROXY (binary, default target/release/edgeproxy), BINDINGS=0 turns bindings off,
# POLICY=native decides with the native scorer instead of the embedded wasm policy, APP
# names the backend's app and the listener's (default: the listener serves every app),
# TLS_CERT and TLS_KEY make the listener terminate TLS with that pair, and any
# EDGEPROXY_* setting passes through.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
listen=$1 backend=$2 work=$3
db="$work/routing.db"
rm -f "$db" "$db-wal" "$db-shm"
bin=${EDGEPROXY:-$here/../target/release/edgeproxy}
"$bin" db init --db "$db" >/dev/null
i=0
for b in ${backend//,/ }; do  # BACKEND_ADDR may be a comma-separated list
  i=$((i + 1))
  "$bin" backend add "bench-$i" --db "$db" --app "${APP:-bench}" --region sa --country BR \
    --wg-ip "${b%:*}" --port "${b##*:}" --soft-limit 1000 >/dev/null
done
export EDGEPROXY_LISTEN_ADDR=$listen EDGEPROXY_DB_PATH=$db EDGEPROXY_REGION=sa
# The harness runs several proxies side by side: no admin listener unless asked for.
export EDGEPROXY_ADMIN_ADDR=${EDGEPROXY_ADMIN_ADDR:-}
# The harness's THREADS (1 by default: one worker per proxy core, as the peers run).
export EDGEPROXY_WORKER_THREADS=${EDGEPROXY_WORKER_THREADS:-${THREADS:-0}}
[ "${BINDINGS:-1}" = 0 ] && export EDGEPROXY_BINDING_TTL_SECS=0
[ "${POLICY:-wasm}" = native ] && export EDGEPROXY_NATIVE_POLICY=true
args=()
if [ -n "${APP:-}" ]; then
  printf '[[listener]]\naddr = "%s"\napp = "%s"\n' "$listen" "$APP" > "$work/edgeproxy.toml"
  args=(--config "$work/edgeproxy.toml")
fi
if [ -n "${TLS_CERT:-}" ]; then  # terminate TLS on the listener with this pair
  printf '[tls]\ncert = "%s"\nkey = "%s"\n[[listener]]\naddr = "%s"\ntls = "terminate"\n' \
    "$TLS_CERT" "$TLS_KEY" "$listen" > "$work/edgeproxy.toml"
  args=(--config "$work/edgeproxy.toml")
fi
exec "$bin" "${args[@]}" 2>>"$work/edgeproxy.log"

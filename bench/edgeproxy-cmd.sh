#!/usr/bin/env bash
# Runs edgeproxy for ../shared/bench/run.sh: one listener, one backend.
#   edgeproxy-cmd.sh LISTEN_ADDR BACKEND_ADDR WORKDIR
# Env: EDGEPROXY (binary, default target/release/edgeproxy), BINDINGS=0 turns bindings off,
# POLICY=native decides with the native scorer instead of the embedded wasm policy, and any
# EDGEPROXY_* setting passes through.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
listen=$1 backend=$2 work=$3
db="$work/routing.db"
rm -f "$db" "$db-wal" "$db-shm"
python3 - "$db" "${backend%:*}" "${backend##*:}" <<'PY'
import sqlite3, sys
db, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(db)
c.execute("""CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT NOT NULL, region TEXT NOT NULL,
  country TEXT NOT NULL, wg_ip TEXT NOT NULL, port INTEGER NOT NULL, healthy INTEGER NOT NULL DEFAULT 1,
  weight INTEGER NOT NULL DEFAULT 1, soft_limit INTEGER NOT NULL DEFAULT 100,
  hard_limit INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0)""")
c.execute("INSERT INTO backends VALUES ('bench-1','bench','sa','BR',?,?,1,1,1000,0,0)", (ip, port))
c.commit()
PY
export EDGEPROXY_LISTEN_ADDR=$listen EDGEPROXY_DB_PATH=$db EDGEPROXY_REGION=sa
# The harness's THREADS (1 by default: one worker per proxy core, as the peers run).
export EDGEPROXY_WORKER_THREADS=${EDGEPROXY_WORKER_THREADS:-${THREADS:-0}}
[ "${BINDINGS:-1}" = 0 ] && export EDGEPROXY_BINDING_TTL_SECS=0
[ "${POLICY:-wasm}" = native ] && export EDGEPROXY_NATIVE_POLICY=true
exec "${EDGEPROXY:-$here/../target/release/edgeproxy}" 2>>"$work/edgeproxy.log"

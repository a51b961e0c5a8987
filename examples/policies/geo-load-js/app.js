// The default policy in JavaScript: score = geo_score * 100 + (active / soft_limit) /
// weight, lowest wins; unhealthy backends and backends at their hard limit are skipped;
// ties go to the earlier candidate. It decides as the Rust default (policies/geo-load)
// does, which the proxy's tests check on live traffic.
//
// The proxy calls setTable once per routing-table version and pickBackend for each new
// client (see wit/policy.wit). What the policy keeps between calls lives in this module,
// per instance. `policy.js` holds the logic so `node --test` can run it natively.

import { pick } from "./policy.js";

let table = null;

export function setTable(t) {
  table = t;
}

export function pickBackend(app, client, candidates) {
  return table === null ? undefined : pick(table, client, candidates);
}

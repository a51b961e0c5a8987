// The decision, free of the component's glue so it runs under node too.

// 0: the client's country, 1: its region, 2: this POP's region, 3: elsewhere.
export function geoScore(backend, client, popRegion) {
  if (client.country !== undefined && client.country === backend.country) return 0;
  if (client.region !== undefined && client.region === backend.region) return 1;
  if (backend.region === popRegion) return 2;
  return 3;
}

export function eligible(backend, active) {
  return backend.healthy && (backend.hardLimit === 0 || active < backend.hardLimit);
}

// The position of the best candidate; `candidates` holds (index, active, rtt) triples.
export function pick(table, client, candidates) {
  let best;
  let bestScore = 0;
  for (let position = 0; position * 3 < candidates.length; position++) {
    const index = candidates[3 * position];
    const active = candidates[3 * position + 1];
    const backend = table.backends[index];
    if (!eligible(backend, active)) continue;
    const load = active / Math.max(backend.softLimit, 1) / Math.max(backend.weight, 1);
    const score = geoScore(backend, client, table.popRegion) * 100 + load;
    if (best === undefined || score < bestScore) {
      best = position;
      bestScore = score;
    }
  }
  return best;
}

// Unit tests of the decision, natively: npm test (node --test).
import { test } from "node:test";
import assert from "node:assert/strict";
import { pick } from "./policy.js";

const [SA, , EU, AP] = [0, 1, 2, 3];
const code = (c) => (c.charCodeAt(0) << 8) | c.charCodeAt(1);
const [BR, DE, JP] = ["BR", "DE", "JP"].map(code);
const backend = (id, region, country, o = {}) => ({
  id, app: 0, region, country, weight: 1, softLimit: 10, hardLimit: 0, healthy: true, ...o,
});
const table = (backends) => ({
  version: 1n, popRegion: EU, regions: ["sa", "us", "eu", "ap"], apps: ["web"], backends,
});
const client = (country, region) => ({
  ip: { tag: "ipv4", val: 0x0a000001 }, country, region, viaProxyProtocol: false, tls: false,
});
const cands = (...active) => new Uint32Array(active.flatMap((a, i) => [i, a, 0]));
const three = table([backend("br", SA, BR), backend("de", EU, DE), backend("jp", AP, JP)]);

test("the client's country wins", () => {
  assert.equal(pick(three, client(BR, SA), cands(0, 0, 0)), 0);
  assert.equal(pick(three, client(JP, AP), cands(0, 0, 0)), 2);
});

test("unknown clients go to the POP's region", () => {
  assert.equal(pick(three, client(), cands(0, 0, 0)), 1);
});

test("load breaks ties within a geo score", () => {
  const t = table([backend("a", SA, BR), backend("b", SA, BR, { weight: 2 })]);
  assert.equal(pick(t, client(BR, SA), cands(1, 1)), 1);
  assert.equal(pick(t, client(BR, SA), cands(0, 0)), 0);
});

test("ineligible backends are skipped, and none left refuses", () => {
  const t = table([
    backend("full", SA, BR, { hardLimit: 1 }),
    backend("down", SA, BR, { healthy: false }),
  ]);
  assert.equal(pick(t, client(BR, SA), cands(1, 0)), undefined);
  assert.equal(pick(t, client(BR, SA), cands(0, 0)), 0);
});

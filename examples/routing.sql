-- A routing table for three POP regions; load it with
--   sqlite3 routing.db < examples/routing.sql
-- (edgeproxy creates routing.db with this schema on first start if it is missing).
CREATE TABLE IF NOT EXISTS backends (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    region      TEXT NOT NULL,
    country     TEXT NOT NULL,
    wg_ip       TEXT NOT NULL,
    port        INTEGER NOT NULL,
    healthy     INTEGER NOT NULL DEFAULT 1,
    weight      INTEGER NOT NULL DEFAULT 1,
    soft_limit  INTEGER NOT NULL DEFAULT 100,
    hard_limit  INTEGER NOT NULL DEFAULT 0,
    deleted     INTEGER NOT NULL DEFAULT 0
);
INSERT OR REPLACE INTO backends VALUES
  ('sa-gru-1', 'web', 'sa', 'BR', '10.50.1.1', 8080, 1, 2, 100, 500, 0),
  ('sa-gru-2', 'web', 'sa', 'BR', '10.50.1.2', 8080, 1, 1, 100, 500, 0),
  ('eu-fra-1', 'web', 'eu', 'DE', '10.50.2.1', 8080, 1, 2, 100, 500, 0),
  ('us-iad-1', 'web', 'us', 'US', '10.50.3.1', 8080, 1, 2, 100, 500, 0),
  ('ap-nrt-1', 'web', 'ap', 'JP', '10.50.4.1', 8080, 1, 1, 100, 500, 0);

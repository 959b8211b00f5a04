-- Control's durable state. One schema for SQLite and PostgreSQL: only types both
-- understand (TEXT, BIGINT), times as BIGINT Unix seconds, "never" as the largest
-- BIGINT (9223372036854775807). Ids are TEXT made by control (tun_…, own_…, …).
-- Applied by control at start (sqlx migrations, embedded in the binary); never edit a
-- migration once released: add the next one.

-- Who owns tunnels and API keys (an API key's or token's subject). Anonymous quick
-- tunnels have no owner.
CREATE TABLE owners (
    id TEXT PRIMARY KEY,
    -- The subject as tokens carry it (e.g. "ci-bot"); unique so a subject maps to one owner.
    subject TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);

-- Tunnels and the names they hold: a name belongs to at most one tunnel (UNIQUE), so
-- of concurrent claims exactly one wins, whatever the number of replicas.
CREATE TABLE tunnels (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id TEXT REFERENCES owners (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    -- The hold: the name is free for others once now >= expires_at.
    expires_at BIGINT NOT NULL
);
CREATE INDEX tunnels_expires_at ON tunnels (expires_at);
CREATE INDEX tunnels_owner ON tunnels (owner_id);

-- Deleted tunnels whose recreate tokens are refused until until_at.
CREATE TABLE tombstones (
    tunnel_id TEXT PRIMARY KEY,
    until_at BIGINT NOT NULL
);
CREATE INDEX tombstones_until_at ON tombstones (until_at);

-- Signing keys control generated for itself (only when no --signing-key is given).
-- generation 1 is the first; the highest unretired one signs. Unique generations make
-- replicas starting at once agree on one key.
CREATE TABLE signing_keys (
    generation BIGINT PRIMARY KEY,
    kid TEXT NOT NULL UNIQUE,
    -- Ed25519 PKCS#8 DER, base64 (standard alphabet). A secret: back the database up
    -- as one.
    pkcs8 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

-- Long-lived API keys (nbk_…): only a hash is stored; prefix is shown for display.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES owners (id) ON DELETE CASCADE,
    prefix TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    -- Space-separated scopes.
    scopes TEXT NOT NULL,
    -- Optional name pattern the key is limited to (e.g. ci-*).
    name_pattern TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_owner ON api_keys (owner_id);

-- Tunnel credentials (nbt_…): run one tunnel indefinitely; only a hash is stored.
CREATE TABLE tunnel_credentials (
    id TEXT PRIMARY KEY,
    tunnel_id TEXT NOT NULL REFERENCES tunnels (id) ON DELETE CASCADE,
    prefix TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX tunnel_credentials_tunnel ON tunnel_credentials (tunnel_id);

-- What was done, by whom, to what. Append-only; ids sort by time (made by control).
CREATE TABLE audit_events (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    -- The subject that acted (owner subject, "bootstrap", "anonymous", "control").
    actor TEXT NOT NULL,
    -- e.g. tunnel.create, tunnel.delete, api_key.revoke.
    action TEXT NOT NULL,
    -- The object acted on (a tunnel id, an API key id…), if any.
    target TEXT,
    -- JSON with details; never a secret.
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_at ON audit_events (at);

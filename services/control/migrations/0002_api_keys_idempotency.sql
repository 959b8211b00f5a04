-- API keys are looked up by the hash of the key a caller presents (a SHA-256 of a
-- 256-bit random secret, see docs/security.md): one row per hash.
CREATE UNIQUE INDEX api_keys_secret_hash ON api_keys (secret_hash);

-- Idempotency keys of tunnel creation: the same key from the same owner (a token's
-- subject) within expires_at gives back the same tunnel. tunnel_id is '' while the
-- first request is still creating it; request_hash tells a repeat of the same request
-- from a different one reusing the key.
CREATE TABLE idempotency_keys (
    owner TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    tunnel_id TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (owner, idem_key)
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

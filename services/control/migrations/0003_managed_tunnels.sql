-- Managed tunnels (platforms): enrolment by external id, disable/enable, and an audit
-- trail that says who, from where, about which tunnel and owner.

-- A disabled tunnel keeps its name (it is held whatever its expires_at) and is refused
-- to agents and viewers until enabled. expires_before_disable is the hold it had, so
-- enabling gives a named tunnel back its hold until deleted.
ALTER TABLE tunnels ADD COLUMN disabled_at BIGINT;
ALTER TABLE tunnels ADD COLUMN expires_before_disable BIGINT;

-- One tunnel per (owner, external id): the same enrolment from a platform gives back
-- the same tunnel on any replica. tunnel_id is '' while the first request creates it.
-- policy is the access policy and limits given at enrolment (JSON), applied whenever an
-- agent runs the tunnel with its credential.
CREATE TABLE enrollments (
    owner TEXT NOT NULL,
    external_id TEXT NOT NULL,
    tunnel_id TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    policy TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    PRIMARY KEY (owner, external_id)
);
CREATE INDEX enrollments_tunnel ON enrollments (tunnel_id);

-- The audit trail says from where (the client address), with which API key (if the
-- management token came from one), about which tunnel and whose.
ALTER TABLE audit_events ADD COLUMN address TEXT;
ALTER TABLE audit_events ADD COLUMN key_id TEXT;
ALTER TABLE audit_events ADD COLUMN tunnel_id TEXT;
ALTER TABLE audit_events ADD COLUMN owner TEXT;
CREATE INDEX audit_events_tunnel ON audit_events (tunnel_id, at);
CREATE INDEX audit_events_owner ON audit_events (owner, at);

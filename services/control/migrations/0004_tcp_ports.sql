-- Public ports of TCP tunnels (`kind = "tcp"`, issue 17): a port belongs to at most one
-- tunnel (PRIMARY KEY) and a tunnel holds at most one port (UNIQUE), so of concurrent
-- allocations exactly one wins each port, whatever the number of replicas. A row
-- whose tunnel is gone (deleted or expired) is freed by the next allocation. No
-- foreign key: the same statements run on SQLite and PostgreSQL, and a stale row costs
-- nothing until its port is needed.
CREATE TABLE tcp_ports (
    port BIGINT PRIMARY KEY,
    tunnel_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

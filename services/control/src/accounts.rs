//! Owners' durable records beside the tunnels: API keys (only their hashes), the
//! idempotency keys of tunnel creation, and the audit trail. The contract is
//! [`AccountStore`], a part of every [`crate::store::ControlStore`]; the one
//! implementation is on [`SqlStore`] (SQLite and PostgreSQL, the same SQL), with the
//! portability rules of [`crate::sql_store`].

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::sql_store::{SqlStore, db_now, db_time, from_db_time};
use crate::store::StoreFuture;

/// Most API keys one owner may hold (revoked ones included until they are deleted);
/// past it creation is refused, so one token cannot grow the table without bound.
pub const MAX_API_KEYS_PER_OWNER: i64 = 100;
/// Most keys one list returns.
pub const MAX_API_KEYS_LISTED: i64 = 1000;

/// A fresh id: `kind_` and 26 hex digits (104 random bits).
pub fn new_id(kind: &str) -> String {
    let r: u128 = rand::random();
    format!("{kind}_{:026x}", r & ((1u128 << 104) - 1))
}

/// An API key as stored (never its secret; its hash is not read back either).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// `key_…`.
    pub id: String,
    /// The owner's subject (what management tokens minted from it carry as `sub`).
    pub owner: String,
    /// The key's first characters (`nbk_` and 8 more), to tell keys apart.
    pub prefix: String,
    /// What the owner calls it.
    pub label: String,
    /// Scopes it grants (at most these).
    pub scopes: Vec<String>,
    /// Names it is limited to (`ci-*`), if any.
    pub name_pattern: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; `None`: never.
    pub expires_at: Option<u64>,
    /// Unix seconds of its last use (to within the verification cache's lifetime).
    pub last_used_at: Option<u64>,
    /// Unix seconds; `None`: in force.
    pub revoked_at: Option<u64>,
}

/// One row of the audit trail. `detail` is JSON and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditEvent {
    /// The row id to use (`None`: control makes one that sorts by time). An event that
    /// may be sent twice (an edge's link event) brings its own, so the second insert is
    /// ignored.
    pub id: Option<String>,
    /// Who acted: a subject, `bootstrap` or `anonymous`.
    pub actor: String,
    /// `tunnel.create`, `tunnel.delete`, `api_key.create`, `api_key.revoke`, … (see
    /// docs/control.md, "Audit trail").
    pub action: String,
    /// What was acted on (a tunnel id, an API key id).
    pub target: Option<String>,
    /// Details as a JSON object.
    pub detail: serde_json::Value,
    /// The client address the request came from.
    pub address: Option<String>,
    /// The API key the actor authenticated with, when the bearer was one.
    pub key_id: Option<String>,
    /// The tunnel it concerns.
    pub tunnel_id: Option<String>,
    /// The subject owning what was acted on.
    pub owner: Option<String>,
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Row id (sorts by time).
    pub id: String,
    /// Unix seconds.
    pub at: u64,
    /// The event.
    pub event: AuditEvent,
}

/// Which audit events to list (every field narrows; `None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// About this tunnel.
    pub tunnel_id: Option<String>,
    /// About this owner's objects.
    pub owner: Option<String>,
    /// This action.
    pub action: Option<String>,
    /// At or after (Unix seconds).
    pub since: Option<u64>,
    /// Ids after this one (the previous page's last).
    pub after_id: Option<String>,
    /// Most rows.
    pub limit: usize,
}

/// What [`AccountStore::enroll_begin`] found for an (owner, external id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrollment {
    /// New: this request creates the tunnel, then calls
    /// [`AccountStore::enroll_finish`] (or `enroll_abandon` if it fails).
    First,
    /// Known: its tunnel (empty while the first request is creating it) and when that
    /// request started.
    Seen {
        /// The tunnel; empty while being created.
        tunnel_id: String,
        /// Unix seconds the row was taken (to recover from a creator that died).
        created_at: u64,
    },
}

/// What [`AccountStore::idempotency_begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// The key is new (or its earlier use lapsed): this request creates the tunnel and
    /// then calls [`AccountStore::idempotency_finish`] (or `_abandon` if it fails).
    First,
    /// An earlier request holds the key: the hash of its request, and its tunnel id
    /// (empty while it is still creating it).
    Seen {
        /// The earlier request's hash.
        request_hash: String,
        /// Its tunnel; empty while being created.
        tunnel_id: String,
    },
}

/// Durable records of owners' keys, idempotency keys and audit events.
pub trait AccountStore {
    /// Stores a new API key for `key.owner` (making the owner if needed). Refused
    /// (Ok(false)) when the owner already holds [`MAX_API_KEYS_PER_OWNER`] keys.
    fn create_api_key<'a>(
        &'a self,
        key: &'a ApiKeyRecord,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, bool>;
    /// The key whose secret hashes to `secret_hash`, revoked and expired ones included.
    fn api_key_by_hash<'a>(&'a self, secret_hash: &'a str)
    -> StoreFuture<'a, Option<ApiKeyRecord>>;
    /// Keys of `owner` (every owner's with `None`), newest first, at most
    /// [`MAX_API_KEYS_LISTED`].
    fn list_api_keys<'a>(&'a self, owner: Option<&'a str>) -> StoreFuture<'a, Vec<ApiKeyRecord>>;
    /// One key by id.
    fn api_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<ApiKeyRecord>>;
    /// Marks a key revoked at `now` (a revoked key keeps its first revocation time).
    fn revoke_api_key<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, ()>;
    /// Records a use of the key at `now`.
    fn touch_api_key<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, ()>;
    /// Takes idempotency key `key` of `owner` for a request hashing to `request_hash`
    /// until `until`, atomically: of concurrent calls (any replica) exactly one gets
    /// [`Idempotency::First`]. A use that lapsed at `now` is forgotten first.
    fn idempotency_begin<'a>(
        &'a self,
        owner: &'a str,
        key: &'a str,
        request_hash: &'a str,
        now: u64,
        until: u64,
    ) -> StoreFuture<'a, Idempotency>;
    /// Records the tunnel the first request made.
    fn idempotency_finish<'a>(
        &'a self,
        owner: &'a str,
        key: &'a str,
        tunnel_id: &'a str,
    ) -> StoreFuture<'a, ()>;
    /// Frees the key after the first request failed, so a retry can create.
    fn idempotency_abandon<'a>(&'a self, owner: &'a str, key: &'a str) -> StoreFuture<'a, ()>;
    /// Appends an audit event at `now` (an event whose `id` is already stored is
    /// ignored).
    fn audit<'a>(&'a self, event: &'a AuditEvent, now: u64) -> StoreFuture<'a, ()>;
    /// Audit events matching `filter`, oldest first.
    fn list_audit<'a>(&'a self, filter: &'a AuditFilter) -> StoreFuture<'a, Vec<AuditRow>>;
    /// Deletes audit events older than `before` (Unix seconds); how many.
    fn prune_audit(&self, before: u64) -> StoreFuture<'_, u64>;
    /// Takes (owner, external id) for a new enrolment at `now`, atomically: of
    /// concurrent calls (any replica) exactly one gets [`Enrollment::First`]. `labels`
    /// and `policy` (JSON) are stored with it.
    fn enroll_begin<'a>(
        &'a self,
        owner: &'a str,
        external_id: &'a str,
        labels: &'a str,
        policy: &'a str,
        now: u64,
    ) -> StoreFuture<'a, Enrollment>;
    /// Records the tunnel the first request made.
    fn enroll_finish<'a>(
        &'a self,
        owner: &'a str,
        external_id: &'a str,
        tunnel_id: &'a str,
    ) -> StoreFuture<'a, ()>;
    /// Frees the enrolment after its first request failed.
    fn enroll_abandon<'a>(&'a self, owner: &'a str, external_id: &'a str) -> StoreFuture<'a, ()>;
    /// Takes the enrolment over for a new creation when it still says `seen` (its
    /// tunnel deleted, or its creator gone since it took the row at `seen.1`): true for the one caller
    /// that wins; it then creates as for [`Enrollment::First`].
    fn enroll_retake<'a>(
        &'a self,
        owner: &'a str,
        external_id: &'a str,
        seen: (&'a str, u64),
        labels: &'a str,
        policy: &'a str,
        now: u64,
    ) -> StoreFuture<'a, bool>;
    /// The access policy (JSON) stored at enrolment for `tunnel_id`, if it was enrolled.
    fn enrolled_policy<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Option<String>>;
    /// Appends an audit event with the caller's row id `id` (an edge's event id), once:
    /// a second write of the same id changes nothing (events resent after a reconnect
    /// or a control restart are not doubled).
    fn audit_once<'a>(&'a self, id: &'a str, event: &'a AuditEvent, at: u64)
    -> StoreFuture<'a, ()>;
}

const KEY_COLS: &str = "k.id, o.subject AS owner, k.prefix, k.label, k.scopes, k.name_pattern, \
     k.created_at, k.expires_at, k.last_used_at, k.revoked_at";

fn key_record(r: &AnyRow) -> Result<ApiKeyRecord, sqlx::Error> {
    let opt = |c: &str| -> Result<Option<u64>, sqlx::Error> {
        Ok(r.try_get::<Option<i64>, _>(c)?.map(from_db_time))
    };
    let scopes: String = r.try_get("scopes")?;
    Ok(ApiKeyRecord {
        id: r.try_get("id")?,
        owner: r.try_get("owner")?,
        prefix: r.try_get("prefix")?,
        label: r.try_get("label")?,
        scopes: scopes.split_whitespace().map(str::to_string).collect(),
        name_pattern: r.try_get("name_pattern")?,
        created_at: from_db_time(r.try_get("created_at")?),
        expires_at: opt("expires_at")?,
        last_used_at: opt("last_used_at")?,
        revoked_at: opt("revoked_at")?,
    })
}

impl SqlStore {
    fn key_query<'a>(
        &'a self,
        what: &'static str,
        sql: String,
        binds: Vec<String>,
    ) -> StoreFuture<'a, Vec<ApiKeyRecord>> {
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed(what, async move {
                let mut q = sqlx::query(&sql);
                for b in binds {
                    q = q.bind(b);
                }
                let rows = q.fetch_all(&p).await?;
                rows.iter().map(key_record).collect()
            })
            .await
        })
    }
}

impl AccountStore for SqlStore {
    fn create_api_key<'a>(
        &'a self,
        key: &'a ApiKeyRecord,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, bool> {
        let key = key.clone();
        let secret_hash = secret_hash.to_owned();
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("storing an API key", async move {
                let mut tx = p.begin().await?;
                let now = db_time(key.created_at);
                sqlx::query(
                    "INSERT INTO owners (id, subject, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (subject) DO NOTHING",
                )
                .bind(new_id("own"))
                .bind(key.owner.clone())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let owner_id: String = sqlx::query("SELECT id FROM owners WHERE subject = $1")
                    .bind(key.owner.clone())
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("id")?;
                let held: i64 =
                    sqlx::query("SELECT COUNT(*) AS n FROM api_keys WHERE owner_id = $1")
                        .bind(owner_id.clone())
                        .fetch_one(&mut *tx)
                        .await?
                        .try_get("n")?;
                if held >= MAX_API_KEYS_PER_OWNER {
                    tx.rollback().await?;
                    return Ok(false);
                }
                sqlx::query(
                    "INSERT INTO api_keys (id, owner_id, prefix, secret_hash, label, scopes, \
                       name_pattern, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(key.id.clone())
                .bind(owner_id)
                .bind(key.prefix.clone())
                .bind(secret_hash)
                .bind(key.label.clone())
                .bind(key.scopes.join(" "))
                .bind(key.name_pattern.clone())
                .bind(now)
                .bind(key.expires_at.map(db_time))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            })
            .await
        })
    }

    fn api_key_by_hash<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, Option<ApiKeyRecord>> {
        let fut = self.key_query(
            "reading an API key",
            format!(
                "SELECT {KEY_COLS} FROM api_keys k JOIN owners o ON o.id = k.owner_id \
                 WHERE k.secret_hash = $1"
            ),
            vec![secret_hash.to_owned()],
        );
        Box::pin(async move { Ok(fut.await?.into_iter().next()) })
    }

    fn list_api_keys<'a>(&'a self, owner: Option<&'a str>) -> StoreFuture<'a, Vec<ApiKeyRecord>> {
        self.key_query(
            "listing API keys",
            format!(
                "SELECT {KEY_COLS} FROM api_keys k JOIN owners o ON o.id = k.owner_id \
                 WHERE ($1 = '' OR o.subject = $1) \
                 ORDER BY k.created_at DESC, k.id LIMIT {MAX_API_KEYS_LISTED}"
            ),
            vec![owner.unwrap_or("").to_owned()],
        )
    }

    fn api_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<ApiKeyRecord>> {
        let fut = self.key_query(
            "reading an API key",
            format!(
                "SELECT {KEY_COLS} FROM api_keys k JOIN owners o ON o.id = k.owner_id \
                 WHERE k.id = $1"
            ),
            vec![id.to_owned()],
        );
        Box::pin(async move { Ok(fut.await?.into_iter().next()) })
    }

    fn revoke_api_key<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, ()> {
        let q =
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id.to_owned())
                .bind(db_time(now));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("revoking an API key", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn touch_api_key<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, ()> {
        let q = sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
            .bind(id.to_owned())
            .bind(db_time(now));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("recording an API key's use", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn idempotency_begin<'a>(
        &'a self,
        owner: &'a str,
        key: &'a str,
        request_hash: &'a str,
        now: u64,
        until: u64,
    ) -> StoreFuture<'a, Idempotency> {
        let (owner, key, hash) = (owner.to_owned(), key.to_owned(), request_hash.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("taking an idempotency key", async move {
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE owner = $1 AND idem_key = $2 \
                     AND expires_at <= $3",
                )
                .bind(owner.clone())
                .bind(key.clone())
                .bind(db_now(now))
                .execute(&p)
                .await?;
                // The primary key makes one insert of concurrent ones win (PostgreSQL
                // makes the others wait for it, then do nothing).
                let won = sqlx::query(
                    "INSERT INTO idempotency_keys (owner, idem_key, request_hash, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, idem_key) DO NOTHING",
                )
                .bind(owner.clone())
                .bind(key.clone())
                .bind(hash)
                .bind(db_time(now))
                .bind(db_time(until))
                .execute(&p)
                .await?
                .rows_affected();
                if won == 1 {
                    return Ok(Idempotency::First);
                }
                let row = sqlx::query(
                    "SELECT request_hash, tunnel_id FROM idempotency_keys \
                     WHERE owner = $1 AND idem_key = $2",
                )
                .bind(owner)
                .bind(key)
                .fetch_optional(&p)
                .await?;
                Ok(match row {
                    Some(r) => Idempotency::Seen {
                        request_hash: r.try_get("request_hash")?,
                        tunnel_id: r.try_get("tunnel_id")?,
                    },
                    // Abandoned between the insert and the read: the caller retries.
                    None => Idempotency::Seen {
                        request_hash: String::new(),
                        tunnel_id: String::new(),
                    },
                })
            })
            .await
        })
    }

    fn list_audit<'a>(&'a self, filter: &'a AuditFilter) -> StoreFuture<'a, Vec<AuditRow>> {
        self.list_audit_rows(filter)
    }

    fn prune_audit(&self, before: u64) -> StoreFuture<'_, u64> {
        let q = sqlx::query("DELETE FROM audit_events WHERE at < $1").bind(db_time(before));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("pruning audit events", async move {
                q.execute(&p).await.map(|r| r.rows_affected())
            })
            .await
        })
    }

    fn enroll_begin<'a>(
        &'a self,
        owner: &'a str,
        external_id: &'a str,
        labels: &'a str,
        policy: &'a str,
        now: u64,
    ) -> StoreFuture<'a, Enrollment> {
        let (owner, ext) = (owner.to_owned(), external_id.to_owned());
        let (labels, policy) = (labels.to_owned(), policy.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("taking an enrolment", async move {
                // The primary key makes one insert of concurrent ones win.
                let won = sqlx::query(
                    "INSERT INTO enrollments (owner, external_id, labels, policy, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, external_id) DO NOTHING",
                )
                .bind(owner.clone())
                .bind(ext.clone())
                .bind(labels)
                .bind(policy)
                .bind(db_time(now))
                .execute(&p)
                .await?
                .rows_affected();
                if won == 1 {
                    return Ok(Enrollment::First);
                }
                let row = sqlx::query(
                    "SELECT tunnel_id, created_at FROM enrollments \
                     WHERE owner = $1 AND external_id = $2",
                )
                .bind(owner)
                .bind(ext)
                .fetch_optional(&p)
                .await?;
                Ok(match row {
                    Some(r) => Enrollment::Seen {
                        tunnel_id: r.try_get("tunnel_id")?,
                        created_at: from_db_time(r.try_get("created_at")?),
                    },
                    // Abandoned between the insert and the read: the caller retries.
                    None => Enrollment::Seen {
                        tunnel_id: String::new(),
                        created_at: now,
                    },
                })
            })
            .await
        })
    }

    fn enroll_finish<'a>(
        &'a self,
        owner: &'a str,
        external_id: &'a str,
        tunnel_id: &'a str,
    ) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "UPDATE enrollments SET tunnel_id = $3 WHERE owner = $1 AND external_id = $2",
        )
        .bind(owner.to_owned())
        .bind(external_id.to_owned())
        .bind(tunnel_id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("recording an enrolment's tunnel", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn enroll_abandon<'a>(&'a self, owner: &'a str, external_id: &'a str) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "DELETE FROM enrollments WHERE owner = $1 AND external_id = $2 AND tunnel_id = ''",
        )
        .bind(owner.to_owned())
        .bind(external_id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("freeing an enrolment", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn enroll_retake<'a>(
        &'a self,
        owner: &'a str,
        external_id: &'a str,
        (seen, seen_at): (&'a str, u64),
        labels: &'a str,
        policy: &'a str,
        now: u64,
    ) -> StoreFuture<'a, bool> {
        // Compare-and-set on what the caller saw: one of concurrent retakes wins.
        let q = sqlx::query(
            "UPDATE enrollments SET tunnel_id = '', created_at = $5, labels = $6, policy = $7 \
             WHERE owner = $1 AND external_id = $2 AND tunnel_id = $3 AND created_at = $4",
        )
        .bind(owner.to_owned())
        .bind(external_id.to_owned())
        .bind(seen.to_owned())
        .bind(db_time(seen_at))
        .bind(db_time(now))
        .bind(labels.to_owned())
        .bind(policy.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("retaking an enrolment", async move {
                q.execute(&p).await.map(|r| r.rows_affected() == 1)
            })
            .await
        })
    }

    fn enrolled_policy<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Option<String>> {
        let q = sqlx::query("SELECT policy FROM enrollments WHERE tunnel_id = $1 LIMIT 1")
            .bind(tunnel_id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("reading an enrolment's policy", async move {
                match q.fetch_optional(&p).await? {
                    Some(r) => Ok(Some(r.try_get("policy")?)),
                    None => Ok(None),
                }
            })
            .await
        })
    }

    fn idempotency_finish<'a>(
        &'a self,
        owner: &'a str,
        key: &'a str,
        tunnel_id: &'a str,
    ) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "UPDATE idempotency_keys SET tunnel_id = $3 WHERE owner = $1 AND idem_key = $2",
        )
        .bind(owner.to_owned())
        .bind(key.to_owned())
        .bind(tunnel_id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("recording an idempotency key's tunnel", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn idempotency_abandon<'a>(&'a self, owner: &'a str, key: &'a str) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "DELETE FROM idempotency_keys WHERE owner = $1 AND idem_key = $2 AND tunnel_id = ''",
        )
        .bind(owner.to_owned())
        .bind(key.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("freeing an idempotency key", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn audit<'a>(&'a self, event: &'a AuditEvent, now: u64) -> StoreFuture<'a, ()> {
        let id = event.id.clone().unwrap_or_else(audit_id);
        let q = sqlx::query(
            "INSERT INTO audit_events \
               (id, at, actor, action, target, detail, address, key_id, tunnel_id, owner) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(db_time(now))
        .bind(event.actor.clone())
        .bind(event.action.clone())
        .bind(event.target.clone())
        .bind(event.detail.to_string())
        .bind(event.address.clone())
        .bind(event.key_id.clone())
        .bind(event.tunnel_id.clone())
        .bind(event.owner.clone());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("writing an audit event", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn audit_once<'a>(
        &'a self,
        id: &'a str,
        event: &'a AuditEvent,
        at: u64,
    ) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "INSERT INTO audit_events \
               (id, at, actor, action, target, detail, address, key_id, tunnel_id, owner) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_owned())
        .bind(db_time(at))
        .bind(event.actor.clone())
        .bind(event.action.clone())
        .bind(event.target.clone())
        .bind(event.detail.to_string())
        .bind(event.address.clone())
        .bind(event.key_id.clone())
        .bind(event.tunnel_id.clone())
        .bind(event.owner.clone());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("writing an audit event", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }
}

/// A fresh audit id that sorts by time: `aud_`, the time in nanoseconds (20 digits),
/// then random bits for ties. Within this process ids only grow, even if the clock
/// steps back.
pub fn audit_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    let mut prev = LAST.load(Ordering::Relaxed);
    let nanos = loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break next,
            Err(p) => prev = p,
        }
    };
    format!("aud_{nanos:020}_{:08x}", rand::random::<u32>())
}

fn audit_row(r: &AnyRow) -> Result<AuditRow, sqlx::Error> {
    let detail: String = r.try_get("detail")?;
    Ok(AuditRow {
        id: r.try_get("id")?,
        at: from_db_time(r.try_get("at")?),
        event: AuditEvent {
            id: None,
            actor: r.try_get("actor")?,
            action: r.try_get("action")?,
            target: r.try_get("target")?,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            address: r.try_get("address")?,
            key_id: r.try_get("key_id")?,
            tunnel_id: r.try_get("tunnel_id")?,
            owner: r.try_get("owner")?,
        },
    })
}

impl SqlStore {
    pub(crate) fn list_audit_rows<'a>(
        &'a self,
        f: &'a AuditFilter,
    ) -> StoreFuture<'a, Vec<AuditRow>> {
        // Empty strings stand for "any" so one statement (and one parameter list)
        // serves every filter on both databases.
        let q = sqlx::query(
            "SELECT id, at, actor, action, target, detail, address, key_id, tunnel_id, owner \
             FROM audit_events \
             WHERE ($1 = '' OR tunnel_id = $1) AND ($2 = '' OR owner = $2) \
               AND ($3 = '' OR action = $3) AND at >= $4 AND id > $5 \
             ORDER BY id LIMIT $6",
        )
        .bind(f.tunnel_id.clone().unwrap_or_default())
        .bind(f.owner.clone().unwrap_or_default())
        .bind(f.action.clone().unwrap_or_default())
        .bind(db_time(f.since.unwrap_or(0)))
        .bind(f.after_id.clone().unwrap_or_default())
        .bind(i64::try_from(f.limit).unwrap_or(i64::MAX));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("listing audit events", async move {
                q.fetch_all(&p).await?.iter().map(audit_row).collect()
            })
            .await
        })
    }
}

//! The durable store: tunnels, names, tombstones and control's generated signing key in
//! SQL, through `sqlx`, one implementation for SQLite and PostgreSQL.
//!
//! - **SQLite** (`sqlite:///var/lib/netbore/control.db`, the binary's default; or
//!   `sqlite::memory:` for `netbore dev` and tests): one control replica. A file is
//!   opened in WAL mode with a busy timeout ([`SQLITE_BUSY_TIMEOUT`]), created with its
//!   directory if missing.
//! - **PostgreSQL** (`postgres://USER@HOST:PORT/DB`): any number of replicas. The
//!   password comes from the URL, `--database-password-file` or
//!   `NETBORE_DATABASE_PASSWORD` ([`with_password`]); URLs are shown redacted
//!   ([`redact_url`]) in every log line and error.
//!
//! The same SQL runs on both through sqlx's `Any` driver: `$N` placeholders (SQLite
//! reads them as numbered parameters), `INSERT … ON CONFLICT`, `RETURNING`, only
//! `TEXT` and `BIGINT` columns. Times are BIGINT Unix seconds; a time past `i64::MAX`
//! is stored as [`NEVER`].
//!
//! The schema lives in `migrations/` (embedded, see [`MIGRATOR`]) and is applied
//! before the first operation; on PostgreSQL the migrator holds an advisory lock, so
//! replicas starting at once apply each migration once (the others wait, then see it
//! applied).
//!
//! Every race is settled by the database: a name is `UNIQUE`, so of concurrent claims
//! exactly one inserts it (a loser's insert fails on the constraint and the claim is
//! retried, finding the winner); tombstones only lengthen (`ON CONFLICT … DO UPDATE`
//! keeping the later time); two replicas generating a signing key at once insert the
//! same generation and one insert wins.
//!
//! For the tables the next steps use (owners, API keys, tunnel credentials, audit
//! events), see `migrations/0001_initial.sql`: add methods here beside the ones below,
//! with the same error handling ([`SqlStore::unavailable`]) and the same portability
//! rules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use netbore_tokens::{KeySet, Secret};
use sqlx::AnyPool;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{Executor, Row};

use crate::ConfigError;
use crate::store::{
    Claim, ControlStore, CredentialRecord, NEVER, StoreError, StoreFuture, TunnelRecord,
};

/// The schema, embedded from `services/control/migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The database the `netbore-control` binary uses when given none (see
/// docs/decisions.md).
pub const DEFAULT_DATABASE_URL: &str = "sqlite:///var/lib/netbore/control.db";
/// An SQLite database in this process's memory, lost when it exits (`netbore dev`,
/// tests).
pub const MEMORY_URL: &str = "sqlite::memory:";
/// Longest wait for any one database call; past it the call fails as unavailable.
pub const DB_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a pooled connection (part of [`DB_CALL_TIMEOUT`]).
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the migrations, which on PostgreSQL includes waiting for another
/// replica that is applying them.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an SQLite connection waits for another writer before failing.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections to PostgreSQL per replica.
pub const POSTGRES_MAX_CONNECTIONS: u32 = 16;
/// Connections to an SQLite file (writers take turns; readers run beside them in WAL).
pub const SQLITE_MAX_CONNECTIONS: u32 = 4;
/// How often expired tunnels and tombstones are deleted (seconds; by whichever
/// operation comes first after the interval).
pub const SWEEP_INTERVAL_SECS: u64 = 60;
/// Tunnel ids per `UPDATE` of [`ControlStore::refresh`] (well under every database's
/// limit on parameters).
pub const REFRESH_BATCH: usize = 500;
/// Attempts of one claim that lost a race on the name's unique constraint (the next
/// attempt sees the winner and returns [`Claim::Taken`]).
const CLAIM_ATTEMPTS: usize = 4;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, a file or in memory.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// `url` with any password (`user:password@`, `password=` in the query) replaced by
/// `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

/// Puts `password` into a PostgreSQL URL that has none (from `--database-password-file`
/// or `NETBORE_DATABASE_PASSWORD`, so the URL itself can live in a ConfigMap). A URL
/// that already carries a password is an error: two sources would silently disagree.
pub fn with_password(url: &str, password: &Secret) -> Result<Secret, ConfigError> {
    let shown = redact_url(url);
    let mut u = url::Url::parse(url).map_err(|e| {
        ConfigError(format!(
            "--database-url '{shown}' is not a URL ({e}); use postgres://USER@HOST:PORT/DB"
        ))
    })?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(ConfigError(format!(
            "a database password was given but --database-url '{shown}' is not PostgreSQL; drop --database-password-file (NETBORE_DATABASE_PASSWORD) or use postgres://USER@HOST:PORT/DB"
        )));
    }
    if u.password().is_some() {
        return Err(ConfigError(format!(
            "--database-url '{shown}' already carries a password and one was also given by --database-password-file (NETBORE_DATABASE_PASSWORD); keep one of the two"
        )));
    }
    u.set_password(Some(password.expose().trim()))
        .map_err(|_| ConfigError(format!("--database-url '{shown}' cannot carry a password; give it a user: postgres://USER@HOST:PORT/DB")))?;
    Ok(Secret::new(u.to_string()))
}

/// Which database `url` names, or an error naming the accepted forms.
pub fn backend_of(url: &str) -> Result<Backend, ConfigError> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(ConfigError(format!(
            "--database-url '{}' is neither SQLite nor PostgreSQL; use sqlite:///PATH/control.db (one replica), sqlite::memory: (nothing kept) or postgres://USER@HOST:PORT/DB (several replicas)",
            redact_url(url)
        )))
    }
}

/// Control's durable state in one SQL database. Cheap to share behind an `Arc`; the
/// pool reconnects by itself.
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// The URL without its password, for messages.
    shown_url: String,
    /// The password, so a driver message that quotes it can be scrubbed.
    password: Option<Secret>,
    migrated: tokio::sync::OnceCell<()>,
    next_sweep: AtomicU64,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .field("url", &self.shown_url)
            .finish()
    }
}

/// The columns [`record`] reads, for a query on `tunnels`: the owner's subject comes
/// from `owners` by a subquery (which `RETURNING` allows on both databases, where a
/// join is not).
macro_rules! tunnel_cols {
    () => {
        "id, name, created_at, expires_at, disabled_at, \
         (SELECT o.subject FROM owners o WHERE o.id = tunnels.owner_id) AS owner"
    };
}

pub(crate) fn db_time(t: u64) -> i64 {
    t.min(NEVER) as i64
}

/// `now` as the database compares it: at most just before [`NEVER`], so a hold until
/// "never" is live at any time a `u64` can say.
pub(crate) fn db_now(t: u64) -> i64 {
    t.min(NEVER - 1) as i64
}

pub(crate) fn from_db_time(t: i64) -> u64 {
    t.max(0) as u64
}

fn record(r: &AnyRow) -> Result<TunnelRecord, sqlx::Error> {
    Ok(TunnelRecord {
        tunnel_id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: from_db_time(r.try_get("created_at")?),
        expires_at: from_db_time(r.try_get("expires_at")?),
        owner: r.try_get("owner")?,
        disabled_at: r
            .try_get::<Option<i64>, _>("disabled_at")?
            .map(from_db_time),
    })
}

/// The columns [`credential`] reads.
const CREDENTIAL_COLUMNS: &str =
    "id, tunnel_id, prefix, label, created_at, last_used_at, revoked_at";

fn credential(r: &AnyRow) -> Result<CredentialRecord, sqlx::Error> {
    Ok(CredentialRecord {
        id: r.try_get("id")?,
        tunnel_id: r.try_get("tunnel_id")?,
        prefix: r.try_get("prefix")?,
        label: r.try_get("label")?,
        created_at: from_db_time(r.try_get("created_at")?),
        last_used_at: r
            .try_get::<Option<i64>, _>("last_used_at")?
            .map(from_db_time),
        revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(from_db_time),
    })
}

/// A race another transaction won (the claim is retried and sees the winner).
fn lost_race(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                // PostgreSQL: deadlock detected, serialization failure.
                || matches!(d.code().as_deref(), Some("40P01") | Some("40001"))
            // SQLite: busy past the timeout counts as unavailable, not a race.
        }
        _ => false,
    }
}

impl SqlStore {
    /// The tunnel that `sql` (a SELECT of `record`'s columns, `$1` the key, `$2` now)
    /// finds live at `now`: one query shape for lookups by name and by id.
    fn live_tunnel<'a>(
        &'a self,
        sql: &'static str,
        key: &str,
        now: u64,
    ) -> StoreFuture<'a, Option<TunnelRecord>> {
        let q = sqlx::query(sql).bind(key.to_owned()).bind(db_now(now));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("reading a tunnel", async move {
                q.fetch_optional(&p).await?.map(|r| record(&r)).transpose()
            })
            .await
        })
    }

    /// A store on the database at `url` (see the module docs for the forms). Returns at
    /// once without connecting: connections are made on demand, and the migrations run
    /// before the first operation (call [`SqlStore::migrate`] to run them now and see
    /// their error). Must be called inside a Tokio runtime.
    pub fn open(url: &Secret) -> Result<SqlStore, ConfigError> {
        sqlx::any::install_default_drivers();
        let raw = url.expose();
        let shown_url = redact_url(raw);
        let backend = backend_of(raw)?;
        let password = url::Url::parse(raw)
            .ok()
            .and_then(|u| u.password().map(Secret::new));
        let (connect_url, opts) = match backend {
            Backend::Postgres => (
                raw.to_string(),
                AnyPoolOptions::new().max_connections(POSTGRES_MAX_CONNECTIONS),
            ),
            Backend::Sqlite if is_memory(raw) => (
                raw.to_string(),
                // One connection that never closes: the database lives as long as it.
                AnyPoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None),
            ),
            Backend::Sqlite => (
                sqlite_file_url(raw, &shown_url)?,
                AnyPoolOptions::new().max_connections(SQLITE_MAX_CONNECTIONS),
            ),
        };
        let file = backend == Backend::Sqlite && !is_memory(raw);
        let pool = opts
            .acquire_timeout(DB_ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                        let busy = SQLITE_BUSY_TIMEOUT.as_millis();
                        conn.execute(format!("PRAGMA busy_timeout = {busy}").as_str())
                            .await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        if file {
                            // Readers never wait for the writer, and a crash loses
                            // no committed transaction.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_lazy(&connect_url)
            .map_err(|e| {
                ConfigError(format!(
                    "--database-url '{shown_url}' is not usable ({e}); use sqlite:///PATH/control.db or postgres://USER@HOST:PORT/DB"
                ))
            })?;
        Ok(SqlStore {
            pool,
            backend,
            shown_url,
            password,
            migrated: tokio::sync::OnceCell::new(),
            next_sweep: AtomicU64::new(0),
        })
    }

    /// A fresh SQLite database in memory (tests, `netbore dev`).
    pub fn memory() -> SqlStore {
        SqlStore::open(&Secret::new(MEMORY_URL)).expect("the in-memory URL is valid")
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL without its password.
    pub fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// Applies the embedded migrations now (once; later calls return at once). Fails
    /// with a message naming the database and the fix.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrated
            .get_or_try_init(|| async {
                let run = async {
                    let mut conn = self
                        .pool
                        .acquire()
                        .await
                        .map_err(|e| self.unavailable("connecting", e))?;
                    // `run_direct` is `run` on one connection; `run` itself, through its
                    // `Acquire` bound, makes every future awaiting it fail the `Send`
                    // check the boxed store futures need (sqlx documents the workaround).
                    match MIGRATOR.run_direct(&mut *conn).await {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            // The connection may still hold the migration lock: close
                            // it rather than hand it back to the pool.
                            let _ = conn.close().await;
                            Err(StoreError::Unavailable(self.scrub(format!(
                                "the database at {} could not be migrated: {e}; if it was migrated by a newer control, run that version (migrations only go forward); otherwise check its logs",
                                self.shown_url
                            ))))
                        }
                    }
                };
                match tokio::time::timeout(MIGRATE_TIMEOUT, run).await {
                    Ok(r) => r,
                    Err(_) => Err(self.unavailable(
                        "migrating",
                        format!(
                            "not done within {} s (another replica holding the migration lock?)",
                            MIGRATE_TIMEOUT.as_secs()
                        ),
                    )),
                }
            })
            .await
            .map(|_| ())
    }

    /// The error every failed call returns: what failed, where, and what to do.
    pub fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(self.scrub(format!(
            "the database at {} is unreachable or failed ({what}: {e}); check that it is running and that --database-url (NETBORE_DATABASE_URL) points at it; control recovers by itself when it answers again",
            self.shown_url
        )))
    }

    fn scrub(&self, msg: String) -> String {
        match &self.password {
            Some(p) if !p.expose().is_empty() => msg.replace(p.expose(), "***"),
            _ => msg,
        }
    }

    /// The pool, once migrated.
    async fn pool(&self) -> Result<&AnyPool, StoreError> {
        self.migrate().await?;
        Ok(&self.pool)
    }

    /// The migrated pool (a cheap handle), for a query future that owns what it needs.
    pub(crate) async fn owned_pool(&self) -> Result<AnyPool, StoreError> {
        Ok(self.pool().await?.clone())
    }

    /// Awaits `fut` within [`DB_CALL_TIMEOUT`], mapping its error. Query futures are
    /// built from owned values (a pool handle, `String`s): futures borrowing into sqlx's
    /// executors trip the compiler's `Send` check of the boxed futures.
    pub(crate) async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(DB_CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(what, e)),
            Err(_) => Err(self.unavailable(
                what,
                format!("no answer within {} ms", DB_CALL_TIMEOUT.as_millis()),
            )),
        }
    }

    /// Deletes expired tunnels and tombstones, at most once per
    /// [`SWEEP_INTERVAL_SECS`]; best effort (a failure waits for the next interval).
    async fn sweep(&self, now: u64) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due
            || self
                .next_sweep
                .compare_exchange(
                    due,
                    now.saturating_add(SWEEP_INTERVAL_SECS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let r = async {
            let p = self.owned_pool().await?;
            self.timed("sweeping expired records", async move {
                let t = sqlx::query(
                    "DELETE FROM tunnels WHERE expires_at <= $1 AND disabled_at IS NULL",
                )
                .bind(db_now(now))
                .execute(&p)
                .await?;
                let s = sqlx::query("DELETE FROM tombstones WHERE until_at <= $1")
                    .bind(db_now(now))
                    .execute(&p)
                    .await?;
                Ok((t.rows_affected(), s.rows_affected()))
            })
            .await
        }
        .await;
        match r {
            Ok((0, 0)) => {}
            Ok((t, s)) => tracing::debug!(tunnels = t, tombstones = s, "swept expired records"),
            Err(e) => tracing::debug!(error = %e, "sweep skipped"),
        }
    }

    async fn claim_once(
        pool: AnyPool,
        name: String,
        tunnel_id: String,
        owner: Option<String>,
        now: u64,
        expires_at: u64,
        force: bool,
    ) -> Result<Claim, sqlx::Error> {
        let (now, exp) = (db_now(now), db_time(expires_at));
        let mut tx = pool.begin().await?;
        // A write first: on SQLite this takes the write lock before anything is read,
        // so concurrent claims queue (busy timeout) instead of failing.
        sqlx::query(
            "DELETE FROM tunnels WHERE name = $1 AND id <> $2 \
             AND ((expires_at <= $3 AND disabled_at IS NULL) OR $4 = 1)",
        )
        .bind(name.clone())
        .bind(tunnel_id.clone())
        .bind(now)
        .bind(i64::from(force))
        .execute(&mut *tx)
        .await?;
        // The owner's row (made on its first tunnel): its id is what tunnels refer to.
        let owner_id: Option<String> = match &owner {
            None => None,
            Some(subject) => {
                sqlx::query(
                    "INSERT INTO owners (id, subject, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (subject) DO NOTHING",
                )
                .bind(crate::accounts::new_id("own"))
                .bind(subject.clone())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                Some(
                    sqlx::query("SELECT id FROM owners WHERE subject = $1")
                        .bind(subject.clone())
                        .fetch_one(&mut *tx)
                        .await?
                        .try_get("id")?,
                )
            }
        };
        let holder = sqlx::query(concat!(
            "SELECT ",
            tunnel_cols!(),
            " FROM tunnels WHERE name = $1"
        ))
        .bind(name.clone())
        .fetch_optional(&mut *tx)
        .await?;
        match holder.map(|r| record(&r)).transpose()? {
            // Live (expired or forced ones were deleted above) and not ours.
            Some(h) if h.tunnel_id != tunnel_id => {
                tx.commit().await?;
                return Ok(Claim::Taken(h));
            }
            // Ours: extend a live hold (never shorten it), renew a lapsed one.
            Some(_) => {
                sqlx::query(
                    "UPDATE tunnels SET \
                       created_at = CASE WHEN expires_at > $2 THEN created_at ELSE $2 END, \
                       expires_at = CASE WHEN expires_at > $2 AND expires_at > $3 THEN expires_at ELSE $3 END, \
                       owner_id = COALESCE($4, owner_id) \
                     WHERE id = $1",
                )
                .bind(tunnel_id.clone())
                .bind(now)
                .bind(exp)
                .bind(owner_id)
                .execute(&mut *tx)
                .await?;
            }
            // Free: insert, or move this tunnel from the name it held (releasing it).
            // A concurrent insert of the name fails this one on the unique constraint.
            None => {
                sqlx::query(
                    "INSERT INTO tunnels (id, name, created_at, expires_at, owner_id) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                       created_at = excluded.created_at, expires_at = excluded.expires_at, \
                       owner_id = COALESCE(excluded.owner_id, tunnels.owner_id)",
                )
                .bind(tunnel_id.clone())
                .bind(name.clone())
                .bind(now)
                .bind(exp)
                .bind(owner_id)
                .execute(&mut *tx)
                .await?;
            }
        };
        let row = sqlx::query(concat!(
            "SELECT ",
            tunnel_cols!(),
            " FROM tunnels WHERE id = $1"
        ))
        .bind(tunnel_id.clone())
        .fetch_one(&mut *tx)
        .await?;
        let r = record(&row)?;
        tx.commit().await?;
        Ok(Claim::Won(r))
    }

    /// Control's signing keys when none is configured: the ones it generated before
    /// (oldest first, the newest signs), or, on first start, a fresh key it stores
    /// first. Replicas starting at once on one database insert the same generation;
    /// one insert wins and every replica loads the winner.
    pub async fn signing_keys(&self, now: u64) -> Result<KeySet, StoreError> {
        // (generation, key) of every key, retired ones as None.
        let load = |p: AnyPool| async move {
            let rows = sqlx::query(
                "SELECT generation, pkcs8, retired_at FROM signing_keys ORDER BY generation",
            )
            .fetch_all(&p)
            .await?;
            rows.iter()
                .map(|r| {
                    let retired: Option<i64> = r.try_get("retired_at")?;
                    let key: String = r.try_get("pkcs8")?;
                    Ok((
                        r.try_get::<i64, _>("generation")?,
                        retired.is_none().then_some(key),
                    ))
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        };
        let pool = self.owned_pool().await?;
        let mut stored = self
            .timed("loading the signing keys", load(pool.clone()))
            .await?;
        if stored.iter().all(|(_, k)| k.is_none()) {
            // The generation after every one seen: replicas that saw the same table
            // insert the same generation, and one insert wins.
            let next = stored.iter().map(|(g, _)| *g).max().unwrap_or(0) + 1;
            let der = KeySet::generate_pkcs8();
            let kid = KeySet::from_pkcs8_ders(std::slice::from_ref(&der))
                .map_err(|e| StoreError::Unavailable(format!("a generated key: {e}")))?
                .active_kid()
                .to_string();
            let insert = sqlx::query(
                "INSERT INTO signing_keys (generation, kid, pkcs8, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (generation) DO NOTHING",
            )
            .bind(next)
            .bind(kid.clone())
            .bind(B64.encode(&der))
            .bind(db_time(now));
            let p = pool.clone();
            let inserted = self
                .timed("storing a generated signing key", async move {
                    insert.execute(&p).await.map(|r| r.rows_affected())
                })
                .await?;
            if inserted == 1 {
                tracing::info!(kid = %kid, "generated a signing key and stored it in the database");
            }
            stored = self.timed("loading the signing keys", load(pool)).await?;
        }
        let ders = stored
            .iter()
            .filter_map(|(_, k)| k.as_ref())
            .map(|s| B64.decode(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "a signing key in the database at {} is not base64 ({e}); restore the signing_keys table from a backup, or retire the row (retired_at) to generate a new key",
                    self.shown_url
                ))
            })?;
        KeySet::from_pkcs8_ders(&ders).map_err(|e| {
            StoreError::Unavailable(format!(
                "the signing keys in the database at {} do not load ({e}); restore the signing_keys table from a backup, or retire the row (retired_at) to generate a new key",
                self.shown_url
            ))
        })
    }
}

fn is_memory(url: &str) -> bool {
    url.starts_with("sqlite::memory:") || url.contains("mode=memory")
}

/// An SQLite file URL that creates the file (`mode=rwc`) unless a mode is given, after
/// creating its directory.
fn sqlite_file_url(url: &str, shown: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(ConfigError(format!(
            "--database-url '{shown}' names no file; use sqlite:///PATH/control.db"
        )));
    }
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            ConfigError(format!(
                "cannot create {} for the database in --database-url '{shown}' ({e}); create it writable for control, or choose another path (e.g. --database-url sqlite://./control.db)",
                dir.display()
            ))
        })?;
    }
    Ok(match query {
        Some(q) if q.split('&').any(|kv| kv.starts_with("mode=")) => url.to_string(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    })
}

impl SqlStore {
    /// One attempt of [`ControlStore::tcp_port`]; a unique violation means another
    /// allocation took the port (or gave this tunnel one) meanwhile: try again.
    async fn tcp_port_once(
        pool: AnyPool,
        tunnel_id: String,
        range: netbore_tokens::PortRange,
        now: u64,
    ) -> Result<Option<u16>, sqlx::Error> {
        let held: Option<i64> = sqlx::query("SELECT port FROM tcp_ports WHERE tunnel_id = $1")
            .bind(tunnel_id.clone())
            .fetch_optional(&pool)
            .await?
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?;
        if let Some(p) = held.and_then(|p| u16::try_from(p).ok())
            && range.contains(p)
        {
            return Ok(Some(p));
        }
        // Outside the (changed) range, or none yet: free what this tunnel and gone
        // tunnels hold, then take the lowest free port.
        sqlx::query(
            "DELETE FROM tcp_ports WHERE tunnel_id = $1 \
             OR tunnel_id NOT IN (SELECT id FROM tunnels WHERE expires_at > $2)",
        )
        .bind(tunnel_id.clone())
        .bind(db_now(now))
        .execute(&pool)
        .await?;
        let taken: std::collections::HashSet<i64> =
            sqlx::query("SELECT port FROM tcp_ports WHERE port >= $1 AND port <= $2")
                .bind(i64::from(range.lo))
                .bind(i64::from(range.hi))
                .fetch_all(&pool)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?;
        let Some(port) = (range.lo..=range.hi).find(|p| !taken.contains(&i64::from(*p))) else {
            return Ok(None);
        };
        sqlx::query("INSERT INTO tcp_ports (port, tunnel_id, created_at) VALUES ($1, $2, $3)")
            .bind(i64::from(port))
            .bind(tunnel_id)
            .bind(db_now(now))
            .execute(&pool)
            .await?;
        Ok(Some(port))
    }
}

impl ControlStore for SqlStore {
    fn tcp_port<'a>(
        &'a self,
        tunnel_id: &'a str,
        range: netbore_tokens::PortRange,
        now: u64,
    ) -> StoreFuture<'a, Option<u16>> {
        Box::pin(async move {
            let pool = self.owned_pool().await?;
            let mut last = String::new();
            for _ in 0..CLAIM_ATTEMPTS {
                let attempt = tokio::time::timeout(
                    DB_CALL_TIMEOUT,
                    SqlStore::tcp_port_once(pool.clone(), tunnel_id.to_owned(), range, now),
                )
                .await;
                match attempt {
                    Ok(Ok(p)) => return Ok(p),
                    Ok(Err(e)) if lost_race(&e) => last = e.to_string(),
                    Ok(Err(e)) => return Err(self.unavailable("allocating a TCP port", e)),
                    Err(_) => {
                        return Err(self.unavailable(
                            "allocating a TCP port",
                            format!("no answer within {} ms", DB_CALL_TIMEOUT.as_millis()),
                        ));
                    }
                }
            }
            Err(self.unavailable(
                "allocating a TCP port",
                format!("lost {CLAIM_ATTEMPTS} races in a row ({last}); retry"),
            ))
        })
    }

    fn claim_owned<'a>(
        &'a self,
        name: &'a str,
        tunnel_id: &'a str,
        owner: Option<&'a str>,
        now: u64,
        expires_at: u64,
        force: bool,
    ) -> StoreFuture<'a, Claim> {
        Box::pin(async move {
            self.sweep(now).await;
            let pool = self.owned_pool().await?;
            let mut last = None;
            for _ in 0..CLAIM_ATTEMPTS {
                let attempt = tokio::time::timeout(
                    DB_CALL_TIMEOUT,
                    SqlStore::claim_once(
                        pool.clone(),
                        name.to_owned(),
                        tunnel_id.to_owned(),
                        owner.map(str::to_owned),
                        now,
                        expires_at,
                        force,
                    ),
                )
                .await;
                match attempt {
                    Ok(Ok(c)) => return Ok(c),
                    Ok(Err(e)) if lost_race(&e) => last = Some(e.to_string()),
                    Ok(Err(e)) => return Err(self.unavailable("claiming a name", e)),
                    Err(_) => {
                        return Err(self.unavailable(
                            "claiming a name",
                            format!("no answer within {} ms", DB_CALL_TIMEOUT.as_millis()),
                        ));
                    }
                }
            }
            Err(self.unavailable(
                "claiming a name",
                format!(
                    "lost {CLAIM_ATTEMPTS} races in a row ({}); retry",
                    last.unwrap_or_default()
                ),
            ))
        })
    }

    fn by_name<'a>(&'a self, name: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>> {
        self.live_tunnel(
            concat!(
                "SELECT ",
                tunnel_cols!(),
                " FROM tunnels WHERE name = $1 AND (expires_at > $2 OR disabled_at IS NOT NULL)"
            ),
            name,
            now,
        )
    }

    fn by_id<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, Option<TunnelRecord>> {
        self.live_tunnel(
            concat!(
                "SELECT ",
                tunnel_cols!(),
                " FROM tunnels WHERE id = $1 AND (expires_at > $2 OR disabled_at IS NOT NULL)"
            ),
            tunnel_id,
            now,
        )
    }

    fn remove<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Option<TunnelRecord>> {
        let q = sqlx::query(concat!(
            "DELETE FROM tunnels WHERE id = $1 RETURNING ",
            tunnel_cols!()
        ))
        .bind(tunnel_id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("removing a tunnel", async move {
                q.fetch_optional(&p).await?.map(|r| record(&r)).transpose()
            })
            .await
        })
    }

    fn list_owned<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
        now: u64,
        owner: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<TunnelRecord>> {
        // `name >= prefix` lets the database start from the name index; the substring
        // test is the exact (collation-free) prefix check. `$6` empty: every owner.
        let q = sqlx::query(concat!(
            "SELECT ",
            tunnel_cols!(),
            " FROM tunnels \
             WHERE (expires_at > $1 OR disabled_at IS NOT NULL) AND name >= $2 AND substr(name, 1, CAST($3 AS INTEGER)) = $2 \
               AND name > $4 \
               AND ($6 = '' OR owner_id = (SELECT o.id FROM owners o WHERE o.subject = $6)) \
             ORDER BY name LIMIT $5"
        ))
        .bind(db_now(now))
        .bind(prefix.to_owned())
        .bind(prefix.chars().count() as i64)
        .bind(after.unwrap_or("").to_owned())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(owner.unwrap_or("").to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("listing tunnels", async move {
                let rows = q.fetch_all(&p).await?;
                rows.iter().map(record).collect()
            })
            .await
        })
    }

    fn revoke<'a>(&'a self, tunnel_id: &'a str, until: u64) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "INSERT INTO tombstones (tunnel_id, until_at) VALUES ($1, $2) \
             ON CONFLICT (tunnel_id) DO UPDATE SET until_at = \
               CASE WHEN tombstones.until_at > excluded.until_at \
                    THEN tombstones.until_at ELSE excluded.until_at END",
        )
        .bind(tunnel_id.to_owned())
        .bind(db_time(until));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("writing a tombstone", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn is_revoked<'a>(&'a self, tunnel_id: &'a str, now: u64) -> StoreFuture<'a, bool> {
        let q =
            sqlx::query("SELECT 1 AS one FROM tombstones WHERE tunnel_id = $1 AND until_at > $2")
                .bind(tunnel_id.to_owned())
                .bind(db_now(now));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("reading a tombstone", async move {
                Ok(q.fetch_optional(&p).await?.is_some())
            })
            .await
        })
    }

    fn refresh<'a>(
        &'a self,
        tunnel_ids: &'a [String],
        now: u64,
        until: u64,
    ) -> StoreFuture<'a, ()> {
        // One UPDATE per batch of ids; the SQL is built before the future so the
        // future owns everything it holds.
        let batches: Vec<(String, Vec<String>)> = tunnel_ids
            .chunks(REFRESH_BATCH)
            .map(|batch| {
                let marks: Vec<String> = (0..batch.len()).map(|i| format!("${}", i + 3)).collect();
                let sql = format!(
                    "UPDATE tunnels SET expires_at = $2 \
                     WHERE expires_at > $1 AND expires_at < $2 AND id IN ({})",
                    marks.join(", ")
                );
                (sql, batch.to_vec())
            })
            .collect();
        Box::pin(async move {
            for (sql, ids) in batches {
                let p = self.owned_pool().await?;
                self.timed("refreshing holds", async move {
                    let mut q = sqlx::query(&sql).bind(db_now(now)).bind(db_time(until));
                    for id in ids {
                        q = q.bind(id);
                    }
                    q.execute(&p).await.map(|_| ())
                })
                .await?;
            }
            Ok(())
        })
    }

    fn insert_credential<'a>(
        &'a self,
        cred: &'a CredentialRecord,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, ()> {
        let q = sqlx::query(
            "INSERT INTO tunnel_credentials (id, tunnel_id, prefix, secret_hash, label, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(cred.id.clone())
        .bind(cred.tunnel_id.clone())
        .bind(cred.prefix.clone())
        .bind(secret_hash.to_owned())
        .bind(cred.label.clone())
        .bind(db_time(cred.created_at));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("storing a tunnel credential", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn credential_by_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> StoreFuture<'a, Option<(CredentialRecord, String)>> {
        let q = sqlx::query(
            "SELECT id, tunnel_id, prefix, label, created_at, last_used_at, revoked_at, secret_hash \
             FROM tunnel_credentials WHERE prefix = $1",
        )
        .bind(prefix.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("reading a tunnel credential", async move {
                match q.fetch_optional(&p).await? {
                    Some(r) => Ok(Some((credential(&r)?, r.try_get("secret_hash")?))),
                    None => Ok(None),
                }
            })
            .await
        })
    }

    fn credentials_of<'a>(&'a self, tunnel_id: &'a str) -> StoreFuture<'a, Vec<CredentialRecord>> {
        let q = sqlx::query(
            "SELECT id, tunnel_id, prefix, label, created_at, last_used_at, revoked_at \
             FROM tunnel_credentials WHERE tunnel_id = $1 ORDER BY created_at, id",
        )
        .bind(tunnel_id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("listing tunnel credentials", async move {
                let rows = q.fetch_all(&p).await?;
                rows.iter().map(credential).collect()
            })
            .await
        })
    }

    fn revoke_credential<'a>(
        &'a self,
        tunnel_id: &'a str,
        id: &'a str,
        now: u64,
    ) -> StoreFuture<'a, Option<CredentialRecord>> {
        let sql = format!(
            "UPDATE tunnel_credentials SET revoked_at = COALESCE(revoked_at, $3) \
             WHERE tunnel_id = $1 AND id = $2 RETURNING {CREDENTIAL_COLUMNS}"
        );
        let (tunnel_id, id) = (tunnel_id.to_owned(), id.to_owned());
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("revoking a tunnel credential", async move {
                sqlx::query(&sql)
                    .bind(tunnel_id)
                    .bind(id)
                    .bind(db_time(now))
                    .fetch_optional(&p)
                    .await?
                    .map(|r| credential(&r))
                    .transpose()
            })
            .await
        })
    }

    fn touch_credential<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, ()> {
        let q = sqlx::query("UPDATE tunnel_credentials SET last_used_at = $2 WHERE id = $1")
            .bind(id.to_owned())
            .bind(db_time(now));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("recording a credential's use", async move {
                q.execute(&p).await.map(|_| ())
            })
            .await
        })
    }

    fn set_disabled<'a>(
        &'a self,
        tunnel_id: &'a str,
        disabled_at: Option<u64>,
        now: u64,
        hold_until: u64,
    ) -> StoreFuture<'a, Option<TunnelRecord>> {
        let q = match disabled_at {
            // The first disable wins (a second keeps its time and the saved hold).
            Some(at) => sqlx::query(concat!(
                "UPDATE tunnels SET disabled_at = COALESCE(disabled_at, $2), \
                   expires_before_disable = CASE WHEN disabled_at IS NULL THEN expires_at \
                     ELSE expires_before_disable END \
                 WHERE id = $1 AND (expires_at > $3 OR disabled_at IS NOT NULL) RETURNING ",
                tunnel_cols!()
            ))
            .bind(tunnel_id.to_owned())
            .bind(db_time(at))
            .bind(db_now(now)),
            // The hold it had, unless that lapsed while disabled: then `hold_until`.
            None => sqlx::query(concat!(
                "UPDATE tunnels SET disabled_at = NULL, \
                   expires_at = CASE WHEN disabled_at IS NULL THEN expires_at \
                     WHEN COALESCE(expires_before_disable, 0) > $2 THEN expires_before_disable \
                     ELSE $3 END, \
                   expires_before_disable = NULL \
                 WHERE id = $1 AND (expires_at > $2 OR disabled_at IS NOT NULL) RETURNING ",
                tunnel_cols!()
            ))
            .bind(tunnel_id.to_owned())
            .bind(db_now(now))
            .bind(db_time(hold_until)),
        };
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("disabling or enabling a tunnel", async move {
                q.fetch_optional(&p).await?.map(|r| record(&r)).transpose()
            })
            .await
        })
    }

    fn disabled_tunnels(&self, limit: usize) -> StoreFuture<'_, Vec<(String, String)>> {
        let q = sqlx::query(
            "SELECT id, name FROM tunnels WHERE disabled_at IS NOT NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("listing disabled tunnels", async move {
                let rows = q.fetch_all(&p).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("id")?, r.try_get("name")?)))
                    .collect()
            })
            .await
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let p = self.owned_pool().await?;
            self.timed("ping", async move {
                sqlx::query("SELECT 1 AS one")
                    .fetch_one(&p)
                    .await
                    .map(|_| ())
            })
            .await
        })
    }
}

//! The durable store's contract ([`ControlStore`]), the same bodies against SQLite in
//! memory, an SQLite file and a real PostgreSQL; and what the SQL store adds: holds
//! until "never", refreshes in batches, migrations and a generated signing key that
//! replicas starting at once agree on.

use std::sync::Arc;
use std::time::Duration;

use netbore_control::sql_store::{Backend, SqlStore, redact_url, with_password};
use netbore_control::store::{Claim, ControlStore, NEVER, TunnelRecord};
use netbore_testkit::postgres::PostgresServer;
use netbore_tokens::{Secret, now_unix};

/// One test's stores: SQLite in memory, an SQLite file and PostgreSQL (its own server),
/// each migrated; and what keeps them alive.
async fn stores() -> (
    Vec<(&'static str, Box<dyn ControlStore>)>,
    (PostgresServer, tempfile::TempDir),
) {
    let pg = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = format!("sqlite://{}", dir.path().join("control.db").display());
    let mut out: Vec<(&'static str, Box<dyn ControlStore>)> = Vec::new();
    for (kind, url) in [
        ("sqlite-memory", "sqlite::memory:".to_string()),
        ("sqlite-file", file),
        ("postgres", pg.url_with_password()),
    ] {
        let s = SqlStore::open(&Secret::new(url)).unwrap();
        s.migrate().await.unwrap_or_else(|e| panic!("{kind}: {e}"));
        out.push((kind, Box::new(s)));
    }
    (out, (pg, dir))
}

async fn won(s: &dyn ControlStore, name: &str, id: &str, now: u64, exp: u64, force: bool) -> bool {
    matches!(
        s.claim(name, id, now, exp, force).await.unwrap(),
        Claim::Won(_)
    )
}

#[tokio::test]
async fn contract_claims_have_one_winner_extend_expire_and_yield_to_force() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "a", "t1", b, b + 100, false).await, "{kind}");
        assert!(!won(s, "a", "t2", b + 1, b + 100, false).await, "{kind}");
        // The holder extends its hold, never shortens it.
        assert!(
            matches!(s.claim("a", "t1", b + 2, b + 200, false).await.unwrap(), Claim::Won(r) if r.expires_at == b + 200),
            "{kind}"
        );
        assert!(
            matches!(s.claim("a", "t1", b + 3, b + 150, false).await.unwrap(), Claim::Won(r) if r.expires_at == b + 200 && r.created_at == b),
            "{kind}"
        );
        // A refusal names the holder.
        assert!(
            matches!(s.claim("a", "t2", b + 3, b + 150, false).await.unwrap(), Claim::Taken(r) if r.tunnel_id == "t1"),
            "{kind}"
        );
        // After expiry, anyone.
        assert!(won(s, "a", "t2", b + 201, b + 300, false).await, "{kind}");
        // An administrator's claim takes it.
        assert!(won(s, "a", "t3", b + 202, b + 300, true).await, "{kind}");
        assert_eq!(
            s.by_name("a", b + 203).await.unwrap().unwrap().tunnel_id,
            "t3",
            "{kind}"
        );
        assert!(s.by_id("t2", b + 203).await.unwrap().is_none(), "{kind}");
        assert_eq!(
            s.by_id("t3", b + 203).await.unwrap().unwrap().name,
            "a",
            "{kind}"
        );
        // Expired records are not returned.
        assert!(s.by_name("a", b + 300).await.unwrap().is_none(), "{kind}");
        assert!(s.by_id("t3", b + 300).await.unwrap().is_none(), "{kind}");
    }
}

#[tokio::test]
async fn contract_removal_is_compare_and_delete() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "n", "old", b, b + 100, false).await);
        assert!(won(s, "n", "new", b + 1, b + 100, true).await);
        // The stale tunnel's removal leaves the newer holder alone.
        assert!(s.remove("old").await.unwrap().is_none(), "{kind}");
        assert_eq!(
            s.by_name("n", b + 2).await.unwrap().unwrap().tunnel_id,
            "new",
            "{kind}"
        );
        let r = s.remove("new").await.unwrap().unwrap();
        assert_eq!(
            (r.name.as_str(), r.tunnel_id.as_str()),
            ("n", "new"),
            "{kind}"
        );
        assert!(s.by_name("n", b + 2).await.unwrap().is_none(), "{kind}");
        assert!(s.remove("new").await.unwrap().is_none(), "{kind}");
        // A freed name is free.
        assert!(won(s, "n", "third", b + 3, b + 100, false).await, "{kind}");
    }
}

#[tokio::test]
async fn contract_a_tunnel_holds_one_name() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "first", "t", b, b + 100, false).await);
        assert!(won(s, "second", "t", b, b + 100, false).await);
        assert!(s.by_name("first", b).await.unwrap().is_none(), "{kind}");
        assert_eq!(
            s.by_id("t", b).await.unwrap().unwrap().name,
            "second",
            "{kind}"
        );
        let names: Vec<String> = s
            .list("", None, 10, b)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["second"], "{kind}");
    }
}

#[tokio::test]
async fn contract_a_tcp_port_is_kept_by_its_tunnel_and_freed_when_it_is_gone() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    let range: netbore_tokens::PortRange = "20000-20001".parse().unwrap();
    for (kind, s) in &stores {
        let s = s.as_ref();
        for (name, id) in [("a", "ta"), ("b", "tb"), ("c", "tc")] {
            assert!(won(s, name, id, b, b + 100, false).await, "{kind}");
        }
        assert_eq!(
            s.tcp_port("ta", range, b).await.unwrap(),
            Some(20000),
            "{kind}"
        );
        assert_eq!(
            s.tcp_port("tb", range, b).await.unwrap(),
            Some(20001),
            "{kind}"
        );
        // Kept: asked again (a restart, a recreate), the same port.
        assert_eq!(
            s.tcp_port("ta", range, b + 1).await.unwrap(),
            Some(20000),
            "{kind}"
        );
        // Full: a third tunnel gets none.
        assert_eq!(s.tcp_port("tc", range, b).await.unwrap(), None, "{kind}");
        // A deleted tunnel's port is free again.
        s.remove("ta").await.unwrap();
        assert_eq!(
            s.tcp_port("tc", range, b + 2).await.unwrap(),
            Some(20000),
            "{kind}"
        );
        // A narrower range moves a tunnel whose port fell outside it.
        let narrow: netbore_tokens::PortRange = "20001-20002".parse().unwrap();
        assert_eq!(
            s.tcp_port("tc", narrow, b + 3).await.unwrap(),
            Some(20002),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn contract_concurrent_claims_of_one_name_have_exactly_one_winner() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in stores {
        let s: Arc<dyn ControlStore> = Arc::from(s);
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                won(s.as_ref(), "contested", &format!("t{i}"), b, b + 100, false).await
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "{kind}");
    }
}

#[tokio::test]
async fn contract_list_pages_by_name_within_the_prefix_and_skips_expired() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        for n in ["b", "a", "c", "ab", "ba"] {
            s.claim(n, &format!("t-{n}"), b, b + 100, false)
                .await
                .unwrap();
        }
        s.claim("aa", "t-short", b, b + 10, false).await.unwrap();
        let names = |v: Vec<TunnelRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(s.list("", None, 2, b + 1).await.unwrap()),
            ["a", "aa"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("", None, 2, b + 20).await.unwrap()),
            ["a", "ab"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("", Some("ab"), 2, b + 20).await.unwrap()),
            ["b", "ba"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("a", None, 10, b + 20).await.unwrap()),
            ["a", "ab"],
            "{kind}"
        );
        assert_eq!(
            names(s.list("b", Some("b"), 10, b + 20).await.unwrap()),
            ["ba"],
            "{kind}"
        );
        // A cursor before the prefix starts at the prefix.
        assert_eq!(
            names(s.list("b", Some("a"), 10, b + 20).await.unwrap()),
            ["b", "ba"],
            "{kind}"
        );
        assert!(
            s.list("", None, 10, b + 100).await.unwrap().is_empty(),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn contract_list_walks_many_names_with_a_cursor() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        for i in 0..450 {
            s.claim(&format!("p-{i:04}"), &format!("t{i}"), b, b + 100, false)
                .await
                .unwrap();
            // Every other name of a second prefix has expired (by `now`).
            s.claim(
                &format!("q-{i:04}"),
                &format!("u{i}"),
                b,
                b + 10 + 100 * (i % 2),
                false,
            )
            .await
            .unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list("p-", after.as_deref(), 100, b + 20).await.unwrap();
            if page.is_empty() {
                break;
            }
            after = Some(page.last().unwrap().name.clone());
            seen.extend(page.into_iter().map(|r| r.name));
        }
        assert_eq!(seen.len(), 450, "{kind}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{kind}: ordered");
        let live_q = s.list("q-", None, 500, b + 20).await.unwrap();
        assert_eq!(live_q.len(), 225, "{kind}");
    }
}

#[tokio::test]
async fn contract_tombstones_last_until_their_time_and_never_shorten() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(!s.is_revoked("t", b).await.unwrap(), "{kind}");
        s.revoke("t", b + 100).await.unwrap();
        s.revoke("t", b + 50).await.unwrap();
        assert!(s.is_revoked("t", b + 99).await.unwrap(), "{kind}");
        assert!(!s.is_revoked("t", b + 100).await.unwrap(), "{kind}");
        assert!(!s.is_revoked("other", b).await.unwrap(), "{kind}");
    }
}

#[tokio::test]
async fn contract_holds_until_never_round_trip_and_never_lapse() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        // u64::MAX is stored as NEVER (i64::MAX) and read back as it.
        let r = match s.claim("forever", "t1", b, u64::MAX, false).await.unwrap() {
            Claim::Won(r) => r,
            other => panic!("{kind}: {other:?}"),
        };
        assert_eq!(r.expires_at, NEVER, "{kind}");
        assert_eq!(
            s.by_name("forever", b).await.unwrap().unwrap().expires_at,
            NEVER,
            "{kind}"
        );
        // Live at any time a u64 can say, and never taken by others.
        assert!(s.by_id("t1", NEVER - 1).await.unwrap().is_some(), "{kind}");
        assert!(
            !won(s, "forever", "t2", u64::MAX - 1, u64::MAX, false).await,
            "{kind}"
        );
        // Extending a "never" hold keeps it "never".
        assert!(
            matches!(s.claim("forever", "t1", b + 1, b + 10, false).await.unwrap(), Claim::Won(r) if r.expires_at == NEVER),
            "{kind}"
        );
        s.revoke("gone", u64::MAX).await.unwrap();
        assert!(s.is_revoked("gone", NEVER - 1).await.unwrap(), "{kind}");
    }
}

#[tokio::test]
async fn contract_refresh_extends_live_holds_only_and_never_shortens() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        s.claim("live", "t-live", b, b + 100, false).await.unwrap();
        s.claim("long", "t-long", b, b + 1000, false).await.unwrap();
        s.claim("lapsed", "t-lapsed", b, b + 10, false)
            .await
            .unwrap();
        // More ids than one batch, most of them unknown.
        let mut ids: Vec<String> = (0..1200).map(|i| format!("unknown-{i}")).collect();
        ids.extend(["t-live", "t-long", "t-lapsed"].map(String::from));
        s.refresh(&ids, b + 20, b + 500).await.unwrap();
        let exp = |r: Option<TunnelRecord>| r.map(|r| r.expires_at);
        assert_eq!(
            exp(s.by_id("t-live", b + 20).await.unwrap()),
            Some(b + 500),
            "{kind}"
        );
        assert_eq!(
            exp(s.by_id("t-long", b + 20).await.unwrap()),
            Some(b + 1000),
            "{kind}"
        );
        // A hold that had lapsed is not revived: the name may be someone else's now.
        assert_eq!(
            exp(s.by_id("t-lapsed", b + 20).await.unwrap()),
            None,
            "{kind}"
        );
        s.refresh(&["t-live".to_string()], b + 30, NEVER)
            .await
            .unwrap();
        assert_eq!(
            exp(s.by_id("t-live", b + 30).await.unwrap()),
            Some(NEVER),
            "{kind}"
        );
        s.refresh(&[], b + 30, b + 40).await.unwrap();
    }
}

#[tokio::test]
async fn contract_a_freed_name_of_a_tunnel_that_moved_is_free() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert!(won(s, "one", "t", b, b + 100, false).await);
        assert!(won(s, "two", "t", b, b + 100, false).await);
        // The first name went with the move and anyone may have it.
        assert!(
            won(s, "one", "other", b + 1, b + 100, false).await,
            "{kind}"
        );
        assert_eq!(
            s.by_id("t", b + 1).await.unwrap().unwrap().name,
            "two",
            "{kind}"
        );
    }
}

#[tokio::test]
async fn contract_owners_are_kept_passed_on_a_takeover_and_filter_lists() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        let owner_of = |r: Claim| match r {
            Claim::Won(r) => r.owner,
            Claim::Taken(r) => panic!("{kind}: taken by {r:?}"),
        };
        let c = s.claim_owned("o-a", "t1", Some("alice"), b, b + 100, false);
        assert_eq!(
            owner_of(c.await.unwrap()).as_deref(),
            Some("alice"),
            "{kind}"
        );
        // An extension without an owner (a recreate token) keeps it.
        let c = s.claim("o-a", "t1", b + 1, b + 200, false).await.unwrap();
        assert_eq!(owner_of(c).as_deref(), Some("alice"), "{kind}");
        let c = s.claim_owned("o-b", "t2", Some("bob"), b, b + 100, false);
        assert_eq!(owner_of(c.await.unwrap()).as_deref(), Some("bob"), "{kind}");
        assert!(won(s, "o-c", "t3", b, b + 100, false).await, "{kind}");
        assert_eq!(
            s.by_id("t3", b + 2).await.unwrap().unwrap().owner,
            None,
            "{kind}"
        );
        // Lookups and removal carry the owner.
        assert_eq!(
            s.by_name("o-b", b + 2)
                .await
                .unwrap()
                .unwrap()
                .owner
                .as_deref(),
            Some("bob"),
            "{kind}"
        );
        let names = |v: Vec<TunnelRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        let mine = s
            .list_owned("o-", None, 10, b + 2, Some("alice"))
            .await
            .unwrap();
        assert_eq!(names(mine), ["o-a"], "{kind}");
        let all = s.list_owned("o-", None, 10, b + 2, None).await.unwrap();
        assert_eq!(names(all), ["o-a", "o-b", "o-c"], "{kind}");
        let none = s
            .list_owned("o-", None, 10, b + 2, Some("carol"))
            .await
            .unwrap();
        assert!(none.is_empty(), "{kind}");
        // A forced takeover by another owner passes the tunnel to it.
        let c = s.claim_owned("o-a", "t1", Some("carol"), b + 3, b + 300, true);
        assert_eq!(
            owner_of(c.await.unwrap()).as_deref(),
            Some("carol"),
            "{kind}"
        );
        let gone = s.remove("t2").await.unwrap().unwrap();
        assert_eq!(gone.owner.as_deref(), Some("bob"), "{kind}");
    }
}

#[tokio::test]
async fn contract_an_idempotency_key_has_one_first_request_and_api_keys_round_trip() {
    use netbore_control::accounts::{ApiKeyRecord, Idempotency};
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        assert_eq!(
            s.idempotency_begin("alice", "k1", "h1", b, b + 100)
                .await
                .unwrap(),
            Idempotency::First,
            "{kind}"
        );
        let seen = s
            .idempotency_begin("alice", "k1", "h1", b, b + 100)
            .await
            .unwrap();
        assert_eq!(
            seen,
            Idempotency::Seen {
                request_hash: "h1".into(),
                tunnel_id: String::new()
            },
            "{kind}"
        );
        // Per owner: bob's k1 is another key.
        assert_eq!(
            s.idempotency_begin("bob", "k1", "h9", b, b + 100)
                .await
                .unwrap(),
            Idempotency::First,
            "{kind}"
        );
        s.idempotency_finish("alice", "k1", "t1").await.unwrap();
        let seen = s
            .idempotency_begin("alice", "k1", "h2", b, b + 100)
            .await
            .unwrap();
        assert_eq!(
            seen,
            Idempotency::Seen {
                request_hash: "h1".into(),
                tunnel_id: "t1".into()
            },
            "{kind}"
        );
        // Lapsed: a new first request.
        assert_eq!(
            s.idempotency_begin("alice", "k1", "h2", b + 100, b + 200)
                .await
                .unwrap(),
            Idempotency::First,
            "{kind}"
        );
        // Abandoned before it made a tunnel: free again.
        s.idempotency_abandon("alice", "k1").await.unwrap();
        assert_eq!(
            s.idempotency_begin("alice", "k1", "h3", b + 101, b + 200)
                .await
                .unwrap(),
            Idempotency::First,
            "{kind}"
        );

        let key = ApiKeyRecord {
            id: "key_1".into(),
            owner: "alice".into(),
            prefix: "nbk_abcdefgh".into(),
            label: "laptop".into(),
            scopes: vec!["tunnels:read".into(), "tunnels:write".into()],
            name_pattern: Some("ci-*".into()),
            created_at: b,
            expires_at: Some(NEVER),
            last_used_at: None,
            revoked_at: None,
        };
        assert!(s.create_api_key(&key, "hash-1").await.unwrap(), "{kind}");
        assert_eq!(
            s.api_key_by_hash("hash-1").await.unwrap().as_ref(),
            Some(&key),
            "{kind}"
        );
        assert!(
            s.api_key_by_hash("hash-2").await.unwrap().is_none(),
            "{kind}"
        );
        s.touch_api_key("key_1", b + 5).await.unwrap();
        s.revoke_api_key("key_1", b + 6).await.unwrap();
        s.revoke_api_key("key_1", b + 9).await.unwrap();
        let got = s.api_key("key_1").await.unwrap().unwrap();
        assert_eq!(
            (got.last_used_at, got.revoked_at),
            (Some(b + 5), Some(b + 6)),
            "{kind}"
        );
        assert_eq!(
            s.list_api_keys(Some("alice")).await.unwrap().len(),
            1,
            "{kind}"
        );
        assert!(
            s.list_api_keys(Some("bob")).await.unwrap().is_empty(),
            "{kind}"
        );
        assert_eq!(s.list_api_keys(None).await.unwrap().len(), 1, "{kind}");
    }
}

#[tokio::test]
async fn two_stores_migrating_one_postgres_at_once_both_work() {
    let pg = PostgresServer::start();
    let url = Secret::new(pg.url_with_password());
    let (a, b) = (SqlStore::open(&url).unwrap(), SqlStore::open(&url).unwrap());
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(a.backend(), Backend::Postgres);
    let now = now_unix();
    assert!(won(&a, "shared", "t1", now, now + 100, false).await);
    assert_eq!(
        b.by_name("shared", now).await.unwrap().unwrap().tunnel_id,
        "t1"
    );
    // Each migration was applied once.
    assert_eq!(
        pg.psql("SELECT count(*) FROM _sqlx_migrations"),
        netbore_control::sql_store::MIGRATOR
            .iter()
            .count()
            .to_string()
    );
}

#[tokio::test]
async fn replicas_starting_at_once_on_postgres_agree_on_one_generated_key() {
    let pg = PostgresServer::start();
    let url = Secret::new(pg.url_with_password());
    let stores: Vec<Arc<SqlStore>> = (0..4)
        .map(|_| Arc::new(SqlStore::open(&url).unwrap()))
        .collect();
    let mut tasks = Vec::new();
    for s in &stores {
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { s.signing_keys(now_unix()).await },
        ));
    }
    let mut kids = Vec::new();
    for t in tasks {
        kids.push(t.await.unwrap().unwrap().active_kid().to_string());
    }
    kids.dedup();
    assert_eq!(kids.len(), 1, "{kids:?}");
    assert_eq!(pg.psql("SELECT count(*) FROM signing_keys"), "1");
    // A later start loads the same key.
    let again = SqlStore::open(&url).unwrap();
    assert_eq!(
        again.signing_keys(now_unix()).await.unwrap().active_kid(),
        kids[0]
    );
}

#[tokio::test]
async fn a_postgres_password_comes_from_outside_the_url_and_never_shows() {
    let pg = PostgresServer::start();
    let url = with_password(&pg.url(), &Secret::new(PostgresServer::PASSWORD)).unwrap();
    let s = SqlStore::open(&url).unwrap();
    s.ping().await.unwrap();
    // Two sources of the password are refused; so is one for SQLite.
    assert!(with_password(&pg.url_with_password(), &Secret::new("x")).is_err());
    assert!(with_password("sqlite:///tmp/x.db", &Secret::new("x")).is_err());
    // A wrong password: the error names the database (redacted) and the fix.
    let bad = with_password(&pg.url(), &Secret::new("wrong-secret-value")).unwrap();
    let e = SqlStore::open(&bad)
        .unwrap()
        .ping()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--database-url"), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{}", pg.port)), "{e}");
    assert!(
        !e.contains("wrong-secret-value"),
        "the password never shows: {e}"
    );
    assert_eq!(
        redact_url("postgres://u:hunter2@h:5432/db?password=hunter2&sslmode=require"),
        "postgres://***@h:5432/db?password=***&sslmode=require"
    );
}

#[tokio::test]
async fn a_stopped_postgres_is_an_error_within_seconds_and_recovers() {
    let mut pg = PostgresServer::start();
    let s = SqlStore::open(&Secret::new(pg.url_with_password())).unwrap();
    let now = now_unix();
    assert!(won(&s, "kept", "t1", now, now + 1000, false).await);
    pg.stop();
    let start = std::time::Instant::now();
    let e = s.ping().await.unwrap_err().to_string();
    assert!(e.contains("database") && e.contains("unreachable"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    pg.restart();
    let back =
        netbore_testkit::eventually(Duration::from_secs(20), || async { s.ping().await.ok() })
            .await;
    assert!(back.is_some(), "the pool reconnects by itself");
    assert_eq!(
        s.by_name("kept", now).await.unwrap().unwrap().tunnel_id,
        "t1"
    );
}

#[tokio::test]
async fn contract_a_disabled_tunnel_keeps_its_name_and_enabling_restores_its_hold() {
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        // A lease-held tunnel (expires at b + 10) and a named one (held until deleted).
        assert!(won(s, "lease", "tun_l", b, b + 10, false).await, "{kind}");
        assert!(won(s, "named", "tun_n", b, NEVER, false).await, "{kind}");
        let d = s
            .set_disabled("tun_l", Some(b), b, b + 500)
            .await
            .unwrap()
            .expect("live");
        assert_eq!(d.disabled_at, Some(b), "{kind}");
        s.set_disabled("tun_n", Some(b), b, b + 500).await.unwrap();
        // Past its lease, the disabled tunnel still holds the name: no one claims it,
        // lookups find it, and it is listed as disabled.
        let later = b + 100;
        assert!(
            !won(s, "lease", "tun_x", later, later + 10, false).await,
            "{kind}"
        );
        let r = s.by_name("lease", later).await.unwrap().expect("held");
        assert_eq!(r.tunnel_id, "tun_l", "{kind}");
        let mut disabled = s.disabled_tunnels(10).await.unwrap();
        disabled.sort();
        assert_eq!(
            disabled,
            [
                ("tun_l".to_string(), "lease".to_string()),
                ("tun_n".to_string(), "named".to_string())
            ],
            "{kind}"
        );
        // A second disable keeps the first time.
        let again = s
            .set_disabled("tun_l", Some(b + 50), later, later + 500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.disabled_at, Some(b), "{kind}");
        // Enabled after the lease lapsed: a fresh hold; the named one: held until deleted.
        let e = s
            .set_disabled("tun_l", None, later, later + 500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((e.disabled_at, e.expires_at), (None, later + 500), "{kind}");
        let n = s
            .set_disabled("tun_n", None, later, later + 500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n.disabled_at, n.expires_at), (None, NEVER), "{kind}");
        assert!(s.disabled_tunnels(10).await.unwrap().is_empty(), "{kind}");
        // Unknown tunnels are None.
        assert!(
            s.set_disabled("tun_none", Some(b), b, b)
                .await
                .unwrap()
                .is_none(),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn contract_an_enrolment_has_one_creator_and_is_retaken_only_as_seen() {
    use netbore_control::accounts::{AuditEvent, AuditFilter, Enrollment};
    let (stores, _pg) = stores().await;
    let b = now_unix();
    for (kind, s) in &stores {
        let s = s.as_ref();
        let begin = || s.enroll_begin("acme", "vm-1", "{}", "{}", b);
        assert_eq!(begin().await.unwrap(), Enrollment::First, "{kind}");
        assert_eq!(
            begin().await.unwrap(),
            Enrollment::Seen {
                tunnel_id: String::new(),
                created_at: b
            },
            "{kind}"
        );
        // Another owner's vm-1 is another enrolment.
        assert_eq!(
            s.enroll_begin("other", "vm-1", "{}", "{}", b)
                .await
                .unwrap(),
            Enrollment::First,
            "{kind}"
        );
        s.enroll_finish("acme", "vm-1", "tun_1").await.unwrap();
        assert_eq!(
            begin().await.unwrap(),
            Enrollment::Seen {
                tunnel_id: "tun_1".into(),
                created_at: b
            },
            "{kind}"
        );
        // A retake wins once, and only against what was seen.
        assert!(
            !s.enroll_retake("acme", "vm-1", ("tun_0", b), "{}", "{}", b + 1)
                .await
                .unwrap(),
            "{kind}"
        );
        assert!(
            s.enroll_retake("acme", "vm-1", ("tun_1", b), "{}", "{}", b + 1)
                .await
                .unwrap(),
            "{kind}"
        );
        assert!(
            !s.enroll_retake("acme", "vm-1", ("tun_1", b), "{}", "{}", b + 1)
                .await
                .unwrap(),
            "{kind}"
        );
        s.enroll_finish("acme", "vm-1", "tun_2").await.unwrap();
        assert_eq!(
            s.enrolled_policy("tun_2").await.unwrap().as_deref(),
            Some("{}"),
            "{kind}"
        );
        assert_eq!(s.enrolled_policy("tun_1").await.unwrap(), None, "{kind}");

        // The audit trail: filters, pages by id, the same id once, pruning.
        for (i, (action, tunnel)) in [
            ("tunnel.enroll", "tun_2"),
            ("tunnel.disable", "tun_2"),
            ("tunnel.create", "tun_3"),
        ]
        .iter()
        .enumerate()
        {
            let ev = AuditEvent {
                id: Some(format!("aud_{kind}_{i}")),
                actor: "acme".into(),
                action: action.to_string(),
                tunnel_id: Some(tunnel.to_string()),
                owner: Some("acme".into()),
                address: Some("192.0.2.7".into()),
                detail: serde_json::json!({"i": i}),
                ..Default::default()
            };
            s.audit(&ev, b + i as u64).await.unwrap();
            s.audit(&ev, b + i as u64).await.unwrap();
        }
        let all = |f: AuditFilter| async move { s.list_audit(&f).await.unwrap() };
        let every = all(AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!(every.len(), 3, "{kind}: an id is stored once");
        let tun2 = all(AuditFilter {
            tunnel_id: Some("tun_2".into()),
            limit: 100,
            ..Default::default()
        })
        .await;
        let actions: Vec<_> = tun2.iter().map(|r| r.event.action.as_str()).collect();
        assert_eq!(actions, ["tunnel.enroll", "tunnel.disable"], "{kind}");
        assert_eq!(tun2[0].event.address.as_deref(), Some("192.0.2.7"));
        assert_eq!(tun2[0].event.detail["i"], 0);
        let page2 = all(AuditFilter {
            after_id: Some(every[0].id.clone()),
            limit: 1,
            ..Default::default()
        })
        .await;
        assert_eq!(page2[0].id, every[1].id, "{kind}");
        let since = all(AuditFilter {
            since: Some(b + 2),
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!(since.len(), 1, "{kind}");
        assert_eq!(s.prune_audit(b + 1).await.unwrap(), 1, "{kind}");
        assert_eq!(
            all(AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .len(),
            2,
            "{kind}"
        );
    }
}

//! The Redis registry against a real `redis-server`: the same contract the in-memory
//! one keeps, plus what only Redis can show (a restart that empties it, pub/sub).

use std::time::Duration;

use netbore_registry::{Holder, LiveRegistry, RedisRegistry};
use netbore_testkit::redis::RedisServer;

fn h(edge: &str, conn: u64, tunnel: &str) -> Holder {
    Holder {
        edge_id: edge.into(),
        addr: format!("127.0.0.1:{}", 10_000 + conn),
        conn_id: conn,
        tunnel_id: tunnel.into(),
    }
}

#[tokio::test]
async fn leases_are_shared_expire_and_are_removed_per_connection() {
    let redis = RedisServer::start();
    let a = RedisRegistry::new(&redis.url()).unwrap();
    let b = RedisRegistry::new(&redis.url()).unwrap();
    a.register(
        &[
            ("app".into(), h("e1", 1, "tun_a")),
            ("app".into(), h("e1", 2, "tun_a")),
        ],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    b.register(
        &[("app".into(), h("e2", 3, "tun_a"))],
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let mut seen = b.lookup("app").await.unwrap();
    seen.sort_by_key(|x| x.conn_id);
    assert_eq!(
        seen,
        vec![
            h("e1", 1, "tun_a"),
            h("e1", 2, "tun_a"),
            h("e2", 3, "tun_a")
        ]
    );
    // A stale edge removing a connection it no longer holds changes nothing.
    b.unregister("app", &h("e1", 9, "tun_a")).await.unwrap();
    assert_eq!(a.lookup("app").await.unwrap().len(), 3);
    a.unregister("app", &h("e1", 1, "tun_a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        a.lookup("app").await.unwrap(),
        vec![h("e1", 2, "tun_a")],
        "one removed, one expired (its edge stopped refreshing)"
    );
    assert!(a.lookup("other").await.unwrap().is_empty());
}

#[tokio::test]
async fn changes_are_announced_to_every_edge() {
    let redis = RedisServer::start();
    let a = RedisRegistry::new(&redis.url()).unwrap();
    let b = RedisRegistry::new(&redis.url()).unwrap();
    let mut feed = b.changes();
    // The subscription is made in the background; registrations repeat until it hears.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        let mut conn = 100;
        loop {
            conn += 1;
            a.register(
                &[("news".into(), h("e1", conn, "tun_n"))],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), feed.recv()).await {
                return n;
            }
        }
    })
    .await
    .expect("a change heard within 10 s");
    assert_eq!(heard, "news");
}

#[tokio::test]
async fn a_dead_redis_is_a_clear_error_fast_and_a_restarted_one_works_again() {
    let mut redis = RedisServer::start();
    let r = RedisRegistry::new(&redis.url()).unwrap();
    r.register(
        &[("x".into(), h("e1", 1, "tun_x"))],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    redis.stop();
    let started = std::time::Instant::now();
    let err = r.lookup("x").await.unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("unreachable") && err.contains("Redis"),
        "{err}"
    );
    redis.restart();
    let back = netbore_testkit::eventually(Duration::from_secs(10), || async {
        r.register(
            &[("x".into(), h("e1", 1, "tun_x"))],
            Duration::from_secs(30),
        )
        .await
        .ok()
    })
    .await;
    assert!(back.is_some(), "registrations work again after the restart");
    assert_eq!(r.lookup("x").await.unwrap(), vec![h("e1", 1, "tun_x")]);
}

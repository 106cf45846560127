//! The Redis store against real `redis-server` processes: Higress key layout, shared budgets
//! across replicas, Redis Cluster, failure modes, recovery, and commands per request.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::redis::{RedisCluster, RedisServer};
use common::{send, serve_chat};
use deadpool_redis::redis::{self, Commands};
use tower_token_ratelimit::store::{Algorithm, Counter, DEFAULT_CHECK_REUSE, RedisStore, Store};
use tower_token_ratelimit::{FailureMode, Rule, TokenRateLimitConfig, TokenRateLimitLayer};

const CHAT: &str = "/v1/chat/completions";
const STREAM: &str = r#"{"model":"m","stream":true,"messages":[]}"#;

/// A fixed-window counter, for tests that call the store directly.
fn fixed_window(key: &str, limit: u64, window_secs: u64) -> Counter {
    Counter {
        key: key.into(),
        limit,
        window: Duration::from_secs(window_secs),
        algorithm: Algorithm::FixedWindow,
    }
}

/// A store on `server` whose calls may take 5 s (a loaded machine must not fail them).
fn patient_store(server: &RedisServer) -> RedisStore {
    store_within(server, Duration::from_secs(5))
}

/// A store on `server` whose calls wait at most `timeout`.
fn store_within(server: &RedisServer, timeout: Duration) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A store with this per-call timeout and a breaker that opens after `failures` failures in a
/// row and probes every 100 ms.
fn store_with_breaker(server: &RedisServer, timeout: Duration, failures: u32) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(timeout)
        .breaker(failures, Duration::from_millis(100))
        .build()
        .unwrap()
}

/// A per-user limit: every value of `x-user` gets `tokens_per_minute`.
fn per_user(tokens_per_minute: u64) -> Rule {
    Rule::per_header("x-user")
        .any_value()
        .tokens_per_minute(tokens_per_minute)
}

/// A store with this per-call timeout whose settlements after the first wait `interval` for
/// the next write (or a flush).
fn store_settling(server: &RedisServer, timeout: Duration, interval: Duration) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(timeout)
        .settle_interval(interval)
        .build()
        .unwrap()
}

/// A current-thread runtime: it runs its tasks only while it blocks on something.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits up to 5 s for `key` to hold `value`.
async fn wait_for(con: &mut redis::Connection, key: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Option<u64> = con.get(key).unwrap();
        if now == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: {now:?}, not {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn layer(store: RedisStore, rule_name: &str, rules: Vec<Rule>) -> TokenRateLimitLayer {
    rules
        .into_iter()
        .fold(
            TokenRateLimitLayer::builder()
                .rule_name(rule_name)
                .redis(store),
            |b, r| b.rule(r),
        )
        .build()
        .unwrap()
}

fn all_keys(con: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = con.scan::<String>().unwrap().map(Result::unwrap).collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn counters_use_the_higress_key_layout() {
    let server = RedisServer::start();
    let store = RedisStore::from_url(server.url()).unwrap();
    let limits = layer(
        store,
        "llm",
        vec![
            Rule::global().tokens_per_hour(1_000_000),
            per_user(1000),
            Rule::per_header("authorization")
                .any_value()
                .tokens_per_minute(5_000)
                .tokens_per_day(10_000),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    let h = [
        ("x-user", "alice"),
        ("authorization", "Bearer sk-live-SECRET"),
        ("x-mock-tokens", "42"),
    ];
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;

    let mut con = server.client();
    let user_key = "higress-token-ratelimit:{llm}:limit_by_per_header:60:x-user:alice";
    assert_eq!(con.get::<_, u64>(user_key).unwrap(), 42);
    let ttl: i64 = con.ttl(user_key).unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    let global = "higress-token-ratelimit:{llm}:global_threshold:3600";
    assert_eq!(con.get::<_, u64>(global).unwrap(), 42);
    let ttl: i64 = con.ttl(global).unwrap();
    assert!((3500..=3600).contains(&ttl), "ttl {ttl}");

    let keys = all_keys(&mut con);
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| !k.contains("SECRET") && !k.contains("sk-live")),
        "{keys:?}"
    );
    // One hashed value under both of the item's windows.
    let hashed = |window: &str| {
        let prefix =
            format!("higress-token-ratelimit:{{llm}}:limit_by_per_header:{window}:authorization:");
        keys.iter()
            .find_map(|k| k.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {window} key in {keys:?}"))
            .to_owned()
    };
    assert!(hashed("86400").starts_with("sha256:"));
    assert_eq!(hashed("60"), hashed("86400"));

    // The header the next admitted response carries reflects Redis.
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("958"));
}

#[tokio::test]
async fn two_replicas_sharing_redis_enforce_one_budget() {
    let server = RedisServer::start();
    let replica = || {
        layer(
            RedisStore::from_url(server.url()).unwrap(),
            "shared",
            vec![per_user(500)],
        )
    };
    let (l1, l2) = (replica(), replica());
    let (a1, a2) = (serve_chat(l1.clone()).await, serve_chat(l2.clone()).await);
    let h = [("x-user", "u"), ("x-mock-tokens", "100")];
    // 5 × 100 tokens across both replicas spend the budget. A replica reuses the answer to
    // its last check for `check_reuse` (adding its own debits): past that, it sees the other's.
    for i in 0..5 {
        let (addr, l) = if i % 2 == 0 { (a1, &l1) } else { (a2, &l2) };
        tokio::time::sleep(DEFAULT_CHECK_REUSE).await;
        assert_eq!(
            send(addr, CHAT, &h, STREAM).await.status,
            StatusCode::OK,
            "request {i}"
        );
        l.flush().await;
    }
    assert_eq!(
        send(a1, CHAT, &h, STREAM).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(a2, CHAT, &h, STREAM).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let mut con = server.client();
    assert_eq!(
        con.get::<_, u64>("higress-token-ratelimit:{shared}:limit_by_per_header:60:x-user:u")
            .unwrap(),
        500
    );
}

#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let server = RedisServer::start();
    let limits = layer(
        RedisStore::from_url(server.url()).unwrap(),
        "r",
        vec![per_user(1000)],
    );
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "10")];
    send(addr, CHAT, &h, STREAM).await;
    limits.flush().await;
    let mut con = server.client();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut con)
        .unwrap();
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("990"));
    limits.flush().await;
    assert_eq!(
        con.get::<_, u64>("higress-token-ratelimit:{r}:limit_by_per_header:60:x-user:u")
            .unwrap(),
        20
    );
}

#[tokio::test]
async fn a_key_without_ttl_is_repaired() {
    let server = RedisServer::start();
    let mut con = server.client();
    let k = "higress-token-ratelimit:{r}:limit_by_per_header:60:x-user:stuck";
    con.set::<_, _, ()>(k, 5).unwrap();
    let limits = layer(
        RedisStore::from_url(server.url()).unwrap(),
        "r",
        vec![per_user(1000)],
    );
    let addr = serve_chat(limits.clone()).await;
    send(
        addr,
        CHAT,
        &[("x-user", "stuck"), ("x-mock-tokens", "10")],
        STREAM,
    )
    .await;
    limits.flush().await;
    assert_eq!(con.get::<_, u64>(k).unwrap(), 15);
    let ttl: i64 = con.ttl(k).unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_script_calls_per_request_and_no_ping() {
    let server = RedisServer::start();
    // A generous timeout: this counts commands, and a debug build under 200 concurrent
    // requests must not fail open.
    let store = store_within(&server, Duration::from_secs(2));
    let limits = layer(
        store,
        "r",
        vec![
            Rule::global().tokens_per_minute(u64::MAX / 2),
            per_user(u64::MAX / 2),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    // Warm up (script load, connection), then count.
    send(addr, CHAT, &[("x-user", "w")], STREAM).await;
    limits.flush().await;
    let mut con = server.client();
    server.reset_stats();
    let n = 200u64;
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let user = format!("u{}", i % 10);
            send(addr, CHAT, &[("x-user", &user)], STREAM).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    limits.flush().await;
    let (evalsha, total) = common::redis::client_commands(&server);
    // At most one check per request (concurrent checks of the same counters share one) and at
    // most one debit (debits that queue up while one is written are merged into one script).
    assert!(
        (2..=2 * n).contains(&evalsha),
        "{evalsha} scripts for {n} requests"
    );
    assert!(total <= evalsha + 5, "{total} commands for {n} requests");
    println!(
        "redis commands per request: {:.3} ({evalsha} scripts for {n} requests)",
        total as f64 / n as f64,
    );
    // Every request's tokens (100 each, the mock's default) are in its counters, merged or not.
    let global: u64 = con
        .get("higress-token-ratelimit:{r}:global_threshold:60")
        .unwrap();
    assert_eq!(global, (n + 1) * 100);
    let u3: u64 = con
        .get("higress-token-ratelimit:{r}:limit_by_per_header:60:x-user:u3")
        .unwrap();
    assert_eq!(u3, n / 10 * 100);
}

#[tokio::test]
async fn the_same_on_a_three_master_cluster() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let setup = started.elapsed();
    let replica = || {
        layer(
            RedisStore::builder()
                .cluster_nodes(cluster.node_addrs())
                .timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
            "cl",
            vec![Rule::global().tokens_per_minute(100_000), per_user(300)],
        )
    };
    let (l1, l2) = (replica(), replica());
    let (a1, a2) = (serve_chat(l1.clone()).await, serve_chat(l2.clone()).await);
    // Many users: their keys land in one slot per rule name (the {cl} hash tag).
    for user in ["a", "b", "c", "d"] {
        let h = [("x-user", user), ("x-mock-tokens", "100")];
        for (i, expected) in [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
        ]
        .into_iter()
        .enumerate()
        {
            let (addr, l) = if i % 2 == 0 { (a1, &l1) } else { (a2, &l2) };
            // Past the other replica's answer reuse.
            tokio::time::sleep(DEFAULT_CHECK_REUSE).await;
            assert_eq!(
                send(addr, CHAT, &h, STREAM).await.status,
                expected,
                "{user} #{i}"
            );
            l.flush().await;
        }
    }
    let mut con = cluster.client();
    assert_eq!(
        con.get::<_, u64>("higress-token-ratelimit:{cl}:global_threshold:60")
            .unwrap(),
        1200
    );
    assert_eq!(
        con.get::<_, u64>("higress-token-ratelimit:{cl}:limit_by_per_header:60:x-user:c")
            .unwrap(),
        300
    );
    // Debits merged from many requests span hash slots: one script per slot.
    let store = RedisStore::builder()
        .cluster_nodes(cluster.node_addrs())
        .build()
        .unwrap();
    let c = |key: &str| fixed_window(key, 100, 60);
    let keys = ["{r1}:x", "{r2}:y", "{r3}:z", "{r1}:w", "untagged"];
    let debits = keys.iter().zip(1..).map(|(k, t)| (c(k), t)).collect();
    store.debit_many(debits).await.unwrap();
    assert_eq!(store.pending_debits(), 0);
    for (k, t) in keys.iter().zip(1..) {
        assert_eq!(con.get::<_, u64>(*k).unwrap(), t, "{k}");
    }
    // Concurrent reservations in several hash slots: batched per slot, each on its own keys.
    let reservations = keys.iter().map(|k| {
        let store = store.clone();
        let counters = vec![c(k)];
        tokio::spawn(async move { store.reserve(&counters, 10).await })
    });
    for (r, (k, t)) in futures_util::future::join_all(reservations)
        .await
        .into_iter()
        .zip(keys.iter().zip(1..))
    {
        let r = r.unwrap().unwrap();
        assert_eq!(r.statuses[0].used, t, "{k}");
        assert!(r.windows.is_some(), "{k}");
        assert_eq!(con.get::<_, u64>(*k).unwrap(), t + 10, "{k}");
    }
    // Keys in several slots cannot be reserved together; that fails alone.
    let mixed = tokio::spawn({
        let store = store.clone();
        async move { store.reserve(&[c("{r1}:m"), c("{r2}:m")], 1).await }
    });
    let fine = tokio::spawn({
        let store = store.clone();
        async move { store.reserve(&[c("{r1}:n")], 1).await }
    });
    assert!(mixed.await.unwrap().is_err());
    assert!(fine.await.unwrap().unwrap().windows.is_some());
    println!(
        "cluster setup {setup:?}, whole test {:?}",
        started.elapsed()
    );
}

/// The master holding a budget's counter dies and its replica takes over: meanwhile requests
/// follow the failure mode (open) without waiting long, and the debits made are kept; once the
/// replica is master the store finds it, writes them, and reads budgets from it again. Nothing
/// the master had replicated is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_failover_loses_no_debit() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(1, 1000))
        .await
        .unwrap();
    let store = RedisStore::builder()
        .cluster_nodes(cluster.node_addrs())
        .timeout(Duration::from_millis(200))
        .breaker(3, Duration::from_millis(100))
        .build()
        .unwrap();
    let limits = layer(store.clone(), "fo", vec![per_user(100_000)]);
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "10")];
    let key = "higress-token-ratelimit:{fo}:limit_by_per_header:60:x-user:u";
    let mut sent = 0;
    for _ in 0..10 {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        sent += 1;
    }
    limits.flush().await;
    let master = cluster.master_of(key, 0).expect("a master serves the key");
    let mut con = cluster.nodes[master].client();
    assert_eq!(con.get::<_, u64>(key).unwrap(), 100);
    // Replicated before the kill (replication is asynchronous: an unreplicated write would be
    // the cluster's loss, not the store's). WAIT waits for this connection's own last write,
    // which the replication stream carries after the store's.
    let () = redis::cmd("SET")
        .arg("{fo}:replicated")
        .arg(1)
        .query(&mut con)
        .unwrap();
    let acked: u64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    assert_eq!(acked, 1, "the replica has the counter");

    cluster.nodes[master].kill();
    let killed = Instant::now();
    let other = (master + 1) % 3;
    let mut slowest = Duration::ZERO;
    let promoted = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no replica took over"
        );
        let t = Instant::now();
        let r = send(addr, CHAT, &h, STREAM).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status, StatusCode::OK, "fail open during the failover");
        sent += 1;
        match cluster.master_of(key, other) {
            Some(m) if m != master && cluster.node_ok(other) => break m,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let failover = killed.elapsed();
    assert!(
        slowest < Duration::from_secs(2),
        "slowest request during the failover {slowest:?}"
    );

    // After it, every debit reaches the new master, the outage's included.
    let mut con = cluster.nodes[promoted].client();
    // What the new master and the store hold along the way, for a failure's message.
    let mut seen = vec![format!(
        "at the promotion, after {sent} requests: {:?} on the new master, {} pending",
        con.get::<_, Option<u64>>(key).unwrap(),
        store.pending_debits()
    )];
    for _ in 0..10 {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        sent += 1;
    }
    seen.push(format!(
        "after {sent} requests: {:?}, {} pending",
        con.get::<_, Option<u64>>(key).unwrap(),
        store.pending_debits()
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        limits.flush().await;
        let used = con.get::<_, Option<u64>>(key).unwrap();
        if used == Some(sent * 10) && store.pending_debits() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{used:?} of {} tokens on the new master (node {promoted}, the killed one {master}), \
             {} pending, {} dropped; {}; {}",
            sent * 10,
            store.pending_debits(),
            store.dropped_debits(),
            seen.join("; "),
            cluster.describe(key, other)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.dropped_debits(), 0);
    // And budgets are read from the new master again.
    tokio::time::sleep(DEFAULT_CHECK_REUSE).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(addr, CHAT, &h, STREAM).await;
        limits.flush().await;
        sent += 1;
        let remaining = (100_000 - (sent - 1) * 10).to_string();
        if r.header("x-ratelimit-remaining-tokens") == Some(remaining.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "budget not read from the new master: {:?}, expected {remaining}",
            r.header("x-ratelimit-remaining-tokens")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("failover took {failover:?}; {sent} requests");
}

/// A debit that fails while the breaker stays closed (one failure of the many that open it) is
/// written again on its own once Redis is back, without waiting for a next request.
#[tokio::test]
async fn a_failed_debit_is_retried_without_further_traffic() {
    let mut server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(100), 1000);
    let limits = layer(store.clone(), "rt", vec![per_user(10_000)]);
    let addr = serve_chat(limits.clone()).await;
    server.kill();
    let h = [("x-user", "u"), ("x-mock-tokens", "9")];
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    assert_eq!(store.pending_debits(), 1, "the debit is kept");
    assert!(!store.breaker_open());

    server.restart();
    let mut con = server.client();
    let k = "higress-token-ratelimit:{rt}:limit_by_per_header:60:x-user:u";
    let deadline = Instant::now() + Duration::from_secs(10);
    while con.get::<_, Option<u64>>(k).unwrap() != Some(9) {
        assert!(
            Instant::now() < deadline,
            "not retried: {:?}, {} pending",
            con.get::<_, Option<u64>>(k),
            store.pending_debits()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.pending_debits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fail_open_then_recovers_with_buffered_debits() {
    let mut server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(50), 3);
    let limits = layer(store.clone(), "f", vec![per_user(10_000)]);
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "7")];
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;

    server.kill();
    // Answers read before are reused for `check_reuse` (unless a call fails first).
    tokio::time::sleep(DEFAULT_CHECK_REUSE).await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let r = send(addr, CHAT, &h, STREAM).await;
        let took = t.elapsed();
        assert_eq!(r.status, StatusCode::OK, "fail open, request {i}");
        assert_eq!(
            r.header("x-ratelimit-limit-tokens"),
            None,
            "no budget known"
        );
        slowest = slowest.max(took);
        limits.flush().await;
    }
    assert!(store.breaker_open(), "breaker opened");
    assert!(
        slowest < Duration::from_millis(600),
        "slowest request {slowest:?}"
    );
    // Once open, requests do not wait on Redis at all.
    let t = Instant::now();
    for _ in 0..20 {
        send(addr, CHAT, &h, STREAM).await;
    }
    let open_avg = t.elapsed() / 20;
    assert!(
        open_avg < Duration::from_millis(40),
        "average with breaker open {open_avg:?}"
    );
    limits.flush().await;
    assert!(store.pending_debits() >= 1);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.breaker_open() || store.pending_debits() > 0 {
        assert!(Instant::now() < deadline, "breaker never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis restarted empty: it now holds exactly the 40 debits made during the outage.
    let mut con = server.client();
    let k = "higress-token-ratelimit:{f}:limit_by_per_header:60:x-user:u";
    let deadline = Instant::now() + Duration::from_secs(5);
    while con.get::<_, Option<u64>>(k).unwrap() != Some(40 * 7) {
        assert!(
            Instant::now() < deadline,
            "buffered debits: {:?}",
            con.get::<_, Option<u64>>(k)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.dropped_debits(), 0);
    // And checks go to Redis again.
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("9720"));
}

#[tokio::test]
async fn redis_down_fail_closed_answers_503() {
    let mut server = RedisServer::start();
    let limits = TokenRateLimitLayer::builder()
        .redis(RedisStore::from_url(server.url()).unwrap())
        .failure_mode(FailureMode::Closed)
        .rule(per_user(1000))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    assert_eq!(
        send(addr, CHAT, &[("x-user", "u")], STREAM).await.status,
        StatusCode::OK
    );
    server.kill();
    tokio::time::sleep(DEFAULT_CHECK_REUSE).await;
    let r = send(addr, CHAT, &[("x-user", "u")], STREAM).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"]["type"], "rate_limit_store_unavailable");
    // Requests no limit applies to are not affected.
    assert_eq!(send(addr, CHAT, &[], STREAM).await.status, StatusCode::OK);
}

#[tokio::test]
async fn redis_down_fail_local_keeps_limits_per_process() {
    let mut server = RedisServer::start();
    let limits = TokenRateLimitLayer::builder()
        .redis(RedisStore::from_url(server.url()).unwrap())
        .failure_mode(FailureMode::Local)
        .rule(per_user(250))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "100")];
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    server.kill();
    // The local store saw the first debit too: 100 + 100 + 100 ≥ 250.
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, expected);
        limits.flush().await;
    }
    assert_eq!(
        send(addr, CHAT, &[("x-user", "other")], STREAM)
            .await
            .status,
        StatusCode::OK
    );
}

/// In reserve mode with `local`, a reservation taken locally while Redis is down and charged
/// an estimate (the upstream reported no usage) reaches Redis once it is back, as one with
/// usage does: nothing is silently lost (SPEC 5.3).
#[tokio::test]
async fn local_reservations_charged_an_estimate_reach_redis_once_it_is_back() {
    use tower_token_ratelimit::Mode;

    let mut server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(200), 1);
    let limits = TokenRateLimitLayer::builder()
        .rule_name("l")
        .mode(Mode::Reserve)
        .failure_mode(FailureMode::Local)
        .rule(per_user(1_000_000))
        .redis(store.clone())
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    server.kill();
    let body = r#"{"model":"m","max_tokens":50,"messages":[]}"#;
    let with = [("x-user", "with"), ("x-mock-tokens", "100")];
    let without = [("x-user", "without"), ("x-mock-no-usage", "1")];
    assert_eq!(send(addr, CHAT, &with, body).await.status, StatusCode::OK);
    assert_eq!(
        send(addr, CHAT, &without, body).await.status,
        StatusCode::OK
    );
    server.restart();
    limits.flush().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut con = server.client();
    let key =
        |user: &str| format!("higress-token-ratelimit:{{l}}:limit_by_per_header:60:x-user:{user}");
    loop {
        let (w, wo): (Option<u64>, Option<u64>) = (
            con.get(key("with")).unwrap(),
            con.get(key("without")).unwrap(),
        );
        if let (Some(w), Some(wo)) = (w, wo) {
            assert_eq!(w, 100);
            assert!(wo >= 50, "the estimate, at least the output cap: {wo}");
            break;
        }
        assert!(Instant::now() < deadline, "with {w:?}, without {wo:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        limits.flush().await;
    }
}

#[tokio::test]
async fn wrong_password_and_hung_redis_fail_fast_with_a_clear_error() {
    let server = RedisServer::start_with_password("right");
    let store = RedisStore::from_url(format!("redis://:wrong@127.0.0.1:{}", server.port)).unwrap();
    let limits = layer(store, "p", vec![per_user(10)]);
    let addr = serve_chat(limits.clone()).await;
    let t = Instant::now();
    assert_eq!(
        send(addr, CHAT, &[("x-user", "u")], STREAM).await.status,
        StatusCode::OK
    );
    assert!(t.elapsed() < Duration::from_secs(1));

    // A "Redis" that accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let store = RedisStore::from_url(format!("redis://127.0.0.1:{hung_port}")).unwrap();
    let limits = layer(store.clone(), "h", vec![per_user(10)]);
    let addr = serve_chat(limits.clone()).await;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            send(addr, CHAT, &[("x-user", "u")], STREAM).await.status,
            StatusCode::OK
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "waited {:?}",
            t.elapsed()
        );
    }
    assert!(store.breaker_open());
}

#[test]
fn higress_redis_block_and_bad_urls() {
    let yaml = r#"
rule_name: r
redis:
  service_name: redis.example.internal
  service_port: 6380
  username: default
  password: "p@ss:word"
  timeout: 100
  database: 2
global_threshold: {token_per_minute: 10}
"#;
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(yaml).unwrap();
    assert!(
        !format!("{cfg:?}").contains("p@ss"),
        "password redacted in Debug"
    );
    TokenRateLimitLayer::from_config(cfg).expect("builds without Redis reachable");

    let yaml = r#"
rule_name: r
redis: {url: "redis://127.0.0.1:6379/0", cluster_nodes: ["127.0.0.1:7000"], colour: blue}
global_threshold: {token_per_minute: 0}
"#;
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(yaml).unwrap();
    let err = TokenRateLimitLayer::from_config(cfg).unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    for p in ["global_threshold.token_per_minute", "redis.colour", "redis"] {
        assert!(paths.contains(&p), "{p} missing: {err}");
    }
    let err = RedisStore::from_url("http://secret@host").unwrap_err();
    assert!(
        err.to_string().contains("redis.url") && !err.to_string().contains("secret"),
        "{err}"
    );
}

/// Absurd amounts (a client's `max_tokens` of 10^18, a usage report as large) are carried
/// to Redis clamped: the scripts do not fail part-way (Redis writes numbers from 10^17 on in
/// exponent form, which `INCRBY` refuses), nothing is counted twice or lost, and the breaker
/// stays closed.
#[tokio::test]
async fn absurd_amounts_neither_fail_scripts_nor_open_the_breaker() {
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .url(server.url())
        .breaker(1, Duration::from_millis(100))
        .build()
        .unwrap();
    let huge = 1_000_000_000_000_000_000;
    let r = store
        .reserve(&[fixed_window("{h}:r", 100, 60)], huge)
        .await
        .unwrap();
    assert!(r.windows.is_some(), "an empty window gives one turn");
    let r = store
        .reserve(&[fixed_window("{h}:r", 100, 60)], 1)
        .await
        .unwrap();
    assert!(r.windows.is_none(), "then the budget is spent");
    store
        .debit_many(vec![
            (fixed_window("{h}:a", 100, 60), 10),
            (fixed_window("{h}:b", 100, 60), huge),
        ])
        .await
        .unwrap();
    assert!(!store.breaker_open());
    assert_eq!(store.pending_debits(), 0);
    let mut con = server.client();
    assert_eq!(con.get::<_, u64>("{h}:a").unwrap(), 10);
    assert!(con.get::<_, u64>("{h}:b").unwrap() >= 1 << 50);
    // On a token bucket of under a token a second the time to drain such a debt is over 2^63
    // ms: the answer still reads as integers, and the counter is spent, not failing.
    let bucket = Counter {
        algorithm: Algorithm::TokenBucket,
        ..fixed_window("{h}:bucket", 1_000, 86_400)
    };
    let one = std::slice::from_ref(&bucket);
    store.debit(one, huge).await.unwrap();
    let status = store.check(one).await.unwrap()[0];
    assert!(status.used >= 1_000, "{status:?}");
    let r = store.reserve(one, 1).await.unwrap();
    assert!(r.windows.is_none(), "spent: {r:?}");
    assert!(!store.breaker_open());
}

/// However many reservations queue behind a slow Redis, each caller waits about two per-call
/// timeouts at most, then gets an error (and the failure mode applies); what Redis reserves
/// for callers that left is given back, so the counters end at what was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reservations_wait_two_timeouts_at_most() {
    let server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(200), 1_000);
    let c = |i: usize| fixed_window(&format!("{{q}}:{i}"), 1_000_000, 60);
    store.reserve(&[c(0)], 1).await.unwrap();
    // Slow, not down: 30 ms pauses back to back for 1.5 s, each script answered well within
    // its timeout, but 2,000 reservations take ~30 scripts in turn.
    let mut slow = server.client();
    let busy = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(0.03)
                .query(&mut slow)
                .unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let tasks: Vec<_> = (0..2000)
        .map(|i| {
            let (store, counter) = (store.clone(), c(i % 50));
            tokio::spawn(async move {
                let t = Instant::now();
                let r = store.reserve(&[counter], 1).await;
                (t.elapsed(), r.is_ok_and(|r| r.windows.is_some()))
            })
        })
        .collect();
    let (mut longest, mut reserved) = (Duration::ZERO, 1);
    for t in tasks {
        let (took, ok) = t.await.unwrap();
        longest = longest.max(took);
        reserved += u64::from(ok);
    }
    assert!(longest < Duration::from_millis(600), "waited {longest:?}");
    tokio::task::spawn_blocking(move || busy.join().unwrap())
        .await
        .unwrap();
    // Given back once Redis answers the scripts that ran after their callers left.
    let mut con = server.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let total: u64 = (0..50)
            .map(|i| {
                con.get::<_, Option<u64>>(format!("{{q}}:{i}"))
                    .unwrap()
                    .unwrap_or(0)
            })
            .sum();
        if total == reserved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{total} in Redis, {reserved} answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reservations answered late while the breaker is open (the slow spell that made them late
/// opened it) are still given back once Redis answers again: the counter ends where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reservations_are_given_back_after_the_breaker_opened() {
    let server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(100), 3);
    let c = fixed_window("{late}:k", 1_000_000, 60);
    let one = std::slice::from_ref(&c);
    store.reserve(one, 1).await.unwrap();
    let busy = server.busy_for(0.6);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..3 {
        assert!(store.reserve(one, 1000).await.is_err(), "late: an error");
    }
    assert!(store.breaker_open());
    tokio::task::spawn_blocking(move || busy.join().unwrap())
        .await
        .unwrap();
    let mut con = server.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used: u64 = con.get("{late}:k").unwrap();
        if used == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{used} still charged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reservation whose caller goes away while the script runs (the request was dropped) is
/// given back: it would otherwise stay charged for a request never admitted.
#[tokio::test]
async fn a_reservation_whose_caller_left_is_given_back() {
    let server = RedisServer::start();
    let store = patient_store(&server);
    let c = fixed_window("{c}:r", 10_000, 60);
    // Connected, and the script loaded.
    store.reserve(std::slice::from_ref(&c), 1).await.unwrap();
    let mut con = server.client();
    assert_eq!(con.get::<_, u64>("{c}:r").unwrap(), 1);
    // Redis busy: the next script waits in its queue, and its caller leaves meanwhile.
    let busy = server.busy_for(0.3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let call = tokio::spawn({
        let (store, c) = (store.clone(), c.clone());
        async move { store.reserve(&[c], 1234).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.abort();
    tokio::task::spawn_blocking(move || busy.join().unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = con.get::<_, u64>("{c}:r").unwrap();
        if used == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{used} used: the 1,234 stayed reserved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reservation script that gets no answer within the timeout may still run once Redis is
/// back: its callers were answered with the timeout (and will never settle it), so what it
/// reserved is given back when its answer comes.
#[tokio::test]
async fn a_reservation_answered_after_its_timeout_is_given_back() {
    let server = RedisServer::start();
    let store = store_within(&server, Duration::from_millis(200));
    let c = fixed_window("{c}:late", 10_000, 60);
    // Connected, and the script loaded.
    store.reserve(std::slice::from_ref(&c), 1).await.unwrap();
    let mut con = server.client();
    assert_eq!(con.get::<_, u64>("{c}:late").unwrap(), 1);
    // Redis busy past the timeout: the script waits in its queue and runs afterwards.
    server.reset_stats();
    let busy = server.busy_for(1.0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let error = store
        .reserve(std::slice::from_ref(&c), 1234)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no answer within"), "{error}");
    assert!(started.elapsed() < Duration::from_millis(800));
    tokio::task::spawn_blocking(move || busy.join().unwrap())
        .await
        .unwrap();
    let reserved = || {
        common::redis::command_calls(&server)
            .iter()
            .any(|(name, calls)| name == "incrby" && *calls > 0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = con.get::<_, u64>("{c}:late").unwrap();
        if used == 1 && reserved() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{used} used: the 1,234 reserved after the timeout stayed charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Later reservations are answered and kept as usual.
    store.reserve(std::slice::from_ref(&c), 10).await.unwrap();
    assert_eq!(con.get::<_, u64>("{c}:late").unwrap(), 11);
}

/// A `redis` block's mistakes are all reported at once, and nothing in it is silently
/// ignored: the Higress connection fields next to a URL or cluster nodes (which carry their
/// own), a negative database. A reload checks the block too, though it does not apply it.
#[test]
fn redis_block_mistakes_are_all_reported_and_none_ignored() {
    let problems = |redis: serde_json::Value| -> Vec<String> {
        let cfg: TokenRateLimitConfig = serde_json::from_value(serde_json::json!({
            "rule_name": "r",
            "global_threshold": {"token_per_minute": 10},
            "redis": redis,
        }))
        .unwrap();
        match TokenRateLimitLayer::from_config(cfg) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().iter().map(|p| p.path.clone()).collect(),
        }
    };
    assert_eq!(
        problems(
            serde_json::json!({"url": "redis://127.0.0.1:6379/0", "database": 5,
            "service_port": 7000, "username": "u", "password": "pw"})
        ),
        [
            "redis.service_port",
            "redis.database",
            "redis.username",
            "redis.password"
        ]
    );
    assert_eq!(
        problems(serde_json::json!({"cluster_nodes": ["127.0.0.1:7000"], "database": 3})),
        ["redis.database"]
    );
    assert_eq!(
        problems(serde_json::json!({"service_name": "127.0.0.1", "database": -1})),
        ["redis.database"]
    );
    assert_eq!(
        problems(serde_json::json!({"service_name": "", "timeout": 0, "settle_interval": 999_999})),
        [
            "redis.service_name",
            "redis.timeout",
            "redis.settle_interval"
        ]
    );
    assert_eq!(
        problems(serde_json::json!({"timeout": 0})),
        ["redis", "redis.timeout"]
    );
    // Still fine: the Higress fields with service_name, credentials in the URL.
    assert!(
        problems(
            serde_json::json!({"service_name": "h", "service_port": 6380, "database": 2,
            "username": "u", "password": "pw"})
        )
        .is_empty()
    );
    assert!(problems(serde_json::json!({"url": "redis://u:pw@h:6380/2"})).is_empty());

    let cfg = |redis: serde_json::Value| -> TokenRateLimitConfig {
        serde_json::from_value(serde_json::json!({
            "rule_name": "r",
            "global_threshold": {"token_per_minute": 10},
            "redis": redis,
        }))
        .unwrap()
    };
    let layer = TokenRateLimitLayer::builder()
        .rule(Rule::global().tokens_per_minute(10))
        .build()
        .unwrap();
    let err = layer
        .reload(cfg(
            serde_json::json!({"servce_name": "typo", "timeout": 0}),
        ))
        .unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"redis.servce_name"), "{err}");
    layer
        .reload(cfg(serde_json::json!({"url": "redis://127.0.0.1:1/0"})))
        .expect("a valid block is accepted (and not applied)");
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn rediss_urls_connect_over_tls() {
    let server = tokio::task::spawn_blocking(RedisServer::start_tls)
        .await
        .unwrap();
    // Self-signed: `#insecure` skips verification.
    let store = RedisStore::builder()
        .url(format!("rediss://127.0.0.1:{}/#insecure", server.port))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let limits = layer(store.clone(), "tls", vec![per_user(150)]);
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "t"), ("x-mock-tokens", "100")];
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, expected);
        limits.flush().await;
    }
    assert!(!store.breaker_open());
    // Verification is on without the fragment: a self-signed certificate is refused.
    let strict = RedisStore::builder()
        .url(format!("rediss://127.0.0.1:{}/", server.port))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let limits = layer(strict.clone(), "tls2", vec![per_user(150)]);
    let addr = serve_chat(limits.clone()).await;
    // Fail open: served, but no budget could be read.
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), None);
}

#[tokio::test]
async fn reservations_settle_in_the_window_they_were_taken_in() {
    let server = RedisServer::start();
    let store = store_within(&server, Duration::from_secs(1));
    let c = |k: &str| fixed_window(&format!("{{t}}:{k}"), 100, 1);
    let both = [c("a"), c("b")];
    let mut con = server.client();
    let used = |con: &mut redis::Connection, k: &str| -> u64 {
        con.get::<_, Option<u64>>(format!("{{t}}:{k}"))
            .unwrap()
            .unwrap_or(0)
    };

    let r = store.reserve(&both, 60).await.unwrap();
    let windows = r.windows.expect("fits");
    assert_eq!((used(&mut con, "a"), used(&mut con, "b")), (60, 60));
    assert!(
        store.reserve(&both, 60).await.unwrap().windows.is_none(),
        "all or nothing"
    );
    assert_eq!(used(&mut con, "a"), 60);
    store.settle(&both, &windows, 60, 45).await.unwrap();
    assert_eq!(
        (used(&mut con, "a"), used(&mut con, "b")),
        (45, 45),
        "refund in the same window"
    );

    // Across a window boundary: the refund is not paid into the next window.
    let r = store.reserve(&both, 50).await.unwrap().windows.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(used(&mut con, "a"), 0, "the window ended");
    store.debit(&both, 5).await.unwrap();
    store.settle(&both, &r, 50, 10).await.unwrap();
    assert_eq!(used(&mut con, "a"), 5);
    // Extra usage still counts, in the current window.
    let r = store.reserve(&both, 10).await.unwrap().windows.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.settle(&both, &r, 10, 30).await.unwrap();
    assert_eq!(used(&mut con, "a"), 20);
    let ttl: i64 = con.ttl("{t}:a").unwrap();
    assert!(
        (0..=1).contains(&ttl),
        "a new window with its expiry: {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_mode_writes_only_what_changes_a_counter() {
    let server = RedisServer::start();
    let mut con = server.client();
    // A key left without expiry, and one the reservations start.
    con.set::<_, _, ()>("{t}:stuck", 5).unwrap();
    let store = RedisStore::from_url(server.url()).unwrap();
    let both = [
        fixed_window("{t}:stuck", 100, 60),
        fixed_window("{t}:new", 100, 60),
    ];
    let calls = |name: &str| {
        common::redis::command_calls(&server)
            .into_iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, calls)| calls)
    };

    let first = store.reserve(&both, 10).await.unwrap().windows.unwrap();
    for k in ["{t}:stuck", "{t}:new"] {
        let ttl: i64 = con.ttl(k).unwrap();
        assert!((1..=60).contains(&ttl), "{k} has an expiry: {ttl}");
    }
    server.reset_stats();
    let second = store.reserve(&both, 10).await.unwrap().windows.unwrap();
    assert_eq!(first, second, "the same windows");
    assert_eq!(calls("incrby"), 2);
    assert_eq!(calls("expire"), 0, "running windows keep their expiry");

    server.reset_stats();
    store.settle(&both, &second, 10, 10).await.unwrap();
    assert_eq!(
        common::redis::client_commands(&server).1,
        0,
        "an exact reservation"
    );
    store.settle(&both, &second, 10, 4).await.unwrap();
    assert_eq!(con.get::<_, u64>("{t}:stuck").unwrap(), 19);
    assert_eq!(con.get::<_, u64>("{t}:new").unwrap(), 14);
}

#[tokio::test]
async fn a_refused_reservation_leaves_every_counter_as_it_was() {
    let server = RedisServer::start();
    let mut con = server.client();
    // A running window, a key left without expiry, and one the reservation would create: all
    // fit 50 tokens; the last counter does not.
    con.set_ex::<_, _, ()>("{r}:running", 30, 60).unwrap();
    con.set::<_, _, ()>("{r}:stuck", 7).unwrap();
    con.set_ex::<_, _, ()>("{r}:full", 90, 60).unwrap();
    let expiry = |con: &mut redis::Connection, k: &str| -> i64 {
        redis::cmd("PEXPIRETIME").arg(k).query(con).unwrap()
    };
    let running_expiry = expiry(&mut con, "{r}:running");
    let store = RedisStore::from_url(server.url()).unwrap();
    let counters = [
        fixed_window("{r}:running", 100, 60),
        fixed_window("{r}:stuck", 100, 60),
        fixed_window("{r}:new", 100, 60),
        fixed_window("{r}:full", 100, 60),
    ];

    let r = store.reserve(&counters, 50).await.unwrap();
    assert!(r.windows.is_none(), "refused");
    let used: Vec<u64> = r.statuses.iter().map(|s| s.used).collect();
    assert_eq!(used, [30, 7, 0, 90], "what each held before");
    assert_eq!(con.get::<_, u64>("{r}:running").unwrap(), 30);
    assert_eq!(expiry(&mut con, "{r}:running"), running_expiry);
    assert_eq!(con.get::<_, u64>("{r}:stuck").unwrap(), 7);
    assert_eq!(expiry(&mut con, "{r}:stuck"), -1, "still without expiry");
    assert!(
        !con.exists::<_, bool>("{r}:new").unwrap(),
        "no key left behind"
    );
    assert_eq!(con.get::<_, u64>("{r}:full").unwrap(), 90);

    // Without the full counter it fits: each counter takes it, and each window's id is its
    // expiry (the running one's unchanged; the others start now).
    let r = store.reserve(&counters[..3], 50).await.unwrap();
    let windows = r.windows.expect("reserved");
    for ((k, held), window) in [("{r}:running", 80), ("{r}:stuck", 57), ("{r}:new", 50)]
        .into_iter()
        .zip(windows)
    {
        assert_eq!(con.get::<_, u64>(k).unwrap(), held, "{k}");
        assert_eq!(expiry(&mut con, k), i64::try_from(window).unwrap(), "{k}");
        let ttl: i64 = con.ttl(k).unwrap();
        assert!((1..=60).contains(&ttl), "{k}: {ttl}");
    }
    assert_eq!(expiry(&mut con, "{r}:running"), running_expiry);
}

#[tokio::test]
async fn sliding_window_and_token_bucket_in_redis() {
    let server = RedisServer::start();
    let store = store_within(&server, Duration::from_secs(1));
    let counter = |k: &str, algorithm| Counter {
        key: format!("{{alg}}:{k}").into(),
        limit: 100,
        window: Duration::from_secs(2),
        algorithm,
    };
    let used = |c: &Counter| {
        let store = store.clone();
        let c = c.clone();
        async move { store.check(std::slice::from_ref(&c)).await.unwrap()[0] }
    };

    // Sliding: what was used keeps counting, fading, through the next window.
    let s = counter("s", Algorithm::SlidingWindow);
    store.debit(std::slice::from_ref(&s), 80).await.unwrap();
    let first = used(&s).await;
    assert!(first.used <= 80 && first.used > 0, "{first:?}");
    assert!(first.reset <= Duration::from_secs(2));
    // Into the next window: between 0 and 80, and not reset to 0 at the boundary.
    tokio::time::sleep(first.reset + Duration::from_millis(200)).await;
    let next = used(&s).await.used;
    assert!((1..80).contains(&next), "weighted previous window: {next}");
    tokio::time::sleep(Duration::from_millis(4100)).await;
    assert_eq!(used(&s).await.used, 0);

    // Spent by the current window alone: it frees in the next window, once the fading share
    // of the 300 used is under 100 (a third of the way into it), not at the boundary.
    let over = counter("over", Algorithm::SlidingWindow);
    store.debit(std::slice::from_ref(&over), 300).await.unwrap();
    let spent = used(&over).await;
    assert!(spent.used >= 100, "{spent:?}");
    assert!(spent.reset > Duration::from_millis(1333), "{spent:?}");
    tokio::time::sleep(spent.reset + Duration::from_millis(100)).await;
    assert!(
        used(&over).await.used < 100,
        "frees at its reset: {spent:?}"
    );

    // Token bucket: 100 per 2 s, i.e. 50 a second; a debit of 150 is 50 of debt.
    let b = counter("b", Algorithm::TokenBucket);
    store.debit(std::slice::from_ref(&b), 150).await.unwrap();
    let debt = used(&b).await;
    assert!((140..=150).contains(&debt.used), "{debt:?}");
    assert!(
        (Duration::from_millis(700)..=Duration::from_millis(1001)).contains(&debt.reset),
        "under the limit in ~1 s (empty in ~3): {debt:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = used(&b).await.used;
    assert!(
        (80..100).contains(&later),
        "refilled below the limit: {later}"
    );
    // Reserve and settle work on both.
    for c in [&s, &b] {
        let r = store.reserve(std::slice::from_ref(c), 10).await.unwrap();
        let w = r.windows.expect("fits");
        let before = used(c).await.used;
        store
            .settle(std::slice::from_ref(c), &w, 10, 4)
            .await
            .unwrap();
        let after = used(c).await.used;
        assert!(after + 5 <= before, "refund applied: {before} -> {after}");
    }
}

#[tokio::test]
async fn a_sliding_refund_after_the_window_rolled_comes_off_the_previous_window() {
    let server = RedisServer::start();
    // Every check reads Redis (a reused answer adds this replica's own settlements to it).
    let store = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_secs(5))
        .check_reuse(Duration::ZERO)
        .build()
        .unwrap();
    common::stores::a_sliding_refund_after_the_window_rolled(&store, "{s}:late").await;
}

#[tokio::test]
async fn algorithms_from_the_config_through_the_layer() {
    let server = RedisServer::start();
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(&format!(
        r#"
rule_name: alg
redis: {{url: "{}", timeout: 1000}}
rule_items:
  - limit_by_per_header: x-user
    limit_keys: [{{key: "*", token_per_minute: 150, algorithm: token_bucket}}]
global_threshold: {{token_per_hour: 100000, algorithm: sliding_window}}
"#,
        server.url()
    ))
    .unwrap();
    let limits = TokenRateLimitLayer::from_config(cfg).unwrap();
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "100")];
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, expected);
        limits.flush().await;
    }
    let keys = all_keys(&mut server.client());
    assert_eq!(
        keys,
        [
            "higress-token-ratelimit:{alg}:global_threshold:sliding3600",
            "higress-token-ratelimit:{alg}:limit_by_per_header:bucket60:x-user:u",
        ]
    );
}

#[tokio::test]
async fn an_existing_deadpool_pool_can_be_used() {
    let server = RedisServer::start();
    let pool = deadpool_redis::Config::from_url(server.url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let limits = TokenRateLimitLayer::builder()
        .rule_name("pool")
        .redis(pool)
        .rule(per_user(1000))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    send(
        addr,
        CHAT,
        &[("x-user", "p"), ("x-mock-tokens", "12")],
        STREAM,
    )
    .await;
    limits.flush().await;
    let mut con = server.client();
    assert_eq!(
        con.get::<_, u64>("higress-token-ratelimit:{pool}:limit_by_per_header:60:x-user:p")
            .unwrap(),
        12
    );
}

#[tokio::test]
async fn debits_past_the_buffer_bound_are_counted_not_silently_lost() {
    let mut server = RedisServer::start();
    let store = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_millis(50))
        .breaker(1, Duration::from_millis(100))
        .max_pending_debits(2)
        .build()
        .unwrap();
    server.kill();
    let c = |k: &str| fixed_window(&format!("{{o}}:{k}"), 100, 60);
    for k in ["a", "b", "a", "c", "d"] {
        store.debit(&[c(k)], 5).await.unwrap();
    }
    // a (merged twice) and b are kept; c and d did not fit.
    assert_eq!(store.pending_debits(), 2);
    assert_eq!(store.dropped_debits(), 2);
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.breaker_open() || store.pending_debits() > 0 {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut con = server.client();
    assert_eq!(con.get::<_, Option<u64>>("{o}:a").unwrap(), Some(10));
    assert_eq!(con.get::<_, Option<u64>>("{o}:b").unwrap(), Some(5));
    assert_eq!(con.get::<_, Option<u64>>("{o}:c").unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_of_the_same_counters_share_one_call() {
    let server = RedisServer::start();
    let store = patient_store(&server);
    let counters = |limit: u64| vec![fixed_window("{c}:k", limit, 60)];
    store.debit(&counters(100), 7).await.unwrap();
    // Loads the check script.
    store.check(&counters(100)).await.unwrap();
    server.reset_stats();
    // Redis busy for 300 ms: every check below is sent, or waiting, meanwhile.
    let sleeper = server.busy_for(0.3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The first check makes the call and is then abandoned; the others still get an answer.
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.check(&counters(100)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut others = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        others.push(tokio::spawn(
            async move { store.check(&counters(100)).await },
        ));
    }
    // Other parameters: a call of its own.
    let other_limit = tokio::spawn({
        let store = store.clone();
        async move { store.check(&counters(50)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.abort();
    for t in others {
        assert_eq!(t.await.unwrap().unwrap()[0].used, 7);
    }
    assert_eq!(other_limit.await.unwrap().unwrap()[0].used, 7);
    sleeper.join().unwrap();
    let (evalsha, _) = common::redis::client_commands(&server);
    // The abandoned call, one more for the checks that waited on it, the other limit's.
    assert!(evalsha <= 3, "{evalsha} check scripts for 22 checks");
}

#[tokio::test]
async fn merged_reserve_settlements_correct_each_window_once() {
    let server = RedisServer::start();
    let store = RedisStore::builder().url(server.url()).build().unwrap();
    let c = |key: &str| fixed_window(key, 10_000, 60);
    // Two requests reserved 100 each on both counters, in the same windows.
    let mut windows = Vec::new();
    for _ in 0..2 {
        let r = store.reserve(&[c("{s}:a"), c("{s}:b")], 100).await.unwrap();
        windows = r.windows.expect("reserved");
    }
    // One used 30, the other 150: merged, -70 + 50 = -20 per counter. A refund for a window
    // that has ended is dropped; extra usage there goes to the current window.
    store
        .settle_many(vec![
            (c("{s}:a"), windows[0], -20),
            (c("{s}:b"), windows[1], -20),
            (c("{s}:b"), windows[1] - 1, -500),
            (c("{s}:b"), windows[1] - 1, 7),
        ])
        .await
        .unwrap();
    let mut con = server.client();
    assert_eq!(con.get::<_, u64>("{s}:a").unwrap(), 180);
    assert_eq!(con.get::<_, u64>("{s}:b").unwrap(), 187);
}

/// A check's answer is reused for `check_reuse` without a Redis call, with this store's own
/// debits, reservations and refunds added; another store's debits show once it is older than
/// that, and a failed call ends the reuse at once.
#[tokio::test]
async fn check_answers_are_reused_with_this_stores_debits_added() {
    let mut server = RedisServer::start();
    let reuse = Duration::from_secs(1);
    let store = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_secs(5))
        .check_reuse(reuse)
        .build()
        .unwrap();
    let other = RedisStore::builder()
        .url(server.url())
        .check_reuse(Duration::ZERO)
        .build()
        .unwrap();
    let c = vec![fixed_window("{r}:k", 1000, 60)];
    other.debit(&c, 5).await.unwrap();
    // Loads the reserve and settle scripts (a settlement that changes nothing sends none).
    let warm = vec![fixed_window("{r}:warm", 1000, 60)];
    let r = store.reserve(&warm, 1).await.unwrap();
    store
        .settle(&warm, &r.windows.unwrap(), 1, 0)
        .await
        .unwrap();
    let read = Instant::now();
    assert_eq!(store.check(&c).await.unwrap()[0].used, 5);
    server.reset_stats();

    store.debit(&c, 100).await.unwrap();
    let reservation = store.reserve(&c, 50).await.unwrap();
    let windows = reservation.windows.expect("fits");
    store.settle(&c, &windows, 50, 20).await.unwrap();
    other.debit(&c, 300).await.unwrap();
    // 5 read + 100 + 50 reserved - 30 refunded; not the other store's 300.
    let reused = store.check(&c).await.unwrap()[0];
    assert_eq!(reused.used, 125);
    assert!(reused.reset <= Duration::from_secs(60));
    assert_eq!(store.try_check_now(&c).unwrap()[0].used, 125);
    assert!(
        read.elapsed() < reuse,
        "the steps above took {:?}",
        read.elapsed()
    );
    assert_eq!(
        common::redis::client_commands(&server).0,
        4,
        "debit, reserve, settle, the other debit: no check"
    );

    tokio::time::sleep_until((read + reuse).into()).await;
    assert_eq!(store.try_check_now(&c), None);
    assert_eq!(store.check(&c).await.unwrap()[0].used, 425);
    assert_eq!(common::redis::client_commands(&server).0, 5);

    // Redis gone: the first failed call ends the reuse, and checks fail.
    server.kill();
    assert_eq!(store.try_check_now(&c).unwrap()[0].used, 425);
    store.debit(&c, 1).await.unwrap();
    assert_eq!(store.try_check_now(&c), None);
    assert!(store.check(&c).await.is_err());
}

#[tokio::test]
async fn check_reuse_from_the_config() {
    let server = RedisServer::start();
    for (reuse, calls) in [(0, 3), (60_000, 0)] {
        let cfg: tower_token_ratelimit::RedisConfig = serde_yaml::from_str(&format!(
            "{{url: \"{}\", check_reuse: {reuse}}}",
            server.url()
        ))
        .unwrap();
        let store = RedisStore::from_config(&cfg).unwrap();
        let c = vec![fixed_window(&format!("{{q}}:{reuse}"), 10, 60)];
        store.check(&c).await.unwrap();
        server.reset_stats();
        for _ in 0..3 {
            store.check(&c).await.unwrap();
        }
        assert_eq!(
            common::redis::client_commands(&server).0,
            calls,
            "check_reuse: {reuse}"
        );
    }
}

/// Reservations that arrive while one reservation script is on its way go together in the
/// next: fewer script calls than reservations, each still all or none on its own counters, in
/// the order they came; one whose request is gone before its turn is not made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_share_scripts_and_stay_exact() {
    let server = RedisServer::start();
    let store = patient_store(&server);
    let shared = fixed_window("{b}:shared", 100, 60);
    // Loads the script.
    store
        .reserve(&[fixed_window("{b}:warm", 10, 60)], 1)
        .await
        .unwrap();
    let mut con = server.client();
    server.reset_stats();
    // Redis busy for 300 ms: the reservations below queue behind the first.
    let sleeper = server.busy_for(0.3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // 20 requests, each on its own counter and the shared one (100 tokens): 30 each, so the
    // shared budget takes exactly 3 (0, 30, 60 used before them; at 90, 30 more do not fit).
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        let counters = vec![
            fixed_window(&format!("{{b}}:own{i}"), 1000, 60),
            shared.clone(),
        ];
        tasks.push(tokio::spawn(
            async move { store.reserve(&counters, 30).await },
        ));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A request dropped while its reservation waits for its turn reserves nothing.
    let dropped = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .reserve(&[fixed_window("{b}:dropped", 1000, 60)], 30)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    dropped.abort();
    let mut seen_by_granted = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap();
        let own: Option<u64> = con.get(format!("{{b}}:own{i}")).unwrap();
        if r.windows.is_some() {
            seen_by_granted.push(r.statuses[1].used);
            assert_eq!(own, Some(30), "own{i}");
        } else {
            assert_eq!(r.statuses[1].used, 90, "own{i}");
            assert_eq!(own, None, "all or none: own{i}");
        }
    }
    sleeper.join().unwrap();
    seen_by_granted.sort_unstable();
    assert_eq!(seen_by_granted, [0, 30, 60], "one after another");
    assert_eq!(con.get::<_, u64>("{b}:shared").unwrap(), 90);
    assert_eq!(con.get::<_, Option<u64>>("{b}:dropped").unwrap(), None);
    let (scripts, _) = common::redis::client_commands(&server);
    assert!(
        (2..=5).contains(&scripts),
        "{scripts} scripts for 20 reservations"
    );
}

/// A batch is cut only once the tasks already woken have run up to their own reservation: one
/// woken with the answer to the script before (here a request that reserves again at once)
/// goes in the next script with those that queued while that script ran, not in a third.
#[tokio::test]
async fn reservations_of_tasks_woken_with_an_answer_join_the_next_script() {
    let server = RedisServer::start();
    let store = patient_store(&server);
    let counter = |key: String| vec![fixed_window(&key, 1000, 60)];
    // Loads the script.
    store.reserve(&counter("{w}:warm".into()), 1).await.unwrap();
    server.reset_stats();
    // Redis busy for 300 ms: the first reservation's script waits, the next five queue.
    let sleeper = server.busy_for(0.3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let first = tokio::spawn({
        let store = store.clone();
        async move {
            let a = store.reserve(&counter("{w}:a".into()), 10).await.unwrap();
            let again = store.reserve(&counter("{w}:a".into()), 10).await.unwrap();
            (a, again)
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let others: Vec<_> = (0..5)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.reserve(&counter(format!("{{w}}:b{i}")), 10).await })
        })
        .collect();
    let (a, again) = first.await.unwrap();
    assert_eq!(a.statuses[0].used, 0);
    assert_eq!(again.statuses[0].used, 10);
    for t in others {
        assert!(t.await.unwrap().unwrap().windows.is_some());
    }
    sleeper.join().unwrap();
    let (scripts, _) = common::redis::client_commands(&server);
    assert_eq!(scripts, 2, "{scripts} scripts for 7 reservations");
}

/// Settlements that end within `settle_interval` of the last write wait for the next one and
/// go in it, merged; the first after a quiet spell goes at once, a flush does not wait out the
/// interval, and without a flush they are written once it has passed.
#[tokio::test]
async fn settlements_wait_for_the_interval_and_go_in_one_write() {
    let server = RedisServer::start();
    let mut con = server.client();
    let key = "higress-token-ratelimit:{s}:global_threshold:60";
    let used = |con: &mut redis::Connection| con.get::<_, Option<u64>>(key).unwrap();
    // Polls the counter until it holds `want`, for at most 10 s.
    async fn wait_for(con: &mut redis::Connection, key: &str, want: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while con.get::<_, Option<u64>>(key).unwrap() != Some(want) {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for (interval, flush) in [
        (Duration::from_secs(60), true),
        (Duration::from_millis(300), false),
    ] {
        let _: () = con.del(key).unwrap();
        let store = RedisStore::builder()
            .url(server.url())
            .settle_interval(interval)
            .build()
            .unwrap();
        assert_eq!(store.settle_interval(), interval);
        let limits = layer(
            store,
            "s",
            vec![Rule::global().tokens_per_minute(1_000_000)],
        );
        let addr = serve_chat(limits.clone()).await;
        // The first settlement goes at once (the check before each request has read Redis).
        send(addr, CHAT, &[], STREAM).await;
        wait_for(&mut con, key, 100, "the first debit was never written").await;
        server.reset_stats();
        for _ in 0..20 {
            assert_eq!(send(addr, CHAT, &[], STREAM).await.status, StatusCode::OK);
        }
        if flush {
            // An interval of a minute has not passed: nothing more is written until the flush,
            // which writes the 20 settlements in one script without waiting.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(used(&mut con), Some(100));
            tokio::time::timeout(Duration::from_secs(10), limits.flush())
                .await
                .expect("a flush does not wait out the interval");
            assert_eq!(used(&mut con), Some(2100));
            let debits = common::redis::command_calls(&server)
                .into_iter()
                .find(|(name, _)| name == "incrby")
                .map_or(0, |(_, calls)| calls);
            assert_eq!(debits, 1, "20 settlements merged into one INCRBY");
        } else {
            wait_for(&mut con, key, 2100, "held settlements were never written").await;
        }
    }
}

#[test]
fn settle_interval_from_the_config() {
    let cfg: tower_token_ratelimit::RedisConfig =
        serde_yaml::from_str("{url: \"redis://127.0.0.1:1\", settle_interval: 0}").unwrap();
    let store = RedisStore::from_config(&cfg).unwrap();
    assert_eq!(store.settle_interval(), Duration::ZERO);
    let cfg: tower_token_ratelimit::RedisConfig =
        serde_yaml::from_str("{url: \"redis://127.0.0.1:1\"}").unwrap();
    let store = RedisStore::from_config(&cfg).unwrap();
    assert_eq!(
        store.settle_interval(),
        tower_token_ratelimit::store::DEFAULT_SETTLE_INTERVAL
    );
    // Past a minute, debits would lag far behind usage: refused, named.
    let cfg: tower_token_ratelimit::RedisConfig =
        serde_yaml::from_str("{url: \"redis://127.0.0.1:1\", settle_interval: 60001}").unwrap();
    let err = RedisStore::from_config(&cfg).unwrap_err().to_string();
    assert!(err.contains("redis.settle_interval"), "{err}");
}

/// A runtime of its own (one worker), to be dropped while the store's tasks run on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A store outlives the runtime its breaker opened on (a test suite's shared layer, a setup
/// runtime): the probe that runtime dropped leaves the breaker able to close on the next.
#[test]
fn a_breaker_opened_on_a_runtime_since_shut_down_closes_again() {
    let mut server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(200), 1);
    let c = fixed_window("{rt}:probe", 1_000, 60);
    server.kill();
    // A current-thread runtime runs its tasks only while it blocks on something: the probe,
    // spawned as the check fails, is dropped before it ever ran.
    let first = current_thread();
    first.block_on(async {
        store.check(std::slice::from_ref(&c)).await.unwrap_err();
    });
    assert!(store.breaker_open());
    drop(first);
    server.restart();
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.check(std::slice::from_ref(&c)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the breaker stays open for good (open: {})",
                store.breaker_open()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(!store.breaker_open());
}

/// Reservations and writes on their way when their runtime shut down: the next runtime's
/// reservations go to Redis (not queued for good behind the dropped batch), and the debits
/// not yet written are kept for it (as after a timeout, the one on its way too).
#[test]
fn reservations_and_writes_dropped_with_their_runtime_leave_nothing_stuck_or_lost() {
    let server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_secs(5), 1000);
    let reserved = fixed_window("{rt}:reserve", 1_000_000, 60);
    // More counters than one script writes: the write goes in two calls.
    let debits: Vec<(Counter, u64)> = (0..300)
        .map(|i| (fixed_window(&format!("{{rt}}:debit{i}"), 1_000_000, 60), 7))
        .collect();
    let first = runtime();
    first.block_on(async {
        // Connected, and the scripts loaded.
        store
            .reserve(std::slice::from_ref(&reserved), 1)
            .await
            .unwrap();
        store.debit_many(debits[..1].to_vec()).await.unwrap();
    });
    let busy = server.busy_for(1.0);
    std::thread::sleep(Duration::from_millis(50));
    let reserving = first.spawn(store.reserve(std::slice::from_ref(&reserved), 1));
    let debiting = first.spawn(store.debit_many(debits.clone()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!reserving.is_finished() && !debiting.is_finished());
    drop(first);
    busy.join().unwrap();

    let mut con = server.client();
    runtime().block_on(async {
        // The first call may fail: its connection was driven by the runtime gone.
        let started = Instant::now();
        let mut answered = false;
        for _ in 0..3 {
            if store
                .reserve(std::slice::from_ref(&reserved), 1)
                .await
                .is_ok()
            {
                answered = true;
                break;
            }
        }
        assert!(answered, "no reservation answered");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "reservations waited {:?}: queued behind the dropped batch",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.pending_debits() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} pending",
                store.pending_debits()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    for (c, tokens) in &debits {
        let used: u64 = con.get(&*c.key).unwrap_or(0);
        assert!(used >= *tokens, "{}: {used} of {tokens}: lost", c.key);
    }
}

/// Buffered debits being written again when their runtime shut down go back in the buffer,
/// and the next runtime writes them.
#[test]
fn a_flush_dropped_with_its_runtime_is_written_by_the_next() {
    let mut server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_millis(500), 1000);
    let c = fixed_window("{rt}:flush", 1_000, 60);
    let first = runtime();
    server.kill();
    first.block_on(async { store.debit(std::slice::from_ref(&c), 9).await.unwrap() });
    assert_eq!(store.pending_debits(), 1, "kept while Redis is down");
    server.restart();
    // Retried every 100 ms: the next retry takes the debit out of the buffer and waits for
    // busy Redis (its 1 s write timeout outlasts the runtime).
    let busy = server.busy_for(1.0);
    std::thread::sleep(Duration::from_millis(300));
    drop(first);
    busy.join().unwrap();
    let mut con = server.client();
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Calls on this runtime (the first may fail: its connection died with the other).
            let _ = store.check(std::slice::from_ref(&c)).await;
            let used: Option<u64> = con.get(&*c.key).unwrap();
            if used.is_some_and(|u| u >= 9) && store.pending_debits() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{used:?} used, {} pending: the debit is not written",
                store.pending_debits()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// A layer outlives the runtime it served on first (a test suite's shared app, a setup
/// runtime): its settlement worker, dropped with that runtime, starts again on the next with
/// what it had queued, and every request's debit reaches Redis.
#[test]
fn a_layer_keeps_debiting_after_the_runtime_it_served_on_shut_down() {
    let server = RedisServer::start();
    // Settlements after the first wait 10 s for the next write, or a flush.
    let store = store_settling(&server, Duration::from_secs(5), Duration::from_secs(10));
    let limits = layer(store.clone(), "rt", vec![per_user(10_000)]);
    let h = [("x-user", "u"), ("x-mock-tokens", "9")];
    let k = "higress-token-ratelimit:{rt}:limit_by_per_header:60:x-user:u";
    let mut con = server.client();
    let used = |con: &mut redis::Connection| con.get::<_, Option<u64>>(k).unwrap();
    runtime().block_on(async {
        let addr = serve_chat(limits.clone()).await;
        for _ in 0..2 {
            assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while used(&mut con) != Some(9) {
            assert!(Instant::now() < deadline, "{:?} used", used(&mut con));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(limits.pending_debits(), 1, "the second waits");
    });
    for round in 2..=3 {
        runtime().block_on(async {
            let addr = serve_chat(limits.clone()).await;
            assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
            tokio::time::timeout(Duration::from_secs(5), limits.flush())
                .await
                .expect("settlements applied");
            // A write on the connection the last runtime drove fails, and is retried.
            let deadline = Instant::now() + Duration::from_secs(10);
            while used(&mut con) != Some(9 * (round + 1)) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {:?} used, {} pending",
                    used(&mut con),
                    store.pending_debits()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

/// A counter's key holding a value of another type (written by hand, or by another program)
/// fails that counter alone: the other counters of the same script are written once (not again
/// with every retry), a request on it gets the failure mode, nothing of a reservation on it
/// stays charged, and the breaker (which is for Redis failing) stays closed.
#[tokio::test]
async fn a_key_of_another_type_fails_its_counter_alone() {
    let server = RedisServer::start();
    let store = store_with_breaker(&server, Duration::from_secs(5), 2);
    let mut con = server.client();
    // A hash where a fixed window's number belongs, and text where a sliding window's hash does.
    con.hset::<_, _, _, ()>("{w}:hash", "f", "v").unwrap();
    con.set::<_, _, ()>("{w}:text", "abc").unwrap();
    let fixed = |key: &str| fixed_window(key, 1_000, 60);
    let sliding = Counter {
        algorithm: Algorithm::SlidingWindow,
        ..fixed("{w}:text")
    };
    for _ in 0..3 {
        store
            .debit_many(vec![
                (fixed("{w}:a"), 5),
                (fixed("{w}:hash"), 5),
                (sliding.clone(), 5),
                (fixed("{w}:b"), 5),
            ])
            .await
            .unwrap();
    }
    // A retry would come every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(con.get::<_, u64>("{w}:a").unwrap(), 15);
    assert_eq!(con.get::<_, u64>("{w}:b").unwrap(), 15);
    assert_eq!(con.hget::<_, _, String>("{w}:hash", "f").unwrap(), "v");
    assert_eq!(con.get::<_, String>("{w}:text").unwrap(), "abc");
    assert_eq!(store.pending_debits(), 0, "not retried");
    assert_eq!(store.dropped_debits(), 6, "counted as dropped");

    let error = store
        .check(&[fixed("{w}:a"), fixed("{w}:hash")])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("{w}:hash"), "{error}");
    assert_eq!(store.check(&[fixed("{w}:b")]).await.unwrap()[0].used, 15);

    // In one script: the reservation on the bad key fails after charging `{w}:c`, which is
    // taken back; the others are made.
    let (first, bad, last) = tokio::join!(
        store.reserve(&[fixed("{w}:a")], 1),
        store.reserve(&[fixed("{w}:c"), fixed("{w}:hash"), sliding.clone()], 1),
        store.reserve(&[fixed("{w}:b")], 1),
    );
    assert!(first.unwrap().windows.is_some());
    assert!(last.unwrap().windows.is_some());
    let error = bad.unwrap_err();
    assert!(error.to_string().contains("{w}:hash"), "{error}");
    assert_eq!(con.get::<_, Option<u64>>("{w}:c").unwrap(), None);
    assert_eq!(con.get::<_, u64>("{w}:a").unwrap(), 16);

    store
        .settle(&[fixed("{w}:hash")], &[0], 1, 9)
        .await
        .unwrap();
    assert_eq!(con.hget::<_, _, String>("{w}:hash", "f").unwrap(), "v");
    assert!(!store.breaker_open(), "Redis answered every call");
}

/// A flush waiting on one runtime while the settlement worker lives on another (a test
/// suite's shared layer: each `#[tokio::test]` has its own current-thread runtime, driven only
/// while its test runs) that then shuts down: the flush, woken as the worker is dropped,
/// starts the next one, and returns once what was queued is written.
#[test]
fn a_flush_waiting_when_the_workers_runtime_shuts_down_returns() {
    let server = RedisServer::start();
    let store = store_settling(&server, Duration::from_millis(500), Duration::from_secs(60));
    let limits = layer(store.clone(), "rf", vec![per_user(10_000)]);
    let h = [("x-user", "u"), ("x-mock-tokens", "9")];
    let k = "higress-token-ratelimit:{rf}:limit_by_per_header:60:x-user:u";
    let mut con = server.client();
    // The first test: the settlement worker starts on its runtime.
    let first = current_thread();
    first.block_on(async {
        let addr = serve_chat(limits.clone()).await;
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        wait_for(&mut con, k, 9).await;
    });
    // The second test, on its own runtime, sends a request and flushes while the first
    // test's runtime is still alive (its worker "running").
    let second = runtime();
    let addr = second.block_on(serve_chat(limits.clone()));
    let status = second.block_on(async { send(addr, CHAT, &h, STREAM).await.status });
    assert_eq!(status, StatusCode::OK);
    let l = limits.clone();
    let flushed = second.spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), l.flush())
            .await
            .is_ok()
    });
    std::thread::sleep(Duration::from_millis(100));
    // The first test ends.
    drop(first);
    let returned = second.block_on(flushed).unwrap();
    assert!(
        returned,
        "flush still waiting 5 s after the worker's runtime shut down ({} pending)",
        limits.pending_debits()
    );
}

/// In reserve mode a merged write holds plain debits (requests admitted without a
/// reservation: failure mode open) and reserve settlements, written in turn: the settlements'
/// write starts once the debits' is answered. The runtime shutting down while the debits'
/// write is on its way drops the settlements' write before its first poll; its extra is kept
/// all the same, and written on the next runtime.
#[test]
fn settlements_behind_a_debit_write_survive_the_runtime() {
    use tower_token_ratelimit::Mode;
    let server = RedisServer::start();
    let store = store_settling(&server, Duration::from_secs(5), Duration::from_secs(60));
    let limits = TokenRateLimitLayer::builder()
        .rule_name("rs")
        .mode(Mode::Reserve)
        .rule(per_user(1_000_000))
        .redis(store.clone())
        .build()
        .unwrap();
    let key =
        |user: &str| format!("higress-token-ratelimit:{{rs}}:limit_by_per_header:60:x-user:{user}");
    let mut con = server.client();
    // User x's counter cannot be reserved on (a hash under it): x is admitted without a
    // reservation (failure mode open) and settled as a plain debit.
    con.hset::<_, _, _, ()>(key("x"), "f", "v").unwrap();
    let body = r#"{"model":"m","max_tokens":50,"messages":[]}"#;
    let first = runtime();
    first.block_on(async {
        let addr = serve_chat(limits.clone()).await;
        // The first settlement is written at once; the next wait for the interval.
        let w = [("x-user", "w"), ("x-mock-tokens", "100")];
        assert_eq!(send(addr, CHAT, &w, body).await.status, StatusCode::OK);
        let deadline = Instant::now() + Duration::from_secs(5);
        while con.get::<_, Option<u64>>(key("w")).unwrap() != Some(100) {
            assert!(Instant::now() < deadline, "first settlement not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // y reserves ~61 and uses 1000: an extra of ~939 to settle.
        let y = [("x-user", "y"), ("x-mock-tokens", "1000")];
        assert_eq!(send(addr, CHAT, &y, body).await.status, StatusCode::OK);
        let x = [("x-user", "x"), ("x-mock-tokens", "7")];
        assert_eq!(send(addr, CHAT, &x, body).await.status, StatusCode::OK);
    });
    let reserved: u64 = con.get(key("y")).unwrap();
    assert!(reserved < 1000, "only the reservation so far: {reserved}");
    // Redis busy: the flush's write (debits first) waits for it; the runtime goes meanwhile.
    let busy = server.busy_for(1.0);
    std::thread::sleep(Duration::from_millis(50));
    let l = limits.clone();
    first.spawn(async move { l.flush().await });
    std::thread::sleep(Duration::from_millis(300));
    drop(first);
    busy.join().unwrap();
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(5), limits.flush()).await;
            // Calls that succeed write what the store buffered.
            let _ = store.check(&[fixed_window(&key("z"), 1_000, 60)]).await;
            let used: u64 = con.get(key("y")).unwrap();
            if used >= 1000 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "y's counter stays at {used} (reserved {reserved}, used 1000): the extra is lost; {} pending in the store, {} in the layer",
                store.pending_debits(),
                limits.pending_debits()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// A settlement sent while the worker's runtime is alive but no longer polling it (between its
/// last poll and its shutdown) is parked with the worker, which starts again at once on a
/// thread of its own to write it: no later request or flush is needed.
#[test]
fn a_settlement_sent_just_before_the_workers_runtime_shuts_down_is_written() {
    let server = RedisServer::start();
    let store = store_settling(
        &server,
        Duration::from_millis(500),
        Duration::from_millis(50),
    );
    let limits = layer(store.clone(), "rg", vec![per_user(10_000)]);
    let h = [("x-user", "u"), ("x-mock-tokens", "9")];
    let k = "higress-token-ratelimit:{rg}:limit_by_per_header:60:x-user:u";
    let mut con = server.client();
    let first = current_thread();
    first.block_on(async {
        let addr = serve_chat(limits.clone()).await;
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        wait_for(&mut con, k, 9).await;
    });
    let second = runtime();
    second.block_on(async {
        let addr = serve_chat(limits.clone()).await;
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    });
    drop(first);
    // The application keeps running on `second`, with no further request for this user.
    second.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let used = con.get::<_, Option<u64>>(k).unwrap();
            if used == Some(18) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{used:?} used 5 s on, {} settlement(s) parked unwritten",
                limits.pending_debits()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// A fixed window's key holding text INCRBY refuses (words, and numbers Lua's `tonumber`
/// would read: hex, exponents, leading zeros, a `+`, spaces, `5.0`) fails its checks as it
/// fails its debits and reservations: read as a count, it would admit requests while every
/// debit on it is dropped.
#[tokio::test]
async fn a_fixed_window_key_holding_text_fails_its_checks_too() {
    let server = RedisServer::start();
    let store = patient_store(&server);
    let mut con = server.client();
    let mut wrong = Vec::new();
    for (i, text) in [
        "abc", "0x10", " 5", "5 ", "1e2", "007", "+5", "5.0", "1e400",
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("{{x}}:n{i}");
        con.set::<_, _, ()>(&key, text).unwrap();
        let incr: redis::RedisResult<i64> = con.incr(&key, 0);
        assert!(incr.is_err(), "INCRBY accepts {text:?}");
        let c = fixed_window(&key, 1_000, 60);
        let check = store.check(std::slice::from_ref(&c)).await;
        if check.is_ok() {
            wrong.push(format!("{text:?} -> {check:?}"));
        }
        let reserve = store.reserve(std::slice::from_ref(&c), 5).await;
        assert!(reserve.is_err(), "{text:?}: {reserve:?}");
        store.debit(std::slice::from_ref(&c), 50).await.unwrap();
        assert_eq!(store.dropped_debits(), i as u64 + 1, "{text:?}");
    }
    // Integers INCRBY takes are read.
    for (text, used) in [
        ("0", 0),
        ("42", 42),
        ("-3", 0),
        ("9223372036854775807", 1 << 53),
    ] {
        let key = format!("{{x}}:ok{text}");
        con.set::<_, _, ()>(&key, text).unwrap();
        let c = fixed_window(&key, 1_000, 60);
        let status = store.check(std::slice::from_ref(&c)).await.unwrap();
        assert_eq!(status[0].used, used, "{text}");
    }
    assert!(
        wrong.is_empty(),
        "checks answered Ok on keys INCRBY refuses:\n{}",
        wrong.join("\n")
    );
}

/// A worker dropped with its runtime, settlements queued, restarts on a thread of its own;
/// when that thread cannot start, the worker stays parked for the next send or flush (not
/// started again and again from its own drop until the stack overflows). Threads are made to
/// fail by asking each for a 256 TiB stack (RUST_MIN_STACK), in a child process.
#[test]
fn a_restart_thread_that_cannot_start_does_not_recurse() {
    const NAME: &str = "a_restart_thread_that_cannot_start_does_not_recurse";
    const CHILD: &str = "TTR_RESTART_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("RUST_MIN_STACK", (1u64 << 48).to_string())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        assert!(
            out.status.success(),
            "the child process died: {:?}; stderr ends:\n{}\nstdout ends:\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        return;
    }
    assert!(
        std::thread::Builder::new().spawn(|| ()).is_err(),
        "threads can still start"
    );
    let server = RedisServer::start();
    let store = store_settling(&server, Duration::from_secs(5), Duration::from_secs(60));
    let limits = layer(store, "rt", vec![per_user(10_000)]);
    let h = [("x-user", "u"), ("x-mock-tokens", "9")];
    let k = "higress-token-ratelimit:{rt}:limit_by_per_header:60:x-user:u";
    let mut con = server.client();
    let rt = current_thread();
    rt.block_on(async {
        let addr = serve_chat(limits.clone()).await;
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        wait_for(&mut con, k, 9).await;
        // The next waits out the 60 s interval in the worker.
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(limits.pending_debits(), 1);
    });
    drop(rt);
    assert_eq!(
        limits.pending_debits(),
        1,
        "parked for the next send or flush"
    );
}

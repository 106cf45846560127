//! The in-memory store reclaims the memory of expired counters by itself.

use std::time::Duration;

use tower_token_ratelimit::store::{Algorithm, Counter, MemoryStore, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_expired_keys_are_reclaimed() {
    // Room for all of them: this is about expiry, not the cap.
    let store = MemoryStore::with_max_counters(2_000_000);
    let window = Duration::from_secs(5);
    let started = std::time::Instant::now();
    for i in 0..1_000_000u32 {
        let c = Counter {
            key: format!("k:{i}").into(),
            limit: 10,
            window,
            algorithm: Algorithm::FixedWindow,
        };
        store.debit(std::slice::from_ref(&c), 1).await.unwrap();
    }
    // All there, unless filling took longer than a window (a loaded machine, a debug build):
    // then the first ones may already be reclaimed.
    if started.elapsed() < window {
        assert_eq!(store.len(), 1_000_000);
    }
    // The sweeper runs every second; give it the window plus a margin.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !store.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} counters left",
            store.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Live counters are kept.
    let live = Counter {
        key: "live".into(),
        limit: 10,
        window: Duration::from_secs(60),
        algorithm: Algorithm::FixedWindow,
    };
    store.debit(std::slice::from_ref(&live), 3).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(store.used("live"), 3);
    assert_eq!(store.len(), 1);
}

//! The in-memory store reclaims the memory of expired counters by itself.

#[path = "common/stores.rs"]
mod stores;

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

/// A reservation on several counters is taken on all of them or none, even when the store is
/// full: making room for one of its counters never evicts another it has just taken.
#[tokio::test]
async fn a_full_store_still_reserves_all_counters_or_none() {
    let store = MemoryStore::with_max_counters(1);
    let counter = |key: String| Counter {
        key: key.into(),
        limit: 1_000,
        window: Duration::from_secs(60),
        algorithm: Algorithm::FixedWindow,
    };
    for i in 0..400 {
        let (a, b) = (counter(format!("a{i}")), counter(format!("b{i}")));
        let r = store.reserve(&[a.clone(), b.clone()], 100).await.unwrap();
        if r.windows.is_some() {
            assert_eq!(
                (store.used(&a.key), store.used(&b.key)),
                (100, 100),
                "pair {i}"
            );
        }
    }
}

#[tokio::test]
async fn a_sliding_refund_after_the_window_rolled_comes_off_the_previous_window() {
    stores::a_sliding_refund_after_the_window_rolled(&MemoryStore::new(), "s").await;
}

/// A store outlives the runtime it was first used on, even one that never ran its sweeper
/// (a current-thread runtime whose only work was a debit): the next runtime's use starts one.
#[test]
fn the_sweeper_starts_again_on_the_next_runtime() {
    let store = MemoryStore::new();
    let counter = |key: &str| Counter {
        key: key.into(),
        limit: 10,
        window: Duration::from_secs(1),
        algorithm: Algorithm::FixedWindow,
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    runtime()
        .block_on(async { store.debit(&[counter("first")], 1).await })
        .unwrap();
    runtime().block_on(async {
        store.debit(&[counter("second")], 1).await.unwrap();
        assert_eq!(store.len(), 2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !store.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} expired counters kept: no sweeper runs",
                store.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

//! Behaviour every store must show, run against each: needs only the store API (the tests of
//! the in-memory store run without the default features).

use std::time::Duration;

use tower_token_ratelimit::store::{Algorithm, Counter, Store};

/// Reserve mode on a sliding window (2 s, under `key`): a reservation taken in one window and
/// settled early in the next has its refund taken off the previous window's count, which still
/// weighs in there; it is not dropped.
pub async fn a_sliding_refund_after_the_window_rolled(store: &impl Store, key: &str) {
    let c = Counter {
        key: key.into(),
        limit: 10_000,
        window: Duration::from_secs(2),
        algorithm: Algorithm::SlidingWindow,
    };
    let cs = std::slice::from_ref(&c);
    let status = || async { store.check(cs).await.unwrap()[0] };
    // Just after a window starts.
    tokio::time::sleep(status().await.reset + Duration::from_millis(50)).await;
    let windows = store
        .reserve(cs, 1000)
        .await
        .unwrap()
        .windows
        .expect("fits");
    // Early in the next window, the reservation still weighs in almost whole.
    tokio::time::sleep(status().await.reset + Duration::from_millis(50)).await;
    let before = status().await.used;
    assert!(before > 500, "{before}");
    store.settle(cs, &windows, 1000, 100).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let after = status().await.used;
        if (50..=100).contains(&after) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the 900 refunded were not taken off the previous window: {before} -> {after}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

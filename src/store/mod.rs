//! Where token counters live: the [`Store`] trait, the in-memory [`MemoryStore`] and (feature
//! `redis`) the Redis store.
//!
//! A store keeps, per counter key, the tokens used in the current window. Semantics are those of
//! the Higress `ai-token-ratelimit` plugin (fixed windows): a window starts at the first debit of
//! a key and lasts the limit's window; the counter value is the tokens used in it; a request is
//! rejected while `used >= limit`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use crate::error::StoreError;

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{
    DEFAULT_CHECK_REUSE, DEFAULT_SETTLE_INTERVAL, DEFAULT_TIMEOUT, RedisStore, RedisStoreBuilder,
};

/// A map keyed by counter keys (70+ bytes, partly chosen by clients): foldhash rather than
/// SipHash, which costs several times as much on keys that long; randomly seeded per map, it
/// still resists chosen-key collisions.
pub(crate) type KeyMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

/// The future a [`Store`] returns. It owns what it needs (`'static`), so the service can hold it
/// across polls.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// How a counter counts over time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Higress's: the window starts at the first debit and lasts the window; the counter is
    /// the tokens used in it.
    #[default]
    FixedWindow,
    /// Windows aligned to multiples of the window length; the tokens counted are the current
    /// window's plus the previous window's weighted by how much of it still overlaps the last
    /// window-length of time. No burst of twice the limit at a window boundary.
    SlidingWindow,
    /// A bucket of `limit` tokens refilled continuously at `limit` per window. A response
    /// larger than what is left takes the bucket into debt, which later refills pay back.
    TokenBucket,
}

impl Algorithm {
    /// The number the Lua scripts use.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn code(self) -> u64 {
        match self {
            Algorithm::FixedWindow => 1,
            Algorithm::SlidingWindow => 2,
            Algorithm::TokenBucket => 3,
        }
    }
}

/// One counter a request is checked against and later debited from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Counter {
    /// The full store key, in the Higress layout
    /// (`higress-token-ratelimit:{rule}:limit_by_per_header:60:x-api-key:<value>`).
    pub key: Arc<str>,
    /// Tokens allowed per window.
    pub limit: u64,
    /// The window length.
    pub window: Duration,
    /// How it counts over time.
    pub algorithm: Algorithm,
}

/// What a store knows about one counter at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStatus {
    /// Tokens used in the current window (0 when the window has not started).
    pub used: u64,
    /// Time until the budget frees. While the counter is spent (used ≥ limit), until a
    /// request can pass again: the window's end for a fixed window, the fading of the
    /// previous window's share for a sliding one, the drain under the limit for a token
    /// bucket. Otherwise until the window ends (fixed, sliding) or the bucket is empty; the
    /// whole window when nothing has been used.
    pub reset: Duration,
}

impl CounterStatus {
    /// Tokens left under `limit` (never negative).
    pub fn remaining(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.used)
    }
}

/// The answer to [`Store::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Every counter as it was before the reservation, in order.
    pub statuses: Vec<CounterStatus>,
    /// When the reservation was made: the id of each counter's window (its expiry), to settle
    /// into the same window. `None` when it was refused.
    pub windows: Option<Vec<u64>>,
}

/// Whether a reservation of `amount` fits a counter: its budget is not spent, and either its
/// window is empty (a request larger than the whole budget still gets one turn per window) or
/// the amount fits in what is left.
pub fn reservation_fits(counter: &Counter, status: &CounterStatus, amount: u64) -> bool {
    status.used < counter.limit
        && (status.used == 0 || status.used.saturating_add(amount) <= counter.limit)
}

/// A place to keep token counters: the in-memory [`MemoryStore`], Redis, or your own.
///
/// Both methods take the counters of one request. Implementations must treat them atomically
/// where they can (a Redis script does), must not block the calling task, and must return
/// futures that own their data.
pub trait Store: Send + Sync + 'static {
    /// Reads every counter, returning one status per counter, in order.
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>>;

    /// Adds `tokens` to every counter, starting a window (expiry = the counter's window) where
    /// none is running.
    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()>;

    /// Adds many debits at once (`tokens` to each `counter`): the settlements of several
    /// requests, merged per counter by the layer's background task. A store that can write
    /// them in fewer round trips overrides it (the Redis store: one script per hash slot). The
    /// default makes one [`debit`](Self::debit) per counter, in turn, and returns the first
    /// error after trying them all.
    fn debit_many(&self, debits: Vec<(Counter, u64)>) -> StoreFuture<()> {
        in_turn(
            debits
                .iter()
                .map(|(counter, tokens)| self.debit(std::slice::from_ref(counter), *tokens))
                .collect(),
        )
    }

    /// Reads the counters at once when the store can do so without waiting (the in-memory
    /// store), sparing a boxed future per request; `None` (the default) when it cannot, and
    /// [`check`](Self::check) is called instead.
    fn try_check_now(&self, counters: &[Counter]) -> Option<Vec<CounterStatus>> {
        let _ = counters;
        None
    }

    /// Applies a debit at once when the store can do so without waiting (the in-memory store:
    /// a short lock), sparing the hand-over to the layer's background task; `false` when it
    /// cannot, and the debit then goes to the background task. The default is `false`.
    fn try_debit_now(&self, counters: &[Counter], tokens: u64) -> bool {
        let _ = (counters, tokens);
        false
    }

    /// Like [`try_debit_now`](Self::try_debit_now), for [`settle`](Self::settle).
    fn try_settle_now(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) -> bool {
        let _ = (counters, windows, reserved, actual);
        false
    }

    /// Reserve mode, at admission, in one atomic step: when `amount` fits every counter (see
    /// [`reservation_fits`]) adds it to all of them, starting windows where none runs, and
    /// returns their window ids; otherwise changes nothing. The default answers with an error
    /// (the layer's failure mode then applies): a store that supports reserve mode overrides it.
    fn reserve(&self, counters: &[Counter], amount: u64) -> StoreFuture<Reservation> {
        let _ = (counters, amount);
        Box::pin(std::future::ready(Err(StoreError::new(
            "this store does not support reserve mode",
        ))))
    }

    /// Reserve mode, at the end of the response: adds `actual - reserved` (a refund when
    /// negative, never below zero) to each counter whose window is still the one in `windows`.
    /// Where the window has ended since, extra usage goes to the current window and a refund is
    /// dropped, except that a sliding window's refund comes off the previous window's count
    /// while that window still weighs in.
    fn settle(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<()> {
        let _ = (counters, windows, reserved, actual);
        Box::pin(std::future::ready(Err(StoreError::new(
            "this store does not support reserve mode",
        ))))
    }

    /// Reserve mode: many settlements at once, `(counter, window id, tokens)` adding `tokens`
    /// (a refund when negative) to the counter as [`settle`](Self::settle) does: the
    /// settlements of several requests, merged per counter and window by the layer's
    /// background task. A store that can write them in fewer round trips overrides it (the
    /// Redis store: one script per hash slot). The default makes one `settle` per entry, in
    /// turn, and returns the first error after trying them all.
    fn settle_many(&self, settlements: Vec<(Counter, u64, i64)>) -> StoreFuture<()> {
        in_turn(
            settlements
                .iter()
                .map(|(counter, window, tokens)| {
                    let (refund, extra) = refund_and_extra(*tokens);
                    self.settle(
                        std::slice::from_ref(counter),
                        std::slice::from_ref(window),
                        refund,
                        extra,
                    )
                })
                .collect(),
        )
    }

    /// The shortest time between two writes of the layer's background task: settlements that
    /// end meanwhile wait and go, merged per counter, into the next write. Zero (the default):
    /// each write starts as soon as the one before has ended. A store whose writes are round
    /// trips sets it (the Redis store: 5 ms by default), trading that much delay in the
    /// counters for fewer round trips under load.
    fn settle_interval(&self) -> Duration {
        Duration::ZERO
    }
}

/// Awaits `writes` one after the other; the first error, after trying them all.
pub(crate) fn in_turn(writes: Vec<StoreFuture<()>>) -> StoreFuture<()> {
    Box::pin(async move {
        let mut result = Ok(());
        for write in writes {
            result = result.and(write.await);
        }
        result
    })
}

/// The tokens a settlement adds to its counters, `actual - reserved` (negative: a refund),
/// saturating.
pub(crate) fn settlement_delta(reserved: u64, actual: u64) -> i64 {
    let delta = i128::from(actual) - i128::from(reserved);
    i64::try_from(delta).unwrap_or(if delta > 0 { i64::MAX } else { i64::MIN })
}

/// A settlement's tokens as `(refund, extra)`, one of them 0.
pub(crate) fn refund_and_extra(delta: i64) -> (u64, u64) {
    (delta.min(0).unsigned_abs(), delta.max(0).unsigned_abs())
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        (**self).check(counters)
    }

    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()> {
        (**self).debit(counters, tokens)
    }

    fn debit_many(&self, debits: Vec<(Counter, u64)>) -> StoreFuture<()> {
        (**self).debit_many(debits)
    }

    fn reserve(&self, counters: &[Counter], amount: u64) -> StoreFuture<Reservation> {
        (**self).reserve(counters, amount)
    }

    fn try_check_now(&self, counters: &[Counter]) -> Option<Vec<CounterStatus>> {
        (**self).try_check_now(counters)
    }

    fn try_debit_now(&self, counters: &[Counter], tokens: u64) -> bool {
        (**self).try_debit_now(counters, tokens)
    }

    fn try_settle_now(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) -> bool {
        (**self).try_settle_now(counters, windows, reserved, actual)
    }

    fn settle(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<()> {
        (**self).settle(counters, windows, reserved, actual)
    }

    fn settle_many(&self, settlements: Vec<(Counter, u64, i64)>) -> StoreFuture<()> {
        (**self).settle_many(settlements)
    }

    fn settle_interval(&self) -> Duration {
        (**self).settle_interval()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlement_deltas_saturate_and_split_back() {
        assert_eq!(settlement_delta(100, 30), -70);
        assert_eq!(settlement_delta(0, u64::MAX), i64::MAX);
        assert_eq!(settlement_delta(u64::MAX, 0), i64::MIN);
        assert_eq!(refund_and_extra(-70), (70, 0));
        assert_eq!(refund_and_extra(50), (0, 50));
        assert_eq!(refund_and_extra(i64::MIN), (1 << 63, 0));
    }
}

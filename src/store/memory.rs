use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Counter, CounterStatus, Reservation, Store, StoreFuture, reservation_fits};

/// How many independently locked shards the map is split into.
const SHARDS: usize = 64;
/// How often the background sweeper frees expired counters.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The embedded store: counters in process memory, nothing to install.
///
/// Semantics are the same as the Redis store's (fixed windows that start at the first debit).
/// Counters are spread over 64 independently locked shards. Memory is bounded by the live
/// counters: a sweeper task (started on the tokio runtime the store is first used on, stopped when
/// the store is dropped) frees expired counters every second and gives unused capacity back.
/// A counter costs about 80 bytes plus the length of its key.
///
/// Cloning is cheap and shares the counters.
///
/// ```
/// use tower_token_ratelimit::store::{Counter, MemoryStore, Store};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// let counter = Counter { key: "demo".into(), limit: 100, window: Duration::from_secs(60) };
/// store.debit(&[counter.clone()], 30).await.unwrap();
/// let status = store.check(&[counter]).await.unwrap();
/// assert_eq!(status[0].used, 30);
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    sweeper_running: AtomicBool,
    /// Window ids are expiries in nanoseconds since this instant.
    epoch: Instant,
}

type Shard = HashMap<Arc<str>, Entry>;

/// The shards of one multi-counter operation, locked.
struct Locked<'a> {
    inner: &'a Inner,
    guards: Vec<(usize, MutexGuard<'a, Shard>)>,
}

impl Locked<'_> {
    fn map(&mut self, key: &str) -> &mut Shard {
        let i = self.inner.shard_index(key);
        let pos = self
            .guards
            .iter()
            .position(|(j, _)| *j == i)
            .expect("locked");
        &mut self.guards[pos].1
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    used: u64,
    expires_at: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("counters", &self.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                sweeper_running: AtomicBool::new(false),
                epoch: Instant::now(),
            }),
        }
    }

    /// Counters held, including expired ones the sweeper has not freed yet.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees every expired counter now (the sweeper does this every second on its own).
    pub fn sweep(&self) {
        self.inner.sweep(Instant::now());
    }

    /// Reads one counter (tokens used in its current window), mainly for tests and dashboards.
    pub fn used(&self, key: &str) -> u64 {
        let now = Instant::now();
        lock(self.inner.shard(key))
            .get(key)
            .filter(|e| e.expires_at > now)
            .map_or(0, |e| e.used)
    }

    fn ensure_sweeper(&self) {
        if self.inner.sweeper_running.load(Ordering::Relaxed) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.sweeper_running.swap(true, Ordering::AcqRel) {
            return;
        }
        handle.spawn(sweeper(Arc::downgrade(&self.inner)));
    }
}

/// Runs until the store is dropped (or the runtime shuts down, after which the next use of the
/// store on a runtime starts a new one).
async fn sweeper(store: Weak<Inner>) {
    struct Running(Weak<Inner>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(inner) = self.0.upgrade() {
                inner.sweeper_running.store(false, Ordering::Release);
            }
        }
    }
    let _running = Running(store.clone());
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else { return };
        inner.sweep(Instant::now());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard cannot leave an entry half-written; keep serving.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn shard_index(&self, key: &str) -> usize {
        self.hasher.hash_one(key) as usize % self.shards.len()
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[self.shard_index(key)]
    }

    fn window_id(&self, expires_at: Instant) -> u64 {
        u64::try_from((expires_at - self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Locks every shard the counters live in, in index order, so two requests can never
    /// wait on each other.
    fn lock_all(&self, counters: &[Counter]) -> Locked<'_> {
        let mut indices: Vec<usize> = counters.iter().map(|c| self.shard_index(&c.key)).collect();
        indices.sort_unstable();
        indices.dedup();
        Locked {
            inner: self,
            guards: indices
                .iter()
                .map(|&i| (i, lock(&self.shards[i])))
                .collect(),
        }
    }

    fn reserve(&self, counters: &[Counter], amount: u64, now: Instant) -> Reservation {
        let mut locked = self.lock_all(counters);
        let statuses: Vec<CounterStatus> = counters
            .iter()
            .map(|c| match locked.map(&c.key).get(&c.key) {
                Some(e) if e.expires_at > now => CounterStatus {
                    used: e.used,
                    reset: e.expires_at - now,
                },
                _ => CounterStatus {
                    used: 0,
                    reset: c.window,
                },
            })
            .collect();
        let fits = counters
            .iter()
            .zip(&statuses)
            .all(|(c, s)| reservation_fits(c, s, amount));
        if !fits {
            return Reservation {
                statuses,
                windows: None,
            };
        }
        let windows = counters
            .iter()
            .map(|c| {
                let e = locked.map(&c.key).entry(c.key.clone()).or_insert(Entry {
                    used: 0,
                    expires_at: now,
                });
                if e.expires_at <= now {
                    *e = Entry {
                        used: 0,
                        expires_at: now + c.window,
                    };
                }
                e.used = e.used.saturating_add(amount);
                self.window_id(e.expires_at)
            })
            .collect();
        Reservation {
            statuses,
            windows: Some(windows),
        }
    }

    fn settle(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
        now: Instant,
    ) {
        for (c, &window) in counters.iter().zip(windows) {
            let mut map = lock(self.shard(&c.key));
            let same = map
                .get(&c.key)
                .is_some_and(|e| e.expires_at > now && self.window_id(e.expires_at) == window);
            if same {
                let e = map.get_mut(&c.key).expect("checked");
                e.used = (e.used.saturating_add(actual)).saturating_sub(reserved);
            } else if actual > reserved {
                drop(map);
                self.debit(std::slice::from_ref(c), actual - reserved, now);
            }
        }
    }

    fn sweep(&self, now: Instant) {
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            map.retain(|_, e| e.expires_at > now);
            if map.capacity() > 64 && map.capacity() > map.len() * 4 {
                let len = map.len();
                map.shrink_to(len * 2);
            }
        }
    }

    fn check(&self, counters: &[Counter], now: Instant) -> Vec<CounterStatus> {
        counters
            .iter()
            .map(|c| match lock(self.shard(&c.key)).get(&c.key) {
                Some(e) if e.expires_at > now => CounterStatus {
                    used: e.used,
                    reset: e.expires_at - now,
                },
                _ => CounterStatus {
                    used: 0,
                    reset: c.window,
                },
            })
            .collect()
    }

    fn debit(&self, counters: &[Counter], tokens: u64, now: Instant) {
        if tokens == 0 {
            return;
        }
        for c in counters {
            let mut map = lock(self.shard(&c.key));
            match map.get_mut(&c.key) {
                Some(e) if e.expires_at > now => e.used = e.used.saturating_add(tokens),
                Some(e) => {
                    *e = Entry {
                        used: tokens,
                        expires_at: now + c.window,
                    }
                }
                None => {
                    map.insert(
                        c.key.clone(),
                        Entry {
                            used: tokens,
                            expires_at: now + c.window,
                        },
                    );
                }
            }
        }
    }
}

impl MemoryStore {
    pub(crate) fn check_now(&self, counters: &[Counter]) -> Vec<CounterStatus> {
        self.inner.check(counters, Instant::now())
    }

    pub(crate) fn debit_now(&self, counters: &[Counter], tokens: u64) {
        self.ensure_sweeper();
        self.inner.debit(counters, tokens, Instant::now());
    }
}

impl MemoryStore {
    pub(crate) fn reserve_now(&self, counters: &[Counter], amount: u64) -> Reservation {
        self.ensure_sweeper();
        self.inner.reserve(counters, amount, Instant::now())
    }

    pub(crate) fn settle_now(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) {
        self.inner
            .settle(counters, windows, reserved, actual, Instant::now());
    }
}

impl Store for MemoryStore {
    fn reserve(&self, counters: &[Counter], amount: u64) -> StoreFuture<Reservation> {
        Box::pin(std::future::ready(Ok(self.reserve_now(counters, amount))))
    }

    fn settle(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<()> {
        self.settle_now(counters, windows, reserved, actual);
        Box::pin(std::future::ready(Ok(())))
    }

    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        Box::pin(std::future::ready(Ok(self.check_now(counters))))
    }

    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()> {
        self.debit_now(counters, tokens);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(key: &str, limit: u64, secs: u64) -> Counter {
        Counter {
            key: key.into(),
            limit,
            window: Duration::from_secs(secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn window_starts_at_first_debit_and_expires() {
        let store = MemoryStore::new();
        let c = [counter("k", 100, 60)];
        let s = store.check(&c).await.unwrap();
        assert_eq!(s[0].used, 0);
        assert_eq!(s[0].reset, Duration::from_secs(60));

        tokio::time::advance(Duration::from_secs(10)).await;
        store.debit(&c, 40).await.unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        store.debit(&c, 2).await.unwrap();
        let s = store.check(&c).await.unwrap();
        assert_eq!(s[0].used, 42);
        assert_eq!(s[0].reset, Duration::from_secs(10));

        tokio::time::advance(Duration::from_secs(10)).await;
        let s = store.check(&c).await.unwrap();
        assert_eq!(s[0].used, 0, "window over");
        store.debit(&c, 5).await.unwrap();
        assert_eq!(store.used("k"), 5, "a new window starts at the next debit");
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_are_all_or_nothing_and_settle_in_their_window() {
        let store = MemoryStore::new();
        let (a, b) = (counter("a", 100, 60), counter("b", 1000, 60));
        let both = [a.clone(), b.clone()];
        let r = store.reserve(&both, 60).await.unwrap();
        let windows = r.windows.expect("fits an empty window");
        assert_eq!((store.used("a"), store.used("b")), (60, 60));
        // 60 + 60 > 100 on `a`: nothing is reserved anywhere.
        assert!(store.reserve(&both, 60).await.unwrap().windows.is_none());
        assert_eq!((store.used("a"), store.used("b")), (60, 60));
        // Actual 45: 15 refunded in the same window.
        store.settle(&both, &windows, 60, 45).await.unwrap();
        assert_eq!((store.used("a"), store.used("b")), (45, 45));

        // A reservation whose window ended is not refunded into the next one...
        let r = store.reserve(&both, 50).await.unwrap().windows.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        store.debit(&both, 5).await.unwrap();
        store.settle(&both, &r, 50, 10).await.unwrap();
        assert_eq!(store.used("a"), 5);
        // ...but extra usage still counts, in the current window.
        let r = store.reserve(&both, 10).await.unwrap().windows.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        store.settle(&both, &r, 10, 30).await.unwrap();
        assert_eq!(store.used("a"), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_reservation_gets_one_turn_per_window() {
        let store = MemoryStore::new();
        let c = [counter("k", 100, 60)];
        assert!(store.reserve(&c, 500).await.unwrap().windows.is_some());
        assert!(store.reserve(&c, 1).await.unwrap().windows.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_debit_starts_no_window() {
        let store = MemoryStore::new();
        store.debit(&[counter("k", 1, 1)], 0).await.unwrap();
        assert!(store.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn debit_saturates() {
        let store = MemoryStore::new();
        let c = [counter("k", 1, 1)];
        store.debit(&c, u64::MAX).await.unwrap();
        store.debit(&c, 10).await.unwrap();
        assert_eq!(store.used("k"), u64::MAX);
    }
}

use crate::lock;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Algorithm, Counter, CounterStatus, KeyMap, Reservation, Store, StoreFuture, reservation_fits,
};

/// How many independently locked shards the map is split into.
const SHARDS: usize = 64;
/// The default cap on live counters.
const DEFAULT_MAX_COUNTERS: usize = 1_000_000;
/// How often the background sweeper frees expired counters.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The embedded store: counters in process memory, nothing to install.
///
/// Semantics are the same as the Redis store's (fixed windows that start at the first debit).
/// Counters are spread over 64 independently locked shards. Memory is bounded by the live
/// counters: a sweeper task (started on the tokio runtime the store is first used on, stopped when
/// the store is dropped) frees expired counters every second and gives unused capacity back.
/// A counter is held under a 128-bit keyed hash of its key (SipHash-1-3 under a random key per
/// store), not under the key's text: a live counter costs about 122 bytes whatever the key's
/// length (resident set growth measured by `cargo bench --bench load` at 1,000,000 counters),
/// and it makes no allocation of its own. Two keys could share a counter only if their hashes
/// collided, which nobody can arrange without the store's random key (and which happens by
/// chance with a probability of about 2^-128 per pair).
///
/// Cloning is cheap and shares the counters.
///
/// ```
/// use tower_token_ratelimit::store::{Algorithm, Counter, MemoryStore, Store};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// let counter = Counter {
///     key: "demo".into(),
///     limit: 100,
///     window: Duration::from_secs(60),
///     algorithm: Algorithm::FixedWindow,
/// };
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
    /// Keys a counter's [`Id`].
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    /// Counters a shard holds before it makes room (the store's cap / shards).
    max_per_shard: usize,
    sweeper_running: AtomicBool,
    /// Window ids are expiries in nanoseconds since this instant.
    epoch: Instant,
}

/// A counter's identity: its key's 128-bit SipHash under the store's random key (two 64-bit
/// hashes of the key, told apart by a prefix), as two words: a `u128`'s 16-byte alignment would
/// pad every map slot. The second picks the shard.
type Id = [u64; 2];

type Shard = KeyMap<Id, Entry>;

/// The shards of one multi-counter operation, locked.
struct Locked<'a> {
    inner: &'a Inner,
    guards: Vec<(usize, MutexGuard<'a, Shard>)>,
}

impl Locked<'_> {
    fn map(&mut self, id: Id) -> &mut Shard {
        let i = self.inner.shard_index(id);
        let pos = self
            .guards
            .iter()
            .position(|(j, _)| *j == i)
            .expect("locked");
        &mut self.guards[pos].1
    }
}

/// Nanoseconds since the store's epoch: times are kept in 8 bytes rather than an `Instant`'s
/// 16, so that an entry and its id take 56 bytes of the map instead of 80.
type Nanos = u64;

/// One counter: its algorithm's state, its limit, and when it can be forgotten.
#[derive(Debug, Clone, Copy)]
struct Entry {
    state: State,
    limit: u64,
    expires_at: Nanos,
}

impl Entry {
    /// Tokens counted (without time decay): what eviction ranks by.
    fn weight(&self) -> u64 {
        match self.state {
            State::Fixed { used } => used,
            State::Sliding { cur, prev, .. } => cur.saturating_add(prev),
            State::Bucket { used, .. } => used as u64,
        }
    }

    /// At or over its limit: never evicted, or its owner would get a fresh budget.
    fn in_debt(&self) -> bool {
        self.weight() >= self.limit
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Tokens used in the window ending at `expires_at`.
    Fixed { used: u64 },
    /// Tokens used in window `idx` (windows aligned to the store's epoch; its low 32 bits: an
    /// entry lives two windows) and in the one before.
    Sliding { idx: u32, cur: u64, prev: u64 },
    /// Tokens used as of `at`; they drain at `limit` per window.
    Bucket { used: f64, at: Nanos },
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
        Self::with_max_counters(DEFAULT_MAX_COUNTERS)
    }

    /// An empty store holding at most about `max` live counters (default 1,000,000, about
    /// 125 MB). When a new counter would pass the cap, the store frees expired counters, then
    /// the least-used eighth of those that still have budget left. A counter at or over its
    /// limit is never evicted (its owner would get a fresh budget): only counters in that state
    /// can take the store past the cap.
    pub fn with_max_counters(max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                hasher: RandomState::default(),
                max_per_shard: max.div_ceil(SHARDS).max(1),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
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
        self.inner.sweep(self.inner.now());
    }

    /// Reads one counter (tokens used in its current window), mainly for tests and dashboards.
    pub fn used(&self, key: &str) -> u64 {
        let now = self.inner.now();
        let id = self.inner.id(key);
        lock(self.inner.shard(id))
            .get(&id)
            .filter(|e| e.expires_at > now)
            .map_or(0, |e| match e.state {
                State::Fixed { used } => used,
                State::Sliding { cur, .. } => cur,
                State::Bucket { used, .. } => used as u64,
            })
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
        // Made before the task is spawned: a task dropped before its first poll (its runtime
        // shut down) drops it too.
        let running = Running(Arc::downgrade(&self.inner));
        handle.spawn(sweeper(running));
    }
}

/// Marks the sweeper stopped when it is dropped.
struct Running(Weak<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.sweeper_running.store(false, Ordering::Release);
        }
    }
}

/// Runs until the store is dropped (or the runtime shuts down, after which the next use of the
/// store on a runtime starts a new one).
async fn sweeper(running: Running) {
    let store = running.0.clone();
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else { return };
        inner.sweep(inner.now());
    }
}

impl Inner {
    fn id(&self, key: &str) -> Id {
        let half = |side: u8| self.hasher.hash_one((side, key));
        [half(0), half(1)]
    }

    fn shard_index(&self, id: Id) -> usize {
        (id[1] % self.shards.len() as u64) as usize
    }

    fn shard(&self, id: Id) -> &Mutex<Shard> {
        &self.shards[self.shard_index(id)]
    }

    /// The time now, since the epoch.
    fn now(&self) -> Nanos {
        u64::try_from(Instant::now().duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Locks every shard the counters live in, in index order, so two requests can never
    /// wait on each other.
    fn lock_all(&self, ids: &[Id]) -> Locked<'_> {
        let mut indices: Vec<usize> = ids.iter().map(|&id| self.shard_index(id)).collect();
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

    /// A counter's tokens used, time until its budget frees, and window id.
    fn status(&self, e: Option<&Entry>, c: &Counter, now: Nanos) -> (CounterStatus, u64) {
        let idle = (
            CounterStatus {
                used: 0,
                reset: c.window,
            },
            0,
        );
        let w = c.window.as_millis().max(1) as u64;
        match c.algorithm {
            Algorithm::FixedWindow => match e {
                Some(&Entry {
                    state: State::Fixed { used },
                    expires_at,
                    ..
                }) if expires_at > now => (
                    CounterStatus {
                        used,
                        reset: Duration::from_nanos(expires_at - now),
                    },
                    expires_at,
                ),
                _ => idle,
            },
            Algorithm::SlidingWindow => {
                let (idx, into) = self.window_index(now, w);
                let (cur, prev) = sliding(e, idx);
                let used =
                    ((prev as f64 * (w - into) as f64 / w as f64) as u64).saturating_add(cur);
                let reset = Duration::from_millis(sliding_frees(prev, cur, c.limit, w, into));
                (CounterStatus { used, reset }, idx)
            }
            Algorithm::TokenBucket => {
                let used = bucket(e, c, now);
                let limit = c.limit.max(1) as f64;
                // Spent: until it drains under the limit; otherwise until it is empty. Huge
                // debts (a client's `max_tokens` of 2^64) saturate, never panic.
                let secs = |tokens: f64| {
                    Duration::try_from_secs_f64(tokens * c.window.as_secs_f64() / limit)
                        .unwrap_or(Duration::MAX)
                };
                let reset = if used >= limit {
                    secs(used - limit).saturating_add(Duration::from_millis(1))
                } else if used > 0.0 {
                    secs(used)
                } else {
                    c.window
                };
                (
                    CounterStatus {
                        used: used as u64,
                        reset,
                    },
                    0,
                )
            }
        }
    }

    /// The index of the window `now` falls in (windows of `w` ms from the epoch), and how far
    /// into it `now` is.
    fn window_index(&self, now: Nanos, w: u64) -> (u64, u64) {
        let ms = now / 1_000_000;
        (ms / w, ms % w)
    }

    /// Adds `amount` to counter `c`, held under `id` (negative: a refund, never below zero).
    /// With a window id, a refund from a window that has ended is dropped (a sliding window's
    /// previous window, which still weighs in, takes it) and extra usage goes to the current
    /// window.
    /// `room`: a new counter may evict others from a full shard (a reservation makes its room
    /// before it adds anything, so that it never evicts one of its own counters).
    fn add(
        &self,
        map: &mut Shard,
        (c, id): (&Counter, Id),
        now: Nanos,
        amount: i128,
        wid: Option<u64>,
        room: bool,
    ) {
        if amount == 0 {
            return;
        }
        // One lookup: an existing counter is updated in place.
        let slot = map.get_mut(&id);
        let e = slot.as_deref();
        let (status, current) = self.status(e, c, now);
        let same_window = wid.is_none_or(|w| w == current);
        // A refund for a window that has ended since.
        let earlier = amount < 0 && !same_window;
        let refund_to_previous = earlier
            && c.algorithm == Algorithm::SlidingWindow
            && wid.is_some_and(|w| w.checked_add(1) == Some(current));
        if earlier && !refund_to_previous {
            return;
        }
        let w = c.window.as_millis().max(1) as u64;
        let entry = match c.algorithm {
            Algorithm::FixedWindow => {
                let live = status.used > 0 || e.is_some_and(|e| e.expires_at > now);
                let expires_at = match e {
                    Some(e) if live => e.expires_at,
                    _ => now.saturating_add(nanos(c.window)),
                };
                let used = clamp_add(if live { status.used } else { 0 }, amount);
                Entry {
                    state: State::Fixed { used },
                    limit: c.limit,
                    expires_at,
                }
            }
            Algorithm::SlidingWindow => {
                let (idx, _) = self.window_index(now, w);
                let (mut cur, mut prev) = sliding(e, idx);
                if refund_to_previous {
                    prev = clamp_add(prev, amount);
                } else {
                    cur = clamp_add(cur, amount);
                }
                Entry {
                    // The low bits: `sliding` compares them with wrapping.
                    state: State::Sliding {
                        idx: idx as u32,
                        cur,
                        prev,
                    },
                    limit: c.limit,
                    expires_at: w.saturating_mul(idx + 2).saturating_mul(1_000_000),
                }
            }
            Algorithm::TokenBucket => {
                let used = (bucket(e, c, now) + amount as f64).max(0.0);
                let drain = used * c.window.as_secs_f64() / c.limit.max(1) as f64;
                Entry {
                    state: State::Bucket { used, at: now },
                    limit: c.limit,
                    expires_at: now
                        .saturating_add(nanos(
                            Duration::try_from_secs_f64(drain).unwrap_or(Duration::MAX),
                        ))
                        .saturating_add(nanos(c.window)),
                }
            }
        };
        if let Some(slot) = slot {
            *slot = entry;
            return;
        }
        if room && map.len() >= self.max_per_shard {
            make_room(map, self.max_per_shard, now, &[]);
        }
        map.insert(id, entry);
    }

    fn reserve(&self, counters: &[Counter], amount: u64, now: Nanos) -> Reservation {
        let ids: Vec<Id> = counters.iter().map(|c| self.id(&c.key)).collect();
        let mut locked = self.lock_all(&ids);
        let statuses: Vec<CounterStatus> = counters
            .iter()
            .zip(&ids)
            .map(|(c, &id)| self.status(locked.map(id).get(&id), c, now).0)
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
        // Room first for the counters this reservation creates, none of its own evicted: all
        // of them are taken, or none. A shard too small for them all holds them anyway.
        for &id in &ids {
            let map = locked.map(id);
            if !map.contains_key(&id) && map.len() >= self.max_per_shard {
                make_room(map, self.max_per_shard, now, &ids);
            }
        }
        let windows = counters
            .iter()
            .zip(&ids)
            .map(|(c, &id)| {
                let map = locked.map(id);
                self.add(map, (c, id), now, i128::from(amount), None, false);
                self.status(map.get(&id), c, now).1
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
        now: Nanos,
    ) {
        let delta = i128::from(actual) - i128::from(reserved);
        for (c, &window) in counters.iter().zip(windows) {
            let id = self.id(&c.key);
            self.add(
                &mut lock(self.shard(id)),
                (c, id),
                now,
                delta,
                Some(window),
                true,
            );
        }
    }

    fn sweep(&self, now: Nanos) {
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            map.retain(|_, e| e.expires_at > now);
            if map.capacity() > 64 && map.capacity() > map.len() * 4 {
                let len = map.len();
                map.shrink_to(len * 2);
            }
        }
    }

    fn check(&self, counters: &[Counter], now: Nanos) -> Vec<CounterStatus> {
        counters
            .iter()
            .map(|c| {
                let id = self.id(&c.key);
                self.status(lock(self.shard(id)).get(&id), c, now).0
            })
            .collect()
    }

    fn debit(&self, counters: &[Counter], tokens: u64, now: Nanos) {
        for c in counters {
            let id = self.id(&c.key);
            self.add(
                &mut lock(self.shard(id)),
                (c, id),
                now,
                i128::from(tokens),
                None,
                true,
            );
        }
    }
}

/// Frees expired counters, then, if the shard is still full, the least-used eighth of the
/// counters that are not in debt, `spare` excepted.
fn make_room(map: &mut Shard, max: usize, now: Nanos, spare: &[Id]) {
    map.retain(|_, e| e.expires_at > now);
    if map.len() < max {
        return;
    }
    let mut candidates: Vec<(u64, Id)> = map
        .iter()
        .filter(|(id, e)| !e.in_debt() && !spare.contains(id))
        .map(|(&id, e)| (e.weight(), id))
        .collect();
    let n = (max / 8).max(1).min(candidates.len());
    if n == 0 {
        return;
    }
    candidates.select_nth_unstable_by_key(n - 1, |(w, _)| *w);
    for (_, key) in &candidates[..n] {
        map.remove(key);
    }
}

fn clamp_add(v: u64, amount: i128) -> u64 {
    u64::try_from((i128::from(v) + amount).max(0)).unwrap_or(u64::MAX)
}

/// A sliding counter's current and previous windows as of window `idx`.
fn sliding(e: Option<&Entry>, idx: u64) -> (u64, u64) {
    let idx = idx as u32;
    match e.map(|e| e.state) {
        Some(State::Sliding { idx: i, cur, prev }) if i == idx => (cur, prev),
        Some(State::Sliding { idx: i, cur, .. }) if i.wrapping_add(1) == idx => (0, cur),
        _ => (0, 0),
    }
}

/// Milliseconds until a sliding window's budget frees, `into` ms into a window of `w`: the
/// next boundary while it is not spent; when it is, until the previous window's fading share
/// leaves it under the limit, which is in the next window when the current one alone is over.
fn sliding_frees(prev: u64, cur: u64, limit: u64, w: u64, into: u64) -> u64 {
    let left = w - into;
    let (prev, cur, limit, wf) = (prev as f64, cur as f64, limit as f64, w as f64);
    if prev * left as f64 / wf + cur < limit {
        return left;
    }
    if cur < limit {
        // prev × (left − d) / w + cur < limit  ⇔  d > left − w × (limit − cur) / prev
        let d = left as f64 - wf * (limit - cur) / prev;
        return (d.max(0.0) as u64 + 1).min(left);
    }
    // Next window: cur × (w − x) / w < limit  ⇔  x > w × (1 − limit / cur)
    let x = wf * (1.0 - limit / cur);
    left.saturating_add(x as u64 + 1)
}

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A bucket's tokens used as of `now`, after draining.
fn bucket(e: Option<&Entry>, c: &Counter, now: Nanos) -> f64 {
    match e.map(|e| e.state) {
        Some(State::Bucket { used, at }) => {
            let rate = c.limit as f64 / c.window.as_secs_f64().max(1e-3);
            (used - now.saturating_sub(at) as f64 / 1e9 * rate).max(0.0)
        }
        _ => 0.0,
    }
}

impl MemoryStore {
    pub(crate) fn check_now(&self, counters: &[Counter]) -> Vec<CounterStatus> {
        self.inner.check(counters, self.inner.now())
    }

    pub(crate) fn debit_now(&self, counters: &[Counter], tokens: u64) {
        self.ensure_sweeper();
        self.inner.debit(counters, tokens, self.inner.now());
    }

    pub(crate) fn reserve_now(&self, counters: &[Counter], amount: u64) -> Reservation {
        self.ensure_sweeper();
        self.inner.reserve(counters, amount, self.inner.now())
    }

    pub(crate) fn settle_now(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) {
        self.inner
            .settle(counters, windows, reserved, actual, self.inner.now());
    }
}

impl Store for MemoryStore {
    fn try_check_now(&self, counters: &[Counter]) -> Option<Vec<CounterStatus>> {
        Some(self.check_now(counters))
    }

    fn try_debit_now(&self, counters: &[Counter], tokens: u64) -> bool {
        self.debit_now(counters, tokens);
        true
    }

    fn try_settle_now(
        &self,
        counters: &[Counter],
        windows: &[u64],
        reserved: u64,
        actual: u64,
    ) -> bool {
        self.settle_now(counters, windows, reserved, actual);
        true
    }

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

    #[test]
    fn an_entry_and_its_id_take_56_bytes() {
        // What a live counter costs in the map, besides the map's own slack.
        assert_eq!(std::mem::size_of::<Entry>(), 40);
        assert_eq!(std::mem::size_of::<(Id, Entry)>(), 56);
    }

    fn counter(key: &str, limit: u64, secs: u64) -> Counter {
        Counter {
            key: key.into(),
            limit,
            window: Duration::from_secs(secs),
            algorithm: Algorithm::FixedWindow,
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

    fn with(mut c: Counter, algorithm: Algorithm) -> Counter {
        c.algorithm = algorithm;
        c
    }

    async fn used(store: &MemoryStore, c: &Counter) -> u64 {
        store.check(std::slice::from_ref(c)).await.unwrap()[0].used
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_window_weights_the_previous_window() {
        let store = MemoryStore::new();
        let c = with(counter("s", 100, 60), Algorithm::SlidingWindow);
        let one = std::slice::from_ref(&c);
        tokio::time::advance(Duration::from_secs(10)).await;
        store.debit(one, 80).await.unwrap();
        assert_eq!(used(&store, &c).await, 80);
        // Just past the boundary almost all of the previous window still counts: no burst.
        tokio::time::advance(Duration::from_secs(51)).await;
        assert_eq!(used(&store, &c).await, 78, "80 × 59/60");
        // Half-way through the next window, half of it.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(used(&store, &c).await, 40);
        store.debit(one, 30).await.unwrap();
        assert_eq!(used(&store, &c).await, 70);
        let s = store.check(one).await.unwrap()[0];
        assert_eq!(s.reset, Duration::from_secs(30), "the next boundary");
        // Two windows later nothing is left.
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(used(&store, &c).await, 0);
    }

    /// A spent counter's reset is when a request can pass again: a sliding window's when the
    /// previous window's share has faded enough (in the next window when the current one alone
    /// is over), a token bucket's when it has drained under the limit, not when it is empty.
    #[tokio::test(start_paused = true)]
    async fn a_spent_counter_resets_when_a_request_can_pass_again() {
        let store = MemoryStore::new();
        let frees_at = |c: &Counter| {
            let (store, c) = (store.clone(), c.clone());
            async move {
                let s = store.check(std::slice::from_ref(&c)).await.unwrap()[0];
                assert!(s.used >= c.limit, "spent: {s:?}");
                tokio::time::advance(s.reset - Duration::from_millis(1)).await;
                assert!(
                    used(&store, &c).await >= c.limit,
                    "1 ms before {:?}",
                    s.reset
                );
                tokio::time::advance(Duration::from_millis(1)).await;
                assert!(used(&store, &c).await < c.limit, "at {:?}", s.reset);
                s.reset
            }
        };
        // 100 a minute, 300 used 10 s in: 50 s to the boundary, then 300 × (60 − x) / 60 < 100
        // from x > 40 s.
        let over = with(counter("over", 100, 60), Algorithm::SlidingWindow);
        tokio::time::advance(Duration::from_secs(10)).await;
        store.debit(std::slice::from_ref(&over), 300).await.unwrap();
        assert_eq!(frees_at(&over).await, Duration::from_millis(90_001));
        // 80 in one window, 50 ten seconds into the next: 80 × (50 − d) / 60 + 50 < 100 from
        // d > 12.5 s.
        let fading = with(counter("fading", 100, 60), Algorithm::SlidingWindow);
        store
            .debit(std::slice::from_ref(&fading), 80)
            .await
            .unwrap();
        let into = store.check(std::slice::from_ref(&fading)).await.unwrap()[0].reset;
        tokio::time::advance(into + Duration::from_secs(10)).await;
        store
            .debit(std::slice::from_ref(&fading), 50)
            .await
            .unwrap();
        assert_eq!(frees_at(&fading).await, Duration::from_millis(12_501));
        // 60 a minute, 100 used: under the limit after 40 s, empty after 100.
        let bucket = with(counter("bucket", 60, 60), Algorithm::TokenBucket);
        store
            .debit(std::slice::from_ref(&bucket), 100)
            .await
            .unwrap();
        assert_eq!(frees_at(&bucket).await, Duration::from_millis(40_001));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_refills_continuously_and_allows_debt() {
        let store = MemoryStore::new();
        // 60 tokens per minute: one a second.
        let c = with(counter("b", 60, 60), Algorithm::TokenBucket);
        let one = std::slice::from_ref(&c);
        store.debit(one, 100).await.unwrap();
        assert_eq!(used(&store, &c).await, 100, "40 tokens of debt");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(used(&store, &c).await, 70, "still over the limit");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(used(&store, &c).await, 59, "under the limit again");
        let s = store.check(one).await.unwrap()[0];
        assert_eq!(
            s.reset,
            Duration::from_secs(59),
            "time to refill completely"
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(used(&store, &c).await, 0, "never below empty");
        // Reservations work the same way: a refund drains the bucket.
        let r = store.reserve(one, 50).await.unwrap().windows.unwrap();
        store.settle(one, &r, 50, 20).await.unwrap();
        assert_eq!(used(&store, &c).await, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_new_keys_is_capped_and_keys_in_debt_survive() {
        let store = MemoryStore::with_max_counters(SHARDS * 100);
        // Spent, and half-spent, before the flood.
        let spent = counter("spent", 10, 3600);
        let half = counter("half", 10, 3600);
        store.debit(std::slice::from_ref(&spent), 10).await.unwrap();
        store.debit(std::slice::from_ref(&half), 5).await.unwrap();
        for i in 0..100_000 {
            store
                .debit(&[counter(&format!("flood:{i}"), 10, 3600)], 1)
                .await
                .unwrap();
        }
        assert!(store.len() <= SHARDS * 100, "{} counters", store.len());
        assert_eq!(store.used("spent"), 10, "a key in debt is never forgotten");
        assert_eq!(store.used("half"), 5, "the least used go first");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_debit_starts_no_window() {
        let store = MemoryStore::new();
        store.debit(&[counter("k", 1, 1)], 0).await.unwrap();
        assert!(store.is_empty());
    }

    /// Counts near `u64::MAX` (a client's `max_tokens` of 2^64 - 1 reserved, or absurd usage)
    /// saturate in every algorithm: no panic, and a spent counter stays spent.
    #[tokio::test(start_paused = true)]
    async fn huge_counts_saturate_in_every_algorithm() {
        let store = MemoryStore::new();
        for algorithm in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            // Less than a token a second: a debt of 2^64 takes longer to drain than a
            // `Duration` holds.
            let c = with(
                counter(&format!("{algorithm:?}"), 50_000, 86_400),
                algorithm,
            );
            let one = std::slice::from_ref(&c);
            store.debit(one, 600).await.unwrap();
            // Into the next window: a sliding window's previous one still weighs in.
            tokio::time::advance(Duration::from_secs(86_400)).await;
            // An empty counter gives an oversized request its one turn (the sliding window
            // still holds the previous window's 600).
            let r = store.reserve(one, u64::MAX).await.unwrap();
            assert_eq!(
                r.windows.is_some(),
                algorithm != Algorithm::SlidingWindow,
                "{algorithm:?}"
            );
            store.debit(one, u64::MAX / 2 + 1).await.unwrap();
            store.debit(one, u64::MAX / 2 + 1).await.unwrap();
            let s = store.check(one).await.unwrap()[0];
            assert!(s.used >= c.limit, "{algorithm:?}: {} used", s.used);
            assert!(s.reset > Duration::ZERO, "{algorithm:?}");
            assert!(
                store.reserve(one, 1).await.unwrap().windows.is_none(),
                "{algorithm:?}: a spent counter takes nothing more"
            );
        }
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

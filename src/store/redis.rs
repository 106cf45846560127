//! The Redis store: counters shared by every replica, in standalone Redis or Redis Cluster.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, FromRedisValue, Script, Value};
use deadpool_redis::{
    ConnectionAddr, ConnectionInfo, ProtocolVersion, RedisConnectionInfo, Runtime,
};
use tokio::sync::{oneshot, watch};

use super::{Counter, CounterStatus, KeyMap, Reservation, Store, StoreFuture};
use crate::config::RedisConfig;
use crate::error::{ConfigError, Problems, StoreError};
use crate::{lock, telemetry};

static CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/algorithms.lua"),
        include_str!("scripts/check.lua")
    ))
});
static DEBIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/algorithms.lua"),
        include_str!("scripts/debit.lua")
    ))
});
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/algorithms.lua"),
        include_str!("scripts/reserve.lua")
    ))
});
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/algorithms.lua"),
        include_str!("scripts/settle.lua")
    ))
});

/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
const DEFAULT_BREAKER_FAILURES: u32 = 3;
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// The most tokens one script argument carries (2^50, about 10^15, far above any budget).
/// Lua reads arguments as doubles and Redis writes a number back for `INCRBY` with `%.17g`:
/// from 10^17 on that is exponent notation, which `INCRBY` refuses, failing the script
/// part-way (a client's `max_tokens` of 10^18 would fail its reservation, and through the
/// breaker everyone's).
const MAX_SCRIPT_TOKENS: u64 = 1 << 50;
const DEFAULT_MAX_PENDING: usize = 100_000;
/// The shortest wait for a write of settlements or buffered debits (no request waits for one).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the answer of a reservation script that timed out is still awaited, to give back
/// what it reserved (see [`give_back_late`]).
const LATE_ANSWER: Duration = Duration::from_secs(10);
/// How long a check's answer is reused by default.
pub const DEFAULT_CHECK_REUSE: Duration = Duration::from_millis(10);
/// The shortest time between two settlement writes by default.
pub const DEFAULT_SETTLE_INTERVAL: Duration = Duration::from_millis(5);
/// The longest `settle_interval` accepted.
const MAX_SETTLE_INTERVAL: Duration = Duration::from_secs(60);

/// Counters in Redis (standalone or Cluster), shared by every replica of a service.
///
/// Each admission is one `EVALSHA` of a script that reads every counter of the request
/// (concurrent admissions of the same counters share one), and settlements are `EVALSHA`s that
/// add the tokens, many requests' settlements merged into one script per hash slot (scripts
/// reloaded on `NOSCRIPT`); windows are Redis TTLs, so no clock but Redis's matters. Keys follow
/// the Higress layout and share the `{rule_name}` hash tag, so one rule's keys live in one
/// Cluster slot.
///
/// The store connects lazily: building it needs no Redis. It keeps one multiplexed connection
/// (no `PING` per request) and replaces it when it breaks. Every call is bounded by a timeout
/// (default 50 ms); after repeated failures a circuit breaker answers at once without waiting on
/// Redis and probes in the background until Redis is back. Debits that cannot be written are
/// kept (bounded; counted and logged past the bound) and written when Redis answers again.
///
/// ```
/// use tower_token_ratelimit::store::RedisStore;
/// use std::time::Duration;
///
/// let store = RedisStore::builder()
///     .url("redis://127.0.0.1:6379/0")
///     .timeout(Duration::from_millis(50))
///     .build()?;
/// # Ok::<_, tower_token_ratelimit::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &matches!(self.inner.target, Target::Cluster(_)))
            .field("timeout", &self.inner.timeout)
            .field("breaker_open", &self.breaker_open())
            .field("pending_debits", &self.pending_debits())
            .finish()
    }
}

enum Target {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

#[derive(Clone)]
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// A debit waiting for Redis: the tokens to add to one counter.
struct PendingDebit {
    /// The debit script's arguments for the counter: algorithm, window, limit.
    params: [u64; 3],
    tokens: u64,
}

/// A debit to write: the counter's key, its [`params`], the tokens.
type Debit = (Arc<str>, [u64; 3], u64);

/// One key's part of a batched script: the key, its [`params`], its arguments, and the tokens
/// kept as a pending debit if the script fails.
type KeyWrite = (Arc<str>, [u64; 3], Vec<u64>, u64);

/// What a check script is called with: the keys and their [`params`].
type CheckId = (Vec<Arc<str>>, Vec<u64>);
type CheckAnswer = Result<Arc<Vec<Value>>, StoreError>;

/// A reservation waiting for its script: its keys and their [`params`], its amount, and where
/// its part of the answer goes.
struct Waiting {
    keys: Vec<Arc<str>>,
    params: Vec<u64>,
    amount: u64,
    answer: oneshot::Sender<Result<Reservation, StoreError>>,
}

/// Most reservations one script makes (a longer script would hold Redis up).
const MAX_RESERVATIONS_PER_SCRIPT: usize = 64;

struct Inner {
    target: Target,
    conn: Mutex<Option<Conn>>,
    timeout: Duration,
    breaker_failures: u32,
    probe_interval: Duration,
    failures: AtomicU32,
    open: AtomicBool,
    flushing: AtomicBool,
    /// A retry of the buffered debits is scheduled.
    retrying: AtomicBool,
    /// Failed debits by key, merged so a long outage costs one entry per counter.
    pending: Mutex<KeyMap<Arc<str>, PendingDebit>>,
    /// Buffered debits taken out of `pending` and being written.
    rewriting: AtomicUsize,
    /// Checks on their way to Redis, by keys and parameters: a check of the same counters
    /// meanwhile waits for that answer instead of sending its own.
    checks: Mutex<KeyMap<CheckId, watch::Receiver<Option<CheckAnswer>>>>,
    /// Reservations waiting to be sent, by hash slot group (one group on a single node):
    /// while one reservation script of a group is on its way, the next reservations wait here
    /// and go together in the next script.
    reserving: Mutex<KeyMap<Vec<u8>, Vec<Waiting>>>,
    /// How long a check's answer is reused (zero: never).
    reuse: Duration,
    /// The shortest time between two settlement writes.
    settle_interval: Duration,
    recent: Mutex<Recent>,
    max_pending: usize,
    dropped: AtomicU64,
}

/// Check answers kept for reuse, with what this store debited since: all of it is dropped
/// every reuse period, so that both stay small.
#[derive(Default)]
struct Recent {
    /// When the current period started, and its number.
    since: Option<Instant>,
    period: u64,
    answers: KeyMap<CheckId, Answered>,
    /// Tokens debited (refunds negative) per key during the period: what this store sent
    /// Redis.
    debited: KeyMap<Arc<str>, i64>,
}

struct Answered {
    /// When the check was sent: the answer's resets are counted from then.
    sent: Instant,
    statuses: Vec<CounterStatus>,
    /// What `debited` held for each key when the check was sent.
    debited: Vec<i64>,
}

impl Recent {
    /// Starts a new period if the current one is over.
    fn rotate(&mut self, now: Instant, reuse: Duration) {
        if self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= reuse)
        {
            self.end_period();
            self.since = Some(now);
        }
    }

    /// Drops every answer, and any answer on its way (its period is over).
    fn end_period(&mut self) {
        self.answers.clear();
        self.debited.clear();
        self.since = None;
        self.period += 1;
    }

    /// `debited` for each key.
    fn debited(&self, keys: &[Arc<str>]) -> Vec<i64> {
        keys.iter()
            .map(|k| self.debited.get(k).copied().unwrap_or(0))
            .collect()
    }
}

/// Runs its closure when dropped, unless [`done`](Self::done): a background task dropped
/// before it ends (its runtime shut down while the store lives on, as a layer shared by
/// several runtimes does) puts right the state it was to put right at its end, so that the
/// next runtime's calls find nothing stuck. Made before the task is spawned and moved into
/// it: a task dropped before its first poll drops it too.
struct Unfinished<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Unfinished<F> {
    fn new(undo: F) -> Self {
        Self(Some(undo))
    }

    fn done(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for Unfinished<F> {
    fn drop(&mut self) {
        if let Some(undo) = self.0.take() {
            undo();
        }
    }
}

/// Where a [`RedisStore`] connects, and how it behaves when Redis fails.
#[must_use]
#[derive(Default)]
pub struct RedisStoreBuilder {
    url: Option<String>,
    cluster_nodes: Option<Vec<String>>,
    connection: Option<ConnectionInfo>,
    pool: Option<Target>,
    timeout: Option<Duration>,
    breaker_failures: Option<u32>,
    probe_interval: Option<Duration>,
    max_pending: Option<usize>,
    check_reuse: Option<Duration>,
    settle_interval: Option<Duration>,
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may hold passwords: not printed.
        f.debug_struct("RedisStoreBuilder")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// A standalone Redis: `redis://[user[:password]@]host[:port][/db]`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// A Redis Cluster, from some of its nodes (`host:port` or `redis://host:port`).
    pub fn cluster_nodes<I>(mut self, nodes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.cluster_nodes = Some(nodes.into_iter().map(Into::into).collect());
        self
    }

    /// A standalone Redis pool the application already has. Its connections' response timeout
    /// (redis-rs's default: 500 ms) bounds how long the answer of a reservation script that
    /// timed out is awaited to give its reservation back; the store's own pools wait 10 s.
    pub fn pool(mut self, pool: deadpool_redis::Pool) -> Self {
        self.pool = Some(Target::Single(pool));
        self
    }

    /// A Redis Cluster pool the application already has.
    pub fn cluster_pool(mut self, pool: deadpool_redis::cluster::Pool) -> Self {
        self.pool = Some(Target::Cluster(pool));
        self
    }

    /// Longest wait for one Redis call, connecting included (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Consecutive failures that open the circuit breaker (default 3), and how often an open
    /// breaker probes Redis (default 250 ms). Debits whose write failed are written again
    /// as often while the breaker is closed.
    pub fn breaker(mut self, failures: u32, probe_interval: Duration) -> Self {
        self.breaker_failures = Some(failures);
        self.probe_interval = Some(probe_interval);
        self
    }

    /// Most failed debits kept for when Redis is back (default 100,000 distinct counters;
    /// debits to the same counter are merged). Past it, debits are dropped, counted and logged.
    pub fn max_pending_debits(mut self, n: usize) -> Self {
        self.max_pending = Some(n);
        self
    }

    /// How long the answer to a check is reused by later checks of the same counters, with
    /// the tokens this store has debited since added (default 10 ms; zero: every check asks
    /// Redis). Post-debit admission reads usage that is debited when streams end, seconds
    /// later; reuse adds at most this long to how late one replica sees another's debits, and
    /// spares Redis a round trip per check. Reservations always go to Redis.
    pub fn check_reuse(mut self, reuse: Duration) -> Self {
        self.check_reuse = Some(reuse);
        self
    }

    /// The shortest time between two writes of settlements (default 5 ms; zero: each write
    /// starts as soon as the one before has ended). Settlements that end meanwhile wait, merged
    /// per counter, for the next write: under load one script carries the settlements of
    /// every request that ended in the interval, and counters show them at most this much
    /// later. Admission is not delayed: checks and reservations go at once. At most 60 s.
    pub fn settle_interval(mut self, interval: Duration) -> Self {
        self.settle_interval = Some(interval);
        self
    }

    /// Validates the settings and makes the store. Nothing connects until the first request.
    pub fn build(self) -> Result<RedisStore, ConfigError> {
        let mut p = Problems::default();
        let sources = usize::from(self.url.is_some())
            + usize::from(self.cluster_nodes.is_some())
            + usize::from(self.connection.is_some())
            + usize::from(self.pool.is_some());
        if sources != 1 {
            p.push(
                "redis",
                "give exactly one of a URL, cluster nodes, or a pool",
            );
            return Err(p.into_result(()).unwrap_err());
        }
        check_timing(&mut p, self.timeout, self.settle_interval);
        if self.breaker_failures == Some(0) {
            p.push("redis.breaker", "failures must be > 0");
        }
        let target = if let Some(t) = self.pool {
            Some(t)
        } else if let Some(url) = self.url {
            check_url(&mut p, "redis.url", &url);
            single(&mut p, url.as_str())
        } else if let Some(info) = self.connection {
            single(&mut p, info)
        } else {
            let nodes = self.cluster_nodes.unwrap_or_default();
            if nodes.is_empty() {
                p.push(
                    "redis.cluster_nodes",
                    "empty; list at least one node as host:port",
                );
            }
            let urls: Vec<String> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let url = if n.contains("://") {
                        n.clone()
                    } else {
                        format!("redis://{n}")
                    };
                    check_url(&mut p, &format!("redis.cluster_nodes[{i}]"), &url);
                    url
                })
                .collect();
            match deadpool_redis::cluster::Config::from_urls(urls)
                .create_pool(Some(Runtime::Tokio1))
            {
                Ok(pool) => Some(Target::Cluster(pool)),
                Err(e) => {
                    p.push(
                        "redis.cluster_nodes",
                        format!("cannot make a cluster pool: {e}"),
                    );
                    None
                }
            }
        };
        let target = p.into_result(target)?.expect("no problem means a target");
        Ok(RedisStore {
            inner: Arc::new(Inner {
                target,
                conn: Mutex::new(None),
                timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
                breaker_failures: self.breaker_failures.unwrap_or(DEFAULT_BREAKER_FAILURES),
                probe_interval: self.probe_interval.unwrap_or(DEFAULT_PROBE_INTERVAL),
                failures: AtomicU32::new(0),
                open: AtomicBool::new(false),
                flushing: AtomicBool::new(false),
                retrying: AtomicBool::new(false),
                pending: Mutex::default(),
                max_pending: self.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
                dropped: AtomicU64::new(0),
                rewriting: AtomicUsize::new(0),
                checks: Mutex::default(),
                reserving: Mutex::default(),
                reuse: self.check_reuse.unwrap_or(DEFAULT_CHECK_REUSE),
                settle_interval: self.settle_interval.unwrap_or(DEFAULT_SETTLE_INTERVAL),
                recent: Mutex::default(),
            }),
        })
    }
}

/// The timeout and settlement interval, checked wherever they are given.
fn check_timing(p: &mut Problems, timeout: Option<Duration>, settle_interval: Option<Duration>) {
    if timeout == Some(Duration::ZERO) {
        p.push("redis.timeout", "must be > 0");
    }
    if settle_interval.is_some_and(|i| i > MAX_SETTLE_INTERVAL) {
        p.push(
            "redis.settle_interval",
            "at most 60000 ms: counters show settlements this much later",
        );
    }
}

fn check_url(p: &mut Problems, path: &str, url: &str) {
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
        // The message never repeats the URL, which may hold a password.
        p.push(path, format!("not a usable Redis URL ({:?}): expected redis://[user[:password]@]host[:port][/db]", e.kind()));
    }
}

/// A pool of connections to one node that wait for an answer as long as a reservation's late
/// answer is awaited ([`LATE_ANSWER`]; redis-rs's own default gives up after 500 ms). Every
/// call still has its own, shorter timeout.
fn single(p: &mut Problems, target: impl redis::IntoConnectionInfo) -> Option<Target> {
    let connections = redis::AsyncConnectionConfig::new().set_response_timeout(Some(LATE_ANSWER));
    let pool = deadpool_redis::Manager::new_with_config(target, connections)
        .map_err(|e| e.to_string())
        .and_then(|manager| {
            deadpool_redis::Pool::builder(manager)
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| e.to_string())
        });
    match pool {
        Ok(pool) => Some(Target::Single(pool)),
        Err(e) => {
            p.push("redis", format!("cannot make a Redis pool: {e}"));
            None
        }
    }
}

impl From<deadpool_redis::Pool> for RedisStore {
    fn from(pool: deadpool_redis::Pool) -> Self {
        RedisStore::builder()
            .pool(pool)
            .build()
            .expect("a pool is a valid target")
    }
}

impl From<deadpool_redis::cluster::Pool> for RedisStore {
    fn from(pool: deadpool_redis::cluster::Pool) -> Self {
        RedisStore::builder()
            .cluster_pool(pool)
            .build()
            .expect("a pool is a valid target")
    }
}

impl RedisStore {
    /// Starts a builder.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// A standalone Redis at this URL, with default settings.
    pub fn from_url(url: impl Into<String>) -> Result<Self, ConfigError> {
        Self::builder().url(url).build()
    }

    /// The store a configuration's `redis:` block describes: the Higress fields
    /// (`service_name`, `service_port`, `username`, `password`, `timeout` in ms, `database`), or
    /// `url`, or `cluster_nodes`; and `check_reuse` and `settle_interval` in ms.
    pub fn from_config(config: &RedisConfig) -> Result<Self, ConfigError> {
        let mut p = Problems::default();
        config.check_unknown(&mut p);
        let mut b = Self::builder();
        if let Some(ms) = config.timeout {
            b = b.timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = config.check_reuse {
            b = b.check_reuse(Duration::from_millis(ms));
        }
        if let Some(ms) = config.settle_interval {
            b = b.settle_interval(Duration::from_millis(ms));
        }
        let given = [
            config.service_name.is_some(),
            config.url.is_some(),
            config.cluster_nodes.is_some(),
        ];
        if config.database.is_some_and(|db| db < 0) {
            p.push("redis.database", "must be >= 0");
        }
        // The Higress connection fields belong with `service_name`: next to a URL (which
        // carries them) or cluster nodes they would be ignored.
        // (field, given, ignored next to cluster nodes too: those take the credentials)
        let fields = [
            ("service_port", config.service_port.is_some(), true),
            ("database", config.database.is_some(), true),
            ("username", config.username.is_some(), false),
            ("password", config.password.is_some(), false),
        ];
        let (elsewhere, nodes) = match given {
            [false, true, false] => (
                "with url, put it in the URL (redis://user:password@host:port/db)",
                false,
            ),
            [false, false, true] => (
                "with cluster_nodes, give ports in the node addresses; a cluster has only database 0",
                true,
            ),
            _ => ("", false),
        };
        let ignored = fields
            .into_iter()
            .filter(|&(_, set, with_nodes)| set && !elsewhere.is_empty() && (with_nodes || !nodes));
        for (field, _, _) in ignored {
            p.push(
                format!("redis.{field}"),
                format!("only with service_name; {elsewhere}"),
            );
        }
        let mut has_target = true;
        match given {
            [true, false, false] => {
                let host = config.service_name.clone().unwrap_or_default();
                if host.is_empty() {
                    p.push("redis.service_name", "must not be empty");
                }
                b.connection = Some(ConnectionInfo {
                    addr: ConnectionAddr::Tcp(host, config.service_port.unwrap_or(6379)),
                    redis: RedisConnectionInfo {
                        db: config.database.unwrap_or(0),
                        username: config.username.clone(),
                        password: config.password.clone(),
                        protocol: ProtocolVersion::RESP2,
                    },
                });
            }
            [false, true, false] => b = b.url(config.url.clone().unwrap_or_default()),
            [false, false, true] => {
                let nodes = config.cluster_nodes.clone().unwrap_or_default();
                let auth = match (&config.username, &config.password) {
                    (Some(u), Some(pw)) => format!("{}:{}@", enc(u), enc(pw)),
                    (None, Some(pw)) => format!(":{}@", enc(pw)),
                    (Some(u), None) => format!("{}@", enc(u)),
                    (None, None) => String::new(),
                };
                b = b.cluster_nodes(nodes.into_iter().map(|n| {
                    if n.contains("://") {
                        n
                    } else {
                        format!("redis://{auth}{n}")
                    }
                }));
            }
            _ => {
                p.push(
                    "redis",
                    "set exactly one of service_name (with service_port), url, or cluster_nodes",
                );
                has_target = false;
            }
        }
        // Every problem at once: the builder's own checks too.
        if !has_target {
            check_timing(
                &mut p,
                config.timeout.map(Duration::from_millis),
                config.settle_interval.map(Duration::from_millis),
            );
            return Err(p.into_result(()).unwrap_err());
        }
        ConfigError::combine(p.into_result(()), b.build()).map(|((), store)| store)
    }

    /// Whether the circuit breaker is open (Redis considered down).
    pub fn breaker_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Counters with debits waiting for Redis (or being written to it after an outage).
    pub fn pending_debits(&self) -> usize {
        lock(&self.inner.pending).len() + self.inner.rewriting.load(Ordering::Acquire)
    }

    /// Debits dropped: the pending buffer was full, or a counter's key holds a value of another
    /// type (written by someone else), which the store leaves as it is.
    pub fn dropped_debits(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

/// Percent-encodes URL userinfo.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An `EVALSHA` of `script`, built directly (one buffer), rather than through
/// `ScriptInvocation`, which copies every key and argument into a vector of its own first.
fn evalsha(script: &Script, keys: &[Arc<str>], args: &[u64]) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(3 + keys.len() + args.len(), 64 + 24 * args.len());
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for k in keys {
        cmd.arg(&**k);
    }
    for a in args {
        cmd.arg(*a);
    }
    cmd
}

/// A script call still on its way after its timeout: Redis may yet run it.
type LateCall<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

impl Conn {
    /// Runs `cmd`, an [`evalsha`] of `script`, loading the script first if Redis lacks it.
    async fn invoke<T: FromRedisValue>(
        &mut self,
        script: &Script,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self.query(cmd).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                match self {
                    Conn::Single(c) => script.load_async(c).await?,
                    Conn::Cluster(c) => script.load_async(c).await?,
                };
                self.query(cmd).await
            }
            other => other,
        }
    }

    async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    async fn ping(&mut self) -> redis::RedisResult<()> {
        self.query(&redis::cmd("PING")).await
    }
}

impl Inner {
    async fn connection(&self) -> Result<Conn, String> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        // The pool's recycle PINGs; we take the connection out once and keep it.
        let c = match &self.target {
            Target::Single(pool) => Conn::Single(deadpool_redis::Connection::take(
                pool.get().await.map_err(|e| e.to_string())?,
            )),
            Target::Cluster(pool) => Conn::Cluster(deadpool_redis::cluster::Connection::take(
                pool.get().await.map_err(|e| e.to_string())?,
            )),
        };
        *lock(&self.conn) = Some(c.clone());
        Ok(c)
    }

    /// Runs a script within `timeout`, feeding the breaker.
    async fn invoke_within<T: FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        script: &'static Script,
        keys: &[Arc<str>],
        args: &[u64],
    ) -> Result<T, StoreError> {
        self.invoke_or_late(timeout, script, keys, args)
            .await
            .map_err(|(e, _)| e)
    }

    /// [`invoke_within`](Self::invoke_within), handing back with a timeout's error the call
    /// itself, still on its way, to be awaited further or dropped.
    async fn invoke_or_late<T: FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        script: &'static Script,
        keys: &[Arc<str>],
        args: &[u64],
    ) -> Result<T, (StoreError, Option<LateCall<T>>)> {
        if self.open.load(Ordering::Acquire) {
            return Err((
                StoreError::new("redis unavailable (circuit breaker open)"),
                None,
            ));
        }
        let cmd = evalsha(script, keys, args);
        let inner = self.clone();
        let mut call: LateCall<T> = Box::pin(async move {
            let mut conn = inner.connection().await?;
            conn.invoke::<T>(script, &cmd)
                .await
                .map_err(|e| e.to_string())
        });
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(timeout, &mut call).await;
        telemetry::store_call(
            "redis",
            started.elapsed().as_secs_f64(),
            matches!(result, Ok(Ok(_))),
        );
        let (error, late) = match result {
            Ok(Ok(v)) => {
                self.failures.store(0, Ordering::Release);
                if !lock(&self.pending).is_empty() {
                    self.spawn_flush();
                }
                return Ok(v);
            }
            Ok(Err(e)) => (e, None),
            Err(_) => (format!("no answer within {timeout:?}"), Some(call)),
        };
        // Start over with a fresh connection next time, and reuse no answer read before.
        lock(&self.conn).take();
        lock(&self.recent).end_period();
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.breaker_failures && !self.open.swap(true, Ordering::AcqRel) {
            telemetry::breaker_open("redis", true);
            tracing::error!(error = %error, failures, "redis failing: circuit breaker open, probing for its return");
            // Dropped before Redis answers (its runtime shut down), the probe leaves the
            // breaker closed: the next call tries Redis, and if that fails opens it again with
            // a probe on its own runtime.
            let inner = Arc::downgrade(self);
            let unfinished = Unfinished::new({
                let inner = inner.clone();
                move || {
                    if let Some(inner) = inner.upgrade() {
                        inner.open.store(false, Ordering::Release);
                    }
                }
            });
            tokio::spawn(probe(inner, unfinished));
        }
        Err((StoreError::new(error), late))
    }

    /// The check script's answer for `id`, from a call already on its way or from a new one,
    /// and whether this call sent it.
    async fn check_shared(self: &Arc<Self>, id: &CheckId) -> (CheckAnswer, bool) {
        loop {
            let waiting = {
                let mut checks = lock(&self.checks);
                match checks.get(id) {
                    Some(answer) => Ok(answer.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        checks.insert(id.clone(), rx);
                        Err(tx)
                    }
                }
            };
            match waiting {
                Ok(mut answer) => match answer.wait_for(Option::is_some).await {
                    Ok(answer) => return (answer.clone().expect("waited for an answer"), false),
                    // The caller making the call went away before the answer: try again.
                    Err(_) => continue,
                },
                Err(tx) => {
                    // Whatever happens to this caller, the next check makes its own call.
                    let leave = Leave(self, id);
                    let answer = self
                        .invoke_within::<Vec<Value>>(self.timeout, &CHECK, &id.0, &id.1)
                        .await
                        .map(Arc::new);
                    drop(leave);
                    let _ = tx.send(Some(answer.clone()));
                    return (answer, true);
                }
            }
        }
    }

    /// A recent answer to a check of `id`, with the tokens debited since added; `None` when
    /// there is none to reuse (reuse off, breaker open, too old, or a window over since).
    fn reused(&self, id: &CheckId) -> Option<Vec<CounterStatus>> {
        if !self.may_reuse() {
            return None;
        }
        let now = Instant::now();
        let mut recent = lock(&self.recent);
        recent.rotate(now, self.reuse);
        let answered = recent.answers.get(id)?;
        let age = now.saturating_duration_since(answered.sent);
        answered
            .statuses
            .iter()
            .zip(&id.0)
            .zip(&answered.debited)
            .map(|((status, key), before)| {
                let reset = status.reset.checked_sub(age).filter(|r| !r.is_zero())?;
                let since = recent
                    .debited
                    .get(key)
                    .map_or(0, |now| now.saturating_sub(*before));
                Some(CounterStatus {
                    used: status.used.saturating_add_signed(since),
                    reset,
                })
            })
            .collect()
    }

    /// Whether an answer could be reused now: reuse is on and the breaker closed.
    fn may_reuse(&self) -> bool {
        !self.reuse.is_zero() && !self.open.load(Ordering::Acquire)
    }

    /// Before sending a check of `id` that may be reused: the period and what was debited.
    fn before_check(&self, id: &CheckId) -> Option<(Instant, u64, Vec<i64>)> {
        if self.reuse.is_zero() {
            return None;
        }
        let now = Instant::now();
        let mut recent = lock(&self.recent);
        recent.rotate(now, self.reuse);
        Some((now, recent.period, recent.debited(&id.0)))
    }

    /// Keeps an answer for reuse, unless its period is over.
    fn remember(&self, id: CheckId, before: (Instant, u64, Vec<i64>), statuses: &[CounterStatus]) {
        let (sent, period, debited) = before;
        let mut recent = lock(&self.recent);
        if recent.period == period {
            let statuses = statuses.to_vec();
            recent.answers.insert(
                id,
                Answered {
                    sent,
                    statuses,
                    debited,
                },
            );
        }
    }

    /// Counts debits (refunds negative) about to be written into what reused answers add.
    fn note_debits<'a>(&self, debits: impl Iterator<Item = (&'a Arc<str>, i64)>) {
        if self.reuse.is_zero() {
            return;
        }
        let mut recent = lock(&self.recent);
        recent.rotate(Instant::now(), self.reuse);
        for (key, tokens) in debits.filter(|(_, t)| *t != 0) {
            match recent.debited.get_mut(key) {
                Some(total) => *total = total.saturating_add(tokens),
                None => {
                    recent.debited.insert(key.clone(), tokens);
                }
            }
        }
    }

    /// Keeps debits that could not be written for when Redis is back.
    fn buffer(&self, debits: impl IntoIterator<Item = Debit>) {
        let mut pending = lock(&self.pending);
        for (key, params, tokens) in debits {
            let full = pending.len() >= self.max_pending;
            match pending.get_mut(&key) {
                Some(d) => d.tokens = d.tokens.saturating_add(tokens),
                None if full => {
                    let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if dropped == 1 || dropped.is_multiple_of(1000) {
                        tracing::error!(
                            dropped,
                            max = self.max_pending,
                            "redis debit buffer full: debits dropped"
                        );
                    }
                }
                None => {
                    pending.insert(key, PendingDebit { params, tokens });
                }
            }
        }
        telemetry::pending_debits("redis", pending.len());
    }

    /// Writes debits (key, script parameters, tokens); see [`write`](Self::write).
    fn write_debits(
        self: &Arc<Self>,
        debits: Vec<Debit>,
    ) -> impl Future<Output = usize> + Send + 'static {
        let writes = debits
            .into_iter()
            .map(|(key, p, tokens)| {
                let args = vec![tokens.min(MAX_SCRIPT_TOKENS), p[0], p[1], p[2]];
                (key, p, args, tokens)
            })
            .collect();
        self.write(&DEBIT, writes)
    }

    /// Runs `script` over many keys: one call per hash slot and at most
    /// [`MAX_KEYS_PER_SCRIPT`] keys. Each key comes with its [`params`], its arguments, and
    /// the tokens kept as a pending debit if its call fails. The future answers how many calls
    /// failed. The writes are in its hands from this call on, not from its first poll: a
    /// future dropped before it runs (its runtime shut down; one written after another, as
    /// settlements are) keeps them as one dropped while it runs does (see [`Unwritten`]).
    fn write(
        self: &Arc<Self>,
        script: &'static Script,
        writes: Vec<KeyWrite>,
    ) -> impl Future<Output = usize> + Send + 'static {
        let mut groups: Vec<Vec<KeyWrite>> = Vec::new();
        match self.target {
            Target::Single(_) => groups.push(writes),
            Target::Cluster(_) => {
                let mut by_tag: HashMap<Vec<u8>, usize> = HashMap::new();
                for w in writes {
                    let next = by_tag.len();
                    let group = *by_tag.entry(hash_tag(&w.0).to_vec()).or_insert(next);
                    if group == groups.len() {
                        groups.push(Vec::new());
                    }
                    groups[group].push(w);
                }
            }
        }
        let mut chunks = VecDeque::new();
        for mut group in groups {
            while !group.is_empty() {
                let rest = group.split_off(group.len().min(MAX_KEYS_PER_SCRIPT));
                chunks.push_back(group);
                group = rest;
            }
        }
        let mut unwritten = Unwritten(self.clone(), chunks);
        async move {
            let inner = &unwritten.0;
            // No request waits for a write: it gets longer than the per-call timeout, since a
            // write that times out may have been applied all the same, and is then written
            // again from the buffer (counted twice).
            let timeout = inner.timeout.max(WRITE_TIMEOUT);
            let mut failed = 0;
            while let Some(chunk) = unwritten.1.front() {
                let keys: Vec<Arc<str>> = chunk.iter().map(|w| w.0.clone()).collect();
                let args: Vec<u64> = chunk.iter().flat_map(|w| w.2.iter().copied()).collect();
                let answer = inner
                    .invoke_within::<Vec<usize>>(timeout, script, &keys, &args)
                    .await;
                let Some(chunk) = unwritten.1.pop_front() else {
                    break;
                };
                match answer {
                    Ok(refused) => inner.refused(&chunk, &refused),
                    Err(_) => {
                        failed += 1;
                        inner.buffer(kept(chunk));
                    }
                }
            }
            if failed > 0 {
                inner.retry_later();
            }
            failed
        }
    }

    /// Drops the writes of `chunk` whose keys Redis could not count on (at positions `refused`,
    /// from 1, as the scripts answer): a value of another type under them, written by someone
    /// else. They are not retried (they would fail again).
    fn refused(&self, chunk: &[KeyWrite], refused: &[usize]) {
        let keys: Vec<&str> = refused
            .iter()
            .filter_map(|i| chunk.get(i.wrapping_sub(1)))
            .inspect(|w| {
                if w.3 > 0 {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map(|w| &*w.0)
            .collect();
        if !keys.is_empty() {
            tracing::error!(
                keys = ?keys,
                "redis keys hold values their counters cannot count on (another type, text, or a number out of range): their writes are dropped (delete the keys to count on them again)"
            );
        }
    }

    /// Writes the buffered debits again after a probe interval. A successful call writes them
    /// too, and so does the breaker's probe when Redis is back, but a write can fail while
    /// the breaker stays closed (fewer failures than open it, or one node of a Cluster down
    /// while the others answer): without this, they would wait for the next successful call,
    /// which never comes when the traffic stops, while other replicas read counters without
    /// them.
    fn retry_later(self: &Arc<Self>) {
        if self.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::downgrade(self);
        let interval = self.probe_interval;
        let unfinished = Unfinished::new({
            let inner = inner.clone();
            move || {
                if let Some(inner) = inner.upgrade() {
                    inner.retrying.store(false, Ordering::Release);
                }
            }
        });
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = inner.upgrade() else { return };
                let open = inner.open.load(Ordering::Acquire);
                if inner.flushing.load(Ordering::Acquire) && !open {
                    // A flush is on its way; what it does not write is looked at after it.
                    continue;
                }
                // Cleared first: what is buffered from now on schedules its own retry.
                inner.retrying.store(false, Ordering::Release);
                unfinished.done();
                // While the breaker is open, its probe writes them when Redis answers.
                if !open && !lock(&inner.pending).is_empty() {
                    inner.spawn_flush();
                }
                return;
            }
        });
    }

    fn spawn_flush(self: &Arc<Self>) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropped before it ends (its runtime shut down), what it took out of the buffer goes
        // back in (see `Unwritten`), and the next flush can start.
        let unfinished = Unfinished::new({
            let inner = self.clone();
            move || {
                inner.rewriting.store(0, Ordering::Release);
                inner.flushing.store(false, Ordering::Release);
            }
        });
        let inner = self.clone();
        tokio::spawn(async move {
            inner.flush_pending().await;
            drop(unfinished);
        });
    }

    /// Writes the buffered debits; what fails goes back into the buffer.
    async fn flush_pending(self: &Arc<Self>) {
        let batch: Vec<Debit> = {
            let mut pending = lock(&self.pending);
            self.rewriting.store(pending.len(), Ordering::Release);
            pending
                .drain()
                .map(|(key, d)| (key, d.params, d.tokens))
                .collect()
        };
        telemetry::pending_debits("redis", 0);
        if batch.is_empty() {
            return;
        }
        let total = batch.len();
        let failed = self.write_debits(batch).await;
        self.rewriting.store(0, Ordering::Release);
        tracing::info!(
            total,
            failed_scripts = failed,
            "buffered debits written to redis"
        );
    }
}

/// The debits of writes kept for later when they fail: the extras (refunds are dropped, the
/// conservative side).
fn kept(chunk: Vec<KeyWrite>) -> impl Iterator<Item = Debit> {
    chunk
        .into_iter()
        .filter(|w| w.3 > 0)
        .map(|(key, params, _, tokens)| (key, params, tokens))
}

/// The writes of a [`write`](Inner::write) not yet answered. Dropped before they all are (the
/// runtime shut down), they are kept as failed ones are: the one on its way may be applied all
/// the same, as after a timeout.
struct Unwritten(Arc<Inner>, VecDeque<Vec<KeyWrite>>);

impl Drop for Unwritten {
    fn drop(&mut self) {
        if !self.1.is_empty() {
            self.0.buffer(self.1.drain(..).flat_map(kept));
        }
    }
}

/// Takes a check off the list of those on their way to Redis.
struct Leave<'a>(&'a Inner, &'a CheckId);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        lock(&self.0.checks).remove(self.1);
    }
}

/// Sends the reservations waiting in `group`, as many at once as are waiting (up to the
/// script's limits), until none is left; each caller gets its part of the answer.
async fn reserve_batches(inner: Arc<Inner>, group: Vec<u8>, unfinished: Unfinished<impl FnOnce()>) {
    loop {
        // Before cutting a batch, the tasks already woken (among them those the last answer
        // woke) run up to their own reservation: the load bench sends ~40 % fewer scripts, and
        // Redis spends ~18 % less CPU per request; answers come no later (p50, p99).
        tokio::task::yield_now().await;
        let batch: Vec<Waiting> = {
            let mut queues = lock(&inner.reserving);
            let Some(queue) = queues.get_mut(&group) else {
                unfinished.done();
                return;
            };
            // A caller gone before its turn (the request was dropped) reserves nothing.
            queue.retain(|w| !w.answer.is_closed());
            let (mut n, mut keys) = (0, 0);
            while n < queue.len().min(MAX_RESERVATIONS_PER_SCRIPT)
                && (n == 0 || keys + queue[n].keys.len() <= MAX_KEYS_PER_SCRIPT)
            {
                keys += queue[n].keys.len();
                n += 1;
            }
            if n == 0 {
                queues.remove(&group);
                unfinished.done();
                return;
            }
            queue.drain(..n).collect()
        };
        let keys: Vec<Arc<str>> = batch.iter().flat_map(|w| w.keys.iter().cloned()).collect();
        let mut args = Vec::with_capacity(1 + batch.len() * 2 + keys.len() * 3);
        args.push(batch.len() as u64);
        for w in &batch {
            args.extend([w.amount.min(MAX_SCRIPT_TOKENS), w.keys.len() as u64]);
            args.extend_from_slice(&w.params);
        }
        match inner
            .invoke_or_late::<Vec<u8>>(inner.timeout, &RESERVE, &keys, &args)
            .await
        {
            Ok(packed) => match reserve_answer(&packed, &batch, keys.len()) {
                Ok(values) => hand_out(&inner, batch, &values),
                Err(e) => {
                    fail(batch, &e);
                }
            },
            Err((e, late)) => {
                let batch = fail(batch, &e);
                if let Some(late) = late {
                    tokio::spawn(give_back_late(inner.clone(), late, batch, keys.len()));
                }
            }
        }
    }
}

/// The integers of a reserve script's answer for `batch` (of `keys` counters in all).
fn reserve_answer(packed: &[u8], batch: &[Waiting], keys: usize) -> Result<Vec<i64>, StoreError> {
    let values = unpack_integers(packed)?;
    if values.len() == batch.len() + 3 * keys {
        return Ok(values);
    }
    Err(StoreError::new(format!(
        "reserve script answered {} values for {} reservations of {} counters",
        values.len(),
        batch.len(),
        keys
    )))
}

/// Hands each reservation of `batch` its part of the script's answer.
fn hand_out(inner: &Arc<Inner>, batch: Vec<Waiting>, values: &[i64]) {
    let mut rest = values;
    let mut refunds = Vec::new();
    for w in batch {
        let (part, after) = rest.split_at(1 + 3 * w.keys.len());
        rest = after;
        // Failed on its key `part[0] - 2` (taken back in the script).
        if let Some(key) = usize::try_from(part[0].saturating_sub(2))
            .ok()
            .and_then(|i| w.keys.get(i))
        {
            let _ = w.answer.send(Err(foreign_value(key)));
            continue;
        }
        let reservation = parse_reserve(part, &w.params);
        if reservation.windows.is_some() {
            inner.note_debits(w.keys.iter().map(|key| (key, clamp(w.amount))));
        }
        // A caller gone while the script ran (the request was dropped, or it was answered
        // with a timeout) gets its reservation given back, or it would stay charged for
        // nothing.
        if let Err(Ok(Reservation {
            windows: Some(windows),
            ..
        })) = w.answer.send(Ok(reservation))
        {
            inner.note_debits(w.keys.iter().map(|key| (key, -clamp(w.amount))));
            refunds.extend(refund_writes(&w.keys, &w.params, w.amount, &windows));
        }
    }
    if !refunds.is_empty() {
        let inner = inner.clone();
        tokio::spawn(async move {
            // Written once the breaker lets calls through: the slow spell that answered these
            // late may have opened it, and a write it refuses is lost (failed writes keep
            // debits for later, not refunds).
            let until = Instant::now() + LATE_ANSWER;
            while inner.open.load(Ordering::Acquire) && Instant::now() < until {
                tokio::time::sleep(inner.probe_interval).await;
            }
            inner.write(&SETTLE, refunds).await
        });
    }
}

/// Answers every reservation of `batch` with `error`; returns them with their answer sent.
fn fail(batch: Vec<Waiting>, error: &StoreError) -> Vec<Waiting> {
    batch
        .into_iter()
        .map(|w| {
            let _ = w.answer.send(Err(error.clone()));
            Waiting {
                answer: oneshot::channel().0,
                ..w
            }
        })
        .collect()
}

/// A reservation script that timed out may still run: Redis was slow, not gone. Its callers
/// were answered with the timeout and will never settle what it reserved, which would stay
/// charged to the end of the window: if its answer comes within [`LATE_ANSWER`], all of it is
/// given back (`batch`'s answers go nowhere).
async fn give_back_late(
    inner: Arc<Inner>,
    late: LateCall<Vec<u8>>,
    batch: Vec<Waiting>,
    keys: usize,
) {
    if let Ok(Ok(packed)) = tokio::time::timeout(LATE_ANSWER, late).await
        && let Ok(values) = reserve_answer(&packed, &batch, keys)
    {
        hand_out(&inner, batch, &values);
    }
}

/// The settlement writes that give a whole reservation of `amount` on `keys` back.
fn refund_writes(keys: &[Arc<str>], params: &[u64], amount: u64, windows: &[u64]) -> Vec<KeyWrite> {
    let delta = super::settlement_delta(amount, 0);
    keys.iter()
        .zip(params.chunks_exact(3))
        .zip(windows)
        .map(|((key, p), window_id)| {
            settle_write(key.clone(), [p[0], p[1], p[2]], *window_id, delta)
        })
        .collect()
}

/// The settle script's write of `delta` (actual − reserved) to a counter's window.
fn settle_write(key: Arc<str>, p: [u64; 3], window_id: u64, delta: i64) -> KeyWrite {
    let (refund, extra) = super::refund_and_extra(delta);
    let args = vec![
        p[0],
        p[1],
        p[2],
        window_id,
        refund.min(MAX_SCRIPT_TOKENS),
        extra.min(MAX_SCRIPT_TOKENS),
    ];
    (key, p, args, extra)
}

/// While the breaker is open: PING on a fresh connection every probe interval; on an answer,
/// close the breaker and write what was buffered.
async fn probe(inner: Weak<Inner>, unfinished: Unfinished<impl FnOnce()>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.probe_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        lock(&inner.conn).take();
        let ping = async {
            let mut c = inner.connection().await?;
            c.ping().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(inner.timeout, ping).await {
            Ok(Ok(())) => {
                unfinished.done();
                inner.failures.store(0, Ordering::Release);
                inner.open.store(false, Ordering::Release);
                telemetry::breaker_open("redis", false);
                tracing::info!("redis is back: circuit breaker closed");
                inner.spawn_flush();
                return;
            }
            _ => {
                lock(&inner.conn).take();
            }
        }
    }
}

fn parse_check(values: &[Value], counters: &[Counter]) -> Result<Vec<CounterStatus>, StoreError> {
    if values.len() != counters.len() * 2 {
        return Err(StoreError::new(format!(
            "check script answered {} values for {} counters",
            values.len(),
            counters.len()
        )));
    }
    let mut out = Vec::with_capacity(counters.len());
    for (pair, c) in values.chunks_exact(2).zip(counters) {
        let used: i64 =
            i64::from_redis_value_ref(&pair[0]).map_err(|e| StoreError::new(e.to_string()))?;
        let pttl: i64 =
            i64::from_redis_value_ref(&pair[1]).map_err(|e| StoreError::new(e.to_string()))?;
        if pttl == -1 {
            return Err(foreign_value(&c.key));
        }
        out.push(CounterStatus {
            used: u64::try_from(used).unwrap_or(0),
            reset: u64::try_from(pttl).map_or(c.window, Duration::from_millis),
        });
    }
    Ok(out)
}

/// The error for a counter whose key holds a value of another type than the counter's.
fn foreign_value(key: &str) -> StoreError {
    StoreError::new(format!(
        "redis key {key} holds a value its counter cannot count on (another type, text, or a \
         number out of range): left as it is (delete it to count on it again)"
    ))
}

/// One reservation's part of the reserve script's answer; `params` are its counters'
/// [`params`], in order.
fn parse_reserve(values: &[i64], params: &[u64]) -> Reservation {
    let counters = params.len() / 3;
    let reserved = values[0] == 1;
    let mut statuses = Vec::with_capacity(counters);
    let mut windows = Vec::with_capacity(counters);
    for (triple, p) in values[1..].chunks_exact(3).zip(params.chunks_exact(3)) {
        let [used, pttl, window] = [triple[0], triple[1], triple[2]];
        statuses.push(CounterStatus {
            used: u64::try_from(used).unwrap_or(0),
            reset: u64::try_from(pttl).map_or(Duration::from_secs(p[1]), Duration::from_millis),
        });
        windows.push(u64::try_from(window).unwrap_or(0));
    }
    Reservation {
        statuses,
        windows: reserved.then_some(windows),
    }
}

/// The integers of a MessagePack array (the reserve script's answer).
fn unpack_integers(mut packed: &[u8]) -> Result<Vec<i64>, StoreError> {
    let err = |what: &str| StoreError::new(format!("reserve script answer: {what}"));
    let len = rmp::decode::read_array_len(&mut packed).map_err(|_| err("not an array"))?;
    // Each integer takes at least a byte: the length cannot ask for more than that.
    let mut values = Vec::with_capacity((len as usize).min(packed.len()));
    for _ in 0..len {
        values
            .push(rmp::decode::read_int::<i64, _>(&mut packed).map_err(|_| err("not an integer"))?);
    }
    Ok(values)
}

/// Tokens as a signed count, clamped to what a script argument carries.
fn clamp(tokens: u64) -> i64 {
    tokens.min(MAX_SCRIPT_TOKENS) as i64
}

/// The algorithm, window (seconds) and limit the scripts take for a counter.
fn params(c: &Counter) -> [u64; 3] {
    [
        c.algorithm.code(),
        c.window.as_secs().max(1),
        c.limit.min(i64::MAX as u64),
    ]
}

/// The keys, and per key its [`params`].
fn keys_and_params(counters: &[Counter]) -> (Vec<Arc<str>>, Vec<u64>) {
    let keys = counters.iter().map(|c| c.key.clone()).collect();
    let params = counters.iter().flat_map(params).collect();
    (keys, params)
}

/// Most keys one write or reservation script takes (a longer script would hold Redis up).
const MAX_KEYS_PER_SCRIPT: usize = 256;

/// The part of a key Redis Cluster hashes: the first `{…}` with something inside, or the
/// whole key.
fn hash_tag(key: &str) -> &[u8] {
    let key = key.as_bytes();
    key.iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let len = key[open + 1..].iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key)
}

impl Store for RedisStore {
    /// Concurrent checks of the same counters share one script call: a check that finds one
    /// on its way to Redis waits for its answer instead of sending another. That answer is
    /// read at most one round trip earlier than the check's own would be; post-debit admission
    /// reads usage that is only debited when streams end, so the difference is of the same
    /// kind (SPEC 4), and it takes one script per hot counter set per round trip.
    ///
    /// An answer is then reused for [`check_reuse`](RedisStoreBuilder::check_reuse) (10 ms by
    /// default), with the tokens this store debited since added.
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        let id = keys_and_params(counters);
        if let Some(statuses) = self.inner.reused(&id) {
            return Box::pin(std::future::ready(Ok(statuses)));
        }
        let inner = self.inner.clone();
        let counters = counters.to_vec();
        Box::pin(async move {
            let before = inner.before_check(&id);
            let (values, sent) = inner.check_shared(&id).await;
            let statuses = parse_check(&values?, &counters)?;
            if let Some(before) = before.filter(|_| sent) {
                inner.remember(id, before, &statuses);
            }
            Ok(statuses)
        })
    }

    fn try_check_now(&self, counters: &[Counter]) -> Option<Vec<CounterStatus>> {
        // Without reuse, not even the lookup key is built.
        if !self.inner.may_reuse() {
            return None;
        }
        self.inner.reused(&keys_and_params(counters))
    }

    /// Reservations that arrive while a reservation script is on its way (to the same hash
    /// slot, on a cluster) go together, in order, in the next script; each is still all or
    /// none on its own counters.
    fn reserve(&self, counters: &[Counter], amount: u64) -> StoreFuture<Reservation> {
        let inner = self.inner.clone();
        let (keys, params) = keys_and_params(counters);
        Box::pin(async move {
            let group = match (&inner.target, keys.first()) {
                (Target::Cluster(_), Some(key)) => {
                    let tag = hash_tag(key);
                    if keys.iter().all(|k| hash_tag(k) == tag) {
                        tag.to_vec()
                    } else {
                        // Keys in several slots fail in Redis; only with the same keys.
                        keys.iter().fold(vec![0xff], |mut group, k| {
                            group.extend_from_slice(k.as_bytes());
                            group.push(0);
                            group
                        })
                    }
                }
                _ => Vec::new(),
            };
            let (tx, rx) = oneshot::channel();
            let waiting = Waiting {
                keys,
                params,
                amount,
                answer: tx,
            };
            let first = {
                let mut queues = lock(&inner.reserving);
                match queues.get_mut(&group) {
                    Some(queue) => {
                        queue.push(waiting);
                        false
                    }
                    None => {
                        queues.insert(group.clone(), vec![waiting]);
                        true
                    }
                }
            };
            if first {
                // Dropped before its queue is empty (its runtime shut down), the task takes
                // the queue away: its callers are answered with an error (the failure mode
                // applies), and the next reservation starts a queue of its own instead of
                // waiting behind this one for good.
                let unfinished = Unfinished::new({
                    let (inner, group) = (inner.clone(), group.clone());
                    move || {
                        lock(&inner.reserving).remove(&group);
                    }
                });
                tokio::spawn(reserve_batches(inner.clone(), group, unfinished));
            }
            // However many batches queue ahead (Redis slow, each call within its timeout), the
            // caller waits for one batch ahead and its own at most, then the failure mode
            // applies; a reservation made after it left is given back.
            let deadline = inner.timeout.saturating_mul(2);
            match tokio::time::timeout(deadline, rx).await {
                Ok(answer) => {
                    answer.map_err(|_| StoreError::new("reservation script abandoned"))?
                }
                Err(_) => Err(StoreError::new(format!(
                    "reservation not answered within {deadline:?}"
                ))),
            }
        })
    }

    fn settle(
        &self,
        counters: &[Counter],
        window_ids: &[u64],
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<()> {
        let delta = super::settlement_delta(reserved, actual);
        let settlements = counters
            .iter()
            .zip(window_ids)
            .map(|(c, w)| (c.clone(), *w, delta))
            .collect();
        self.settle_many(settlements)
    }

    fn settle_interval(&self) -> Duration {
        self.inner.settle_interval
    }

    /// One script per hash slot (all of them at once on a single node). Where it fails, extra
    /// usage is kept for when Redis is back; a refund is dropped (the conservative side).
    fn settle_many(&self, settlements: Vec<(Counter, u64, i64)>) -> StoreFuture<()> {
        let inner = &self.inner;
        inner.note_debits(settlements.iter().map(|(c, _, delta)| (&c.key, *delta)));
        let writes = settlements
            .into_iter()
            // Nothing to correct (the reservation was exact, or merged ones cancel out).
            .filter(|(_, _, delta)| *delta != 0)
            .map(|(c, window_id, delta)| {
                let p = params(&c);
                settle_write(c.key, p, window_id, delta)
            })
            .collect();
        let write = inner.write(&SETTLE, writes);
        Box::pin(async move {
            write.await;
            Ok(())
        })
    }

    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()> {
        let debits = counters.iter().map(|c| (c.clone(), tokens)).collect();
        self.debit_many(debits)
    }

    /// One script per hash slot (all of them at once on a single node), whatever the number
    /// of requests merged into `debits`.
    fn debit_many(&self, debits: Vec<(Counter, u64)>) -> StoreFuture<()> {
        let inner = &self.inner;
        inner.note_debits(debits.iter().map(|(c, tokens)| (&c.key, clamp(*tokens))));
        let debits = debits
            .into_iter()
            .map(|(c, tokens)| {
                let p = params(&c);
                (c.key, p, tokens)
            })
            .collect();
        // What fails is buffered for when Redis is back; the breaker logs the outage.
        let write = inner.write_debits(debits);
        Box::pin(async move {
            write.await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_answer_is_read_as_integers() {
        let values = [0, 1, 127, 128, 255, 65_536, 1_764_000_000_000, -5, i64::MAX];
        let mut packed = Vec::new();
        rmp::encode::write_array_len(&mut packed, values.len() as u32).unwrap();
        for v in values {
            rmp::encode::write_sint(&mut packed, v).unwrap();
        }
        assert_eq!(unpack_integers(&packed).unwrap(), values);
    }

    #[test]
    fn a_malformed_answer_is_an_error() {
        let mut huge = Vec::new();
        rmp::encode::write_array_len(&mut huge, u32::MAX).unwrap();
        let mut float = Vec::new();
        rmp::encode::write_array_len(&mut float, 1).unwrap();
        rmp::encode::write_f64(&mut float, 1.5).unwrap();
        for bad in [
            &b""[..],
            b"\x81\x01\x02",
            b"\xa3abc",
            b"\x93\x01\x02",
            &huge,
            &float,
        ] {
            assert!(unpack_integers(bad).is_err(), "{bad:?}");
        }
    }
}

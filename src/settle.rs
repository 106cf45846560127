//! Settlement: the meter that decides what a request costs once its response ends, and the
//! background worker that debits the store.
//!
//! When a body ends (or is dropped) its meter settles: the in-memory store takes the debit at
//! once (a short lock, never a wait); for any other store the meter hands a [`Settlement`] to an
//! unbounded channel, which never blocks and never panics, and a worker task applies it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::cost::Cost;
use crate::decode::{Decoder, Encoding};
use crate::layer::Shared;
use crate::lock;
use crate::store::{self, Counter, KeyMap, MemoryStore, Store, StoreFuture};
use crate::telemetry;
use crate::usage::{BodyFormat, Usage, UsageScanner};

/// Characters per token assumed by the estimate (a usual figure for English text and JSON).
const BYTES_PER_TOKEN: u64 = 4;
/// Stream bytes per output token: SSE envelopes repeat ids and field names around each
/// delta. Fitted on the shared fixtures (see `output_estimate`).
const SSE_BYTES_PER_TOKEN: u64 = 64;

/// Prompt tokens estimated from the request body's size: at admission in reserve mode, and
/// when no usage arrives.
pub(crate) fn prompt_estimate(request_bytes: u64) -> u64 {
    request_bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Output tokens estimated from what was streamed: for SSE the bytes over 64 (envelopes repeat
/// ids and field names around each delta); for other bodies, bytes over 4.
///
/// Measured on the shared fixtures against the output the providers reported: SSE median
/// 0.93× (from 0.13× for Gemini/Responses streams whose reasoning is never streamed, to 5.2×
/// for OpenAI-style streams of one token per event), JSON bodies median 1.5× (0.70× to 5.8×).
/// Counting events as well changed none of these figures (64 bytes is smaller than any
/// provider's event), so they are not counted.
fn output_estimate(format: Option<BodyFormat>, bytes: u64) -> u64 {
    match format {
        Some(BodyFormat::Sse) => bytes.div_ceil(SSE_BYTES_PER_TOKEN),
        _ => bytes.div_ceil(BYTES_PER_TOKEN),
    }
}

/// Why metering ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The body ended normally.
    Complete,
    /// The upstream body failed mid-way.
    BodyError,
    /// The body (or the response future) was dropped before its end: the client went away.
    Dropped,
    /// The inner service returned an error instead of a response.
    ServiceError,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::BodyError => "upstream_error",
            End::Dropped => "client_disconnect",
            End::ServiceError => "service_error",
        }
    }
}

/// One debit to apply.
pub(crate) struct Settlement {
    /// Its place in the order settlements were handed over (set by [`Settler::send`]).
    seq: u64,
    counters: Arc<[Counter]>,
    /// The tokens used (actual or estimated).
    tokens: u64,
    /// In reserve mode, the reservation to correct to `tokens`.
    reservation: Option<Reserved>,
}

/// Where a metered request comes from: for logs and metrics.
pub(crate) struct Origin {
    /// The matched rules (`<rule_name>/rule_items[i]`, comma-separated).
    pub(crate) rules: Arc<str>,
    /// The request's model, when known.
    pub(crate) model: Option<Arc<str>>,
    /// The request's `token_ratelimit` span.
    pub(crate) span: tracing::Span,
}

/// A reservation taken at admission.
#[derive(Debug, Clone)]
pub(crate) struct Reserved {
    /// Each counter's window id.
    pub(crate) windows: Vec<u64>,
    /// The tokens reserved.
    pub(crate) amount: u64,
    /// Taken in the local fallback store (Redis was down), not the main one.
    pub(crate) local: bool,
    /// The prompt estimate within `amount`, and the model: for learning output allowances.
    pub(crate) prompt: u64,
    pub(crate) model: Option<Arc<str>>,
    /// The request set no output limit: its output is learned from.
    pub(crate) learns: bool,
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    /// Which settlements are applied: they finish out of order (one needing no write, or
    /// a local reservation's, before a batch being written), and a flush waits for all those
    /// handed over before it.
    applied: Mutex<Applied>,
    notify: Notify,
    /// Callers of [`Settler::flush`] waiting: the worker writes without waiting for its
    /// interval while there are any.
    flushing: AtomicUsize,
    /// Wakes a worker waiting out its interval when a flush starts.
    wake: Notify,
    /// What a worker leaves when it is dropped before its end (its runtime shut down while
    /// the layer lives on): the channel's receiving end and what it had taken from it, for the
    /// next worker.
    parked: Mutex<Option<Worker>>,
    /// A worker runs (or is being started).
    running: AtomicBool,
}

/// Starts the settlement worker with what the last one left (its channel's receiving end and
/// what it had taken from it), unless one runs: on the current tokio runtime, or on a thread
/// of its own when there is none or `own_thread`. A worker dropped with its runtime is so
/// started again by the next send or flush, or at once on a thread of its own when it leaves
/// settlements to write (see [`Worker`]'s `Drop`).
fn resume(stats: &Arc<Stats>, own_thread: bool) {
    if stats.running.load(Ordering::Acquire) {
        return;
    }
    // Taken by one caller only.
    let Some(state) = lock(&stats.parked).take() else {
        return;
    };
    stats.running.store(true, Ordering::Release);
    let worker = work(stats.clone(), state);
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if !own_thread => {
            handle.spawn(worker);
        }
        _ => {
            STARTING.set(true);
            let spawned = std::thread::Builder::new()
                .name("token-ratelimit-settle".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(worker),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the settlement runtime")
                        }
                    }
                });
            STARTING.set(false);
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the settlement thread");
            }
        }
    }
}

thread_local! {
    /// A thread for the settlement worker is being started here. A worker dropped meanwhile
    /// (the thread could not start, and the closure holding the worker was dropped with it)
    /// stays parked for the next send or flush, rather than starting another in turn, and so
    /// on without end.
    static STARTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The sending side of the settlement worker.
pub(crate) struct Settler {
    tx: mpsc::UnboundedSender<Settlement>,
    stats: Arc<Stats>,
}

impl Settler {
    /// Starts a worker on the current tokio runtime, or on a thread of its own when there is
    /// none. It ends when the `Settler` is dropped.
    /// Every debit also goes to `fallback` when there is one (failure mode `local`).
    pub(crate) fn start(store: Arc<dyn Store>, fallback: Option<MemoryStore>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        *lock(&stats.parked) = Some(Worker {
            stats: Arc::downgrade(&stats),
            store,
            fallback,
            rx,
            queued: Queued::default(),
            batch_seqs: Vec::new(),
            held_seqs: HashMap::new(),
        });
        resume(&stats, false);
        Self { tx, stats }
    }

    /// Starts the worker again if it was dropped with its runtime (see [`resume`]).
    fn resume(&self) {
        resume(&self.stats, false);
    }

    fn send(&self, mut settlement: Settlement) {
        settlement.seq = self.stats.sent.fetch_add(1, Ordering::AcqRel);
        self.resume();
        if let Err(e) = self.tx.send(settlement) {
            self.stats.done([e.0.seq]);
            tracing::error!(
                tokens = e.0.tokens,
                "token rate limit settlement worker is gone (its runtime shut down); debit lost"
            );
        }
    }

    /// Settlements handed over but not yet applied.
    pub(crate) fn pending(&self) -> u64 {
        let applied = self.stats.applied();
        let done = applied.below + applied.ahead.len() as u64;
        self.stats.sent.load(Ordering::Acquire).saturating_sub(done)
    }

    /// Waits until every settlement handed over before this call has been applied.
    pub(crate) async fn flush(&self) {
        struct Flushing<'a>(&'a Stats);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.flushing.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let target = self.stats.sent.load(Ordering::Acquire);
        self.resume();
        self.stats.flushing.fetch_add(1, Ordering::AcqRel);
        let _flushing = Flushing(&self.stats);
        self.stats.wake.notify_one();
        loop {
            let notified = self.stats.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stats.applied().below >= target {
                return;
            }
            notified.await;
            // Woken by a worker dropped with its runtime: what it left is written by the next.
            self.resume();
        }
    }
}

/// Settlements of local reservations written to the store at the same time (they pipeline
/// on one Redis connection; order does not matter, additions commute).
const MAX_IN_FLIGHT: usize = 64;
/// Most settlements taken off the queue at once.
const MAX_BATCH: usize = 4096;

/// Applied settlements by sequence number: every one below `below`, and those in `ahead`.
#[derive(Default)]
struct Applied {
    below: u64,
    ahead: BTreeSet<u64>,
}

impl Stats {
    fn applied(&self) -> MutexGuard<'_, Applied> {
        lock(&self.applied)
    }

    fn done(&self, seqs: impl IntoIterator<Item = u64>) {
        {
            let mut applied = self.applied();
            for seq in seqs {
                if seq == applied.below {
                    applied.below += 1;
                    while applied.ahead.first() == Some(&applied.below) {
                        applied.ahead.pop_first();
                        applied.below += 1;
                    }
                } else {
                    applied.ahead.insert(seq);
                }
            }
        }
        self.notify.notify_waiters();
    }
}

/// Applies settlements in the background, merged: post-debit settlements per counter,
/// reserve-mode ones per counter and window, written as one [`Store::debit_many`] and one
/// [`Store::settle_many`] at a time. Whatever arrives while they are being written goes into the
/// next ones, and a write starts no sooner than [`Store::settle_interval`] after the one before
/// (unless a flush is waiting, the queue is full or the layer is gone), so under load one write
/// carries many requests' settlements. Settlements of reservations taken in the local fallback
/// store go one by one, up to [`MAX_IN_FLIGHT`] at once.
async fn work(stats: Arc<Stats>, mut state: Worker) {
    let Worker {
        store,
        fallback,
        rx,
        queued,
        batch_seqs,
        held_seqs,
        ..
    } = &mut state;
    type Written = (Result<(), crate::StoreError>, u64);
    let report = |joined: Result<Written, tokio::task::JoinError>| match joined {
        Ok((Err(e), tokens)) => tracing::warn!(error = %e, tokens, "token settlement failed"),
        Err(e) => tracing::error!(error = %e, "token settlement task failed"),
        Ok((Ok(()), _)) => {}
    };
    let mut batch = tokio::task::JoinSet::new();
    let mut settling = tokio::task::JoinSet::new();
    let mut open = true;
    let interval = store.settle_interval();
    // The earliest start of the next merged write.
    let mut next_write = Instant::now();
    loop {
        let due = || {
            !open
                || queued.merged_seqs.len() >= MAX_BATCH
                || stats.flushing.load(Ordering::Acquire) > 0
                || Instant::now() >= next_write
        };
        if batch.is_empty() && !queued.merged_seqs.is_empty() && due() {
            // What has been sent meanwhile goes in this write too.
            queued.take_sent(rx, fallback.as_ref(), &stats);
            let debits: Vec<(Counter, u64)> = queued.merged.drain().collect();
            let settles = queued.drain_settles();
            let tokens = debits.iter().fold(0u64, |sum, d| sum.saturating_add(d.1));
            let debits = (!debits.is_empty()).then(|| store.debit_many(debits));
            let settles = (!settles.is_empty()).then(|| store.settle_many(settles));
            let write = store::in_turn([debits, settles].into_iter().flatten().collect());
            *batch_seqs = std::mem::take(&mut queued.merged_seqs);
            batch.spawn(async move { (write.await, tokens) });
            next_write = Instant::now() + interval;
        }
        // Settlements wait for the next write: nothing is received meanwhile (they queue in
        // the channel), so senders wake the worker once per write, not once each.
        let waiting = batch.is_empty() && !queued.merged_seqs.is_empty();
        while settling.len() < MAX_IN_FLIGHT
            && let Some(s) = queued.held.pop_front()
        {
            let write = start(store, fallback.as_ref(), &s);
            let seq = s.seq;
            let task = settling.spawn(async move { (write.await, s.tokens) });
            held_seqs.insert(task.id(), seq);
        }
        if !open && batch.is_empty() && settling.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(joined) = batch.join_next(), if !batch.is_empty() => {
                report(joined);
                stats.done(std::mem::take(batch_seqs));
            }
            Some(joined) = settling.join_next_with_id(), if !settling.is_empty() => {
                let id = match &joined {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                report(joined.map(|(_, written)| written));
                stats.done(held_seqs.remove(&id));
            }
            () = tokio::time::sleep_until(next_write), if waiting => {}
            () = stats.wake.notified(), if waiting => {}
            next = rx.recv(), if open && !waiting && queued.held.len() < MAX_BATCH => match next {
                Some(s) => {
                    queued.take(s, fallback.as_ref(), &stats);
                    queued.take_sent(rx, fallback.as_ref(), &stats);
                }
                None => open = false,
            },
        }
    }
}

/// A worker's state: what a worker dropped before its end (its runtime shut down) leaves for
/// the next one (see [`Settler::resume`]).
struct Worker {
    stats: Weak<Stats>,
    store: Arc<dyn Store>,
    /// Every debit also goes here (failure mode `local`).
    fallback: Option<MemoryStore>,
    rx: mpsc::UnboundedReceiver<Settlement>,
    queued: Queued,
    /// Settlements in the debit batch being written.
    batch_seqs: Vec<u64>,
    /// The sequence number of each local reservation's settlement being written, by task.
    held_seqs: HashMap<tokio::task::Id, u64>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let Some(stats) = self.stats.upgrade() else {
            return;
        };
        let next = Worker {
            stats: self.stats.clone(),
            store: self.store.clone(),
            fallback: self.fallback.clone(),
            rx: std::mem::replace(&mut self.rx, mpsc::unbounded_channel().1),
            queued: std::mem::take(&mut self.queued),
            batch_seqs: Vec::new(),
            held_seqs: HashMap::new(),
        };
        *lock(&stats.parked) = Some(next);
        stats.running.store(false, Ordering::Release);
        // The writes on their way are dropped with their tasks: the store keeps what it can of
        // them (the Redis store, as after a timeout), and they are done here, once parked (a
        // flush they wake starts the next worker).
        stats.done(
            std::mem::take(&mut self.batch_seqs)
                .into_iter()
                .chain(self.held_seqs.drain().map(|(_, seq)| seq)),
        );
        // Settlements left would wait for the next send or flush, which may never come (the
        // last request of a test, or of a quiet spell): written now on a thread of its own.
        // Looked at once parked: a send from then on finds no worker running and starts one.
        // Only when dropped by a runtime, not where a thread failed to start (see `STARTING`).
        let left = lock(&stats.parked)
            .as_ref()
            .is_some_and(|w| !w.rx.is_empty() || !w.queued.is_empty());
        if left && !STARTING.get() && tokio::runtime::Handle::try_current().is_ok() {
            resume(&stats, true);
        }
    }
}

/// Settlements received and not yet being written.
#[derive(Default)]
struct Queued {
    /// Post-debit settlements, merged: tokens per counter.
    merged: KeyMap<Counter, u64>,
    /// Reserve-mode settlements, merged per counter and window: refunds (tokens reserved and
    /// not used) and extras (used beyond the reservation) apart, since a store drops a refund
    /// to a window that has ended but moves an extra into the current one.
    settles: KeyMap<(Counter, u64), (u64, u64)>,
    /// The settlements `merged` and `settles` hold.
    merged_seqs: Vec<u64>,
    /// Settlements of reservations taken in the local fallback store (Redis was down).
    held: VecDeque<Settlement>,
}

impl Queued {
    fn is_empty(&self) -> bool {
        self.merged_seqs.is_empty() && self.held.is_empty()
    }

    /// Takes what is in the channel now, up to [`MAX_BATCH`] settlements, without waiting.
    fn take_sent(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Settlement>,
        fallback: Option<&MemoryStore>,
        stats: &Stats,
    ) {
        for _ in 0..MAX_BATCH {
            let Ok(s) = rx.try_recv() else { break };
            self.take(s, fallback, stats);
        }
    }

    /// The merged reserve-mode settlements to write: per counter and window its extra, then
    /// its refund (in that order, a refund in a running window cannot be clamped at zero
    /// before the extra it offsets is added).
    fn drain_settles(&mut self) -> Vec<(Counter, u64, i64)> {
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut out = Vec::with_capacity(self.settles.len());
        for ((counter, window), (refund, extra)) in self.settles.drain() {
            if extra > 0 {
                out.push((counter.clone(), window, signed(extra)));
            }
            if refund > 0 {
                out.push((counter, window, -signed(refund)));
            }
        }
        out
    }

    fn take(&mut self, s: Settlement, fallback: Option<&MemoryStore>, stats: &Stats) {
        if let Some(local) = fallback
            && !s.reservation.as_ref().is_some_and(|r| r.local)
        {
            local.debit_now(&s.counters, s.tokens);
        }
        if let Some(r) = &s.reservation {
            if r.local {
                self.held.push_back(s);
                return;
            }
            let delta = store::settlement_delta(r.amount, s.tokens);
            if delta == 0 {
                // The reservation was exact: nothing to correct.
                stats.done([s.seq]);
                return;
            }
            for (c, window) in s.counters.iter().zip(&r.windows) {
                let (refund, extra) = self.settles.entry((c.clone(), *window)).or_default();
                let part = if delta < 0 { refund } else { extra };
                *part = part.saturating_add(delta.unsigned_abs());
            }
            self.merged_seqs.push(s.seq);
            return;
        }
        if s.tokens == 0 {
            stats.done([s.seq]);
            return;
        }
        for c in s.counters.iter() {
            let total = self.merged.entry(c.clone()).or_default();
            *total = total.saturating_add(s.tokens);
        }
        self.merged_seqs.push(s.seq);
    }
}

/// The settlement of a reservation taken in the local fallback store (Redis was down):
/// corrected there at once; the main store learns the usage once it is back.
fn start(
    store: &Arc<dyn Store>,
    fallback: Option<&MemoryStore>,
    s: &Settlement,
) -> StoreFuture<()> {
    if let (Some(local), Some(r)) = (fallback, &s.reservation) {
        local.settle_now(&s.counters, &r.windows, r.amount, s.tokens);
    }
    store.debit(&s.counters, s.tokens)
}

/// Whether `headers` (a response's, or its trailers) end a gRPC call with an error: a
/// `grpc-status` other than 0 (OK).
fn grpc_error(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() != b"0")
}

/// Follows one admitted request to its end and settles it exactly once: with the usage the
/// response reported, or an estimate when none arrived.
pub(crate) struct Meter {
    shared: Arc<Shared>,
    cost: Cost,
    counters: Arc<[Counter]>,
    rules: Arc<str>,
    reservation: Option<Reserved>,
    /// The request's model, when known (for metrics).
    model: Option<Arc<str>>,
    span: tracing::Span,
    /// Usage from the response headers or trailers, through the extractor.
    reported: Option<Usage>,
    /// The request body's size, as declared or read by the layer; and, for a body of no
    /// declared length, the bytes read of it (by the layer, then the inner service).
    request_bytes: u64,
    sent: Option<Arc<AtomicU64>>,
    scanner: Option<UsageScanner>,
    /// Decodes a compressed body's side copy for the scanner.
    decoder: Option<Box<Decoder>>,
    format: Option<BodyFormat>,
    response_bytes: u64,
    error_status: bool,
    settled: bool,
}

impl Meter {
    pub(crate) fn new(
        shared: Arc<Shared>,
        cost: Cost,
        counters: Arc<[Counter]>,
        origin: Origin,
        reservation: Option<Reserved>,
        request_bytes: u64,
        sent: Option<Arc<AtomicU64>>,
    ) -> Self {
        let Origin { rules, model, span } = origin;
        Self {
            shared,
            cost,
            counters,
            rules,
            reservation,
            model,
            span,
            reported: None,
            request_bytes,
            sent,
            scanner: None,
            decoder: None,
            format: None,
            response_bytes: 0,
            error_status: false,
            settled: false,
        }
    }

    /// Looks at the response head: what format to scan, and whether it is an error.
    pub(crate) fn on_response(&mut self, head: &http::response::Parts) {
        self.error_status = head.status.is_client_error()
            || head.status.is_server_error()
            || grpc_error(&head.headers);
        if let Some(e) = &self.shared.extractor {
            self.reported = e.in_headers(&head.headers);
        }
        self.format = head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(BodyFormat::from_content_type);
        let Some(format) = self.format else { return };
        match Encoding::from_header(head.headers.get(CONTENT_ENCODING).map(|v| v.as_bytes())) {
            Encoding::Identity => {}
            Encoding::Decode(d) => self.decoder = Some(d),
            Encoding::Unsupported => return,
        }
        self.scanner = Some(UsageScanner::new(format));
    }

    /// Whether the response is an SSE stream the meter reads as it comes (not encoded).
    pub(crate) fn reads_plain_sse(&self) -> bool {
        self.format == Some(BodyFormat::Sse) && self.decoder.is_none() && self.scanner.is_some()
    }

    /// Reads a frame of the response. Returns whether the frame is known to hold no key a token
    /// count is read from (`false`: not known, or the body is encoded).
    pub(crate) fn on_data(&mut self, data: &[u8]) -> bool {
        let Self {
            scanner,
            decoder,
            response_bytes,
            ..
        } = self;
        let mut scan = |plain: &[u8]| {
            *response_bytes += plain.len() as u64;
            scanner.as_mut().is_some_and(|s| s.feed_checked(plain))
        };
        match decoder {
            Some(d) => {
                d.feed(data, &mut |plain| {
                    scan(plain);
                });
                false
            }
            None => scan(data),
        }
    }

    pub(crate) fn on_trailers(&mut self, trailers: &http::HeaderMap) {
        // A gRPC call refused before any message, as a trailers-only response is.
        if self.response_bytes == 0 && grpc_error(trailers) {
            self.error_status = true;
        }
        if let Some(u) = self
            .shared
            .extractor
            .as_ref()
            .and_then(|e| e.in_trailers(trailers))
        {
            self.reported = Some(u);
        }
    }

    fn estimate(&self) -> u64 {
        let sent = self.sent.as_ref().map_or(0, |s| s.load(Ordering::Relaxed));
        let prompt = prompt_estimate(self.request_bytes.max(sent));
        prompt.saturating_add(output_estimate(self.format, self.response_bytes))
    }

    /// What is charged without usage: in reserve mode the reservation stands as the estimate.
    fn fallback(&self) -> u64 {
        self.reservation
            .as_ref()
            .map_or_else(|| self.estimate(), |r| r.amount)
    }

    /// Settles, once; later calls do nothing.
    pub(crate) fn settle(&mut self, end: End) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let usage = match (&mut self.scanner, end) {
            (Some(s), End::Complete) => s.finish(),
            (Some(s), _) => s.usage(),
            (None, _) => None,
        }
        .or(self.reported);
        let provisional = self
            .scanner
            .as_ref()
            .is_some_and(UsageScanner::is_provisional);
        let (tokens, estimated) = match usage.map(|u| self.cost.tokens(&u)) {
            // Usage read before the stream was cut short may be partial, and a placeholder
            // is (Anthropic reports the output only in `message_delta`, after
            // `message_start`'s): no less than the estimate is charged, or a client would
            // stream for free by leaving early.
            Some(reported) if end != End::Complete || provisional => {
                let estimate = self.fallback();
                if estimate > reported {
                    (estimate, true)
                } else {
                    (reported, false)
                }
            }
            Some(reported) => (reported, false),
            // The provider reported no usage for a request it refused: it bills nothing.
            None if self.error_status => (0, false),
            None => (self.fallback(), true),
        };
        // Learned from reported usage only: a call refused without usage is charged nothing,
        // and would teach an allowance of nothing to every request on its rules.
        if let Some(r) = &self.reservation
            && r.learns
            && !estimated
            && usage.is_some()
        {
            // The output's cost: the charge less the reported input's. Less the prompt
            // estimate instead, a request whose bytes overstate its prompt (an inline image in
            // base64) would teach an allowance of nothing, and the next small request would
            // reserve no output at all.
            let input = match usage {
                Some(u) if u.input_tokens.is_some() => self.cost.tokens(&Usage {
                    input_tokens: u.input_tokens,
                    cached_input_tokens: u.cached_input_tokens,
                    cache_creation_input_tokens: u.cache_creation_input_tokens,
                    ..Usage::default()
                }),
                _ => r.prompt,
            };
            self.shared.allowances.record(
                &self.rules,
                r.model.as_deref(),
                tokens.saturating_sub(input),
            );
        }
        telemetry::tokens(&self.rules, self.model.as_deref(), estimated, tokens);
        tracing::debug!(
            target: "tower_token_ratelimit",
            parent: &self.span,
            rules = &*self.rules,
            tokens,
            estimated,
            end = end.as_str(),
            "token usage settled"
        );
        // In reserve mode an estimate is the reservation, which stands: nothing to correct;
        // unless it was taken in the local fallback (Redis was down), which the main store has
        // not seen and must learn.
        if estimated && self.reservation.as_ref().is_some_and(|r| !r.local) {
            return;
        }
        // The in-memory store takes the debit at once (a short lock); others get it from the
        // background task. With a local fallback, the task also mirrors it there.
        if self.shared.fallback.is_none() {
            let store = &self.shared.store;
            let done = match &self.reservation {
                None => store.try_debit_now(&self.counters, tokens),
                // An exact reservation leaves nothing to write, in any store (with a local
                // fallback, the task still mirrors it there).
                Some(r) if store::settlement_delta(r.amount, tokens) == 0 => true,
                Some(r) => store.try_settle_now(&self.counters, &r.windows, r.amount, tokens),
            };
            if done {
                return;
            }
        }
        self.shared.settler().send(Settlement {
            seq: 0,
            counters: self.counters.clone(),
            tokens,
            reservation: self.reservation.take(),
        });
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.settle(End::Dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two reservations on one counter settled in one write after their window ended: the
    /// first's refund (912 reserved and not used) is dropped, the second's extra (488 beyond
    /// its reservation) goes to the current window. Merged into one sum, −424, it was all
    /// dropped.
    #[tokio::test(start_paused = true)]
    async fn merged_settlements_keep_refunds_and_extras_apart() {
        let store = MemoryStore::new();
        let c = Counter {
            key: "k".into(),
            limit: 1_000_000,
            window: std::time::Duration::from_secs(1),
            algorithm: store::Algorithm::FixedWindow,
        };
        let counters: Arc<[Counter]> = Arc::from([c.clone()]);
        let mut queued = Queued::default();
        let stats = Stats::default();
        for (amount, tokens) in [(1000, 88), (12, 500)] {
            let r = store.reserve(&counters, amount).await.unwrap();
            queued.take(
                Settlement {
                    seq: 0,
                    counters: counters.clone(),
                    tokens,
                    reservation: Some(Reserved {
                        windows: r.windows.unwrap(),
                        amount,
                        local: false,
                        prompt: 0,
                        model: None,
                        learns: false,
                    }),
                },
                None,
                &stats,
            );
        }
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        store.settle_many(queued.drain_settles()).await.unwrap();
        assert_eq!(store.used("k"), 488, "the extra, in the current window");
    }

    /// The figures in `output_estimate`'s docs: estimate ÷ reported output over every fixture.
    #[test]
    fn estimate_accuracy_on_the_fixtures() {
        let dir = std::env::var_os("TTR_FIXTURES").map_or_else(
            || std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")),
            std::path::PathBuf::from,
        );
        let mut ratios = [Vec::new(), Vec::new()];
        let folders = std::fs::read_dir(&dir).expect("fixtures").flatten();
        for folder in folders.filter(|f| f.path().is_dir()) {
            for file in std::fs::read_dir(folder.path()).unwrap().flatten() {
                let path = file.path();
                let name = path.to_string_lossy().into_owned();
                let Some(stem) = name.strip_suffix(".expected.json") else {
                    continue;
                };
                let e: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                if e["has_usage"] != true {
                    continue;
                }
                let input = e["input_tokens"].as_u64().unwrap_or(0);
                let output = match e["total_tokens"].as_u64() {
                    Some(total) => total - input,
                    None => e["output_tokens"].as_u64().unwrap_or(0),
                };
                let (format, body) = match std::fs::read(format!("{stem}.sse")) {
                    Ok(b) => (BodyFormat::Sse, b),
                    Err(_) => (
                        BodyFormat::Json,
                        std::fs::read(format!("{stem}.json")).unwrap(),
                    ),
                };
                let est = output_estimate(Some(format), body.len() as u64);
                ratios[usize::from(format == BodyFormat::Json)]
                    .push(est as f64 / output.max(1) as f64);
            }
        }
        for (name, mut r) in ["sse", "json"].into_iter().zip(ratios) {
            r.sort_by(f64::total_cmp);
            let median = r[r.len() / 2];
            println!(
                "{name}: median {median:.2}x, min {:.2}x, max {:.2}x over {}",
                r[0],
                r[r.len() - 1],
                r.len()
            );
            assert!((0.5..=2.0).contains(&median), "{name} median {median}");
        }
    }
}

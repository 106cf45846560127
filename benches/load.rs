//! Closed-loop load on loopback: the same streaming LLM-like handler served bare and behind the
//! layer (in-memory store, Redis store), driven alternately so machine drift hits all alike.
//!
//! ```sh
//! cargo bench --bench load            # 7 rounds × (1 s bare, then 1.5 s per variant)
//! cargo bench --bench load -- --quick # 3 rounds × (0.5 s bare, 0.8 s per variant)
//! cargo bench --bench load -- --only memory  # bare and one variant (to profile one path)
//! cargo bench --bench load -- --split 16      # the stream in 16 frames that cut events
//! # instructions per request of one variant, whatever the machine's load: the difference
//! # between two request counts, under callgrind
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/deps/load-<hash> --alone memory --requests 2000
//! ```
//!
//! Prints a table (req/s, p50, p99, the median over rounds of the ratio to the bare run just
//! before the variant's, Redis commands per request) and, last, one JSON line with the same
//! figures. The order of the variants rotates every round.

#[path = "../tests/common/redis.rs"]
#[allow(dead_code)]
mod redis_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_support::RedisServer;
use tower_token_ratelimit::store::RedisStore;
use tower_token_ratelimit::{Mode, Rule, TokenRateLimitLayer};

const CONCURRENCY: usize = 32;

/// Output token counts the streams report in turn: outputs vary, as real ones do, so reserve
/// mode's estimates are off and its settlements are written (with one fixed count they become
/// exact once the output allowance has learned it, and nothing is settled).
const OUTPUT_TOKENS: [u64; 4] = [8, 30, 120, 400];

/// A recorded OpenAI-compatible stream with usage (Mistral, which reports 13 + 8 tokens), one
/// frame per event as LLM servers flush them (with `--split N`, in N equal frames that cut
/// events anywhere instead), once for each of [`OUTPUT_TOKENS`].
fn streams() -> Arc<[Arc<Vec<Bytes>>]> {
    let dir = std::env::var("TTR_FIXTURES")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures").into());
    let recorded =
        std::fs::read_to_string(format!("{dir}/mistral/mistral-text.sse")).expect("fixtures");
    let usage = r#""usage":{"prompt_tokens":13,"total_tokens":21,"completion_tokens":8}"#;
    assert!(recorded.contains(usage), "the recorded usage");
    let split: Option<usize> = std::env::args()
        .skip_while(|a| a != "--split")
        .nth(1)
        .and_then(|n| n.parse().ok());
    OUTPUT_TOKENS
        .iter()
        .map(|&output| {
            let bytes = recorded
                .replace(
                    usage,
                    &format!(
                        r#""usage":{{"prompt_tokens":13,"total_tokens":{},"completion_tokens":{output}}}"#,
                        13 + output
                    ),
                )
                .into_bytes();
            let frames = match split {
                Some(n) => bytes
                    .chunks(bytes.len().div_ceil(n.max(1)))
                    .map(Bytes::copy_from_slice)
                    .collect(),
                None => bytes
                    .split_inclusive(|&b| b == b'\n')
                    .fold(Vec::<Vec<u8>>::new(), |mut events, line| {
                        match events.last_mut() {
                            Some(e) if !e.ends_with(b"\n\n") => e.extend_from_slice(line),
                            _ => events.push(line.to_vec()),
                        }
                        events
                    })
                    .into_iter()
                    .map(Bytes::from)
                    .collect(),
            };
            Arc::new(frames)
        })
        .collect()
}

/// The LLM-like handler: reads the request (as an LLM server or a proxy in front of one
/// must), then streams the next of the streams in turn.
fn app(streams: Arc<[Arc<Vec<Bytes>>]>) -> Router {
    let turn = Arc::new(AtomicUsize::new(0));
    Router::new().route(
        "/v1/chat/completions",
        post(move |request: Bytes| {
            let frames = streams[turn.fetch_add(1, Ordering::Relaxed) % streams.len()].clone();
            async move {
                assert!(!request.is_empty());
                let s = futures_util::stream::iter(
                    (0..frames.len()).map(move |i| Ok::<_, Infallible>(frames[i].clone())),
                );
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(s))
                    .unwrap()
            }
        }),
    )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}

fn limits(store: Option<RedisStore>, mode: Mode) -> TokenRateLimitLayer {
    let b = TokenRateLimitLayer::builder().mode(mode).rule(
        Rule::per_header("x-api-key")
            .any_value()
            .tokens_per_minute(u64::MAX / 4),
    );
    match store {
        Some(s) => b.redis(s),
        None => b.memory(),
    }
    .build()
    .unwrap()
}

#[derive(Default)]
struct Sample {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time of this process (load generator, server and layer) and of Redis.
    cpu: Duration,
    redis_cpu: Duration,
}

/// CPU time this process has used (user + system; Linux, in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time the Redis server has used (`INFO cpu`).
fn redis_cpu(server: &RedisServer) -> Duration {
    let mut con = server.client();
    let info: String = deadpool_redis::redis::cmd("INFO")
        .arg("cpu")
        .query(&mut con)
        .unwrap();
    let secs: f64 = info
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "used_cpu_sys" | "used_cpu_user").then(|| v.trim().parse::<f64>().ok())?
        })
        .sum();
    Duration::from_secs_f64(secs)
}

/// `CONCURRENCY` clients, each sending requests back to back for `duration`, with API keys
/// drawn in turn from `keys` distinct values. Every request also carries `x-k0`..`x-k9` (for
/// the 10-rule variant).
async fn drive(addr: SocketAddr, duration: Duration, keys: usize) -> Sample {
    drive_until(addr, Limit::Time(duration), keys).await
}

#[derive(Clone, Copy)]
enum Limit {
    Time(Duration),
    /// Requests per client.
    Count(usize),
}

async fn drive_until(addr: SocketAddr, limit: Limit, keys: usize) -> Sample {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let start = Instant::now();
    let (deadline, per_client) = match limit {
        Limit::Time(d) => (start + d, usize::MAX),
        Limit::Count(n) => (start + Duration::from_secs(3600), n),
    };
    let mut tasks = Vec::new();
    for c in 0..CONCURRENCY {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = c;
            while Instant::now() < deadline && lat.len() < per_client {
                let t = Instant::now();
                let key = format!("sk-{}", n % keys);
                n += CONCURRENCY;
                let mut req = Request::post(format!("http://{addr}/v1/chat/completions"))
                    .header("x-api-key", &key);
                for k in 0..10 {
                    req = req.header(format!("x-k{k}"), "v");
                }
                let req = req
                    .body(Full::new(Bytes::from_static(
                        b"{\"model\":\"m\",\"stream\":true}",
                    )))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                assert!(resp.status().is_success());
                resp.into_body().collect().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut sample = Sample::default();
    for t in tasks {
        sample.latencies.extend(t.await.unwrap());
    }
    sample.elapsed = start.elapsed();
    sample.requests = sample.latencies.len() as u64;
    sample
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs this bench binary again with `flag` and parses the number it prints.
fn in_fresh_process(flag: &str) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg(flag)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--bytes-per-key") {
        println!("{}", memory_bytes_per_key().await);
        return;
    }
    if std::env::args().any(|a| a == "--flood") {
        println!("{}", memory_flood().await.0);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    // Each variant runs right after a run of bare (`bare_duration`), and its ratio in a round
    // is to that run: machine drift between the two is at most a second or two.
    let (rounds, duration, bare_duration) = if quick {
        (3, Duration::from_millis(800), Duration::from_millis(500))
    } else {
        (7, Duration::from_millis(1500), Duration::from_secs(1))
    };
    let streams = streams();
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();

    let redis_store = || {
        RedisStore::builder()
            .url(redis.url())
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap()
    };
    let mut variants: Vec<(&str, SocketAddr, Option<TokenRateLimitLayer>, usize)> =
        vec![("bare", serve(app(streams.clone())).await, None, 8)];
    // The peer: a request-count limiter (tower_governor, in memory) that never rejects here.
    let governor = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .unwrap();
    let addr =
        serve(app(streams.clone()).layer(tower_governor::GovernorLayer::new(governor))).await;
    variants.push(("governor", addr, None, 8));
    let ten_rules = (0..10)
        .fold(TokenRateLimitLayer::builder(), |b, k| {
            b.rule(
                Rule::per_header(format!("x-k{k}"))
                    .any_value()
                    .tokens_per_minute(u64::MAX / 4),
            )
        })
        .build()
        .unwrap();
    let addr = serve(app(streams.clone()).layer(ten_rules.clone())).await;
    variants.push(("memory_10_rules", addr, Some(ten_rules), 8));
    // Without asking the upstream for usage (no request body read, no stream filtering).
    let plain = TokenRateLimitLayer::builder()
        .inject_include_usage(false)
        .rule(
            Rule::per_header("x-api-key")
                .any_value()
                .tokens_per_minute(u64::MAX / 4),
        )
        .build()
        .unwrap();
    let addr = serve(app(streams.clone()).layer(plain.clone())).await;
    variants.push(("memory_no_inject", addr, Some(plain), 8));
    let many = limits(None, Mode::PostDebit);
    let addr = serve(app(streams.clone()).layer(many.clone())).await;
    variants.push(("memory_100k_keys", addr, Some(many), 100_000));
    for (name, layer) in [
        ("memory", limits(None, Mode::PostDebit)),
        ("memory_reserve", limits(None, Mode::Reserve)),
        ("redis", limits(Some(redis_store()), Mode::PostDebit)),
        ("reserve", limits(Some(redis_store()), Mode::Reserve)),
    ] {
        let addr = serve(app(streams.clone()).layer(layer.clone())).await;
        variants.push((name, addr, Some(layer), 8));
    }

    // `--only NAME` keeps bare and one variant (for profiling one path).
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    if let Some(only) = &only {
        variants.retain(|(name, ..)| *name == "bare" || *name == only);
    }
    // `--alone NAME --requests N`: N requests to that variant only, then exit (to count its
    // instructions per request under `valgrind --tool=callgrind`, whatever the machine's load).
    if let Some(alone) = std::env::args().skip_while(|a| a != "--alone").nth(1) {
        let n: usize = std::env::args()
            .skip_while(|a| a != "--requests")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        let (_, addr, layer, keys) = variants
            .iter()
            .find(|v| v.0 == alone)
            .expect("no such variant");
        let s = drive_until(*addr, Limit::Count(n.div_ceil(CONCURRENCY)), *keys).await;
        if let Some(l) = layer {
            l.flush().await;
        }
        println!("{alone}: {} requests", s.requests);
        return;
    }
    // Warm-up.
    for (_, addr, _, keys) in &variants {
        drive(*addr, Duration::from_millis(300), *keys).await;
    }
    let mut samples: Vec<Sample> = variants.iter().map(|_| Sample::default()).collect();
    // Redis commands and requests, per variant.
    let mut redis_cmds = vec![(0, 0); variants.len()];
    // Per variant, its ratio to the bare run just before it, one per round; the order of the
    // variants rotates every round.
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let n = variants.len();
    for round in 0..rounds {
        for i in (1..n).map(|k| 1 + (k - 1 + round) % (n - 1)) {
            let mut rps = [0.0; 2];
            for (j, v, d) in [(0, 0, bare_duration), (1, i, duration)] {
                let (name, addr, layer, keys) = &variants[v];
                let before = matches!(*name, "redis" | "reserve")
                    .then(|| redis_support::client_commands(&redis).1);
                let (cpu, rcpu) = (process_cpu(), redis_cpu(&redis));
                let mut s = drive(*addr, d, *keys).await;
                if let Some(l) = layer {
                    l.flush().await;
                }
                s.cpu = process_cpu().saturating_sub(cpu);
                s.redis_cpu = redis_cpu(&redis).saturating_sub(rcpu);
                if let Some(b) = before {
                    redis_cmds[v].0 += redis_support::client_commands(&redis).1 - b;
                    redis_cmds[v].1 += s.requests;
                }
                rps[j] = s.requests as f64 / s.elapsed.as_secs_f64();
                let acc = &mut samples[v];
                acc.requests += s.requests;
                acc.elapsed += s.elapsed;
                acc.latencies.extend(s.latencies);
                acc.cpu += s.cpu;
                acc.redis_cpu += s.redis_cpu;
            }
            ratios[i].push(rps[1] / rps[0]);
        }
    }

    println!(
        "\n{:<16} {:>9} {:>9} {:>9} {:>14} {:>13} {:>11}",
        "variant", "req/s", "p50", "p99", "median ratio", "cpu µs/req", "redis µs/req"
    );
    // Ratio to bare: the median over rounds of (variant / the bare run just before it).
    let median_ratio = |i: usize| {
        if i == 0 {
            return 1.0;
        }
        let mut r = ratios[i].clone();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let mut json = serde_json::Map::new();
    for (i, ((name, _, _, _), s)) in variants.iter().zip(samples.iter_mut()).enumerate() {
        s.latencies.sort();
        let rps = s.requests as f64 / s.elapsed.as_secs_f64();
        let (p50, p99) = (
            percentile(&s.latencies, 0.5),
            percentile(&s.latencies, 0.99),
        );
        let per_req = |d: Duration| d.as_secs_f64() * 1e6 / s.requests.max(1) as f64;
        println!(
            "{name:<16} {rps:>9.0} {:>7.2}ms {:>7.2}ms {:>14.3} {:>13.1} {:>12.1}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            median_ratio(i),
            per_req(s.cpu),
            per_req(s.redis_cpu),
        );
        json.insert(
            format!("{name}_cpu_us_per_req"),
            ((per_req(s.cpu) * 10.0).round() / 10.0).into(),
        );
        json.insert(format!("{name}_rps"), rps.round().into());
        json.insert(
            format!("{name}_p50_ms"),
            ((p50.as_secs_f64() * 1e5).round() / 100.0).into(),
        );
        json.insert(
            format!("{name}_p99_ms"),
            ((p99.as_secs_f64() * 1e5).round() / 100.0).into(),
        );
        if *name != "bare" {
            json.insert(
                format!("{name}_ratio"),
                ((median_ratio(i) * 1000.0).round() / 1000.0).into(),
            );
        }
    }
    for (i, (name, ..)) in variants.iter().enumerate() {
        let (cmds, reqs) = redis_cmds[i];
        if reqs == 0 {
            continue;
        }
        let per_req = cmds as f64 / reqs as f64;
        println!("redis commands per request, {name}: {per_req:.3}");
        let field = if *name == "redis" {
            "redis_cmds_per_req".into()
        } else {
            format!("{name}_cmds_per_req")
        };
        json.insert(field, ((per_req * 1000.0).round() / 1000.0).into());
    }
    // Scaling: per round, one variant's ratio over the other's, the median over rounds.
    let index = |name: &str| variants.iter().position(|v| v.0 == name);
    for (field, label, many, one) in [
        (
            "keys_scaling",
            "100,000 distinct keys / 8 keys",
            "memory_100k_keys",
            "memory",
        ),
        (
            "rules_scaling",
            "10 matching rule items / 1",
            "memory_10_rules",
            "memory",
        ),
    ] {
        let (Some(many), Some(one)) = (index(many), index(one)) else {
            continue;
        };
        let mut r: Vec<f64> = ratios[many]
            .iter()
            .zip(&ratios[one])
            .map(|(m, o)| m / o)
            .collect();
        r.sort_by(f64::total_cmp);
        let median = r[r.len() / 2];
        println!("scaling, {label}: {median:.3} (median over rounds)");
        json.insert(field.into(), ((median * 1000.0).round() / 1000.0).into());
    }
    json.insert("concurrency".into(), CONCURRENCY.into());
    if only.is_some() {
        println!("{}", serde_json::Value::Object(json));
        return;
    }
    // Memory figures in fresh processes, so freed memory from one cannot hide the next.
    let per_key: f64 = in_fresh_process("--bytes-per-key");
    println!("memory store: {per_key:.0} bytes per key at 1,000,000 keys (resident set growth)");
    json.insert("memory_bytes_per_key".into(), per_key.round().into());
    let flood_mb: f64 = in_fresh_process("--flood");
    println!(
        "memory store, default cap (1,000,000), 3,000,000 unique keys: peak resident set growth {flood_mb:.0} MB"
    );
    json.insert("flood_peak_rss_mb".into(), flood_mb.round().into());
    println!("{}", serde_json::Value::Object(json));
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Resident set growth per counter when 1,000,000 counters with realistic keys are live.
async fn memory_bytes_per_key() -> f64 {
    use tower_token_ratelimit::store::{Algorithm, Counter, MemoryStore, Store};
    let store = MemoryStore::with_max_counters(2_000_000);
    let before = rss_bytes();
    for i in 0..1_000_000u32 {
        let c = Counter {
            key: format!(
                "higress-token-ratelimit:{{default}}:limit_by_per_header:60:x-api-key:sk-{i:08}"
            )
            .into(),
            limit: 1_000,
            window: Duration::from_secs(600),
            algorithm: Algorithm::FixedWindow,
        };
        store.debit(std::slice::from_ref(&c), 1).await.unwrap();
    }
    let grown = rss_bytes().saturating_sub(before);
    assert_eq!(store.len(), 1_000_000);
    grown as f64 / 1e6
}

/// A flood of 3,000,000 unique keys into a store with the default cap (1,000,000 counters):
/// the resident set growth in MB, and the counters left.
async fn memory_flood() -> (f64, usize) {
    use tower_token_ratelimit::store::{Algorithm, Counter, MemoryStore, Store};
    let store = MemoryStore::new();
    let before = rss_bytes();
    let mut peak = before;
    for i in 0..3_000_000u32 {
        let c = Counter {
            key: format!(
                "higress-token-ratelimit:{{default}}:limit_by_per_ip:60:from-remote-addr:f{i:08}"
            )
            .into(),
            limit: 1_000,
            window: Duration::from_secs(60),
            algorithm: Algorithm::FixedWindow,
        };
        store.debit(std::slice::from_ref(&c), 1).await.unwrap();
        if i % 100_000 == 0 {
            peak = peak.max(rss_bytes());
        }
    }
    peak = peak.max(rss_bytes());
    (peak.saturating_sub(before) as f64 / 1e6, store.len())
}

//! The `gateway` example as a real process, between a real HTTP client and a real upstream on
//! 127.0.0.1: streams pass through byte for byte and unbuffered, budgets reject, bad configs
//! and arguments stop it, a dead upstream is a 502, SIGTERM lets streams finish.

mod common;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use common::{Reply, client, fixtures, send, serve};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Notify, oneshot};
use tokio::time::timeout;
use tower_token_ratelimit::{TokenRateLimitConfig, TokenRateLimitLayer};

const CHAT: &str = "/v1/chat/completions";
const REQUEST: &str = r#"{"model":"gpt-4.1-nano","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me a story"}]}"#;
/// Usage reported by the fixture: 16 prompt + 300 completion.
const FIXTURE_TOKENS: u64 = 316;
/// Bytes the upstream sends before it waits (when asked to hold).
const FIRST_CHUNK: usize = 1000;

fn fixture() -> Bytes {
    let path = fixtures().join("openai-chat/openai-text.sse");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()));
    Bytes::from(bytes)
}

fn gateway_bin() -> PathBuf {
    common::example_bin("gateway")
}

/// A gateway process; killed when dropped. Its stderr is collected for failure messages.
struct Gateway {
    child: Child,
    listening: Option<oneshot::Receiver<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
        let mut command = Command::new(gateway_bin());
        // `--log` is the level unless RUST_LOG is set: set it only when the test does not.
        if args.iter().any(|a| a == "--log") {
            command.env_remove("RUST_LOG");
        } else {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway");
        let stdout = child.stdout.take().unwrap();
        let (tx, listening) = oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            listening: Some(listening),
            stderr,
        }
    }

    /// Starts a gateway on 127.0.0.1:0 and waits until it is listening.
    async fn start(upstream: &str, config: &Path) -> (Self, SocketAddr) {
        Self::start_with(upstream, config, &[]).await
    }

    /// Like `start`, with more arguments.
    async fn start_with(upstream: &str, config: &Path, extra: &[&str]) -> (Self, SocketAddr) {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--upstream".as_ref(),
            upstream.as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let mut gw = Self::spawn(args);
        let rx = gw.listening.take().unwrap();
        let addr = match timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(addr)) => addr.parse().expect("a socket address"),
            _ => panic!(
                "the gateway did not print `listening on` within 10 s; stderr:\n{}",
                gw.stderr()
            ),
        };
        (gw, addr)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the process to exit on its own.
    async fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the rest of stderr.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within {within:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file in the test scratch directory.
fn config_file(name: &str, yaml: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gateway-{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn per_user_config(tokens_per_minute: u64) -> String {
    format!(
        "rule_name: gateway-test\n\
         rule_items:\n\
         - limit_by_per_header: x-user\n  \
           limit_keys:\n  \
           - key: \"*\"\n    \
             token_per_minute: {tokens_per_minute}\n"
    )
}

/// What the upstream saw of one request.
#[derive(Debug)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
}

/// An OpenAI-compatible upstream streaming the fixture in several chunks. With `hold`, it
/// sends the first `FIRST_CHUNK` bytes, then waits (at most 10 s) for `hold` before the rest.
#[derive(Clone)]
struct Llm {
    sse: Bytes,
    hold: Option<Arc<Notify>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Llm {
    async fn start(hold: Option<Arc<Notify>>) -> (Self, SocketAddr) {
        let llm = Self {
            sse: fixture(),
            hold,
            seen: Arc::default(),
        };
        let app = Router::new()
            .route(CHAT, post(chat))
            .with_state(llm.clone());
        (llm, serve(app).await)
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn chat(State(llm): State<Llm>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    llm.seen.lock().unwrap().push(Seen { headers, body });
    let sse = llm.sse;
    let step = (sse.len() - FIRST_CHUNK).div_ceil(7);
    let mut chunks = vec![sse.slice(..FIRST_CHUNK)];
    chunks.extend(
        (FIRST_CHUNK..sse.len())
            .step_by(step)
            .map(|at| sse.slice(at..(at + step).min(sse.len()))),
    );
    let hold = llm.hold;
    let stream = futures_util::stream::unfold(0, move |i| {
        let (chunk, hold) = (chunks.get(i).cloned(), hold.clone());
        async move {
            if i == 1
                && let Some(hold) = hold
            {
                let _ = timeout(Duration::from_secs(10), hold.notified()).await;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Some((Ok::<_, Infallible>(chunk?), i + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn chat_request(gateway: SocketAddr, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req =
        Request::post(format!("http://{gateway}{CHAT}")).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from_static(REQUEST.as_bytes())))
        .unwrap()
}

/// Reads body frames until `n` bytes have come (or the body ends).
async fn read_at_least(body: &mut hyper::body::Incoming, n: usize, into: &mut Vec<u8>) {
    while into.len() < n {
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame.expect("response body error").into_data() {
                    into.extend_from_slice(&data);
                }
            }
            None => break,
        }
    }
}

#[test]
fn example_limits_yaml_is_a_valid_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/limits.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let config: TokenRateLimitConfig = serde_yaml::from_str(&text).unwrap();
    assert_eq!(config.rule_name, "llm-gateway");
    assert_eq!(config.rule_items.len(), 2);
    assert_eq!(
        config.rule_items[0].limit_keys[0].token_per_day,
        Some(2_000_000)
    );
    if let Err(e) = TokenRateLimitLayer::from_config(config) {
        panic!("examples/limits.yaml does not validate:\n{e}");
    }
}

#[tokio::test]
async fn streams_pass_through_byte_identical_and_unbuffered() {
    let release = Arc::new(Notify::new());
    let (llm, upstream) = Llm::start(Some(release.clone())).await;
    let config = config_file("stream", &per_user_config(1_000_000));
    let (_gw, addr) = Gateway::start(&format!("http://{upstream}"), &config).await;

    let req = chat_request(
        addr,
        &[
            ("x-user", "alice"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
        ],
    );
    let mut received = Vec::new();
    let (head, mut body) = timeout(Duration::from_secs(5), async {
        let response = client()
            .request(req)
            .await
            .expect("request through the gateway");
        let (head, mut body) = response.into_parts();
        read_at_least(&mut body, FIRST_CHUNK, &mut received).await;
        (head, body)
    })
    .await
    .expect("the first chunk did not come through while the upstream held the rest: buffered");
    let sse = fixture();
    assert_eq!(received, sse[..FIRST_CHUNK], "the first chunk, as sent");

    release.notify_one();
    timeout(
        Duration::from_secs(10),
        read_at_least(&mut body, usize::MAX, &mut received),
    )
    .await
    .expect("the rest of the stream within 10 s");

    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["content-type"], "text/event-stream");
    assert_eq!(head.headers["cache-control"], "no-cache");
    assert_eq!(
        head.headers["x-ratelimit-limit-tokens"], "1000000",
        "the layer is on"
    );
    assert_eq!(received.len(), sse.len());
    assert!(received == sse, "the body is the fixture, byte for byte");

    let seen = llm.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, REQUEST.as_bytes(), "request body unchanged");
    let header = |name| seen[0].headers.get(name).map(|v| v.to_str().unwrap());
    assert_eq!(header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header("host"), Some(upstream.to_string().as_str()));
    assert_eq!(header("x-user"), Some("alice"));
    assert!(
        !seen[0].headers.contains_key("x-hop"),
        "headers named in Connection are hop-by-hop"
    );
}

#[tokio::test]
async fn spent_budget_is_rejected_with_429_and_other_keys_pass() {
    let (llm, upstream) = Llm::start(None).await;
    // The fixture costs 316 tokens: one request fits in 400, the second finds 316 used...
    // once the first has been debited, which happens in the background after its body ends.
    let config = config_file("reject", &per_user_config(400));
    let (_gw, addr) = Gateway::start(&format!("http://{upstream}"), &config).await;
    let bob = [("x-user", "bob")];

    let first = send(addr, CHAT, &bob, REQUEST).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, fixture());
    let deadline = Instant::now() + Duration::from_secs(2);
    let rejected: Reply = loop {
        let r = send(addr, CHAT, &bob, REQUEST).await;
        match r.status {
            StatusCode::TOO_MANY_REQUESTS => break r,
            StatusCode::OK if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            status => panic!("expected 429 after {FIXTURE_TOKENS} of 400 tokens, got {status}"),
        }
    };
    assert_eq!(rejected.header("content-type"), Some("application/json"));
    assert_eq!(rejected.json()["error"]["type"], "rate_limit_exceeded");
    let retry: u64 = rejected.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let admitted = llm.requests();

    let carol = send(addr, CHAT, &[("x-user", "carol")], REQUEST).await;
    assert_eq!(carol.status, StatusCode::OK);
    assert_eq!(carol.body, fixture());
    assert_eq!(
        llm.requests(),
        admitted + 1,
        "a rejected request never reaches the upstream"
    );
}

#[tokio::test]
async fn invalid_configs_exit_1_naming_every_problem() {
    let bad = config_file(
        "invalid",
        "rule_name: bad\n\
         rule_items:\n\
         - limit_by_per_header: x-user\n  \
           colour: blue\n  \
           limit_keys:\n  \
           - key: \"*\"\n    \
             token_per_minute: 0\n",
    );
    let syntax = config_file(
        "syntax",
        "rule_name: bad\nrule_items: [ {limit_by_per_header: \n",
    );
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gateway-no-such-file.yaml");

    for (config, expected) in [
        (
            &bad,
            &[
                "rule_items[0].limit_keys[0].token_per_minute",
                "rule_items[0].colour",
            ][..],
        ),
        (&syntax, &["line 3"][..]),
        (&missing, &["cannot read"][..]),
    ] {
        let mut gw = Gateway::spawn(
            [
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:9",
                "--config",
            ]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([config.as_os_str()]),
        );
        let status = gw.exit(Duration::from_secs(5)).await;
        let stderr = gw.stderr();
        assert_eq!(
            status.code(),
            Some(1),
            "{}: stderr:\n{stderr}",
            config.display()
        );
        for text in expected {
            assert!(stderr.contains(text), "stderr lacks `{text}`:\n{stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn bad_arguments_exit_2_with_usage() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/limits.yaml");
    for args in [
        &[][..],
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ][..],
        &[
            "--listen",
            "nowhere",
            "--upstream",
            "http://127.0.0.1:9",
            "--config",
            config,
        ][..],
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "ftp://x",
            "--config",
            config,
        ][..],
        // Credentials in the upstream URL would go out as the Host header.
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://user:pw@127.0.0.1:9",
            "--config",
            config,
        ][..],
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--config",
        ][..],
        &["--verbose"][..],
    ] {
        let mut gw = Gateway::spawn(args);
        let status = gw.exit(Duration::from_secs(5)).await;
        let stderr = gw.stderr();
        assert_eq!(status.code(), Some(2), "{args:?}: stderr:\n{stderr}");
        assert!(stderr.contains("usage: gateway"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_json_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = closed.local_addr().unwrap();
    drop(closed);
    let config = config_file("down", &per_user_config(1_000_000));
    let (_gw, addr) = Gateway::start(&format!("http://{upstream}"), &config).await;

    let r = send(addr, CHAT, &[("x-user", "dave")], REQUEST).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let error = &r.json()["error"];
    assert_eq!(error["type"], "upstream_error");
    assert!(error["message"].is_string());
}

/// `OPTIONS *` names no path to forward: a 400, not a 502 blaming a healthy upstream.
#[tokio::test]
async fn an_asterisk_request_target_is_a_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (_llm, upstream) = Llm::start(None).await;
    let config = config_file("asterisk", &per_user_config(1_000_000));
    let (_gw, addr) = Gateway::start(&format!("http://{upstream}"), &config).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"OPTIONS * HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_lets_streams_finish_then_exits_0() {
    // With Redis, so the in-flight stream's debit can be checked after the process is gone.
    let redis = common::redis::RedisServer::start();
    let release = Arc::new(Notify::new());
    let (_llm, upstream) = Llm::start(Some(release.clone())).await;
    let config = config_file("sigterm", &per_user_config(1_000_000));
    let (mut gw, addr) = Gateway::start_with(
        &format!("http://{upstream}"),
        &config,
        &["--redis", &redis.url()],
    )
    .await;

    let req = chat_request(addr, &[("x-user", "erin")]);
    let mut received = Vec::new();
    let mut body = timeout(Duration::from_secs(5), async {
        let mut body = client().request(req).await.unwrap().into_body();
        read_at_least(&mut body, FIRST_CHUNK, &mut received).await;
        body
    })
    .await
    .expect("the first chunk within 5 s");

    let pid = gw.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the gateway exited with a stream in flight"
    );

    release.notify_one();
    timeout(
        Duration::from_secs(10),
        read_at_least(&mut body, usize::MAX, &mut received),
    )
    .await
    .expect("the rest of the stream within 10 s");
    assert!(received == fixture(), "the stream in flight completes");
    let status = gw.exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}; stderr:\n{}", gw.stderr());
    assert!(gw.stderr().contains("debits written"), "{}", gw.stderr());
    let used: Option<u64> = deadpool_redis::redis::Commands::get(
        &mut redis.client(),
        "higress-token-ratelimit:{gateway-test}:limit_by_per_header:60:x-user:erin",
    )
    .unwrap();
    assert_eq!(
        used,
        Some(FIXTURE_TOKENS),
        "the in-flight stream's debit was written"
    );
}

/// A client that sends half a request head and stops gets its connection closed after
/// `--head-timeout`, also while the gateway shuts down (which then exits, not waits for ever);
/// and the debug log names the path forwarded, never its query (Gemini's `?key=`).
#[tokio::test]
async fn half_sent_heads_time_out_and_queries_stay_out_of_the_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_llm, upstream) = Llm::start(None).await;
    let config = config_file("head-timeout", &per_user_config(1_000_000));
    let (mut gw, addr) = Gateway::start_with(
        &format!("http://{upstream}"),
        &config,
        &["--head-timeout", "1", "--log", "debug"],
    )
    .await;
    let r = send(
        addr,
        "/v1/chat/completions?key=AIzaSECRET",
        &[("x-user", "q")],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let start = Instant::now();
    while !gw.stderr().contains("forwarding") && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stderr = gw.stderr();
    assert!(stderr.contains("forwarding"), "{stderr}");
    assert!(!stderr.contains("AIzaSECRET"), "{stderr}");

    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Closed by the gateway after the head timeout (with or without a 408 first).
    let mut rest = Vec::new();
    timeout(Duration::from_secs(5), half.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s")
        .ok();
    let mut again = tokio::net::TcpStream::connect(addr).await.unwrap();
    again
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .await
        .unwrap();
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = gw.exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}; stderr:\n{}", gw.stderr());
}

#[tokio::test]
async fn two_gateways_with_redis_share_one_budget() {
    let redis = common::redis::RedisServer::start();
    let (_llm, upstream) = Llm::start(None).await;
    let config = config_file("redis", &per_user_config(700));
    let upstream = format!("http://{upstream}");
    let url = redis.url();
    let (_g1, a1) = Gateway::start_with(&upstream, &config, &["--redis", &url]).await;
    let (_g2, a2) = Gateway::start_with(&upstream, &config, &["--redis", &url]).await;
    let dave = [("x-user", "dave")];
    let mut con = redis.client();
    let key = "higress-token-ratelimit:{gateway-test}:limit_by_per_header:60:x-user:dave";
    // 316 tokens a request against 700, alternating gateways: 0, 316 and 632 used are below the
    // budget, 948 is not. Debits are written when each stream ends: wait for each in Redis.
    for (n, addr) in [a1, a2, a1].into_iter().enumerate() {
        assert_eq!(
            send(addr, CHAT, &dave, REQUEST).await.status,
            StatusCode::OK,
            "#{n}"
        );
        let want = (n as u64 + 1) * FIXTURE_TOKENS;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let used: Option<u64> = deadpool_redis::redis::Commands::get(&mut con, key).unwrap();
            if used == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Redis holds {used:?}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        send(a2, CHAT, &dave, REQUEST).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(a1, CHAT, &dave, REQUEST).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_limits_and_keeps_the_counters() {
    let (_llm, upstream) = Llm::start(None).await;
    let config = config_file("reload", &per_user_config(100));
    let (gw, addr) = Gateway::start(&format!("http://{upstream}"), &config).await;
    let erin = [("x-user", "erin")];
    assert_eq!(
        send(addr, CHAT, &erin, REQUEST).await.status,
        StatusCode::OK
    );
    // 316 of 100 tokens used once the debit lands.
    let deadline = Instant::now() + Duration::from_secs(5);
    while send(addr, CHAT, &erin, REQUEST).await.status != StatusCode::TOO_MANY_REQUESTS {
        assert!(Instant::now() < deadline, "never rejected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&config, per_user_config(10_000)).unwrap();
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let admitted = loop {
        let r = send(addr, CHAT, &erin, REQUEST).await;
        if r.status == StatusCode::OK {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the new limits never applied:\n{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(admitted.header("x-ratelimit-limit-tokens"), Some("10000"));
    let remaining: u64 = admitted
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining <= 10_000 - FIXTURE_TOKENS,
        "counters kept ({remaining} left)"
    );
    // A broken file is logged and the running limits stay.
    std::fs::write(&config, "rule_name: [").unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.stderr().contains("reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload error logged:\n{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        send(addr, CHAT, &erin, REQUEST).await.status,
        StatusCode::OK
    );
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_and_health_endpoints() {
    let (_llm, upstream) = Llm::start(None).await;
    let config = config_file("metrics", &per_user_config(400));
    let (_gw, addr) = Gateway::start(&format!("http://{upstream}"), &config).await;
    let get = |path: &'static str| async move {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    assert_eq!(get("/healthz").await, (StatusCode::OK, "ok".into()));

    let fay = [("x-user", "fay")];
    assert_eq!(send(addr, CHAT, &fay, REQUEST).await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while send(addr, CHAT, &fay, REQUEST).await.status != StatusCode::TOO_MANY_REQUESTS {
        assert!(Instant::now() < deadline, "never rejected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, text) = get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let value = |needle: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let rule = r#"rule="gateway-test/rule_items[0]""#;
    assert_eq!(
        value(&format!(
            r#"token_ratelimit_requests_total{{{rule},decision="rejected"}}"#
        )),
        1.0
    );
    assert!(
        value(&format!(
            r#"token_ratelimit_requests_total{{{rule},decision="allowed"}}"#
        )) >= 1.0
    );
    // The admitted requests each reported 316 tokens.
    let admitted = value(&format!(
        r#"token_ratelimit_requests_total{{{rule},decision="allowed"}}"#
    ));
    let tokens = value(&format!(
        r#"token_ratelimit_tokens_total{{{rule},model="unknown",estimated="false"}}"#
    ));
    assert_eq!(tokens, admitted * FIXTURE_TOKENS as f64);
    assert!(!text.contains("fay"), "no key value in metrics");
}

#[tokio::test]
async fn h2c_upstreams_and_the_response_timeout() {
    // An upstream that answers with the HTTP version it was spoken to in (it serves HTTP/1.1
    // and HTTP/2 with prior knowledge, i.e. h2c).
    let echo = serve(Router::new().route(
        CHAT,
        post(|req: Request<Body>| async move { format!("{:?}", req.version()) }),
    ))
    .await;
    let config = config_file("h2c", &per_user_config(1_000_000));
    let (_h2, addr) = Gateway::start_with(&format!("http://{echo}"), &config, &["--h2c"]).await;
    let r = send(addr, CHAT, &[("x-user", "h2")], REQUEST).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"HTTP/2.0"[..]));
    let (_h1, addr) = Gateway::start(&format!("http://{echo}"), &config).await;
    let r = send(addr, CHAT, &[("x-user", "h1")], REQUEST).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"HTTP/1.1"[..]));

    // An upstream that takes 5 s to answer, behind `--timeout 1`: a 504 with a JSON error.
    let slow = serve(Router::new().route(
        CHAT,
        post(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    ))
    .await;
    let (_gw, addr) =
        Gateway::start_with(&format!("http://{slow}"), &config, &["--timeout", "1"]).await;
    let t = Instant::now();
    let r = send(addr, CHAT, &[("x-user", "slow")], REQUEST).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"]["type"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

//! The layer end to end, on the in-memory store, through a real HTTP server and client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use common::{mock_chat, send, serve, serve_chat};
use tower::ServiceExt;
use tower_token_ratelimit::store::{Counter, CounterStatus, MemoryStore, Store, StoreFuture};
use tower_token_ratelimit::{Consumer, Rule, TokenRateLimitConfig, TokenRateLimitLayer};

const CHAT: &str = "/v1/chat/completions";
const STREAM: &str = r#"{"model":"m","stream":true,"messages":[]}"#;

fn key(kind_window_name_value: &str) -> String {
    format!("higress-token-ratelimit:{{default}}:{kind_window_name_value}")
}

/// A per-user limit: every value of `x-user` gets `tokens_per_minute`.
fn per_user(tokens_per_minute: u64) -> Rule {
    Rule::per_header("x-user")
        .any_value()
        .tokens_per_minute(tokens_per_minute)
}

fn layer(store: &MemoryStore, rules: Vec<Rule>) -> TokenRateLimitLayer {
    rules
        .into_iter()
        .fold(
            TokenRateLimitLayer::builder().store(store.clone()),
            |b, r| b.rule(r),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn budget_admits_while_used_below_limit_then_rejects_with_headers() {
    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(250)]);
    let addr = serve_chat(limits.clone()).await;
    let alice = [("x-user", "alice"), ("x-mock-tokens", "100")];

    for remaining in ["250", "150", "50"] {
        let r = send(addr, CHAT, &alice, STREAM).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("250"));
        assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some(remaining));
        assert!(r.header("x-ratelimit-reset-tokens").unwrap().ends_with('s'));
        limits.flush().await;
    }
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:alice")), 300);

    let r = send(addr, CHAT, &alice, STREAM).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(
        r.header("x-tokenratelimit-reset"),
        Some(retry.to_string().as_str())
    );
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("250"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert!(r.header("x-ratelimit-reset-tokens").is_some());
    let body = r.json();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_per_header:60:x-user:alice")),
        300,
        "a rejected request costs nothing"
    );

    // Other keys are unaffected.
    let r = send(addr, CHAT, &[("x-user", "bob")], STREAM).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("250"));
}

#[tokio::test]
async fn rejects_when_used_equals_limit() {
    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(200)]);
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "100")];
    for _ in 0..2 {
        assert_eq!(send(addr, CHAT, &h, "{}").await.status, StatusCode::OK);
        limits.flush().await;
    }
    // used == limit: Higress lets one more through; we do not.
    assert_eq!(
        send(addr, CHAT, &h, "{}").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn window_expiry_restores_the_budget() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![Rule::per_header("x-user").any_value().tokens_per_second(50)],
    );
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u"), ("x-mock-tokens", "60")];
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("1"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
}

#[tokio::test]
async fn json_responses_are_metered_too() {
    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(1000)]);
    let addr = serve_chat(limits.clone()).await;
    let r = send(
        addr,
        CHAT,
        &[("x-user", "j"), ("x-mock-tokens", "37")],
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["usage"]["total_tokens"], 37, "body passes through");
    limits.flush().await;
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:j")), 37);
}

#[tokio::test]
async fn requests_that_match_nothing_are_not_limited_or_metered() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![
            Rule::per_header("x-user")
                .matching("team-.*")
                .tokens_per_minute(1),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    for h in [&[][..], &[("x-user", "outsider")][..]] {
        for _ in 0..3 {
            let r = send(addr, CHAT, h, STREAM).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.header("x-ratelimit-limit-tokens"), None);
        }
    }
    limits.flush().await;
    assert!(store.is_empty());
}

/// Each source: two requests with the same value share a counter, a third value has its own.
#[tokio::test]
async fn every_limit_by_source() {
    struct Case {
        name: &'static str,
        rule: Rule,
        a: Vec<(&'static str, &'static str)>,
        path_a: &'static str,
        other: Vec<(&'static str, &'static str)>,
        path_other: &'static str,
        stored: &'static str,
    }
    let cases = vec![
        Case {
            name: "header",
            rule: Rule::header("x-tenant")
                .value("acme")
                .tokens_per_minute(150),
            a: vec![("x-tenant", "acme")],
            path_a: CHAT,
            other: vec![("x-tenant", "other")],
            path_other: CHAT,
            stored: "limit_by_header:60:x-tenant:acme",
        },
        Case {
            name: "per_header",
            rule: per_user(150),
            a: vec![("x-user", "u1")],
            path_a: CHAT,
            other: vec![("x-user", "u2")],
            path_other: CHAT,
            stored: "limit_by_per_header:60:x-user:u1",
        },
        Case {
            name: "param (URL-decoded)",
            rule: Rule::param("key").value("a b").tokens_per_minute(150),
            a: vec![],
            path_a: "/v1/chat/completions?x=1&key=a%20b",
            other: vec![],
            path_other: "/v1/chat/completions?key=ab",
            stored: "limit_by_param:60:key:a b",
        },
        Case {
            name: "per_param",
            rule: Rule::per_param("apikey").any_value().tokens_per_minute(150),
            a: vec![],
            path_a: "/v1/chat/completions?apikey=k1",
            other: vec![],
            path_other: "/v1/chat/completions?apikey=k2",
            stored: "limit_by_per_param:60:apikey:k1",
        },
        Case {
            name: "cookie",
            rule: Rule::cookie("plan").value("free").tokens_per_minute(150),
            a: vec![("cookie", "session=s1; plan=free")],
            path_a: CHAT,
            other: vec![("cookie", "plan=pro")],
            path_other: CHAT,
            stored: "limit_by_cookie:60:plan:free",
        },
        Case {
            name: "per_cookie",
            rule: Rule::per_cookie("uid").any_value().tokens_per_minute(150),
            a: vec![("cookie", "a=1; uid=7")],
            path_a: CHAT,
            other: vec![("cookie", "uid=8")],
            path_other: CHAT,
            stored: "limit_by_per_cookie:60:uid:7",
        },
    ];
    for case in cases {
        let store = MemoryStore::new();
        let limits = layer(&store, vec![case.rule]);
        let addr = serve_chat(limits.clone()).await;
        let mut a = case.a.clone();
        a.push(("x-mock-tokens", "100"));
        for expected in [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
        ] {
            let r = send(addr, case.path_a, &a, STREAM).await;
            assert_eq!(r.status, expected, "{}", case.name);
            limits.flush().await;
        }
        assert_eq!(store.used(&key(case.stored)), 200, "{}", case.name);
        let r = send(addr, case.path_other, &case.other, STREAM).await;
        assert_eq!(r.status, StatusCode::OK, "{}: other value", case.name);
    }
}

/// An auth layer in front of ours that maps a bearer token to a consumer.
async fn auth(mut req: Request<Body>, next: axum::middleware::Next) -> axum::response::Response {
    if let Some(user) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer user-"))
    {
        let user = user.to_owned();
        req.extensions_mut().insert(Consumer::new(user));
    }
    next.run(req).await
}

#[tokio::test]
async fn consumer_from_extension_and_trusted_header() {
    // From the extension set by an auth layer.
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![Rule::per_consumer().any_value().tokens_per_minute(150)],
    );
    let addr = serve(
        Router::new()
            .route(CHAT, post(mock_chat))
            .layer(limits.clone())
            .layer(axum::middleware::from_fn(auth)),
    )
    .await;
    let alice = [("authorization", "Bearer user-alice")];
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, CHAT, &alice, STREAM).await.status, expected);
        limits.flush().await;
    }
    assert_eq!(
        store.used(&key("limit_by_per_consumer:60:x-mse-consumer:alice")),
        200
    );
    // The consumer header is not trusted unless configured.
    let forged = [("x-mse-consumer", "alice")];
    assert_eq!(
        send(addr, CHAT, &forged, STREAM).await.status,
        StatusCode::OK
    );

    // From a configured trusted header, exact consumer names.
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .consumer_header("x-mse-consumer")
        .rule(Rule::consumer().value("bob").tokens_per_minute(100))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    let bob = [("x-mse-consumer", "bob")];
    assert_eq!(send(addr, CHAT, &bob, STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    assert_eq!(
        send(addr, CHAT, &bob, STREAM).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let carol = [("x-mse-consumer", "carol")];
    assert_eq!(
        send(addr, CHAT, &carol, STREAM).await.status,
        StatusCode::OK
    );
    assert_eq!(
        store.used(&key("limit_by_consumer:60:x-mse-consumer:bob")),
        100
    );
}

#[tokio::test]
async fn per_ip_from_remote_addr_over_a_real_socket() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![Rule::per_ip().ip("127.0.0.0/8").tokens_per_minute(100)],
    );
    let addr = serve_chat(limits.clone()).await;
    assert_eq!(send(addr, CHAT, &[], STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_per_ip:60:from-remote-addr:127.0.0.1")),
        100
    );
    // A forwarding header does not matter for from-remote-addr.
    let r = send(addr, CHAT, &[("x-forwarded-for", "9.9.9.9")], STREAM).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

/// IPv4, IPv6 and IPv4-mapped IPv6 peers, with `MockConnectInfo`.
#[tokio::test]
async fn per_ip_v4_v6_and_mapped() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![
            Rule::per_ip()
                .ip("2001:db8::/32")
                .tokens_per_minute(1000)
                .ip("192.0.2.0/24")
                .tokens_per_minute(500),
        ],
    );
    let call = |peer: &str| {
        let peer: SocketAddr = peer.parse().unwrap();
        let app = Router::new()
            .route(CHAT, post(mock_chat))
            .layer(limits.clone())
            .layer(MockConnectInfo(peer));
        async move {
            let req = Request::post(CHAT).body(Body::from(STREAM)).unwrap();
            let r = app.oneshot(req).await.unwrap();
            let limit = r
                .headers()
                .get("x-ratelimit-limit-tokens")
                .map(|v| v.to_str().unwrap().to_owned());
            axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            limit
        }
    };
    assert_eq!(call("[2001:db8::5]:1234").await.as_deref(), Some("1000"));
    assert_eq!(call("192.0.2.7:1234").await.as_deref(), Some("500"));
    assert_eq!(
        call("[::ffff:192.0.2.7]:1234").await.as_deref(),
        Some("500")
    );
    assert_eq!(call("203.0.113.1:1").await, None, "outside every range");
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_per_ip:60:from-remote-addr:192.0.2.7")),
        200,
        "mapped = v4"
    );
    assert_eq!(
        store.used(&key("limit_by_per_ip:60:from-remote-addr:2001:db8::5")),
        100
    );
}

#[tokio::test]
async fn forged_left_most_x_forwarded_for_does_not_change_the_key() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        // The test client connects from 127.0.0.1, playing the trusted load balancer.
        .trusted_proxies(["10.0.0.0/8", "127.0.0.1"])
        .rule(
            Rule::per_ip_from_header("x-forwarded-for")
                .any_value()
                .tokens_per_minute(200),
        )
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    for (i, expected) in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ]
    .into_iter()
    .enumerate()
    {
        // The client forges a new left-most entry every time; our proxy appended the real one.
        let forged = format!("6.6.6.{i}, 203.0.113.9, 10.0.0.2");
        let r = send(addr, CHAT, &[("x-forwarded-for", &forged)], STREAM).await;
        assert_eq!(r.status, expected, "request {i}");
        limits.flush().await;
    }
    assert_eq!(
        store.used(&key(
            "limit_by_per_ip:60:from-header-x-forwarded-for:203.0.113.9"
        )),
        200
    );
    assert_eq!(store.len(), 1, "no counter for any forged address");

    // A client that reaches the service directly, not through a trusted proxy, is keyed by its
    // own address whatever it writes in the header.
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .trusted_proxies(["10.0.0.0/8"])
        .rule(
            Rule::per_ip_from_header("x-forwarded-for")
                .any_value()
                .tokens_per_minute(200),
        )
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    send(
        addr,
        CHAT,
        &[("x-forwarded-for", "203.0.113.9, 10.0.0.2")],
        STREAM,
    )
    .await;
    limits.flush().await;
    assert_eq!(
        store.used(&key(
            "limit_by_per_ip:60:from-header-x-forwarded-for:127.0.0.1"
        )),
        100
    );
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn key_matching_exact_any_regexp_cidr_and_first_match_wins() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![
            Rule::per_header("x-user")
                .matching("vip-[0-9]+")
                .tokens_per_minute(1000)
                .any_value()
                .tokens_per_minute(100),
            Rule::header("x-plan")
                .value("free")
                .tokens_per_hour(300)
                .value("pro")
                .tokens_per_hour(3000),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    let limit = |r: &common::Reply| r.header("x-ratelimit-limit-tokens").map(str::to_owned);
    let r = send(addr, CHAT, &[("x-user", "vip-42")], STREAM).await;
    assert_eq!(
        limit(&r).as_deref(),
        Some("1000"),
        "first matching entry wins"
    );
    // Anchored: `vip-[0-9]+` does not match inside a longer value.
    let r = send(addr, CHAT, &[("x-user", "not-vip-42x")], STREAM).await;
    assert_eq!(limit(&r).as_deref(), Some("100"));
    let r = send(addr, CHAT, &[("x-plan", "pro")], STREAM).await;
    assert_eq!(limit(&r).as_deref(), Some("3000"));
    let r = send(addr, CHAT, &[("x-plan", "Pro")], STREAM).await;
    assert_eq!(limit(&r), None, "exact keys are case-sensitive");
}

#[tokio::test]
async fn all_matching_items_apply_and_any_can_reject() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![
            Rule::global().tokens_per_minute(10_000),
            per_user(1000),
            Rule::per_param("project")
                .any_value()
                .tokens_per_minute(250),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    let path = "/v1/chat/completions?project=p1";
    let h = [("x-user", "u"), ("x-mock-tokens", "100")];
    let r = send(addr, path, &h, STREAM).await;
    assert_eq!(
        r.header("x-ratelimit-limit-tokens"),
        Some("250"),
        "tightest limit reported"
    );
    limits.flush().await;
    for k in [
        key("global_threshold:60"),
        key("limit_by_per_header:60:x-user:u"),
        key("limit_by_per_param:60:project:p1"),
    ] {
        assert_eq!(store.used(&k), 100, "{k}");
    }
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, path, &h, STREAM).await.status, expected);
        limits.flush().await;
    }
    // The per-user counter still has budget, but the project's is spent.
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:u")), 300);
    // Another project for the same user is fine.
    let r = send(addr, "/v1/chat/completions?project=p2", &h, STREAM).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn several_windows_in_one_entry_all_apply() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(1000)
                .tokens_per_day(150),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "u")];
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    assert_eq!(send(addr, CHAT, &h, STREAM).await.status, StatusCode::OK);
    limits.flush().await;
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the day limit applies too"
    );
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("150"));
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:u")), 200);
    assert_eq!(store.used(&key("limit_by_per_header:86400:x-user:u")), 200);
}

/// Counts debits, to show settlement happens exactly once.
#[derive(Clone, Default)]
struct CountingStore {
    inner: MemoryStore,
    debits: Arc<AtomicUsize>,
}

impl Store for CountingStore {
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        self.inner.check(counters)
    }
    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()> {
        self.debits.fetch_add(1, Ordering::SeqCst);
        self.inner.debit(counters, tokens)
    }
}

#[tokio::test]
async fn client_disconnect_mid_stream_is_charged_an_estimate_exactly_once() {
    let store = CountingStore::default();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(per_user(10_000))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;

    // A raw client: send the request, read the first bytes of the stream, hang up.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(
        r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(400)
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nx-user: quitter\r\nx-mock-hang: 1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("lo") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    drop(s);

    let k = key("limit_by_per_header:60:x-user:quitter");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.inner.used(&k) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "disconnect was never charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        limits.flush().await;
    }
    let charged = store.inner.used(&k);
    // Request of ~450 bytes (~113 tokens) plus 2 streamed chunks.
    assert!((100..=130).contains(&charged), "estimate {charged}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    limits.flush().await;
    assert_eq!(
        store.debits.load(Ordering::SeqCst),
        1,
        "settled exactly once"
    );
    assert_eq!(store.inner.used(&k), charged);
}

#[tokio::test]
async fn grpc_requests_are_rejected_with_resource_exhausted() {
    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(50)]);
    let addr = serve_chat(limits.clone()).await;
    send(addr, CHAT, &[("x-user", "g")], STREAM).await;
    limits.flush().await;
    let r = send(
        addr,
        CHAT,
        &[("x-user", "g"), ("content-type", "application/grpc")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("grpc-status"), Some("8"));
    assert!(
        r.header("grpc-message")
            .unwrap()
            .contains("Token rate limit")
    );
    // Over HTTP/2, as gRPC clients speak, a trailers-only response: the HEADERS frame with
    // `grpc-status` ends the stream. Followed by an empty DATA frame instead, grpc C-core
    // clients (Python's grpcio) report UNKNOWN, not RESOURCE_EXHAUSTED.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = Request::post(format!("http://{addr}{CHAT}"))
        .header("x-user", "g")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = h2.request(req).await.unwrap();
    assert_eq!(r.headers()["grpc-status"], "8");
    assert!(
        http_body::Body::is_end_stream(r.body()),
        "the stream ends with the headers"
    );
}

#[tokio::test]
async fn secret_header_values_are_hashed_in_keys() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![
            Rule::per_header("x-api-key")
                .any_value()
                .tokens_per_minute(500),
        ],
    );
    let addr = serve_chat(limits.clone()).await;
    send(addr, CHAT, &[("x-api-key", "sk-secret")], STREAM).await;
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_per_header:60:x-api-key:sk-secret")),
        0
    );
    assert_eq!(store.len(), 1);
}

#[test]
fn config_errors_are_all_reported_with_paths() {
    let yaml = r#"
rule_name: ""
rejected_code: 200
trusted_proxies: ["10.0.0.0/8", "not-an-ip"]
surprise: 1
rule_items:
  - limit_by_header: x-a
    limit_by_per_param: p
    limit_keys: [{key: a, token_per_minute: 1}]
  - limit_by_per_header: x-user
    limit_keys:
      - key: alice
        token_per_minute: 5
      - key: "regexp:("
        token_per_hour: 0
  - limit_by_per_ip: from-somewhere
    limit_keys: [{key: "*", token_per_day: 1, token_per_week: 2}]
"#;
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(yaml).unwrap();
    let err = TokenRateLimitLayer::from_config(cfg).unwrap_err();
    let text = err.to_string();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "rule_name",
        "rejected_code",
        "trusted_proxies[1]",
        "surprise",
        "rule_items[0]",
        "rule_items[1].limit_keys[0].key",
        "rule_items[1].limit_keys[1].key",
        "rule_items[1].limit_keys[1].token_per_hour",
        "rule_items[2].limit_by_per_ip",
        "rule_items[2].limit_keys[0].token_per_week",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in:\n{text}");
    }
    assert!(text.contains("split it into separate rule_items"), "{text}");
    assert!(
        text.contains("for exact values use limit_by_header"),
        "{text}"
    );
    assert!(text.contains("must be > 0"), "{text}");
}

/// Settings that would be silently ineffective are errors: a `*` inside a path (only a
/// trailing one is a prefix), empty `paths` / `methods` (they would mean all), a `,` in
/// `rule_name` (it separates rule names in metrics), a `limit_keys` entry after `*` or
/// repeating a key (the first matching entry wins); a literal composite key is pointed to
/// the `regexp:` that matches it.
#[test]
fn settings_that_would_do_nothing_are_errors() {
    let yaml = r#"
rule_name: "team-a,team-b"
rule_items:
  - limit_by_per_header: x-user
    paths: ["/v1/*/chat", "/v1/**"]
    limit_keys: [{key: "*", token_per_minute: 10}]
  - limit_by_per_header: x-user
    paths: []
    methods: []
    limit_keys: [{key: "*", token_per_minute: 10}]
  - limit_by_composite: [consumer, model]
    limit_keys: [{key: "alice|gpt-4o", token_per_minute: 10}]
  - limit_by_per_header: x-user
    limit_keys:
      - {key: "*", token_per_minute: 10}
      - {key: "regexp:vip-.*", token_per_minute: 1000}
  - limit_by_header: x-tier
    limit_keys:
      - {key: gold, token_per_minute: 1000}
      - {key: silver, token_per_minute: 100}
      - {key: gold, token_per_day: 10000}
"#;
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(yaml).unwrap();
    let err = TokenRateLimitLayer::from_config(cfg).unwrap_err();
    let text = err.to_string();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "rule_name",
            "rule_items[0].paths[0]",
            "rule_items[0].paths[1]",
            "rule_items[1].methods",
            "rule_items[1].paths",
            "rule_items[2].limit_keys[0].key",
            "rule_items[3].limit_keys[1].key",
            "rule_items[4].limit_keys[2].key",
        ],
        "{text}"
    );
    assert!(text.contains("put `*` last"), "{text}");
    assert!(
        text.contains("`gold` again: limit_keys[0] matches first"),
        "{text}"
    );
    assert!(text.contains(r"use `regexp:alice\|gpt\-4o`"), "{text}");
    // A trailing `*` is a prefix, as before.
    let ok: TokenRateLimitConfig = serde_yaml::from_str(
        r#"
rule_name: team-a
rule_items:
  - limit_by_per_header: x-user
    paths: ["/v1/*", "/v1/chat/completions"]
    methods: [post]
    limit_keys: [{key: "*", token_per_minute: 10}]
"#,
    )
    .unwrap();
    TokenRateLimitLayer::from_config(ok).unwrap();
    // Blocks whose lines are all commented out are empty blocks, not absent ones: a
    // deployment that meant Redis does not run on the in-memory store unawares.
    let commented: TokenRateLimitConfig = serde_yaml::from_str(
        r#"
rule_name: team-a
global_threshold:
#  token_per_minute: 100
redis:
#  service_name: redis.internal
"#,
    )
    .unwrap();
    let err = TokenRateLimitLayer::from_config(commented).unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"global_threshold"), "{err}");
    assert!(paths.contains(&"redis"), "{err}");
}

#[test]
fn builder_reports_problems_too() {
    let err = TokenRateLimitLayer::builder()
        .rule(Rule::header("x-a").tokens_per_minute(5))
        .rule(
            Rule::per_header("bad header")
                .any_value()
                .tokens_per_minute(5),
        )
        .rule(Rule::per_cookie("c").any_value())
        .build()
        .unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "rule_items[0].limit_keys[0].key",
            "rule_items[1].limit_by_per_header",
            "rule_items[2].limit_keys[0]"
        ],
        "{err}"
    );
    assert!(
        TokenRateLimitLayer::builder().build().is_err(),
        "nothing to limit"
    );
}

#[test]
fn higress_config_vocabulary_deserialises() {
    let yaml = r#"
rule_name: default_rule
rule_items:
  - limit_by_header: x-ca-key
    limit_keys: [{key: 102234, token_per_minute: 10}]
  - limit_by_param: apikey
    limit_keys: [{key: 9a342114-ba8a-11ec-b1bf-00163e1250b5, token_per_minute: 10}]
  - limit_by_per_param: apikey
    limit_keys:
      - {key: "regexp:^a.*", token_per_second: 10}
      - {key: "*", token_per_hour: 10}
  - limit_by_consumer: ''
    limit_keys: [{key: consumer1, token_per_second: 10}]
  - limit_by_per_consumer:
    limit_keys: [{key: "*", token_per_day: 10}]
  - limit_by_cookie: key1
    limit_keys: [{key: value1, token_per_minute: 10}]
  - limit_by_per_cookie: key1
    limit_keys: [{key: "*", token_per_minute: 10}]
  - limit_by_per_header: x-user
    limit_keys: [{key: "*", token_per_minute: 10}]
  - limit_by_per_ip: from-header-x-forwarded-for
    limit_keys: [{key: 1.1.1.1, token_per_day: 10}, {key: 1.1.1.0/24, token_per_day: 100}, {key: 0.0.0.0/0, token_per_day: 1000}]
rejected_code: 429
rejected_msg: '{"code":-1,"msg":"Too many requests"}'
"#;
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(yaml).unwrap();
    TokenRateLimitLayer::from_config(cfg).unwrap();
}

#[tokio::test]
async fn custom_rejected_msg_and_code() {
    let cfg: TokenRateLimitConfig = serde_json::from_value(serde_json::json!({
        "rule_name": "r",
        "rejected_code": 403,
        "rejected_msg": "{\"code\":-1,\"msg\":\"Too many requests\"}",
        "global_threshold": {"token_per_minute": 10}
    }))
    .unwrap();
    let limits = TokenRateLimitLayer::from_config(cfg).unwrap();
    let addr = serve_chat(limits.clone()).await;
    send(addr, CHAT, &[], STREAM).await;
    limits.flush().await;
    let r = send(addr, CHAT, &[], STREAM).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["msg"], "Too many requests");
    assert!(r.header("retry-after").is_some());
}

/// A `tracing` writer that keeps what was written.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn upstream_without_usage_is_charged_an_estimate_marked_in_tracing() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(10_000)]);
    let addr = serve_chat(limits.clone()).await;
    let r = send(
        addr,
        CHAT,
        &[("x-user", "e"), ("x-mock-no-usage", "1")],
        STREAM,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    limits.flush().await;
    // 41-byte request (11 tokens) + the larger of 3 data events and the stream's bytes / 64.
    let estimate = 11 + 3.max(r.body.len().div_ceil(64) as u64);
    assert_eq!(
        store.used(&key("limit_by_per_header:60:x-user:e")),
        estimate
    );
    send(
        addr,
        CHAT,
        &[("x-user", "e"), ("x-mock-tokens", "77")],
        STREAM,
    )
    .await;
    limits.flush().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let settled: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("token usage settled"))
        .collect();
    assert_eq!(settled.len(), 2, "{text}");
    assert!(
        settled[0].contains("estimated=true") && settled[0].contains(&format!("tokens={estimate}")),
        "{}",
        settled[0]
    );
    assert!(
        settled[1].contains("estimated=false") && settled[1].contains("tokens=77"),
        "{}",
        settled[1]
    );
    assert!(!text.contains("\"e\""), "no key value in logs");
}

#[test]
fn cost_config_is_validated() {
    let ok = |yaml: &str| {
        let cfg: TokenRateLimitConfig = serde_yaml::from_str(yaml).unwrap();
        TokenRateLimitLayer::from_config(cfg)
    };
    let base = "rule_name: r\nglobal_threshold: {token_per_minute: 10}\n";
    ok(&format!("{base}cost: {{preset: input_output}}")).unwrap();
    ok(&format!(
        "{base}cost: {{weights: {{input: 1, cached_input: 0.1, output: 4}}}}"
    ))
    .unwrap();
    let err = ok(&format!("{base}cost: {{preset: cheapest}}")).unwrap_err();
    assert!(err.to_string().contains("cost.preset"), "{err}");
    let err = ok(&format!("{base}cost: {{weights: {{output: -1}}}}")).unwrap_err();
    assert!(err.to_string().contains("cost.weights.output"), "{err}");
    let err = ok(&format!("{base}cost: {{preset: total, weights: {{}}}}")).unwrap_err();
    assert!(
        err.to_string().contains("either preset or weights"),
        "{err}"
    );
}

#[tokio::test]
async fn usage_in_trailers_and_headers_through_an_extractor() {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tower_token_ratelimit::usage::HeaderUsage;

    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .usage_extractor(HeaderUsage::new())
        .rule(per_user(10_000))
        .build()
        .unwrap();
    // A gRPC-like service: usage in the trailers.
    let svc = tower::service_fn(|_req: Request<Body>| async {
        let mut trailers = axum::http::HeaderMap::new();
        trailers.insert("x-usage-total-tokens", "55".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(
                b"\x00\x00\x00\x00\x00",
            ))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        Ok::<_, std::convert::Infallible>(
            axum::http::Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap(),
        )
    });
    let svc = tower::ServiceBuilder::new()
        .layer(limits.clone())
        .service(svc);
    let req = Request::post("/pkg.Svc/Call")
        .header("x-user", "t")
        .body(Body::empty())
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    let collected = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    assert!(collected.trailers().is_some(), "trailers pass through");
    limits.flush().await;
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:t")), 55);

    // In the response headers, over a real socket.
    let app = Router::new()
        .route(
            CHAT,
            post(|| async {
                (
                    [
                        ("x-usage-input-tokens", "5"),
                        ("x-usage-output-tokens", "6"),
                    ],
                    "ok",
                )
            }),
        )
        .layer(limits.clone());
    let addr = serve(app).await;
    send(addr, CHAT, &[("x-user", "h")], "{}").await;
    limits.flush().await;
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:h")), 11);
}

#[tokio::test]
async fn works_under_route_layer_and_service_builder() {
    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(150)]);
    let app = Router::new()
        .route(CHAT, post(mock_chat))
        .route_layer(tower::ServiceBuilder::new().layer(limits.clone()));
    let addr = serve(app).await;
    let h = [("x-user", "r")];
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, expected);
        limits.flush().await;
    }
    // route_layer: unknown routes are not limited (404 from the router, not 429).
    assert_eq!(
        send(addr, "/other", &h, STREAM).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn reload_changes_limits_and_keeps_used_tokens() {
    let cfg = |tokens: u64| -> TokenRateLimitConfig {
        serde_json::from_value(serde_json::json!({
            "rule_name": "default",
            "rule_items": [{"limit_by_per_header": "x-user", "limit_keys": [{"key": "*", "token_per_minute": tokens}]}]
        }))
        .unwrap()
    };
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .config(cfg(150))
        .store(store.clone())
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "r")];
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send(addr, CHAT, &h, STREAM).await.status, expected);
        limits.flush().await;
    }
    limits.reload(cfg(1000)).unwrap();
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-ratelimit-remaining-tokens"),
        Some("800"),
        "the 200 used are kept"
    );
    limits.flush().await;
    // A bad configuration changes nothing.
    assert!(limits.reload(cfg(0)).is_err());
    assert_eq!(
        send(addr, CHAT, &h, STREAM)
            .await
            .header("x-ratelimit-limit-tokens"),
        Some("1000")
    );
    limits.flush().await;
    limits.reload(cfg(250)).unwrap();
    assert_eq!(
        send(addr, CHAT, &h, STREAM).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(store.used(&key("limit_by_per_header:60:x-user:r")), 400);
}

#[tokio::test]
async fn openai_and_ietf_headers_agree_with_the_store() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .ietf_headers(true)
        .rule(per_user(250))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-user", "i"), ("x-mock-tokens", "100")];
    send(addr, CHAT, &h, STREAM).await;
    limits.flush().await;
    let used = store.used(&key("limit_by_per_header:60:x-user:i"));
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("250"));
    let remaining = (250 - used).to_string();
    assert_eq!(
        r.header("x-ratelimit-remaining-tokens"),
        Some(remaining.as_str())
    );
    assert_eq!(r.header("ratelimit-policy"), Some(r#""tokens";q=250;w=60"#));
    let state = r.header("ratelimit").unwrap();
    assert!(
        state.starts_with(&format!(r#""tokens";r={remaining};t="#)),
        "{state}"
    );
    let t: u64 = state.rsplit("t=").next().unwrap().parse().unwrap();
    assert!((1..=60).contains(&t));
    let reset = r.header("x-ratelimit-reset-tokens").unwrap();
    assert!(
        reset == "1m0s" || (reset.ends_with('s') && !reset.contains('m')),
        "a minute at most: {reset}"
    );
    limits.flush().await;
    send(addr, CHAT, &h, STREAM).await;
    limits.flush().await;
    // On a rejection too (300 of 250 used), and `Retry-After` on every 429.
    let r = send(addr, CHAT, &h, STREAM).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.header("retry-after").is_some());
    assert!(
        r.header("ratelimit")
            .unwrap()
            .starts_with(r#""tokens";r=0;"#)
    );
    // Off by default.
    let plain = layer(&MemoryStore::new(), vec![per_user(9)]);
    let r = send(serve_chat(plain).await, CHAT, &h, STREAM).await;
    assert_eq!(r.header("ratelimit"), None);
}

/// Keys and tokens of one `debit_many`, sorted.
type Batch = Vec<(String, u64)>;

/// Records each batch of debits; the first batch waits at a gate.
#[derive(Clone)]
struct GatedStore {
    inner: MemoryStore,
    batches: Arc<std::sync::Mutex<Vec<Batch>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Store for GatedStore {
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        self.inner.check(counters)
    }
    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()> {
        self.inner.debit(counters, tokens)
    }
    fn debit_many(&self, debits: Vec<(Counter, u64)>) -> StoreFuture<()> {
        let mut batches = self.batches.lock().unwrap();
        let first = batches.is_empty();
        let mut seen: Vec<(String, u64)> = debits
            .iter()
            .map(|(c, t)| (c.key.to_string(), *t))
            .collect();
        seen.sort();
        batches.push(seen);
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        Box::pin(async move {
            if first {
                let _ = gate.acquire().await;
            }
            for (c, t) in debits {
                inner.debit(&[c], t).await?;
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn debits_that_queue_while_one_is_written_are_merged_per_counter() {
    let store = GatedStore {
        inner: MemoryStore::default(),
        batches: Default::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(Rule::global().tokens_per_minute(1_000_000))
        .rule(per_user(1_000_000))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    // The first debit is being written (held at the gate) ...
    let h =
        |user: &'static str, tokens: &'static str| [("x-user", user), ("x-mock-tokens", tokens)];
    assert_eq!(
        send(addr, CHAT, &h("a", "10"), STREAM).await.status,
        StatusCode::OK
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.batches.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no debit written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ... while 30 more requests end.
    for i in 0..30 {
        let (user, tokens) = if i % 3 == 0 { ("a", "1") } else { ("b", "2") };
        assert_eq!(
            send(addr, CHAT, &h(user, tokens), STREAM).await.status,
            StatusCode::OK
        );
    }
    store.gate.add_permits(1);
    limits.flush().await;
    let batches = store.batches.lock().unwrap().clone();
    let global = key("global_threshold:60");
    let (a, b) = (
        key("limit_by_per_header:60:x-user:a"),
        key("limit_by_per_header:60:x-user:b"),
    );
    assert_eq!(
        batches,
        vec![
            vec![(global.clone(), 10), (a.clone(), 10)],
            // 10 requests of user a (1 token) and 20 of user b (2 tokens), one write.
            vec![(global.clone(), 50), (a.clone(), 10), (b.clone(), 40)],
        ]
    );
    assert_eq!(store.inner.used(&global), 60);
}

/// A body whose trailers are its end (`is_end_stream` stays false after them, as for
/// `StreamBody`): hyper stops polling once it has sent the trailers and drops the body. The
/// usage read before them is charged, not an estimate, and a last SSE event without its blank
/// line counts.
#[tokio::test]
async fn trailers_end_the_body_when_nothing_is_polled_after_them() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    // Usage on a content chunk: the layer's usage-chunk filter (the request did not ask for
    // usage) holds the event back until the trailers, and passes it on.
    let usage = r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1000,"completion_tokens":2000,"total_tokens":3000}}"#;
    for (user, content_type, data) in [
        ("json", "application/json", usage.to_owned()),
        ("sse", "text/event-stream", format!("data: {usage}")),
    ] {
        let store = MemoryStore::new();
        let limits = layer(&store, vec![per_user(1_000_000)]);
        let svc = tower::service_fn(move |_req: Request<Body>| {
            let data = data.clone();
            async move {
                let mut trailers = axum::http::HeaderMap::new();
                trailers.insert("x-done", "1".parse().unwrap());
                let frames = vec![
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(data))),
                    Ok(Frame::trailers(trailers)),
                ];
                Ok::<_, std::convert::Infallible>(
                    axum::http::Response::builder()
                        .header("content-type", content_type)
                        .body(StreamBody::new(futures_util::stream::iter(frames)))
                        .unwrap(),
                )
            }
        });
        let svc = tower::ServiceBuilder::new()
            .layer(limits.clone())
            .service(svc);
        let req = Request::post(CHAT)
            .header("x-user", user)
            .body(Body::from(STREAM))
            .unwrap();
        let mut body = svc.oneshot(req).await.unwrap().into_body();
        // What hyper's server does: data, trailers, then no more polls.
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data(), "{content_type}: {first:?}");
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        drop(body);
        limits.flush().await;
        assert_eq!(
            store.used(&key(&format!("limit_by_per_header:60:x-user:{user}"))),
            3000,
            "{content_type}"
        );
    }
}

/// Anthropic reports the input and a placeholder output count in `message_start`, the output
/// only in `message_delta` at the end. A client that leaves after a long answer, before that,
/// is charged no less than the estimate from the bytes streamed.
#[tokio::test]
async fn leaving_before_the_final_usage_is_charged_no_less_than_the_estimate() {
    use bytes::Bytes;
    use http_body_util::BodyExt;

    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(1_000_000)]);
    let start = Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
    );
    let delta = Bytes::from_static(
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" a long answer, token after token\"}}\n\n",
    );
    const DELTAS: usize = 2000;
    let frames: Vec<Result<Bytes, std::convert::Infallible>> = std::iter::once(start.clone())
        .chain(std::iter::repeat_n(delta.clone(), DELTAS))
        .map(Ok)
        .collect();
    let app = Router::new()
        .route(
            "/v1/messages",
            post(move || {
                let frames = frames.clone();
                async move {
                    // The upstream is still generating when the client leaves.
                    let stream = futures_util::StreamExt::chain(
                        futures_util::stream::iter(frames),
                        futures_util::stream::pending(),
                    );
                    axum::http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(stream))
                        .unwrap()
                }
            }),
        )
        .layer(limits.clone());
    let req = Request::post("/v1/messages")
        .header("x-user", "leaver")
        .body(Body::from(r#"{"model":"claude","stream":true}"#))
        .unwrap();
    let mut body = app.oneshot(req).await.unwrap().into_body();
    for _ in 0..=DELTAS {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    limits.flush().await;
    let streamed = start.len() + DELTAS * delta.len();
    let charged = store.used(&key("limit_by_per_header:60:x-user:leaver"));
    // The output estimate for SSE is about a token per 64 bytes (the events' JSON around
    // each piece of text); `message_start` alone says 11.
    assert!(
        charged > (streamed / 100) as u64,
        "charged {charged} for {streamed} bytes streamed"
    );
}

/// A request body streamed without a `Content-Length` is estimated from the bytes read, the
/// same as one that gives its length: a client cannot make its prompt free by chunking it.
#[tokio::test]
async fn a_chunked_request_body_is_estimated_like_one_with_a_length() {
    use bytes::Bytes;
    use http_body_util::BodyExt;

    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(100_000_000)]);
    // Chat completions' bodies are read by the layer (to ask for usage) up to 1 MiB; other
    // endpoints' are not read at all.
    let app = Router::new()
        .route(CHAT, post(mock_chat))
        .route("/v1/messages", post(mock_chat))
        .layer(limits.clone());
    for path in [CHAT, "/v1/messages"] {
        for size in [40_000, 2_000_000] {
            let body = format!(
                r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(size)
            );
            let used = |chunked: bool| {
                let user = format!("{path}-{size}-{chunked}");
                let request = Request::post(path)
                    .header("x-user", &user)
                    .header("content-type", "application/json")
                    .header("x-mock-no-usage", "1");
                let request = if chunked {
                    let pieces: Vec<Result<Bytes, std::convert::Infallible>> = body
                        .as_bytes()
                        .chunks(1000)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    request.body(Body::from_stream(futures_util::stream::iter(pieces)))
                } else {
                    request
                        .header("content-length", body.len())
                        .body(Body::from(body.clone()))
                };
                let (app, limits, store) = (app.clone(), limits.clone(), store.clone());
                async move {
                    let response = app.oneshot(request.unwrap()).await.unwrap();
                    response.into_body().collect().await.unwrap();
                    limits.flush().await;
                    store.used(&key(&format!("limit_by_per_header:60:x-user:{user}")))
                }
            };
            let whole = used(false).await;
            assert!(whole as usize > size / 4, "{path}, {size} bytes: {whole}");
            assert_eq!(used(true).await, whole, "{path}, {size} bytes, chunked");
        }
    }
}

/// A reload keeps the builder's `Rule::per_key` rules (a configuration cannot express them)
/// and applies the new `default_output_tokens`.
#[tokio::test]
async fn reload_keeps_per_key_rules_and_applies_every_setting() {
    let cfg = |default_output: u64| -> TokenRateLimitConfig {
        serde_json::from_value(serde_json::json!({
            "rule_name": "default",
            "mode": "reserve",
            "default_output_tokens": default_output,
            "global_threshold": {"token_per_minute": 1_000_000},
        }))
        .unwrap()
    };
    let store = MemoryStore::new();
    let tenant = |r: &tower_token_ratelimit::RequestView<'_>| -> Option<String> {
        Some(r.headers().get("x-tenant")?.to_str().ok()?.to_owned())
    };
    let limits = TokenRateLimitLayer::builder()
        .config(cfg(5000))
        .rule(Rule::per_key("tenant", tenant).tokens_per_minute(220))
        .store(store.clone())
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    let h = [("x-tenant", "t1")];
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let mut statuses = Vec::new();
    for reload in [false, false, true, false] {
        if reload {
            limits.reload(cfg(10)).unwrap();
        }
        statuses.push(send(addr, CHAT, &h, body).await.status);
        limits.flush().await;
    }
    // An empty window admits one request whatever it reserves; then 100 used plus 5,000 of
    // output allowance do not fit the tenant's 220, 100 plus 10 do, and 200 plus 10 of output
    // and the prompt do not: the tenant's rule still holds after the reload.
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(store.used(&key("limit_by_per_key:60:tenant:t1")), 200);
}

/// Reserve mode, starting from 1,000 tokens of output allowance, per `x-user`, in memory: the
/// store, the layer, and `mock_chat` behind it.
fn reserve_mode_app() -> (MemoryStore, TokenRateLimitLayer, Router) {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .mode(tower_token_ratelimit::Mode::Reserve)
        .default_output_tokens(1000)
        .rule(per_user(1_000_000))
        .build()
        .unwrap();
    let app = Router::new()
        .route(CHAT, post(mock_chat))
        .layer(limits.clone());
    (store, limits, app)
}

/// Reserve mode learns the output allowance from requests that set no output limit only: a
/// client's capped answers (`max_tokens: 1`) say nothing of what an uncapped one uses, and
/// must not shrink what the next uncapped request reserves.
#[tokio::test]
async fn capped_answers_do_not_teach_the_output_allowance() {
    use http_body_util::BodyExt;

    let (store, limits, app) = reserve_mode_app();
    let k = key("limit_by_per_header:60:x-user:u");
    let request = |body: &'static str, extra: Option<(&'static str, &'static str)>| {
        let mut r = Request::post(CHAT).header("x-user", "u");
        if let Some((name, value)) = extra {
            r = r.header(name, value);
        }
        r.body(Body::from(body)).unwrap()
    };
    // Three capped answers of 12 tokens each.
    let capped =
        r#"{"model":"m","max_tokens":1,"stream":true,"stream_options":{"include_usage":true}}"#;
    for _ in 0..3 {
        let r = app
            .clone()
            .oneshot(request(capped, Some(("x-mock-tokens", "12"))))
            .await
            .unwrap();
        r.into_body().collect().await.unwrap();
        limits.flush().await;
    }
    assert_eq!(store.used(&k), 36);
    // An uncapped request still reserves the configured 1,000 of output (and its prompt) while
    // it streams.
    let uncapped = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let r = app
        .clone()
        .oneshot(request(uncapped, Some(("x-mock-hang", "1"))))
        .await
        .unwrap();
    let reserved = store.used(&k) - 36;
    assert!((1000..1100).contains(&reserved), "reserved {reserved}");
    drop(r);
}

/// The output allowance is learned from the output the upstream reports, not from the charge
/// less the prompt estimate: requests whose bytes overstate their prompt (4 KB of base64 for
/// 10 prompt tokens) must not teach an allowance of nothing, which would let the next small
/// request reserve no output.
#[tokio::test]
async fn the_output_allowance_is_learned_from_the_reported_output() {
    use http_body_util::BodyExt;

    let (store, limits, app) = reserve_mode_app();
    let k = key("limit_by_per_header:60:x-user:u");
    let request = |body: String, hang: bool| {
        let mut r = Request::post(CHAT).header("x-user", "u");
        if hang {
            r = r.header("x-mock-hang", "1");
        }
        r.body(Body::from(body)).unwrap()
    };
    let stream = r#""model":"m","stream":true,"stream_options":{"include_usage":true}"#;
    // Three answers of 10 prompt and 90 output tokens to bodies estimated at ~1,000.
    let padded = format!(r#"{{{stream},"image":"{}"}}"#, "A".repeat(4000));
    for _ in 0..3 {
        let r = app
            .clone()
            .oneshot(request(padded.clone(), false))
            .await
            .unwrap();
        r.into_body().collect().await.unwrap();
        limits.flush().await;
    }
    assert_eq!(store.used(&k), 300);
    // A small request reserves its prompt estimate and the 90 learned.
    let r = app
        .clone()
        .oneshot(request(format!("{{{stream}}}"), true))
        .await
        .unwrap();
    let reserved = store.used(&k) - 300;
    assert!((90..150).contains(&reserved), "reserved {reserved}");
    drop(r);
}

/// In reserve mode the budget left in the headers counts the request's own reservation.
#[tokio::test]
async fn reserve_mode_headers_count_the_requests_own_reservation() {
    use tower_token_ratelimit::Mode;

    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .mode(Mode::Reserve)
        .rule(per_user(10_000))
        .build()
        .unwrap();
    let app = Router::new()
        .route(CHAT, post(mock_chat))
        .layer(limits.clone());
    let body =
        r#"{"model":"m","max_tokens":4000,"stream":true,"stream_options":{"include_usage":true}}"#;
    let r = app
        .oneshot(
            Request::post(CHAT)
                .header("x-user", "u")
                .header("x-mock-hang", "1")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let reserved = store.used(&key("limit_by_per_header:60:x-user:u"));
    assert!(reserved > 4000, "reserved {reserved}");
    let remaining = (10_000 - reserved).to_string();
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap(),
        remaining
    );
}

/// An Anthropic stream that ends without `message_delta` (an upstream cut off cleanly) has
/// only `message_start`'s placeholder output count: no less than the estimate is charged.
#[tokio::test]
async fn a_stream_that_ends_on_a_placeholder_usage_is_charged_no_less_than_the_estimate() {
    use bytes::Bytes;
    use http_body_util::BodyExt;

    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(1_000_000)]);
    let mut stream = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
    );
    for _ in 0..500 {
        stream.push_str("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" more and more text\"}}\n\n");
    }
    let streamed = stream.len();
    let app = Router::new()
        .route(
            "/v1/messages",
            post(move || {
                let body = Bytes::from(stream.clone());
                async move {
                    axum::http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from(body))
                        .unwrap()
                }
            }),
        )
        .layer(limits.clone());
    let req = Request::post("/v1/messages")
        .header("x-user", "cut")
        .body(Body::from(r#"{"model":"claude","stream":true}"#))
        .unwrap();
    let body = app.oneshot(req).await.unwrap().into_body();
    body.collect().await.unwrap();
    limits.flush().await;
    let charged = store.used(&key("limit_by_per_header:60:x-user:cut"));
    assert!(
        charged > (streamed / 100) as u64,
        "charged {charged} for {streamed} bytes streamed"
    );
}

/// A store whose debits take a while.
struct SlowStore(MemoryStore);

impl Store for SlowStore {
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        self.0.check(counters)
    }

    fn debit(&self, counters: &[Counter], tokens: u64) -> StoreFuture<()> {
        let (inner, counters) = (self.0.clone(), counters.to_vec());
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            inner.debit(&counters, tokens).await
        })
    }
}

/// `flush` waits for every settlement handed over before it, however they finish: one that
/// needs no write (0 tokens), handed over later, does not end the wait while an earlier
/// debit is still being written.
#[tokio::test]
async fn flush_waits_for_earlier_settlements_whatever_finishes_first() {
    let memory = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(SlowStore(memory.clone()))
        .rule(Rule::global().tokens_per_minute(1_000_000))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    assert_eq!(
        send(addr, CHAT, &[("x-mock-tokens", "50")], STREAM)
            .await
            .status,
        StatusCode::OK
    );
    // Its debit is being written now.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let flush = tokio::spawn({
        let limits = limits.clone();
        async move { limits.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        send(addr, CHAT, &[("x-mock-tokens", "0")], STREAM)
            .await
            .status,
        StatusCode::OK
    );
    flush.await.unwrap();
    assert_eq!(memory.used(&key("global_threshold:60")), 50);
}

/// One gRPC call through the layer (a 400-byte request from `user`): the response has
/// `grpc-status` in its head if `in_head`, one message if `message`, and `grpc-status` in
/// its trailers if `in_trailers`. No usage is reported.
async fn grpc_call(
    limits: &TokenRateLimitLayer,
    user: &str,
    in_head: Option<&'static str>,
    message: bool,
    in_trailers: Option<&'static str>,
) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let svc = tower::service_fn(move |_req: Request<Body>| async move {
        let mut frames = Vec::new();
        if message {
            frames.push(Ok::<_, std::convert::Infallible>(Frame::data(
                Bytes::from_static(b"\x00\x00\x00\x00\x05hello"),
            )));
        }
        if let Some(status) = in_trailers {
            let mut trailers = axum::http::HeaderMap::new();
            trailers.insert("grpc-status", status.parse().unwrap());
            frames.push(Ok(Frame::trailers(trailers)));
        }
        let mut response =
            axum::http::Response::builder().header("content-type", "application/grpc");
        if let Some(status) = in_head {
            response = response.header("grpc-status", status);
        }
        let body = StreamBody::new(futures_util::stream::iter(frames));
        Ok::<_, std::convert::Infallible>(response.body(body).unwrap())
    });
    let svc = tower::ServiceBuilder::new()
        .layer(limits.clone())
        .service(svc);
    let req = Request::post("/pkg.Svc/Call")
        .header("x-user", user)
        .header("content-type", "application/grpc")
        .body(Body::from(vec![0u8; 400]))
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    response.into_body().collect().await.unwrap();
    limits.flush().await;
}

/// A gRPC call the upstream refuses (a non-zero `grpc-status` before any message: in a
/// trailers-only response, or in trailers after none) is charged nothing, as an HTTP error
/// status is; one that fails after a message, or ends well without reporting usage, is
/// charged the estimate, as an HTTP stream cut short is.
#[tokio::test]
async fn grpc_calls_refused_upstream_are_charged_nothing() {
    let store = MemoryStore::new();
    let limits = layer(&store, vec![per_user(100_000)]);
    let used = |user: &str| store.used(&key(&format!("limit_by_per_header:60:x-user:{user}")));
    grpc_call(&limits, "head", Some("3"), false, None).await;
    assert_eq!(used("head"), 0, "trailers-only INVALID_ARGUMENT");
    grpc_call(&limits, "trailers", None, false, Some("7")).await;
    assert_eq!(used("trailers"), 0, "PERMISSION_DENIED before any message");
    grpc_call(&limits, "late", None, true, Some("13")).await;
    assert!(
        used("late") >= 100,
        "INTERNAL after a message: {}",
        used("late")
    );
    grpc_call(&limits, "ok", None, true, Some("0")).await;
    assert!(used("ok") >= 100, "OK without usage: {}", used("ok"));
}

/// Over HTTP/2 the host is the `:authority` pseudo-header, which hyper puts in the URI, and no
/// `host` header carries it: a rule on `host` limits such requests as it does HTTP/1.1 ones.
#[tokio::test]
async fn a_host_rule_reads_the_authority_of_http2_requests() {
    let store = MemoryStore::new();
    let limits = layer(
        &store,
        vec![Rule::per_header("host").any_value().tokens_per_minute(150)],
    );
    let app = Router::new()
        .route(CHAT, post(mock_chat))
        .layer(limits.clone());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        // As hyper hands an HTTP/2 request over: the authority in the URI, no `host` header.
        let request = Request::post("http://tenant-a.example/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(STREAM))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        statuses.push(response.status());
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        limits.flush().await;
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(
        store.used(&key("limit_by_per_header:60:host:tenant-a.example")),
        200
    );
}

/// Reserve mode learns each rule's usual output from reported usage only: calls refused
/// without usage (charged nothing) do not teach an allowance of nothing, which would let every
/// client's next uncapped request reserve its prompt alone.
#[tokio::test]
async fn refused_calls_teach_no_output_allowance() {
    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tower_token_ratelimit::Mode;

    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .mode(Mode::Reserve)
        .rule(per_user(1_000_000))
        .build()
        .unwrap();
    let used = |user: &str| store.used(&key(&format!("limit_by_per_header:60:x-user:{user}")));
    // What an uncapped gRPC call reserves: read while its response is still open.
    let reserved = |user: &'static str| {
        let limits = limits.clone();
        async move {
            let svc = tower::service_fn(|_req: Request<Body>| async {
                let message = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                    Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x05hello")),
                )]);
                let body = StreamBody::new(message.chain(futures_util::stream::pending()));
                Ok::<_, std::convert::Infallible>(
                    axum::http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap(),
                )
            });
            let request = Request::post("/pkg.Svc/Call")
                .header("x-user", user)
                .header("content-type", "application/grpc")
                .body(Body::from(vec![0u8; 400]))
                .unwrap();
            let svc = tower::ServiceBuilder::new().layer(limits).service(svc);
            let _open = svc.oneshot(request).await.unwrap();
            used(user)
        }
    };
    let before = reserved("first").await;
    for _ in 0..32 {
        grpc_call(&limits, "refused", Some("3"), false, None).await;
    }
    assert_eq!(used("refused"), 0, "refused calls are free");
    assert_eq!(
        reserved("next").await,
        before,
        "an uncapped call's reservation after 32 refused calls"
    );
}

/// A store of one's own that refuses every reservation, with statuses that would admit it.
struct Refusing;

impl Store for Refusing {
    fn check(&self, counters: &[Counter]) -> StoreFuture<Vec<CounterStatus>> {
        let statuses = counters
            .iter()
            .map(|c| CounterStatus {
                used: 0,
                reset: c.window,
            })
            .collect();
        Box::pin(std::future::ready(Ok(statuses)))
    }

    fn debit(&self, _counters: &[Counter], _tokens: u64) -> StoreFuture<()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn reserve(
        &self,
        counters: &[Counter],
        _amount: u64,
    ) -> StoreFuture<tower_token_ratelimit::store::Reservation> {
        let statuses = counters
            .iter()
            .map(|c| CounterStatus {
                used: 0,
                reset: c.window,
            })
            .collect();
        Box::pin(std::future::ready(Ok(
            tower_token_ratelimit::store::Reservation {
                statuses,
                windows: None,
            },
        )))
    }
}

/// A store's refusal is a 429 whatever statuses come with it, never a panic: the layer does
/// not count on a store of one's own to agree with its reading of them.
#[tokio::test]
async fn a_refusal_with_statuses_that_admit_is_still_a_429() {
    let limits = TokenRateLimitLayer::builder()
        .store(Refusing)
        .mode(tower_token_ratelimit::Mode::Reserve)
        .rule(per_user(1_000))
        .build()
        .unwrap();
    let addr = serve_chat(limits).await;
    let r = send(addr, CHAT, &[("x-user", "u")], STREAM).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("60"));
}

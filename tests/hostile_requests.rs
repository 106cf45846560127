//! Hostile request input gets a bounded-time, bounded-memory answer, never a panic, and cannot
//! make two tenants share a counter.

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::post;
use common::mock_chat;
use tower::ServiceExt;
use tower_token_ratelimit::store::MemoryStore;
use tower_token_ratelimit::{Mode, Rule, TokenRateLimitConfig, TokenRateLimitLayer};

const CHAT: &str = "/v1/chat/completions";

fn app(limits: &TokenRateLimitLayer) -> Router {
    Router::new()
        .route(CHAT, post(mock_chat))
        .layer(limits.clone())
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Duration) {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .expect("bounded time")
        .unwrap();
    let status = r.status();
    axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, t.elapsed())
}

#[tokio::test]
async fn odd_header_values_never_share_a_counter() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(150),
        )
        .build()
        .unwrap();
    let app = app(&limits);
    // Invalid UTF-8 that decodes (lossily) to the same text, control bytes, a 64 KB value.
    let values: Vec<HeaderValue> = vec![
        HeaderValue::from_bytes(b"\xff\xfeuser").unwrap(),
        HeaderValue::from_bytes(b"\xfe\xffuser").unwrap(),
        HeaderValue::from_bytes(b"a\tb").unwrap(),
        HeaderValue::from_bytes(&vec![b'x'; 64 * 1024]).unwrap(),
        HeaderValue::from_static("a:b"),
        HeaderValue::from_static("{tenant}"),
    ];
    for v in &values {
        let req = Request::post(CHAT)
            .header("x-user", v.clone())
            .body(Body::from("{}"))
            .unwrap();
        let (status, took) = call(&app, req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(took < Duration::from_secs(1));
        limits.flush().await;
    }
    assert_eq!(
        store.len(),
        values.len(),
        "one counter each: no two values share one"
    );
    // Each got its own budget: a second request of each is still admitted (100 of 150 used).
    for v in &values {
        let req = Request::post(CHAT)
            .header("x-user", v.clone())
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(call(&app, req).await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn ten_thousand_cookies_and_forwarding_entries_take_bounded_time() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .trusted_proxies(["10.0.0.0/8"])
        .rule(
            Rule::per_cookie("uid")
                .any_value()
                .tokens_per_minute(1_000_000),
        )
        .rule(
            Rule::per_ip_from_header("x-forwarded-for")
                .any_value()
                .tokens_per_minute(1_000_000),
        )
        .build()
        .unwrap();
    let app = app(&limits);
    let cookies: String = (0..10_000)
        .map(|i| format!("c{i}=v{i}; "))
        .collect::<String>()
        + "uid=me";
    // 10,000 entries, all trusted proxies but the first: reading stops there.
    let xff: String = std::iter::once("203.0.113.7".to_string())
        .chain((0..9_999).map(|i| format!("10.0.{}.{}", i / 250, i % 250)))
        .collect::<Vec<_>>()
        .join(", ");
    let req = Request::post(CHAT)
        .header("cookie", cookies)
        .header("x-forwarded-for", xff)
        .body(Body::from("{}"))
        .unwrap();
    let (status, took) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(2), "{took:?}");
    limits.flush().await;
    assert_eq!(
        store.used("higress-token-ratelimit:{default}:limit_by_per_cookie:60:uid:me"),
        100
    );
    assert_eq!(
        store.used("higress-token-ratelimit:{default}:limit_by_per_ip:60:from-header-x-forwarded-for:203.0.113.7"),
        100
    );
}

#[tokio::test]
async fn a_100_mb_body_in_reserve_mode_is_read_only_up_to_the_limit() {
    let limits = TokenRateLimitLayer::builder()
        .mode(Mode::Reserve)
        .request_body_limit(64 * 1024)
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(u64::MAX / 4),
        )
        .build()
        .unwrap();
    // The upstream reads the whole body and reports its length.
    let app = Router::new()
        .route(
            CHAT,
            post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(limits.clone());
    // Sent in 1 MiB frames without a content-length, so the layer has to read it.
    let frames = (0..100)
        .map(|_| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(vec![b' '; 1 << 20])));
    let req = Request::post(CHAT)
        .header("x-user", "big")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), app.oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(
        &body[..],
        (100 << 20).to_string().as_bytes(),
        "the body passes on whole"
    );
}

#[test]
fn pathological_regexes_are_linear_or_refused() {
    // Catastrophic for a backtracking engine; linear here.
    let limits = TokenRateLimitLayer::builder()
        .rule(
            Rule::per_header("x-user")
                .matching("(a+)+$")
                .tokens_per_minute(10),
        )
        .build();
    assert!(limits.is_ok());
    // A pattern that compiles to more than the size limit is a configuration error.
    let cfg: TokenRateLimitConfig = serde_json::from_value(serde_json::json!({
        "rule_name": "r",
        "rule_items": [{"limit_by_per_header": "x", "limit_keys": [{"key": "regexp:(\\w{100}){100}", "token_per_minute": 1}]}]
    }))
    .unwrap();
    let err = TokenRateLimitLayer::from_config(cfg).unwrap_err();
    assert!(
        err.to_string().contains("rule_items[0].limit_keys[0].key"),
        "{err}"
    );
}

#[tokio::test]
async fn a_pathological_regex_matches_a_long_value_quickly() {
    let limits = TokenRateLimitLayer::builder()
        .rule(
            Rule::per_header("x-user")
                .matching("(a+)+$")
                .tokens_per_minute(10),
        )
        .build()
        .unwrap();
    let app = app(&limits);
    let evil = format!("{}!", "a".repeat(30_000));
    let req = Request::post(CHAT)
        .header("x-user", evil)
        .body(Body::from("{}"))
        .unwrap();
    let (status, took) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// A counter key of the default rule.
/// Sends each request of `requests` in turn (after the last one's debit) and gives the statuses.
async fn statuses(limits: &TokenRateLimitLayer, requests: Vec<Request<Body>>) -> Vec<u16> {
    let app = app(limits);
    let mut out = Vec::new();
    for req in requests {
        out.push(call(&app, req).await.0.as_u16());
        limits.flush().await;
    }
    out
}

fn with_header(name: &str, value: &[u8]) -> Request<Body> {
    chat_request(&[(name, value)])
}

fn to(uri: &str) -> Request<Body> {
    Request::post(uri).body(Body::from("{}")).unwrap()
}

/// Values are read as sent: UTF-8 beyond ASCII is text (an exact key `josé` applies), a cookie
/// pair that is not UTF-8 hides no other cookie, and query values that decode to bytes that are
/// not UTF-8 keep apart (each request costs 100 of a limit of 100: a second one on the same
/// counter is rejected).
#[tokio::test]
async fn utf8_values_and_odd_cookie_and_query_bytes_are_read_as_sent() {
    let exact = TokenRateLimitLayer::builder()
        .rule(Rule::header("x-user").value("josé").tokens_per_minute(100))
        .build()
        .unwrap();
    let josé = "josé".as_bytes();
    assert_eq!(
        statuses(
            &exact,
            vec![with_header("x-user", josé), with_header("x-user", josé)]
        )
        .await,
        [200, 429],
        "the listed key `josé` applies"
    );

    let cookie = TokenRateLimitLayer::builder()
        .rule(
            Rule::per_cookie("session")
                .any_value()
                .tokens_per_minute(100),
        )
        .build()
        .unwrap();
    assert_eq!(
        statuses(
            &cookie,
            vec![
                with_header("cookie", b"session=abc"),
                with_header("cookie", b"session=abc; x=\xe9"),
                with_header("cookie", b"x=\xe9; session=abc"),
                with_header("cookie", b"session=\xff"),
                with_header("cookie", b"session=\xfe"),
                with_header("cookie", b"a=1; session=\xff"),
            ]
        )
        .await,
        [200, 429, 429, 200, 200, 429],
        "a byte that is not UTF-8 elsewhere in the header hides no cookie, and values that \
         are not UTF-8 keep apart"
    );

    let param = TokenRateLimitLayer::builder()
        .rule(Rule::per_param("key").any_value().tokens_per_minute(100))
        .build()
        .unwrap();
    assert_eq!(
        statuses(
            &param,
            vec![
                to(&format!("{CHAT}?key=%FF")),
                to(&format!("{CHAT}?key=%FE")),
                to(&format!("{CHAT}?x=1&key=%FF")),
                to(&format!("{CHAT}?key=a+b")),
                to(&format!("{CHAT}?k%65y=a%20b")),
            ]
        )
        .await,
        [200, 200, 429, 200, 429],
        "%FF and %FE keep apart; `+` and `%20` are both a space, in names too"
    );
}

fn counter(rest: &str) -> String {
    format!("higress-token-ratelimit:{{default}}:{rest}")
}

/// The stored form of a hashed value: `sha256:` and the first 16 bytes of its SHA-256, in hex.
fn hashed(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn chat_request(headers: &[(&str, &[u8])]) -> Request<Body> {
    let mut req = Request::post(CHAT).body(Body::from("{}")).unwrap();
    for (name, value) in headers {
        req.headers_mut().append(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    req
}

#[tokio::test]
async fn secret_headers_in_composite_keys_are_hashed() {
    let store = MemoryStore::new();
    let cfg: TokenRateLimitConfig = serde_json::from_value(serde_json::json!({
        "rule_name": "default",
        "rule_items": [
            {"limit_by_composite": ["header:x-api-key", "header:x-team"],
             "limit_keys": [{"key": "*", "token_per_minute": 1_000_000}]},
            // Header names are case-insensitive; `secret: false` does not turn the hashing off
            // (as for a single `authorization` header).
            {"limit_by_composite": ["header:x-team", "header:Authorization"],
             "secret": false,
             "limit_keys": [{"key": "*", "token_per_minute": 1_000_000}]},
            // No secret part: readable, as before.
            {"limit_by_composite": ["header:x-user", "header:x-team"],
             "limit_keys": [{"key": "*", "token_per_minute": 1_000_000}]},
            // `secret: true` hashes any composite.
            {"limit_by_composite": ["header:x-team", "header:x-user"],
             "secret": true,
             "limit_keys": [{"key": "*", "token_per_minute": 1_000_000}]}
        ]
    }))
    .unwrap();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .config(cfg)
        .build()
        .unwrap();
    let app = app(&limits);
    let req = chat_request(&[
        ("x-api-key", b"sk-live-SECRET"),
        ("authorization", b"Bearer sk-SECRET2"),
        ("x-team", b"t1"),
        ("x-user", b"alice"),
    ]);
    assert_eq!(call(&app, req).await.0, StatusCode::OK);
    limits.flush().await;

    let api_key = "limit_by_composite:60:header:x-api-key+header:x-team:";
    let auth = "limit_by_composite:60:header:x-team+header:Authorization:";
    assert_eq!(
        store.used(&counter(&format!("{api_key}sk-live-SECRET|t1"))),
        0,
        "an API key is stored raw in a composite counter key"
    );
    assert_eq!(
        store.used(&counter(&format!("{auth}t1|Bearer sk-SECRET2"))),
        0,
        "an authorization header is stored raw in a composite counter key"
    );
    assert_eq!(
        store.used(&counter(&format!(
            "{api_key}{}",
            hashed(b"sk-live-SECRET|t1")
        ))),
        100
    );
    assert_eq!(
        store.used(&counter(&format!(
            "{auth}{}",
            hashed(b"t1|Bearer sk-SECRET2")
        ))),
        100
    );
    assert_eq!(
        store.used(&counter(
            "limit_by_composite:60:header:x-user+header:x-team:alice|t1"
        )),
        100
    );
    assert_eq!(
        store.used(&counter(&format!(
            "limit_by_composite:60:header:x-team+header:x-user:{}",
            hashed(b"t1|alice")
        ))),
        100
    );
    assert_eq!(store.len(), 4);
}

#[tokio::test]
async fn gemini_and_proxy_credentials_are_hashed() {
    for (header, secret) in [
        ("x-goog-api-key", &b"AIzaSECRET"[..]),
        ("proxy-authorization", &b"Basic U0VDUkVU"[..]),
    ] {
        let store = MemoryStore::new();
        let limits = TokenRateLimitLayer::builder()
            .store(store.clone())
            .rule(
                Rule::per_header(header)
                    .any_value()
                    .tokens_per_minute(1_000_000),
            )
            .build()
            .unwrap();
        let app = app(&limits);
        assert_eq!(
            call(&app, chat_request(&[(header, secret)])).await.0,
            StatusCode::OK
        );
        limits.flush().await;
        let prefix = format!("limit_by_per_header:60:{header}:");
        let raw = counter(&format!("{prefix}{}", String::from_utf8_lossy(secret)));
        assert_eq!(store.used(&raw), 0, "{header} stored raw: {raw}");
        assert_eq!(
            store.used(&counter(&format!("{prefix}{}", hashed(secret)))),
            100
        );
    }
}

/// A memory store and a layer with 100 tokens a minute per `x-user` × `x-team` pair.
fn user_team_limits() -> (MemoryStore, TokenRateLimitLayer) {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::composite(["header:x-user", "header:x-team"])
                .any_value()
                .tokens_per_minute(100),
        )
        .build()
        .unwrap();
    (store, limits)
}

/// The counter of [`user_team_limits`] for the stored value `v`.
fn user_team_key(v: &str) -> String {
    counter(&format!(
        "limit_by_composite:60:header:x-user+header:x-team:{v}"
    ))
}

#[tokio::test]
async fn composite_keys_keep_non_utf8_values_apart() {
    let (store, limits) = user_team_limits();
    let app = app(&limits);
    // Both decode (lossily) to `\u{fffd}|t`.
    let a: &[(&str, &[u8])] = &[("x-user", b"\xff"), ("x-team", b"t")];
    let b: &[(&str, &[u8])] = &[("x-user", b"\xfe"), ("x-team", b"t")];
    assert_eq!(call(&app, chat_request(a)).await.0, StatusCode::OK);
    limits.flush().await;
    assert_eq!(
        call(&app, chat_request(a)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        call(&app, chat_request(b)).await.0,
        StatusCode::OK,
        "user \\xfe is rejected on user \\xff's spent counter"
    );
    // A non-UTF-8 part as the last part too.
    let c: &[(&str, &[u8])] = &[("x-user", b"u"), ("x-team", b"\xff")];
    let d: &[(&str, &[u8])] = &[("x-user", b"u"), ("x-team", b"\xfe")];
    assert_eq!(call(&app, chat_request(c)).await.0, StatusCode::OK);
    limits.flush().await;
    assert_eq!(call(&app, chat_request(d)).await.0, StatusCode::OK);
    // Plain values keep their readable key.
    assert_eq!(
        call(
            &app,
            chat_request(&[("x-user", b"alice"), ("x-team", b"t")])
        )
        .await
        .0,
        StatusCode::OK
    );
    limits.flush().await;
    assert_eq!(store.used(&user_team_key("alice|t")), 100);
    // The raw bytes joined with `|`, hashed as a single non-UTF-8 value is.
    assert_eq!(store.used(&user_team_key(&hashed(b"\xff|t"))), 100);
    assert_eq!(store.used(&user_team_key(&hashed(b"\xfe|t"))), 100);
    assert_eq!(store.used(&user_team_key(&hashed(b"u|\xff"))), 100);
    assert_eq!(store.used(&user_team_key(&hashed(b"u|\xfe"))), 100);
    assert_eq!(store.len(), 5);
}

/// Parts are joined with `|` in the text a `regexp:` sees, but a part holding `|` (or the `\`
/// that escapes it) cannot make its list of parts address another list's counter.
#[tokio::test]
async fn composite_parts_holding_the_separator_keep_apart() {
    let (store, limits) = user_team_limits();
    let app = app(&limits);
    // The first joins to the victim's text, `a|b|c`; the other two would share a counter if
    // only `|` were escaped (both `a\|b\|c`).
    let victim: &[(&str, &[u8])] = &[("x-user", b"a"), ("x-team", b"b|c")];
    let others: [&[(&str, &[u8])]; 3] = [
        &[("x-user", b"a|b"), ("x-team", b"c")],
        &[("x-user", b"a\\"), ("x-team", b"b|c")],
        &[("x-user", b"a|b\\"), ("x-team", b"c")],
    ];
    for other in others {
        assert_eq!(call(&app, chat_request(other)).await.0, StatusCode::OK);
    }
    limits.flush().await;
    assert_eq!(
        call(&app, chat_request(victim)).await.0,
        StatusCode::OK,
        "parts that join to the same text share a counter"
    );
    limits.flush().await;
    assert_eq!(
        call(&app, chat_request(victim)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Each list of parts has its own counter, stored hashed; plain parts keep their readable key.
    for encoded in [&b"a|b\\|c"[..], b"a\\|b|c", b"a\\\\|b\\|c", b"a\\|b\\\\|c"] {
        assert_eq!(
            store.used(&user_team_key(&hashed(encoded))),
            100,
            "{encoded:?}"
        );
    }
    assert_eq!(store.len(), 4);
    assert_eq!(
        call(&app, chat_request(&[("x-user", b"u"), ("x-team", b"t")]))
            .await
            .0,
        StatusCode::OK
    );
    limits.flush().await;
    assert_eq!(store.used(&user_team_key("u|t")), 100);
}

/// A consumer read from a secret header (`consumer_header: x-api-key`: the key is the
/// identity) is hashed in counter keys like the header itself would be.
#[tokio::test]
async fn a_consumer_from_a_secret_header_is_hashed() {
    let store = MemoryStore::new();
    let config: tower_token_ratelimit::TokenRateLimitConfig =
        serde_json::from_value(serde_json::json!({
            "rule_name": "default",
            "consumer_header": "x-api-key",
            "rule_items": [
                {"limit_by_per_consumer": "", "limit_keys": [{"key": "*", "token_per_minute": 1_000_000}]}
            ]
        }))
        .unwrap();
    let limits = TokenRateLimitLayer::builder()
        .config(config)
        .store(store.clone())
        .build()
        .unwrap();
    let app = app(&limits);
    let secret = &b"sk-live-SECRET"[..];
    assert_eq!(
        call(&app, chat_request(&[("x-api-key", secret)])).await.0,
        StatusCode::OK
    );
    limits.flush().await;
    let prefix = "limit_by_per_consumer:60:x-mse-consumer:";
    assert_eq!(
        store.used(&counter(&format!("{prefix}sk-live-SECRET"))),
        0,
        "stored raw"
    );
    assert_eq!(
        store.used(&counter(&format!("{prefix}{}", hashed(secret)))),
        100
    );
}

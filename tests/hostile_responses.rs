//! Broken, hostile or huge upstream responses never panic and are charged the estimate; a
//! stream the upstream cuts mid-way is charged the estimate too.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use common::serve;
use tower::ServiceExt;
use tower_token_ratelimit::store::MemoryStore;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

fn layer(store: &MemoryStore) -> TokenRateLimitLayer {
    TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::per_header("x-case")
                .any_value()
                .tokens_per_day(u64::MAX / 2),
        )
        .build()
        .unwrap()
}

fn used(store: &MemoryStore, case: &str) -> u64 {
    store.used(&format!(
        "higress-token-ratelimit:{{default}}:limit_by_per_header:86400:x-case:{case}"
    ))
}

/// Request body of 80 bytes: 20 tokens. It asks for usage itself, so the stream is passed on
/// whole.
const REQUEST: &str =
    r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"x":"......"}"#;
const REQUEST_TOKENS: u64 = 20;

#[tokio::test]
async fn broken_usage_is_charged_the_estimate() {
    let mut huge = b"data: {\"choices\":[],\"usage\":{\"total_tokens\":5},\"pad\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 50 << 20));
    huge.extend_from_slice(b"\"}\n\ndata: [DONE]\n\n");
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("null", "text/event-stream", b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n".to_vec()),
        ("negative", "text/event-stream", b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":-1,\"total_tokens\":-6}}\n\n".to_vec()),
        ("absurd", "text/event-stream", b"data: {\"choices\":[],\"usage\":{\"total_tokens\":99999999999999999999}}\n\n".to_vec()),
        ("over-2^53", "application/json", b"{\"usage\":{\"total_tokens\":9007199254740993}}".to_vec()),
        ("truncated", "text/event-stream", b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_to".to_vec()),
        ("truncated-json", "application/json", b"{\"id\":\"x\",\"usage\":{\"prompt_tokens\":5,".to_vec()),
        ("garbage", "text/event-stream", (0..=255u8).cycle().take(100_000).collect()),
        ("garbage-json", "application/json", b"\xff\xfe{{{{[[[[\"usage\":".to_vec()),
        ("50MB-event", "text/event-stream", huge),
    ];
    let store = MemoryStore::new();
    let limits = layer(&store);
    for (case, content_type, body) in cases {
        let bytes = Bytes::from(body);
        let served = bytes.clone();
        let app = Router::new()
            .route(
                "/v1/chat/completions",
                post(move || {
                    let b = served.clone();
                    async move {
                        // 64 KiB frames, like a real upstream.
                        let frames: Vec<Result<Bytes, Infallible>> = (0..b.len())
                            .step_by(1 << 16)
                            .map(|i| Ok(b.slice(i..(i + (1 << 16)).min(b.len()))))
                            .collect();
                        Response::builder()
                            .header("content-type", content_type)
                            .body(Body::from_stream(futures_util::stream::iter(frames)))
                            .unwrap()
                    }
                }),
            )
            .layer(limits.clone());
        let req = Request::post("/v1/chat/completions")
            .header("x-case", case)
            .header("content-length", REQUEST.len())
            .body(Body::from(REQUEST))
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(60), app.oneshot(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{case}");
        let got = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(got == bytes, "{case}: body passes through unchanged");
        limits.flush().await;
        let output = if content_type == "text/event-stream" {
            bytes.len().div_ceil(64) as u64
        } else {
            bytes.len().div_ceil(4) as u64
        };
        assert_eq!(
            used(&store, case),
            REQUEST_TOKENS + output,
            "{case}: charged the estimate"
        );
    }
}

#[tokio::test]
async fn a_stream_the_upstream_cuts_is_charged_the_estimate() {
    let store = MemoryStore::new();
    let limits = layer(&store);
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async {
                let frames: Vec<Result<Bytes, std::io::Error>> = vec![
                    Ok(Bytes::from_static(
                        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
                    )),
                    Ok(Bytes::from_static(
                        b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
                    )),
                    Err(std::io::Error::other("upstream reset")),
                ];
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(futures_util::stream::iter(frames)))
                    .unwrap()
            }),
        )
        .layer(limits.clone());
    let addr = serve(app).await;
    // The client sees the connection end early; the layer charges what it saw.
    let req = axum::http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("x-case", "cut")
        .body(http_body_util::Full::new(Bytes::from_static(
            REQUEST.as_bytes(),
        )))
        .unwrap();
    // Cut before or after the response head reached the client, depending on timing.
    if let Ok(resp) = common::client().request(req).await {
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_err(), "the stream was cut");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while used(&store, "cut") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never charged");
        tokio::time::sleep(Duration::from_millis(20)).await;
        limits.flush().await;
    }
    // The request's tokens + max(2 events, 96 bytes / 64).
    assert_eq!(used(&store, "cut"), REQUEST_TOKENS + 2);
}

//! SPEC 3.4: streaming OpenAI requests are made to report usage, and a client that did not ask
//! for it receives exactly the stream it would have received.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response};
use axum::routing::post;
use bytes::Bytes;
use common::{send, serve};
use tower_token_ratelimit::store::MemoryStore;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

const CHAT: &str = "/v1/chat/completions";

/// What the upstream saw, and the exact bytes it streamed back.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Bytes, Bytes)>>>);

/// Like OpenAI: the usage chunk (and `"usage":null` on the others) only when asked for.
/// `x-frames`: the frame size, or `event` for one event per frame (default 37). Gzipped, in
/// one frame, when the request accepts gzip.
async fn openai_like(State(seen): State<Seen>, h: HeaderMap, body: Bytes) -> Response<Body> {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let with_usage = v["stream_options"]["include_usage"] == true;
    let null = if with_usage { r#","usage":null"# } else { "" };
    let mut out = String::new();
    for word in ["Once", " upon", " a", " time"] {
        out.push_str(&format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]{null}}}\n\n"
        ));
    }
    if with_usage {
        out.push_str("data: {\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":4,\"total_tokens\":24}}\n\n");
    }
    out.push_str("data: [DONE]\n\n");
    let bytes = Bytes::from(out);
    seen.0.lock().unwrap().push((body, bytes.clone()));
    if h.get("accept-encoding")
        .is_some_and(|v| v.to_str().unwrap().contains("gzip"))
    {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("content-encoding", "gzip")
            .body(Body::from(gz.finish().unwrap()))
            .unwrap();
    }
    let framing = h.get("x-frames").map(|v| v.to_str().unwrap().to_owned());
    let frames: Vec<Result<Bytes, Infallible>> = match framing.as_deref() {
        Some("event") => bytes
            .split_inclusive(|&b| b == b'\n')
            .collect::<Vec<_>>()
            .chunks(2)
            .map(|lines| Ok(Bytes::from(lines.concat())))
            .collect(),
        // Frames that split events anywhere.
        size => bytes
            .chunks(size.map_or(37, |s| s.parse().unwrap()))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect(),
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap()
}

/// 10,000 tokens a minute per `x-user`, counted in `store`.
fn per_user(store: &MemoryStore) -> tower_token_ratelimit::TokenRateLimitLayerBuilder {
    TokenRateLimitLayer::builder().store(store.clone()).rule(
        Rule::per_header("x-user")
            .any_value()
            .tokens_per_minute(10_000),
    )
}

async fn setup(
    inject: bool,
    body_limit: Option<usize>,
) -> (std::net::SocketAddr, Seen, MemoryStore, TokenRateLimitLayer) {
    let store = MemoryStore::new();
    let mut builder = per_user(&store).inject_include_usage(inject);
    if let Some(limit) = body_limit {
        builder = builder.request_body_limit(limit);
    }
    let limits = builder.build().unwrap();
    let seen = Seen::default();
    let app = Router::new()
        .route(CHAT, post(openai_like))
        .with_state(seen.clone())
        .layer(limits.clone());
    (serve(app).await, seen, store, limits)
}

fn used(store: &MemoryStore, user: &str) -> u64 {
    store.used(&format!(
        "higress-token-ratelimit:{{default}}:limit_by_per_header:60:x-user:{user}"
    ))
}

#[tokio::test]
async fn a_client_that_did_not_ask_gets_no_usage_chunk_and_is_charged_exactly() {
    let (addr, seen, store, limits) = setup(true, None).await;
    let request = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(
        addr,
        CHAT,
        &[("x-user", "a"), ("content-type", "application/json")],
        request,
    )
    .await;
    let (upstream_got, upstream_sent) = seen.0.lock().unwrap()[0].clone();
    let got: serde_json::Value = serde_json::from_slice(&upstream_got).unwrap();
    assert_eq!(
        got["stream_options"]["include_usage"], true,
        "the upstream was asked for usage"
    );
    assert_eq!(
        got["messages"][0]["content"], "hi",
        "the rest of the request is kept"
    );

    // The client's stream is the upstream's minus the usage chunk, byte for byte.
    let usage_event = "data: {\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":4,\"total_tokens\":24}}\n\n";
    let expected = String::from_utf8(upstream_sent.to_vec())
        .unwrap()
        .replace(usage_event, "");
    assert_ne!(expected.len(), upstream_sent.len());
    assert_eq!(String::from_utf8(r.body.to_vec()).unwrap(), expected);
    assert!(!expected.contains("\"total_tokens\""));

    limits.flush().await;
    assert_eq!(
        used(&store, "a"),
        24,
        "charged the reported usage, not an estimate"
    );
}

/// A client that accepts gzip and did not ask for usage: the layer asks the upstream for
/// usage and for an unencoded stream, the one it can remove the usage chunk from. One that asked
/// for usage itself gets the upstream's gzip, and is charged from it as well.
#[tokio::test]
async fn a_client_accepting_gzip_gets_no_usage_chunk_it_did_not_ask_for() {
    let (addr, seen, store, limits) = setup(true, None).await;
    let headers = [
        ("x-user", "a"),
        ("content-type", "application/json"),
        ("accept-encoding", "gzip, deflate"),
    ];
    let r = send(addr, CHAT, &headers, r#"{"model":"m","stream":true}"#).await;
    assert_eq!(r.headers.get("content-encoding"), None);
    let body = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(body.contains("Once"), "{body}");
    assert!(!body.contains("total_tokens"), "{body}");
    limits.flush().await;
    assert_eq!(used(&store, "a"), 24);

    let asked = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let r = send(addr, CHAT, &headers, asked).await;
    assert_eq!(r.headers["content-encoding"], "gzip");
    let mut plain = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut plain)
        .unwrap();
    assert_eq!(plain.as_bytes(), seen.0.lock().unwrap()[1].1);
    assert!(plain.contains("\"total_tokens\":24"));
    limits.flush().await;
    assert_eq!(used(&store, "a"), 48);
}

/// However the upstream frames its stream (one event per frame, as LLM servers flush, or
/// pieces of any size), the client gets it byte for byte minus the usage chunk.
#[tokio::test]
async fn the_usage_chunk_is_removed_at_any_framing() {
    let (addr, seen, store, limits) = setup(true, None).await;
    let request = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let framings = ["event", "1", "2", "5", "13", "64", "130", "100000"];
    for (i, framing) in framings.into_iter().enumerate() {
        let r = send(
            addr,
            CHAT,
            &[
                ("x-user", "a"),
                ("x-frames", framing),
                ("content-type", "application/json"),
            ],
            request,
        )
        .await;
        let upstream_sent = seen.0.lock().unwrap()[i].1.clone();
        let sent = String::from_utf8(upstream_sent.to_vec()).unwrap();
        let usage_at = sent
            .find("data: {\"object\":\"chat.completion.chunk\",\"choices\":[],")
            .unwrap();
        let usage_end = usage_at + sent[usage_at..].find("\n\n").unwrap() + 2;
        let expected = format!("{}{}", &sent[..usage_at], &sent[usage_end..]);
        assert_eq!(
            String::from_utf8(r.body.to_vec()).unwrap(),
            expected,
            "frames: {framing}"
        );
        limits.flush().await;
        assert_eq!(used(&store, "a"), 24 * (i as u64 + 1), "frames: {framing}");
    }
}

#[tokio::test]
async fn a_client_that_asked_gets_everything_and_its_request_untouched() {
    let (addr, seen, store, limits) = setup(true, None).await;
    let request =
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let r = send(
        addr,
        CHAT,
        &[("x-user", "b"), ("content-type", "application/json")],
        request,
    )
    .await;
    let (upstream_got, upstream_sent) = seen.0.lock().unwrap()[0].clone();
    assert_eq!(upstream_got, request.as_bytes());
    assert_eq!(r.body, upstream_sent);
    limits.flush().await;
    assert_eq!(used(&store, "b"), 24);
}

#[tokio::test]
async fn turned_off_the_request_is_untouched_and_the_charge_is_an_estimate() {
    let (addr, seen, store, limits) = setup(false, None).await;
    let request = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let r = send(
        addr,
        CHAT,
        &[("x-user", "c"), ("content-type", "application/json")],
        request,
    )
    .await;
    let (upstream_got, upstream_sent) = seen.0.lock().unwrap()[0].clone();
    assert_eq!(upstream_got, request.as_bytes());
    assert_eq!(r.body, upstream_sent);
    limits.flush().await;
    // 47-byte request (12 tokens) + the larger of 5 data events and the stream's bytes / 64.
    let output = 5.max(upstream_sent.len().div_ceil(64) as u64);
    assert_eq!(used(&store, "c"), 12 + output);
}

#[tokio::test]
async fn bodies_over_the_limit_and_non_streaming_requests_pass_untouched() {
    let (addr, seen, _store, _limits) = setup(true, Some(64)).await;
    let long = format!(
        r#"{{"model":"gpt-4o","stream":true,"messages":[{{"content":"{}"}}]}}"#,
        "x".repeat(200)
    );
    send(addr, CHAT, &[("x-user", "d")], &long).await;
    assert_eq!(seen.0.lock().unwrap()[0].0, long.as_bytes());
}

/// A chunked request body (no content-length) longer than the limit: the layer reads past the
/// limit, then hands on what it read followed by the rest, unchanged.
#[tokio::test]
async fn a_chunked_body_over_the_limit_is_passed_on_whole() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let (addr, seen, _store, _limits) = setup(true, Some(64)).await;
    let long = format!(
        r#"{{"model":"gpt-4o","stream":true,"messages":[{{"content":"{}"}}]}}"#,
        "y".repeat(300)
    );
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = long
        .as_bytes()
        .chunks(50)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::combinators::BoxBody<Bytes, Infallible>>();
    let req = axum::http::Request::post(format!("http://{addr}{CHAT}"))
        .header("x-user", "e")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert!(resp.status().is_success());
    resp.into_body().collect().await.unwrap();
    assert_eq!(seen.0.lock().unwrap()[0].0, long.as_bytes());

    // Under the limit and chunked: read whole, and usage asked for.
    let short = r#"{"model":"m","stream":true}"#;
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = short
        .as_bytes()
        .chunks(5)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let req = axum::http::Request::post(format!("http://{addr}{CHAT}"))
        .header("x-user", "e")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    client
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let got: serde_json::Value = serde_json::from_slice(&seen.0.lock().unwrap()[1].0).unwrap();
    assert_eq!(got["stream_options"]["include_usage"], true);
}

/// SSE lets a line end in `\r` alone. An upstream whose events end so sends its first event,
/// then waits until the client has it: each event reaches the client as it ends (none is held
/// back for a `\n` that never comes), and the usage chunk is still removed.
#[tokio::test]
async fn events_ending_in_carriage_returns_reach_the_client_as_they_come() {
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, Full};
    use tokio::sync::Notify;

    const FIRST: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\r\r";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":4,\"total_tokens\":24}}\r\r";
    const DONE: &str = "data: [DONE]\r\r";
    let release = Arc::new(Notify::new());
    let upstream = {
        let release = release.clone();
        move || async move {
            let rest = async move {
                release.notified().await;
                Ok::<_, Infallible>(Bytes::from_static(USAGE.as_bytes()))
            };
            let frames =
                futures_util::stream::once(async { Ok(Bytes::from_static(FIRST.as_bytes())) })
                    .chain(futures_util::stream::once(rest))
                    .chain(futures_util::stream::once(async {
                        Ok(Bytes::from_static(DONE.as_bytes()))
                    }));
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(frames))
                .unwrap()
        }
    };
    let store = MemoryStore::new();
    let limits = per_user(&store).build().unwrap();
    let addr = serve(
        Router::new()
            .route(CHAT, post(upstream))
            .layer(limits.clone()),
    )
    .await;

    let request = axum::http::Request::post(format!("http://{addr}{CHAT}"))
        .header("x-user", "a")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let mut body = common::client().request(request).await.unwrap().into_body();
    let mut got = Vec::new();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while got.len() < FIRST.len() {
            let frame = body.frame().await.expect("the body ended").unwrap();
            got.extend_from_slice(&frame.into_data().unwrap());
        }
    })
    .await;
    assert!(first.is_ok(), "the first event was held back");
    release.notify_one();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(10), body.collect())
        .await
        .expect("the stream did not end")
        .unwrap()
        .to_bytes();
    got.extend_from_slice(&rest);
    assert_eq!(String::from_utf8(got).unwrap(), format!("{FIRST}{DONE}"));
    limits.flush().await;
    assert_eq!(used(&store, "a"), 24, "charged the reported usage");
}

/// A chunked request whose body the layer rewrites goes on with the new length and without
/// `Transfer-Encoding` (a message must not give both).
#[tokio::test]
async fn a_rewritten_chunked_request_has_a_length_and_no_transfer_encoding() {
    use tower::ServiceExt;

    let seen: Arc<Mutex<Option<(HeaderMap, Bytes)>>> = Arc::default();
    let upstream = {
        let seen = seen.clone();
        move |h: HeaderMap, body: Bytes| async move {
            *seen.lock().unwrap() = Some((h, body));
            "{}"
        }
    };
    let limits = per_user(&MemoryStore::new()).build().unwrap();
    let app = Router::new().route(CHAT, post(upstream)).layer(limits);
    let request = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let pieces: Vec<Result<Bytes, Infallible>> = request
        .as_bytes()
        .chunks(7)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let req = axum::http::Request::post(CHAT)
        .header("x-user", "a")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(futures_util::stream::iter(pieces)))
        .unwrap();
    app.oneshot(req).await.unwrap();
    let (headers, body) = seen
        .lock()
        .unwrap()
        .take()
        .expect("the upstream was called");
    assert!(body.len() > request.len(), "include_usage was added");
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    assert!(headers.get("transfer-encoding").is_none());
}

/// `"stream_options": null`, which OpenAI's schema allows, is replaced by the usage request:
/// a second `stream_options` key after it would make upstreams whose parsers refuse duplicate
/// keys (serde-derived request types) refuse a request that was valid as sent.
#[tokio::test]
async fn stream_options_null_is_replaced_not_repeated() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ChatRequest {
        #[allow(dead_code)]
        model: String,
        #[allow(dead_code)]
        stream: bool,
        stream_options: Option<serde_json::Value>,
        #[allow(dead_code)]
        messages: serde_json::Value,
    }
    let (addr, seen, _store, _limits) = setup(true, None).await;
    let request = r#"{"model":"gpt-4o","stream":true,"stream_options":null,"messages":[{"role":"user","content":"hi"}]}"#;
    serde_json::from_str::<ChatRequest>(request).expect("the client's request is valid");
    let r = send(
        addr,
        CHAT,
        &[("x-user", "a"), ("content-type", "application/json")],
        request,
    )
    .await;
    assert_eq!(r.status, 200);
    let (upstream_got, _) = seen.0.lock().unwrap()[0].clone();
    let parsed = serde_json::from_slice::<ChatRequest>(&upstream_got).unwrap_or_else(|e| {
        panic!(
            "upstream got {}: {e}",
            String::from_utf8_lossy(&upstream_got)
        )
    });
    assert_eq!(
        parsed.stream_options,
        Some(serde_json::json!({"include_usage": true}))
    );
}

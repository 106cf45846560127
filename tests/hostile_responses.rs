//! Broken or hostile upstream responses never panic and are charged the estimate; a stream
//! the upstream cuts mid-way is charged the estimate too; events past the cap and decompression
//! bombs are metered by their usage in bounded memory.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::io::Write;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use common::serve;
use tower::ServiceExt;
use tower_token_ratelimit::store::MemoryStore;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

/// The system allocator, counting each thread's heap in use and its peak. Only the test that
/// reads the counters depends on them; tests running on other threads do not disturb them.
struct CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

thread_local! {
    static IN_USE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = IN_USE.try_with(|in_use| {
        let now = in_use.get() + delta;
        in_use.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        q
    }
}

/// Sends `req` to `app` and reads the answer's body (200 OK): its length, and the most heap
/// this thread had in use meanwhile above what it had before.
async fn read_counting_heap(app: Router, req: Request<Body>) -> (usize, isize) {
    let base = IN_USE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let r = app.oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body();
    let mut got = 0;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        got += frame.unwrap().into_data().unwrap().len();
    }
    drop(body);
    (got, PEAK.with(Cell::get) - base)
}

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

/// [`REQUEST`] to `/v1/chat/completions`, counted under `case`.
fn request(case: &str) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("x-case", case)
        .header("content-length", REQUEST.len())
        .body(Body::from(REQUEST))
        .unwrap()
}

/// An upstream at `/v1/chat/completions` behind `limits`, answering every request with
/// `bytes` in `frame`-byte frames and these headers.
fn upstream(
    limits: &TokenRateLimitLayer,
    bytes: Bytes,
    frame: usize,
    headers: Vec<(&'static str, &'static str)>,
) -> Router {
    let answer = move || {
        let frames: Vec<Result<Bytes, Infallible>> = (0..bytes.len())
            .step_by(frame)
            .map(|i| Ok(bytes.slice(i..(i + frame).min(bytes.len()))))
            .collect();
        let mut response = Response::builder();
        for (name, value) in &headers {
            response = response.header(*name, *value);
        }
        let response = response
            .body(Body::from_stream(futures_util::stream::iter(frames)))
            .unwrap();
        async move { response }
    };
    Router::new()
        .route("/v1/chat/completions", post(answer))
        .layer(limits.clone())
}

#[tokio::test]
async fn broken_usage_is_charged_the_estimate() {
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("null", "text/event-stream", b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n".to_vec()),
        ("negative", "text/event-stream", b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":-1,\"total_tokens\":-6}}\n\n".to_vec()),
        ("absurd", "text/event-stream", b"data: {\"choices\":[],\"usage\":{\"total_tokens\":99999999999999999999}}\n\n".to_vec()),
        ("over-2^53", "application/json", b"{\"usage\":{\"total_tokens\":9007199254740993}}".to_vec()),
        ("truncated", "text/event-stream", b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_to".to_vec()),
        ("truncated-json", "application/json", b"{\"id\":\"x\",\"usage\":{\"prompt_tokens\":5,".to_vec()),
        ("garbage", "text/event-stream", (0..=255u8).cycle().take(100_000).collect()),
        ("garbage-json", "application/json", b"\xff\xfe{{{{[[[[\"usage\":".to_vec()),
    ];
    let store = MemoryStore::new();
    let limits = layer(&store);
    for (case, content_type, body) in cases {
        let bytes = Bytes::from(body);
        let served = bytes.clone();
        // 64 KiB frames, like a real upstream.
        let app = upstream(
            &limits,
            served,
            1 << 16,
            vec![("content-type", content_type)],
        );
        let req = request(case);
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

/// Events and JSON bodies past the 1 MiB cap (an image generation's `response.completed`, which
/// repeats the image; a Gemini chunk carrying one) are charged the usage they report, read as
/// they pass in bounded memory, not the estimate; a usage nested in their content is not
/// theirs.
#[tokio::test]
async fn events_past_the_cap_are_charged_their_usage() {
    let event = |head: &str, pad: usize, tail: &str| {
        let mut event = head.as_bytes().to_vec();
        event.extend(std::iter::repeat_n(b'A', pad));
        event.extend_from_slice(tail.as_bytes());
        event
    };
    let cases = [
        (
            "chat-50MB",
            event(
                r#"data: {"choices":[],"usage":{"total_tokens":5},"pad":""#,
                50 << 20,
                "\"}\n\ndata: [DONE]\n\n",
            ),
            Some(5),
        ),
        (
            "responses-image",
            event(
                "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"image_generation_call\",\"result\":\"",
                3 << 20,
                r#""}],"usage":{"input_tokens":20,"output_tokens":1056,"total_tokens":1076},"user":null},"sequence_number":9}"#,
            ),
            Some(1076),
        ),
        (
            "gemini-image",
            event(
                r#"data: {"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":""#,
                2 << 20,
                "\"}}]}}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":1290,\"totalTokenCount\":1299}}\r\n\r\n",
            ),
            Some(1299),
        ),
        // JSON bodies past the cap: the usage first (as Mistral orders a body), and a usage
        // echoed after the body's own (request metadata), which is not the body's.
        (
            "json-usage-first",
            event(
                r#"{"usage":{"prompt_tokens":3,"completion_tokens":900,"total_tokens":903},"choices":[{"message":{"content":""#,
                2 << 20,
                r#""}}]}"#,
            ),
            Some(903),
        ),
        (
            "json-echoed-usage",
            event(
                r#"{"output":[{"type":"image_generation_call","result":""#,
                2 << 20,
                r#""}],"usage":{"input_tokens":20,"output_tokens":1056,"total_tokens":1076},"metadata":{"usage":{"total_tokens":1}}}"#,
            ),
            Some(1076),
        ),
        // Only a usage the model wrote (a function's arguments): the estimate.
        (
            "nested-only",
            event(
                r#"data: {"candidates":[{"content":{"parts":[{"functionCall":{"args":{"usage":{"total_tokens":1},"x":""#,
                2 << 20,
                "\"}}}]}}]}\n\n",
            ),
            None,
        ),
    ];
    let store = MemoryStore::new();
    let limits = layer(&store);
    for (case, body, usage) in cases {
        let bytes = Bytes::from(body);
        let content_type = if bytes.starts_with(b"{") {
            "application/json"
        } else {
            "text/event-stream"
        };
        let app = upstream(
            &limits,
            bytes.clone(),
            1 << 16,
            vec![("content-type", content_type)],
        );
        let req = request(case);
        let (got, peak) =
            tokio::time::timeout(Duration::from_secs(60), read_counting_heap(app, req))
                .await
                .unwrap();
        assert_eq!(
            got,
            bytes.len(),
            "{case}: the body passes through unchanged"
        );
        // The event's first MiB is kept before it is known to be past the cap.
        assert!(
            peak < 2 << 20,
            "{case}: peak heap while metering {peak} bytes"
        );
        limits.flush().await;
        let estimate = REQUEST_TOKENS + bytes.len().div_ceil(64) as u64;
        assert_eq!(used(&store, case), usage.unwrap_or(estimate), "{case}");
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

/// A few KiB of zstd or brotli that decode to 64 MiB: the side copy the meter decodes is handed
/// to the scanner piece by piece, so the heap it takes is the decoder's window and a buffer,
/// whatever the ratio (it was the whole decoded size, or 128 MiB per 4 KiB of zstd). The usage
/// after the bomb is still read.
#[tokio::test]
async fn decompression_bombs_are_metered_in_bounded_memory() {
    const DECODED: usize = 64 << 20;
    const USAGE: &[u8] = b"\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3,\"total_tokens\":5}}\n\ndata: [DONE]\n\n";
    let zeros = vec![0u8; 1 << 20];
    let mut zstd = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let mut br = Vec::new();
    {
        // Brotli's default window, 4 MiB.
        let mut brotli = brotli::CompressorWriter::new(&mut br, 1 << 16, 5, 22);
        for _ in 0..DECODED >> 20 {
            zstd.write_all(&zeros).unwrap();
            brotli.write_all(&zeros).unwrap();
        }
        zstd.write_all(USAGE).unwrap();
        brotli.write_all(USAGE).unwrap();
    }
    let zstd = zstd.finish().unwrap();
    drop(zeros);
    // The limit is the window with room to spare (zstd's window is in C's heap, not counted).
    let cases = [("zstd", zstd, 2 << 20), ("br", br, 8 << 20)];
    let store = MemoryStore::new();
    let limits = layer(&store);
    let mut over = Vec::new();
    for (encoding, bomb, limit) in cases {
        assert!(bomb.len() < 8 << 10, "{encoding}: {} bytes", bomb.len());
        let bytes = Bytes::from(bomb);
        let served = bytes.clone();
        let headers = vec![
            ("content-type", "text/event-stream"),
            ("content-encoding", encoding),
        ];
        let app = upstream(&limits, served, 1 << 10, headers);
        let req = request(encoding);
        let started = Instant::now();
        let (got, peak) = read_counting_heap(app, req).await;
        println!(
            "{encoding}: {} bytes decoding to {} MiB, peak heap while metering {} KiB, {:?}",
            bytes.len(),
            DECODED >> 20,
            peak >> 10,
            started.elapsed()
        );
        assert_eq!(
            got,
            bytes.len(),
            "{encoding}: the body passes through unchanged"
        );
        if peak >= limit {
            over.push(format!(
                "{encoding}: {} KiB, over {} KiB",
                peak >> 10,
                limit >> 10
            ));
        }
        limits.flush().await;
        assert_eq!(used(&store, encoding), 5, "{encoding}: the usage is read");
    }
    assert!(over.is_empty(), "peak heap while metering: {over:?}");
}

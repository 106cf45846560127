//! Test support: a mock OpenAI-compatible upstream, a real HTTP server on 127.0.0.1:0, and a
//! real HTTP client.
#![allow(dead_code)]

pub mod fixtures;
pub mod redis;
pub mod stores;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The shared fixtures directory (`TTR_FIXTURES`, else `../shared/fixtures`).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("TTR_FIXTURES").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")),
        PathBuf::from,
    );
    assert!(
        dir.is_dir(),
        "fixtures not found at {} (set TTR_FIXTURES)",
        dir.display()
    );
    dir
}

/// An example binary. `cargo test` builds the examples next to the test binaries
/// (`target/<profile>/examples/`); a test that needs one fails, never skips, when it is missing.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "example binary missing at {}: run the tests with `cargo test`, which builds the examples",
        bin.display()
    );
    bin
}

/// A mock chat-completions handler. The cost of a response is `x-mock-tokens` (default 100):
/// prompt 10 + completion (tokens - 10). `"stream": true` in the request body gives SSE with
/// the usage in a final chunk; `x-mock-hang: 1` streams two chunks and then never ends;
/// `x-mock-no-usage: 1` leaves the usage out.
pub async fn mock_chat(headers: HeaderMap, body: Bytes) -> Response<Body> {
    let tokens: u64 = headers
        .get("x-mock-tokens")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(100);
    let no_usage = headers.contains_key("x-mock-no-usage");
    let hang = headers.contains_key("x-mock-hang");
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("stream")?.as_bool())
        .unwrap_or(false);
    let prompt = tokens.min(10);
    let usage = serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": tokens - prompt,
        "total_tokens": tokens,
    });
    if !stream {
        let mut v = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "mock",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        });
        if !no_usage {
            v["usage"] = usage;
        }
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap();
    }
    let chunk = |content: &str| {
        let v = serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "mock",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}], "usage": null});
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut events: Vec<Bytes> = vec![chunk("Hel"), chunk("lo")];
    if !hang {
        if !no_usage {
            let v = serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "mock", "choices": [], "usage": usage});
            events.push(Bytes::from(format!("data: {v}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    let s = futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    let body = if hang {
        use futures_util::StreamExt;
        Body::from_stream(s.chain(futures_util::stream::pending()))
    } else {
        Body::from_stream(s)
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// The mock upstream's chat completions route behind `layer`, served on 127.0.0.1:0.
pub async fn serve_chat(layer: tower_token_ratelimit::TokenRateLimitLayer) -> SocketAddr {
    serve(
        Router::new()
            .route("/v1/chat/completions", axum::routing::post(mock_chat))
            .layer(layer),
    )
    .await
}

/// Serves `app` on 127.0.0.1:0 (with `ConnectInfo<SocketAddr>`) until the test ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a POST with these headers and body to `addr` + `path` and reads the whole reply
/// (bounded by a timeout).
pub async fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = Request::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client().request(req).await.unwrap();
        let (head, body) = resp.into_parts();
        Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    })
    .await
    .expect("request timed out")
}

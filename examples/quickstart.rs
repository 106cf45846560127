//! Quick start: token rate limiting in front of a (mock) OpenAI-compatible endpoint.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! Nothing to install: counters live in memory and the LLM is a mock that streams a reply and
//! reports its token usage in the last SSE chunk, like OpenAI does. The program sends requests
//! for one API key until the budget is spent and the layer answers 429, printing what each
//! request cost.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

/// The budget per API key.
const TOKENS_PER_MINUTE: u64 = 1_000;

/// A mock chat completion: streams a few chunks, then the usage (prompt + completion).
async fn mock_llm(body: Bytes) -> Response<Body> {
    let prompt = (body.len() as u64).div_ceil(4);
    let completion = 180 + prompt % 50;
    let chunk = |text: &str| {
        let v = serde_json::json!({"object": "chat.completion.chunk", "model": "mock-1",
            "choices": [{"index": 0, "delta": {"content": text}}], "usage": null});
        Ok::<_, Infallible>(Bytes::from(format!("data: {v}\n\n")))
    };
    let usage = serde_json::json!({"object": "chat.completion.chunk", "model": "mock-1", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
    let events = vec![
        chunk("Token "),
        chunk("budgets "),
        chunk("are "),
        chunk("real."),
        Ok(Bytes::from(format!("data: {usage}\n\n"))),
        Ok(Bytes::from_static(b"data: [DONE]\n\n")),
    ];
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(events)))
        .expect("valid response")
}

/// The `total_tokens` of the usage chunk in an SSE body.
fn total_tokens(sse: &str) -> Option<u64> {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v["usage"]["total_tokens"].as_u64())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The one line that matters: a limit per API key.
    let limits = TokenRateLimitLayer::builder()
        .rule(
            Rule::per_header("x-api-key")
                .any_value()
                .tokens_per_minute(TOKENS_PER_MINUTE),
        )
        .build()?;
    let app = Router::new()
        .route("/v1/chat/completions", post(mock_llm))
        .layer(limits.clone());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    println!(
        "mock LLM with a {TOKENS_PER_MINUTE} tokens/minute budget per x-api-key on http://{addr}\n"
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    println!(
        "{:>3}  {:>6}  {:>15}  {:>16}",
        "req", "status", "tokens debited", "budget remaining"
    );
    for n in 1..=20 {
        let body = r#"{"model":"mock-1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Why do token budgets matter?"}]}"#;
        let request = Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-api-key", "sk-demo")
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let response = client.request(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let text =
            String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes()).into_owned();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };

        if status.is_success() {
            let tokens = total_tokens(&text).unwrap_or(0);
            let before: u64 = header("x-ratelimit-remaining-tokens").parse().unwrap_or(0);
            println!(
                "{n:>3}  {:>6}  {tokens:>15}  {:>16}",
                status.as_u16(),
                before.saturating_sub(tokens)
            );
            // Debits are written in the background when a stream ends; wait for them so the
            // next request sees this one's cost.
            limits.flush().await;
        } else {
            println!("{n:>3}  {:>6}  {:>15}  {:>16}", status.as_u16(), 0, 0);
            println!(
                "\nrejected: retry-after {}s, x-ratelimit-reset-tokens {}\n{text}",
                header("retry-after"),
                header("x-ratelimit-reset-tokens"),
            );
            return Ok(());
        }
    }
    Err("the budget was never exhausted".into())
}

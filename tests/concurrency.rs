//! SPEC 4: 64 concurrent streaming requests of known cost against a budget B. Post-debit
//! admits them all (the overshoot every peer shows); reserve keeps the admitted tokens within B
//! plus one request's estimate error, and still admits at least 0.8×B — whether clients send
//! an accurate `max_tokens` or none (after a short warm-up). Against both stores.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode};
use axum::routing::post;
use common::redis::RedisServer;
use common::{send, serve};
use tower_token_ratelimit::store::{MemoryStore, RedisStore};
use tower_token_ratelimit::{Mode, Rule, TokenRateLimitLayer};

const BUDGET: u64 = 2_000;
const COMPLETION: u64 = 60;
const CONCURRENCY: usize = 64;

/// Streams three chunks 40 ms apart, then the usage: prompt = request bytes / 4 (rounded up),
/// completion = 60.
async fn slow_llm(body: Bytes) -> Response<Body> {
    let prompt = (body.len() as u64).div_ceil(4);
    let usage = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{COMPLETION},\"total_tokens\":{}}}}}\n\n",
        prompt + COMPLETION
    );
    let stream = futures_util::stream::unfold(0, move |i| {
        let usage = usage.clone();
        async move {
            let chunk = match i {
                0..=2 => {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n".to_string()
                }
                3 => usage,
                4 => "data: [DONE]\n\n".to_string(),
                _ => return None,
            };
            Some((Ok::<_, Infallible>(Bytes::from(chunk)), i + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn request(max_tokens: bool) -> String {
    let max = if max_tokens {
        format!(",\"max_tokens\":{COMPLETION}")
    } else {
        String::new()
    };
    format!(
        r#"{{"model":"m","stream":true,"stream_options":{{"include_usage":true}}{max},"messages":[{{"role":"user","content":"hello"}}]}}"#
    )
}

/// Sends 64 requests at once for `user`; returns the tokens of the admitted ones.
async fn burst(addr: SocketAddr, user: &'static str, max_tokens: bool) -> u64 {
    let body = request(max_tokens);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                send(addr, "/v1/chat/completions", &[("x-user", user)], &body).await
            })
        })
        .collect();
    let cost = (body.len() as u64).div_ceil(4) + COMPLETION;
    let mut admitted = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => admitted += cost,
            StatusCode::TOO_MANY_REQUESTS => {}
            s => panic!("unexpected {s}"),
        }
    }
    admitted
}

async fn run(store: &str, mode: Mode, max_tokens: bool, redis: Option<&RedisServer>) -> f64 {
    let b = TokenRateLimitLayer::builder().mode(mode).rule(
        Rule::per_header("x-user")
            .any_value()
            .tokens_per_minute(BUDGET),
    );
    let limits = match redis {
        Some(r) => b.redis(
            RedisStore::builder()
                .url(r.url())
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
        ),
        None => b.store(MemoryStore::new()),
    }
    .rule_name(format!("{store}-{mode:?}-{max_tokens}"))
    .build()
    .unwrap();
    let addr = serve(
        Router::new()
            .route("/v1/chat/completions", post(slow_llm))
            .layer(limits.clone()),
    )
    .await;
    if !max_tokens {
        // Warm-up: a few sequential requests teach the layer this model's output.
        for _ in 0..4 {
            send(
                addr,
                "/v1/chat/completions",
                &[("x-user", "warm-up")],
                &request(false),
            )
            .await;
            limits.flush().await;
        }
    }
    let admitted = burst(addr, "load", max_tokens).await;
    limits.flush().await;
    admitted as f64 / BUDGET as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_holds_the_budget_under_64_concurrent_streams() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let cost = (request(true).len() as u64).div_ceil(4) + COMPLETION;
    println!("budget {BUDGET} tokens, {CONCURRENCY} concurrent streams of {cost} tokens each");
    println!(
        "{:<7} {:<11} {:<12} {:>12}",
        "store", "mode", "max_tokens", "admitted/B"
    );
    for (store, r) in [("memory", None), ("redis", Some(&redis))] {
        for max_tokens in [true, false] {
            let post = run(store, Mode::PostDebit, max_tokens, r).await;
            let reserve = run(store, Mode::Reserve, max_tokens, r).await;
            let sent = if max_tokens { "accurate" } else { "none" };
            println!("{store:<7} {:<11} {sent:<12} {post:>12.2}", "post_debit");
            println!("{store:<7} {:<11} {sent:<12} {reserve:>12.2}", "reserve");
            assert!(post > 1.5, "{store}: post-debit overshoots ({post})");
            // The estimate is exact here (prompt = bytes / 4, output = max_tokens or the learned
            // allowance), so the bound is the budget itself.
            assert!(
                reserve <= 1.0,
                "{store}, max_tokens {sent}: reserve admitted {reserve}×B"
            );
            assert!(
                reserve >= 0.8,
                "{store}, max_tokens {sent}: reserve admitted only {reserve}×B"
            );
        }
    }
}

/// Remaining budget in the headers counts the reservations of requests still streaming.
#[tokio::test]
async fn remaining_counts_in_flight_reservations() {
    let limits = TokenRateLimitLayer::builder()
        .mode(Mode::Reserve)
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(1_000),
        )
        .build()
        .unwrap();
    let addr = serve(
        Router::new()
            .route("/v1/chat/completions", post(common::mock_chat))
            .layer(limits.clone()),
    )
    .await;
    let body =
        r#"{"model":"m","stream":true,"max_tokens":200,"stream_options":{"include_usage":true}}"#;
    let prompt = (body.len() as u64).div_ceil(4);
    // A stream that never ends: its reservation stays in flight.
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-user: f\r\nx-mock-hang: 1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = held.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let r = send(addr, "/v1/chat/completions", &[("x-user", "f")], body).await;
    let remaining: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        remaining,
        1_000 - 2 * (prompt + 200),
        "the in-flight reservation is counted, and the request's own"
    );
    drop(held);
}

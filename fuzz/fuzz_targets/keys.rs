//! Key extraction from arbitrary headers, cookies, forwarding lists and query strings, through
//! the layer: every request gets an answer.
#![no_main]

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::routing::post;
use http::{HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

fn app() -> &'static Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| {
        let limits = TokenRateLimitLayer::builder()
            .consumer_header("x-mse-consumer")
            .trusted_proxies(["10.0.0.0/8", "::1"])
            .rule(
                Rule::per_header("x-user")
                    .matching("[a-z]+-[0-9]+")
                    .tokens_per_minute(1000),
            )
            .rule(Rule::header("x-plan").value("free").tokens_per_minute(1000))
            .rule(Rule::per_cookie("uid").any_value().tokens_per_minute(1000))
            .rule(Rule::per_param("k").any_value().tokens_per_minute(1000))
            .rule(Rule::per_consumer().any_value().tokens_per_minute(1000))
            .rule(
                Rule::per_ip_from_header("x-forwarded-for")
                    .ip("0.0.0.0/0")
                    .tokens_per_minute(1000),
            )
            .rule(
                Rule::per_ip_from_header("forwarded")
                    .any_value()
                    .tokens_per_minute(1000),
            )
            .rule(
                Rule::composite(["consumer", "header:x-user", "ip"])
                    .any_value()
                    .tokens_per_minute(1000),
            )
            .build()
            .expect("valid rules");
        Router::new()
            .route("/{*path}", post(|| async { "ok" }))
            .layer(limits)
            .layer(MockConnectInfo(std::net::SocketAddr::from((
                [10, 1, 2, 3],
                4,
            ))))
    })
}

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff: path+query, then header values.
    let mut parts = data.split(|&b| b == 0xff);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let uri = format!("/v1/{}", path.replace(['#', ' '], ""));
    let Ok(mut req) = Request::post(uri.as_str()).body(Body::empty()) else {
        return;
    };
    for name in [
        "x-user",
        "x-plan",
        "cookie",
        "x-mse-consumer",
        "x-forwarded-for",
        "forwarded",
    ] {
        if let Some(v) = parts.next().and_then(|v| HeaderValue::from_bytes(v).ok()) {
            req.headers_mut().append(name, v);
        }
    }
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    });
    let status = rt.block_on(app().clone().oneshot(req)).unwrap().status();
    assert!(status.is_success() || status.as_u16() == 429, "{status}");
});

//! LLM **token** rate limiting for [tower](https://docs.rs/tower) services: axum, tonic, or any `http` service.
//!
//! A [`TokenRateLimitLayer`] finds the limits a request falls under (keys from a header, query
//! parameter, cookie, the authenticated [`Consumer`] or the client IP), asks a [store]
//! whether their budget is left, rejects with 429 when it is not, and otherwise meters the
//! response as it streams through: the usage the LLM reports (OpenAI, Anthropic, Gemini; SSE or
//! JSON) is debited when the body ends, and an estimate when it never reports (client gone,
//! upstream error).
//!
//! The configuration speaks the vocabulary of the Higress `ai-token-ratelimit` plugin, and fixes
//! what it gets wrong: usage is charged on disconnects too, rejection happens at `used >= limit`,
//! the client IP cannot be forged through `X-Forwarded-For`, and every configuration mistake is
//! reported.
//!
//! # Quick start
//!
//! ```
//! # #[cfg(not(feature = "axum"))] fn main() {}
//! # #[cfg(feature = "axum")] #[tokio::main(flavor = "current_thread")] async fn main() {
//! use axum::{Router, body::Body, routing::post};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_token_ratelimit::{Rule, TokenRateLimitLayer};
//!
//! async fn chat() -> ([(&'static str, &'static str); 1], &'static str) {
//!     ([("content-type", "application/json")],
//!      r#"{"usage":{"prompt_tokens":10,"completion_tokens":90,"total_tokens":100}}"#)
//! }
//!
//! let limits = TokenRateLimitLayer::builder()
//!     .rule(Rule::per_header("x-api-key").any_value().tokens_per_minute(150))
//!     .build()
//!     .unwrap();
//! let app = Router::new().route("/v1/chat/completions", post(chat)).layer(limits.clone());
//!
//! let request = || Request::post("/v1/chat/completions").header("x-api-key", "k1")
//!     .body(Body::empty()).unwrap();
//! for expected in [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
//!     let response = app.clone().oneshot(request()).await.unwrap();
//!     assert_eq!(response.status(), expected);
//!     axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
//!     limits.flush().await; // debits are written in the background
//! }
//! # }
//! ```
//!
//! # Pieces
//! - [`TokenRateLimitLayer`] / [`TokenRateLimitLayerBuilder`] and [`Rule`]: the Rust API.
//! - [`TokenRateLimitConfig`]: the serde configuration (Higress YAML/JSON).
//! - [`store`]: the [`Store`](store::Store) trait and the in-memory store.
//! - [`usage`]: the streaming usage scanner.
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod allowance;
mod body;
mod config;
mod cost;
mod decode;
mod error;
mod future;
mod key;
mod layer;
mod request;
mod response;
mod rule;
mod service;
mod settle;
pub mod store;
mod strip;
mod telemetry;
pub mod usage;

pub use body::ResponseBody;
pub use config::{
    DEFAULT_KEY_PREFIX, FailureMode, LimitKeyConfig, Mode, RedisConfig, ResponseHeadersConfig,
    RuleItemConfig, ThresholdConfig, TokenRateLimitConfig,
};
pub use cost::{Cost, CostConfig, CostWeights};
pub use error::{ConfigError, Problem, StoreError};
pub use future::ResponseFuture;
pub use key::{ClientAddr, Consumer, KeyExtractor, RequestView};
pub use layer::{TokenRateLimitLayer, TokenRateLimitLayerBuilder};
pub use request::RequestBody;
pub use rule::Rule;
pub use service::TokenRateLimit;
pub use store::Algorithm;

/// Locks `m`, poisoned or not: every lock in the crate guards state a panic cannot leave
/// half-written (a map entry, a counter, a list), so serving goes on.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

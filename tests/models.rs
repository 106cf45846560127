//! Limits per model and per consumer × model, path and method conditions.

mod common;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use common::{mock_chat, send, serve, serve_chat};
use tower_token_ratelimit::store::MemoryStore;
use tower_token_ratelimit::{Consumer, Rule, TokenRateLimitConfig, TokenRateLimitLayer};

fn key(rest: &str) -> String {
    format!("higress-token-ratelimit:{{default}}:{rest}")
}

fn chat(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","stream":true,"stream_options":{{"include_usage":true}},"messages":[]}}"#
    )
}

#[tokio::test]
async fn each_model_has_its_own_budget() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(Rule::per_model().any_value().tokens_per_minute(150))
        .rule(Rule::model().value("gpt-4o").tokens_per_minute(1000))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(
            send(addr, "/v1/chat/completions", &[], &chat("gpt-4o-mini"))
                .await
                .status,
            expected
        );
        limits.flush().await;
    }
    let r = send(addr, "/v1/chat/completions", &[], &chat("gpt-4o")).await;
    assert_eq!(r.status, StatusCode::OK, "another model is unaffected");
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_per_model:60:model:gpt-4o-mini")),
        200
    );
    assert_eq!(store.used(&key("limit_by_per_model:60:model:gpt-4o")), 100);
    assert_eq!(store.used(&key("limit_by_model:60:model:gpt-4o")), 100);
    // No model, no model counter.
    assert_eq!(
        send(addr, "/v1/chat/completions", &[], r#"{"stream":true}"#)
            .await
            .status,
        StatusCode::OK
    );

    // Gemini names the model in the path.
    let app = Router::new()
        .route("/v1beta/models/{m}", post(mock_chat))
        .layer(limits.clone());
    let addr = serve(app).await;
    send(
        addr,
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
        &[],
        "{}",
    )
    .await;
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_per_model:60:model:gemini-2.5-pro")),
        100
    );
}

/// A model the layer cannot read does not make a request unlimited: a `model` given twice
/// counts with its last value (as the upstream reads it), and a body too large to read, or not
/// readable as JSON, counts under the model `unknown`, which rules taking any model limit and
/// a listed value can name.
#[tokio::test]
async fn a_model_that_cannot_be_read_is_not_a_way_around_model_limits() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .request_body_limit(4096)
        .rule(Rule::per_model().any_value().tokens_per_minute(150))
        .build()
        .unwrap();
    let addr = serve_chat(limits.clone()).await;
    let send_body = |body: String, headers: &'static [(&'static str, &'static str)]| {
        let limits = limits.clone();
        async move {
            let r = send(addr, "/v1/chat/completions", headers, &body).await;
            limits.flush().await;
            r.status
        }
    };
    // gpt-4o's budget spent (100 of 150, then 200).
    for _ in 0..2 {
        assert_eq!(send_body(chat("gpt-4o"), &[]).await, StatusCode::OK);
    }
    let twice = r#"{"model":"other","model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#;
    assert_eq!(
        send_body(twice.into(), &[]).await,
        StatusCode::TOO_MANY_REQUESTS,
        "the last model named is gpt-4o"
    );
    assert_eq!(store.used(&key("limit_by_per_model:60:model:other")), 0);

    // Padded past the body limit: the model is unknown, and unknown has a budget of its own.
    let padded = format!(
        r#"{{"model":"gpt-4o","stream":true,"stream_options":{{"include_usage":true}},"user":"{}"}}"#,
        "x".repeat(8192)
    );
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(send_body(padded.clone(), &[]).await, expected, "padded");
    }
    assert_eq!(store.used(&key("limit_by_per_model:60:model:unknown")), 200);
    // So does a compressed one, which the layer does not read.
    assert_eq!(
        send_body(chat("gpt-4o-mini"), &[("content-encoding", "identity, x")]).await,
        StatusCode::TOO_MANY_REQUESTS,
        "compressed: unknown"
    );
    // A body without a model still has none.
    assert_eq!(
        send_body(r#"{"stream":true}"#.into(), &[]).await,
        StatusCode::OK
    );
    assert_eq!(store.used(&key("limit_by_per_model:60:model:unknown")), 200);
}

async fn as_consumer(
    mut req: Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(c) = req
        .headers()
        .get("x-test-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        req.extensions_mut().insert(Consumer::new(c));
    }
    next.run(req).await
}

#[tokio::test]
async fn consumer_times_model_from_the_config() {
    let cfg: TokenRateLimitConfig = serde_yaml::from_str(
        r#"
rule_name: default
rule_items:
  - limit_by_composite: [consumer, model]
    limit_keys:
      - {key: "regexp:alice\\|gpt-4o.*", token_per_minute: 150}
      - {key: "*", token_per_minute: 10000}
"#,
    )
    .unwrap();
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .config(cfg)
        .store(store.clone())
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v1/chat/completions", post(mock_chat))
        .layer(limits.clone())
        .layer(axum::middleware::from_fn(as_consumer));
    let addr = serve(app).await;
    let alice = [("x-test-user", "alice")];
    for expected in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        assert_eq!(
            send(addr, "/v1/chat/completions", &alice, &chat("gpt-4o"))
                .await
                .status,
            expected
        );
        limits.flush().await;
    }
    // Same consumer, other model; same model, other consumer: separate budgets.
    assert_eq!(
        send(addr, "/v1/chat/completions", &alice, &chat("o3"))
            .await
            .status,
        StatusCode::OK
    );
    let bob = [("x-test-user", "bob")];
    assert_eq!(
        send(addr, "/v1/chat/completions", &bob, &chat("gpt-4o"))
            .await
            .status,
        StatusCode::OK
    );
    limits.flush().await;
    assert_eq!(
        store.used(&key("limit_by_composite:60:consumer+model:alice|gpt-4o")),
        200
    );
    assert_eq!(
        store.used(&key("limit_by_composite:60:consumer+model:bob|gpt-4o")),
        100
    );
}

/// `mock_chat` at the chat and embeddings paths, behind `limits`.
fn chat_and_embeddings(limits: &TokenRateLimitLayer) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(mock_chat))
        .route("/v1/embeddings", post(mock_chat))
        .layer(limits.clone())
}

#[tokio::test]
async fn path_and_method_conditions() {
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::global()
                .tokens_per_minute(100)
                .paths(["/v1/chat/*"])
                .methods(["post"]),
        )
        .build();
    // `paths`/`methods` apply to rule items, not the global threshold: an error, not ignored.
    assert!(
        limits
            .unwrap_err()
            .to_string()
            .contains("not Rule::global()")
    );
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(100)
                .paths(["/v1/chat/*"])
                .methods(["POST"]),
        )
        .build()
        .unwrap();
    let app = chat_and_embeddings(&limits);
    let addr = serve(app).await;
    let h = [("x-user", "u")];
    for expected in [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
        assert_eq!(
            send(addr, "/v1/chat/completions", &h, &chat("m"))
                .await
                .status,
            expected
        );
        limits.flush().await;
    }
    assert_eq!(
        send(addr, "/v1/embeddings", &h, "{}").await.status,
        StatusCode::OK,
        "other paths"
    );

    // Two items on one header that differ only in their paths keep separate budgets (the
    // counters' key names carry a hash of the conditions).
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(150)
                .paths(["/v1/chat/completions"]),
        )
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(10_000)
                .paths(["/v1/embeddings"]),
        )
        .build()
        .unwrap();
    let app = chat_and_embeddings(&limits);
    let addr = serve(app).await;
    let mut statuses = Vec::new();
    for path in ["/v1/embeddings"; 3]
        .into_iter()
        .chain(["/v1/chat/completions"; 3])
    {
        statuses.push(send(addr, path, &h, &chat("m")).await.status.as_u16());
        limits.flush().await;
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    assert_eq!(store.len(), 2);

    // Other spellings of a limited path are the same path (an upstream routing on the decoded,
    // cleaned path serves them alike): no way around the limit.
    let limits = TokenRateLimitLayer::builder()
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(150)
                .paths(["/v1/chat/completions"]),
        )
        .build()
        .unwrap();
    let app = Router::new().fallback(mock_chat).layer(limits.clone());
    let addr = serve(app).await;
    let mut statuses = Vec::new();
    for path in [
        "/v1/chat/%63ompletions",
        "/v1//chat/completions",
        "/v1/embeddings/../chat/completions",
        "/v1/./chat/completions",
        "/v1/embeddings",
    ] {
        statuses.push(send(addr, path, &h, &chat("m")).await.status.as_u16());
        limits.flush().await;
    }
    assert_eq!(statuses, [200, 200, 429, 429, 200]);

    let bad: TokenRateLimitConfig = serde_yaml::from_str(
        "rule_name: r\nrule_items:\n- limit_by_per_header: x\n  paths: [v1]\n  methods: [\"G T\"]\n  limit_keys: [{key: '*', token_per_minute: 1}]\n- limit_by_composite: [consumer, colour]\n  limit_keys: [{key: '*', token_per_minute: 1}]\n",
    )
    .unwrap();
    let err = TokenRateLimitLayer::from_config(bad).unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    for p in [
        "rule_items[0].paths[0]",
        "rule_items[0].methods[0]",
        "rule_items[1].limit_by_composite[1]",
    ] {
        assert!(paths.contains(&p), "{p} missing: {err}");
    }
}

//! SPEC 7: the tokens metric labels at most the configured number of models by name.
#![cfg(feature = "metrics")]

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

#[tokio::test]
async fn past_the_configured_number_of_models_the_label_is_other() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let limits = TokenRateLimitLayer::builder()
        .rule_name("m")
        .metrics_max_models(1)
        .rule(Rule::per_model().any_value().tokens_per_minute(1_000_000))
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async {
                (
                    [("content-type", "application/json")],
                    r#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
                )
            }),
        )
        .layer(limits.clone());
    for model in ["first", "second", "first", "third"] {
        let request = Request::post("/v1/chat/completions")
            .body(Body::from(format!(r#"{{"model":"{model}"}}"#)))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    limits.flush().await;
    let text = handle.render();
    let tokens = |model: &str| -> Option<f64> {
        let needle = format!(
            r#"token_ratelimit_tokens_total{{rule="m/rule_items[0]",model="{model}",estimated="false"}}"#
        );
        let line = text.lines().find(|l| l.starts_with(&needle))?;
        line.rsplit(' ').next()?.parse().ok()
    };
    assert_eq!(tokens("first"), Some(6.0), "{text}");
    assert_eq!(tokens("other"), Some(6.0), "{text}");
    assert_eq!(tokens("second"), None, "{text}");
}

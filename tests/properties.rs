//! Properties over arbitrary input: nothing panics on any configuration, any request headers,
//! any query string, or any response bytes.

mod common;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderValue, Request};
use axum::routing::post;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_token_ratelimit::usage::{BodyFormat, UsageScanner};
use tower_token_ratelimit::{Rule, TokenRateLimitConfig, TokenRateLimitLayer};

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        "[a-z_*:{}0-9./ ]{0,12}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("rule_name"),
            Just("rule_items"),
            Just("limit_by_per_header"),
            Just("limit_keys"),
            Just("key"),
            Just("token_per_minute"),
            Just("regexp:a+"),
            Just("*"),
            Just("10.0.0.0/8"),
            Just("limit_by_per_ip"),
            Just("from-header-x-forwarded-for"),
            Just("algorithm"),
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("rule_name".to_string()),
                    Just("rule_items".to_string()),
                    Just("global_threshold".to_string()),
                    Just("limit_keys".to_string()),
                    Just("key".to_string()),
                    Just("token_per_minute".to_string()),
                    Just("limit_by_per_header".to_string()),
                    Just("limit_by_composite".to_string()),
                    Just("redis".to_string()),
                    Just("cost".to_string()),
                    Just("mode".to_string()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_configuration_is_an_error_or_a_layer_never_a_panic(v in json_value()) {
        if let Ok(cfg) = serde_json::from_value::<TokenRateLimitConfig>(v) {
            let _ = TokenRateLimitLayer::from_config(cfg);
        }
    }

    #[test]
    fn any_response_bytes_scan_without_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20)) {
        for format in [BodyFormat::Sse, BodyFormat::Json] {
            let mut s = UsageScanner::new(format).with_max_event_bytes(512);
            for c in &chunks {
                s.feed(c);
            }
            let _ = s.finish();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn any_request_headers_and_query_get_an_answer(
        user in prop::collection::vec(any::<u8>(), 0..64),
        cookie in prop::collection::vec(any::<u8>(), 0..128),
        xff in prop::collection::vec(any::<u8>(), 0..128),
        query in "[ -~]{0,40}",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let limits = TokenRateLimitLayer::builder()
                .trusted_proxies(["10.0.0.0/8"])
                .rule(Rule::per_header("x-user").matching("[a-z]+").tokens_per_minute(10))
                .rule(Rule::per_cookie("uid").any_value().tokens_per_minute(10))
                .rule(Rule::per_param("k").any_value().tokens_per_minute(10))
                .rule(Rule::per_ip_from_header("x-forwarded-for").any_value().tokens_per_minute(10))
                .rule(Rule::composite(["header:x-user", "ip"]).any_value().tokens_per_minute(10))
                .build()
                .unwrap();
            let app = Router::new()
                .route("/v1/chat/completions", post(common::mock_chat))
                .layer(limits)
                .layer(MockConnectInfo(std::net::SocketAddr::from(([10, 0, 0, 1], 9))));
            let uri = format!("/v1/chat/completions?{}", query.replace(' ', "+").replace('#', "%23"));
            let mut req = Request::post(uri.as_str()).body(Body::from("{}")).unwrap_or_else(|_| {
                Request::post("/v1/chat/completions").body(Body::from("{}")).unwrap()
            });
            for (name, value) in [("x-user", &user), ("cookie", &cookie), ("x-forwarded-for", &xff)] {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    req.headers_mut().insert(name, v);
                }
            }
            let r = app.oneshot(req).await.unwrap();
            assert!(r.status().is_success() || r.status().as_u16() == 429);
        });
    }
}

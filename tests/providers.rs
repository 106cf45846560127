//! Every recorded provider response, served through the layer by a real HTTP server, plain and
//! compressed: the store is charged what the provider reported, and the client receives the
//! upstream's bytes unchanged.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Response};
use axum::routing::post;
use bytes::Bytes;
use common::fixtures::{Fixture, load_fixtures};
use common::{send, serve};
use tower_token_ratelimit::store::MemoryStore;
use tower_token_ratelimit::usage::BodyFormat;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

fn encode(encoding: &str, body: &[u8]) -> Vec<u8> {
    match encoding {
        "identity" => body.to_vec(),
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            let params = brotli::enc::BrotliEncoderParams {
                quality: 4,
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &body[..], &mut out, &params).unwrap();
            out
        }
        "zstd" => zstd::stream::encode_all(body, 3).unwrap(),
        other => panic!("{other}"),
    }
}

/// What the default cost should be, computed by hand from the expected usage: the reported
/// total, else the sum of the categories (Anthropic's input excludes cache reads and writes).
fn expected_cost(f: &Fixture) -> u64 {
    let Some(u) = f.expected else { return 0 };
    if let Some(total) = u.total_tokens {
        return total;
    }
    let mut cost = u.input_tokens.unwrap_or(0) + u.output_tokens.unwrap_or(0);
    if f.provider == "anthropic" {
        cost += u.cache_creation_input_tokens.unwrap_or(0) + u.cached_input_tokens.unwrap_or(0);
    }
    cost
}

/// Each fixture with its body in every encoding, by name.
type Served = HashMap<String, (Fixture, Vec<(String, Bytes)>)>;

/// Serves the fixture named in `x-fixture`, encoded as `x-encoding` says, in 7 frames.
async fn upstream(fixtures: Arc<Served>, headers: HeaderMap) -> Response<Body> {
    let name = headers["x-fixture"].to_str().unwrap();
    let encoding = headers["x-encoding"].to_str().unwrap();
    let (f, encoded) = &fixtures[name];
    let body = encoded
        .iter()
        .find(|(e, _)| e == encoding)
        .unwrap()
        .1
        .clone();
    // `x-frame`: bytes per frame; by default the body comes in 7 frames.
    let step = headers
        .get("x-frame")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(body.len().div_ceil(7))
        .max(1);
    let frames: Vec<Result<Bytes, Infallible>> = (0..body.len())
        .step_by(step)
        .map(|i| Ok(body.slice(i..(i + step).min(body.len()))))
        .collect();
    let mut r = Response::builder();
    r = r.header(
        "content-type",
        if f.format == BodyFormat::Sse {
            "text/event-stream"
        } else {
            "application/json"
        },
    );
    if encoding != "identity" {
        r = r.header("content-encoding", encoding);
    }
    // A body without usage is a provider's error answer.
    let status = if f.expected.is_none() && f.format == BodyFormat::Json {
        400
    } else {
        200
    };
    r.status(status)
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap()
}

#[tokio::test]
async fn every_fixture_is_charged_its_reported_usage_plain_and_compressed() {
    let encodings = ["identity", "gzip", "deflate", "br", "zstd"];
    let fixtures: Served = load_fixtures()
        .into_iter()
        .map(|f| {
            let encoded = encodings
                .iter()
                .map(|e| (e.to_string(), Bytes::from(encode(e, &f.body))))
                .collect();
            (f.name.clone(), (f, encoded))
        })
        .collect();
    let fixtures = Arc::new(fixtures);
    let store = MemoryStore::new();
    let limits = TokenRateLimitLayer::builder()
        .store(store.clone())
        .rule(
            Rule::per_header("x-case")
                .any_value()
                .tokens_per_day(u64::MAX / 2),
        )
        .build()
        .unwrap();
    let shared = fixtures.clone();
    let app = Router::new()
        .route(
            "/v1/any",
            post(move |h: HeaderMap| upstream(shared.clone(), h)),
        )
        .layer(limits.clone());
    let addr = serve(app).await;

    let mut checked = 0;
    // Every encoding in 7 frames; gzip also in frames of 3, 97 and 4096 bytes, which split the
    // compressed stream (and so the decoded events) anywhere.
    let cases = fixtures.iter().flat_map(|(name, (f, encoded))| {
        encoded.iter().flat_map(move |(encoding, bytes)| {
            let frames: &[&str] = if encoding == "gzip" {
                &["", "3", "97", "4096"]
            } else {
                &[""]
            };
            frames
                .iter()
                .map(move |frame| (name, f, encoding, bytes, *frame))
        })
    });
    for (name, f, encoding, bytes, frame) in cases {
        {
            let case = format!("{}-{encoding}{frame}", name.replace('/', "-"));
            let mut headers = vec![
                ("x-fixture", name.as_str()),
                ("x-encoding", encoding.as_str()),
                ("x-case", &case),
            ];
            if !frame.is_empty() {
                headers.push(("x-frame", frame));
            }
            let r = send(addr, "/v1/any", &headers, "{}").await;
            assert!(
                r.body == *bytes,
                "{case}: the client gets the upstream's bytes"
            );
            if encoding != "identity" {
                assert_eq!(r.header("content-encoding"), Some(encoding.as_str()));
            }
            limits.flush().await;
            let key = format!(
                "higress-token-ratelimit:{{default}}:limit_by_per_header:86400:x-case:{case}"
            );
            let expected = expected_cost(f);
            assert_eq!(store.used(&key), expected, "{case} (status {})", r.status);
            checked += 1;
        }
    }
    assert!(checked >= 8 * 25, "only {checked} cases");
}

#[tokio::test]
async fn each_cost_preset_charges_the_hand_computed_value() {
    use tower_token_ratelimit::{Cost, CostWeights};
    let weights = Cost::Weights(CostWeights {
        input: 1.0,
        cached_input: 0.1,
        cache_creation: 1.25,
        output: 4.0,
        reasoning: 2.0,
    });
    // (fixture, total, input_output, weights), computed by hand from the fixtures' README.
    let cases = [
        // 31073 in (3712 cached), 4416 out (3712 reasoning): 27361 + 371.2 + 704×4 + 3712×2.
        (
            "openai-responses/openai-web-search-tool.1",
            35489,
            35489,
            37973,
        ),
        // 9 in, 23 out, 185 thoughts outside the output: 9 + 23×4 + 185×2.
        ("google/google-text", 217, 32, 471),
        // Anthropic: 15665 in, 795 out, no total: 15665 + 795×4.
        ("anthropic/anthropic-web-search-tool.1", 16460, 16460, 18845),
        // xAI: 291 in (290 cached), 26 out, 196 reasoning outside the output:
        // 1 + 29 + 26×4 + 196×2.
        ("xai/xai-tool-call", 513, 317, 526),
    ];
    let all = load_fixtures();
    let fixtures: Served = cases
        .iter()
        .map(|(name, ..)| {
            let f = all
                .iter()
                .find(|f| f.name == *name)
                .unwrap_or_else(|| panic!("{name}"));
            let f = Fixture {
                name: f.name.clone(),
                format: f.format,
                body: f.body.clone(),
                expected: f.expected,
                provider: f.provider.clone(),
            };
            let encoded = vec![("identity".to_string(), Bytes::from(f.body.clone()))];
            (f.name.clone(), (f, encoded))
        })
        .collect();
    let fixtures = Arc::new(fixtures);
    for (i, cost) in [Cost::Total, Cost::InputOutput, weights]
        .into_iter()
        .enumerate()
    {
        let store = MemoryStore::new();
        let limits = TokenRateLimitLayer::builder()
            .store(store.clone())
            .cost(cost)
            .rule(
                Rule::per_header("x-fixture")
                    .any_value()
                    .tokens_per_day(u64::MAX / 2),
            )
            .build()
            .unwrap();
        let shared = fixtures.clone();
        let app = Router::new()
            .route(
                "/v1/any",
                post(move |h: HeaderMap| upstream(shared.clone(), h)),
            )
            .layer(limits.clone());
        let addr = serve(app).await;
        for case in &cases {
            let name = case.0;
            send(
                addr,
                "/v1/any",
                &[("x-fixture", name), ("x-encoding", "identity")],
                "{}",
            )
            .await;
            limits.flush().await;
            let expected = [case.1, case.2, case.3][i];
            let key = format!(
                "higress-token-ratelimit:{{default}}:limit_by_per_header:86400:x-fixture:{name}"
            );
            // The fixture name holds `/`, which is stored raw.
            assert_eq!(store.used(&key), expected, "{name} under {cost:?}");
        }
    }
}

/// Anthropic documents `cache_creation_input_tokens` as nullable: cache reads are still
/// outside its input, in a stream or a body, whatever the cost.
#[test]
fn anthropic_cache_reads_count_without_a_cache_creation_count() {
    use tower_token_ratelimit::usage::{BodyFormat, UsageScanner};
    use tower_token_ratelimit::{Cost, CostWeights};

    let scan = |format: BodyFormat, body: &str| {
        let mut s = UsageScanner::new(format);
        s.feed(body.as_bytes());
        s.finish().unwrap()
    };
    let stream = scan(
        BodyFormat::Sse,
        concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":20}}\n\n",
        ),
    );
    let body = scan(
        BodyFormat::Json,
        r#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":null,"cache_read_input_tokens":1000,"output_tokens":20}}"#,
    );
    let ones = Cost::Weights(CostWeights::default());
    for u in [stream, body] {
        assert_eq!(Cost::Total.tokens(&u), 1030, "{u:?}");
        assert_eq!(ones.tokens(&u), 1030, "{u:?}");
    }
}

/// Gemini's total holds tool-use prompt tokens (`toolUsePromptTokenCount`: search results,
/// code output read back) that no other count does: weights count them as input.
#[test]
fn gemini_tool_use_prompt_tokens_count_as_input_under_weights() {
    use tower_token_ratelimit::usage::{BodyFormat, UsageScanner};
    use tower_token_ratelimit::{Cost, CostWeights};

    for (event, total) in [
        (
            "{\"promptTokenCount\":100,\"candidatesTokenCount\":50,\"totalTokenCount\":1150,\"toolUsePromptTokenCount\":1000}",
            1150,
        ),
        (
            "{\"promptTokenCount\":100,\"candidatesTokenCount\":50,\"totalTokenCount\":1350,\"toolUsePromptTokenCount\":1000,\"thoughtsTokenCount\":200}",
            1350,
        ),
    ] {
        let mut s = UsageScanner::new(BodyFormat::Sse);
        s.feed(format!("data: {{\"candidates\":[],\"usageMetadata\":{event}}}\r\n\r\n").as_bytes());
        let u = s.finish().unwrap();
        assert_eq!(Cost::Total.tokens(&u), total);
        assert_eq!(
            Cost::Weights(CostWeights::default()).tokens(&u),
            total,
            "{u:?}"
        );
        // Priced as input: doubling the input weight adds them twice.
        let input_twice = Cost::Weights(CostWeights {
            input: 2.0,
            ..CostWeights::default()
        });
        assert_eq!(input_twice.tokens(&u), total + 1100);
    }
}

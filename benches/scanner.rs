//! Throughput of the usage scanner over recorded streams of each provider format, next to a
//! plain memchr count of line ends over the same bytes (the ceiling) and a plain memmem
//! count of the `"usage` key (what finding the usage alone costs).
//!
//! Each format's `.sse` fixtures (from `$TTR_FIXTURES` or `../shared/fixtures`) are
//! concatenated and repeated to about 1 MB, then fed in 16 KiB chunks.
//!
//! `cargo bench --bench scanner -- --warm-up-time 1 --measurement-time 3`

use std::fs;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_token_ratelimit::usage::{BodyFormat, UsageScanner};

const TARGET_BYTES: usize = 1 << 20;
const CHUNK: usize = 16 * 1024;

/// Fixture `api` values, one benchmark group each.
const FORMATS: [&str; 5] = [
    "chat",
    "completions",
    "responses",
    "anthropic-messages",
    "gemini",
];

fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("TTR_FIXTURES").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")),
        PathBuf::from,
    );
    assert!(
        dir.is_dir(),
        "fixtures directory {} not found: set TTR_FIXTURES",
        dir.display()
    );
    dir
}

/// The `.sse` fixtures of `api`, concatenated and repeated to about [`TARGET_BYTES`].
fn corpus(api: &str) -> Vec<u8> {
    let mut streams = Vec::new();
    let mut folders: Vec<_> = fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    for folder in folders {
        let mut files: Vec<_> = fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for sse in files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "sse"))
        {
            let expected = sse.with_extension("expected.json");
            let expected: serde_json::Value =
                serde_json::from_slice(&fs::read(&expected).unwrap()).unwrap();
            if expected["api"] == api {
                streams.extend_from_slice(&fs::read(sse).unwrap());
            }
        }
    }
    assert!(!streams.is_empty(), "no .sse fixture with api {api}");
    let mut bytes = Vec::with_capacity(TARGET_BYTES + streams.len());
    while bytes.len() < TARGET_BYTES {
        bytes.extend_from_slice(&streams);
    }
    bytes
}

fn scanner(c: &mut Criterion) {
    for api in FORMATS {
        let bytes = corpus(api);
        let mut group = c.benchmark_group(api);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function("usage_scanner", |b| {
            b.iter(|| {
                let mut scanner = UsageScanner::new(BodyFormat::Sse);
                for chunk in bytes.chunks(CHUNK) {
                    scanner.feed(black_box(chunk));
                }
                black_box(scanner.finish())
            })
        });
        group.bench_function("memchr_newlines", |b| {
            b.iter(|| memchr::memchr_iter(b'\n', black_box(&bytes)).count())
        });
        // What any scanner that looks for the usage key pays at least: finding each one.
        let usage_key = memchr::memmem::Finder::new(b"\"usage");
        group.bench_function("memmem_usage_key", |b| {
            b.iter(|| usage_key.find_iter(black_box(&bytes)).count())
        });
        group.finish();
    }
}

/// A 1 MB OpenAI stream in 16 KiB frames, collected from a service unwrapped, unwrapped with
/// each frame handed to a [`UsageScanner`] as it comes, and behind the layer (its body wrapper
/// scanning every frame): the wrapper's overhead, over the unwrapped body and over the scan.
fn wrapper(c: &mut Criterion) {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

    let stream = corpus("chat");
    let frames: Vec<Bytes> = stream.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
    let service = tower::service_fn(move |_req: http::Request<http_body_util::Full<Bytes>>| {
        let frames = frames.clone();
        async move {
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<_, std::convert::Infallible>(http_body::Frame::data(f))),
            ));
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let layer = TokenRateLimitLayer::builder()
        .inject_include_usage(false)
        .rule(
            Rule::per_header("x-api-key")
                .any_value()
                .tokens_per_minute(u64::MAX / 4),
        )
        .build()
        .unwrap();
    let metered = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service.clone());
    let request = || {
        http::Request::post("/v1/chat/completions")
            .header("x-api-key", "k")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("wrapper_1MB");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("unwrapped", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = service.clone();
            async move {
                let r = svc.ready().await.unwrap().call(request()).await.unwrap();
                black_box(r.into_body().collect().await.unwrap());
            }
        })
    });
    // The scan alone over the same frames: what the wrapper adds beyond it is its own cost.
    group.bench_function("unwrapped_then_scanned", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = service.clone();
            async move {
                let r = svc.ready().await.unwrap().call(request()).await.unwrap();
                let mut scanner = UsageScanner::new(BodyFormat::Sse);
                let mut body = r.into_body();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        scanner.feed(&data);
                        black_box(data);
                    }
                }
                black_box(scanner.finish())
            }
        })
    });
    group.bench_function("metered", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = metered.clone();
            async move {
                let r = svc.ready().await.unwrap().call(request()).await.unwrap();
                black_box(r.into_body().collect().await.unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, scanner, wrapper);
criterion_main!(benches);

//! The shared fixtures: recorded provider responses with their expected usage.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tower_token_ratelimit::usage::{BodyFormat, Usage};

pub struct Fixture {
    /// `<folder>/<stem>`.
    pub name: String,
    pub format: BodyFormat,
    pub body: Vec<u8>,
    pub expected: Option<Usage>,
    /// The `provider` field of the expected file.
    pub provider: String,
}

#[derive(Deserialize)]
struct Expected {
    provider: String,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cached_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
    has_usage: bool,
}

pub fn load_fixtures() -> Vec<Fixture> {
    let dir = super::fixtures();
    let mut fixtures = Vec::new();
    for folder in read_dir_sorted(&dir) {
        if !folder.is_dir() {
            continue;
        }
        for file in read_dir_sorted(&folder) {
            let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
            let Some(stem) = file_name.strip_suffix(".expected.json") else {
                continue;
            };
            let (body_file, format) = if stem.ends_with(".nonstream") {
                (format!("{stem}.json"), BodyFormat::Json)
            } else {
                (format!("{stem}.sse"), BodyFormat::Sse)
            };
            let name = format!("{}/{stem}", folder.file_name().unwrap().to_string_lossy());
            let body_path = folder.join(&body_file);
            let body = fs::read(&body_path).unwrap_or_else(|e| {
                panic!("{name}: cannot read its body {}: {e}", body_path.display())
            });
            let expected = fs::read(&file).unwrap();
            let expected: Expected = serde_json::from_slice(&expected)
                .unwrap_or_else(|e| panic!("{name}: bad expected.json: {e}"));
            fixtures.push(Fixture {
                name,
                format,
                body,
                provider: expected.provider.clone(),
                expected: expected_usage(expected),
            });
        }
    }
    let streams = fixtures
        .iter()
        .filter(|f| f.format == BodyFormat::Sse)
        .count();
    assert!(
        streams > 0 && streams < fixtures.len(),
        "{}: expected streaming and non-streaming fixtures, found {} and {}",
        dir.display(),
        streams,
        fixtures.len() - streams
    );
    fixtures
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    entries
}

fn expected_usage(e: Expected) -> Option<Usage> {
    let usage = Usage {
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        total_tokens: e.total_tokens,
        cached_input_tokens: e.cached_input_tokens,
        cache_creation_input_tokens: e.cache_creation_input_tokens,
        reasoning_tokens: e.reasoning_tokens,
    };
    if e.has_usage {
        Some(usage)
    } else {
        assert_eq!(
            usage,
            Usage::default(),
            "has_usage is false but counts are set"
        );
        None
    }
}

//! Every recorded provider response in the shared fixtures, through the public API: the usage
//! read from it matches its `.expected.json`, however the body is split into frames.
//!
//! The fixtures are read from `$TTR_FIXTURES`, or `../shared/fixtures` next to the crate.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::Deserialize;
use tower_token_ratelimit::usage::{BodyFormat, Usage, UsageScanner};

/// Random chunkings tried per fixture.
const CASES_PER_FIXTURE: u32 = 64;

struct Fixture {
    /// `<folder>/<stem>`.
    name: String,
    format: BodyFormat,
    body: Vec<u8>,
    expected: Option<Usage>,
}

#[derive(Deserialize)]
struct Expected {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cached_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
    has_usage: bool,
}

fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("TTR_FIXTURES").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")),
        PathBuf::from,
    );
    assert!(
        dir.is_dir(),
        "fixtures directory {} not found: set TTR_FIXTURES to the folder holding the recorded \
         provider responses (one sub-folder per provider, with *.expected.json files)",
        dir.display()
    );
    dir
}

fn load_fixtures() -> Vec<Fixture> {
    let dir = fixtures_dir();
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

/// Feeds `body` in chunks of the given lengths, cycling through them (all of it when `lens` is
/// empty), and returns the usage seen before and at `finish`.
fn scan(format: BodyFormat, body: &[u8], lens: &[usize]) -> (Option<Usage>, Option<Usage>) {
    let mut scanner = UsageScanner::new(format);
    if lens.is_empty() {
        scanner.feed(body);
    } else {
        let mut rest = body;
        for &len in lens.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(len.min(rest.len()));
            scanner.feed(chunk);
            rest = tail;
        }
    }
    let before_finish = scanner.usage();
    (before_finish, scanner.finish())
}

#[test]
fn every_fixture_reports_its_expected_usage() {
    let fixtures = load_fixtures();
    let mut failures = Vec::new();
    for f in &fixtures {
        let (before_finish, usage) = scan(f.format, &f.body, &[]);
        if usage != f.expected {
            failures.push(format!(
                "{}:\n  expected {:?}\n  got      {:?}",
                f.name, f.expected, usage
            ));
        }
        // Every recorded stream ends its last event with a blank line: the usage is known
        // before `finish`. A JSON body is only read at `finish`.
        let expected_before = match f.format {
            BodyFormat::Sse => f.expected,
            BodyFormat::Json => None,
        };
        if before_finish != expected_before {
            failures.push(format!(
                "{}: usage() before finish: expected {:?}, got {:?}",
                f.name, expected_before, before_finish
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_fed_one_byte_at_a_time() {
    for f in load_fixtures() {
        let (_, usage) = scan(f.format, &f.body, &[1]);
        assert_eq!(usage, f.expected, "{}", f.name);
    }
}

#[test]
fn line_endings_do_not_change_the_usage() {
    for f in load_fixtures() {
        if f.format != BodyFormat::Sse {
            continue;
        }
        // JSON text has no raw CR or LF inside strings, so every one is framing.
        let lf: Vec<u8> = String::from_utf8(f.body.clone())
            .unwrap()
            .replace("\r\n", "\n")
            .into_bytes();
        let crlf = String::from_utf8(lf.clone())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes();
        let cr: Vec<u8> = lf
            .iter()
            .map(|&b| if b == b'\n' { b'\r' } else { b })
            .collect();
        for (ending, body) in [("LF", &lf), ("CRLF", &crlf), ("CR", &cr)] {
            for lens in [&[][..], &[1], &[7, 1, 300]] {
                let (_, usage) = scan(f.format, body, lens);
                assert_eq!(
                    usage, f.expected,
                    "{} with {ending} line ends, chunks {lens:?}",
                    f.name
                );
            }
        }
    }
}

#[test]
fn any_chunking_gives_the_same_usage() {
    let chunk_len = prop_oneof![
        3 => Just(1usize),
        3 => 1usize..16,
        2 => 16usize..512,
        2 => 512usize..65_536,
    ];
    let chunking = prop::collection::vec(chunk_len, 1..48);
    for f in load_fixtures() {
        let (_, whole) = scan(f.format, &f.body, &[]);
        let mut runner = TestRunner::new(Config {
            cases: CASES_PER_FIXTURE,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&chunking, |lens| {
            let (_, usage) = scan(f.format, &f.body, &lens);
            if usage == whole {
                Ok(())
            } else {
                Err(TestCaseError::fail(format!(
                    "whole body gives {whole:?}, chunks {lens:?} give {usage:?}"
                )))
            }
        });
        if let Err(e) = result {
            panic!("{}: {e}", f.name);
        }
    }
}

#[test]
fn random_split_points_give_the_same_usage() {
    for f in load_fixtures() {
        if f.format != BodyFormat::Sse {
            continue;
        }
        let (_, whole) = scan(f.format, &f.body, &[]);
        let len = f.body.len();
        let cuts = prop::collection::vec(0..=len, 0..12);
        let mut runner = TestRunner::new(Config {
            cases: CASES_PER_FIXTURE,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&cuts, |mut cuts| {
            cuts.sort_unstable();
            let mut scanner = UsageScanner::new(f.format);
            let mut start = 0;
            for cut in cuts.into_iter().chain([len]) {
                scanner.feed(&f.body[start..cut]);
                start = cut;
            }
            let usage = scanner.finish();
            prop_assert_eq!(usage, whole);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{}: {e}", f.name);
        }
    }
}

//! Every recorded provider response in the shared fixtures, through the public API: the usage
//! read from it matches its `.expected.json`, however the body is split into frames.
//!
//! The fixtures are read from `$TTR_FIXTURES`, or `../shared/fixtures` next to the crate.

mod common;

use common::fixtures::load_fixtures;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower_token_ratelimit::usage::{BodyFormat, Usage, UsageScanner};

/// Random chunkings tried per fixture.
const CASES_PER_FIXTURE: u32 = 64;

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

//! Anthropic Messages usage.
//!
//! A stream reports `message_start.message.usage` (`input_tokens`,
//! `cache_creation_input_tokens`, `cache_read_input_tokens`, a first `output_tokens`), then
//! one or more `message_delta.usage`, which may repeat any of these fields. The values are
//! cumulative, so for each field the latest value reported wins; nothing is summed across
//! events. A body carries the same `usage` at the top level.
//!
//! When `usage.iterations[]` is present (server-side compaction runs an extra sampling step
//! that is billed and rate-limited but left out of the top-level counts) the usage is the sum
//! over the iterations.
//!
//! Anthropic's `input_tokens` excludes cache reads and writes, and no total is reported, so
//! [`Usage::total`] adds the categories up; `cached_input_tokens` is `cache_read_input_tokens`
//! and `reasoning_tokens` is `output_tokens_details.thinking_tokens` when reported (thinking is
//! already part of `output_tokens`).

use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess};

use super::wire::{Count, Lenient, Obj, WireUsage, deserialize_lenient};
use super::{Merge, Report, Usage};

/// The usage in an Anthropic `usage` object, merged field by field into what came before.
pub(crate) fn report(wire: &WireUsage) -> Report {
    let top = Usage {
        input_tokens: wire.input_tokens.get(),
        output_tokens: wire.output_tokens.get(),
        total_tokens: None,
        cached_input_tokens: wire.cache_read_input_tokens.get(),
        cache_creation_input_tokens: wire.cache_creation_input_tokens.get(),
        reasoning_tokens: wire
            .output_tokens_details
            .0
            .as_ref()
            .and_then(|d| d.thinking_tokens.get()),
    };
    let usage = match wire.iterations.0.as_deref() {
        Some(sum) => Usage {
            reasoning_tokens: top.reasoning_tokens,
            ..*sum
        },
        None => top,
    };
    Report {
        usage,
        merge: Merge::Fieldwise,
        provisional: false,
    }
}

/// Whether a `usage` object found without an Anthropic event `type` (a body located by its
/// key alone) is in Anthropic's vocabulary: no total, and cache or iteration fields.
pub(crate) fn looks_like(wire: &WireUsage) -> bool {
    wire.total_tokens.get().is_none()
        && wire.prompt_tokens.get().is_none()
        && (wire.cache_creation_input_tokens.get().is_some()
            || wire.cache_read_input_tokens.get().is_some()
            || wire.iterations.0.is_some())
}

/// `usage.iterations[]`, summed while it is read; `None` when absent or empty. Boxed: it is
/// rare, and this keeps the [`WireUsage`] every report is read into small.
#[derive(Debug, Default)]
pub(crate) struct Iterations(pub(crate) Option<Box<Usage>>);

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Iteration {
    input_tokens: Count,
    output_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
}

impl<'de> Lenient<'de> for Iterations {
    fn on_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut sum: Option<Usage> = None;
        while let Some(Obj(item)) = seq.next_element::<Obj<Iteration>>()? {
            if let Some(item) = item {
                let sum = sum.get_or_insert_default();
                add(&mut sum.input_tokens, item.input_tokens);
                add(&mut sum.output_tokens, item.output_tokens);
                add(
                    &mut sum.cache_creation_input_tokens,
                    item.cache_creation_input_tokens,
                );
                add(&mut sum.cached_input_tokens, item.cache_read_input_tokens);
            }
        }
        Ok(Self(sum.map(Box::new)))
    }
}

impl<'de> Deserialize<'de> for Iterations {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

/// A field of a sum is reported when any iteration reports it.
fn add(sum: &mut Option<u64>, item: Count) {
    if let Some(n) = item.get() {
        *sum = Some(sum.unwrap_or(0).saturating_add(n));
    }
}

#[cfg(test)]
mod tests {
    use crate::usage::{BodyFormat, Usage, UsageScanner};

    fn event(kind: &str, data: &str) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    fn sse(events: &[String]) -> Option<Usage> {
        let mut scanner = UsageScanner::new(BodyFormat::Sse);
        for e in events {
            scanner.feed(e.as_bytes());
        }
        scanner.finish()
    }

    fn message_start(usage: &str) -> String {
        event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{usage}}}}}"#
            ),
        )
    }

    fn message_delta(usage: &str) -> String {
        event(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}},"usage":{usage}}}"#
            ),
        )
    }

    #[test]
    fn latest_value_of_each_field_wins() {
        let usage = sse(&[
            message_start(
                r#"{"input_tokens":2037,"cache_creation_input_tokens":5,"cache_read_input_tokens":7,"output_tokens":1}"#,
            ),
            event("ping", r#"{"type":"ping"}"#),
            message_delta(r#"{"output_tokens":40}"#),
            message_delta(r#"{"input_tokens":15665,"cache_read_input_tokens":null,"output_tokens":795}"#),
            event("message_stop", r#"{"type":"message_stop"}"#),
        ])
        .unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: Some(15665),
                output_tokens: Some(795),
                total_tokens: None,
                cached_input_tokens: Some(7),
                cache_creation_input_tokens: Some(5),
                reasoning_tokens: None,
            }
        );
        assert_eq!(usage.total(), 15665 + 795 + 5 + 7);
        assert_eq!(usage.input_output(), 15665 + 795);
    }

    #[test]
    fn message_start_output_counts_when_no_delta_does() {
        let usage = sse(&[message_start(
            r#"{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}"#,
        )])
        .unwrap();
        assert_eq!(usage.output_tokens, Some(1));
    }

    #[test]
    fn iterations_are_summed() {
        let iterations = concat!(
            r#"[{"type":"compaction","input_tokens":180000,"output_tokens":3500},"#,
            r#"{"type":"message","input_tokens":23000,"output_tokens":1000,"cache_read_input_tokens":9,"cache_creation_input_tokens":0},"#,
            r#""not an iteration","#,
            r#"{"type":"advisor_message","input_tokens":1,"output_tokens":2}]"#,
        );
        let usage = sse(&[
            message_start(r#"{"input_tokens":23000,"cache_creation_input_tokens":0,"cache_read_input_tokens":9,"output_tokens":1}"#),
            message_delta(&format!(
                r#"{{"input_tokens":23000,"output_tokens":1000,"iterations":{iterations},"output_tokens_details":{{"thinking_tokens":300}}}}"#
            )),
        ])
        .unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: Some(203_001),
                output_tokens: Some(4502),
                total_tokens: None,
                cached_input_tokens: Some(9),
                cache_creation_input_tokens: Some(0),
                reasoning_tokens: Some(300),
            }
        );
    }

    #[test]
    fn empty_iterations_fall_back_to_the_top_level() {
        let usage = sse(&[message_delta(
            r#"{"input_tokens":3,"output_tokens":4,"iterations":[]}"#,
        )])
        .unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(3), Some(4))
        );
    }

    #[test]
    fn body_with_iterations() {
        let mut scanner = UsageScanner::new(BodyFormat::Json);
        scanner.feed(br#"{"type":"message","content":[],"usage":{"input_tokens":1,"output_tokens":1,"iterations":[{"input_tokens":10,"output_tokens":20},{"input_tokens":30,"output_tokens":40}]}}"#);
        let usage = scanner.finish().unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(40), Some(60))
        );
        assert_eq!(usage.total(), 100);
    }

    #[test]
    fn errors_mid_stream_keep_what_was_reported() {
        let usage = sse(&[
            message_start(r#"{"input_tokens":12,"output_tokens":1}"#),
            event(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
        ])
        .unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(12), Some(1))
        );
    }
}

//! OpenAI usage, and that of the APIs that copy it (Azure, DeepSeek, Mistral, Groq, xAI, …).
//!
//! - Chat Completions and legacy Completions: `usage.{prompt_tokens, completion_tokens,
//!   total_tokens, prompt_tokens_details.cached_tokens, completion_tokens_details.reasoning_tokens}`.
//!   Streams carry it in one chunk near the end (`choices: []`, or Mistral's finish chunk);
//!   the other chunks say `"usage": null` or nothing. The last non-null one wins.
//! - Embeddings: `usage.{prompt_tokens, total_tokens}`.
//! - Responses API: the same categories named `input_tokens`, `output_tokens`,
//!   `input_tokens_details`, `output_tokens_details`; in streams under `response.usage` of the
//!   `response.completed` / `response.incomplete` / `response.failed` event (earlier events say
//!   `"usage": null`; any event whose `response` carries a usage counts, the last one winning),
//!   in bodies at the top level.
//!
//! Provider extras (`prompt_cache_hit_tokens`, Groq's `x_groq.usage` and timings, xAI's
//! `cost_in_usd_ticks`) are ignored, and nothing is recomputed: the cached tokens are part of
//! the input, and the total is taken as reported even where it is not input + output (xAI).

use super::wire::{WireUsage, detail};
use super::{Merge, Report, Usage};

/// The usage in an OpenAI-style `usage` object; the last one reported wins.
pub(crate) fn report(wire: &WireUsage) -> Report {
    let input_details = [&wire.prompt_tokens_details, &wire.input_tokens_details];
    let output_details = [&wire.completion_tokens_details, &wire.output_tokens_details];
    Report {
        usage: Usage {
            input_tokens: wire.prompt_tokens.get().or(wire.input_tokens.get()),
            output_tokens: wire.completion_tokens.get().or(wire.output_tokens.get()),
            total_tokens: wire.total_tokens.get(),
            cached_input_tokens: detail(input_details, |d| d.cached_tokens),
            cache_creation_input_tokens: None,
            reasoning_tokens: detail(output_details, |d| d.reasoning_tokens),
        },
        merge: Merge::Replace,
        provisional: false,
    }
}

#[cfg(test)]
mod tests {
    use crate::usage::{BodyFormat, Usage, UsageScanner};

    fn sse(body: &str) -> Option<Usage> {
        let mut scanner = UsageScanner::new(BodyFormat::Sse);
        scanner.feed(body.as_bytes());
        scanner.finish()
    }

    fn json(body: &str) -> Option<Usage> {
        let mut scanner = UsageScanner::new(BodyFormat::Json);
        scanner.feed(body.as_bytes());
        scanner.finish()
    }

    #[test]
    fn chat_stream_last_non_null_usage_wins() {
        let usage = sse(concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30,",
            "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":5}}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: [DONE]\n\n",
        ));
        assert_eq!(
            usage,
            Some(Usage {
                input_tokens: Some(10),
                output_tokens: Some(20),
                total_tokens: Some(30),
                cached_input_tokens: Some(4),
                cache_creation_input_tokens: None,
                reasoning_tokens: Some(5),
            })
        );
    }

    #[test]
    fn stream_without_usage_reports_none() {
        let body = "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        assert_eq!(sse(body), None);
    }

    #[test]
    fn nested_provider_usage_is_ignored() {
        // Groq repeats usage under x_groq; only the top-level object counts.
        let usage = sse(concat!(
            "data: {\"x_groq\":{\"usage\":{\"prompt_tokens\":99,\"total_tokens\":99}},",
            "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3,\"queue_time\":0.04}}\n\n",
        ))
        .unwrap();
        assert_eq!((usage.input_tokens, usage.total_tokens), (Some(1), Some(3)));
        assert_eq!(
            sse("data: {\"x_groq\":{\"usage\":{\"prompt_tokens\":99}}}\n\n"),
            None
        );
    }

    #[test]
    fn embeddings_body() {
        let usage = json(r#"{"object":"list","data":[{"embedding":[0.1,-0.2]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#).unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens, usage.total_tokens),
            (Some(8), None, Some(8))
        );
        assert_eq!(usage.total(), 8);
    }

    #[test]
    fn responses_stream_reads_response_usage() {
        let usage = sse(concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"\\\"usage\\\": 1\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",",
            "\"usage\":{\"input_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":3},\"output_tokens\":5,",
            "\"output_tokens_details\":{\"reasoning_tokens\":2},\"total_tokens\":12}},\"sequence_number\":9}\n\n",
        ))
        .unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: Some(7),
                output_tokens: Some(5),
                total_tokens: Some(12),
                cached_input_tokens: Some(3),
                cache_creation_input_tokens: None,
                reasoning_tokens: Some(2),
            }
        );
        assert_eq!(usage.total(), 12);
        assert_eq!(usage.input_output(), 12);
    }

    #[test]
    fn responses_failed_with_null_usage_reports_none() {
        let body = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"usage\":null}}\n\n";
        assert_eq!(sse(body), None);
    }

    #[test]
    fn responses_body() {
        let usage = json(r#"{"object":"response","output":[],"usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11,"output_tokens_details":{"reasoning_tokens":1}}}"#).unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens
            ),
            (Some(5), Some(6), Some(1))
        );
    }

    #[test]
    fn cached_tokens_are_not_added_to_the_total() {
        let usage = json(r#"{"usage":{"prompt_tokens":100,"completion_tokens":10,"total_tokens":110,"prompt_tokens_details":{"cached_tokens":80}}}"#).unwrap();
        assert_eq!(usage.total(), 110);
        assert_eq!(usage.input_output(), 110);
    }
}

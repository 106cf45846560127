//! Google Gemini (`generateContent`, `streamGenerateContent`) usage.
//!
//! `usageMetadata.{promptTokenCount, candidatesTokenCount, totalTokenCount,
//! cachedContentTokenCount, thoughtsTokenCount}`; streams repeat it in every chunk, growing,
//! and the last one wins. Cached content is part of the prompt count, and the candidates count
//! leaves thoughts out while the total includes them, so the total is the figure to debit.
//! A `usageMetadata` without any count (`{"trafficType": "ON_DEMAND"}`) reports nothing.

use serde::Deserialize;

use super::wire::Count;
use super::{Merge, Report, Usage};

/// `usageMetadata`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct UsageMetadata {
    prompt_token_count: Count,
    candidates_token_count: Count,
    total_token_count: Count,
    cached_content_token_count: Count,
    thoughts_token_count: Count,
}

/// The usage in a `usageMetadata` object; the last one reported wins.
pub(crate) fn report(meta: &UsageMetadata) -> Report {
    Report {
        usage: Usage {
            input_tokens: meta.prompt_token_count.get(),
            output_tokens: meta.candidates_token_count.get(),
            total_tokens: meta.total_token_count.get(),
            cached_input_tokens: meta.cached_content_token_count.get(),
            cache_creation_input_tokens: None,
            reasoning_tokens: meta.thoughts_token_count.get(),
        },
        merge: Merge::Replace,
        provisional: false,
    }
}

#[cfg(test)]
mod tests {
    use crate::usage::{BodyFormat, Usage, UsageScanner};

    fn chunk(text: &str, usage: &str) -> String {
        format!(
            "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{text}\"}}],\"role\":\"model\"}},\"index\":0}}],\"usageMetadata\":{usage},\"modelVersion\":\"gemini-3-pro-preview\"}}\r\n\r\n"
        )
    }

    #[test]
    fn last_usage_metadata_wins() {
        let mut scanner = UsageScanner::new(BodyFormat::Sse);
        scanner.feed(chunk("a", r#"{"promptTokenCount":9,"candidatesTokenCount":5,"totalTokenCount":199,"thoughtsTokenCount":185}"#).as_bytes());
        assert_eq!(scanner.usage().unwrap().output_tokens, Some(5));
        scanner.feed(chunk("b", r#"{"promptTokenCount":9,"candidatesTokenCount":23,"totalTokenCount":217,"cachedContentTokenCount":4,"promptTokensDetails":[{"modality":"TEXT","tokenCount":9}],"thoughtsTokenCount":185}"#).as_bytes());
        scanner.feed(chunk("", r#"{"trafficType":"ON_DEMAND"}"#).as_bytes());
        let usage = scanner.finish().unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: Some(9),
                output_tokens: Some(23),
                total_tokens: Some(217),
                cached_input_tokens: Some(4),
                cache_creation_input_tokens: None,
                reasoning_tokens: Some(185),
            }
        );
        assert_eq!(usage.total(), 217);
        assert_eq!(usage.input_output(), 32);
    }

    #[test]
    fn metadata_without_counts_is_no_usage() {
        let mut scanner = UsageScanner::new(BodyFormat::Sse);
        scanner.feed(chunk("a", r#"{"trafficType":"ON_DEMAND"}"#).as_bytes());
        assert_eq!(scanner.finish(), None);
    }

    #[test]
    fn json_array_stream_body() {
        // streamGenerateContent without alt=sse: one JSON array of chunks.
        let mut scanner = UsageScanner::new(BodyFormat::Json);
        scanner.feed(
            br#"[{"candidates":[],"usageMetadata":{"promptTokenCount":3,"totalTokenCount":3}},"#,
        );
        scanner.feed(br#"{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}}]"#);
        let usage = scanner.finish().unwrap();
        assert_eq!(
            (usage.output_tokens, usage.total_tokens),
            (Some(4), Some(7))
        );
    }
}

//! Plain JSON bodies.
//!
//! A body is buffered up to the cap and parsed whole at its end. Past the cap (an embeddings
//! response with many vectors, an image's base64, say), an object is read as it passes
//! through an [`Outline`], which keeps only the members a usage is read from, wherever they
//! are in it; any other body (Gemini's stream as one JSON array) keeps a bounded tail, and the
//! usage is read from the last `"usage"` / `"usageMetadata"` key in it: every provider puts it
//! at or near the end.

use std::mem;

use memchr::memmem;

use super::outline::Outline;
use super::{
    Accumulator, USAGE_NEEDLE, extend_bounded, parse_json, read_usage, scan_json, skip_whitespace,
    usage_value_at,
};

/// Bytes of the body kept past the cap.
const TAIL: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct JsonBody {
    max: usize,
    buf: Vec<u8>,
    /// The body outgrew `max`: an object is read through `outline`; otherwise `buf` holds its
    /// last `TAIL` to `2 * TAIL` bytes.
    overflowed: bool,
    outline: Option<Box<Outline>>,
}

impl JsonBody {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            overflowed: false,
            outline: None,
        }
    }

    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if !self.overflowed {
            if self.buf.len() + chunk.len() <= self.max {
                extend_bounded(&mut self.buf, chunk, self.max);
                return;
            }
            let first = skip_whitespace(&self.buf)
                .first()
                .or(skip_whitespace(chunk).first());
            let Some(&first) = first else {
                // Only whitespace so far: what the body is is not known yet.
                self.buf.clear();
                return;
            };
            self.overflow(chunk, first == b'{');
        }
        if let Some(outline) = &mut self.outline {
            outline.feed(chunk);
            return;
        }
        if chunk.len() >= TAIL {
            self.buf.clear();
            self.buf.extend_from_slice(&chunk[chunk.len() - TAIL..]);
            return;
        }
        if self.buf.len() + chunk.len() > 2 * TAIL {
            // Drop the front down to `TAIL` bytes; at most once per `TAIL` bytes fed.
            let drop = (self.buf.len() + chunk.len() - TAIL).min(self.buf.len());
            self.buf.drain(..drop);
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The body outgrows the cap with `chunk`: an object goes on through an outline, anything
    /// else keeps a tail.
    fn overflow(&mut self, chunk: &[u8], object: bool) {
        self.overflowed = true;
        if object {
            let mut outline = Box::<Outline>::default();
            outline.feed(&mem::take(&mut self.buf));
            self.outline = Some(outline);
            return;
        }
        let keep = TAIL.saturating_sub(chunk.len()).min(self.buf.len());
        let mut tail = Vec::with_capacity(2 * TAIL);
        tail.extend_from_slice(&self.buf[self.buf.len() - keep..]);
        self.buf = tail;
    }

    /// Reads the usage of the whole body into `seen`, and frees the buffer.
    pub(crate) fn finish(&mut self, seen: &mut Accumulator) {
        let buf = mem::take(&mut self.buf);
        if let Some(outline) = self.outline.take() {
            if let Some(document) = outline.finish() {
                parse_json(document, seen);
            }
        } else if self.overflowed {
            // Exactly the last `TAIL` bytes, so the result never depends on how the body was
            // framed (the buffer may hold up to twice that).
            scan_tail(&buf[buf.len().saturating_sub(TAIL)..], seen);
        } else {
            scan_json(&buf, seen);
        }
    }

    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// The last usage key in `tail` whose value reads as a usage with some count.
fn scan_tail(tail: &[u8], seen: &mut Accumulator) {
    for at in memmem::rfind_iter(tail, USAGE_NEEDLE) {
        let Some((key, start)) = usage_value_at(tail, at) else {
            continue;
        };
        let report = read_usage(key, &tail[start..]).and_then(|(report, _)| report);
        if let Some(report) = report.filter(|r| !r.usage.is_empty()) {
            seen.apply(report);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;

    fn read(body: &JsonBody) -> Option<Usage> {
        let mut body = JsonBody {
            max: body.max,
            buf: body.buf.clone(),
            overflowed: body.overflowed,
            outline: body.outline.clone(),
        };
        let mut seen = Accumulator::default();
        body.finish(&mut seen);
        seen.usage
    }

    /// [`padded_body`] as the one element of an array, which keeps a tail past the cap.
    fn padded_array(pad: usize, tail: &str) -> Vec<u8> {
        [&b"["[..], &padded_body(pad, tail), b"]"].concat()
    }

    fn padded_body(pad: usize, tail: &str) -> Vec<u8> {
        let mut body = br#"{"object":"list","data":[{"embedding":["#.to_vec();
        while body.len() < pad {
            body.extend_from_slice(b"0.0123456789,");
        }
        body.extend_from_slice(b"0.1]}],");
        body.extend_from_slice(tail.as_bytes());
        body
    }

    /// Found by fuzzing: a usage key more than 64 KiB before the end was found or not
    /// depending on the framing (the buffer keeps between one and two tails). An object is
    /// read through its outline now, which finds it (as Mistral orders its bodies, usage
    /// first); an array still keeps a tail.
    #[test]
    fn the_usage_past_the_cap_does_not_depend_on_framing() {
        for (open, close, want) in [(&b"{"[..], &b"}"[..], Some(5)), (b"[{", b"}]", None)] {
            let mut body = open.to_vec();
            body.extend_from_slice(br#""usage":{"total_tokens":5},"pad":""#);
            body.extend(std::iter::repeat_n(b'x', TAIL + 9_000));
            body.extend_from_slice(b"\"");
            body.extend_from_slice(close);
            let scan = |chunk: usize| {
                let mut j = JsonBody::new(4096);
                for c in body.chunks(chunk) {
                    j.feed(c);
                }
                read(&j)
            };
            let whole = scan(body.len());
            assert_eq!(whole.and_then(|u| u.total_tokens), want);
            for chunk in [1, 7, 4096, 70_000] {
                assert_eq!(scan(chunk), whole, "{chunk}-byte frames");
            }
        }
    }

    /// Past the cap, an object's usage is its own top-level one: a `usage` in a member after
    /// it (metadata echoed from the request) is not read, as the tail search would have.
    #[test]
    fn past_the_cap_a_nested_usage_is_not_the_bodys() {
        let body = padded_body(
            300,
            r#""usage":{"input_tokens":1000,"output_tokens":50,"total_tokens":1050},"metadata":{"usage":{"total_tokens":1}}}"#,
        );
        let mut json = JsonBody::new(100);
        for chunk in body.chunks(64) {
            json.feed(chunk);
        }
        assert!(json.overflowed);
        assert_eq!(read(&json).unwrap().total_tokens, Some(1050));
        assert!(json.buffered_capacity() == 0);
    }

    #[test]
    fn a_large_body_is_read_in_bounded_memory() {
        let body = padded_body(
            5 << 20,
            r#""model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        let mut json = JsonBody::new(1 << 20);
        for chunk in body.chunks(16 * 1024) {
            json.feed(chunk);
            assert!(json.buffered_capacity() <= (1 << 20) + 16 * 1024);
        }
        assert!(json.overflowed);
        assert_eq!(json.buffered_capacity(), 0, "read through its outline");
        let usage = read(&json).unwrap();
        assert_eq!((usage.input_tokens, usage.total_tokens), (Some(8), Some(8)));
        // The same body under the cap is parsed whole, with the same result.
        let mut whole = JsonBody::new(16 << 20);
        whole.feed(&body);
        assert!(!whole.overflowed);
        assert_eq!(read(&whole), Some(usage));
    }

    #[test]
    fn tail_search_takes_the_last_usable_key() {
        let tail = r#""usage": {"prompt_tokens": 1, "total_tokens": 1}, "text": "say \"usage\": {\"prompt_tokens\": 666}", "usage_breakdown": null, "x": {"usage": null}}"#;
        let body = padded_array(300, tail);
        let mut json = JsonBody::new(100);
        json.feed(&body);
        assert!(json.overflowed && json.outline.is_none());
        assert_eq!(read(&json).unwrap().input_tokens, Some(1));
    }

    #[test]
    fn tail_search_reads_gemini_and_anthropic() {
        let gemini = padded_array(
            300,
            r#""usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 3, "totalTokenCount": 5}}"#,
        );
        let mut json = JsonBody::new(100);
        json.feed(&gemini);
        assert_eq!(read(&json).unwrap().total_tokens, Some(5));

        let anthropic = padded_array(
            300,
            r#""usage": {"input_tokens": 2, "cache_creation_input_tokens": 4, "cache_read_input_tokens": 8, "output_tokens": 3}}"#,
        );
        let mut json = JsonBody::new(100);
        json.feed(&anthropic);
        let usage = read(&json).unwrap();
        assert_eq!(usage.cached_input_tokens, Some(8));
        assert_eq!(usage.total(), 17);
    }

    #[test]
    fn tail_is_the_last_bytes_whatever_the_chunking() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for chunk_len in [1, 1000, 65_535, 65_536, 65_537, 200_000] {
            let mut json = JsonBody::new(100_000);
            for chunk in body.chunks(chunk_len) {
                json.feed(chunk);
            }
            assert!(json.buf.len() >= TAIL, "chunks of {chunk_len}");
            assert!(body.ends_with(&json.buf), "chunks of {chunk_len}");
            assert!(json.buffered_capacity() <= 2 * TAIL);
        }
    }

    #[test]
    fn broken_bodies_report_nothing() {
        for body in [
            "",
            "garbage",
            "{\"usage\":",
            "{\"usage\":{\"prompt_tokens\":5,",
            "{\"usage\":{\"prompt_tokens\":5}",
            "{\"usage\":null}",
            "{\"usage\":[1,2]}",
            "{\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":1.5,\"total_tokens\":1e300}}",
            "{\"usage\":{\"prompt_tokens\":\"5\"}}",
            "{\"usage\":{}}",
            "[1, 2, {\"usage\": 3}]",
            "{\"error\":{\"message\":\"usage limit\",\"type\":\"invalid_request_error\"}}",
        ] {
            let mut json = JsonBody::new(1 << 20);
            json.feed(body.as_bytes());
            assert_eq!(read(&json), None, "{body}");
        }
    }
}

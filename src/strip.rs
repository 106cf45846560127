//! Removes the usage-only chunk from an OpenAI stream whose client did not ask for usage (the
//! layer asked for it on the client's behalf, SPEC 3.4): the client receives exactly the other
//! events, byte for byte.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

/// An event still incomplete past this size is passed on as it is and filtering stops.
const MAX_PENDING: usize = 1 << 20;

/// Holds back each SSE event until it is complete, then passes it on unless it is the
/// usage-only chunk (`"choices": []` with a usage object).
#[derive(Debug, Default)]
pub(crate) struct UsageChunkFilter {
    pending: BytesMut,
    disabled: bool,
}

impl UsageChunkFilter {
    /// Takes a frame; returns what to send now (possibly nothing).
    pub(crate) fn push(&mut self, data: Bytes) -> Bytes {
        if self.disabled {
            return data;
        }
        // The usual frame: whole events, none with a usage object (`"usage":null` is fine).
        // Passed on as it is.
        if self.pending.is_empty()
            && (data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n"))
            && memmem::find(&data, b"\"usage\":{").is_none()
            && memmem::find(&data, b"\"usage\": {").is_none()
        {
            return data;
        }
        self.pending.extend_from_slice(&data);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if !is_usage_chunk(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_PENDING {
            self.disabled = true;
            out.extend_from_slice(&self.pending.split());
        }
        out.freeze()
    }

    /// At the end of the body: whatever is held back (an event without its blank line).
    pub(crate) fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        if is_usage_chunk(&rest) {
            Bytes::new()
        } else {
            rest.freeze()
        }
    }

    /// Whether bytes are held back.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// The end (after its blank line) of the first complete event.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_usage_chunk(event: &[u8]) -> bool {
    if memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
        return false;
    };
    v.get("choices")
        .and_then(serde_json::Value::as_array)
        .is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(serde_json::Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn drops_only_the_usage_chunk_in_any_chunking() {
        let want = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        for n in [1, 2, 5, 17, 1000] {
            let mut f = UsageChunkFilter::default();
            let mut out = Vec::new();
            for c in STREAM.as_bytes().chunks(n) {
                out.extend_from_slice(&f.push(Bytes::copy_from_slice(c)));
            }
            out.extend_from_slice(&f.finish());
            assert_eq!(String::from_utf8(out).unwrap(), want, "{n}-byte chunks");
        }
    }

    #[test]
    fn usage_on_a_content_chunk_is_kept() {
        let s = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":3}}\n\n";
        let mut f = UsageChunkFilter::default();
        assert_eq!(&f.push(Bytes::from(s))[..], s.as_bytes());
    }

    #[test]
    fn a_huge_event_stops_filtering() {
        let mut f = UsageChunkFilter::default();
        let big = Bytes::from(vec![b'x'; MAX_PENDING + 1]);
        assert_eq!(f.push(big.clone()).len(), big.len());
        assert_eq!(f.push(Bytes::from_static(b"y")).len(), 1);
    }
}
